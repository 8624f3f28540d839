"""Every CUDA kernel against its NumPy contract on a GPU (fresh random inputs, poisoned
outputs). Marked ``gpu``; skipped, with the reason, where no usable GPU, CuPy or nvmath is."""

from __future__ import annotations

import numpy as np
import pytest

from engine.backends import cuda_unavailable_reason
from engine.backends.cuda_check import correctness_cases

pytestmark = pytest.mark.gpu
REASON = cuda_unavailable_reason()
SEED = int(np.random.default_rng().integers(2**31))
# The case list depends only on the compute capability; build it for the newest, and skip
# what the device lacks at run time.
CASES = correctness_cases(SEED, cc=(10, 0))


@pytest.fixture(scope="module")
def harness():
    if REASON:
        pytest.skip(f"no GPU: {REASON}")
    from engine.backends.cuda import CudaBackend
    from engine.backends.cuda_check import Harness

    backend = CudaBackend()
    try:
        lt = backend.lt
    except Exception as exc:  # nvmath-python missing: kernels still run, cuBLASLt cases skip
        lt = None
        print(f"cuBLASLt unavailable: {exc}")
    return Harness(backend.kernels, lt), backend.caps.cc


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_kernel_matches_contract(harness, case):
    h, cc = harness
    if case.lt is not None:
        if h.lt is None:
            pytest.skip("nvmath-python (cuBLASLt bindings) is not installed")
        if case.lt.kind == "fp8" and cc < (8, 9):
            pytest.skip("FP8 GEMMs need sm_89+")
        if case.lt.kind == "fp4" and cc < (10, 0):
            pytest.skip("native FP4 GEMMs need sm_100+")
    row = h.run(case, SEED)
    assert row["ok"], f"seed={SEED}: {row['outputs']}"
