"""Tests for engine.formats: layout, round trips, error bounds, bit-exactness with ml_dtypes,
hand-worked values, random packed weights, errors and zero blocks."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import formats as F
from engine.formats import FormatError, QTensor

FP8 = ("fp8_e4m3", "fp8_e5m2")
FP4 = ("mxfp4", "nvfp4")
HYP = settings(max_examples=100, deadline=None)


def _random_matrix(seed: int, n: int, k: int, dtype: type = np.float32) -> np.ndarray:
    """Fresh random normal (N, K) data with a random overall magnitude and per-row spread."""
    rng = np.random.default_rng(seed)
    mag = 10.0 ** rng.uniform(-4, 4)
    rows = 10.0 ** rng.uniform(-1, 1, size=(n, 1))
    return (rng.standard_normal((n, k)) * rows * mag).astype(dtype)


def _scales_equal(a: QTensor, b: QTensor) -> None:
    if a.scale is None:
        assert b.scale is None
    elif a.scale.dtype == np.uint8:
        np.testing.assert_array_equal(a.scale, b.scale)
    else:  # float32 fp8 scale: may move by an ulp through amax / max in float32
        np.testing.assert_allclose(a.scale, b.scale, rtol=2e-7, atol=0)
    if a.global_scale is None:
        assert b.global_scale is None
    else:
        assert b.global_scale == pytest.approx(a.global_scale, rel=2e-7)


# --------------------------------------------------------------------------------------------
# Layout and sizes
# --------------------------------------------------------------------------------------------


def test_format_tuples() -> None:
    assert F.WEIGHT_FORMATS == ("bf16", "fp8_e4m3", "fp8_e5m2", "mxfp4", "nvfp4")
    assert F.KV_FORMATS == ("bf16", "fp8_e4m3", "fp8_e5m2")
    assert F.ACTIVATION_FORMATS == ("bf16", "fp8_e4m3", "fp8_e5m2", "mxfp4", "nvfp4")


def test_bits_and_storage_bytes() -> None:
    assert [F.bits_per_element(f) for f in F.WEIGHT_FORMATS] == [16, 8, 8, 4.25, 4.5]
    n, k = 96, 256
    assert F.storage_bytes("bf16", n, k) == 2 * n * k
    assert F.storage_bytes("fp8_e4m3", n, k) == n * k + 4
    assert F.storage_bytes("fp8_e5m2", n, k, scaling="channel") == n * k + 4 * n
    assert F.storage_bytes("mxfp4", n, k) == n * k // 2 + n * k // 32
    assert F.storage_bytes("nvfp4", n, k) == n * k // 2 + n * k // 16 + 4


@pytest.mark.parametrize(
    ("fmt", "scaling"),
    [(f, "tensor") for f in F.WEIGHT_FORMATS] + [(f, "channel") for f in FP8],
)
def test_layout_dtypes_shapes_and_nbytes(fmt: str, scaling: str) -> None:
    n, k = 5, 64
    q = F.quantize(_random_matrix(1, n, k), fmt, scaling=scaling)
    assert q.shape == (n, k)
    assert q.nbytes == F.storage_bytes(fmt, n, k, scaling=scaling)
    if fmt == "bf16":
        assert (q.data.dtype, q.data.shape) == (np.uint16, (n, k))
        assert q.scale is None and q.global_scale is None
    elif fmt in FP8:
        assert (q.data.dtype, q.data.shape) == (np.uint8, (n, k))
        assert q.scale.dtype == np.float32
        assert q.scale.shape == ((n,) if scaling == "channel" else ())
        assert q.scaling == scaling
    else:
        block = F.BLOCK_SIZE[fmt]
        assert (q.data.dtype, q.data.shape) == (np.uint8, (n, k // 2))
        assert (q.scale.dtype, q.scale.shape) == (np.uint8, (n, k // block))
        assert (q.global_scale is not None) == (fmt == "nvfp4")
    out = F.dequantize(q)
    assert out.dtype == np.float32 and out.shape == (n, k)
    assert F.dequantize(q, np.float64).dtype == np.float64


# --------------------------------------------------------------------------------------------
# Round trips and error bounds (hypothesis-driven shapes and seeds)
# --------------------------------------------------------------------------------------------


@HYP
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 6),
    blocks=st.integers(1, 6),
    fmt=st.sampled_from(F.WEIGHT_FORMATS),
    channel=st.booleans(),
    f64=st.booleans(),
)
def test_requantize_reproduces_codes(
    seed: int, n: int, blocks: int, fmt: str, channel: bool, f64: bool
) -> None:
    scaling = "channel" if channel and fmt in FP8 else "tensor"
    x = _random_matrix(seed, n, 32 * blocks, np.float64 if f64 else np.float32)
    q = F.quantize(x, fmt, scaling=scaling)
    q2 = F.quantize(F.dequantize(q), fmt, scaling=scaling)
    np.testing.assert_array_equal(q2.data, q.data)
    _scales_equal(q, q2)
    q3 = F.quantize(F.dequantize(q, np.float64), fmt, scaling=scaling)
    np.testing.assert_array_equal(q3.data, q.data)


def _e2m1_half_step(v: np.ndarray) -> np.ndarray:
    """Largest rounding error of a scaled value v (including clamping beyond 6)."""
    m = np.abs(v)
    half = np.where(m <= 2, 0.25, np.where(m <= 4, 0.5, 1.0))
    return np.where(m > 6, m - 6, half)


@HYP
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 5),
    blocks=st.integers(1, 5),
    fmt=st.sampled_from(F.WEIGHT_FORMATS),
)
def test_dequantize_error_bounds(seed: int, n: int, blocks: int, fmt: str) -> None:
    k = 32 * blocks
    x = _random_matrix(seed, n, k, np.float64)
    q = F.quantize(x, fmt)
    err = np.abs(F.dequantize(q, np.float64) - x)
    slack = 1 + 2.0**-20  # float64 -> float32 input rounding and float32 scaling
    if fmt == "bf16":
        assert (err <= 2.0**-8 * np.abs(x) * slack).all()
    elif fmt in FP8:
        rel = {"fp8_e4m3": 2.0**-4, "fp8_e5m2": 2.0**-3}[fmt]
        half_sub = {"fp8_e4m3": 2.0**-10, "fp8_e5m2": 2.0**-17}[fmt] * float(q.scale)
        assert (err <= (rel * np.abs(x) + half_sub) * slack).all()
        # and relative to the tensor amax
        assert err.max() <= rel * np.abs(x).max() * slack
    else:
        block = F.BLOCK_SIZE[fmt]
        if fmt == "mxfp4":
            s = F.decode_table("e8m0")[q.scale].astype(np.float64)
        else:
            s = F.decode_table("fp8_e4m3")[q.scale].astype(np.float64) * q.global_scale
        s_el = np.repeat(s, block, axis=1)
        v = x / s_el
        assert np.abs(v).max() < (8.0 if fmt == "mxfp4" else 6.5)
        # additive slack: x is rounded to float32 before scaling (matters at the clamp, v ~ 6)
        assert (err <= (_e2m1_half_step(v) + 2.0**-20 * np.abs(v)) * s_el).all()
        amax_b = np.repeat(np.abs(x).reshape(n, k // block, block).max(-1), block, axis=1)
        # mxfp4: amax / 2**e in [4, 8) -> error <= 2**e * max(1, 8 - 6) <= amax / 4;
        # nvfp4: amax / (scale * global) in [6 / (1 + 2**-4), 6 / (1 - 2**-4)] -> <= ~amax / 5.6.
        assert (err <= amax_b * (0.25 if fmt == "mxfp4" else 0.18)).all()


# --------------------------------------------------------------------------------------------
# Hand-worked values
# --------------------------------------------------------------------------------------------


def test_e2m1_table_and_packing_by_hand() -> None:
    t = F.decode_table("e2m1")
    assert t.dtype == np.float32 and t.shape == (16,)
    assert t[0b0111] == 6.0
    assert t[0b1001] == -0.5
    assert list(t[:8]) == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert np.signbit(t[8]) and t[8] == 0
    codes = F.unpack_e2m1(np.array([0x71], dtype=np.uint8))
    assert list(codes) == [1, 7]
    assert list(t[codes]) == [0.5, 6.0]
    assert F.pack_e2m1(np.array([1, 7], dtype=np.uint8))[0] == 0x71


def test_e8m0_table_by_hand() -> None:
    t = F.decode_table("e8m0")
    assert t.shape == (256,) and t.dtype == np.float32
    assert t[127] == 1.0 and t[130] == 8.0 and t[126] == 0.5
    assert t[0] == np.float32(2.0**-127)
    assert np.isnan(t[255])


def test_mxfp4_block_by_hand() -> None:
    # amax 12 -> floor(log2 12) = 3 -> shared exponent 3 - 2 = 1 -> E8M0 code 128, x / 2.
    vals = [12, -12, 1, 0.5, 5, 7, -3, 10, 11, 0.75, -0.25]
    want = [7, 15, 1, 0, 4, 6, 11, 6, 7, 1, 8]
    # 0.5/2 = 0.25 ties to 0; 5/2 = 2.5 ties to 2; 7/2 = 3.5 ties to 4; 10/2 = 5 ties to 4;
    # 0.75/2 = 0.375 -> 0.5; -0.25/2 = -0.125 -> -0 (code 8).
    x = np.full((1, 32), 2.0, dtype=np.float32)  # 2 / 2 = 1.0 -> code 2
    x[0, : len(vals)] = vals
    q = F.quantize(x, "mxfp4")
    assert q.scale.tolist() == [[128]]
    codes = F.unpack_e2m1(q.data)[0]
    assert codes[: len(want)].tolist() == want
    assert (codes[len(want) :] == 2).all()
    assert q.data[0, 0] == 7 | (15 << 4)
    out = F.dequantize(q)[0]
    assert out[: len(want)].tolist() == [12, -12, 1, 0, 4, 8, -3, 8, 12, 1, 0]


def test_nvfp4_blocks_by_hand() -> None:
    # Tensor amax 1344 -> global scale 1344 / (6 * 448) = 0.5.
    # Block 0: amax 1344 -> 1344 / 6 / 0.5 = 448 -> E4M3 0x7E; values x / 224.
    # Block 1: amax 30 -> 30 / 6 / 0.5 = 10 -> E4M3 0x52 (1.25 * 2**3); values x / 5.
    b0 = [1344, -224, 112, 672, 56]
    w0 = [7, 10, 1, 5, 0]  # 6, -1, 0.5, 3, 0.25 -> 0 (tie to even)
    b1 = [30, -10, 2.5, 7.5, 12.5, 17.5, 1.25, -25]
    w1 = [7, 12, 1, 3, 4, 6, 0, 14]  # 6, -2, 0.5, 1.5, 2.5->2, 3.5->4, 0.25->0, -5->-4
    x = np.empty((1, 32), dtype=np.float32)
    x[0, :16] = 448.0  # 448 / 224 = 2 -> code 4
    x[0, 16:] = 5.0  # 5 / 5 = 1 -> code 2
    x[0, : len(b0)] = b0
    x[0, 16 : 16 + len(b1)] = b1
    q = F.quantize(x, "nvfp4")
    assert q.global_scale == 0.5
    assert q.scale.tolist() == [[0x7E, 0x52]]
    codes = F.unpack_e2m1(q.data)[0]
    assert codes[: len(w0)].tolist() == w0 and (codes[len(w0) : 16] == 4).all()
    assert codes[16 : 16 + len(w1)].tolist() == w1 and (codes[16 + len(w1) :] == 2).all()
    out = F.dequantize(q)[0]
    assert out[16 : 16 + len(w1)].tolist() == [30, -10, 2.5, 7.5, 10, 20, 0, -20]


def test_fp8_scale_by_hand() -> None:
    x = np.array([[448.0, -1.0, 0.3], [2.0, 0.0, -896.0]], dtype=np.float32)
    q = F.quantize(x, "fp8_e4m3")
    assert float(q.scale) == 2.0  # amax 896 / 448
    assert q.data[1, 2] == 0xFE  # -448 * 2
    qc = F.quantize(x, "fp8_e4m3", scaling="channel")
    assert qc.scale.tolist() == [1.0, 2.0]
    assert qc.data[0, 0] == 0x7E and qc.data[0, 1] == 0xB8  # 448, -1.0


# --------------------------------------------------------------------------------------------
# Bit-exact agreement with ml_dtypes
# --------------------------------------------------------------------------------------------


def _ties_and_randoms(table: np.ndarray, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Midpoints of consecutive finite table values, the values themselves, randoms and
    out-of-range values, as float32."""
    fin = np.unique(table[np.isfinite(table)].astype(np.float64))
    mids = (fin[1:] + fin[:-1]) / 2
    rand = rng.standard_normal(4000) * scale
    big = np.array([1.5, 3.0, 1e3]) * fin.max()
    return np.concatenate([fin, mids, rand, big, -big]).astype(np.float32)


