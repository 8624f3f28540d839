"""A NumPy model of every CUDA kernel's contract, and an executor of layouts on the host.

Each ``k_<name>`` function implements the documented contract of one kernel family (see the
ABI comments at the top of ``kernels/*.cu``) on a host arena, reading its arguments by
position exactly as the kernel does. ``Emulator`` fills an arena the way the runner fills
device memory and runs a layout's launches through these functions, so the step layout
(buffers, strides, scales, routing tables, stamps) is checked against the float64 reference
without a GPU; on a GPU the self-test checks each real kernel against these functions.
Arithmetic is float64 unless the contract fixes a rounding (activation containers, KV codes).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import ml_dtypes
import numpy as np

from engine.backends import cuda_abi as abi
from engine.backends.cuda_layout import (
    F32,
    I32,
    I64,
    AllReduce,
    Layout,
    LayoutError,
    LtGemm,
    Ref,
    variant_blob,
)
from engine.backends.cuda_weights import WeightSource, block_scale_offsets
from engine.formats import (
    QTensor,
    decode_table,
    dequantize,
    encode_bf16,
    encode_e2m1,
    encode_fp8,
    pack_e2m1,
    unpack_e2m1,
)

E4M3, E5M2 = decode_table("fp8_e4m3"), decode_table("fp8_e5m2")
E2M1, E8M0 = decode_table("e2m1"), decode_table("e8m0")
LOG2E = 1.4426950408889634


class Arena:
    """Host bytes standing in for device memory; pointers are byte offsets (0 is null)."""

    BASE = 256  # so that no valid pointer is 0

    def __init__(self, nbytes: int) -> None:
        self.mem = np.zeros(nbytes + self.BASE, dtype=np.uint8)

    def view(self, ptr: int, dtype, count: int) -> np.ndarray:
        """``count`` elements of ``dtype`` at byte ``ptr`` (a writable view)."""
        dt = np.dtype(dtype)
        if ptr <= 0:
            raise ValueError("null pointer dereferenced")
        return self.mem[ptr : ptr + count * dt.itemsize].view(dt)


# ----------------------------------------------------------------------------- helpers


def bf16(codes: np.ndarray) -> np.ndarray:
    return np.asarray(codes, np.uint16).view(ml_dtypes.bfloat16).astype(np.float64)


def kv_values(codes: np.ndarray, kv_code: int, scale: float) -> np.ndarray:
    if kv_code == 0:
        return bf16(codes)
    table = E4M3 if kv_code == 1 else E5M2
    return table[codes].astype(np.float64) * np.float64(np.float32(scale))


def kv_encode(v: np.ndarray, kv_code: int, scale: float) -> np.ndarray:
    v = np.asarray(v, np.float32)
    if kv_code == 0:
        return encode_bf16(v)
    fmt = "fp8_e4m3" if kv_code == 1 else "fp8_e5m2"
    return encode_fp8(v / np.float32(scale), fmt)


def nv_global(amax: float) -> np.float32:
    g = np.float32(amax) / np.float32(6.0 * 448.0)
    return g if g > 0 else np.float32(1.0)


def fp4_blocks(v: np.ndarray, nv: bool, g: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """(E2M1 codes (R, K), scale codes (R, K / block)) of float32 rows, by formats' rules."""
    rows, k = v.shape
    block = 16 if nv else 32
    vb = v.reshape(rows, k // block, block).astype(np.float32)
    amax = np.abs(vb).max(axis=-1)
    if nv:
        sc = encode_fp8((amax / np.float32(6.0)) / g, "fp8_e4m3")
        denom = (E4M3[sc] * g)[..., None]
        x = np.divide(vb, denom, out=np.zeros_like(vb), where=denom > 0)
        codes = encode_e2m1(np.copysign(x, vb))
    else:
        _, ex = np.frexp(amax)
        sc = np.where(amax > 0, np.clip(ex.astype(np.int32) - 3 + 127, 0, 254), 0).astype(np.uint8)
        x = np.ldexp(vb, (127 - sc.astype(np.int32))[..., None]).astype(np.float32)
        codes = encode_e2m1(x)
    return codes.reshape(rows, k), sc


def act_store(
    fmt: int, v: np.ndarray, g: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``v`` (float32 (R, K)) in activation container ``fmt``: (raw array, row scales).

    ``g`` holds the NVFP4 global scale of each row (needed for that format only).
    """
    v = np.asarray(v, np.float32)
    rows = v.shape[0]
    ones = np.ones(rows, np.float32)
    if fmt == abi.ACT_BF16:
        return encode_bf16(v), ones
    if fmt == abi.ACT_F32:
        return v.copy(), ones
    if fmt in (abi.ACT_E4M3, abi.ACT_E5M2, abi.ACT_E4M3_IN_BF16, abi.ACT_E5M2_IN_BF16):
        e4 = fmt in (abi.ACT_E4M3, abi.ACT_E4M3_IN_BF16)
        limit = np.float32(448.0 if e4 else 57344.0)
        amax = np.abs(v).max(axis=1) if v.size else np.zeros(rows, np.float32)
        scale = amax / limit
        scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
        codes = encode_fp8(v / scale[:, None], "fp8_e4m3" if e4 else "fp8_e5m2")
        if fmt in (abi.ACT_E4M3, abi.ACT_E5M2):
            return codes, scale
        return encode_bf16((E4M3 if e4 else E5M2)[codes]), scale
    nv = fmt == abi.ACT_NVFP4_IN_BF16
    gg = np.float32(1.0) if g is None else np.asarray(g, np.float32)
    out = np.empty(v.shape, np.uint16)
    for r in range(rows):
        gr = np.float32(gg if np.ndim(gg) == 0 else gg[r])
        codes, sc = fp4_blocks(v[r : r + 1], nv, gr)
        block = 16 if nv else 32
        s = (E4M3 if nv else E8M0)[sc].astype(np.float32)
        vals = (E2M1[codes].reshape(1, -1, block) * s[..., None]).reshape(1, -1)
        out[r] = encode_bf16(vals.astype(np.float32))[0]
    scale = (gg * ones).astype(np.float32) if nv else ones
    return out, scale


def act_load(fmt: int, raw: np.ndarray) -> np.ndarray:
    """Values of a container's raw rows as float64 (row scales not applied)."""
    if fmt == abi.ACT_F32:
        return raw.astype(np.float64)
    if fmt == abi.ACT_E4M3:
        return E4M3[raw].astype(np.float64)
    if fmt == abi.ACT_E5M2:
        return E5M2[raw].astype(np.float64)
    return bf16(raw)


def weight_values(fmt: str, data: np.ndarray, scale: np.ndarray | None, n: int, k: int, wscale):
    """Dequantised (n, k) float64 weight from raw bytes (block scales row-major)."""
    if fmt == "bf16":
        q = QTensor(fmt, (n, k), data.view(np.uint16).reshape(n, k))
    elif fmt in ("fp8_e4m3", "fp8_e5m2"):
        q = QTensor(fmt, (n, k), data.reshape(n, k), np.asarray(wscale, np.float32).reshape(()))
    else:
        block = 32 if fmt == "mxfp4" else 16
        q = QTensor(
            fmt,
            (n, k),
            data.reshape(n, k // 2),
            scale.reshape(n, k // block),
            float(wscale) if fmt == "nvfp4" else None,
        )
    return dequantize(q, dtype=np.float64)


# ----------------------------------------------------------------------------- kernels


class Kernels:
    """The kernels' contracts in NumPy over an :class:`Arena`."""

    def __init__(self, arena: Arena, clock: Callable[[], int] = time.perf_counter_ns) -> None:
        self.a = arena
        self.clock = clock

    def run(self, name: str, grid: tuple[int, int, int], block: int, args: list) -> None:
        """Run kernel ``name`` with raw argument values (ints for pointers, 0 = null)."""
        for prefix, fn in (
            ("tpj_gqa_decode_", self.k_gqa_decode),
            ("tpj_mla_decode_", self.k_mla_decode),
            ("tpj_gemv_", self.k_grouped_gemm),
            ("tpj_wq_gemm_", self.k_grouped_gemm),
        ):
            if name.startswith(prefix):
                return fn(name, grid, block, *args)
        return getattr(self, "k_" + name[len("tpj_") :])(grid, block, *args)

    def f32(self, ptr, n):
        return self.a.view(ptr, np.float32, n)

    def i32(self, ptr, n):
        return self.a.view(ptr, np.int32, n)

    def _stamp(self, ring, counter, ring_len, per_step, idx):
        if ring and idx >= 0:
            row = int(self.a.view(counter, np.uint32, 1)[0]) % ring_len
            self.a.view(ring, np.uint64, ring_len * per_step)[row * per_step + idx] = self.clock()

    # -- stamps and step control --------------------------------------------------------

    def k_read_globaltimer(self, grid, block, out, slot):
        self.a.view(out, np.uint64, slot + 1)[slot] = self.clock()

    def k_step_begin(self, grid, block, counter, stamps, ring_len, per_step):
        c = self.a.view(counter, np.uint32, 1)
        c[0] += 1
        self._stamp(stamps, counter, ring_len, per_step, 0)

    def k_select_variant(self, grid, block, counter, variants, nbytes, n_variants, current):
        v = (int(self.a.view(counter, np.uint32, 1)[0]) - 1) % n_variants
        src = self.a.view(variants + v * nbytes, np.uint8, nbytes)
        self.a.view(current, np.uint8, nbytes)[:] = src

    def k_step_end(self, grid, block, counter, stamps, ring_len, per_step, idx):
        self._stamp(stamps, counter, ring_len, per_step, idx)

    # -- row kernels --------------------------------------------------------------------

    def k_embed(self, grid, block, tokens, table, h, residual):
        rows = grid[0]
        tok = self.i32(tokens, rows)
        t = self.a.view(table, np.uint16, (int(tok.max()) + 1) * h).reshape(-1, h)
        self.f32(residual, rows * h)[:] = bf16(t[tok]).astype(np.float32).reshape(-1)

    def _rows(self, ptr, stride, rows, k, scale_ptr=0, div=1):
        x = self.a.view(ptr, np.float32, (rows - 1) * stride + k)
        idx = np.arange(rows)[:, None] * stride + np.arange(k)[None, :]
        v = x[idx].astype(np.float32)
        if scale_ptr:
            s = self.f32(scale_ptr, (rows - 1) // div + 1)
            v = v * s[np.arange(rows) // div][:, None]
        return v

    def _store(self, fmt, out, out_scale, v, g=None):
        raw, scale = act_store(fmt, v, g)
        self.a.view(out, raw.dtype, raw.size)[:] = raw.reshape(-1)
        if out_scale:
            self.f32(out_scale, len(scale))[:] = scale

    def k_add_rmsnorm(self, grid, block, x, x_stride, x_scale, add, add_scale, h, weight, eps,
                      fmt, out, out_scale, aux, stamps, counter, ring_len, per_step, idx):  # fmt: skip
        rows = grid[0]
        self._stamp(stamps, counter, ring_len, per_step, idx)
        v = self._rows(x, x_stride, rows, h, x_scale)
        if add:
            v = v + self._rows(add, h, rows, h, add_scale)
            xv = self.a.view(x, np.float32, (rows - 1) * x_stride + h)
            for r in range(rows):
                xv[r * x_stride : r * x_stride + h] = v[r]
        v64 = v.astype(np.float64)
        inv = 1.0 / np.sqrt((v64 * v64).mean(axis=1, keepdims=True) + np.float32(eps))
        normed = (v64 * inv * self.f32(weight, h)).astype(np.float32)
        self._store(fmt, out, out_scale, normed)
        if aux:
            self.a.view(aux, np.uint16, rows * h)[:] = encode_bf16(normed).reshape(-1)

    def k_swiglu(self, grid, block, gate_up, in_scale, f, fmt, out, out_scale):
        rows = grid[0]
        gu = self._rows(gate_up, 2 * f, rows, 2 * f, in_scale).astype(np.float64)
        g, u = gu[:, :f], gu[:, f:]
        self._store(fmt, out, out_scale, (g / (1.0 + np.exp(-g)) * u).astype(np.float32))

    def k_quant_rows(self, grid, block, x, stride, in_scale, div, k, fmt, out, out_scale, amax, groups):  # fmt: skip
        rows = grid[0]
        v = self._rows(x, stride, rows, k, in_scale, div)
        g = None
        if amax:
            am = self.f32(amax, groups)
            g = np.array([nv_global(am[r % groups]) for r in range(rows)], np.float32)
        self._store(fmt, out, out_scale, v, g)

    def k_absmax_groups(self, grid, block, x, stride, in_scale, div, rows, k, groups, out):
        v = self._rows(x, stride, rows, k, in_scale, div)
        res = self.f32(out, groups)
        for grp in range(groups):
            sel = np.abs(v[grp::groups])
            res[grp] = sel.max() if sel.size else 0.0

    @staticmethod
    def _rope(v: np.ndarray, cs: np.ndarray) -> np.ndarray:
        half = v.shape[-1] // 2
        c, s = cs[:half].astype(np.float64), cs[half:].astype(np.float64)
        a, b = v[..., :half], v[..., half:]
        return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)

    def k_rope_qkv(self, grid, block, qkv, row_scale, hq, hkv, d, cos_sin, q_out, kc, vc,
                   kv_code, kv_scale, lmax, pos):  # fmt: skip
        b_sz, heads = grid[0], hq + 2 * hkv
        x = self._rows(qkv, heads * d, b_sz, heads * d, row_scale).reshape(b_sz, heads, d)
        cs = self.f32(cos_sin, d)
        x = x.astype(np.float64)
        q = self._rope(x[:, :hq], cs)
        k = self._rope(x[:, hq : hq + hkv], cs)
        v = x[:, hq + hkv :]
        self.f32(q_out, b_sz * hq * d)[:] = q.astype(np.float32).reshape(-1)
        dt = np.uint16 if kv_code == 0 else np.uint8
        for cache, vals in ((kc, k), (vc, v)):
            arr = self.a.view(cache, dt, b_sz * hkv * lmax * d).reshape(b_sz, hkv, lmax, d)
            arr[:, :, pos, :] = kv_encode(vals.astype(np.float32), kv_code, kv_scale)

    def k_rope_rows(self, grid, block, x, stride, offset, row_scale, div, d, cos_sin, out):
        rows = grid[0]
        v = self._rows(x + 4 * offset, stride, rows, d, row_scale, div).astype(np.float64)
        self.f32(out, rows * d)[:] = (
            self._rope(v, self.f32(cos_sin, d)).astype(np.float32).reshape(-1)
        )

    def k_mla_kv_write(self, grid, block, kva, row_scale, rank, rope, norm_w, eps, cos_sin, ckv,
                       krope, kv_code, kv_scale, lmax, pos):  # fmt: skip
        b_sz = grid[0]
        x = self._rows(kva, rank + rope, b_sz, rank + rope, row_scale).astype(np.float64)
        lat = x[:, :rank]
        lat = lat / np.sqrt((lat * lat).mean(axis=1, keepdims=True) + np.float32(eps))
        lat = lat * self.f32(norm_w, rank)
        kr = self._rope(x[:, rank:], self.f32(cos_sin, rope))
        dt = np.uint16 if kv_code == 0 else np.uint8
        c = self.a.view(ckv, dt, b_sz * lmax * rank).reshape(b_sz, lmax, rank)
        r = self.a.view(krope, dt, b_sz * lmax * rope).reshape(b_sz, lmax, rope)
        c[:, pos] = kv_encode(lat.astype(np.float32), kv_code, kv_scale)
        r[:, pos] = kv_encode(kr.astype(np.float32), kv_code, kv_scale)

    # -- attention ----------------------------------------------------------------------

    @staticmethod
    def _partials(scores: np.ndarray, values: np.ndarray, bounds: list[tuple[int, int]]):
        """(acc, m, l) per split in the kernels' log2 domain (float64)."""
        out = []
        for lo, hi in bounds:
            s = scores[..., lo:hi]
            if hi <= lo:
                out.append((np.zeros(scores.shape[:-1] + values.shape[-1:]), -np.inf, 0.0))
                continue
            m = s.max(axis=-1)
            p = np.exp2(s - m[..., None])
            out.append((np.einsum("...t,...td->...d", p, values[..., lo:hi, :]), m, p.sum(axis=-1)))
        return out

    def _write_attention(self, parts, splits, rows, d, out, part_acc, part_ml):
        if splits == 1:
            acc, _, l_sum = parts[0]
            self.f32(out, rows * d)[:] = (acc / l_sum[..., None]).astype(np.float32).reshape(-1)
            return
        pa = self.f32(part_acc, rows * splits * d).reshape(rows, splits, d)
        pm = self.f32(part_ml, rows * splits * 2).reshape(rows, splits, 2)
        for s, (acc, m, l_sum) in enumerate(parts):
            pa[:, s] = np.broadcast_to(acc, (rows, d)) if np.ndim(acc) else acc
            pm[:, s, 0] = m
            pm[:, s, 1] = l_sum

    def k_gqa_decode(self, name, grid, block, q, kc, vc, kv_scale, hq, hkv, lmax, t0, t1, chunk,
                     sm_scale, out, part_acc, part_ml):  # fmt: skip
        d = int(name.split("_decode_d")[1].split("_")[0])
        kv_code = {"bf16": 0, "e4m3": 1, "e5m2": 2}[name.rsplit("_", 1)[1]]
        splits, b_sz = grid[0], grid[2]
        dt = np.uint16 if kv_code == 0 else np.uint8
        qq = self.f32(q, b_sz * hq * d).reshape(b_sz, hq, d).astype(np.float64)
        keys = kv_values(self.a.view(kc, dt, b_sz * hkv * lmax * d), kv_code, kv_scale)
        vals = kv_values(self.a.view(vc, dt, b_sz * hkv * lmax * d), kv_code, kv_scale)
        keys = np.repeat(keys.reshape(b_sz, hkv, lmax, d), hq // hkv, axis=1)[:, :, t0:t1]
        vals = np.repeat(vals.reshape(b_sz, hkv, lmax, d), hq // hkv, axis=1)[:, :, t0:t1]
        scores = np.einsum("bhd,bhtd->bht", qq, keys) * (np.float32(sm_scale) * LOG2E)
        n = t1 - t0
        bounds = [(min(n, s * chunk), min(n, (s + 1) * chunk)) for s in range(splits)]
        parts = [
            (a.reshape(-1, d), np.reshape(m, -1), np.reshape(l_sum, -1))
            for a, m, l_sum in self._partials(scores, vals, bounds)
        ]
        self._write_attention(parts, splits, b_sz * hq, d, out, part_acc, part_ml)

    def k_mla_decode(self, name, grid, block, ql, qr, ckv, krope, kv_scale, h, lmax, t1, chunk,
                     sm_scale, out, part_acc, part_ml):  # fmt: skip
        rank = int(name.split("_decode_r")[1].split("_")[0])
        rope = int(name.split("_decode_r")[1].split("_p")[1].split("_")[0])
        kv_code = {"bf16": 0, "e4m3": 1, "e5m2": 2}[name.rsplit("_", 1)[1]]
        splits, b_sz = grid[0], grid[2]
        dt = np.uint16 if kv_code == 0 else np.uint8
        qlat = self.f32(ql, b_sz * h * rank).reshape(b_sz, h, rank).astype(np.float64)
        qrope = self.f32(qr, b_sz * h * rope).reshape(b_sz, h, rope).astype(np.float64)
        c = kv_values(self.a.view(ckv, dt, b_sz * lmax * rank), kv_code, kv_scale)
        r = kv_values(self.a.view(krope, dt, b_sz * lmax * rope), kv_code, kv_scale)
        c = c.reshape(b_sz, lmax, rank)[:, :t1]
        r = r.reshape(b_sz, lmax, rope)[:, :t1]
        scores = np.einsum("bhr,btr->bht", qlat, c) + np.einsum("bhp,btp->bht", qrope, r)
        scores = scores * (np.float32(sm_scale) * LOG2E)
        values = np.broadcast_to(c[:, None], (b_sz, h, t1, rank))
        bounds = [(min(t1, s * chunk), min(t1, (s + 1) * chunk)) for s in range(splits)]
        parts = [
            (a.reshape(-1, rank), np.reshape(m, -1), np.reshape(l_sum, -1))
            for a, m, l_sum in self._partials(scores, values, bounds)
        ]
        self._write_attention(parts, splits, b_sz * h, rank, out, part_acc, part_ml)

    def k_attn_merge(self, grid, block, part_acc, part_ml, splits, d, out):
        rows = grid[0]
        pa = self.f32(part_acc, rows * splits * d).reshape(rows, splits, d).astype(np.float64)
        pm = self.f32(part_ml, rows * splits * 2).reshape(rows, splits, 2).astype(np.float64)
        m, l_sum = pm[..., 0], pm[..., 1]
        mx = m.max(axis=1, keepdims=True)
        w = np.where(np.isneginf(m), 0.0, np.exp2(m - mx))
        w = w / (w * l_sum).sum(axis=1, keepdims=True)
        self.f32(out, rows * d)[:] = np.einsum("rs,rsd->rd", w, pa).astype(np.float32).reshape(-1)

    # -- GEMMs --------------------------------------------------------------------------

    def k_grouped_gemm(self, name, grid, block, w, w_eb, ws, ws_eb, w_scale, x, x_stride, x_scale,
                       groups, x_rows, y_rows, y, y_stride, n, k, m=None):  # fmt: skip
        suffix = name.removeprefix("tpj_wq_gemm_").removeprefix("tpj_gemv_").split("_")[0]
        fmt = {v: key for key, v in abi.W_SUFFIX.items()}[suffix]
        if groups:
            table = self.i32(groups, 3 * grid[1]).reshape(-1, 3)
        else:
            table = np.array([[0, 0, m]], dtype=np.int32)
        block_elems = {"mxfp4": 32, "nvfp4": 16}.get(fmt)
        for expert, first, count in table:
            if count <= 0:
                continue
            data = self.a.view(w + expert * w_eb, np.uint8, w_eb)
            scale = self.a.view(ws + expert * ws_eb, np.uint8, ws_eb) if block_elems else None
            wsc = self.f32(w_scale, expert + 1)[expert] if w_scale else 1.0
            wv = weight_values(fmt, data, scale, n, k, wsc)
            slots = np.arange(first, first + count)
            xr = self.i32(x_rows, first + count)[slots] if x_rows else slots
            xmax = int(xr.max()) + 1
            xv = bf16(self.a.view(x, np.uint16, xmax * x_stride).reshape(xmax, x_stride)[xr, :k])
            if x_scale:
                xv = xv * self.f32(x_scale, xmax)[xr][:, None]
            res = (xv @ wv.T).astype(np.float32)
            yr = self.i32(y_rows, first + count)[slots] if y_rows else slots
            ymax = int(yr.max()) + 1
            self.f32(y, ymax * y_stride).reshape(ymax, y_stride)[yr, :n] = res

    def k_quant_fp4_native(self, grid, block, x, stride, in_scale, k, nv, out, scales, groups_p,
                           out_scale, amax):  # fmt: skip
        rows = grid[0]
        v = self._rows(x, stride, rows, k, in_scale)
        g = nv_global(self.f32(amax, 1)[0]) if nv else np.float32(1.0)
        codes, sc = fp4_blocks(v, bool(nv), g)
        self.a.view(out, np.uint8, rows * k // 2)[:] = pack_e2m1(codes).reshape(-1)
        offs = block_scale_offsets(rows, sc.shape[1])
        rows_p = -(-rows // 128) * 128
        self.a.view(scales, np.uint8, rows_p * groups_p)[offs.reshape(-1)] = sc.reshape(-1)
        if out_scale:
            self.f32(out_scale, rows)[:] = g

    # -- MoE ----------------------------------------------------------------------------

    def k_moe_topk_softmax(self, grid, block, logits, e, k, assign, gates):
        b_sz = grid[0]
        lg = self.f32(logits, b_sz * e).reshape(b_sz, e).astype(np.float64)
        order = np.lexsort((np.broadcast_to(np.arange(e), lg.shape), -lg), axis=1)[:, :k]
        chosen = np.take_along_axis(lg, order, axis=1)
        p = np.exp(chosen - chosen[:, :1])
        self.i32(assign, b_sz * k)[:] = order.reshape(-1)
        self.f32(gates, b_sz * k)[:] = (p / p.sum(axis=1, keepdims=True)).reshape(-1)

    def k_moe_gates(self, grid, block, logits, e, assign, k, gates):
        b_sz = grid[0]
        lg = self.f32(logits, b_sz * e).reshape(b_sz, e).astype(np.float64)
        chosen = np.take_along_axis(lg, self.i32(assign, b_sz * k).reshape(b_sz, k), axis=1)
        p = np.exp(chosen - chosen.max(axis=1, keepdims=True))
        self.f32(gates, b_sz * k)[:] = (p / p.sum(axis=1, keepdims=True)).reshape(-1)

    def k_moe_permute(self, grid, block, x, stride, x_rows, k, out):
        slots = grid[0]
        rows = self.i32(x_rows, slots)
        xm = int(rows.max()) + 1
        src = self.a.view(x, np.uint16, xm * stride).reshape(xm, stride)
        self.a.view(out, np.uint16, slots * k)[:] = src[rows, :k].reshape(-1)

    def k_moe_combine(self, grid, block, y, y_scale, slot_of, gates, k, shared, shared_scale, h, out):  # fmt: skip
        b_sz = grid[0]
        so = self.i32(slot_of, b_sz * k).reshape(b_sz, k)
        slots = int(so.max()) + 1
        yy = self.f32(y, slots * h).reshape(slots, h).astype(np.float64)
        if y_scale:
            yy = yy * self.f32(y_scale, slots)[:, None]
        g = self.f32(gates, b_sz * k).reshape(b_sz, k).astype(np.float64)
        res = np.einsum("bk,bkh->bh", g, yy[so])
        if shared:
            sh = self.f32(shared, b_sz * h).reshape(b_sz, h).astype(np.float64)
            if shared_scale:
                sh = sh * self.f32(shared_scale, b_sz)[:, None]
            res = res + sh
        self.f32(out, b_sz * h)[:] = res.astype(np.float32).reshape(-1)

    # -- cuBLASLt -----------------------------------------------------------------------

    def lt_gemm(self, g: LtGemm, ptr: Callable[[Ref], int]) -> None:
        """``y = alpha * x . w^T`` as cuBLASLt computes it (float64 here)."""
        m, n, k = g.m, g.n, g.k
        if g.kind == "bf16":
            xv = bf16(self.a.view(ptr(g.x), np.uint16, m * k)).reshape(m, k)
            wv = bf16(self.a.view(ptr(g.w), np.uint16, n * k)).reshape(n, k)
        elif g.kind == "fp8":
            xt = E4M3 if g.x_fmt == "fp8_e4m3" else E5M2
            wt = E4M3 if g.w_fmt == "fp8_e4m3" else E5M2
            xv = xt[self.a.view(ptr(g.x), np.uint8, m * k)].astype(np.float64).reshape(m, k)
            wv = wt[self.a.view(ptr(g.w), np.uint8, n * k)].astype(np.float64).reshape(n, k)
        else:
            xv = self._fp4_operand(ptr(g.x), ptr(g.x_scales), m, k, g.x_fmt)
            wv = self._fp4_operand(ptr(g.w), ptr(g.w_scales), n, k, g.w_fmt)
        y = np.float64(np.float32(g.alpha)) * (xv @ wv.T)
        self.f32(ptr(g.y), m * n)[:] = y.astype(np.float32).reshape(-1)

    def _fp4_operand(self, data: int, scales: int, rows: int, k: int, fmt: str) -> np.ndarray:
        block = 16 if fmt == "nvfp4" else 32
        codes = unpack_e2m1(self.a.view(data, np.uint8, rows * k // 2).reshape(rows, k // 2))
        offs = block_scale_offsets(rows, k // block)
        raw = self.a.view(scales, np.uint8, int(offs.max()) + 1)[offs]
        s = (E4M3 if fmt == "nvfp4" else E8M0)[raw].astype(np.float64)
        vals = E2M1[codes].astype(np.float64).reshape(rows, k // block, block) * s[..., None]
        return vals.reshape(rows, k)


# ----------------------------------------------------------------------------- executor


class Emulator:
    """Runs a layout's step on the host: the CUDA backend without a GPU (for tests)."""

    def __init__(self, layout: Layout, seed: int, poison: bool = True, comm=None) -> None:
        """``comm`` (an ``engine.dist.Comm`` of the tensor-parallel group) sums the
        layout's all-reduces over host processes; None for a one-device layout."""
        self.layout = layout
        self.comm = comm
        self.arena = Arena(layout.total_bytes)
        self.kernels = Kernels(self.arena)
        if poison:  # scratch starts as NaN bytes: anything read before written shows up
            self.arena.mem[:] = 0xFF
        source = WeightSource(layout, seed)
        for name in layout.regions:
            raw = source.region_bytes(name)
            if raw is not None:
                self.arena.view(self.ptr(Ref(name)), np.uint8, raw.size)[:] = raw

    def ptr(self, ref: Ref | None) -> int:
        if ref is None:
            return 0
        return Arena.BASE + self.layout.offsets[ref.region] + ref.offset

    def _value(self, arg):
        if arg is None:
            return 0
        if isinstance(arg, Ref):
            return self.ptr(arg)
        if isinstance(arg, (I32, I64)):
            return int(arg.value)
        if isinstance(arg, F32):
            return float(np.float32(arg.value))
        raise TypeError(arg)

    def step(self, copy: int = 0) -> None:
        """Run one decode step (the program of weight copy ``copy``)."""
        for st in self.layout.programs[copy]:
            if isinstance(st, LtGemm):
                self.kernels.lt_gemm(st, self.ptr)
            elif isinstance(st, AllReduce):
                # One process emulates one rank: the sum over the group needs its peers.
                if self.comm is None:
                    raise LayoutError(f"{st.op}: a tensor-parallel step needs a communicator")
                buf = self.arena.view(self.ptr(st.buf), np.float32, st.count)
                self.comm.allreduce_sum(buf)
            else:
                self.kernels.run(st.kernel, st.grid, st.block, [self._value(a) for a in st.args])

    def forward(self, tokens: np.ndarray, assignments: dict[int, np.ndarray] | None) -> np.ndarray:
        """One step on given tokens and routing; returns the logits (B, vocab shard) float32."""
        counter = int(self.arena.view(self.ptr(Ref("counter")), np.uint32, 1)[0])
        slot = counter % self.layout.n_variants
        blob = variant_blob(self.layout.variants, tokens, assignments)
        at = self.ptr(Ref("variants")) + slot * blob.size
        self.arena.view(at, np.uint8, blob.size)[:] = blob
        self.step()
        plan = self.layout.plan
        n = next(op.n for op in plan.ops if op.name == "lm_head")
        return (
            self.arena.view(self.ptr(Ref(self.layout.logits)), np.float32, plan.point.batch * n)
            .reshape(plan.point.batch, n)
            .copy()
        )

    def stamps(self, steps: int) -> np.ndarray:
        """The stamp rows of the last ``steps`` steps (oldest first)."""
        from engine.backends.cuda_layout import STAMP_RING

        per = self.layout.stamps_per_step
        ring = self.arena.view(self.ptr(Ref("stamps")), np.uint64, STAMP_RING * per)
        counter = int(self.arena.view(self.ptr(Ref("counter")), np.uint32, 1)[0])
        rows = [(counter - steps + 1 + i) % STAMP_RING for i in range(steps)]
        return ring.reshape(STAMP_RING, per)[rows].astype(np.int64)
