"""Comparison of runs: ratios along frontiers and the provenance that makes them fair or not.

Two series of the same model and context (device A vs device B, or precision vs precision)
are compared where both frontiers were measured: over the overlap of their interactivity
ranges, never beyond either. Beside the ratio the report shows each run's driver, clocks,
power limit, throttling and engine commit, so that an unfair comparison is visible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.report_frontier import Frontier
from engine.report_records import PointView, get, num


@dataclass(frozen=True)
class Ratio:
    """``other / baseline`` of a metric along interactivity: dense samples for drawing
    (``xs``, ``ratios``), the ratio at every measured knot of either frontier inside the
    overlap (``knots``), or None and ``reason`` when the ranges do not overlap."""

    overlap: tuple[float, float] | None
    xs: list[float]
    ratios: list[float]
    knots: list[tuple[float, float]]
    reason: str | None = None


def ratio_along(baseline: Frontier, other: Frontier, samples: int = 60) -> Ratio:
    """The ratio ``other / baseline`` over the overlap of the two frontiers' x ranges."""
    lo = max(baseline.xs[0], other.xs[0])
    hi = min(baseline.xs[-1], other.xs[-1])
    if lo > hi:
        return Ratio(
            None,
            [],
            [],
            [],
            f"interactivity ranges do not overlap ({baseline.xs[0]:.4g}..{baseline.xs[-1]:.4g} "
            f"vs {other.xs[0]:.4g}..{other.xs[-1]:.4g} tok/s/user)",
        )
    if hi == lo:
        grid = [lo]
    elif hi / lo > 20:
        grid = [lo * (hi / lo) ** (i / (samples - 1)) for i in range(samples)]
    else:
        grid = [lo + (hi - lo) * i / (samples - 1) for i in range(samples)]
    grid[-1] = hi  # no rounding past the last measured point
    knots_x = sorted({x for x in baseline.xs + other.xs if lo <= x <= hi})
    xs, ratios = [], []
    for x in sorted(set(grid) | set(knots_x)):
        r = _ratio(baseline, other, x)
        if r is not None:
            xs.append(x)
            ratios.append(r)
    knots = [(x, r) for x in knots_x if (r := _ratio(baseline, other, x)) is not None]
    return Ratio((lo, hi), xs, ratios, knots)


def _ratio(baseline: Frontier, other: Frontier, x: float) -> float | None:
    a, b = baseline.at(x).value, other.at(x).value
    if a is None or b is None or a == 0:
        return None
    return b / a


PROVENANCE_FIELDS = (
    "backend",
    "device",
    "host",
    "driver",
    "power limit (W)",
    "SM clock before (MHz)",
    "memory clock before (MHz)",
    "temperature before (°C)",
    "throttled points",
    "energy boundary",
    "copy bandwidth (GB/s)",
    "matmul (TFLOP/s)",
    "engine",
    "recorded (UTC)",
)


def _span(values: list) -> str:
    nums = sorted({v for v in (num(x) for x in values) if v is not None})
    if not nums:
        return "not recorded"
    return f"{nums[0]:.4g}" if nums[0] == nums[-1] else f"{nums[0]:.4g}-{nums[-1]:.4g}"


def _distinct(values: list) -> str:
    vals = sorted({str(v) for v in values if v not in (None, "")})
    return ", ".join(vals) if vals else "not recorded"


def provenance_rows(points: list[PointView]) -> dict[str, str]:
    """Provenance of the records of one series, each field as a value or a range over its
    points, "not recorded" where no record has it."""
    recs = [p.record for p in points]
    before = [get(r, "device_state", "before") or {} for r in recs]
    dev = [get(r, "provenance", "device") or {} for r in recs]
    driver = [d.get("driver_version") or d.get("driver") for d in dev] + [
        b.get("driver_version") for b in before
    ]
    throttled = [get(r, "device_state", "throttled") for r in recs]
    known = [t for t in throttled if isinstance(t, bool)]
    commits = []
    for r in recs:
        g = get(r, "provenance", "git") or {}
        c = g.get("commit")
        ver = get(r, "provenance", "engine_version")
        commits.append(
            f"{ver or '?'} {c[:10] if c else 'no commit'}{' (dirty)' if g.get('dirty') else ''}"
        )
    matmul = []
    for r in recs:
        rates = get(r, "peaks", "matmul_tflops") or {}
        matmul += list(rates.values()) if isinstance(rates, dict) else []
    times = sorted(t for t in (get(r, "provenance", "recorded_at_utc") for r in recs) if t)
    return {
        "backend": _distinct([r.get("backend") for r in recs]),
        "device": _distinct([d.get("name") for d in dev]),
        "host": _distinct([get(r, "provenance", "host", "hostname") for r in recs]),
        "driver": _distinct(driver),
        "power limit (W)": _span([b.get("power_limit_w") for b in before]),
        "SM clock before (MHz)": _span([b.get("sm_clock_mhz") for b in before]),
        "memory clock before (MHz)": _span([b.get("mem_clock_mhz") for b in before]),
        "temperature before (°C)": _span([b.get("temperature_c") for b in before]),
        "throttled points": f"{sum(known)} of {len(known)}" if known else "not recorded",
        "energy boundary": _distinct([p.boundary for p in points]),
        "copy bandwidth (GB/s)": _span([get(r, "peaks", "copy_bw_gbps") for r in recs]),
        "matmul (TFLOP/s)": _span(matmul),
        "engine": _distinct(commits),
        "recorded (UTC)": f"{times[0]} .. {times[-1]}" if times else "not recorded",
    }


def fairness_notes(rows: dict[str, dict[str, str]]) -> list[str]:
    """What differs between compared series beyond the device or precision under test, in
    words (e.g. different power limits, engine commits, throttling)."""
    notes = []
    labels = list(rows)
    for name in ("driver", "power limit (W)", "engine", "energy boundary"):
        values = {label: rows[label][name] for label in labels}
        if len(set(values.values())) > 1:
            notes.append(f"{name} differs: " + "; ".join(f"{k}: {v}" for k, v in values.items()))
    for label in labels:
        t = rows[label]["throttled points"]
        if t != "not recorded" and not t.startswith("0 of"):
            notes.append(f"{label}: {t} throttled points")
    return notes


def geometric_mean(values: list[float]) -> float | None:
    """Geometric mean of positive values (None when there are none)."""
    pos = [v for v in values if v > 0 and math.isfinite(v)]
    if not pos:
        return None
    return math.exp(sum(math.log(v) for v in pos) / len(pos))
