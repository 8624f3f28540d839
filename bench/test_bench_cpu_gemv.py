"""CPU weight streaming: GEMV (decode at batch 1) against this machine's copy bandwidth, and the
streaming-vs-BLAS crossover of the GEMM in batch size.

Run with ``python -m pytest bench -q -s`` (not part of the default test run). The copy
bandwidth (bytes read + written, best of 5 copies of 1 GiB) is measured in the same run by the
``copy_bw`` fixture; each GEMV streams a weight far larger than the caches once per call, and its
rate counts the packed bytes it must read (codes plus scales), so ``ratio`` is the fraction of
the copy ceiling the kernel reaches. A decode step at batch 1 is bound by exactly this.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from engine.backends import cpu_kernels as K

# Logical weight shape: 16384 x 32768 = 1 GiB as bf16 (512 MiB fp8, 256 MiB + scales fp4),
# each far past the 480 MiB L3 the dev VM reports except FP4, which is still past L2 by 100x
# and whose every row is read exactly once per call.
N, KDIM = 16384, 32768
GEMV_FORMATS = ("bf16", "fp8_e4m3", "mxfp4", "nvfp4")
#: BF16 at M=1 must stream at no less than this fraction of the copy bandwidth.
BF16_MIN_RATIO = 0.6


@pytest.fixture(scope="module")
def raw_bytes() -> np.ndarray:
    """1 GiB of random bytes, shaped into each format's codes below."""
    return np.random.default_rng(7).integers(0, 256, size=N * KDIM * 2, dtype=np.uint8)


