"""Whole decode steps on a GPU: equal to the CPU backend's for the same seed, and stamped
windows that are monotonic and lie inside the CUDA-event timing of the graph replays.
Marked ``gpu``; skipped, with the reason, where no usable GPU is."""

from __future__ import annotations

import numpy as np
import pytest

from engine.backends import cuda_unavailable_reason
from engine.backends.cpu import CpuRunner
from engine.backends.cuda_layout import step_variants
from engine.models import load_spec
from engine.plan import build_plan
from engine.point import Point
from engine.precision import parse_precision

pytestmark = pytest.mark.gpu
REASON = cuda_unavailable_reason()
# GPU activations are rounded to bf16 (the CPU backend keeps float32); FP8 re-rounding differs
# near ties.
TOL = {"bf16": 2e-2, "w4a16": 2e-2, "nvfp4-w4a16": 2e-2, "fp8": 8e-2}


@pytest.fixture(scope="module")
def backend():
    if REASON:
        pytest.skip(f"no GPU: {REASON}")
    from engine.backends.cuda import CudaBackend

    return CudaBackend()


def _plan(model, precision, batch, context=48):
    spec = load_spec(model)
    return spec, build_plan(spec, Point(spec.name, batch, context, parse_precision(precision)))


@pytest.mark.parametrize("model", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("precision", list(TOL))
@pytest.mark.parametrize("batch", [1, 9])
def test_step_equals_cpu_backend(backend, model, precision, batch):
    if precision == "fp8" and backend.caps.cc < (8, 9):
        pytest.skip("FP8 arithmetic needs sm_89+")
    spec, plan = _plan(model, precision, batch)
    layers = list(range(spec.num_layers))
    seed = int(np.random.default_rng().integers(2**31))
    runner = backend.prepare(plan, layers, seed)
    try:
        tokens, assignments = step_variants(plan, layers, seed)
        for v in (0, 1):
            a = assignments[v] if assignments else None
            got = runner.forward(tokens[v], a)
            want = CpuRunner(plan, layers, seed).forward(tokens[v], a)
            err = np.linalg.norm(got - want) / np.linalg.norm(want)
            assert np.isfinite(got).all() and err < TOL[precision], f"seed={seed}: {err:.2e}"
    finally:
        runner.close()


def test_stamps_are_monotonic_and_inside_event_timing(backend):
    spec, plan = _plan("tiny-moe", "bf16", 4, context=512)
    runner = backend.prepare(plan, list(range(spec.num_layers)), 3)
    try:
        win = runner.run_steps(50)
        events_ms = runner.last_events_ms
    finally:
        runner.close()
    assert (win.end_ns > win.start_ns).all()
    assert (win.start_ns[1:] >= win.end_ns[:-1]).all(), "steps overlap"
    span_ms = (win.end_ns[-1] - win.start_ns[0]) / 1e6
    # The stamps are taken inside the replays the events bracket (1 us timer granularity).
    assert span_ms <= sum(events_ms) + 2e-3
    assert span_ms >= 0.5 * sum(events_ms)
    total = sum(win.class_ns.values()) + win.other_ns
    assert np.array_equal(total, win.end_ns - win.start_ns) and (win.other_ns >= 0).all()
    assert runner.clock_uncertainty_ns < 1e6
