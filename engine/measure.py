"""One point: allocate, warm up, run a timed window, and turn windows into figures.

Timing protocol: run steps until ``warmup_s`` has passed (at least ``min_warmup_steps``),
then run steps back to back until ``duration_s`` has passed and at least ``min_steps``
steps were timed. Each step's window is stamped on the host monotonic clock (ns). When
only some distinct layers of the model were run, each step's time is scaled per layer
class: time outside layers + sum over classes of (time in that class's run layers x
layers of that class in the model / layers of that class run).
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

NO_POWER_REASON = "no power source: energy measurement is not implemented in this engine version"


@dataclass(frozen=True)
class Protocol:
    """How long to warm up and measure one point (seconds), and the step-count floors."""

    warmup_s: float = 1.0
    duration_s: float = 3.0
    min_warmup_steps: int = 1
    min_steps: int = 3


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


def measure_point(
    backend: Backend,
    plan: Plan,
    peaks: Peaks,
    protocol: Protocol,
    seed: int,
    progress: Callable[[str], None] = lambda msg: None,
) -> dict:
    """Run one point and return its record fields: timing, metrics, roofline, energy.

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
    try:
        progress(f"warming up {protocol.warmup_s:g} s")
        warm = _concat(_run_for(runner, protocol.warmup_s, protocol.min_warmup_steps, 0.01))
        guess = float(np.mean(warm.end_ns - warm.start_ns)) / 1e9
        progress(f"measuring {protocol.duration_s:g} s")
        windows = _concat(_run_for(runner, protocol.duration_s, protocol.min_steps, guess))
    finally:
        runner.close()

    measured_s = (windows.end_ns - windows.start_ns) / 1e9
    step_s = scaled_step_ns(plan, layers, windows) / 1e9
    steps = int(step_s.size)
    mean_step = float(step_s.mean())
    batch = plan.point.batch
    rl = roofline(plan, peaks)
    return {
        "timing": {
            "steps": steps,
            "window_s": float((windows.end_ns[-1] - windows.start_ns[0]) / 1e9),
            "step_time_s": _stats(step_s),
            "measured_step_time_s": _stats(measured_s),
            "scaled_from_layers": len(layers) < plan.spec.num_layers,
            "layers_run": len(layers),
            "layers_total": plan.spec.num_layers,
            "layer_indices_run": layers,
            "warmup_steps": int(warm.start_ns.size),
            "setup_s": setup_s,
            "memory_budget_bytes": budget,
            "memory_used_bytes": footprint,
            "clock": "host CLOCK_MONOTONIC, ns",
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
        "energy": {
            "energy_j": None,
            "energy_above_idle_j": None,
            "tokens_per_joule": None,
            "joules_per_token": None,
            "avg_power_w": None,
            "boundary": None,
            "reason": NO_POWER_REASON,
        },
    }
