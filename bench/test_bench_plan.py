"""Plan construction speed: the largest preset at 64 batch sizes (aim: well under 1 s)."""

from __future__ import annotations

from engine.models import load_spec
from engine.plan import build_plan
from engine.point import Point
from engine.precision import parse_precision


def test_plan_64_batch_sizes_largest_preset(benchmark):
    spec = load_spec("deepseek-v3")
    precision = parse_precision("fp8")

    def build_all():
        return [
            build_plan(spec, Point(model=spec.name, batch=b, context=4096, precision=precision))
            for b in range(1, 65)
        ]

    plans = benchmark.pedantic(build_all, rounds=5, iterations=1)
    ops = sum(len(p.ops) for p in plans)
    seconds = benchmark.stats.stats.mean
    benchmark.extra_info.update({"plans": len(plans), "ops": ops, "seconds": seconds})
    print(
        f"\n64 plans of {spec.name}: {ops} ops in {seconds * 1e3:.1f} ms "
        f"({seconds / ops * 1e6:.2f} us per op)"
    )
