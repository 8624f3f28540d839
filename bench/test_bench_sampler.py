"""The sampler's cost to the workload, and the polling rates it achieves on this machine.

Run with ``python -m pytest bench/test_bench_sampler.py -q -s`` (not part of the default test
run). (1) The CPU backend's decode throughput (llama-3.1-8b, B=1, L=1024, BF16, 1 GB budget)
with sampling off, in a thread, and in a child process, in the same run: trials of
``STEPS`` steps, the three modes in a shuffled order in each of ``ROUNDS`` rounds, so that slow
drifts of the machine fall on all modes alike; the change is the median over rounds of each
round's on/off ratio. The sampled source is a fake whose value changes every 1 ms, polled at
1 kHz. (2) Polls per second achieved against those asked, per source, for fake sources of
known update period and for whatever real source ``engine.power`` discovers.
"""

from __future__ import annotations

import os
import random
import time

import numpy as np
import pytest

from engine.power.base import PowerSource, SourceInfo
from engine.power.sampler import Sampler, default_poll_interval_s

STEPS = 20  # ~0.9 s per trial on the 2-core dev VM
ROUNDS = 10
SETTLE_S = 0.2  # after start, so the sampler's start-up is not in the timed trial
#: (mode, poll interval s): 1 kHz as asked of the bench, 100/s the default for a 100 ms sensor.
CONFIGS = (
    ("off", None),
    ("thread", 1e-3),
    ("process", 1e-3),
    ("thread", 1e-2),
    ("process", 1e-2),
)
RATE_SECONDS = 2.0


