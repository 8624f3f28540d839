"""Per-kernel checks on a GPU: each real kernel against its NumPy contract, on fresh inputs.

A :class:`Case` names a kernel launch over named buffers: inputs filled with fresh random
data, outputs poisoned with 0xFF bytes (NaN floats, impossible codes) so an element the kernel
never wrote shows up. The buffers live in a host arena and, at the same offsets, in device
memory; the case runs once through ``cuda_emulate.Kernels`` (the reference) and once on the
device, and every output is compared: float outputs by relative error (Frobenius norm) against
a threshold per arithmetic, code outputs (bf16, FP8, FP4 containers, KV codes) by the fraction
of codes that differ (rounding ties may flip a few when the float32 inputs differ in the last
bit) and the relative error of their decoded values. Big cases are also timed (CUDA events,
median) and priced by the bytes or FLOPs they must move or do. Used by ``engine.selftest`` and
``tests/test_gpu_kernels.py``; building cases needs no device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

from engine.backends import cuda_abi as abi
from engine.backends.cuda_emulate import Arena, Kernels
from engine.backends.cuda_layout import F32, I32, I64, LtGemm, Ref, attention_splits, rope_table
from engine.backends.cuda_weights import interleave_block_scales
from engine.formats import random_qtensor

# Relative-error thresholds (METHOD.md): float32 arithmetic far under 1e-3; outputs rounded to
# bf16 carry ~4e-3; FP8 outputs ~6e-2 per element but compared through their codes.
TOL_F32 = 1e-5
TOL_ACC = 2e-3  # float32 accumulation of long dot products in a different order
TOL_BF16_OUT = 1e-2
TOL_TC = 5e-3  # tensor-core products of exact bf16 operands, float32 accumulation
MAX_CODE_MISMATCH = 2e-3  # fraction of codes allowed to differ (ties after float32 noise)


@dataclass
class Buf:
    """A named buffer: ``init(rng)`` gives its starting bytes (None: poisoned output)."""

    name: str
    nbytes: int
    init: Callable[[np.random.Generator], np.ndarray] | None = None


@dataclass
class Out:
    """An output to compare: ``kind`` is ``float`` (float32), ``bf16``, ``e4m3``, ``e5m2``,
    ``u8`` (exact bytes) or ``i32`` (exact)."""

    buf: str
    kind: str
    count: int
    tol: float


@dataclass
class Case:
    """One kernel launch (or cuBLASLt GEMM) to check, and what it must move or compute."""

    name: str
    kernel: str
    grid: tuple[int, int, int]
    block: int
    args: list
    bufs: list[Buf]
    outs: list[Out]
    bytes_moved: float = 0.0
    flops: float = 0.0
    lt: LtGemm | None = None
    tags: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- fills


def f32(values: np.ndarray) -> Callable:
    arr = np.ascontiguousarray(values, dtype=np.float32)
    return lambda rng: arr.view(np.uint8)


def rand_f32(n: int, scale: float = 1.0) -> Callable:
    return lambda rng: (rng.standard_normal(n) * scale).astype(np.float32).view(np.uint8)


def rand_bf16(n: int, scale: float = 1.0) -> Callable:
    def fill(rng):
        v = (rng.standard_normal(n) * scale).astype(ml_dtypes.bfloat16)
        return v.view(np.uint16).view(np.uint8)

    return fill


def i32(values) -> Callable:
    arr = np.ascontiguousarray(values, dtype=np.int32)
    return lambda rng: arr.view(np.uint8)


def zeros(n: int) -> Callable:
    return lambda rng: np.zeros(n, np.uint8)


def qtensor_parts(rng_seed: int, shape, fmt: str, count: int = 1):
    """Data, scale bytes and per-tensor scales of ``count`` random weights (engine.formats)."""
    rng = np.random.default_rng(rng_seed)
    ts = [random_qtensor(rng, shape, fmt, std=shape[1] ** -0.5) for _ in range(count)]
    data = np.concatenate([t.data.view(np.uint8).reshape(-1) for t in ts])
    scale = np.concatenate([t.scale.reshape(-1) for t in ts]) if fmt in ("mxfp4", "nvfp4") else None
    wsc = None
    if fmt in ("fp8_e4m3", "fp8_e5m2", "nvfp4"):
        wsc = np.array(
            [t.global_scale if t.global_scale is not None else float(t.scale) for t in ts],
            np.float32,
        )
    return data, scale, wsc, ts


def kv_codes(rng_seed: int, n: int, fmt: str) -> tuple[np.ndarray, float]:
    t = random_qtensor(np.random.default_rng(rng_seed), (1, n), fmt, std=1.0)
    scale = 1.0 if t.scale is None else float(t.scale)
    return t.data.view(np.uint8).reshape(-1), scale


# ----------------------------------------------------------------------------- cases


def _ref(name: str) -> Ref:
    return Ref(name)


def case_norm(rows: int, h: int, fmt: int, add: bool, aux: bool, seed: int) -> Case:
    bufs = [
        Buf("x", 4 * rows * h, rand_f32(rows * h, 3.0)),
        Buf("add", 4 * rows * h, rand_f32(rows * h)),
        Buf("add_scale", 4 * rows, f32(np.linspace(0.5, 2.0, rows))),
        Buf("w", 4 * h, f32(1 + 0.1 * np.random.default_rng(seed).standard_normal(h))),
        Buf("out", rows * h * abi.ACT_ELEM_BYTES[fmt]),
        Buf("scale", 4 * rows),
        Buf("aux", 2 * rows * h),
        Buf("stamps", 8 * 4, zeros(32)),
        Buf("counter", 16, i32([0, 0, 0, 0])),
    ]
    kind = {abi.ACT_F32: "float", abi.ACT_E4M3: "e4m3", abi.ACT_E5M2: "e5m2"}.get(fmt, "bf16")
    outs = [Out("out", kind, rows * h, TOL_BF16_OUT), Out("scale", "float", rows, TOL_F32)]
    if add:
        outs.append(Out("x", "float", rows * h, TOL_F32))
    if aux:
        outs.append(Out("aux", "bf16", rows * h, TOL_BF16_OUT))
    args = [
        _ref("x"), I64(h), None, _ref("add") if add else None,
        _ref("add_scale") if add else None, I32(h), _ref("w"), F32(1e-5), I32(fmt), _ref("out"),
        _ref("scale"), _ref("aux") if aux else None, _ref("stamps"), _ref("counter"), I32(1),
        I32(4), I32(1),
    ]  # fmt: skip
    return Case(
        f"add_rmsnorm fmt={fmt} {rows}x{h}" + (" +add" if add else ""),
        "tpj_add_rmsnorm", (rows, 1, 1), 256, args, bufs, outs,
        bytes_moved=rows * h * (4 * (3 if add else 1) + abi.ACT_ELEM_BYTES[fmt]),
    )  # fmt: skip


def case_swiglu(rows: int, f: int, fmt: int) -> Case:
    bufs = [
        Buf("gu", 8 * rows * f, rand_f32(2 * rows * f, 2.0)),
        Buf("rs", 4 * rows, f32(np.linspace(0.5, 2, rows))),
        Buf("out", rows * f * abi.ACT_ELEM_BYTES[fmt]),
        Buf("scale", 4 * rows),
    ]
    kind = {abi.ACT_F32: "float", abi.ACT_E4M3: "e4m3"}.get(fmt, "bf16")
    return Case(
        f"swiglu fmt={fmt} {rows}x{f}", "tpj_swiglu", (rows, 1, 1), 256,
        [_ref("gu"), _ref("rs"), I32(f), I32(fmt), _ref("out"), _ref("scale")], bufs,
        [Out("out", kind, rows * f, TOL_BF16_OUT), Out("scale", "float", rows, TOL_F32)],
        bytes_moved=rows * f * (8 + abi.ACT_ELEM_BYTES[fmt]),
    )  # fmt: skip


def case_quant_nvfp4(rows: int, k: int, groups: int) -> list[Case]:
    bufs = [
        Buf("x", 4 * rows * k, rand_f32(rows * k)),
        Buf("amax", 4 * groups),
        Buf("out", 2 * rows * k),
        Buf("scale", 4 * rows),
    ]
    absmax = Case(
        f"absmax_groups {rows}x{k}/{groups}", "tpj_absmax_groups", (groups, 1, 1), 256,
        [_ref("x"), I64(k), None, I32(1), I32(rows), I32(k), I32(groups), _ref("amax")], bufs,
        [Out("amax", "float", groups, 0.0)],
    )  # fmt: skip
    bufs2 = [Buf(b.name, b.nbytes, b.init) for b in bufs]
    bufs2[1] = Buf("amax", 4 * groups, f32(np.full(groups, 4.0)))
    quant = Case(
        f"quant_rows nvfp4 {rows}x{k}", "tpj_quant_rows", (rows, 1, 1), 256,
        [_ref("x"), I64(k), None, I32(1), I32(k), I32(abi.ACT_NVFP4_IN_BF16), _ref("out"),
         _ref("scale"), _ref("amax"), I32(groups)], bufs2,
        [Out("out", "bf16", rows * k, TOL_BF16_OUT), Out("scale", "float", rows, 0.0)],
    )  # fmt: skip
    mx = Case(
        f"quant_rows mxfp4 {rows}x{k}", "tpj_quant_rows", (rows, 1, 1), 256,
        [_ref("x"), I64(k), None, I32(1), I32(k), I32(abi.ACT_MXFP4_IN_BF16), _ref("out"),
         _ref("scale"), None, I32(1)], [Buf(b.name, b.nbytes, b.init) for b in bufs],
        [Out("out", "bf16", rows * k, TOL_BF16_OUT)],
    )  # fmt: skip
    return [absmax, quant, mx]


def case_rope_qkv(b: int, hq: int, hkv: int, d: int, lmax: int, kv: str, seed: int) -> Case:
    heads = hq + 2 * hkv
    elem = 2 if kv == "bf16" else 1
    codes, scale = kv_codes(seed, b * hkv * lmax * d, kv)
    bufs = [
        Buf("qkv", 4 * b * heads * d, rand_f32(b * heads * d)),
        Buf("rs", 4 * b, f32(np.linspace(0.5, 2, b))),
        Buf("cs", 4 * d, f32(rope_table(d, lmax - 1))),
        Buf("q", 4 * b * hq * d),
        Buf("k", elem * b * hkv * lmax * d, lambda rng, c=codes: c.copy()),
        Buf("v", elem * b * hkv * lmax * d, lambda rng, c=codes: c[::-1].copy()),
    ]
    kind = "bf16" if kv == "bf16" else ("e4m3" if kv == "fp8_e4m3" else "e5m2")
    return Case(
        f"rope_qkv {kv} B={b} D={d}", "tpj_rope_qkv", (b, heads, 1), max(32, d // 2),
        [_ref("qkv"), _ref("rs"), I32(hq), I32(hkv), I32(d), _ref("cs"), _ref("q"), _ref("k"),
         _ref("v"), I32(abi.KV_CODES[kv]), F32(scale), I32(lmax), I32(lmax - 1)], bufs,
        [Out("q", "float", b * hq * d, TOL_F32), Out("k", kind, b * hkv * lmax * d, 0.05),
         Out("v", kind, b * hkv * lmax * d, 0.05)],
    )  # fmt: skip


def case_mla_write(b: int, rank: int, rope: int, lmax: int, kv: str, seed: int) -> Case:
    elem = 2 if kv == "bf16" else 1
    codes, scale = kv_codes(seed, b * lmax * rank, kv)
    rcodes, _ = kv_codes(seed + 1, b * lmax * rope, kv)
    kind = "bf16" if kv == "bf16" else ("e4m3" if kv == "fp8_e4m3" else "e5m2")
    bufs = [
        Buf("kva", 4 * b * (rank + rope), rand_f32(b * (rank + rope))),
        Buf("w", 4 * rank, f32(np.linspace(0.9, 1.1, rank))),
        Buf("cs", 4 * rope, f32(rope_table(rope, lmax - 1))),
        Buf("c", elem * b * lmax * rank, lambda rng, c=codes: c.copy()),
        Buf("r", elem * b * lmax * rope, lambda rng, c=rcodes: c.copy()),
    ]
    return Case(
        f"mla_kv_write {kv} B={b}", "tpj_mla_kv_write", (b, 1, 1), 256,
        [_ref("kva"), None, I32(rank), I32(rope), _ref("w"), F32(1e-5), _ref("cs"), _ref("c"),
         _ref("r"), I32(abi.KV_CODES[kv]), F32(scale), I32(lmax), I32(lmax - 1)], bufs,
        [Out("c", kind, b * lmax * rank, 0.05), Out("r", kind, b * lmax * rope, 0.05)],
    )  # fmt: skip


def case_gqa(b: int, hq: int, hkv: int, d: int, lmax: int, kv: str, window: int | None,
             seed: int, sm_count: int = 132) -> list[Case]:  # fmt: skip
    elem = 2 if kv == "bf16" else 1
    g = max(c for c in abi.GQA_GROUPS if (hq // hkv) % c == 0)
    t1 = lmax
    t0 = 0 if window is None else max(0, t1 - window)
    splits, chunk = attention_splits(b * (hq // g), t1 - t0, sm_count)
    kc, scale = kv_codes(seed, b * hkv * lmax * d, kv)
    vc, _ = kv_codes(seed + 1, b * hkv * lmax * d, kv)
    bufs = [
        Buf("q", 4 * b * hq * d, rand_f32(b * hq * d)),
        Buf("k", elem * kc.size // (1 if kv != "bf16" else 1), lambda rng, c=kc: c.copy()),
        Buf("v", elem * vc.size // (1 if kv != "bf16" else 1), lambda rng, c=vc: c.copy()),
        Buf("out", 4 * b * hq * d),
        Buf("pa", 4 * b * hq * splits * d),
        Buf("pm", 8 * b * hq * splits),
    ]
    kv_bytes = 2 * b * hkv * (t1 - t0) * d * elem
    name = abi.gqa_kernel(d, g, kv)
    args = [
        _ref("q"), _ref("k"), _ref("v"), F32(scale), I32(hq), I32(hkv), I32(lmax), I32(t0),
        I32(t1), I32(chunk), F32(d**-0.5), _ref("out"), _ref("pa"), _ref("pm"),
    ]  # fmt: skip
    label = f"gqa {kv} B={b} Hq={hq} Hkv={hkv} D={d} L={lmax}" + (f" W={window}" if window else "")
    if splits == 1:
        return [Case(label, name, (1, hq // g, b), 128, args, bufs,
                     [Out("out", "float", b * hq * d, TOL_ACC)], bytes_moved=kv_bytes,
                     flops=4.0 * b * hq * (t1 - t0) * d)]  # fmt: skip
    split = Case(
        label + f" splits={splits}", name, (splits, hq // g, b), 128, args, bufs,
        [Out("pa", "float", b * hq * splits * d, TOL_ACC), Out("pm", "float", 2 * b * hq * splits, TOL_ACC)],
        bytes_moved=kv_bytes, flops=4.0 * b * hq * (t1 - t0) * d,
    )  # fmt: skip
    merge = Case(
        f"attn_merge rows={b * hq} splits={splits}", "tpj_attn_merge", (b * hq, 1, 1), 128,
        [_ref("pa"), _ref("pm"), I32(splits), I32(d), _ref("out")],
        [Buf("pa", 4 * b * hq * splits * d, rand_f32(b * hq * splits * d)),
         Buf("pm", 8 * b * hq * splits, _merge_ml(b * hq * splits)), Buf("out", 4 * b * hq * d)],
        [Out("out", "float", b * hq * d, TOL_F32)],
    )  # fmt: skip
    return [split, merge]


def _merge_ml(n: int) -> Callable:
    def fill(rng):
        ml = np.stack([rng.uniform(-5, 5, n), rng.uniform(0.5, 20, n)], axis=1)
        ml[rng.random(n) < 0.1] = (-np.inf, 0.0)  # some empty splits
        ml[::7] = (rng.uniform(-5, 5), 1.0)  # never all empty for a row of 1 split
        return ml.astype(np.float32).view(np.uint8)

    return fill


def case_mla(b: int, h: int, rank: int, rope: int, lmax: int, kv: str, seed: int) -> list[Case]:
    elem = 2 if kv == "bf16" else 1
    splits, chunk = attention_splits(b * math.ceil(h / 8), lmax, 132)
    cc, scale = kv_codes(seed, b * lmax * rank, kv)
    rc, _ = kv_codes(seed + 1, b * lmax * rope, kv)
    bufs = [
        Buf("ql", 4 * b * h * rank, rand_f32(b * h * rank, 0.1)),
        Buf("qr", 4 * b * h * rope, rand_f32(b * h * rope, 0.1)),
        Buf("c", elem * cc.size, lambda rng, c=cc: c.copy()),
        Buf("r", elem * rc.size, lambda rng, c=rc: c.copy()),
        Buf("out", 4 * b * h * rank),
        Buf("pa", 4 * b * h * splits * rank),
        Buf("pm", 8 * b * h * splits),
    ]
    outs = (
        [Out("out", "float", b * h * rank, TOL_ACC)]
        if splits == 1
        else [Out("pa", "float", b * h * splits * rank, TOL_ACC)]
    )
    return [Case(
        f"mla {kv} B={b} H={h} R={rank} L={lmax} splits={splits}", abi.mla_kernel(rank, rope, kv),
        (splits, math.ceil(h / 8), b), 256,
        [_ref("ql"), _ref("qr"), _ref("c"), _ref("r"), F32(scale), I32(h), I32(lmax), I32(lmax),
         I32(chunk), F32(0.07), _ref("out"), _ref("pa"), _ref("pm")], bufs, outs,
        bytes_moved=b * lmax * (rank + rope) * elem,
        flops=2.0 * b * h * lmax * (2 * rank + rope),
    )]  # fmt: skip


def case_gemm(kind: str, fmt: str, n: int, k: int, m: int, seed: int, groups: int = 0,
              wm: int = 1, wn: int = 1) -> Case:  # fmt: skip
    """Our GEMV (kind ``gemv``) or tensor-core GEMM (``wq``); with ``groups`` experts, routed
    rows through x_rows/y_rows tables as the MoE layers use them."""
    experts = max(groups, 1)
    data, scale, wsc, _ = qtensor_parts(seed, (n, k), fmt, experts)
    wb = data.size // experts
    sb = 0 if scale is None else scale.size // experts
    rng = np.random.default_rng(seed + 7)
    x_rows = None
    if groups:
        counts = rng.multinomial(m, np.ones(groups) / groups)
        firsts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        table = np.stack([rng.permutation(groups), firsts, counts], 1)
        x_rows = rng.permutation(m).astype(np.int32)
    if kind == "wq":
        cap = 8 * wn
        src = table if groups else np.array([[0, 0, m]])
        tiles = [(e, f + o, min(cap, c - o)) for e, f, c in src for o in range(0, c, cap)]
        table = np.array(tiles + [(0, 0, 0)], np.int32)  # an idle tile too
    bufs = [
        Buf("w", data.size, lambda r, a=data: a),
        Buf(
            "ws", max(sb * experts, 16), (lambda r, a=scale: a) if scale is not None else zeros(16)
        ),
        Buf("wsc", 4 * experts, f32(wsc) if wsc is not None else zeros(4 * experts)),
        Buf("x", 2 * m * k, rand_bf16(m * k)),
        Buf("xs", 4 * m, f32(np.linspace(0.5, 2.0, m))),
        Buf("y", 4 * m * n),
    ]
    if groups or kind == "wq":
        bufs.append(Buf("tab", 12 * len(table), i32(table)))
    if x_rows is not None:
        bufs.append(Buf("xr", 4 * m, i32(x_rows)))
    name = (
        abi.gemv_kernel(fmt, {1: 1, 2: 2}.get(m if not groups else 4, 4))
        if kind == "gemv"
        else abi.wq_kernel(fmt, wm, wn)
    )
    args = [
        _ref("w"), I64(wb), _ref("ws") if scale is not None else None, I64(sb),
        _ref("wsc") if wsc is not None else None, _ref("x"), I64(k), _ref("xs"),
        _ref("tab") if (groups or kind == "wq") else None, _ref("xr") if x_rows is not None else None,
        None, _ref("y"), I64(n), I32(n), I32(k),
    ]  # fmt: skip
    rows = len(table) if (groups or kind == "wq") else 1
    if kind == "gemv":
        args.append(I32(m))
        grid = (math.ceil(n / 16), rows, 1)
    else:
        grid = (math.ceil(n / (16 * wm)), rows, 1)
    bpe = {"bf16": 2, "fp8_e4m3": 1, "fp8_e5m2": 1, "mxfp4": 0.53125, "nvfp4": 0.5625}[fmt]
    return Case(
        f"{kind} {fmt} N={n} K={k} M={m}" + (f" experts={groups}" if groups else "")
        + (f" w{wm}n{wn}" if kind == "wq" else ""),
        name, grid, 128, args, bufs,
        [Out("y", "float", m * n, TOL_TC if kind == "wq" else TOL_ACC)],
        bytes_moved=n * k * bpe * experts + 2 * m * k + 4 * m * n, flops=2.0 * m * n * k,
        tags={"fmt": fmt, "kind": kind},
    )  # fmt: skip


def case_lt(kind: str, fmt: str, n: int, k: int, m: int, seed: int) -> Case:
    """A cuBLASLt GEMM as the layouts use it (x in its container, float32 y)."""
    rng = np.random.default_rng(seed)
    data, scale, wsc, _ = qtensor_parts(seed, (n, k), fmt)
    bufs = [Buf("w", data.size, lambda r, a=data: a), Buf("y", 4 * m * n)]
    w_sc = x_sc = None
    alpha = 1.0 if wsc is None else float(wsc[0])
    if kind == "bf16":
        bufs.append(Buf("x", 2 * m * k, rand_bf16(m * k)))
    elif kind == "fp8":
        x = random_qtensor(rng, (m, k), fmt, std=1.0).data.view(np.uint8).reshape(-1)
        bufs.append(Buf("x", x.size, lambda r, a=x: a))
    else:
        xq = random_qtensor(rng, (m, k), fmt, std=1.0)
        xdata = xq.data.reshape(-1)
        bufs.append(Buf("x", xdata.size, lambda r, a=xdata: a))
        wi = interleave_block_scales(scale.reshape(n, -1))
        xi = interleave_block_scales(xq.scale)
        bufs.append(Buf("w_scales", wi.size, lambda r, a=wi: a))
        bufs.append(Buf("x_scales", xi.size, lambda r, a=xi: a))
        w_sc, x_sc = Ref("w_scales"), Ref("x_scales")
    g = LtGemm(kind, m, n, k, fmt, fmt if kind != "bf16" else "bf16", Ref("w"), Ref("x"),
               Ref("y"), alpha, w_sc, x_sc, "lt", -1)  # fmt: skip
    bpe = {"bf16": 2, "fp8_e4m3": 1, "fp8_e5m2": 1, "mxfp4": 0.53, "nvfp4": 0.56}[fmt]
    return Case(
        f"cublaslt {kind} {fmt} N={n} K={k} M={m}", "", (1, 1, 1), 1, [], bufs,
        [Out("y", "float", m * n, TOL_ACC)], bytes_moved=n * k * bpe, flops=2.0 * m * n * k, lt=g,
    )  # fmt: skip


def case_moe(b: int, e: int, k: int, h: int, seed: int) -> list[Case]:
    rng = np.random.default_rng(seed)
    assigned = np.stack([rng.choice(e, k, replace=False) for _ in range(b)]).astype(np.int32)
    slots = b * k
    logits = Buf("lg", 4 * b * e, rand_f32(b * e, 2.0))
    topk = Case(
        f"moe_topk_softmax B={b} E={e} k={k}", "tpj_moe_topk_softmax", (b, 1, 1), 32,
        [_ref("lg"), I32(e), I32(k), _ref("as"), _ref("g")],
        [logits, Buf("as", 4 * b * k), Buf("g", 4 * b * k)],
        [Out("as", "i32", b * k, 0.0), Out("g", "float", b * k, TOL_F32)],
    )  # fmt: skip
    gates = Case(
        f"moe_gates B={b} E={e} k={k}", "tpj_moe_gates", (b, 1, 1), 32,
        [_ref("lg"), I32(e), _ref("as"), I32(k), _ref("g")],
        [logits, Buf("as", 4 * b * k, i32(assigned)), Buf("g", 4 * b * k)],
        [Out("g", "float", b * k, TOL_F32)],
    )  # fmt: skip
    perm = rng.permutation(slots).astype(np.int32) % b
    permute = Case(
        f"moe_permute slots={slots} K={h}", "tpj_moe_permute", (slots, 1, 1), 128,
        [_ref("x"), I64(h), _ref("xr"), I32(h), _ref("out")],
        [Buf("x", 2 * b * h, rand_bf16(b * h)), Buf("xr", 4 * slots, i32(perm)), Buf("out", 2 * slots * h)],
        [Out("out", "bf16", slots * h, 0.0)],
    )  # fmt: skip
    slot_of = rng.permutation(slots).astype(np.int32)
    combine = Case(
        f"moe_combine B={b} k={k} H={h}", "tpj_moe_combine", (b, 1, 1), 256,
        [_ref("y"), _ref("ys"), _ref("so"), _ref("g"), I32(k), _ref("sh"), _ref("ss"), I32(h), _ref("out")],
        [Buf("y", 4 * slots * h, rand_f32(slots * h)), Buf("ys", 4 * slots, f32(np.linspace(0.5, 2, slots))),
         Buf("so", 4 * slots, i32(slot_of)), Buf("g", 4 * slots, f32(rng.random(slots))),
         Buf("sh", 4 * b * h, rand_f32(b * h)), Buf("ss", 4 * b, f32(np.linspace(1, 2, b))),
         Buf("out", 4 * b * h)],
        [Out("out", "float", b * h, TOL_F32)],
    )  # fmt: skip
    return [topk, gates, permute, combine]


def case_fp4_native(rows: int, k: int, nv: bool) -> Case:
    groups_p = -(-(k // (16 if nv else 32)) // 4) * 4
    rows_p = -(-rows // 128) * 128
    return Case(
        f"quant_fp4_native {'nvfp4' if nv else 'mxfp4'} {rows}x{k}", "tpj_quant_fp4_native",
        (rows, 1, 1), 128,
        [_ref("x"), I64(k), None, I32(k), I32(int(nv)), _ref("out"), _ref("sc"), I32(groups_p),
         _ref("rs"), _ref("amax")],
        [Buf("x", 4 * rows * k, rand_f32(rows * k)), Buf("out", rows * k // 2),
         Buf("sc", rows_p * groups_p, zeros(rows_p * groups_p)), Buf("rs", 4 * rows),
         Buf("amax", 4, f32([4.0]))],
        [Out("out", "u8", rows * k // 2, 0.0), Out("sc", "u8", rows_p * groups_p, 0.0),
         Out("rs", "float", rows, 0.0)],
    )  # fmt: skip


def correctness_cases(seed: int, cc: tuple[int, int], sm_count: int = 132) -> list[Case]:
    """Every kernel family on small shapes (fresh inputs from ``seed``)."""
    cases: list[Case] = []
    for fmt in (
        abi.ACT_BF16,
        abi.ACT_E4M3,
        abi.ACT_E4M3_IN_BF16,
        abi.ACT_MXFP4_IN_BF16,
        abi.ACT_F32,
    ):
        cases.append(
            case_norm(3, 1024, fmt, add=fmt != abi.ACT_F32, aux=fmt == abi.ACT_BF16, seed=seed)
        )
    cases += [case_swiglu(5, 768, abi.ACT_BF16), case_swiglu(3, 512, abi.ACT_E4M3)]
    cases += case_quant_nvfp4(6, 256, 3)
    for kv in ("bf16", "fp8_e4m3", "fp8_e5m2"):
        cases.append(case_rope_qkv(2, 8, 2, 128, 96, kv, seed))
        cases.append(case_mla_write(2, 64, 16, 33, kv, seed))
    for d, hq, hkv, window in (
        (64, 8, 2, None),
        (128, 32, 8, None),
        (128, 8, 8, 50),
        (256, 8, 1, None),
    ):
        for kv in ("bf16", "fp8_e4m3", "fp8_e5m2"):
            cases += case_gqa(2, hq, hkv, d, 300, kv, window, seed, sm_count)
    cases += case_gqa(1, 32, 8, 128, 4000, "bf16", None, seed, sm_count)  # split-K + merge
    cases += case_mla(2, 8, 64, 16, 70, "bf16", seed) + case_mla(
        1, 16, 512, 64, 300, "fp8_e4m3", seed
    )
    for fmt in abi.W_SUFFIX:
        for m in (1, 2, 3):
            cases.append(case_gemm("gemv", fmt, 80, 512, m, seed))
        cases.append(case_gemm("gemv", fmt, 48, 256, 9, seed, groups=4))
        for wm, wn, m in ((1, 1, 7), (1, 2, 13), (2, 4, 29), (2, 8, 70)):
            cases.append(case_gemm("wq", fmt, 96, 384, m, seed, wm=wm, wn=wn))
        cases.append(case_gemm("wq", fmt, 64, 256, 40, seed, groups=3, wm=1, wn=2))
    cases += case_moe(5, 16, 4, 256, seed)
    cases += [case_fp4_native(5, 256, True), case_fp4_native(3, 256, False)]
    cases.append(case_lt("bf16", "bf16", 256, 512, 3, seed))
    if cc >= (8, 9):
        cases.append(case_lt("fp8", "fp8_e4m3", 256, 512, 3, seed))
    if cc >= (10, 0):
        cases += [
            case_lt("fp4", "nvfp4", 256, 512, 16, seed),
            case_lt("fp4", "mxfp4", 256, 512, 16, seed),
        ]
    return cases


def performance_cases(seed: int, cc: tuple[int, int], sm_count: int) -> list[Case]:
    """Decode-sized shapes of Llama-3.1-8B (and an MoE expert) to time against the ceilings."""
    cases = []
    for fmt in ("bf16", "fp8_e4m3", "mxfp4", "nvfp4"):
        cases.append(case_gemm("gemv", fmt, 14336 * 2, 4096, 1, seed))
    cases.append(case_gemm("gemv", "mxfp4", 4096, 14336, 4, seed))
    cases.append(case_gemm("wq", "mxfp4", 14336 * 2, 4096, 64, seed, wm=2, wn=8))
    cases.append(case_gemm("wq", "mxfp4", 14336 * 2, 4096, 256, seed, wm=2, wn=8))
    cases.append(case_lt("bf16", "bf16", 14336 * 2, 4096, 1, seed))
    cases.append(case_lt("bf16", "bf16", 14336 * 2, 4096, 256, seed))
    if cc >= (8, 9):
        cases.append(case_lt("fp8", "fp8_e4m3", 14336 * 2, 4096, 256, seed))
    cases += case_gqa(1, 32, 8, 128, 8192, "bf16", None, seed, sm_count)[:1]
    cases += case_gqa(8, 32, 8, 128, 8192, "bf16", None, seed, sm_count)[:1]
    cases += case_gqa(8, 32, 8, 128, 8192, "fp8_e4m3", None, seed, sm_count)[:1]
    cases.append(case_norm(1, 4096, abi.ACT_BF16, add=True, aux=False, seed=seed))
    return cases


# ----------------------------------------------------------------------------- comparison


def decode_output(kind: str, raw: np.ndarray) -> np.ndarray:
    """Output bytes as float64 values (codes decoded) or integers."""
    if kind == "float":
        return raw.view(np.float32).astype(np.float64)
    if kind == "bf16":
        return raw.view(np.uint16).view(ml_dtypes.bfloat16).astype(np.float64)
    if kind == "e4m3":
        return raw.view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    if kind == "e5m2":
        return raw.view(ml_dtypes.float8_e5m2).astype(np.float64)
    if kind == "i32":
        return raw.view(np.int32).astype(np.float64)
    return raw.astype(np.float64)


def compare(out: Out, got: np.ndarray, want: np.ndarray) -> dict:
    """Relative error, NaN count and code mismatches of one output; ``ok`` against its tol."""
    g, w = decode_output(out.kind, got), decode_output(out.kind, want)
    unwritten = int(np.sum(np.isnan(g) & ~np.isnan(w)))
    finite = np.isfinite(w) & np.isfinite(g)
    denom = np.linalg.norm(w[finite]) or 1.0
    err = float(np.linalg.norm((g - w)[finite]) / denom) if finite.any() else 0.0
    mismatch = float(np.mean(got != want)) if out.kind not in ("float",) else 0.0
    if out.kind in ("u8", "i32"):
        ok = mismatch == 0.0 and unwritten == 0
    elif out.kind == "float":
        ok = err <= out.tol and unwritten == 0 and bool(np.array_equal(np.isnan(g), np.isnan(w)))
    else:
        ok = unwritten == 0 and (mismatch <= MAX_CODE_MISMATCH or err <= out.tol)
    return {"buf": out.buf, "rel_err": err, "tol": out.tol, "code_mismatch": mismatch,
            "unwritten": unwritten, "ok": bool(ok)}  # fmt: skip


# ----------------------------------------------------------------------------- running


def prepare(case: Case, seed: int) -> tuple[Arena, dict[str, int]]:
    """A host arena holding the case's buffers: inputs filled from ``seed``, the rest poisoned."""
    rng = np.random.default_rng(seed)
    offsets, pos = {}, Arena.BASE
    for b in case.bufs:
        offsets[b.name] = pos
        pos += -(-max(b.nbytes, 1) // 256) * 256
    arena = Arena(pos)
    arena.mem[:] = 0xFF
    for b in case.bufs:
        if b.init is not None:
            raw = np.asarray(b.init(rng), dtype=np.uint8).reshape(-1)
            arena.mem[offsets[b.name] : offsets[b.name] + raw.size] = raw
    return arena, offsets


def _value(arg, offsets: dict[str, int], base: int):
    if arg is None:
        return 0
    if isinstance(arg, Ref):
        return base + offsets[arg.region] + arg.offset
    return arg.value


def reference(case: Case, arena: Arena, offsets: dict[str, int]) -> None:
    """Run the case's NumPy contract on the host arena (in place)."""
    ref = Kernels(arena, clock=lambda: 1)
    if case.lt is not None:
        ref.lt_gemm(case.lt, lambda r: 0 if r is None else offsets[r.region] + r.offset)
    else:
        ref.run(case.kernel, case.grid, case.block, [_value(a, offsets, 0) for a in case.args])


_OUT_BYTES = {"float": 4, "bf16": 2, "e4m3": 1, "e5m2": 1, "u8": 1, "i32": 4}


def output_bytes(out: Out, mem: np.ndarray, offsets: dict[str, int]) -> np.ndarray:
    lo = offsets[out.buf]
    return mem[lo : lo + out.count * _OUT_BYTES[out.kind]]


class Harness:
    """Runs cases on the device and through the NumPy contracts (needs CuPy and a GPU)."""

    def __init__(self, kernels, lt=None) -> None:
        import cupy

        self.cp = cupy
        self.kernels = kernels
        self.lt = lt

    def run(self, case: Case, seed: int, timed: bool = False, check: bool = True) -> dict:
        """Check (and time) one case; returns its result row."""
        cp = self.cp
        arena, offsets = prepare(case, seed)
        dev = cp.asarray(arena.mem)
        base = int(dev.data.ptr)
        row = {"case": case.name, "kernel": case.kernel or "cublaslt", "ok": True, "outputs": []}
        stream = cp.cuda.get_current_stream()

        def launch():
            if case.lt is not None:
                g = case.lt
                self.lt.matmul(
                    g, _value(g.w, offsets, base), _value(g.x, offsets, base),
                    _value(g.y, offsets, base), _value(g.w_scales, offsets, base),
                    _value(g.x_scales, offsets, base), stream.ptr,
                )  # fmt: skip
            else:
                values = [_value(a, offsets, base) for a in case.args]
                self.kernels.launch(case.kernel, case.grid, case.block, values, stream)

        launch()
        stream.synchronize()
        got = cp.asnumpy(dev)
        if check:
            reference(case, arena, offsets)
            for out in case.outs:
                res = compare(
                    out, output_bytes(out, got, offsets), output_bytes(out, arena.mem, offsets)
                )
                row["outputs"].append(res)
                row["ok"] = row["ok"] and res["ok"]
            row["rel_err"] = max((o["rel_err"] for o in row["outputs"]), default=0.0)
        if timed:
            for _ in range(3):
                launch()
            times = []
            for _ in range(20):
                start, stop = cp.cuda.Event(), cp.cuda.Event()
                start.record(stream)
                launch()
                stop.record(stream)
                stop.synchronize()
                times.append(cp.cuda.get_elapsed_time(start, stop) * 1e-3)
            t = float(np.median(times))
            row["time_s"] = t
            row["gbps"] = case.bytes_moved / t / 1e9 if case.bytes_moved else None
            row["tflops"] = case.flops / t / 1e12 if case.flops else None
        return row
