"""Number formats: BF16, FP8 (E4M3, E5M2), MXFP4 and NVFP4 storage, codecs and reference dequant.

Storage layout (fixed; the plan, the backends and the kernels depend on it exactly). A weight
matrix has logical shape ``(N, K) = (out_features, in_features)``, row-major, ``y = x @ W.T``.
Raw data arrays hold unsigned integer codes so that compiled kernels can read them:

* ``"bf16"``: ``data`` uint16 ``(N, K)``, the bfloat16 bit patterns; no scales.
* ``"fp8_e4m3"`` / ``"fp8_e5m2"``: ``data`` uint8 ``(N, K)``, bit patterns of
  ``ml_dtypes.float8_e4m3fn`` / ``ml_dtypes.float8_e5m2``; ``scale`` float32 of shape ``()``
  (per tensor) or ``(N,)`` (per output row); ``value = decode(code) * scale``.
* ``"mxfp4"``: ``data`` uint8 ``(N, K // 2)``, two E2M1 codes a byte, element ``2i`` in the low
  nibble and ``2i + 1`` in the high nibble; ``scale`` uint8 ``(N, K // 32)`` of E8M0 codes
  (``2 ** (code - 127)``, code 255 is NaN); ``value = e2m1 * 2 ** (scale - 127)``.
* ``"nvfp4"``: ``data`` packed as for mxfp4; ``scale`` uint8 ``(N, K // 16)`` holding
  ``float8_e4m3fn`` bit patterns; ``global_scale`` a float32 value (kept as a Python float);
  ``value = (e2m1 * e4m3(scale)) * global_scale``. The product ``e2m1 * e4m3(scale)`` is exact
  in float32, so multiplying it by ``global_scale`` in float32 rounds once and matches
  :func:`dequantize` bit for bit; multiplying ``e4m3(scale) * global_scale`` first does not.

E2M1 codes: bit 3 is the sign, then 2 exponent bits and 1 mantissa bit; magnitudes
``[0, 0.5, 1, 1.5, 2, 3, 4, 6]`` for codes 0..7.

Numerics. Every conversion rounds to nearest, ties to even (RNE). Inputs are taken as float32
(float64 inputs are rounded to float32 first, which is also what ``ml_dtypes`` does when it
casts float64 to a narrow type) and scaled values are formed in float32 arithmetic, as a
device quantizer would. BF16 follows IEEE overflow (to +-inf); FP8 and FP4 quantizers clamp to
the largest finite value before converting (saturation), as deployed quantizers do, so they
never produce NaN or inf. BF16 and FP8 rounding is done by ``ml_dtypes`` itself, so it is
bit-exact with ``ml_dtypes`` by construction; E2M1 rounding is our own and is tested against
``ml_dtypes.float4_e2m1fn`` when the installed version has it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np

__all__ = [
    "ACTIVATION_FORMATS",
    "BLOCK_SIZE",
    "E2M1_MAGNITUDES",
    "E2M1_MAX",
    "FP8_MAX",
    "HAS_ML_DTYPES_E2M1",
    "HAS_ML_DTYPES_E8M0",
    "KV_FORMATS",
    "WEIGHT_FORMATS",
    "FormatError",
    "QTensor",
    "bits_per_element",
    "decode_table",
    "dequantize",
    "encode_bf16",
    "encode_e2m1",
    "encode_fp8",
    "fake_quantize_activation",
    "kv_decode",
    "kv_encode",
    "pack_e2m1",
    "quantize",
    "random_qtensor",
    "storage_bytes",
    "unpack_e2m1",
]

WEIGHT_FORMATS: tuple[str, ...] = ("bf16", "fp8_e4m3", "fp8_e5m2", "mxfp4", "nvfp4")
KV_FORMATS: tuple[str, ...] = ("bf16", "fp8_e4m3", "fp8_e5m2")
ACTIVATION_FORMATS: tuple[str, ...] = ("bf16", "fp8_e4m3", "fp8_e5m2", "mxfp4", "nvfp4")

#: Elements sharing one block scale, for the block-scaled FP4 formats.
BLOCK_SIZE: dict[str, int] = {"mxfp4": 32, "nvfp4": 16}

_FP8_DTYPES: dict[str, type] = {
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
}
#: Largest finite value of each FP8 format (448 for E4M3FN, 57344 for E5M2).
FP8_MAX: dict[str, float] = {k: float(ml_dtypes.finfo(v).max) for k, v in _FP8_DTYPES.items()}
_FP8_MANTISSA_BITS: dict[str, int] = {"fp8_e4m3": 3, "fp8_e5m2": 2}

#: E2M1 magnitudes for codes 0..7 (codes 8..15 are the negatives).
E2M1_MAGNITUDES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX: float = 6.0
#: Largest unbiased exponent of an E2M1 value (6 = 1.5 * 2**2), used by the OCP MX scale rule.
_E2M1_EMAX = 2

_ML_E2M1 = getattr(ml_dtypes, "float4_e2m1fn", None)
_ML_E8M0 = getattr(ml_dtypes, "float8_e8m0fnu", None)
#: Whether the installed ml_dtypes defines ``float4_e2m1fn`` / ``float8_e8m0fnu``.
HAS_ML_DTYPES_E2M1: bool = _ML_E2M1 is not None
HAS_ML_DTYPES_E8M0: bool = _ML_E8M0 is not None

_F32_MAX = float(np.finfo(np.float32).max)
_CHUNK = 1 << 20  # elements per chunk for in-place passes over large random arrays


class FormatError(ValueError):
    """Bad input to a format routine: unknown format, wrong shape or dtype, K not divisible
    by the block size, non-finite values. The message is one line saying what to fix."""


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------


def _check_fmt(fmt: str, allowed: tuple[str, ...] = WEIGHT_FORMATS, what: str = "format") -> str:
    if not isinstance(fmt, str) or fmt not in allowed:
        raise FormatError(f"unknown {what} {fmt!r}; use one of {', '.join(allowed)}")
    return fmt


def _check_k(fmt: str, k: int) -> None:
    block = BLOCK_SIZE.get(fmt)
    if block is not None and k % block:
        raise FormatError(
            f"{fmt} needs K (in_features, the last axis) divisible by {block}, got K={k}; "
            f"pad it to a multiple of {block}"
        )


def _check_scaling(fmt: str, scaling: str) -> None:
    if scaling not in ("tensor", "channel"):
        raise FormatError(f"unknown scaling {scaling!r}; use 'tensor' or 'channel'")
    if scaling == "channel" and fmt not in _FP8_DTYPES:
        raise FormatError(
            f"scaling='channel' applies only to fp8 formats, not {fmt}; use scaling='tensor'"
        )


def bits_per_element(fmt: str) -> float:
    """Storage bits per element including block-scale overhead (bits/element).

    bf16: 16; fp8: 8 (its per-tensor or per-row scale is negligible and not counted);
    mxfp4: 4 + 8/32 = 4.25; nvfp4: 4 + 8/16 = 4.5 (its per-tensor global scale not counted).
    """
    _check_fmt(fmt)
    return {"bf16": 16.0, "fp8_e4m3": 8.0, "fp8_e5m2": 8.0, "mxfp4": 4.25, "nvfp4": 4.5}[fmt]


def storage_bytes(fmt: str, n: int, k: int, *, scaling: str = "tensor") -> int:
    """Exact bytes of an ``(n, k)`` weight in ``fmt``: data plus all scales (bytes).

    fp8 adds 4 bytes for a float32 per-tensor scale (``scaling="tensor"``) or ``4 * n`` for
    per-row scales (``scaling="channel"``); nvfp4 adds 4 bytes for its float32 global scale.
    """
    _check_fmt(fmt)
    _check_scaling(fmt, scaling)
    n, k = int(n), int(k)
    if n < 0 or k < 0:
        raise FormatError(f"shape must be non-negative, got ({n}, {k})")
    _check_k(fmt, k)
    if fmt == "bf16":
        return 2 * n * k
    if fmt in _FP8_DTYPES:
        return n * k + (4 * n if scaling == "channel" else 4)
    if fmt == "mxfp4":
        return n * k // 2 + n * k // 32
    return n * k // 2 + n * k // 16 + 4  # nvfp4


# --------------------------------------------------------------------------------------------
# QTensor
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class QTensor:
    """A weight matrix of logical shape ``(N, K)`` stored in ``fmt`` (see the module docstring
    for the exact layout). Equality is identity (arrays do not compare as booleans).

    Attributes:
        fmt: one of :data:`WEIGHT_FORMATS`.
        shape: logical ``(N, K)`` = (out_features, in_features).
        data: raw codes (uint16 for bf16, uint8 otherwise; FP4 packed two a byte).
        scale: fp8: float32 ``()`` or ``(N,)``; mxfp4: uint8 E8M0 codes ``(N, K // 32)``;
            nvfp4: uint8 E4M3 codes ``(N, K // 16)``; bf16: None.
        global_scale: nvfp4 only: the per-tensor scale, a float32 value held as a Python float.
    """

    fmt: str
    shape: tuple[int, int]
    data: np.ndarray
    scale: np.ndarray | None = None
    global_scale: float | None = None

    def __post_init__(self) -> None:
        _check_fmt(self.fmt)
        if len(self.shape) != 2:
            raise FormatError(f"QTensor shape must be (N, K), got {self.shape!r}")
        n, k = (int(s) for s in self.shape)
        object.__setattr__(self, "shape", (n, k))
        _check_k(self.fmt, k)
        fmt = self.fmt
        if fmt == "bf16":
            want_dtype, want_shape = np.uint16, (n, k)
        elif fmt in _FP8_DTYPES:
            want_dtype, want_shape = np.uint8, (n, k)
        else:
            want_dtype, want_shape = np.uint8, (n, k // 2)
        if self.data.dtype != want_dtype or self.data.shape != want_shape:
            raise FormatError(
                f"{fmt} data must be {np.dtype(want_dtype).name} {want_shape}, "
                f"got {self.data.dtype} {self.data.shape}"
            )
        if fmt == "bf16":
            ok = self.scale is None and self.global_scale is None
            want = "no scale and no global_scale"
        elif fmt in _FP8_DTYPES:
            ok = (
                self.scale is not None
                and self.scale.dtype == np.float32
                and self.scale.shape in ((), (n,))
                and self.global_scale is None
            )
            want = f"a float32 scale of shape () or ({n},) and no global_scale"
        else:
            block = BLOCK_SIZE[fmt]
            ok = (
                self.scale is not None
                and self.scale.dtype == np.uint8
                and self.scale.shape == (n, k // block)
                and (self.global_scale is not None) == (fmt == "nvfp4")
            )
            want = f"uint8 scale codes of shape ({n}, {k // block})" + (
                " and a global_scale" if fmt == "nvfp4" else " and no global_scale"
            )
        if not ok:
            raise FormatError(f"{fmt} QTensor needs {want}")
        if self.global_scale is not None:
            object.__setattr__(self, "global_scale", float(np.float32(self.global_scale)))

    @property
    def nbytes(self) -> int:
        """Bytes of data plus scales (equals :func:`storage_bytes` for this tensor) (bytes)."""
        total = int(self.data.nbytes)
        if self.scale is not None:
            total += int(self.scale.nbytes)
        if self.global_scale is not None:
            total += 4
        return total

    @property
    def scaling(self) -> str:
        """``"channel"`` for per-row fp8 scales, ``"tensor"`` otherwise."""
        if self.fmt in _FP8_DTYPES and self.scale is not None and self.scale.shape != ():
            return "channel"
        return "tensor"


# --------------------------------------------------------------------------------------------
# Tables and element codecs
# --------------------------------------------------------------------------------------------


@functools.cache
def _table(name: str) -> np.ndarray:
    if name in _FP8_DTYPES:
        t = np.arange(256, dtype=np.uint8).view(_FP8_DTYPES[name]).astype(np.float32)
    elif name == "e2m1":
        mags = np.array(E2M1_MAGNITUDES, dtype=np.float32)
        t = np.concatenate([mags, -mags])
    elif name == "e8m0":
        t = np.ldexp(1.0, np.arange(256) - 127)  # float64: 2**128 (code 255) is finite here
        t[255] = np.nan
        t = t.astype(np.float32)
    else:  # pragma: no cover - guarded by decode_table
        raise AssertionError(name)
    t.setflags(write=False)
    return t


_TABLE_ALIASES = {
    "fp8_e4m3": "fp8_e4m3",
    "e4m3": "fp8_e4m3",
    "fp8_e5m2": "fp8_e5m2",
    "e5m2": "fp8_e5m2",
    "e2m1": "e2m1",
    "e8m0": "e8m0",
}


def decode_table(fmt: str) -> np.ndarray:
    """Lookup table code -> value (float32), for compiled kernels.

    ``"fp8_e4m3"`` (alias ``"e4m3"``) and ``"fp8_e5m2"`` (``"e5m2"``): 256 entries, NaN codes
    give NaN (E5M2 also has +-inf); ``"e2m1"``: 16 entries (code 8 is -0.0); ``"e8m0"``: 256
    entries ``2 ** (c - 127)``, code 255 NaN (code 0 is the float32 subnormal 2**-127).
    bf16, mxfp4 and nvfp4 have no single table (raise :class:`FormatError`). Returns a fresh,
    writable copy.
    """
    name = _TABLE_ALIASES.get(fmt) if isinstance(fmt, str) else None
    if name is None:
        if fmt == "bf16":
            raise FormatError(
                "bf16 has no decode table; view the uint16 codes as ml_dtypes.bfloat16"
            )
        if fmt in BLOCK_SIZE:
            raise FormatError(
                f"{fmt} has no single table; use decode_table('e2m1') for values and "
                f"decode_table('{'e8m0' if fmt == 'mxfp4' else 'fp8_e4m3'}') for scales"
            )
        raise FormatError(
            f"no decode table for {fmt!r}; use one of {', '.join(sorted(_TABLE_ALIASES))}"
        )
    return _table(name).copy()


def _check_float(x: np.ndarray, what: str) -> None:
    if x.dtype not in (np.float32, np.float64, np.float16) and x.dtype != ml_dtypes.bfloat16:
        raise FormatError(f"{what} must be a float array (float32 or float64), got {x.dtype}")


def _as_float32(x: np.ndarray, what: str) -> np.ndarray:
    """``x`` as a float32 array (float64 rounded RNE); must be finite and in float32 range."""
    _check_float(x, what)
    if not np.isfinite(x).all():
        raise FormatError(f"{what} contains NaN or inf; pass finite values")
    if x.dtype == np.float64 and x.size and float(np.abs(x).max()) > _F32_MAX:
        raise FormatError(f"{what} exceeds the float32 range (3.4e38); rescale it")
    return x.astype(np.float32, copy=False)


def encode_bf16(x: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of ``x``, RNE, overflow to +-inf (IEEE), via ml_dtypes."""
    with np.errstate(over="ignore"):
        return np.asarray(x).astype(ml_dtypes.bfloat16).view(np.uint16)


def encode_fp8(x: np.ndarray, fmt: str) -> np.ndarray:
    """FP8 bit patterns (uint8) of already-scaled values ``x``: clamp to +-``FP8_MAX[fmt]``
    (saturation), then RNE via ml_dtypes. NaN input stays NaN; callers reject it."""
    _check_fmt(fmt, tuple(_FP8_DTYPES), "fp8 format")
    m = FP8_MAX[fmt]
    x = np.asarray(x)
    return np.clip(x, -m, m).astype(_FP8_DTYPES[fmt]).view(np.uint8)


# Midpoints between consecutive E2M1 magnitudes. Ties go to the even code: down at 0.25, 1.25,
# 2.5 and 5 (the lower code is even), up at 0.75, 1.75 and 3.5 (the upper code is even).
_E2M1_TIE_DOWN = (0.25, 1.25, 2.5, 5.0)
_E2M1_TIE_UP = (0.75, 1.75, 3.5)


def encode_e2m1(x: np.ndarray) -> np.ndarray:
    """E2M1 codes (uint8, 0..15, sign in bit 3) of already-scaled values ``x``: RNE with
    saturation to +-6. The sign of zero is kept (-0.0 and small negatives give code 8).
    NaN is not supported (callers reject it)."""
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float32)
    m = np.abs(x)
    code = (m > _E2M1_TIE_DOWN[0]).view(np.uint8).copy()
    for t in _E2M1_TIE_DOWN[1:]:
        code += m > t
    for t in _E2M1_TIE_UP:
        code += m >= t
    code |= np.signbit(x).view(np.uint8) << np.uint8(3)
    return code


def pack_e2m1(codes: np.ndarray) -> np.ndarray:
    """Pack E2M1 codes ``(..., K)`` (uint8, each 0..15, K even) into bytes ``(..., K // 2)``:
    element ``2i`` in the low nibble, ``2i + 1`` in the high nibble."""
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise FormatError(f"E2M1 codes must be uint8, got {codes.dtype}")
    if codes.ndim == 0 or codes.shape[-1] % 2:
        raise FormatError(f"E2M1 codes need an even last axis, got shape {codes.shape}")
    if codes.size and int(codes.max()) > 15:
        raise FormatError("E2M1 codes must be 0..15 (4 bits); mask them with & 0xF")
    return codes[..., 0::2] | (codes[..., 1::2] << np.uint8(4))


def unpack_e2m1(packed: np.ndarray) -> np.ndarray:
    """Unpack bytes ``(..., K // 2)`` into E2M1 codes ``(..., K)`` (uint8), low nibble first."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim == 0:
        raise FormatError(f"packed E2M1 must be a uint8 array, got {packed.dtype} {packed.shape}")
    out = np.empty(packed.shape[:-1] + (2 * packed.shape[-1],), dtype=np.uint8)
    np.bitwise_and(packed, np.uint8(0xF), out=out[..., 0::2])
    np.right_shift(packed, np.uint8(4), out=out[..., 1::2])
    return out


# --------------------------------------------------------------------------------------------
# Quantize / dequantize
# --------------------------------------------------------------------------------------------


def _fp8_scale(amax: np.ndarray, fmt: str) -> np.ndarray:
    """float32 scale ``amax / FP8_MAX`` (float32 division); 1.0 where it would be 0."""
    s = np.asarray(amax, dtype=np.float32) / np.float32(FP8_MAX[fmt])
    return np.where(s > 0, s, np.float32(1.0)).astype(np.float32)


def _mx_scale_codes(amax: np.ndarray) -> np.ndarray:
    """E8M0 codes per OCP MX: ``floor(log2(amax)) - 2 + 127`` clamped to [0, 254]; 0 for a
    zero block. ``floor(log2)`` is exact (from frexp)."""
    _, ex = np.frexp(amax)
    code = np.clip(ex.astype(np.int32) - 1 - _E2M1_EMAX + 127, 0, 254)
    return np.where(amax > 0, code, 0).astype(np.uint8)


def _quantize_mxfp4(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(packed data, E8M0 codes) of a float32 ``(R, K)`` array, blocks of 32 along K."""
    r, k = x.shape
    xb = x.reshape(r, k // 32, 32)
    codes_s = _mx_scale_codes(np.abs(xb).max(axis=-1))
    v = np.ldexp(xb, (127 - codes_s.astype(np.int32))[..., None]).astype(np.float32)
    return pack_e2m1(encode_e2m1(v).reshape(r, k)), codes_s


def _nv_global_scale(amax: float) -> np.float32:
    g = np.float32(amax) / np.float32(E2M1_MAX * FP8_MAX["fp8_e4m3"])
    return g if g > 0 else np.float32(1.0)


def _quantize_nvfp4(x: np.ndarray, g: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """(packed data, E4M3 scale codes) of a float32 ``(R, K)`` array, blocks of 16 along K,
    given the float32 global scale ``g``."""
    r, k = x.shape
    xb = x.reshape(r, k // 16, 16)
    amax = np.abs(xb).max(axis=-1)
    target = (amax / np.float32(E2M1_MAX)) / g
    codes_s = encode_fp8(target, "fp8_e4m3")
    denom = (_table("fp8_e4m3")[codes_s] * g)[..., None]
    v = np.divide(xb, denom, out=np.zeros_like(xb), where=denom > 0)
    v = np.copysign(v, xb)  # keep the sign of values in blocks whose scale rounded to 0
    return pack_e2m1(encode_e2m1(v).reshape(r, k)), codes_s


def quantize(x: np.ndarray, fmt: str, *, scaling: str = "tensor") -> QTensor:
    """Quantize a 2-D float array ``(N, K)`` (float32 or float64) into ``fmt``.

    * bf16: RNE (ml_dtypes), overflow to inf; NaN/inf inputs pass through.
    * fp8: ``scale = amax / FP8_MAX`` in float32, per tensor (``scaling="tensor"``, shape
      ``()``) or per row (``"channel"``, shape ``(N,)``), 1.0 for an all-zero tensor/row;
      codes = RNE(clamp(x / scale)) with ``x / scale`` in float32.
    * mxfp4 (OCP MX v1.0): per 32-block shared exponent ``e = floor(log2(amax)) - 2`` (E8M0
      code ``e + 127`` clamped to [0, 254]; code 0 for a zero block); codes =
      RNE(clamp(x / 2**e, +-6)).
    * nvfp4: ``global_scale = amax_tensor / (6 * 448)`` in float32 (1.0 for a zero tensor);
      block scale = RNE_e4m3(clamp((amax_block / 6) / global_scale, 448)); codes =
      RNE(clamp(x / (e4m3(scale) * global_scale), +-6)) in float32; a block whose scale
      rounds to 0 stores (signed) zeros.

    Scaled formats require finite input within the float32 range. Re-quantizing
    ``dequantize(q)`` gives back q's codes exactly (for nvfp4: when every nonzero block
    scale is an E4M3 normal, i.e. block amax above ~3.5e-5 of the tensor amax).
    """
    _check_fmt(fmt)
    _check_scaling(fmt, scaling)
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise FormatError(f"quantize needs a 2-D (N, K) array, got shape {arr.shape}")
    n, k = arr.shape
    _check_k(fmt, k)
    if fmt == "bf16":
        _check_float(arr, "input")
        return QTensor(fmt, (n, k), encode_bf16(arr))
    x32 = _as_float32(arr, "input")
    if fmt in _FP8_DTYPES:
        if scaling == "channel":
            amax = np.abs(x32).max(axis=1) if k else np.zeros(n, np.float32)
            scale = _fp8_scale(amax, fmt)
            codes = encode_fp8(x32 / scale[:, None], fmt)
        else:
            amax = np.abs(x32).max() if x32.size else np.float32(0)
            scale = _fp8_scale(amax, fmt).reshape(())
            codes = encode_fp8(x32 / scale, fmt)
        return QTensor(fmt, (n, k), codes, scale)
    if fmt == "mxfp4":
        data, sc = _quantize_mxfp4(x32)
        return QTensor(fmt, (n, k), data, sc)
    g = _nv_global_scale(float(np.abs(x32).max()) if x32.size else 0.0)
    data, sc = _quantize_nvfp4(x32, g)
    return QTensor(fmt, (n, k), data, sc, float(g))


def dequantize(q: QTensor, dtype: type = np.float32) -> np.ndarray:
    """Reference dequantization to a ``dtype`` array of shape ``q.shape``.

    Values are computed exactly in float64 and rounded once to ``dtype``; for float32 this is
    bit-identical to computing ``(e2m1 * block_scale) * global_scale`` or ``fp8 * scale`` in
    float32, since the first products are exact.
    """
    n, k = q.shape
    fmt = q.fmt
    if fmt == "bf16":
        return q.data.view(ml_dtypes.bfloat16).astype(dtype)
    if fmt in _FP8_DTYPES:
        v = _table(fmt)[q.data].astype(np.float64)
        s = np.asarray(q.scale, dtype=np.float64)
        v *= s[:, None] if s.ndim == 1 else s
        return v.astype(dtype)
    assert q.scale is not None
    block = BLOCK_SIZE[fmt]
    v = _table("e2m1")[unpack_e2m1(q.data)].astype(np.float64).reshape(n, k // block, block)
    if fmt == "mxfp4":
        s = _table("e8m0")[q.scale].astype(np.float64)
    else:
        assert q.global_scale is not None
        s = _table("fp8_e4m3")[q.scale].astype(np.float64) * q.global_scale
    v *= s[..., None]
    return v.reshape(n, k).astype(dtype)


# --------------------------------------------------------------------------------------------
# Fast random weights in packed form
# --------------------------------------------------------------------------------------------


def _random_bytes(rng: np.random.Generator, nbytes: int) -> np.ndarray:
    """``nbytes`` random bytes (writable uint8, 1-D) straight from the bit generator."""
    raw = rng.bit_generator.random_raw((nbytes + 7) // 8)
    return raw.view(np.uint8)[:nbytes]


def _keep_and_add(bits: np.ndarray, keep: int, add: int) -> None:
    """In place, chunked: ``bits = (bits & keep) + add`` (no carries by construction)."""
    keep_v, add_v = bits.dtype.type(keep), bits.dtype.type(add)
    for start in range(0, bits.size, _CHUNK):
        c = bits[start : start + _CHUNK]
        np.bitwise_and(c, keep_v, out=c)
        np.add(c, add_v, out=c)


@functools.cache
def _bf16_unit_rms() -> float:
    """RMS of bf16 values 2**k * (1 + m/128), k in 0..3, m in 0..127, equally likely."""
    m = 1.0 + np.arange(128) / 128.0
    k = np.arange(4)
    return float(np.sqrt(np.mean((np.exp2(k)[:, None] * m[None, :]) ** 2)))


_E2M1_RMS = float(np.sqrt(np.mean(np.square(E2M1_MAGNITUDES))))
# FP8 random codes: keep sign, mantissa and the 2 low exponent bits, add a base exponent, so
# the exponent takes 4 consecutive values below the NaN/inf exponent (all codes finite).
_FP8_RANDOM_BASE_EXP = {"fp8_e4m3": 11, "fp8_e5m2": 27}
# nvfp4 block scales: positive E4M3 codes with exponent 11..14 (values 16..240).
_NV_SCALE_KEEP, _NV_SCALE_ADD = 0x1F, 11 << 3


def _fp8_random_keep_add(fmt: str) -> tuple[int, int]:
    mb = _FP8_MANTISSA_BITS[fmt]
    return 0x80 | ((1 << (mb + 2)) - 1), _FP8_RANDOM_BASE_EXP[fmt] << mb


@functools.cache
def _fp8_random_rms(fmt: str) -> float:
    keep, add = _fp8_random_keep_add(fmt)
    codes = (np.arange(256, dtype=np.uint16) & keep) + add
    return float(np.sqrt(np.mean(np.square(_table(fmt)[codes.astype(np.uint8)].astype(float)))))


@functools.cache
def _nv_scale_rms() -> float:
    codes = ((np.arange(256) & _NV_SCALE_KEEP) + _NV_SCALE_ADD).astype(np.uint8)
    return float(np.sqrt(np.mean(np.square(_table("fp8_e4m3")[codes].astype(float)))))


def random_qtensor(
    rng: np.random.Generator, shape: tuple[int, int], fmt: str, *, std: float
) -> QTensor:
    """Random weights of logical ``shape`` ``(N, K)`` generated directly in packed ``fmt``.

    No float copy of the matrix is made: random bits come straight from ``rng``'s bit
    generator and are masked in place (a 1 GB layer takes about a second). Deterministic for
    a given ``rng`` state. All values are finite (no NaN/inf codes). The dequantized standard
    deviation is ``std`` (dimensionless, like the weights) within a factor of about sqrt(2):

    * bf16: random sign and 7-bit mantissa, exponent one of 4 consecutive values chosen so
      the RMS is closest to ``std`` (magnitudes span 16x).
    * fp8: random sign and mantissa, exponent one of the 4 just below the top one (E4M3
      values 16..240, E5M2 4096..57344), per-tensor float32 scale making the expected RMS
      exactly ``std``.
    * mxfp4: random bytes (every E2M1 code is valid); E8M0 block scales spread over 3
      consecutive exponents, centred so the RMS is closest to ``std``.
    * nvfp4: random bytes; E4M3 block scales with random mantissa and exponent 11..14
      (values 16..240); float32 global scale making the expected RMS exactly ``std``.

    The mean is 0 (random signs), so the RMS is the standard deviation.
    """
    _check_fmt(fmt)
    if len(shape) != 2 or any(int(s) <= 0 for s in shape):
        raise FormatError(f"shape must be (N, K) with positive N and K, got {shape!r}")
    n, k = (int(s) for s in shape)
    _check_k(fmt, k)
    std = float(std)
    if not (std > 0 and math.isfinite(std)):
        raise FormatError(f"std must be positive and finite, got {std!r}")
    if fmt == "bf16":
        e0 = 127 + round(math.log2(std / _bf16_unit_rms()))
        if not 1 <= e0 <= 251:
            raise FormatError(f"std={std!r} is outside the bf16 range; use 1e-35 < std < 1e35")
        bits = _random_bytes(rng, 2 * n * k).view(np.uint16)
        _keep_and_add(bits, 0x81FF, e0 << 7)  # sign, low 2 exponent bits, mantissa
        return QTensor(fmt, (n, k), bits.reshape(n, k))
    if fmt in _FP8_DTYPES:
        scale = np.float32(std / _fp8_random_rms(fmt))
        if not (scale > 0 and np.isfinite(scale)):
            raise FormatError(f"std={std!r} gives no finite float32 fp8 scale; use 1e-30 < std")
        bits = _random_bytes(rng, n * k)
        _keep_and_add(bits, *_fp8_random_keep_add(fmt))
        return QTensor(fmt, (n, k), bits.reshape(n, k), np.asarray(scale, dtype=np.float32))
    block = BLOCK_SIZE[fmt]
    data = _random_bytes(rng, n * k // 2).reshape(n, k // 2)
    sbytes = _random_bytes(rng, n * k // block)
    if fmt == "mxfp4":
        spread = math.sqrt((0.25 + 1.0 + 4.0) / 3.0)  # RMS factor of 2**{-1, 0, 1}
        c0 = 127 + round(math.log2(std / (_E2M1_RMS * spread)))
        if not 1 <= c0 <= 253:
            raise FormatError(f"std={std!r} is outside the mxfp4 range; use 1e-37 < std < 1e37")
        lut = (c0 - 1 + ((np.arange(256) * 3) >> 8)).astype(np.uint8)  # c0-1, c0, c0+1
        return QTensor(fmt, (n, k), data, lut[sbytes].reshape(n, k // block))
    g = np.float32(std / (_E2M1_RMS * _nv_scale_rms()))
    if not (g > 0 and np.isfinite(g)):
        raise FormatError(f"std={std!r} gives no finite float32 global scale; use 1e-35 < std")
    _keep_and_add(sbytes, _NV_SCALE_KEEP, _NV_SCALE_ADD)
    return QTensor(fmt, (n, k), data, sbytes.reshape(n, k // block), float(g))


# --------------------------------------------------------------------------------------------
# Activations and KV cache
# --------------------------------------------------------------------------------------------


def fake_quantize_activation(x: np.ndarray, fmt: str) -> np.ndarray:
    """Round-trip ``x`` (any shape, float) through activation format ``fmt``; float32 result.

    bf16: RNE; fp8: a dynamic scale ``amax / FP8_MAX`` per row (per token: each vector
    along the last axis), so that the result of a token does not depend on which other
    tokens share the batch or the expert, as in deployed dynamic FP8; mxfp4 / nvfp4: blocks of
    32 / 16 along the last axis (which must divide), nvfp4 with one global scale over all of
    ``x``. Same numerics as :func:`quantize` followed by :func:`dequantize`.
    """
    _check_fmt(fmt, ACTIVATION_FORMATS, "activation format")
    arr = np.asarray(x)
    if arr.ndim == 0:
        raise FormatError("activation must have at least one axis")
    if fmt == "bf16":
        _check_float(arr, "activation")
        return encode_bf16(arr).view(ml_dtypes.bfloat16).astype(np.float32)
    k = arr.shape[-1]
    _check_k(fmt, k)
    x32 = _as_float32(arr, "activation")
    if fmt in _FP8_DTYPES:
        amax = np.abs(x32).max(axis=-1, keepdims=True) if x32.size else np.zeros_like(x32)
        scale = _fp8_scale(amax, fmt)
        codes = encode_fp8(x32 / scale, fmt)
        return _table(fmt)[codes] * scale
    q = quantize(x32.reshape(-1, k), fmt)
    return dequantize(q).reshape(arr.shape)


def kv_encode(x: np.ndarray, fmt: str) -> tuple[np.ndarray, float]:
    """Encode a KV-cache array (any shape, float) into ``(codes, scale)``.

    bf16: uint16 bit patterns (RNE), scale 1.0. fp8: uint8 codes with a per-tensor float32
    scale ``amax / FP8_MAX`` (1.0 if all zero), clamped then RNE; input must be finite.
    ``scale`` is a float32 value held as a Python float.
    """
    _check_fmt(fmt, KV_FORMATS, "KV format")
    arr = np.asarray(x)
    if fmt == "bf16":
        _check_float(arr, "KV input")
        return encode_bf16(arr), 1.0
    x32 = _as_float32(arr, "KV input")
    scale = _fp8_scale(np.abs(x32).max() if x32.size else np.float32(0), fmt).reshape(())
    return encode_fp8(x32 / scale, fmt), float(scale)


def kv_decode(codes: np.ndarray, scale: float, fmt: str) -> np.ndarray:
    """Decode KV-cache codes from :func:`kv_encode` to float32 (``decode(code) * scale``)."""
    _check_fmt(fmt, KV_FORMATS, "KV format")
    codes = np.asarray(codes)
    if fmt == "bf16":
        if codes.dtype != np.uint16:
            raise FormatError(f"bf16 KV codes must be uint16, got {codes.dtype}")
        out = codes.view(ml_dtypes.bfloat16).astype(np.float32)
        return out if float(scale) == 1.0 else out * np.float32(scale)
    if codes.dtype != np.uint8:
        raise FormatError(f"{fmt} KV codes must be uint8, got {codes.dtype}")
    return _table(fmt)[codes] * np.float32(scale)
