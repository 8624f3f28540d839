"""One point: allocate, warm up to a steady state, run timed windows, attribute energy.

Protocol (docs/methodology.md states it for readers):

1. Warm up: run steps for at least ``warmup_s`` (and ``min_warmup_steps``). With a power
   source, keep warming up until the average power of the last two spans of
   ``steady_span_s`` (at least 5 sensor updates each) differs by less than
   ``steady_tolerance`` and the SM clock did not change between them, or until
   ``max_warmup_s`` (then the point is flagged ``not_steady``).
2. Measure: ``repetitions`` windows of back-to-back steps that together last at least
   ``duration_s`` and, with a power source, at least ``min_sensor_updates`` updates of
   each boundary's fastest source (``PowerSession.protocol_update_period_s``). Between windows the device pauses for a random 3 to 4 update periods:
   a sampling sensor then sees a different phase of the step in each window, and each
   pause is long enough for the sensor to see the idle level on its own, which the energy
   attribution needs to split the update spans that straddle a window edge.
3. Each step's window is stamped on the host monotonic clock (ns). When only some
   distinct layers were run, each step's time is scaled per layer class: time outside
   layers + sum over classes of (time in that class's run layers x layers of that class in
   the model / layers of that class run).

Under MPI (``dist`` given: one rank per device, ``engine.dist``) every rank runs the same
protocol on its shard in lock step: rank 0 makes every decision that depends on time or on
power (how many steps the next chunk runs, whether the warm-up is steady, how long to pause)
and broadcasts it, so that every rank runs the same number of steps and no collective is
left unmatched; the ranks pass a barrier (its exit time kept, for the skew) after setting up,
before each window and after the last one. Each rank then attributes its own sources'
energy over the spans of the windows common to all ranks (``engine.dist.sync``), with its
share of the batch as its tokens per step; rank 0 adds the ranks up
(``engine.dist.cluster``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from engine.backends.base import Backend, DoesNotFit, StepWindows
from engine.plan import Plan
from engine.roofline import Peaks, roofline
from engine.weights import layer_class, layer_footprint_bytes, select_layers

NO_POWER_REASON = "no power source on this machine (python -m engine.info says why)"
NOT_SAMPLED_HERE_REASON = (
    "no source of this rank's own: its node's sources are sampled once, by the node's first rank"
)


@dataclass(frozen=True)
class Protocol:
    """How long to warm up and measure one point (seconds), and the floors that make the
    measurement long enough for the step count and for the power sensors."""

    warmup_s: float = 1.0
    duration_s: float = 3.0
    min_warmup_steps: int = 1
    min_steps: int = 3
    repetitions: int = 4
    min_sensor_updates: int = 50
    steady_span_s: float = 0.5
    steady_tolerance: float = 0.02
    max_warmup_s: float = 30.0


def _stats(values_s: np.ndarray) -> dict:
    """Distribution of step times in seconds."""
    return {
        "mean": float(values_s.mean()),
        "median": float(np.median(values_s)),
        "p10": float(np.percentile(values_s, 10)),
        "p90": float(np.percentile(values_s, 90)),
        "std": float(values_s.std(ddof=1)) if values_s.size > 1 else None,
        "min": float(values_s.min()),
        "max": float(values_s.max()),
    }


def _concat(parts: list[StepWindows]) -> StepWindows:
    classes = set().union(*(p.class_ns for p in parts))
    return StepWindows(
        start_ns=np.concatenate([p.start_ns for p in parts]),
        end_ns=np.concatenate([p.end_ns for p in parts]),
        class_ns={
            c: np.concatenate(
                [p.class_ns.get(c, np.zeros(p.start_ns.size, np.int64)) for p in parts]
            )
            for c in classes
        },
        other_ns=np.concatenate([p.other_ns for p in parts]),
    )


def scaled_step_ns(plan: Plan, layers_run: list[int], windows: StepWindows) -> np.ndarray:
    """Per-step time of the whole model (ns) from the distinct layers that were run."""
    measured = (windows.end_ns - windows.start_ns).astype(np.float64)
    if len(layers_run) == plan.spec.num_layers:
        return measured
    total_per_class: dict[str, int] = {}
    for layer in range(plan.spec.num_layers):
        key = "/".join(layer_class(plan, layer))
        total_per_class[key] = total_per_class.get(key, 0) + 1
    run_per_class: dict[str, int] = {}
    for layer in layers_run:
        key = "/".join(layer_class(plan, layer))
        run_per_class[key] = run_per_class.get(key, 0) + 1
    scaled = windows.other_ns.astype(np.float64).copy()
    for key, ns in windows.class_ns.items():
        scaled += ns * (total_per_class[key] / run_per_class[key])
    return scaled


class _Ranks:
    """How the ranks of a point agree: rank 0 decides and the others follow. Without
    ``dist`` (one process) every call is local and nothing waits."""

    def __init__(self, dist=None) -> None:
        self.comm = None if dist is None else dist.groups.all
        self.barrier_exits_ns: list[int] = []

    def decide(self, choose: Callable[[], object]):
        """``choose()`` evaluated on rank 0, the same value on every rank."""
        if self.comm is None:
            return choose()
        return self.comm.bcast(choose() if self.comm.is_root else None)

    def every(self, value) -> list:
        """Every rank's ``value`` (index = rank), on every rank."""
        return [value] if self.comm is None else self.comm.allgather(value)

    def barrier(self, timeout_s: float | None = None) -> None:
        """Wait for every rank; keep the time this rank left (ns, host monotonic)."""
        if self.comm is not None:
            self.barrier_exits_ns.append(self.comm.barrier(timeout_s))