def test_bf16_bit_exact_with_ml_dtypes() -> None:
    rng = np.random.default_rng(11)
    bits = rng.integers(0, 2**32, size=20000, dtype=np.uint64).astype(np.uint32)
    bits[:5000] = (bits[:5000] & 0xFFFF0000) | 0x8000  # exact ties
    bits[5000:6000] &= 0x7F7FFFFF  # finite, with both signs below
    x = bits.view(np.float32)
    x = x[np.isfinite(x)].reshape(1, -1)
    q = F.quantize(x, "bf16")
    np.testing.assert_array_equal(q.data, x.astype(ml_dtypes.bfloat16).view(np.uint16))
    x64 = np.array([[1e39, -1e39, 1.0 + 2.0**-8, 3.0 * 2**-9]], dtype=np.float64)
    q64 = F.quantize(x64, "bf16")
    with np.errstate(over="ignore"):
        ref = x64.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(q64.data, ref)
    assert np.isinf(F.dequantize(q64)[0, :2]).all()  # bf16 overflows to inf (IEEE)
    assert F.dequantize(q64)[0, 2] == 1.0  # tie to even


@pytest.mark.parametrize("fmt", FP8)
def test_fp8_bit_exact_with_ml_dtypes(fmt: str) -> None:
    rng = np.random.default_rng(12)
    dt = {"fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2}[fmt]
    v = _ties_and_randoms(F.decode_table(fmt), rng, F.FP8_MAX[fmt] / 4)
    m = F.FP8_MAX[fmt]
    np.testing.assert_array_equal(F.encode_fp8(v, fmt), np.clip(v, -m, m).astype(dt).view(np.uint8))
    sat = F.encode_fp8(np.array([1e30, -1e30], np.float32), fmt)
    assert np.isfinite(F.decode_table(fmt)[sat]).all()  # clamped, never NaN/inf
    # Through quantize: with amax == FP8_MAX the scale is 1 and codes are ml_dtypes' own.
    x = np.clip(v, -m, m).reshape(1, -1)
    q = F.quantize(x, fmt)
    assert float(q.scale) == 1.0
    np.testing.assert_array_equal(q.data[0], x[0].astype(dt).view(np.uint8))
    # General scale: codes are RNE(x / scale) with the float32 division.
    y = _random_matrix(3, 4, 64)
    q = F.quantize(y, fmt)
    np.testing.assert_array_equal(q.data, (y / q.scale).astype(dt).view(np.uint8))


def test_e2m1_bit_exact_with_ml_dtypes() -> None:
    if not F.HAS_ML_DTYPES_E2M1:
        pytest.skip("ml_dtypes has no float4_e2m1fn")
    rng = np.random.default_rng(13)
    v = _ties_and_randoms(F.decode_table("e2m1"), rng, 3.0)
    v = np.concatenate([v, -v, np.array([0.0, -0.0, 1e-30, -1e-30], np.float32)])
    ref = np.clip(v, -6, 6).astype(ml_dtypes.float4_e2m1fn).view(np.uint8)
    np.testing.assert_array_equal(F.encode_e2m1(v), ref)
    np.testing.assert_array_equal(F.encode_e2m1(v.astype(np.float64)), ref)


def test_tables_match_ml_dtypes() -> None:
    codes = np.arange(256, dtype=np.uint8)
    for fmt, dt in (("fp8_e4m3", ml_dtypes.float8_e4m3fn), ("fp8_e5m2", ml_dtypes.float8_e5m2)):
        np.testing.assert_array_equal(F.decode_table(fmt), codes.view(dt).astype(np.float32))
        assert F.decode_table(fmt).shape == (256,)
    assert np.isnan(F.decode_table("fp8_e4m3")[[0x7F, 0xFF]]).all()
    if F.HAS_ML_DTYPES_E2M1:
        ref = codes[:16].view(ml_dtypes.float4_e2m1fn).astype(np.float32)
        np.testing.assert_array_equal(F.decode_table("e2m1"), ref)
    if F.HAS_ML_DTYPES_E8M0:
        ref = codes.view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
        np.testing.assert_array_equal(F.decode_table("e8m0"), ref)
    t = F.decode_table("e2m1")
    t[0] = 99.0  # a copy: the cached table is untouched
    assert F.decode_table("e2m1")[0] == 0.0


# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------


@HYP
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 4), half_k=st.integers(1, 40))
def test_pack_unpack_round_trip(seed: int, rows: int, half_k: int) -> None:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, size=(rows, 2 * half_k), dtype=np.uint8)
    packed = F.pack_e2m1(codes)
    assert packed.shape == (rows, half_k) and packed.dtype == np.uint8
    np.testing.assert_array_equal(packed & 0xF, codes[:, 0::2])
    np.testing.assert_array_equal(F.unpack_e2m1(packed), codes)
    raw = rng.integers(0, 256, size=(rows, half_k), dtype=np.uint8)
    np.testing.assert_array_equal(F.pack_e2m1(F.unpack_e2m1(raw)), raw)


