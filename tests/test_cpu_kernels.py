"""The compiled CPU kernels against float64 NumPy references written independently here.

Every output buffer is poisoned with NaN first, so an element a kernel forgets to write fails.
Inputs are fresh random draws (a new seed per test case), never all zeros. Tolerances fit float32
accumulation: errors are compared with the sum of absolute terms (the natural scale of a
float32 dot product's rounding error), at ~1e-5 of it.
"""

from __future__ import annotations

import itertools
import math

import ml_dtypes
import numpy as np
import pytest

from engine.backends import cpu_kernels as K

FORMATS = ("bf16", "fp8_e4m3", "fp8_e5m2", "mxfp4", "nvfp4")
FP8_DTYPES = {"fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2}
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float64)

_seed = itertools.count(20240601)


def rng() -> np.random.Generator:
    """A fresh generator per call: every case draws new inputs."""
    return np.random.default_rng(next(_seed))


# ------------------------------------------------------------------ float64 reference decoders


def ref_bf16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def ref_fp8(codes: np.ndarray, fmt: str) -> np.ndarray:
    return codes.view(FP8_DTYPES[fmt]).astype(np.float64)


def ref_e2m1(nibbles: np.ndarray) -> np.ndarray:
    mag = E2M1[nibbles & 7]
    return np.where(nibbles & 8, -mag, mag)


def ref_dequant(fmt: str, data, scale, global_scale) -> np.ndarray:
    """Float64 dequantisation of a packed (N, K) weight, from the layout definition."""
    if fmt == "bf16":
        return ref_bf16(data)
    if fmt in FP8_DTYPES:
        s = np.asarray(scale, dtype=np.float64)
        return ref_fp8(data, fmt) * (s[:, None] if s.ndim == 1 else s)
    n, kb = data.shape
    vals = np.empty((n, 2 * kb))
    vals[:, 0::2] = ref_e2m1(data & 0x0F)
    vals[:, 1::2] = ref_e2m1(data >> 4)
    if fmt == "mxfp4":
        block_scale = 2.0 ** (scale.astype(np.float64) - 127.0)
        return vals * np.repeat(block_scale, 32, axis=1)
    block_scale = scale.view(ml_dtypes.float8_e4m3fn).astype(np.float64) * float(global_scale)
    return vals * np.repeat(block_scale, 16, axis=1)


