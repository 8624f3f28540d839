"""The kernels' shared ``__host__ __device__`` headers, compiled for the host and checked exactly.

``kernels/tests/host_driver.cpp`` runs the codecs (``kernels/tpj_codecs.cuh``) and the split-K
softmax merge (``kernels/tpj_softmax.cuh``) on the CPU; here its output is compared with
``engine/formats.py`` (every code of every format, and fresh random values for the encoders,
exact ties included) and with a float64 softmax. The driver is built with g++ and, where nvcc
is installed, also by nvcc as CUDA source (``-x cu``), which compiles the headers' CUDA
branch for the host.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from engine.backends.cuda_weights import block_scale_offsets
from engine.formats import decode_table, encode_bf16, encode_e2m1, encode_fp8

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "kernels" / "tests" / "host_driver.cpp"
COMPILERS = {
    "g++": lambda out: ["g++", "-O2", "-std=c++17", "-Wall", "-Werror", "-o", out, str(DRIVER)],
    "nvcc": lambda out: ["nvcc", "-x", "cu", "-O2", "-std=c++17", "-o", out, str(DRIVER)],
}


@pytest.fixture(scope="module", params=sorted(COMPILERS))
def driver(request, tmp_path_factory) -> Path:
    """The host driver built by one compiler (skipped when that compiler is absent)."""
    name = request.param
    if shutil.which(name) is None:
        pytest.skip(f"{name} is not installed, so the headers cannot be compiled with it")
    out = tmp_path_factory.mktemp(f"driver-{name}") / "host_driver"
    res = subprocess.run(COMPILERS[name](str(out)), capture_output=True, text=True)
    assert res.returncode == 0, f"{name} failed:\n{res.stderr[-3000:]}"
    return out


def _run(driver: Path, mode: str, payload: bytes = b"") -> bytes:
    res = subprocess.run([str(driver), mode], input=payload, capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    return res.stdout


def _same(got: np.ndarray, want: np.ndarray) -> bool:
    """Bitwise-equal floats, where any NaN equals any NaN."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    both_nan = np.isnan(got) & np.isnan(want)
    return bool(np.all(both_nan | (got.view(np.uint32) == want.view(np.uint32))))


def test_exact_decoders_match_formats_for_every_code(driver):
    out = np.frombuffer(_run(driver, "decode"), dtype=np.float32)
    sizes = {"e4m3": 256, "e5m2": 256, "e2m1": 16, "e8m0": 256, "bf16": 65536, "half": 65536}
    parts, pos = {}, 0
    for name, size in sizes.items():
        parts[name] = out[pos : pos + size]
        pos += size
    assert pos == out.size
    assert _same(parts["e4m3"], decode_table("fp8_e4m3"))
    assert _same(parts["e5m2"], decode_table("fp8_e5m2"))
    assert _same(parts["e2m1"], decode_table("e2m1"))
    assert _same(parts["e8m0"], decode_table("e8m0"))
    codes16 = np.arange(65536, dtype=np.uint16)
    assert _same(parts["bf16"], codes16.view(ml_dtypes.bfloat16).astype(np.float32))
    assert _same(parts["half"], codes16.view(np.float16).astype(np.float32))


def _midpoints(table: np.ndarray) -> np.ndarray:
    """Exact ties between neighbouring finite values of a decode table (both signs)."""
    vals = np.unique(np.abs(table[np.isfinite(table)]).astype(np.float64))
    mids = (vals[1:] + vals[:-1]) / 2
    mids = mids[mids == mids.astype(np.float32)]  # keep ties representable in float32
    return np.concatenate([mids, -mids]).astype(np.float32)


def _encode_inputs(rng: np.random.Generator) -> np.ndarray:
    """Fresh values over every range the encoders see, plus exact ties and edge cases."""
    parts = [
        rng.standard_normal(4000) * np.exp2(rng.integers(-20, 20, 4000)),
        rng.uniform(-600, 600, 2000),
        rng.uniform(-7, 7, 2000),
        rng.uniform(-70000, 70000, 1000),
        _midpoints(decode_table("fp8_e4m3")),
        _midpoints(decode_table("fp8_e5m2")),
        _midpoints(decode_table("e2m1")),
        np.array([0.0, -0.0, 448, -448, 449, 464, 480, 1e30, -1e30, 6, 6.5, -7, 57344, 61440]),
        np.array([2.0**-9, 2.0**-10, 3 * 2.0**-11, 2.0**-16, 2.0**-17, 1e-40, -1e-40]),
    ]
    x = np.concatenate([np.asarray(p, dtype=np.float32) for p in parts])
    return rng.permutation(x)