# --------------------------------------------------------------------------------------------
# Random packed weights
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", F.WEIGHT_FORMATS)
@pytest.mark.parametrize("std", [1e-3, 0.02, 1.0, 50.0])
def test_random_qtensor(fmt: str, std: float) -> None:
    shape = (64, 512)
    q = F.random_qtensor(np.random.default_rng(21), shape, fmt, std=std)
    assert isinstance(q, QTensor) and q.fmt == fmt and q.shape == shape
    assert q.nbytes == F.storage_bytes(fmt, *shape)
    assert q.data.flags.c_contiguous
    w = F.dequantize(q)
    assert np.isfinite(w).all()
    assert 0.5 * std <= float(w.std()) <= 2.0 * std
    assert abs(float(w.mean())) < 0.1 * std
    if fmt == "mxfp4":
        assert q.scale.max() < 255
    if fmt == "nvfp4":
        assert np.isfinite(F.decode_table("fp8_e4m3")[q.scale]).all() and (q.scale < 0x80).all()
    again = F.random_qtensor(np.random.default_rng(21), shape, fmt, std=std)
    np.testing.assert_array_equal(again.data, q.data)
    other = F.random_qtensor(np.random.default_rng(22), shape, fmt, std=std)
    assert not np.array_equal(other.data, q.data)