class TickSource(PowerSource):
    """A cumulative 'energy' that advances by 1 every ``step_ns`` of the host monotonic clock."""

    def __init__(self, step_ns: int = 1_000_000, name: str = "tick-1ms") -> None:
        self.step_ns = step_ns
        self.info = SourceInfo(
            name=name, boundary="node", quantity="energy", update_period_s=step_ns * 1e-9
        )

    def read(self) -> tuple[int, float]:
        t_ns = time.monotonic_ns()
        return t_ns, float(t_ns // self.step_ns)


class ReplaySource(PowerSource):
    """Replays a power trace (W) that steps every ``period_s``, like a 100 ms sensor."""

    def __init__(self, period_s: float = 0.1, name: str = "replay-100ms") -> None:
        rng = np.random.default_rng(5)
        self.period_ns = round(period_s * 1e9)
        self.trace_w = rng.uniform(100.0, 700.0, size=4096)
        self.origin_ns = time.monotonic_ns()
        self.info = SourceInfo(
            name=name, boundary="gpu-board", quantity="power", update_period_s=period_s
        )

    def read(self) -> tuple[int, float]:
        t_ns = time.monotonic_ns()
        i = (t_ns - self.origin_ns) // self.period_ns
        return t_ns, float(self.trace_w[i % self.trace_w.size])


class UnknownPeriodSource(TickSource):
    """A tick source that does not state its update period."""

    def __init__(self) -> None:
        super().__init__(step_ns=2_000_000, name="tick-unknown-period")
        self.info = SourceInfo(name=self.info.name, boundary="node", quantity="energy")


@pytest.fixture(scope="module")
def runner():
    from engine.backends.cpu import CpuBackend
    from engine.models import load_spec
    from engine.plan import build_plan
    from engine.point import Point
    from engine.precision import parse_precision
    from engine.weights import select_layers

    plan = build_plan(
        load_spec("llama-3.1-8b"),
        Point(model="llama-3.1-8b", batch=1, context=1024, precision=parse_precision("bf16")),
    )
    backend = CpuBackend(memory_budget_gb=1.0)
    layers = select_layers(plan, backend.memory_budget_bytes())
    r = backend.prepare(plan, layers, seed=0)
    r.run_steps(5)  # compile and touch every page before timing
    print(f"\nworkload: llama-3.1-8b B=1 L=1024 bf16, layers run {layers} (+ embedding/LM head)")
    yield r
    r.close()


def _trial(runner, mode: str, poll_s: float | None) -> tuple[float, float, dict | None]:
    """Sampling ``mode`` at ``poll_s`` during STEPS decode steps: steps/s over the trial,
    steps/s from the median step time (robust to a burst of other load), sampler stats."""
    sampler = None
    if mode != "off":
        src = TickSource() if mode == "thread" else TickSource
        sampler = Sampler([src], poll_interval_s=poll_s, mode=mode).start()
        time.sleep(SETTLE_S)
    t0 = time.perf_counter()
    windows = runner.run_steps(STEPS)
    rate = STEPS / (time.perf_counter() - t0)
    median_rate = 1e9 / float(np.median(windows.end_ns - windows.start_ns))
    if sampler is None:
        return rate, median_rate, None
    sampler.stop()
    return rate, median_rate, sampler.stats()


def test_sampler_overhead_on_cpu_workload(benchmark, runner):
    order_rng = random.Random(1)
    rates: dict[tuple, list[float]] = {c: [] for c in CONFIGS}
    median_rates: dict[tuple, list[float]] = {c: [] for c in CONFIGS}
    stats: dict[tuple, list[dict]] = {c: [] for c in CONFIGS if c[0] != "off"}

    def experiment() -> None:
        for _ in range(ROUNDS):
            configs = list(CONFIGS)
            order_rng.shuffle(configs)
            for config in configs:
                rate, median_rate, st = _trial(runner, *config)
                rates[config].append(rate)
                median_rates[config].append(median_rate)
                if st is not None:
                    stats[config].append(st)

    load_before = os.getloadavg()[0]
    benchmark.pedantic(experiment, rounds=1, iterations=1)
    load_after = os.getloadavg()[0]
    off = np.array(rates[("off", None)])
    off_med = np.array(median_rates[("off", None)])
    print(
        f"\nsampler overhead: {ROUNDS} rounds x {STEPS} steps per trial, 1 ms tick source; "
        f"1-min load average {load_before:.2f} before, {load_after:.2f} after on "
        f"{os.cpu_count()} CPUs (other load blurs these figures); change = median over rounds "
        "of the round's on/off ratio; 'median step' = 1 / median step time"
    )
    print(
        f"  off                  {np.median(off):6.2f} steps/s (IQR {_iqr(off):.2f}), median "
        f"step {np.median(off_med):6.2f}/s (IQR {_iqr(off_med):.2f})"
    )
    for config in CONFIGS[1:]:
        mode, poll_s = config
        on = np.array(rates[config])
        on_med = np.array(median_rates[config])
        change = on / off - 1.0  # paired by round
        change_med = on_med / off_med - 1.0
        src = [s["sources"][0] for s in stats[config]]
        polls = np.median([s["polls_per_s"] for s in src])
        missed = int(sum(s["missed_polls"] for s in src))
        p99_ms = np.median([s["interval_p99_s"] for s in src]) * 1e3
        cpu = np.median([s["cpu_fraction"] for s in stats[config]])
        label = f"{mode} @ {1 / poll_s:.0f}/s"
        print(
            f"  {label:20s} {np.median(on):6.2f} steps/s, change {100 * np.median(change):+.2f} "
            f"% (IQR {100 * _iqr(change):.2f} pp); median step {np.median(on_med):6.2f}/s, "
            f"change {100 * np.median(change_med):+.2f} % (IQR {100 * _iqr(change_med):.2f} pp)"
            f"\n  {'':20s} sampler: {polls:.0f} polls/s, {missed} missed, p99 interval "
            f"{p99_ms:.2f} ms, CPU {100 * cpu:.1f} % of a core ({stats[config][0]['cpu_scope']})"
        )
        benchmark.extra_info[label] = {
            "steps_per_s_median": float(np.median(on)),
            "change_median": float(np.median(change)),
            "change_iqr": float(_iqr(change)),
            "median_step_change_median": float(np.median(change_med)),
            "median_step_change_iqr": float(_iqr(change_med)),
            "polls_per_s_median": float(polls),
            "missed_polls": missed,
            "interval_p99_ms_median": float(p99_ms),
            "cpu_fraction_median": float(cpu),
        }
    benchmark.extra_info["off_steps_per_s_median"] = float(np.median(off))
    benchmark.extra_info["load_average_1min"] = [load_before, load_after]


def _iqr(x: np.ndarray) -> float:
    q1, q3 = np.percentile(x, [25, 75])
    return float(q3 - q1)


def _print_rates(label: str, st: dict) -> None:
    print(f"  {label}: sampler CPU {100 * (st['cpu_fraction'] or 0):.1f} % ({st['cpu_scope']})")
    for s in st["sources"]:
        print(
            f"    {s['name']:22s} asked {s['asked_polls_per_s']:7.1f}/s achieved "
            f"{s['polls_per_s']:7.1f}/s ({100 * s['polls_per_s'] / s['asked_polls_per_s']:.1f} %),"
            f" interval mean {s['interval_mean_s'] * 1e3:.3f} ms p99 "
            f"{s['interval_p99_s'] * 1e3:.3f} ms, read {s['read_mean_s'] * 1e6:.1f} us, "
            f"missed {s['missed_polls']}, errors {s['errors']}"
        )


def test_achieved_sampling_rates(benchmark):
    def experiment() -> dict:
        out = {}
        for mode in ("thread", "process"):
            if mode == "thread":
                sources = [TickSource(), ReplaySource(), UnknownPeriodSource()]
            else:
                sources = [TickSource, ReplaySource, UnknownPeriodSource]
            with Sampler(sources, mode=mode) as sampler:
                time.sleep(RATE_SECONDS)
            out[mode] = sampler.stats()
        return out

    result = benchmark.pedantic(experiment, rounds=1, iterations=1)
    defaults = {
        s.info.name: default_poll_interval_s(s.info)
        for s in (TickSource(), ReplaySource(), UnknownPeriodSource())
    }
    print(f"\nachieved polling rates, default intervals {defaults} (s), {RATE_SECONDS} s idle:")
    for mode, st in result.items():
        _print_rates(mode, st)
        benchmark.extra_info[mode] = {
            s["name"]: {"asked": s["asked_polls_per_s"], "achieved": s["polls_per_s"]}
            for s in st["sources"]
        }

    try:
        from engine.power.discover import discover_sources
    except ImportError as exc:
        print(f"  real sources: engine.power.discover is not available ({exc})")
        return
    sources, reasons = discover_sources("auto")
    if not sources:
        print("  real sources: none discovered here: " + "; ".join(reasons))
        return
    with Sampler(sources, mode="thread") as sampler:
        time.sleep(RATE_SECONDS)
    for src in sources:
        src.close()
    _print_rates("real sources, thread", sampler.stats())


def _hold_gil_s(seconds: float) -> int:
    """Pure-Python work that holds the GIL for ``seconds`` (released only at switch points)."""
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1
    return n


def test_polling_under_gil_holding_workload(benchmark):
    """Why process mode exists: a workload that holds the GIL delays a sampling thread (it gets
    the GIL back only every sys.getswitchinterval()), not a sampling process."""
    import sys

    def experiment() -> dict:
        out = {}
        for mode in ("thread", "process"):
            src = TickSource() if mode == "thread" else TickSource
            with Sampler([src], poll_interval_s=1e-3, mode=mode) as sampler:
                time.sleep(SETTLE_S)
                _hold_gil_s(RATE_SECONDS)
            out[mode] = sampler.stats()
        return out

    result = benchmark.pedantic(experiment, rounds=1, iterations=1)
    print(
        f"\npolling at 1000/s while the main thread runs Python code for {RATE_SECONDS} s "
        f"(switch interval {sys.getswitchinterval() * 1e3:.1f} ms):"
    )
    for mode, st in result.items():
        _print_rates(mode, st)
        s = st["sources"][0]
        benchmark.extra_info[mode] = {
            "polls_per_s": s["polls_per_s"],
            "interval_p99_ms": s["interval_p99_s"] * 1e3,
        }