def test_encoders_round_like_formats(driver):
    seed = int(np.random.default_rng().integers(2**31))
    x = _encode_inputs(np.random.default_rng(seed))
    payload = np.int32(x.size).tobytes() + x.tobytes()
    raw = _run(driver, "encode", payload)
    n = x.size
    e4 = np.frombuffer(raw, np.uint8, n, 0)
    e5 = np.frombuffer(raw, np.uint8, n, n)
    e2 = np.frombuffer(raw, np.uint8, n, 2 * n)
    bf = np.frombuffer(raw, np.uint16, n, 3 * n)
    for name, got, want in (
        ("e4m3", e4, encode_fp8(x, "fp8_e4m3")),
        ("e5m2", e5, encode_fp8(x, "fp8_e5m2")),
        ("e2m1", e2, encode_e2m1(x)),
        ("bf16", bf, encode_bf16(x)),
    ):
        bad = np.flatnonzero(got != want)
        assert bad.size == 0, (
            f"{name} seed={seed}: {bad.size} mismatches, e.g. x={x[bad[0]]!r} "
            f"got {got[bad[0]]:#x} want {want[bad[0]]:#x}"
        )


def test_bf16_encoder_keeps_nan_and_overflows_to_inf(driver):
    x = np.array([np.nan, -np.nan, 3.4e38, -3.4e38], dtype=np.float32)
    raw = _run(driver, "encode", np.int32(x.size).tobytes() + x.tobytes())
    bf = np.frombuffer(raw, np.uint16, x.size, 3 * x.size).view(ml_dtypes.bfloat16)
    vals = bf.astype(np.float32)
    assert np.isnan(vals[:2]).all()
    assert vals[2] == np.inf and vals[3] == -np.inf


def test_packed_half_trick_decoders(driver):
    seed = int(np.random.default_rng().integers(2**31))
    rng = np.random.default_rng(seed)
    words = rng.integers(0, 2**32, size=3000, dtype=np.uint64).astype(np.uint32)
    words[:256] = np.arange(256, dtype=np.uint32) * 0x01010101  # every byte code in every lane
    raw = _run(driver, "packed", np.int32(words.size).tobytes() + words.tobytes())
    out = np.frombuffer(raw, np.uint32).reshape(words.size, 8)
    halves = out.view(np.uint16).reshape(words.size, 8, 2).view(np.float16).astype(np.float32)
    nibbles = (words[:, None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF
    e2m1 = decode_table("e2m1")
    for j in range(4):
        want = np.stack([e2m1[nibbles[:, j]], e2m1[nibbles[:, j + 4]]], axis=1)
        assert _same(halves[:, j] * np.float32(2.0**14), want), f"e2m1 pair {j} seed={seed}"
    byts = words.view(np.uint8).reshape(words.size, 4)
    e4m3, e5m2 = decode_table("fp8_e4m3"), decode_table("fp8_e5m2")
    for h in range(2):
        codes = byts[:, 2 * h : 2 * h + 2]
        finite = (codes & 0x7F) != 0x7F
        got = halves[:, 4 + h] * np.float32(256.0)
        assert _same(got[finite], e4m3[codes][finite]), f"e4m3 half {h} seed={seed}"
        assert _same(halves[:, 6 + h], e5m2[codes]), f"e5m2 half {h} seed={seed}"


@pytest.mark.parametrize("trial", range(3))
def test_split_softmax_merge_matches_float64(driver, trial):
    seed = int(np.random.default_rng().integers(2**31))
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    d = int(rng.integers(1, 40))
    chunks = int(rng.integers(1, 12))
    cuts = np.sort(rng.integers(0, n + 1, size=chunks - 1))  # empty chunks happen
    bounds = np.concatenate([[0], cuts, [n]]).astype(np.int32)
    s = (rng.standard_normal(n) * rng.uniform(0.5, 20)).astype(np.float32)
    v = rng.standard_normal((n, d)).astype(np.float32)
    payload = (
        np.array([n, d, chunks], np.int32).tobytes() + bounds.tobytes() + s.tobytes() + v.tobytes()
    )
    out = np.frombuffer(_run(driver, "softmax", payload), np.float32).reshape(2, d)
    p = np.exp2(s.astype(np.float64) - s.max())
    want = (p / p.sum()) @ v.astype(np.float64)
    for label, got in zip(("pairwise", "weights"), out):
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert err < 1e-5, f"{label} seed={seed} n={n} d={d} chunks={chunks}: {err:.2e}"


def test_block_scale_layout_matches_cublaslt_examples_and_python(driver):
    rng = np.random.default_rng()
    rows, groups = int(rng.integers(1, 300)), int(rng.integers(1, 40))
    raw = _run(driver, "scales", np.array([rows, groups], np.int32).tobytes())
    got = np.frombuffer(raw, np.uint32).reshape(rows, groups)
    assert np.array_equal(got, block_scale_offsets(rows, groups)), (rows, groups)
    # Every scale lands in its own byte of the padded (128-row, 4-group) tiles.
    padded = -(-rows // 128) * 128 * (-(-groups // 4) * 4)
    assert np.unique(got).size == got.size and got.max() < padded
    # The examples of nvmath-python's get_block_scale_offset docs: NVFP4 operand 128 x 128.
    ref = np.frombuffer(_run(driver, "scales", np.array([128, 8], np.int32).tobytes()), np.uint32)
    assert ref.reshape(128, 8)[5, 2] == 82 and ref.reshape(128, 8)[5, 5] == 593
