"""Compiled CPU kernels for the decode step: weight GEMM/GEMV in every storage format, GQA and
MLA attention decode over a quantised KV cache, norms, SwiGLU, RoPE, and a copy-bandwidth probe.

Everything here computes in float32 and accumulates in float32; weights and KV entries are read
in their packed storage formats (see ``engine/formats.py`` for the layout, restated below) and
decoded on the fly, so the bytes a kernel moves are the bytes the format stores.

Weight layout, logical shape ``(N, K) = (out, in)``, row-major, ``y = x @ W.T``:

* ``bf16``: ``data`` uint16 ``(N, K)`` bfloat16 bit patterns.
* ``fp8_e4m3`` / ``fp8_e5m2``: ``data`` uint8 ``(N, K)``; ``scale`` float32 ``()`` or ``(N,)``.
* ``mxfp4``: ``data`` uint8 ``(N, K//2)`` (element ``2i`` in the low nibble); ``scale`` uint8
  ``(N, K//32)`` E8M0 codes.
* ``nvfp4``: ``data`` as mxfp4; ``scale`` uint8 ``(N, K//16)`` E4M3 codes; ``global_scale``.

How the GEMM streams weights. A plain Numba loop does not reach memory speed for the narrow
formats: Numba widens small integers to 64-bit lanes and LLVM then prefers 256-bit vectors, and
an FP8 table lookup becomes a gather. The inner loop is therefore written as LLVM vector IR
(``_make_rowdot``): 16 float32 lanes, FP8 and FP4 codes widened to 16-bit lanes and turned into
IEEE half bit patterns so that one ``fpext half -> float`` (``vcvtph2ps`` on x86) decodes them
exactly, subnormals and NaN included, with a software prefetch a few KiB ahead because the
hardware prefetcher alone left a single core well short of its share of the memory bandwidth
(measured on the 2-core Xeon this was tuned on). Numba's ``prange`` drives the row blocks.

For large M the GEMM dequantises tiles of rows to float32 with the same vector decode and hands
them to NumPy's BLAS (``GEMM_BLAS_MIN_M``).

Portability: the IR is target-independent; on x86 the half conversion needs F16C (every x86-64
CPU since 2012/2013); AVX-512 is used where present (the 16-lane vectors split in two otherwise).
"""

from __future__ import annotations

import math
import time
from typing import Any

import llvmlite.ir as ir
import ml_dtypes
import numba
import numpy as np
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic

__all__ = [
    "GEMM_BLAS_MIN_M",
    "WEIGHT_KINDS",
    "add_rmsnorm",
    "attention_decode",
    "copy_bandwidth_gbps",
    "gemm",
    "gemm_q",
    "mla_attention_decode",
    "rmsnorm",
    "rope",
    "swiglu",
]

#: Weight formats :func:`gemm` reads.
WEIGHT_KINDS: tuple[str, ...] = ("bf16", "fp8_e4m3", "fp8_e5m2", "mxfp4", "nvfp4")

#: Smallest batch M for which :func:`gemm` dequantises tiles of rows to float32 and calls BLAS
#: instead of streaming the packed weights through the vector kernel, per format. Measured on
#: the 2-core AVX-512 Xeon this was written on, 8192 x 8192 weights (bench prints both paths):
#: the paths tie near M=24 in every format (e.g. bf16 47 vs 47 ms); streaming wins below (M=8:
#: 10 vs 40 ms) and BLAS above (M=64: 58 vs 160+ ms). The streaming kernel re-decodes each
#: weight chunk once per 4 rows of x and runs at ~100 GFLOP/s; BLAS reaches ~200 after a
#: single-threaded dequantisation (running it on the Numba pool while OpenBLAS's threads spin
#: between calls was 2.5x slower).
GEMM_BLAS_MIN_M: dict[str, int] = {
    "bf16": 24,
    "fp8_e4m3": 24,
    "fp8_e5m2": 24,
    "mxfp4": 24,
    "nvfp4": 24,
}

# Fast-math flags for the Numba loops: reassociation lets LLVM vectorise float reductions and
# contraction forms FMAs. No nnan/ninf: softmax starts from -inf and NaN must propagate.
_FM = {"reassoc", "contract", "nsz"}

# ---------------------------------------------------------------------------------------------
# Decode tables (exact float32 values of every code), built from ml_dtypes, not engine.formats.
# ---------------------------------------------------------------------------------------------

_CODES = np.arange(256, dtype=np.uint8)
FP8_E4M3_TABLE = _CODES.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
FP8_E5M2_TABLE = _CODES.view(ml_dtypes.float8_e5m2).astype(np.float32)
#: E8M0 scale codes: 2 ** (c - 127), code 255 is NaN (code 0 is the subnormal 2 ** -127).
E8M0_TABLE = np.full(256, np.nan, dtype=np.float32)
E8M0_TABLE[:255] = np.ldexp(1.0, np.arange(255) - 127)
#: E2M1 values of the 16 nibble codes (bit 3 is the sign).
E2M1_TABLE = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=np.float32,
)

# The vector decode yields FP8 E4M3 values times 2**-8 and E2M1 values times 2**-14 (the
# exponent bias of IEEE half is 15, theirs 7 and 1); the kernels fold the powers of two back in.
_E4M3_HALF_FACTOR = np.float32(2.0**8)
_E2M1_HALF_FACTOR = np.float32(2.0**14)

# Kind codes passed to compiled kernels.
_K_E4M3, _K_E5M2, _K_MX, _K_NV = 0, 1, 2, 3

# ---------------------------------------------------------------------------------------------
# LLVM IR helpers
# ---------------------------------------------------------------------------------------------

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F16, _F32 = ir.HalfType(), ir.FloatType()
_LANES = 16  # float32 lanes per vector: one zmm, or two ymm where AVX-512 is absent
# Software prefetch distance in bytes for the byte formats. Tuned on the dev machine: 2 KiB
# lifted one core's FP8 stream from ~4 to ~10 GB/s; for BF16 it hurt (the hardware prefetcher
# keeps up with 2-byte elements), so BF16 does not prefetch.
_PREFETCH_BYTES = 2048


def _vt(elt: ir.Type, n: int = _LANES) -> ir.VectorType:
    return ir.VectorType(elt, n)


def _splat_const(elt: ir.Type, value: Any, n: int = _LANES) -> ir.Constant:
    return ir.Constant(_vt(elt, n), [value] * n)


def _as_i64(builder: ir.IRBuilder, v: ir.Value) -> ir.Value:
    if v.type.width > 64:
        return builder.trunc(v, _I64)
    if v.type.width < 64:
        return builder.sext(v, _I64)
    return v


def _row_ptr(builder: ir.IRBuilder, arr: Any, row: ir.Value, elt: ir.Type) -> ir.Value:
    """Pointer to ``arr[row, 0]`` of a 2-D Numba array (any row stride, unit inner stride)."""
    stride0 = builder.extract_value(arr.strides, 0)
    base = builder.bitcast(arr.data, _I8.as_pointer())
    return builder.bitcast(builder.gep(base, [builder.mul(row, stride0)]), elt.as_pointer())


def _vload(builder: ir.IRBuilder, ptr: ir.Value, idx: ir.Value, vt: ir.VectorType, align: int):
    return builder.load(builder.bitcast(builder.gep(ptr, [idx]), vt.as_pointer()), align=align)


def _vstore(builder: ir.IRBuilder, val: ir.Value, ptr: ir.Value, idx: ir.Value) -> None:
    builder.store(val, builder.bitcast(builder.gep(ptr, [idx]), val.type.as_pointer()), align=4)


def _shuffle(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, mask: list[int]) -> ir.Value:
    return builder.shuffle_vector(a, b, ir.Constant(_vt(_I32, len(mask)), mask))