def make_weight(fmt: str, raw: np.ndarray, n: int = N, k: int = KDIM):
    """(data, scale, global_scale) of logical shape (n, k) in ``fmt`` from ``2 n k`` random
    bytes, all codes finite and normal-range (denormal float32 operands would take slow
    microcode paths and say nothing about the weight stream)."""
    g = np.random.default_rng(11)
    if fmt == "bf16":
        # Random sign and mantissa, exponent 126: values in +-[0.5, 1).
        w = raw.view(np.uint16).reshape(n, k) & np.uint16(0x807F)
        w |= np.uint16(0x3F00)
        return w, None, None
    if fmt.startswith("fp8"):
        # & 0x77: exponent <= 14 (E4M3) / <= 29 (E5M2), so no NaN or inf code.
        w = raw[: n * k].reshape(n, k) & np.uint8(0x77)
        return w, g.uniform(0.5, 2.0, size=n).astype(np.float32), None
    data = raw[: n * k // 2].reshape(n, k // 2).copy()
    if fmt == "mxfp4":
        return data, g.integers(120, 134, size=(n, k // 32), dtype=np.uint8), None
    return data, g.integers(0x30, 0x48, size=(n, k // 16), dtype=np.uint8), 0.25


def packed_bytes(data: np.ndarray, scale) -> int:
    return int(data.nbytes + (np.asarray(scale).nbytes if scale is not None else 0))


def reference_rows(fmt: str, data, scale, gs, rows: slice) -> np.ndarray:
    """Float64 dequantisation of a few rows (spot check that the timed kernel computes)."""
    import ml_dtypes

    d = data[rows]
    if fmt == "bf16":
        return (d.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if fmt.startswith("fp8"):
        return d.view(ml_dtypes.float8_e4m3fn).astype(np.float64) * scale[rows, None]
    mag = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6] * 2, dtype=np.float64)
    mag[8:] *= -1
    vals = np.empty((d.shape[0], 2 * d.shape[1]))
    vals[:, 0::2], vals[:, 1::2] = mag[d & 15], mag[d >> 4]
    if fmt == "mxfp4":
        return vals * np.repeat(2.0 ** (scale[rows].astype(np.float64) - 127), 32, axis=1)
    s = scale[rows].view(ml_dtypes.float8_e4m3fn).astype(np.float64) * gs
    return vals * np.repeat(s, 16, axis=1)


@pytest.mark.parametrize("fmt", GEMV_FORMATS)
def test_gemv_m1_weight_stream(benchmark, copy_bw, raw_bytes, fmt):
    data, scale, gs = make_weight(fmt, raw_bytes)
    x = np.random.default_rng(3).standard_normal((1, KDIM)).astype(np.float32)
    out = np.full((1, N), np.nan, dtype=np.float32)
    benchmark.pedantic(
        K.gemm, args=(x, fmt, data, scale, gs, out), rounds=7, iterations=1, warmup_rounds=1
    )
    ref = x.astype(np.float64) @ reference_rows(fmt, data, scale, gs, slice(0, 8)).T
    np.testing.assert_allclose(out[:, :8], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())

    nbytes = packed_bytes(data, scale)
    t_best, t_median = benchmark.stats.stats.min, benchmark.stats.stats.median
    gbps = nbytes / t_best / 1e9
    ceiling = copy_bw["max_gbps"]
    ratio = gbps / ceiling
    benchmark.extra_info.update(
        {
            "format": fmt,
            "shape": [N, KDIM],
            "weight_bytes": nbytes,
            "best_s": t_best,
            "median_s": t_median,
            "weight_gbps": gbps,
            "median_weight_gbps": nbytes / t_median / 1e9,
            "copy_gbps": ceiling,
            "ratio_to_copy": ratio,
        }
    )
    print(
        f"\nGEMV M=1 {fmt:9s} {N}x{KDIM}: {nbytes / 2**20:7.0f} MiB read in {t_best * 1e3:6.1f} ms"
        f" = {gbps:5.1f} GB/s (median {nbytes / t_median / 1e9:5.1f}); copy ceiling"
        f" {ceiling:5.1f} GB/s -> ratio {ratio:.2f}"
    )
    if fmt == "bf16":
        assert ratio >= BF16_MIN_RATIO, f"bf16 GEMV at {ratio:.2f} of copy bandwidth"


# -------------------------------------------------------------------------------- crossover

CROSS_N, CROSS_K = 8192, 8192  # 128 MiB as bf16: a large layer (llama-70B MLP is 28672x8192)
CROSS_MS = (1, 4, 8, 16, 32, 64, 128)


def _best_time(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@pytest.mark.parametrize("fmt", K.WEIGHT_KINDS)
def test_gemm_stream_vs_blas_crossover(benchmark, fmt):
    """Both GEMM paths at growing M; ``GEMM_BLAS_MIN_M`` should sit where BLAS starts winning."""
    g = np.random.default_rng(5)
    raw = g.integers(0, 256, size=CROSS_N * CROSS_K * 2, dtype=np.uint8)
    data, scale, gs = make_weight(fmt, raw, CROSS_N, CROSS_K)
    del raw
    rows = []
    for m in CROSS_MS:
        x = g.standard_normal((m, CROSS_K)).astype(np.float32)
        out = np.empty((m, CROSS_N), dtype=np.float32)
        t_s = _best_time(lambda x=x, out=out: K.gemm(x, fmt, data, scale, gs, out, path="stream"))
        t_b = _best_time(lambda x=x, out=out: K.gemm(x, fmt, data, scale, gs, out, path="blas"))
        rows.append(
            {
                "m": m,
                "stream_s": t_s,
                "blas_s": t_b,
                "stream_gflops": 2 * m * CROSS_N * CROSS_K / t_s / 1e9,
                "blas_gflops": 2 * m * CROSS_N * CROSS_K / t_b / 1e9,
            }
        )
    chosen = K.GEMM_BLAS_MIN_M[fmt]
    x = g.standard_normal((chosen, CROSS_K)).astype(np.float32)
    out = np.empty((chosen, CROSS_N), dtype=np.float32)
    benchmark.pedantic(K.gemm, args=(x, fmt, data, scale, gs, out), rounds=3, iterations=1)
    faster = [r["m"] for r in rows if r["blas_s"] < r["stream_s"]]
    benchmark.extra_info.update(
        {
            "format": fmt,
            "shape": [CROSS_N, CROSS_K],
            "rows": rows,
            "chosen_min_m": chosen,
            "blas_faster_from_m": faster[0] if faster else None,
        }
    )
    lines = [
        f"\n{fmt} {CROSS_N}x{CROSS_K} ({packed_bytes(data, scale) / 2**20:.0f} MiB): "
        f"M, stream ms, blas ms (GFLOP/s); auto path uses BLAS from M={chosen}"
    ]
    for r in rows:
        lines.append(
            f"  M={r['m']:4d}  stream {r['stream_s'] * 1e3:8.2f} ms "
            f"({r['stream_gflops']:6.1f})  blas {r['blas_s'] * 1e3:8.2f} ms "
            f"({r['blas_gflops']:6.1f})"
        )
    print("\n".join(lines))
