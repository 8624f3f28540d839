"""One point: allocate, warm up to a steady state, run timed windows, attribute energy.

Protocol (docs/methodology.md states it for readers):

1. Warm up: run steps for at least ``warmup_s`` (and ``min_warmup_steps``). With a power
   source, keep warming up until the average power of the last two spans of
   ``steady_span_s`` (at least 5 sensor updates each) differs by less than
   ``steady_tolerance`` and the SM clock did not change between them, or until
   ``max_warmup_s`` (then the point is flagged ``not_steady``).
2. Measure: ``repetitions`` windows of back-to-back steps that together last at least
   ``duration_s`` and, with a power source, at least ``min_sensor_updates`` updates of the
   slowest source. Between windows the device pauses for a random 3 to 4 update periods:
   a sampling sensor then sees a different phase of the step in each window, and each
   pause is long enough for the sensor to see the idle level on its own, which the energy
   attribution needs to split the update spans that straddle a window edge.
3. Each step's window is stamped on the host monotonic clock (ns). When only some
   distinct layers were run, each step's time is scaled per layer class: time outside
   layers + sum over classes of (time in that class's run layers x layers of that class in
   the model / layers of that class run).
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


def _run_for(runner, seconds: float, min_steps: int, step_s_guess: float) -> list[StepWindows]:
    """Run chunks of steps until ``seconds`` have passed and ``min_steps`` were run."""
    parts: list[StepWindows] = []
    done = 0
    t_end = time.monotonic() + seconds
    step_s = max(step_s_guess, 1e-6)
    while done < min_steps or time.monotonic() < t_end:
        remaining = max(t_end - time.monotonic(), 0.0)
        chunk = int(min(max(1, remaining / step_s / 4), 1000))
        chunk = max(chunk, min_steps - done) if done < min_steps else chunk
        part = runner.run_steps(chunk)
        parts.append(part)
        done += chunk
        step_s = float(np.mean(part.end_ns - part.start_ns)) / 1e9
    return parts


def _warm_up(runner, protocol: Protocol, power, progress) -> tuple[StepWindows, dict]:
    """Warm up for ``warmup_s``, then (with power) until power and clocks are steady."""
    t_start = time.monotonic()
    parts = _run_for(runner, protocol.warmup_s, protocol.min_warmup_steps, 0.01)
    status = {"steady": None, "criterion": None, "warmup_s": None, "last_spans_power_w": None}
    if power is not None and power.active:
        period = power.slowest_update_period_s() or 0.1
        span_s = max(protocol.steady_span_s, 5 * period)
        status["criterion"] = (
            f"mean power of two consecutive {span_s:.2f} s spans within "
            f"{100 * protocol.steady_tolerance:g}% and SM clock unchanged"
        )
        guess = float(np.mean(parts[-1].end_ns - parts[-1].start_ns)) / 1e9
        previous = None
        while True:
            clock_before = power.sm_clock_mhz()
            t0 = time.monotonic_ns()
            parts += _run_for(runner, span_s, 1, guess)
            p_w = power.recent_power_w(t0, time.monotonic_ns())
            clock_after = power.sm_clock_mhz()
            if previous is not None and p_w is not None and previous > 0:
                same_clock = clock_before == clock_after
                if abs(p_w - previous) / previous <= protocol.steady_tolerance and same_clock:
                    status["steady"] = True
                    status["last_spans_power_w"] = [previous, p_w]
                    break
            if time.monotonic() - t_start >= protocol.max_warmup_s:
                status["steady"] = False
                status["last_spans_power_w"] = [previous, p_w]
                progress(f"not steady after {protocol.max_warmup_s:g} s of warm-up; flagged")
                break
            previous = p_w
    status["warmup_s"] = time.monotonic() - t_start
    return _concat(parts), status


def _measure_windows(
    runner, protocol: Protocol, power, guess_s: float, seed: int
) -> tuple[list[StepWindows], float]:
    """Run ``repetitions`` windows of back-to-back steps with random pauses between them;
    returns the windows and the total measured time they must reach (s)."""
    total_s = protocol.duration_s
    pause_max_s = 0.0
    if power is not None and power.active:
        period = power.slowest_update_period_s()
        if period:
            total_s = max(total_s, protocol.min_sensor_updates * period)
            pause_max_s = period
    reps = max(1, protocol.repetitions)
    steps_floor = -(-protocol.min_steps // reps)
    rng = np.random.default_rng(seed)
    windows = []
    for r in range(reps):
        if r and pause_max_s:
            time.sleep(float(rng.uniform(3.0, 4.0)) * pause_max_s)
        windows.append(_concat(_run_for(runner, total_s / reps, steps_floor, guess_s)))
    return windows, total_s


def measure_point(
    backend: Backend,
    plan: Plan,
    peaks: Peaks,
    protocol: Protocol,
    seed: int,
    progress: Callable[[str], None] = lambda msg: None,
    power=None,
) -> dict:
    """Run one point and return its record fields: timing, metrics, roofline, energy.

    ``power`` is the sweep's ``engine.power.session.PowerSession`` (None: no power).
    Raises DoesNotFit when not one layer of each class fits the backend's memory budget.
    """
    budget = backend.memory_budget_bytes()
    layers = select_layers(plan, budget)
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
    runner = backend.prepare(plan, layers, seed)
    setup_s = time.monotonic() - t0
    state_before = power.device_state_now() if power is not None else None
    point_t0_ns = time.monotonic_ns()
    try:
        progress(f"warming up {protocol.warmup_s:g} s" + (" + until steady" if power else ""))
        warm, steady = _warm_up(runner, protocol, power, progress)
        guess = float(np.mean(warm.end_ns - warm.start_ns)) / 1e9
        reps = max(1, protocol.repetitions)
        progress(f"measuring {reps} window(s)")
        parts, window_goal_s = _measure_windows(runner, protocol, power, guess, seed)
    finally:
        runner.close()
    state_after = power.device_state_now() if power is not None else None
    windows = _concat(parts)
    align_ns = float(getattr(runner, "clock_uncertainty_ns", 0.0))

    measured_s = (windows.end_ns - windows.start_ns) / 1e9
    step_s = scaled_step_ns(plan, layers, windows) / 1e9
    steps = int(step_s.size)
    mean_step = float(step_s.mean())
    batch = plan.point.batch
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
    if power is None or not power.active:
        from engine.power.session import null_energy

        reason = NO_POWER_REASON if power is None else power.why_inactive()
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
    record.update(energy=energy, trace=trace, device_state=state)
    return record