def _half_to_f32(builder: ir.IRBuilder, h: ir.Value) -> list[ir.Value]:
    """A vector of 16*j half bit patterns (i16 lanes) -> j vectors of 16 float32 (exact)."""
    out = []
    for j in range(h.type.count // _LANES):
        part = _shuffle(builder, h, h, list(range(_LANES * j, _LANES * (j + 1))))
        out.append(builder.fpext(builder.bitcast(part, _vt(_F16)), _vt(_F32)))
    return out


def _fp8_to_half(builder: ir.IRBuilder, c: ir.Value, e5m2: bool) -> ir.Value:
    """FP8 codes widened to i16 lanes -> half bit patterns of the value (E4M3: times 2**-8).

    E5M2 is the top byte of IEEE half. E4M3 has one exponent bit less, so its magnitude bits
    move one place right; its only NaN codes (0x7F, 0xFF) must become a half NaN explicitly.
    """
    n = c.type.count
    if e5m2:
        return builder.shl(c, _splat_const(_I16, 8, n))
    mag = builder.and_(c, _splat_const(_I16, 0x7F, n))
    sign = builder.shl(builder.and_(c, _splat_const(_I16, 0x80, n)), _splat_const(_I16, 8, n))
    h = builder.or_(sign, builder.shl(mag, _splat_const(_I16, 7, n)))
    is_nan = builder.icmp_unsigned("==", mag, _splat_const(_I16, 0x7F, n))
    return builder.select(is_nan, _splat_const(_I16, 0x7E00, n), h)


def _e2m1_to_half(builder: ir.IRBuilder, c: ir.Value, high: bool) -> ir.Value:
    """Bytes widened to i16 lanes -> half bit patterns of the low or high E2M1 nibble, times
    2**-14: sign to bit 15, the 3 exponent/mantissa bits to bits 11..9 (E2M1 subnormal 0.5
    lands on a half subnormal, so the conversion is exact without a special case)."""
    n = c.type.count
    if high:
        sign = builder.shl(builder.and_(c, _splat_const(_I16, 0x80, n)), _splat_const(_I16, 8, n))
        mag = builder.shl(builder.and_(c, _splat_const(_I16, 0x70, n)), _splat_const(_I16, 5, n))
    else:
        sign = builder.shl(builder.and_(c, _splat_const(_I16, 0x08, n)), _splat_const(_I16, 12, n))
        mag = builder.shl(builder.and_(c, _splat_const(_I16, 0x07, n)), _splat_const(_I16, 9, n))
    return builder.or_(sign, mag)


def _fp4_scales(builder: ir.IRBuilder, kind: str, bsrow: ir.Value, kb: ir.Value) -> list[ir.Value]:
    """Per-lane block scales for the 4 groups of 16 bytes starting at byte ``kb`` of a row.

    nvfp4: 8 E4M3 codes (one per 8 bytes), decoded exactly through half and times 2**8 to undo
    the half bias shift; mxfp4: 4 E8M0 codes (one per 16 bytes) as float32 exponent bits.
    """
    if kind == "nvfp4":
        codes = builder.zext(
            _vload(builder, bsrow, builder.lshr(kb, ir.Constant(_I64, 3)), _vt(_I8, 8), 1),
            _vt(_I16, 8),
        )
        h = _fp8_to_half(builder, codes, e5m2=False)
        s8 = builder.fpext(builder.bitcast(h, _vt(_F16, 8)), _vt(_F32, 8))
        s8 = builder.fmul(s8, _splat_const(_F32, float(_E4M3_HALF_FACTOR), 8))
        return [_shuffle(builder, s8, s8, [2 * j] * 8 + [2 * j + 1] * 8) for j in range(4)]
    codes = builder.zext(
        _vload(builder, bsrow, builder.lshr(kb, ir.Constant(_I64, 4)), _vt(_I8, 4), 1), _vt(_I32, 4)
    )
    bits = builder.shl(codes, _splat_const(_I32, 23, 4))
    # Code 0 is 2**-127 (a float32 subnormal), code 255 is NaN; all others are exponent bits.
    bits = builder.select(
        builder.icmp_unsigned("==", codes, _splat_const(_I32, 0, 4)),
        _splat_const(_I32, 0x00400000, 4),
        bits,
    )
    bits = builder.select(
        builder.icmp_unsigned("==", codes, _splat_const(_I32, 255, 4)),
        _splat_const(_I32, 0x7FC00000, 4),
        bits,
    )
    s4 = builder.bitcast(bits, _vt(_F32, 4))
    return [_shuffle(builder, s4, s4, [j] * _LANES) for j in range(4)]


# Elements of the weight array (uint16 for bf16, bytes otherwise) one IR loop iteration reads.
_GROUP = {"bf16": 64, "e4m3": 64, "e5m2": 64, "mxfp4": 64, "nvfp4": 64}


def _decode_group(builder, kind: str, wrow, k, bsrow):
    """Decode one group of ``_GROUP[kind]`` weight-array elements starting at index ``k``.

    Returns ``(vectors, sources)``: float32 vectors of 16 lanes, and for each the x operand it
    pairs with as ``(odd, index)``: ``odd`` selects the odd-element x array (FP4 keeps even and
    odd elements apart so that no shuffle is needed) and ``index`` is the first x element.
    """
    vecs, srcs = [], []
    if kind == "bf16":
        for j in range(4):
            kk = builder.add(k, ir.Constant(_I64, _LANES * j))
            c = builder.zext(_vload(builder, wrow, kk, _vt(_I16), 2), _vt(_I32))
            vecs.append(builder.bitcast(builder.shl(c, _splat_const(_I32, 16)), _vt(_F32)))
            srcs.append((False, kk))
    elif kind in ("e4m3", "e5m2"):
        for j in range(2):
            kk = builder.add(k, ir.Constant(_I64, 2 * _LANES * j))
            c = builder.zext(_vload(builder, wrow, kk, _vt(_I8, 32), 1), _vt(_I16, 32))
            vecs.extend(_half_to_f32(builder, _fp8_to_half(builder, c, kind == "e5m2")))
            srcs.append((False, kk))
            srcs.append((False, builder.add(kk, ir.Constant(_I64, _LANES))))
    else:
        scales = _fp4_scales(builder, kind, bsrow, k)
        for j in range(2):
            kk = builder.add(k, ir.Constant(_I64, 32 * j))
            c = builder.zext(_vload(builder, wrow, kk, _vt(_I8, 32), 1), _vt(_I16, 32))
            lo = _half_to_f32(builder, _e2m1_to_half(builder, c, high=False))
            hi = _half_to_f32(builder, _e2m1_to_half(builder, c, high=True))
            for h in range(2):
                sv = scales[2 * j + h]
                kh = builder.add(kk, ir.Constant(_I64, _LANES * h))
                vecs.append(builder.fmul(lo[h], sv))
                srcs.append((False, kh))
                vecs.append(builder.fmul(hi[h], sv))
                srcs.append((True, kh))
    return vecs, srcs


def _prefetch(builder, wrow, k, elem_bytes: int, pf_off) -> None:
    fn = cgutils.get_or_insert_function(
        builder.module,
        ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32]),
        "llvm.prefetch.p0i8",
    )
    base = builder.bitcast(wrow, _I8.as_pointer())
    off = builder.add(builder.mul(k, ir.Constant(_I64, elem_bytes)), pf_off)
    # read, locality 3 (keep in all levels), data cache; a prefetch never faults.
    builder.call(
        fn,
        [
            builder.gep(base, [off]),
            ir.Constant(_I32, 0),
            ir.Constant(_I32, 3),
            ir.Constant(_I32, 1),
        ],
    )


