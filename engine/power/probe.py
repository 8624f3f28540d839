"""Measure what a power source really does: how often its value changes and what a read costs.

Vendors state update periods loosely (NVML's energy counter is "about 100 ms", 20-100 ms by
other accounts) and some are undocumented (NVML's sample buffer). Like Zeus, we infer the
period from back-to-back reads instead of assuming it: the times at which the value changes
are the sensor's updates, as far as polling can see them.

Also here: the host's wall-clock-to-monotonic offset, which sources stamped in wall-clock
time (NVML field values and samples, a meter's epoch log) need to map their stamps.
"""

from __future__ import annotations

import statistics
import time

from engine.power.base import PowerSource, SourceError


def wall_to_monotonic_offset_ns(pairs: int = 5) -> tuple[int, int]:
    """The host's ``time.time_ns() - time.monotonic_ns()`` now, in ns, and its uncertainty (ns).

    Takes ``pairs`` bracketed readings (monotonic, wall, monotonic) and keeps the one with
    the narrowest bracket, so a preemption between the two clock reads cannot skew the
    offset; the uncertainty is half that bracket. The offset moves when NTP slews or steps
    the wall clock, so callers re-measure it for each batch of stamps they map.
    """
    best_width_ns = None
    best_offset_ns = 0
    for _ in range(max(1, pairs)):
        m0 = time.monotonic_ns()
        w = time.time_ns()
        m1 = time.monotonic_ns()
        width_ns = m1 - m0
        if best_width_ns is None or width_ns < best_width_ns:
            best_width_ns = width_ns
            best_offset_ns = w - (m0 + m1) // 2
    return best_offset_ns, (best_width_ns or 0) // 2 + 1


def measure_update_period(
    source: PowerSource, duration_s: float = 1.0, max_reads: int = 1_000_000
) -> dict:
    """Read ``source`` back to back for ``duration_s`` seconds and report how its value moves.

    Returns a dict: ``update_period_median_s`` and ``update_period_min_s`` (s, between
    consecutive value changes, the changes timed by the t_ns each read returns, so a
    sensor-stamped source is timed by its own stamps), ``n_changes``, ``n_reads``,
    ``read_cost_s`` (s of wall time per read), ``reads_per_s``, ``duration_s`` (s actually
    spent) and ``reason`` (None, or why the periods are None: the value never changed, or
    changed only once, or a read failed).

    An update that happens to repeat the previous value is invisible, so the median can be
    a multiple of the true period on a steady load; the minimum is the better estimate of
    the period, the median says how regular it is.
    """
    change_t_ns: list[int] = []
    n_reads = 0
    reason = None
    t_start = time.monotonic_ns()
    t_stop = t_start + int(duration_s * 1e9)
    previous = None
    try:
        while n_reads < max_reads:
            t_ns, value = source.read()
            n_reads += 1
            if previous is not None and value != previous:
                change_t_ns.append(int(t_ns))
            previous = value
            if time.monotonic_ns() >= t_stop:
                break
    except SourceError as exc:
        reason = f"read {n_reads + 1} failed: {exc}"
    elapsed_s = (time.monotonic_ns() - t_start) * 1e-9

    result = {
        "source": source.info.name,
        "update_period_median_s": None,
        "update_period_min_s": None,
        "n_changes": len(change_t_ns),
        "n_reads": n_reads,
        "read_cost_s": elapsed_s / n_reads if n_reads else None,
        "reads_per_s": n_reads / elapsed_s if n_reads and elapsed_s > 0 else None,
        "duration_s": elapsed_s,
        "reason": reason,
    }
    # Intervals are only timed between two observed changes: the time from the first read
    # to the first change depends on the phase at which the probe started.
    intervals_s = sorted(
        (b - a) * 1e-9 for a, b in zip(change_t_ns, change_t_ns[1:], strict=False) if b > a
    )
    if intervals_s:
        result["update_period_median_s"] = statistics.median(intervals_s)
        result["update_period_min_s"] = intervals_s[0]
    elif reason is None:
        if not change_t_ns:
            reason = f"the value never changed in {elapsed_s:.3g} s ({n_reads} reads)"
        else:
            reason = (
                f"the value changed only {len(change_t_ns)} time(s) in {elapsed_s:.3g} s "
                f"({n_reads} reads): too few to time an interval"
            )
        result["reason"] = reason
    return result


def measure_buffered_rate(
    source: PowerSource, duration_s: float = 1.0, poll_s: float = 0.05
) -> dict:
    """Drain a sensor-buffered source (``read_buffered``) for ``duration_s`` seconds, polling
    every ``poll_s`` s, and report the interval between the sensor's own sample stamps.

    Returns ``n_samples``, ``sample_interval_median_s`` and ``sample_interval_min_s`` (s,
    None with a reason when fewer than two samples came), ``duration_s`` and ``reason``.
    Samples already buffered before the call count too, so the first drain may be large.
    """
    result: dict = {
        "source": source.info.name,
        "n_samples": 0,
        "sample_interval_median_s": None,
        "sample_interval_min_s": None,
        "duration_s": 0.0,
        "reason": None,
    }
    stamps_ns: list[int] = []
    t_start = time.monotonic_ns()
    t_stop = t_start + int(duration_s * 1e9)
    try:
        while True:
            batch = source.read_buffered()
            if batch is None:
                result["reason"] = "the source has no buffer"
                return result
            stamps_ns.extend(int(t) for t in batch[0])
            if time.monotonic_ns() >= t_stop:
                break
            time.sleep(poll_s)
    except SourceError as exc:
        result["reason"] = f"read_buffered failed: {exc}"
    result["duration_s"] = (time.monotonic_ns() - t_start) * 1e-9
    result["n_samples"] = len(stamps_ns)
    intervals_s = sorted((b - a) * 1e-9 for a, b in zip(stamps_ns, stamps_ns[1:], strict=False))
    if intervals_s:
        result["sample_interval_median_s"] = statistics.median(intervals_s)
        result["sample_interval_min_s"] = intervals_s[0]
    elif result["reason"] is None:
        result["reason"] = f"{len(stamps_ns)} sample(s) in {result['duration_s']:.3g} s"
    return result
