"""GPU benchmarks (pytest-benchmark; skipped without a GPU): a decode step of Llama-3.1-8B at
B=1 (memory-bound: the plan's bytes over the measured copy bandwidth), the FP4 weight-only
GEMV at B=1 (packed bytes over copy bandwidth), and graph launch cost per node. Each prints
its figures; ``engine.selftest`` reports the same quantities in its table."""

from __future__ import annotations

import numpy as np
import pytest

from engine.backends import cuda_unavailable_reason

REASON = cuda_unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no GPU: {REASON}")


@pytest.fixture(scope="module")
def backend():
    from engine.backends.cuda import CudaBackend

    b = CudaBackend()
    b.copy_bw = b.copy_bandwidth_gbps()
    print(f"\ncopy bandwidth (read + write): {b.copy_bw:.0f} GB/s")
    return b


@pytest.mark.parametrize("precision", ["bf16", "w4a16"])
def test_bench_decode_step_b1(benchmark, backend, precision):
    from engine.measure import scaled_step_ns
    from engine.models import load_spec
    from engine.plan import build_plan
    from engine.point import Point
    from engine.precision import parse_precision
    from engine.weights import select_layers

    spec = load_spec("llama-3.1-8b")
    plan = build_plan(spec, Point(spec.name, 1, 1024, parse_precision(precision)))
    layers = select_layers(plan, 8e9)
    runner = backend.prepare(plan, layers, 0)
    try:
        runner.run_steps(5)
        win = benchmark(runner.run_steps, 20)
    finally:
        runner.close()
    step_s = float(np.median(scaled_step_ns(plan, layers, win))) / 1e9
    frac = plan.bytes / step_s / 1e9 / backend.copy_bw
    print(
        f"\nllama-3.1-8b {precision} B=1 ({len(layers)}/{spec.num_layers} layers, scaled): "
        f"{step_s * 1e3:.2f} ms/step, {plan.bytes / step_s / 1e9:.0f} GB/s = {frac:.2f} of copy"
    )


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_bench_fp4_gemv_b1(benchmark, backend, fmt):
    from engine.backends.cuda_check import Harness, case_gemm

    case = case_gemm("gemv", fmt, 28672, 4096, 1, seed=1)
    harness = Harness(backend.kernels)
    row = benchmark.pedantic(
        harness.run, args=(case, 1), kwargs={"timed": True, "check": False}, rounds=1
    )
    print(
        f"\nFP4 GEMV {fmt} 28672x4096 B=1: {row['time_s'] * 1e6:.1f} us, {row['gbps']:.0f} GB/s "
        f"= {row['gbps'] / backend.copy_bw:.2f} of copy"
    )


def test_bench_graph_node_cost(benchmark, backend):
    cp = backend.cp
    stream = cp.cuda.Stream(non_blocking=True)
    timer = cp.cuda.Memory(64)
    n = 400
    stream.begin_capture()
    for _ in range(n):
        backend.kernels.launch("tpj_read_globaltimer", (1,), 32, [timer.ptr, 0], stream)
    graph = stream.end_capture()

    def replay():
        graph.launch(stream)
        stream.synchronize()

    benchmark(replay)
    per_us = benchmark.stats.stats.median / n * 1e6
    print(f"\ngraph of {n} tiny kernels: {per_us:.2f} us per node (host sync included)")