def _make_rowdot(kind: str, mb: int):
    """Intrinsic ``rowdot(x, xo, m0, w, bs, n, k0, ng, pf_off, post, out)``:

    ``out[m0 + r, n] += post * sum_k x[m0 + r, k] * dec(w[n, k])`` for ``r < mb`` over ``ng``
    groups of ``_GROUP[kind]`` weight elements from ``k0``, FP4 block scales from ``bs[n]``;
    ``xo`` is the odd-element x for FP4 (``x`` then holds the even elements); the weight row is
    prefetched ``pf_off`` bytes ahead of the read position when ``pf_off`` is nonzero.
    Accumulates in four float32 vectors per row of x (independent FMA chains hide latency).
    """

    def typer(typingctx, x, xo, m0, w, bs, n, k0, ng, pf_off, post, out):
        if post != types.float32:
            return None  # the IR multiplies float32 lanes: refuse anything else at typing
        sig = types.void(x, xo, m0, w, bs, n, k0, ng, pf_off, post, out)

        def codegen(context, builder, sig, args):
            x, xo, m0, w, bs, n, k0, ng, pf_off, post, out = args
            tys = sig.args
            xa = context.make_array(tys[0])(context, builder, x)
            xoa = context.make_array(tys[1])(context, builder, xo)
            wa = context.make_array(tys[3])(context, builder, w)
            bsa = context.make_array(tys[4])(context, builder, bs)
            oa = context.make_array(tys[10])(context, builder, out)
            m0, n, k0, ng = (_as_i64(builder, v) for v in (m0, n, k0, ng))
            pf_off = _as_i64(builder, pf_off)
            elem_bytes = 2 if kind == "bf16" else 1
            wrow = _row_ptr(builder, wa, n, _I16 if kind == "bf16" else _I8)
            bsrow = _row_ptr(builder, bsa, n, _I8)
            rows = [builder.add(m0, ir.Constant(_I64, r)) for r in range(mb)]
            xrows = [_row_ptr(builder, xa, r, _F32) for r in rows]
            xorows = [_row_ptr(builder, xoa, r, _F32) for r in rows]
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_vt(_F32), [_vt(_F32)] * 3), "llvm.fma.v16f32"
            )
            zero = ir.Constant(_vt(_F32), [0.0] * _LANES)
            # Allocas in the entry block: LLVM promotes them to registers (mem2reg).
            accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(4)] for _ in rows]
            do_pf = builder.icmp_signed("!=", pf_off, ir.Constant(_I64, 0))
            with cgutils.for_range(builder, ng) as loop:
                k = builder.add(k0, builder.mul(loop.index, ir.Constant(_I64, _GROUP[kind])))
                with builder.if_then(do_pf, likely=True):
                    _prefetch(builder, wrow, k, elem_bytes, pf_off)
                vecs, srcs = _decode_group(builder, kind, wrow, k, bsrow)
                for r in range(mb):
                    for j, (vec, (odd, kk)) in enumerate(zip(vecs, srcs)):
                        xv = _vload(builder, (xorows if odd else xrows)[r], kk, _vt(_F32), 4)
                        slot = accs[r][j % 4]
                        builder.store(builder.call(fma, [xv, vec, builder.load(slot)]), slot)
            for r in range(mb):
                a = [builder.load(p) for p in accs[r]]
                v = builder.fadd(builder.fadd(a[0], a[1]), builder.fadd(a[2], a[3]))
                width = _LANES
                while width > 1:  # horizontal sum by halving
                    width //= 2
                    v = builder.fadd(
                        _shuffle(builder, v, v, list(range(width))),
                        _shuffle(builder, v, v, list(range(width, 2 * width))),
                    )
                total = builder.extract_element(v, ir.Constant(_I32, 0))
                optr = builder.gep(_row_ptr(builder, oa, rows[r], _F32), [n])
                builder.store(builder.fadd(builder.load(optr), builder.fmul(total, post)), optr)
            return context.get_dummy_value()

        return sig, codegen

    typer.__name__ = f"_rowdot_{kind}_{mb}"
    return intrinsic(typer)