# --------------------------------------------------------------------------------------------
# Activations and KV cache
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", F.ACTIVATION_FORMATS)
def test_fake_quantize_activation(fmt: str) -> None:
    x = _random_matrix(31, 6, 64)
    out = F.fake_quantize_activation(x, fmt)
    assert out.dtype == np.float32 and out.shape == x.shape
    # FP8 activations are scaled per row (per token), like per-channel weight quantization.
    scaling = "channel" if fmt.startswith("fp8") else "tensor"
    np.testing.assert_array_equal(out, F.dequantize(F.quantize(x, fmt, scaling=scaling)))
    x3 = _random_matrix(32, 6, 64).reshape(2, 3, 64)
    out3 = F.fake_quantize_activation(x3, fmt)
    np.testing.assert_array_equal(
        out3.reshape(6, 64), F.fake_quantize_activation(x3.reshape(6, 64), fmt)
    )


@pytest.mark.parametrize("fmt", F.KV_FORMATS)
def test_kv_round_trip(fmt: str) -> None:
    x = _random_matrix(41, 8, 48).reshape(2, 4, 48)
    codes, scale = F.kv_encode(x, fmt)
    assert codes.shape == x.shape
    assert codes.dtype == (np.uint16 if fmt == "bf16" else np.uint8)
    if fmt == "bf16":
        assert scale == 1.0
    else:
        assert scale == float(np.float32(np.abs(x).max() / F.FP8_MAX[fmt]))
    out = F.kv_decode(codes, scale, fmt)
    assert out.dtype == np.float32 and out.shape == x.shape
    rel = {"bf16": 2.0**-8, "fp8_e4m3": 2.0**-4, "fp8_e5m2": 2.0**-3}[fmt]
    assert np.abs(out - x).max() <= rel * np.abs(x).max() * (1 + 1e-6)
    codes2, scale2 = F.kv_encode(out, fmt)
    np.testing.assert_array_equal(codes2, codes)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def _one_line_error(fn, *args, match: str, **kwargs) -> None:
    with pytest.raises(FormatError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_format_errors() -> None:
    x = _random_matrix(51, 2, 40)
    _one_line_error(F.quantize, x, "fp16", match="unknown format 'fp16'; use one of")
    _one_line_error(F.quantize, x, "mxfp4", match="divisible by 32, got K=40; pad")
    _one_line_error(F.quantize, x[:, :24], "nvfp4", match="divisible by 16, got K=24")
    _one_line_error(F.storage_bytes, "mxfp4", 4, 48, match="divisible by 32")
    _one_line_error(F.bits_per_element, "int4", match="unknown format")
    _one_line_error(F.quantize, x[0], "bf16", match="2-D")
    _one_line_error(F.quantize, x.astype(np.int32), "bf16", match="float array")
    bad = x[:, :32].copy()
    bad[0, 0] = np.nan
    _one_line_error(F.quantize, bad, "fp8_e4m3", match="NaN or inf")
    _one_line_error(F.quantize, x[:, :32], "mxfp4", scaling="channel", match="fp8 only|only to fp8")
    _one_line_error(F.quantize, x[:, :32], "fp8_e4m3", scaling="row", match="unknown scaling")
    _one_line_error(F.decode_table, "bf16", match="no decode table")
    _one_line_error(F.decode_table, "mxfp4", match="e2m1")
    _one_line_error(F.pack_e2m1, np.zeros(3, np.uint8), match="even")
    _one_line_error(F.pack_e2m1, np.full(2, 16, np.uint8), match="0..15")
    _one_line_error(
        F.random_qtensor,
        np.random.default_rng(0),
        (4, 48),
        "mxfp4",
        std=1.0,
        match="divisible by 32",
    )
    _one_line_error(
        F.random_qtensor,
        np.random.default_rng(0),
        (4, 64),
        "bf16",
        std=0.0,
        match="std must be positive",
    )
    _one_line_error(F.fake_quantize_activation, x, "nvfp4", match="divisible by 16")
    _one_line_error(F.kv_encode, x, "mxfp4", match="unknown KV format")
    _one_line_error(QTensor, "mxfp4", (2, 64), np.zeros((2, 64), np.uint8), match="data must be")
    _one_line_error(
        QTensor,
        "nvfp4",
        (2, 64),
        np.zeros((2, 32), np.uint8),
        np.zeros((2, 4), np.uint8),
        match="global_scale",
    )


# --------------------------------------------------------------------------------------------
# Zero blocks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", F.WEIGHT_FORMATS)
def test_zero_blocks(fmt: str) -> None:
    x = _random_matrix(61, 3, 64)
    x[1, :] = 0.0  # a whole zero row (zero fp8 channel, zero FP4 blocks)
    x[2, :32] = 0.0
    for scaling in ("tensor", "channel") if fmt in FP8 else ("tensor",):
        q = F.quantize(x, fmt, scaling=scaling)
        out = F.dequantize(q)
        assert np.isfinite(out).all()
        assert (out[1] == 0).all() and (out[2, :32] == 0).all()
        if q.scale is not None and q.scale.dtype == np.float32:
            assert np.isfinite(q.scale).all() and (q.scale > 0).all()
    if fmt == "mxfp4":
        assert q.scale[1].tolist() == [0, 0] and q.scale[2, 0] == 0
    if fmt == "nvfp4":
        assert (q.scale[1] == 0).all() and (q.scale[2, :2] == 0).all()
    z = F.quantize(np.zeros((2, 32), np.float32), fmt)
    assert (F.dequantize(z) == 0).all()
    if fmt == "nvfp4":
        assert z.global_scale == 1.0
    if fmt in FP8:
        assert float(z.scale) == 1.0
    assert (F.fake_quantize_activation(np.zeros((2, 32), np.float32), fmt) == 0).all()