_LOCAL = _Ranks()


def _run_for(
    runner, seconds: float, min_steps: int, step_s_guess: float, ranks: _Ranks = _LOCAL
) -> list[StepWindows]:
    """Run chunks of steps until ``seconds`` have passed and ``min_steps`` were run (rank
    0's clock and step time decide every chunk)."""
    parts: list[StepWindows] = []
    done = 0
    t_end = time.monotonic() + seconds
    step_s = max(step_s_guess, 1e-6)

    def next_chunk() -> int:
        if not (done < min_steps or time.monotonic() < t_end):
            return 0
        remaining = max(t_end - time.monotonic(), 0.0)
        chunk = int(min(max(1, remaining / step_s / 4), 1000))
        return max(chunk, min_steps - done) if done < min_steps else chunk

    while True:
        chunk = ranks.decide(next_chunk)
        if not chunk:
            break
        part = runner.run_steps(chunk)
        parts.append(part)
        done += chunk
        step_s = float(np.mean(part.end_ns - part.start_ns)) / 1e9
    return parts


def _warm_up(
    runner, protocol: Protocol, power, progress, ranks: _Ranks = _LOCAL
) -> tuple[StepWindows, dict]:
    """Warm up for ``warmup_s``, then (with power) until power and clocks are steady (on
    every rank that has a power source: a rank without one has nothing to wait for)."""
    t_start = time.monotonic()
    parts = _run_for(runner, protocol.warmup_s, protocol.min_warmup_steps, 0.01, ranks)
    status = {"steady": None, "criterion": None, "warmup_s": None, "last_spans_power_w": None}
    active = power is not None and power.active
    own_period = (power.protocol_update_period_s() or 0.1) if active else 0.0
    periods = ranks.every(own_period)
    if any(periods):
        period = max(periods)
        span_s = max(protocol.steady_span_s, 5 * period)
        status["criterion"] = (
            f"mean power of two consecutive {span_s:.2f} s spans within "
            f"{100 * protocol.steady_tolerance:g}% and SM clock unchanged"
        )
        guess = float(np.mean(parts[-1].end_ns - parts[-1].start_ns)) / 1e9
        previous = None
        while True:
            clock_before = power.sm_clock_mhz() if active else None
            t0 = time.monotonic_ns()
            parts += _run_for(runner, span_s, 1, guess, ranks)
            p_w = power.recent_power_w(t0, time.monotonic_ns()) if active else None
            clock_after = power.sm_clock_mhz() if active else None
            steady = not active
            if active and p_w is None:
                # Nothing readable yet (a meter log whose clock is still unknown): no
                # power criterion to wait for; the time-based warm-up stands.
                steady = True
                status["criterion"] = "none: no power readable during warm-up"
            if previous is not None and p_w is not None and previous > 0:
                same_clock = power.clocks_agree(clock_before, clock_after)
                steady = abs(p_w - previous) / previous <= protocol.steady_tolerance and same_clock
            verdicts = ranks.every(steady)

            def verdict(verdicts=verdicts) -> str:
                if all(verdicts):
                    return "steady"
                return "timeout" if time.monotonic() - t_start >= protocol.max_warmup_s else ""

            decision = ranks.decide(verdict)
            if decision == "steady":
                status["steady"] = None if p_w is None and active else True
                status["last_spans_power_w"] = [previous, p_w]
                break
            if decision == "timeout":
                status["steady"] = False
                status["last_spans_power_w"] = [previous, p_w]
                progress(f"not steady after {protocol.max_warmup_s:g} s of warm-up; flagged")
                break
            previous = p_w
    status["warmup_s"] = time.monotonic() - t_start
    return _concat(parts), status