def random_weight(g: np.random.Generator, fmt: str, n: int, k: int, per_row: bool = True):
    """(data, scale, global_scale) with realistic values: quantised normals, modest scales."""
    w = g.standard_normal((n, k)).astype(np.float32)
    if fmt == "bf16":
        return (w.view(np.uint32) >> 16).astype(np.uint16), None, None
    if fmt in FP8_DTYPES:
        codes = (w * 8).astype(FP8_DTYPES[fmt]).view(np.uint8)
        shape = (n,) if per_row else ()
        return codes, g.uniform(0.01, 0.1, size=shape).astype(np.float32), None
    data = g.integers(0, 256, size=(n, k // 2), dtype=np.uint8)
    if fmt == "mxfp4":
        return data, g.integers(118, 132, size=(n, k // 32), dtype=np.uint8), None
    # Positive E4M3 scale codes spanning subnormal (< 0x08) to large.
    codes = g.integers(0x01, 0x70, size=(n, k // 16), dtype=np.uint8)
    return data, codes, float(np.float32(g.uniform(0.01, 2.0)))


def poisoned(shape) -> np.ndarray:
    return np.full(shape, np.nan, dtype=np.float32)


def assert_dot_close(out, x, w, tol=1e-5) -> None:
    """``out`` matches ``x @ w.T`` (float64) to ``tol`` of the sum of absolute terms."""
    ref = x.astype(np.float64) @ w.T
    scale = np.abs(x.astype(np.float64)) @ np.abs(w).T
    assert np.all(np.isfinite(out)), "NaN/inf in output (an element left unwritten?)"
    bad = np.abs(out - ref) > tol * scale + 1e-30
    assert not bad.any(), f"max err {np.abs(out - ref).max()} vs scale {scale.max()}"


# ------------------------------------------------------------------------------------- gemm

K_SIZES = (96, 480, 4160)  # multiples of 32: a tail-only size, a non-power-of-two, a chunked one


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 3, 64])
@pytest.mark.parametrize("k", K_SIZES)
@pytest.mark.parametrize("path", ["auto", "stream", "blas"])
def test_gemm_matches_reference(fmt, m, k, path):
    g = rng()
    n = 37  # not a multiple of the kernel's row block
    data, scale, gs = random_weight(g, fmt, n, k, per_row=(k != 480))
    x = g.standard_normal((m, k)).astype(np.float32)
    out = poisoned((m, n))
    K.gemm(x, fmt, data, scale, gs, out, path=path)
    assert_dot_close(out, x, ref_dequant(fmt, data, scale, gs))


def test_gemm_q_and_strided_out():
    class Q:  # any object with the four attributes
        fmt, data, scale, global_scale = "nvfp4", None, None, None

    g = rng()
    q = Q()
    q.data, q.scale, q.global_scale = random_weight(g, "nvfp4", 24, 160)
    x = g.standard_normal((5, 160)).astype(np.float32)
    big = poisoned((5, 60))
    out = big[:, 10:34]  # not C-contiguous
    K.gemm_q(x, q, out)
    assert_dot_close(out, x, ref_dequant("nvfp4", q.data, q.scale, q.global_scale))
    assert np.isnan(big[:, :10]).all() and np.isnan(big[:, 34:]).all()


def _exhaustive_weight(fmt: str):
    """A weight holding every finite code of ``fmt`` (and every FP4 scale code in use)."""
    if fmt == "bf16":
        bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
        finite = ((bits >> 7) & 0xFF) != 0xFF
        codes = bits[finite]
        codes = np.concatenate([codes, codes[: (-codes.size) % 64]])
        return codes.reshape(-1, 64), None, None
    if fmt in FP8_DTYPES:
        codes = np.arange(256, dtype=np.uint8)
        codes = codes[np.isfinite(ref_fp8(codes, fmt))]
        codes = np.concatenate([codes, codes[: (-codes.size) % 64]])
        return codes.reshape(-1, 64), np.float32(1.0), None
    # FP4: 8 rows x 128 bytes hold every byte 4 times; one scale code per block, varied.
    data = np.tile(np.arange(256, dtype=np.uint8), 4).reshape(8, 128)
    nb = 256 // (32 if fmt == "mxfp4" else 16)
    if fmt == "mxfp4":
        scale = (np.arange(8 * nb) % 40 + 100).astype(np.uint8).reshape(8, nb)
        return data, scale, None
    scale = (np.arange(8 * nb) % 0x7E + 1).astype(np.uint8).reshape(8, nb)  # 0x01..0x7E
    return data, scale, 1.0


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("path", ["stream", "blas"])
def test_gemm_decodes_every_code_exactly(fmt, path):
    """x = identity picks single weights: out must equal the decoded weights bit for bit."""
    data, scale, gs = _exhaustive_weight(fmt)
    w = ref_dequant(fmt, data, scale, gs)
    k = w.shape[1]
    x = np.eye(k, dtype=np.float32)
    out = poisoned((k, w.shape[0]))
    K.gemm(x, fmt, data, scale, gs, out, path=path)
    np.testing.assert_array_equal(out, w.T.astype(np.float32))


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "mxfp4", "nvfp4"])
def test_gemm_nan_codes_propagate(fmt):
    g = rng()
    n, k = 4, 128
    data, scale, gs = random_weight(g, fmt, n, k)
    if fmt in FP8_DTYPES:
        data[1, 70] = 0x7F if fmt == "fp8_e4m3" else 0x7E
    else:
        scale[1, 2] = 0xFF if fmt == "mxfp4" else 0x7F
    x = g.standard_normal((1, k)).astype(np.float32)
    out = poisoned((1, n))
    K.gemm(x, fmt, data, scale, gs, out, path="stream")
    assert np.isnan(out[0, 1]) and np.isfinite(out[0, [0, 2, 3]]).all()


def test_gemm_rejects_bad_shapes():
    data, scale, gs = random_weight(rng(), "mxfp4", 8, 64)
    with pytest.raises(ValueError):
        K.gemm(np.ones((2, 32), np.float32), "mxfp4", data, scale, gs, poisoned((2, 8)))
    with pytest.raises(ValueError):
        K.gemm(np.ones((2, 64), np.float32), "mxfp4", data, scale, gs, poisoned((2, 9)))
    with pytest.raises(ValueError):
        K.gemm(np.ones((2, 64), np.float32), "int4", data, scale, gs, poisoned((2, 8)))
    with pytest.raises(ValueError):  # mxfp4 needs whole 32-element blocks
        K.gemm(
            np.ones((2, 48), np.float32), "mxfp4", data[:, :24], scale[:, :1], gs, poisoned((2, 8))
        )


# -------------------------------------------------------------------------------- attention


def encode_kv(g: np.random.Generator, shape, fmt: str):
    """Random KV codes and their float64 values (``decode(code) * kv_scale``)."""
    vals = g.standard_normal(shape).astype(np.float32)
    if fmt == "bf16":
        codes = (vals.view(np.uint32) >> 16).astype(np.uint16)
        return codes, 1.0, ref_bf16(codes)
    kv_scale = float(np.float32(g.uniform(0.05, 0.5)))
    codes = (vals / kv_scale).astype(FP8_DTYPES[fmt]).view(np.uint8)
    return codes, kv_scale, ref_fp8(codes, fmt) * kv_scale


def ref_softmax_attend(scores: np.ndarray, values: np.ndarray) -> np.ndarray:
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (p / p.sum(axis=-1, keepdims=True)) @ values


ATTN_CASES = [
    # (B, Hq, Hkv, D, Lmax, length): group sizes 1 and 4; D=72 has a non-vector tail;
    # the last case has 1 (sequence, KV head) pair for 2 threads, so the sequence is split.
    (2, 4, 4, 64, 80, 70),
    (2, 8, 2, 72, 48, 33),
    (1, 4, 1, 64, 800, 700),
]


@pytest.mark.parametrize("case", ATTN_CASES)
@pytest.mark.parametrize("kv_fmt", ["bf16", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("window", [None, 17])
def test_attention_decode(case, kv_fmt, window):
    b, hq, hkv, d, lmax, length = case
    g = rng()
    q = g.standard_normal((b, hq, d)).astype(np.float32)
    kc, kv_scale, kf = encode_kv(g, (b, hkv, lmax, d), kv_fmt)
    vc, _, vf = encode_kv(g, (b, hkv, lmax, d), kv_fmt)
    if kv_fmt != "bf16":  # one scale for K and V, as the cache stores it
        vf = ref_fp8(vc, kv_fmt) * kv_scale
    sm = d**-0.5
    out = poisoned((b, hq, d))
    K.attention_decode(q, kc, vc, kv_scale, kv_fmt, length, window, sm, out)
    t0 = 0 if window is None else max(0, length - window)
    grp = hq // hkv
    ref = np.empty((b, hq, d))
    for bi, h in itertools.product(range(b), range(hq)):
        keys = kf[bi, h // grp, t0:length]
        scores = keys @ q[bi, h].astype(np.float64) * sm
        ref[bi, h] = ref_softmax_attend(scores, vf[bi, h // grp, t0:length])
    scale = np.abs(vf).max()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=2e-5 * scale)


MLA_CASES = [(2, 4, 64, 16, 50, 45), (1, 3, 72, 8, 640, 600)]  # the second splits the sequence


@pytest.mark.parametrize("case", MLA_CASES)
@pytest.mark.parametrize("kv_fmt", ["bf16", "fp8_e4m3"])
def test_mla_attention_decode(case, kv_fmt):
    b, nh, r, p, lmax, length = case
    g = rng()
    ql = g.standard_normal((b, nh, r)).astype(np.float32)
    qr = g.standard_normal((b, nh, p)).astype(np.float32)
    ckv, kv_scale, cf = encode_kv(g, (b, lmax, r), kv_fmt)
    if kv_fmt == "bf16":
        kr, _, rf = encode_kv(g, (b, lmax, p), kv_fmt)
    else:  # same scale for both caches
        vals = g.standard_normal((b, lmax, p)).astype(np.float32)
        kr = (vals / kv_scale).astype(FP8_DTYPES[kv_fmt]).view(np.uint8)
        rf = ref_fp8(kr, kv_fmt) * kv_scale
    sm = (r // 4 + p) ** -0.5
    out = poisoned((b, nh, r))
    K.mla_attention_decode(ql, qr, ckv, kr, kv_scale, kv_fmt, length, sm, out)
    ref = np.empty((b, nh, r))
    for bi, h in itertools.product(range(b), range(nh)):
        scores = (
            cf[bi, :length] @ ql[bi, h].astype(np.float64)
            + rf[bi, :length] @ qr[bi, h].astype(np.float64)
        ) * sm
        ref[bi, h] = ref_softmax_attend(scores, cf[bi, :length])
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=2e-5 * np.abs(cf).max())


def test_attention_rejects_bad_inputs():
    q = np.ones((1, 4, 16), np.float32)
    kc = np.ones((1, 3, 8, 16), np.uint16)  # 4 query heads on 3 KV heads
    with pytest.raises(ValueError):
        K.attention_decode(q, kc, kc, 1.0, "bf16", 4, None, 0.25, poisoned(q.shape))
    kc = np.ones((1, 2, 8, 16), np.uint16)
    with pytest.raises(ValueError):  # length past the cache
        K.attention_decode(q, kc, kc, 1.0, "bf16", 9, None, 0.25, poisoned(q.shape))
    with pytest.raises(ValueError):  # codes of the wrong width
        K.attention_decode(q, kc, kc, 1.0, "fp8_e4m3", 4, None, 0.25, poisoned(q.shape))


# ------------------------------------------------------------------- norms, activation, RoPE


@pytest.mark.parametrize("in_place", [False, True])
def test_rmsnorm(in_place):
    g = rng()
    x = g.standard_normal((3, 96)).astype(np.float32) * 3
    w = g.standard_normal(96).astype(np.float32)
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64**2).mean(axis=1, keepdims=True) + 1e-6) * w
    out = x if in_place else poisoned(x.shape)
    K.rmsnorm(x, w, 1e-6, out)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


def test_add_rmsnorm():
    g = rng()
    x = g.standard_normal((3, 160)).astype(np.float32)
    res = g.standard_normal((3, 160)).astype(np.float32)
    w = g.standard_normal(160).astype(np.float32)
    r64 = res.astype(np.float64) + x
    ref = r64 / np.sqrt((r64**2).mean(axis=1, keepdims=True) + 1e-5) * w
    out = poisoned(x.shape)
    K.add_rmsnorm(x, res, w, 1e-5, out)
    np.testing.assert_allclose(res, r64, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


def test_swiglu():
    g = rng()
    gu = (g.standard_normal((3, 160)) * 4).astype(np.float32)
    gu[0, :3] = [-100.0, 100.0, -1e4]  # exp overflow / saturation paths
    gate, up = gu[:, :80].astype(np.float64), gu[:, 80:].astype(np.float64)
    with np.errstate(over="ignore"):
        ref = gate / (1.0 + np.exp(-gate)) * up
    out = poisoned((3, 80))
    K.swiglu(gu, out)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("position,theta", [(0, 1e4), (12345, 1e4), (131000, 5e5)])
def test_rope(position, theta):
    g = rng()
    x = g.standard_normal((2, 3, 64)).astype(np.float32)
    x64 = x.astype(np.float64)
    half = 32
    ang = position * theta ** (-2.0 * np.arange(half) / 64)
    c, s = np.cos(ang), np.sin(ang)
    ref = np.concatenate(
        [x64[..., :half] * c - x64[..., half:] * s, x64[..., half:] * c + x64[..., :half] * s],
        axis=-1,
    )
    K.rope(x, position, theta)
    np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


def test_copy_bandwidth_small():
    res = K.copy_bandwidth_gbps(nbytes=8 << 20, repeats=2)
    assert res["numpy_gbps"] > 0 and res["numba_gbps"] > 0
    assert res["max_gbps"] == max(res["numpy_gbps"], res["numba_gbps"])
    assert res["nbytes"] == 8 << 20 and math.isfinite(res["max_gbps"])