def _make_dequant(kind: str):
    """Intrinsic ``dequant(w, bs, n, k0, ng, post, dst, drow)``: ``dst[drow, k0e:...] = post *
    dec(w[n, k0:...])`` for ``ng`` groups, in natural element order (``k0e`` is the element
    index of weight-array index ``k0``: twice it for FP4)."""

    def typer(typingctx, w, bs, n, k0, ng, post, dst, drow):
        if post != types.float32:
            return None
        sig = types.void(w, bs, n, k0, ng, post, dst, drow)

        def codegen(context, builder, sig, args):
            w, bs, n, k0, ng, post, dst, drow = args
            tys = sig.args
            wa = context.make_array(tys[0])(context, builder, w)
            bsa = context.make_array(tys[1])(context, builder, bs)
            da = context.make_array(tys[6])(context, builder, dst)
            n, k0, ng, drow = (_as_i64(builder, v) for v in (n, k0, ng, drow))
            wrow = _row_ptr(builder, wa, n, _I16 if kind == "bf16" else _I8)
            bsrow = _row_ptr(builder, bsa, n, _I8)
            drow_p = _row_ptr(builder, da, drow, _F32)
            pv = builder.insert_element(
                ir.Constant(_vt(_F32), ir.Undefined), post, ir.Constant(_I32, 0)
            )
            pv = _shuffle(builder, pv, pv, [0] * _LANES)
            fp4 = kind in ("mxfp4", "nvfp4")
            with cgutils.for_range(builder, ng) as loop:
                k = builder.add(k0, builder.mul(loop.index, ir.Constant(_I64, _GROUP[kind])))
                vecs, srcs = _decode_group(builder, kind, wrow, k, bsrow)
                vecs = [builder.fmul(v, pv) for v in vecs]
                if not fp4:
                    for vec, (_, kk) in zip(vecs, srcs):
                        _vstore(builder, vec, drow_p, kk)
                for j in range(0, len(vecs) if fp4 else 0, 2):  # interleave even/odd lanes
                    lo, hi = vecs[j], vecs[j + 1]
                    e = builder.mul(srcs[j][1], ir.Constant(_I64, 2))
                    first = [i // 2 + (i % 2) * _LANES for i in range(_LANES)]
                    second = [_LANES // 2 + i // 2 + (i % 2) * _LANES for i in range(_LANES)]
                    _vstore(builder, _shuffle(builder, lo, hi, first), drow_p, e)
                    _vstore(
                        builder,
                        _shuffle(builder, lo, hi, second),
                        drow_p,
                        builder.add(e, ir.Constant(_I64, _LANES)),
                    )
            return context.get_dummy_value()

        return sig, codegen

    typer.__name__ = f"_dequant_{kind}"
    return intrinsic(typer)


@intrinsic
def _bf16_bits_to_f32(typingctx, c):
    """One bfloat16 bit pattern (any integer type, low 16 bits used) -> float32, exact."""
    if not isinstance(c, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        if v.type.width > 16:
            v = builder.trunc(v, _I16)
        v = builder.shl(builder.zext(v, _I32), ir.Constant(_I32, 16))
        return builder.bitcast(v, _F32)

    return types.float32(c), codegen


def _make_kv_decode(e5m2: bool | None):
    """Intrinsic ``dec(src, i0, n16, scale, dst)``: ``dst[:16*n16] = dec(src[i0:...]) * scale``
    for a 1-D KV code array (``e5m2`` None: bf16 codes)."""

    def typer(typingctx, src, i0, n16, scale, dst):
        if scale != types.float32:
            return None
        sig = types.void(src, i0, n16, scale, dst)

        def codegen(context, builder, sig, args):
            src, i0, n16, scale, dst = args
            sa = context.make_array(sig.args[0])(context, builder, src)
            da = context.make_array(sig.args[4])(context, builder, dst)
            i0, n16 = _as_i64(builder, i0), _as_i64(builder, n16)
            sv = builder.insert_element(
                ir.Constant(_vt(_F32), ir.Undefined), scale, ir.Constant(_I32, 0)
            )
            sv = _shuffle(builder, sv, sv, [0] * _LANES)
            with cgutils.for_range(builder, n16) as loop:
                j = builder.mul(loop.index, ir.Constant(_I64, _LANES))
                if e5m2 is None:
                    c = builder.zext(
                        _vload(builder, sa.data, builder.add(i0, j), _vt(_I16), 2), _vt(_I32)
                    )
                    v = builder.bitcast(builder.shl(c, _splat_const(_I32, 16)), _vt(_F32))
                else:
                    c = builder.zext(
                        _vload(builder, sa.data, builder.add(i0, j), _vt(_I8), 1), _vt(_I16)
                    )
                    (v,) = _half_to_f32(builder, _fp8_to_half(builder, c, e5m2))
                _vstore(builder, builder.fmul(v, sv), da.data, j)
            return context.get_dummy_value()

        return sig, codegen

    typer.__name__ = f"_kv_decode_{'bf16' if e5m2 is None else ('e5m2' if e5m2 else 'e4m3')}"
    return intrinsic(typer)


_rd_bf16_1, _rd_bf16_2, _rd_bf16_4 = (_make_rowdot("bf16", mb) for mb in (1, 2, 4))
_rd_e4m3_1, _rd_e4m3_2, _rd_e4m3_4 = (_make_rowdot("e4m3", mb) for mb in (1, 2, 4))
_rd_e5m2_1, _rd_e5m2_2, _rd_e5m2_4 = (_make_rowdot("e5m2", mb) for mb in (1, 2, 4))
_rd_mx_1, _rd_mx_2, _rd_mx_4 = (_make_rowdot("mxfp4", mb) for mb in (1, 2, 4))
_rd_nv_1, _rd_nv_2, _rd_nv_4 = (_make_rowdot("nvfp4", mb) for mb in (1, 2, 4))
_dq_bf16 = _make_dequant("bf16")
_dq_e4m3 = _make_dequant("e4m3")
_dq_e5m2 = _make_dequant("e5m2")
_dq_mx = _make_dequant("mxfp4")
_dq_nv = _make_dequant("nvfp4")
_kvdec_bf16 = _make_kv_decode(None)
_kvdec_e4m3 = _make_kv_decode(False)
_kvdec_e5m2 = _make_kv_decode(True)

# ---------------------------------------------------------------------------------------------
# GEMM: streaming kernels (small M)
# ---------------------------------------------------------------------------------------------

# Rows of W per parallel work item (prange splits the blocks evenly over the threads).
_ROW_BLOCK = 16
# K chunk budget in float32 elements of x (all rows of x together) once M > 2: 64 KiB of x.
# Measured at 8192 x 8192 for M=4..32: 4096..65536 all within noise of each other.
_KX = 16384


@njit(cache=True, fastmath=_FM)
def _k_chunk(m: int, k: int, group: int) -> int:
    # One or two rows of x: stream whole weight rows (x is re-read from L1/L2, and the long
    # unbroken row keeps the prefetch simple; measured 32 vs 26 GB/s for bf16 at M=1). More
    # rows: chunks of K so that a block of weight rows reuses the x chunk from L1/L2.
    if m <= 2:
        return k // group * group if k >= group else group
    ke = max(group, (_KX // m) // group * group)
    return min(ke, k // group * group) if k >= group else group


@njit(parallel=True, cache=True, fastmath=_FM)
def _stream_bf16(x, w, out):  # pragma: no cover - compiled
    m_rows, k = x.shape
    n_rows = w.shape[0]
    group = 64
    k_main = k // group * group
    ke = _k_chunk(m_rows, k, group)
    n_blocks = (n_rows + _ROW_BLOCK - 1) // _ROW_BLOCK
    for blk in prange(n_blocks):
        n0 = blk * _ROW_BLOCK
        n1 = min(n_rows, n0 + _ROW_BLOCK)
        for n in range(n0, n1):
            for m in range(m_rows):
                t = np.float32(0.0)
                for kk in range(k_main, k):
                    t += x[m, kk] * _bf16_bits_to_f32(w[n, kk])
                out[m, n] = t
        for k0 in range(0, k_main, ke):
            ng = min(ke, k_main - k0) // group
            for n in range(n0, n1):
                m = 0
                while m + 4 <= m_rows:
                    _rd_bf16_4(x, x, m, w, w, n, k0, ng, 0, np.float32(1.0), out)
                    m += 4
                if m_rows - m >= 2:
                    _rd_bf16_2(x, x, m, w, w, n, k0, ng, 0, np.float32(1.0), out)
                    m += 2
                if m_rows - m >= 1:
                    _rd_bf16_1(x, x, m, w, w, n, k0, ng, 0, np.float32(1.0), out)


@njit(parallel=True, cache=True, fastmath=_FM)
def _stream_fp8(x, w, e5m2, table, rscale, per_row, pf_bytes, out):  # pragma: no cover
    m_rows, k = x.shape
    n_rows = w.shape[0]
    group = 64
    k_main = k // group * group
    ke = _k_chunk(m_rows, k, group)
    n_blocks = (n_rows + _ROW_BLOCK - 1) // _ROW_BLOCK
    row_bytes = w.strides[0]
    half_factor = np.float32(1.0) if e5m2 else _E4M3_HALF_FACTOR
    for blk in prange(n_blocks):
        n0 = blk * _ROW_BLOCK
        n1 = min(n_rows, n0 + _ROW_BLOCK)
        for n in range(n0, n1):
            s = rscale[n] if per_row else rscale[0]
            for m in range(m_rows):
                t = np.float32(0.0)
                for kk in range(k_main, k):
                    t += x[m, kk] * table[w[n, kk]]
                out[m, n] = t * s
        for k0 in range(0, k_main, ke):
            ng = min(ke, k_main - k0) // group
            for n in range(n0, n1):
                post = (rscale[n] if per_row else rscale[0]) * half_factor
                # Prefetch ahead in this row when the whole row is one chunk, else the same
                # chunk of the next row (read next).
                pf = pf_bytes if ke >= k_main else (row_bytes if pf_bytes else 0)
                m = 0
                if e5m2:
                    while m + 4 <= m_rows:
                        _rd_e5m2_4(x, x, m, w, w, n, k0, ng, pf, post, out)
                        m += 4
                    if m_rows - m >= 2:
                        _rd_e5m2_2(x, x, m, w, w, n, k0, ng, pf, post, out)
                        m += 2
                    if m_rows - m >= 1:
                        _rd_e5m2_1(x, x, m, w, w, n, k0, ng, pf, post, out)
                else:
                    while m + 4 <= m_rows:
                        _rd_e4m3_4(x, x, m, w, w, n, k0, ng, pf, post, out)
                        m += 4
                    if m_rows - m >= 2:
                        _rd_e4m3_2(x, x, m, w, w, n, k0, ng, pf, post, out)
                        m += 2
                    if m_rows - m >= 1:
                        _rd_e4m3_1(x, x, m, w, w, n, k0, ng, pf, post, out)


@njit(parallel=True, cache=True, fastmath=_FM)
def _stream_fp4(xe, xo, w, bs, nv, stable, gscale, pf_bytes, out):  # pragma: no cover
    m_rows = xe.shape[0]
    n_rows, kb = w.shape
    group = 64  # bytes
    kb_main = kb // group * group
    ke = _k_chunk(2 * m_rows, kb, group)  # x is split in two arrays of kb elements each
    n_blocks = (n_rows + _ROW_BLOCK - 1) // _ROW_BLOCK
    row_bytes = w.strides[0]
    spb = 8 if nv else 16  # bytes per scale block
    post = gscale * _E2M1_HALF_FACTOR
    for blk in prange(n_blocks):
        n0 = blk * _ROW_BLOCK
        n1 = min(n_rows, n0 + _ROW_BLOCK)
        for n in range(n0, n1):
            for m in range(m_rows):
                t = np.float32(0.0)
                for i in range(kb_main, kb):
                    c = w[n, i]
                    p = xe[m, i] * E2M1_TABLE[c & 15] + xo[m, i] * E2M1_TABLE[c >> 4]
                    t += p * stable[bs[n, i // spb]]
                out[m, n] = t * gscale
        for k0 in range(0, kb_main, ke):
            ng = min(ke, kb_main - k0) // group
            for n in range(n0, n1):
                pf = pf_bytes if ke >= kb_main else (row_bytes if pf_bytes else 0)
                m = 0
                if nv:
                    while m + 4 <= m_rows:
                        _rd_nv_4(xe, xo, m, w, bs, n, k0, ng, pf, post, out)
                        m += 4
                    if m_rows - m >= 2:
                        _rd_nv_2(xe, xo, m, w, bs, n, k0, ng, pf, post, out)
                        m += 2
                    if m_rows - m >= 1:
                        _rd_nv_1(xe, xo, m, w, bs, n, k0, ng, pf, post, out)
                else:
                    while m + 4 <= m_rows:
                        _rd_mx_4(xe, xo, m, w, bs, n, k0, ng, pf, post, out)
                        m += 4
                    if m_rows - m >= 2:
                        _rd_mx_2(xe, xo, m, w, bs, n, k0, ng, pf, post, out)
                        m += 2
                    if m_rows - m >= 1:
                        _rd_mx_1(xe, xo, m, w, bs, n, k0, ng, pf, post, out)


# ---------------------------------------------------------------------------------------------
# GEMM: dequantised tiles + BLAS (large M)
# ---------------------------------------------------------------------------------------------


@njit(cache=True, fastmath=_FM)
def _dequant_rows(w, bs, kind, table, rscale, per_row, gscale, n0, dst):  # pragma: no cover
    """dst[i, :] = dequant(w[n0 + i, :]) in float32 for i < dst.shape[0]; ``kind``: -1 bf16,
    else a ``_K_*`` code. ``table``: fp8 code values or the FP4 scale-code values."""
    rows, k = dst.shape
    group = 64
    for i in range(rows):
        n = n0 + i
        if kind < 0:
            k_main = k // group * group
            _dq_bf16(w, bs, n, 0, k_main // group, np.float32(1.0), dst, i)
            for kk in range(k_main, k):
                dst[i, kk] = _bf16_bits_to_f32(w[n, kk])
        elif kind <= _K_E5M2:  # fp8 (bf16 is -1, handled above)
            k_main = k // group * group
            s = rscale[n] if per_row else rscale[0]
            if kind == _K_E4M3:
                _dq_e4m3(w, bs, n, 0, k_main // group, s * _E4M3_HALF_FACTOR, dst, i)
            else:
                _dq_e5m2(w, bs, n, 0, k_main // group, s, dst, i)
            for kk in range(k_main, k):
                dst[i, kk] = table[w[n, kk]] * s
        else:
            kb = w.shape[1]
            kb_main = kb // group * group
            post = gscale * _E2M1_HALF_FACTOR
            spb = 8 if kind == _K_NV else 16
            if kind == _K_NV:
                _dq_nv(w, bs, n, 0, kb_main // group, post, dst, i)
            else:
                _dq_mx(w, bs, n, 0, kb_main // group, post, dst, i)
            for b in range(kb_main, kb):
                c = w[n, b]
                s = table[bs[n, b // spb]]
                dst[i, 2 * b] = (E2M1_TABLE[c & 15] * s) * gscale
                dst[i, 2 * b + 1] = (E2M1_TABLE[c >> 4] * s) * gscale


# Rows of W dequantised per BLAS call: a float32 tile of about this many bytes. Measured at
# 8192 x 8192, M=64: 2 MiB tiles 87 ms, 8 MiB 65 ms, 32 MiB 58 ms (fewer, larger BLAS calls).
_TILE_BYTES = 32 << 20

# ---------------------------------------------------------------------------------------------
# GEMM: public entry points
# ---------------------------------------------------------------------------------------------

_FP8_TABLES = {"fp8_e4m3": FP8_E4M3_TABLE, "fp8_e5m2": FP8_E5M2_TABLE}
_EMPTY_U8 = np.zeros((1, 1), dtype=np.uint8)
_ONE_F32 = np.ones(1, dtype=np.float32)


def _fp8_scale(scale: Any, n: int) -> tuple[np.ndarray, bool]:
    s = np.ascontiguousarray(scale, dtype=np.float32).reshape(-1)
    if s.size == n and n != 1:
        return s, True
    if s.size != 1:
        raise ValueError(f"fp8 scale must have shape () or ({n},), got {np.shape(scale)}")
    return s, False


def gemm(
    x: np.ndarray,
    fmt: str,
    data: np.ndarray,
    scale: Any,
    global_scale: float | None,
    out: np.ndarray,
    *,
    path: str = "auto",
) -> None:
    """``out = x @ dequant(W).T`` for a packed weight ``W`` of logical shape ``(N, K)``.

    Args:
        x: float32 ``(M, K)`` activations (made C-contiguous if needed).
        fmt: one of :data:`WEIGHT_KINDS`.
        data, scale, global_scale: the packed weight, as laid out in the module docstring.
        out: float32 ``(M, N)``, written entirely (any strides).
        path: ``"auto"`` (streaming below :data:`GEMM_BLAS_MIN_M` rows, else BLAS on dequantised
            tiles), ``"stream"`` or ``"blas"`` to force one (benchmarks measure both).

    Each weight byte is read from memory once per call: the streaming kernel decodes a chunk of
    a row in registers and applies it to every row of x; the BLAS path decodes a tile of rows
    once into float32 and multiplies all of x by it. Accumulation is float32 throughout.
    """
    if fmt not in GEMM_BLAS_MIN_M:
        raise ValueError(f"unknown weight format {fmt!r}; expected one of {WEIGHT_KINDS}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or out.ndim != 2 or out.dtype != np.float32:
        raise ValueError("gemm wants x float32 (M, K) and out float32 (M, N)")
    m_rows, k = x.shape
    n_rows = data.shape[0]
    if out.shape != (m_rows, n_rows):
        raise ValueError(f"out has shape {out.shape}, expected {(m_rows, n_rows)}")
    if m_rows == 0 or n_rows == 0:
        return
    fp4 = fmt in ("mxfp4", "nvfp4")
    k_data = data.shape[1] * (2 if fp4 else 1)
    if k_data != k:
        raise ValueError(f"{fmt} weight has K={k_data}, x has K={k}")
    if k == 0:
        out[...] = 0.0
        return
    if path == "auto":
        path = "blas" if m_rows >= GEMM_BLAS_MIN_M[fmt] else "stream"
    if path == "blas":
        _gemm_blas(x, fmt, data, scale, global_scale, out)
        return
    if path != "stream":
        raise ValueError(f"unknown gemm path {path!r}")
    # The streaming kernels store through a row pointer plus column index, so they need a
    # C-contiguous (M, N); other layouts go through a temporary.
    dst = out if out.flags.c_contiguous else np.empty((m_rows, n_rows), dtype=np.float32)
    if fmt == "bf16":
        _stream_bf16(x, _u16(data), dst)
    elif fmt in _FP8_TABLES:
        s, per_row = _fp8_scale(scale, n_rows)
        _stream_fp8(
            x, _u8(data), fmt == "fp8_e5m2", _FP8_TABLES[fmt], s, per_row, _PREFETCH_BYTES, dst
        )
    elif fp4:
        nv = fmt == "nvfp4"
        xe = np.ascontiguousarray(x[:, 0::2])
        xo = np.ascontiguousarray(x[:, 1::2])
        bs = _fp4_scale_codes(scale, n_rows, k, nv)
        gs = np.float32(global_scale if (nv and global_scale is not None) else 1.0)
        _stream_fp4(
            xe,
            xo,
            _u8(data),
            bs,
            nv,
            FP8_E4M3_TABLE if nv else E8M0_TABLE,
            gs,
            _PREFETCH_BYTES,
            dst,
        )
    else:
        raise ValueError(f"unknown weight format {fmt!r}; expected one of {WEIGHT_KINDS}")
    if dst is not out:
        out[...] = dst


def _u16(data: np.ndarray) -> np.ndarray:
    if data.dtype != np.uint16 or data.ndim != 2:
        raise ValueError("bf16 data must be uint16 (N, K)")
    return np.ascontiguousarray(data)


def _u8(data: np.ndarray) -> np.ndarray:
    if data.dtype != np.uint8 or data.ndim != 2:
        raise ValueError("fp8/fp4 data must be uint8 (N, K) or (N, K//2)")
    return np.ascontiguousarray(data)


def _fp4_scale_codes(scale: Any, n: int, k: int, nv: bool) -> np.ndarray:
    block = 16 if nv else 32
    if k % block:
        raise ValueError(f"{'nvfp4' if nv else 'mxfp4'} needs K a multiple of {block}, got {k}")
    bs = np.ascontiguousarray(scale)
    if bs.dtype != np.uint8 or bs.shape != (n, k // block):
        raise ValueError(f"{'nvfp4' if nv else 'mxfp4'} scale must be uint8 {(n, k // block)}")
    return bs


def _gemm_blas(x, fmt, data, scale, global_scale, out) -> None:
    m_rows, k = x.shape
    n_rows = data.shape[0]
    tile_rows = max(16, min(n_rows, _TILE_BYTES // (4 * k)))
    tile = np.empty((tile_rows, k), dtype=np.float32)
    if fmt == "bf16":
        w, bs, kind, table, s, per_row, gs = (
            _u16(data),
            _EMPTY_U8,
            -1,
            _ONE_F32,
            _ONE_F32,
            False,
            1.0,
        )
    elif fmt in _FP8_TABLES:
        s, per_row = _fp8_scale(scale, n_rows)
        kind = _K_E5M2 if fmt == "fp8_e5m2" else _K_E4M3
        w, bs, table, gs = _u8(data), _EMPTY_U8, _FP8_TABLES[fmt], 1.0
    elif fmt in ("mxfp4", "nvfp4"):
        nv = fmt == "nvfp4"
        w, bs = _u8(data), _fp4_scale_codes(scale, n_rows, k, nv)
        kind, table = (_K_NV, FP8_E4M3_TABLE) if nv else (_K_MX, E8M0_TABLE)
        s, per_row = _ONE_F32, False
        gs = global_scale if (nv and global_scale is not None) else 1.0
    else:
        raise ValueError(f"unknown weight format {fmt!r}; expected one of {WEIGHT_KINDS}")
    gs32 = np.float32(gs)
    # NumPy only calls BLAS when the output is contiguous (a column slice of out is not: it
    # falls back to a naive loop ~100x slower), so each tile's product lands in a scratch.
    prod = np.empty((m_rows, tile_rows), dtype=np.float32)
    for n0 in range(0, n_rows, tile_rows):
        n1 = min(n_rows, n0 + tile_rows)
        t = tile[: n1 - n0]
        _dequant_rows(w, bs, kind, table, s, per_row, gs32, n0, t)
        if n1 - n0 == tile_rows:
            np.matmul(x, t.T, out=prod)
            out[:, n0:n1] = prod
        else:
            out[:, n0:n1] = x @ t.T


def gemm_q(x: np.ndarray, q: Any, out: np.ndarray, *, path: str = "auto") -> None:
    """:func:`gemm` for any object with attributes ``fmt``, ``data``, ``scale`` and
    ``global_scale`` (e.g. ``engine.formats.QTensor``)."""
    gemm(
        x,
        q.fmt,
        q.data,
        getattr(q, "scale", None),
        getattr(q, "global_scale", None),
        out,
        path=path,
    )


# ---------------------------------------------------------------------------------------------
# Attention decode (GQA and absorbed MLA) over a quantised KV cache
# ---------------------------------------------------------------------------------------------

_KV_FORMATS = ("bf16", "fp8_e4m3", "fp8_e5m2")
_KV_CHUNK = 32  # positions decoded and scored together
_MIN_SPLIT = 256  # fewest positions worth a separate work item when splitting the sequence


@njit(cache=True, fastmath=_FM)
def _kv_row(cache_flat, start, d, kind, scale, dst):  # pragma: no cover - compiled
    """dst[:d] = decode(cache_flat[start:start + d]) * scale; kind 0 bf16, 1 e4m3, 2 e5m2."""
    n16 = d // 16
    if kind == 0:
        _kvdec_bf16(cache_flat, start, n16, scale, dst)
        for j in range(n16 * 16, d):
            dst[j] = _bf16_bits_to_f32(cache_flat[start + j]) * scale
    else:
        if kind == 1:
            _kvdec_e4m3(cache_flat, start, n16, scale * _E4M3_HALF_FACTOR, dst)
            tab = FP8_E4M3_TABLE
        else:
            _kvdec_e5m2(cache_flat, start, n16, scale, dst)
            tab = FP8_E5M2_TABLE
        for j in range(n16 * 16, d):
            dst[j] = tab[np.int64(cache_flat[start + j])] * scale


@njit(cache=True, fastmath=_FM)
def _splits(items: int, positions: int, threads: int) -> int:
    if items >= threads or positions < 2 * _MIN_SPLIT:
        return 1
    want = (threads + items - 1) // items
    return max(1, min(want, positions // _MIN_SPLIT))


@njit(parallel=True, cache=True, fastmath=_FM)
def _gqa_decode(q, kc, vc, kind, scale, t0, t1, sm_scale, threads, out):  # pragma: no cover
    b_sz, hq, d = q.shape
    hkv, lmax = kc.shape[1], kc.shape[2]
    g = hq // hkv
    n = t1 - t0
    items = b_sz * hkv
    ns = _splits(items, n, threads)
    per = (n + ns - 1) // ns
    kflat = kc.reshape(-1)
    vflat = vc.reshape(-1)
    part_acc = np.empty((items * ns, g, d), dtype=np.float32)
    part_m = np.empty((items * ns, g), dtype=np.float32)
    part_l = np.empty((items * ns, g), dtype=np.float32)
    for it in prange(items * ns):
        item = it // ns
        sp = it % ns
        b = item // hkv
        h = item % hkv
        lo = t0 + sp * per
        hi = min(t1, lo + per)
        kbuf = np.empty((_KV_CHUNK, d), dtype=np.float32)
        vbuf = np.empty(d, dtype=np.float32)
        s = np.empty((g, _KV_CHUNK), dtype=np.float32)
        acc = np.zeros((g, d), dtype=np.float32)
        mx = np.full(g, -np.inf, dtype=np.float32)
        lsum = np.zeros(g, dtype=np.float32)
        base = (b * hkv + h) * lmax
        for c0 in range(lo, hi, _KV_CHUNK):
            c1 = min(hi, c0 + _KV_CHUNK)
            nc = c1 - c0
            for tt in range(nc):
                _kv_row(kflat, (base + c0 + tt) * d, d, kind, scale, kbuf[tt])
            for gg in range(g):
                qrow = q[b, h * g + gg]
                cmax = np.float32(-np.inf)
                for tt in range(nc):
                    dot = np.float32(0.0)
                    krow = kbuf[tt]
                    for j in range(d):
                        dot += qrow[j] * krow[j]
                    dot *= sm_scale
                    s[gg, tt] = dot
                    cmax = max(cmax, dot)
                m_new = max(mx[gg], cmax)
                # exp(-inf - finite) = 0 rescales an empty accumulator harmlessly.
                corr = np.float32(math.exp(mx[gg] - m_new))
                lsum[gg] *= corr
                for j in range(d):
                    acc[gg, j] *= corr
                mx[gg] = m_new
                for tt in range(nc):
                    p = np.float32(math.exp(s[gg, tt] - m_new))
                    s[gg, tt] = p
                    lsum[gg] += p
            for tt in range(nc):
                _kv_row(vflat, (base + c0 + tt) * d, d, kind, scale, vbuf)
                for gg in range(g):
                    p = s[gg, tt]
                    for j in range(d):
                        acc[gg, j] += p * vbuf[j]
        for gg in range(g):
            part_m[it, gg] = mx[gg]
            part_l[it, gg] = lsum[gg]
            for j in range(d):
                part_acc[it, gg, j] = acc[gg, j]
    for item in prange(items):
        b = item // hkv
        h = item % hkv
        for gg in range(g):
            _merge(part_acc, part_m, part_l, item * ns, ns, gg, out[b, h * g + gg])


@njit(cache=True, fastmath=_FM)
def _merge(part_acc, part_m, part_l, first, ns, gg, dst):  # pragma: no cover - compiled
    """dst = softmax-weighted merge of ``ns`` partial (acc, max, sum) triples of head gg."""
    m_all = np.float32(-np.inf)
    for sp in range(ns):
        m_all = max(m_all, part_m[first + sp, gg])
    d = dst.shape[0]
    for j in range(d):
        dst[j] = 0.0
    total = np.float32(0.0)
    for sp in range(ns):
        mi = part_m[first + sp, gg]
        if mi == -np.inf:
            continue  # an empty split
        w = np.float32(math.exp(mi - m_all))
        total += part_l[first + sp, gg] * w
        for j in range(d):
            dst[j] += part_acc[first + sp, gg, j] * w
    inv = np.float32(1.0) / total
    for j in range(d):
        dst[j] *= inv


def _kv_kind(kv_fmt: str, cache: np.ndarray) -> int:
    if kv_fmt not in _KV_FORMATS:
        raise ValueError(f"unknown KV format {kv_fmt!r}; expected one of {_KV_FORMATS}")
    want = np.uint16 if kv_fmt == "bf16" else np.uint8
    if cache.dtype != want:
        raise ValueError(f"{kv_fmt} KV cache must hold {np.dtype(want).name} codes")
    return _KV_FORMATS.index(kv_fmt)


def _span(length: int, lmax: int, window: int | None) -> tuple[int, int]:
    if not 0 < length <= lmax:
        raise ValueError(f"length {length} outside 1..{lmax}")
    t0 = 0 if window is None else max(0, length - int(window))
    if window is not None and window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    return t0, length


def attention_decode(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    kv_scale: float,
    kv_fmt: str,
    length: int,
    window: int | None,
    sm_scale: float,
    out: np.ndarray,
) -> None:
    """GQA decode attention for one new token per sequence.

    Args:
        q: float32 ``(B, Hq, D)`` queries (RoPE applied).
        k_cache, v_cache: ``(B, Hkv, Lmax, D)`` codes: uint16 bf16 bit patterns or uint8 FP8
            (``value = decode(code) * kv_scale``); ``Hq`` is a multiple of ``Hkv`` and query
            head ``h`` reads KV head ``h // (Hq // Hkv)``.
        kv_scale: the per-tensor KV scale (unitless).
        kv_fmt: ``"bf16"``, ``"fp8_e4m3"`` or ``"fp8_e5m2"``.
        length: positions ``< length`` hold keys/values; attends ``[max(0, length - window),
            length)`` (``window`` None: all).
        sm_scale: multiplier of q.k before the softmax (usually ``D ** -0.5``).
        out: float32 ``(B, Hq, D)``, written entirely.

    Each KV element is read once per (sequence, KV head) for all of its query heads; the
    softmax is online (running max and sum) in float32. Work items are (sequence, KV head) and,
    when there are fewer than threads, contiguous splits of the sequence merged at the end.
    """
    b_sz, hq, d = q.shape
    if k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError("k_cache and v_cache must both be (B, Hkv, Lmax, D)")
    hkv = k_cache.shape[1]
    if k_cache.shape[0] != b_sz or k_cache.shape[3] != d or hq % hkv:
        raise ValueError(f"q {q.shape} does not fit a KV cache of shape {k_cache.shape}")
    if out.shape != q.shape:
        raise ValueError(f"out has shape {out.shape}, expected {q.shape}")
    kind = _kv_kind(kv_fmt, k_cache)
    t0, t1 = _span(length, k_cache.shape[2], window)
    dst = out if (out.flags.c_contiguous and out.dtype == np.float32) else np.empty_like(q)
    _gqa_decode(
        np.ascontiguousarray(q, dtype=np.float32),
        np.ascontiguousarray(k_cache),
        np.ascontiguousarray(v_cache),
        kind,
        np.float32(kv_scale),
        t0,
        t1,
        np.float32(sm_scale),
        numba.get_num_threads(),
        dst,
    )
    if dst is not out:
        out[...] = dst


@njit(parallel=True, cache=True, fastmath=_FM)
def _mla_decode(ql, qr, ckv, kr, kind, scale, t1, sm_scale, threads, out):  # pragma: no cover
    b_sz, nh, r = ql.shape
    p_dim = qr.shape[2]
    lmax = ckv.shape[1]
    ns = _splits(b_sz, t1, threads)
    per = (t1 + ns - 1) // ns
    cflat = ckv.reshape(-1)
    rflat = kr.reshape(-1)
    part_acc = np.empty((b_sz * ns, nh, r), dtype=np.float32)
    part_m = np.empty((b_sz * ns, nh), dtype=np.float32)
    part_l = np.empty((b_sz * ns, nh), dtype=np.float32)
    chunk = 16  # latent rows of 512 float32: 32 KiB decoded, stays in L1 while all heads use it
    for it in prange(b_sz * ns):
        b = it // ns
        sp = it % ns
        lo = sp * per
        hi = min(t1, lo + per)
        cbuf = np.empty((chunk, r), dtype=np.float32)
        rbuf = np.empty((chunk, p_dim), dtype=np.float32)
        s = np.empty((nh, chunk), dtype=np.float32)
        acc = np.zeros((nh, r), dtype=np.float32)
        mx = np.full(nh, -np.inf, dtype=np.float32)
        lsum = np.zeros(nh, dtype=np.float32)
        for c0 in range(lo, hi, chunk):
            nc = min(hi, c0 + chunk) - c0
            for tt in range(nc):
                _kv_row(cflat, (b * lmax + c0 + tt) * r, r, kind, scale, cbuf[tt])
                _kv_row(rflat, (b * lmax + c0 + tt) * p_dim, p_dim, kind, scale, rbuf[tt])
            for h in range(nh):
                qlh = ql[b, h]
                qrh = qr[b, h]
                cmax = np.float32(-np.inf)
                for tt in range(nc):
                    dot = np.float32(0.0)
                    crow = cbuf[tt]
                    for j in range(r):
                        dot += qlh[j] * crow[j]
                    dr = np.float32(0.0)
                    rrow = rbuf[tt]
                    for j in range(p_dim):
                        dr += qrh[j] * rrow[j]
                    sc = (dot + dr) * sm_scale
                    s[h, tt] = sc
                    cmax = max(cmax, sc)
                m_new = max(mx[h], cmax)
                corr = np.float32(math.exp(mx[h] - m_new))
                lsum[h] *= corr
                mx[h] = m_new
                arow = acc[h]
                for j in range(r):
                    arow[j] *= corr
                for tt in range(nc):
                    pr = np.float32(math.exp(s[h, tt] - m_new))
                    lsum[h] += pr
                    crow = cbuf[tt]
                    for j in range(r):
                        arow[j] += pr * crow[j]
        for h in range(nh):
            part_m[it, h] = mx[h]
            part_l[it, h] = lsum[h]
            for j in range(r):
                part_acc[it, h, j] = acc[h, j]
    for bh in prange(b_sz * nh):
        b = bh // nh
        h = bh % nh
        _merge(part_acc, part_m, part_l, b * ns, ns, h, out[b, h])


def mla_attention_decode(
    q_latent: np.ndarray,
    q_rope: np.ndarray,
    ckv_cache: np.ndarray,
    krope_cache: np.ndarray,
    kv_scale: float,
    kv_fmt: str,
    length: int,
    sm_scale: float,
    out_latent: np.ndarray,
) -> None:
    """DeepSeek-style absorbed MLA decode attention.

    Args:
        q_latent: float32 ``(B, H, R)``, the no-RoPE query absorbed into the latent space.
        q_rope: float32 ``(B, H, P)``, the RoPE part of the query.
        ckv_cache: ``(B, Lmax, R)`` latent KV codes; krope_cache: ``(B, Lmax, P)`` RoPE key
            codes; both uint16 bf16 or uint8 FP8 (``value = decode(code) * kv_scale``).
        length: attends positions ``[0, length)``.
        sm_scale: multiplier of the score (usually ``(nope + rope) ** -0.5``).
        out_latent: float32 ``(B, H, R)``: softmax-weighted sum of latent rows, per head.

    ``score_h(t) = (q_latent[h] . ckv[t] + q_rope[h] . krope[t]) * sm_scale``. All heads share a
    cache row, so each row is decoded once per sequence (per split) and used by every head.
    """
    b_sz, nh, r = q_latent.shape
    if ckv_cache.ndim != 3 or ckv_cache.shape[0] != b_sz or ckv_cache.shape[2] != r:
        raise ValueError(f"ckv_cache {ckv_cache.shape} does not fit q_latent {q_latent.shape}")
    if krope_cache.shape[:2] != ckv_cache.shape[:2] or q_rope.shape[:2] != (b_sz, nh):
        raise ValueError("krope_cache / q_rope shapes do not match")
    if krope_cache.shape[2] != q_rope.shape[2]:
        raise ValueError("q_rope and krope_cache disagree on the RoPE dimension")
    if out_latent.shape != q_latent.shape:
        raise ValueError(f"out_latent has shape {out_latent.shape}, expected {q_latent.shape}")
    kind = _kv_kind(kv_fmt, ckv_cache)
    _kv_kind(kv_fmt, krope_cache)
    _, t1 = _span(length, ckv_cache.shape[1], None)
    ok = out_latent.flags.c_contiguous and out_latent.dtype == np.float32
    dst = out_latent if ok else np.empty(q_latent.shape, dtype=np.float32)
    _mla_decode(
        np.ascontiguousarray(q_latent, dtype=np.float32),
        np.ascontiguousarray(q_rope, dtype=np.float32),
        np.ascontiguousarray(ckv_cache),
        np.ascontiguousarray(krope_cache),
        kind,
        np.float32(kv_scale),
        t1,
        np.float32(sm_scale),
        numba.get_num_threads(),
        dst,
    )
    if dst is not out_latent:
        out_latent[...] = dst


# ---------------------------------------------------------------------------------------------
# Norms, activation, RoPE
# ---------------------------------------------------------------------------------------------


@njit(parallel=True, cache=True, fastmath=_FM)
def _rmsnorm(x, weight, eps, out):  # pragma: no cover - compiled
    m_rows, k = x.shape
    for m in prange(m_rows):
        ss = np.float32(0.0)
        for j in range(k):
            ss += x[m, j] * x[m, j]
        inv = np.float32(1.0) / np.float32(math.sqrt(ss / np.float32(k) + eps))
        # out may alias x: every read of x[m] above happens before the first write.
        for j in range(k):
            out[m, j] = x[m, j] * inv * weight[j]


@njit(parallel=True, cache=True, fastmath=_FM)
def _add_rmsnorm(x, residual, weight, eps, out):  # pragma: no cover - compiled
    m_rows, k = x.shape
    for m in prange(m_rows):
        ss = np.float32(0.0)
        for j in range(k):
            v = residual[m, j] + x[m, j]
            residual[m, j] = v
            ss += v * v
        inv = np.float32(1.0) / np.float32(math.sqrt(ss / np.float32(k) + eps))
        for j in range(k):
            out[m, j] = residual[m, j] * inv * weight[j]


def _check_2d(name: str, a: np.ndarray, shape: tuple[int, ...] | None = None) -> None:
    if a.dtype != np.float32 or a.ndim != 2:
        raise ValueError(f"{name} must be a float32 2-D array, got {a.dtype} {a.shape}")
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape}, expected {shape}")


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray) -> None:
    """``out = x / sqrt(mean(x**2, axis=-1) + eps) * weight`` per row; float32 ``(M, K)``;
    ``out`` may be ``x`` itself. Sums of squares accumulate in float32."""
    _check_2d("x", x)
    _check_2d("out", out, x.shape)
    _rmsnorm(x, np.ascontiguousarray(weight, dtype=np.float32), np.float32(eps), out)


def add_rmsnorm(
    x: np.ndarray, residual: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray
) -> None:
    """``residual += x`` in place, then ``out = rmsnorm(residual)``; float32 ``(M, K)``."""
    _check_2d("x", x)
    _check_2d("residual", residual, x.shape)
    _check_2d("out", out, x.shape)
    _add_rmsnorm(x, residual, np.ascontiguousarray(weight, dtype=np.float32), np.float32(eps), out)


@njit(parallel=True, cache=True, fastmath=_FM)
def _swiglu(gate_up, out):  # pragma: no cover - compiled
    m_rows, f = out.shape
    for m in prange(m_rows):
        for j in range(f):
            g = gate_up[m, j]
            # silu(g) = g / (1 + exp(-g)); exp overflows to inf for g << 0, giving -0.
            out[m, j] = g / (np.float32(1.0) + np.float32(math.exp(-g))) * gate_up[m, f + j]


def swiglu(gate_up: np.ndarray, out: np.ndarray) -> None:
    """``out = silu(gate) * up`` with ``gate = gate_up[:, :F]``, ``up = gate_up[:, F:]``;
    float32, ``gate_up (M, 2F)``, ``out (M, F)``."""
    _check_2d("gate_up", gate_up)
    _check_2d("out", out)
    if gate_up.shape != (out.shape[0], 2 * out.shape[1]):
        raise ValueError(f"gate_up {gate_up.shape} and out {out.shape} do not match")
    _swiglu(gate_up, out)


@njit(cache=True, fastmath=_FM)
def _rope(x, position, theta):  # pragma: no cover - compiled
    m_rows, nh, d = x.shape
    half = d // 2
    cos = np.empty(half, dtype=np.float32)
    sin = np.empty(half, dtype=np.float32)
    for i in range(half):
        # Angles in float64: position * inv_freq reaches 1e5 rad and more at long context.
        ang = float(position) * theta ** (-2.0 * i / d)
        cos[i] = math.cos(ang)
        sin[i] = math.sin(ang)
    for m in range(m_rows):
        for h in range(nh):
            row = x[m, h]
            for i in range(half):
                a = row[i]
                b = row[i + half]
                row[i] = a * cos[i] - b * sin[i]
                row[i + half] = b * cos[i] + a * sin[i]


def rope(x: np.ndarray, position: int, theta: float) -> None:
    """Rotary embedding in place on float32 ``(M, H, D)`` at one ``position`` (tokens),
    rotate-half convention: pairs ``(i, i + D/2)`` turn by ``position * theta ** (-2i/D)`` rad."""
    if x.dtype != np.float32 or x.ndim != 3 or x.shape[2] % 2:
        raise ValueError(f"rope wants float32 (M, H, D) with even D, got {x.dtype} {x.shape}")
    _rope(x, int(position), float(theta))


# ---------------------------------------------------------------------------------------------
# Copy bandwidth
# ---------------------------------------------------------------------------------------------


@njit(parallel=True, cache=True)
def _parallel_copy(src, dst, chunks):  # pragma: no cover - compiled
    n = src.size
    per = (n + chunks - 1) // chunks
    for c in prange(chunks):
        lo = c * per
        hi = min(n, lo + per)
        for i in range(lo, hi):
            dst[i] = src[i]


def copy_bandwidth_gbps(nbytes: int = 1 << 30, repeats: int = 5) -> dict[str, Any]:
    """This host's memory copy bandwidth in GB/s (1e9 bytes/s), counting bytes read + written
    (``2 * nbytes`` per copy), best of ``repeats`` after an untimed first copy that also
    faults every page in.

    Returns ``numpy_gbps`` (``np.copyto``, one thread), ``numba_gbps`` (a ``prange`` copy on all
    Numba threads), ``max_gbps`` (the larger), ``nbytes``, ``repeats``, ``threads`` and
    ``method``. Buffers should be far larger than the last-level cache (the default 1 GiB each).
    """
    nbytes = max(8, int(nbytes) // 8 * 8)
    repeats = max(1, int(repeats))
    src = np.empty(nbytes // 8, dtype=np.uint64)
    dst = np.empty_like(src)
    src.fill(0x0123456789ABCDEF)  # first touch outside the timed copies
    dst.fill(0)
    threads = numba.get_num_threads()
    chunks = 16 * threads

    def best(fn) -> float:
        fn()
        t_best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            t_best = min(t_best, time.perf_counter() - t0)
        return 2.0 * nbytes / t_best / 1e9

    numpy_gbps = best(lambda: np.copyto(dst, src))
    numba_gbps = best(lambda: _parallel_copy(src, dst, chunks))
    if not np.array_equal(src[:: max(1, src.size // 4096)], dst[:: max(1, src.size // 4096)]):
        raise RuntimeError("copy bandwidth probe: destination does not match the source")
    return {
        "numpy_gbps": numpy_gbps,
        "numba_gbps": numba_gbps,
        "max_gbps": max(numpy_gbps, numba_gbps),
        "nbytes": nbytes,
        "repeats": repeats,
        "threads": threads,
        "method": (
            f"best of {repeats} copies of {nbytes} B after a warm-up copy; GB/s counts bytes "
            "read + written; np.copyto (1 thread) and a Numba prange copy "
            f"({threads} threads)"
        ),
    }