def _measure_windows(
    runner, protocol: Protocol, power, guess_s: float, seed: int, ranks: _Ranks = _LOCAL
) -> tuple[list[StepWindows], float]:
    """Run ``repetitions`` windows of back-to-back steps with random pauses between them;
    returns the windows and the total measured time they must reach (s). The slowest
    source of any rank sets the length and the pauses."""
    total_s = protocol.duration_s
    pause_max_s = 0.0
    own = power.protocol_update_period_s() if power is not None and power.active else None
    period = max((p for p in ranks.every(own) if p), default=None)
    if period:
        total_s = max(total_s, protocol.min_sensor_updates * period)
        pause_max_s = period
    reps = max(1, protocol.repetitions)
    steps_floor = -(-protocol.min_steps // reps)
    rng = np.random.default_rng(seed)
    windows = []
    for r in range(reps):
        if r and pause_max_s:
            pause_s = float(rng.uniform(3.0, 4.0)) * pause_max_s
            time.sleep(ranks.decide(lambda pause_s=pause_s: pause_s))
        ranks.barrier()
        windows.append(_concat(_run_for(runner, total_s / reps, steps_floor, guess_s, ranks)))
    ranks.barrier()
    return windows, total_s


def _agree_layers(ranks: _Ranks, layers: list[int]) -> list[int]:
    """The layers every rank runs: the same everywhere (collectives are per layer); when
    the ranks' memory budgets chose differently, the fewest (none if any rank fits none)."""
    chosen = ranks.every(layers)
    if any(not c for c in chosen):
        return []
    return min(chosen, key=len)


def measure_point(
    backend: Backend,
    plan: Plan,
    peaks: Peaks,
    protocol: Protocol,
    seed: int,
    progress: Callable[[str], None] = lambda msg: None,
    power=None,
    dist=None,
) -> dict:
    """Run one point and return its record fields: timing, metrics, roofline, energy.

    ``power`` is the sweep's ``engine.power.session.PowerSession`` (None: no power).
    ``dist`` (``engine.dist.PointContext``) when this is one rank of a multi-rank point:
    the record then credits the rank its share of the batch and carries a ``rank`` block
    (its collectives' time, barrier exits, windows) for rank 0 to merge.
    Raises DoesNotFit when not one layer of each class fits the backend's memory budget.
    """
    ranks = _Ranks(dist)
    budget = backend.memory_budget_bytes()
    layers = select_layers(plan, budget)
    if dist is not None:
        layers = _agree_layers(ranks, layers)
    if not layers:
        need = max(layer_footprint_bytes(plan, layer) for layer in range(plan.spec.num_layers))
        head = sum(op.weight_storage_bytes for op in plan.ops if op.layer == -1)
        raise DoesNotFit(
            f"embedding/LM head ({head / 1e9:.2f} GB) plus one layer of each kind (up to "
            f"{need / 1e9:.2f} GB each) exceed the memory budget of {budget / 1e9:.2f} GB; "
            "raise --memory-gb or pick a smaller precision"
        )
    footprint = sum(layer_footprint_bytes(plan, layer) for layer in layers)
    progress(f"allocating {len(layers)}/{plan.spec.num_layers} layers, {footprint / 1e9:.2f} GB")
    t0 = time.monotonic()
    if dist is None:
        runner = backend.prepare(plan, layers, seed)
    else:
        runner = backend.prepare(plan, layers, seed, comm=dist.groups)
    setup_s = time.monotonic() - t0
    if dist is not None:
        ranks.barrier(dist.setup_timeout_s)  # a long setup on one rank is not a failure
    state_before = power.device_state_now() if power is not None else None
    point_t0_ns = time.monotonic_ns()
    try:
        until_steady = " + until steady" if power is not None and power.active else ""
        progress(f"warming up {protocol.warmup_s:g} s{until_steady}")
        warm, steady = _warm_up(runner, protocol, power, progress, ranks)
        guess = float(np.mean(warm.end_ns - warm.start_ns)) / 1e9
        reps = max(1, protocol.repetitions)
        progress(f"measuring {reps} window(s)")
        comm_before_ns = getattr(runner, "comm_ns", None)
        parts, window_goal_s = _measure_windows(runner, protocol, power, guess, seed, ranks)
        comm_after_ns = getattr(runner, "comm_ns", None)
    finally:
        runner.close()
    state_after = power.device_state_now() if power is not None else None
    windows = _concat(parts)
    align_ns = float(getattr(runner, "clock_uncertainty_ns", 0.0))

    measured_s = (windows.end_ns - windows.start_ns) / 1e9
    step_s = scaled_step_ns(plan, layers, windows) / 1e9
    steps = int(step_s.size)
    mean_step = float(step_s.mean())
    batch = plan.point.batch if dist is None else dist.tokens_per_step
    rl = roofline(plan, peaks)
    rep_start = np.array([p.start_ns[0] for p in parts], np.int64)
    rep_end = np.array([p.end_ns[-1] for p in parts], np.int64)
    record = {
        "timing": {
            "steps": steps,
            "window_s": float(np.sum(rep_end - rep_start) / 1e9),
            "windows": int(rep_start.size),
            "window_goal_s": window_goal_s,
            "step_time_s": _stats(step_s),
            "measured_step_time_s": _stats(measured_s),
            "scaled_from_layers": len(layers) < plan.spec.num_layers,
            "layers_run": len(layers),
            "layers_total": plan.spec.num_layers,
            "layer_indices_run": layers,
            "warmup_steps": int(warm.start_ns.size),
            "warmup": steady,
            "setup_s": setup_s,
            "memory_budget_bytes": budget,
            "memory_used_bytes": footprint,
            "clock": "host CLOCK_MONOTONIC, ns",
            "clock_uncertainty_ns": align_ns,
        },
        "metrics": {
            "throughput_tok_s": batch / mean_step,
            "interactivity_tok_s_per_user": 1.0 / mean_step,
            "step_latency_s": mean_step,
            "roofline_fraction": rl.step_time_s / mean_step,
            "achieved_bw_gbps": plan.bytes / mean_step / 1e9,
            "achieved_tflops": plan.flops / mean_step / 1e12,
        },
        "roofline": rl.to_dict(),
    }
    if dist is not None:
        comm_s = None
        if comm_before_ns is not None and comm_after_ns is not None:
            comm_s = (comm_after_ns - comm_before_ns) / 1e9 / steps
        own_windows = [[int(a), int(b)] for a, b in zip(rep_start, rep_end)]
        rep_start, rep_end = _common_windows(ranks, dist, rep_start, rep_end, record["timing"])
        record["rank"] = {
            **dist.info,
            "tokens_per_step": batch,
            "comm_s_per_step": comm_s,
            "comm_is": "time in collectives per step (waiting for other ranks included), "
            "of the layers run",
            "busy_s_per_step": None if comm_s is None else float(measured_s.mean()) - comm_s,
            "barrier_exit_ns": ranks.barrier_exits_ns,
            "windows_ns": own_windows,
            "clock_offset_ns": list(dist.offsets[dist.groups.all.rank]),
        }
    if power is None or not power.active:
        from engine.power.session import null_energy

        reason = NO_POWER_REASON if power is None else power.why_inactive()
        if power is None and dist is not None and not dist.info.get("node_leader", True):
            reason = NOT_SAMPLED_HERE_REASON
        record["energy"], record["trace"], record["device_state"] = null_energy(reason), None, None
        return record
    energy, trace = power.energy_for_point(
        rep_start,
        rep_end,
        tokens_per_step=batch,
        step_s=mean_step,
        scaled_from_layers=len(layers) < plan.spec.num_layers,
        align_ns=align_ns,
        point_t0_ns=point_t0_ns,
    )
    state = power.summarize_state(state_before, state_after)
    if steady.get("steady") is False:
        energy["flags"].append("not_steady")
    if state and state.get("throttled"):
        energy["flags"].append("throttled: " + ",".join(state.get("reasons_seen") or []))
    if state and state.get("clock_changed"):
        energy["flags"].append("sm_clock_changed")
    if dist is not None and record["timing"].get("energy_windows") != "common to all ranks":
        energy["flags"].append("no common window: energy over this rank's own windows")
    record.update(energy=energy, trace=trace, device_state=state)
    return record


def _common_windows(ranks: _Ranks, dist, own_start, own_end, timing: dict):
    """The spans of the windows common to all ranks, on this rank's clock (ns); the rank's
    own windows when the ranks have none in common (``timing`` says which)."""
    from engine.dist.sync import common_windows, from_root_ns

    every = ranks.every((own_start.tolist(), own_end.tolist()))
    try:
        c0, c1 = common_windows([e[0] for e in every], [e[1] for e in every], dist.offsets)
    except ValueError as exc:
        timing["energy_windows"] = f"this rank's own ({exc})"
        return own_start, own_end
    offset = dist.offsets[dist.groups.all.rank][0]
    timing["energy_windows"] = "common to all ranks"
    timing["common_window_s"] = float((c1 - c0).sum()) / 1e9
    return from_root_ns(c0, offset), from_root_ns(c1, offset)
