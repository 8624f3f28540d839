"""A sweep's power session: the sources, the sampler beside the workload, the idle baseline,
and the energy block of each point's record.

One session lives for the whole sweep. It opens the sources once (a missing one is reported
once, with its reason), samples them continuously, measures idle power before the first
point, and for each point turns the samples that cover the point's measured windows into
energy per boundary (GPU board, CPU package, node...), with uncertainties, the cross-check
between a boundary's counter and its power reading, and the derived per-token figures.

Per-token figures: ``avg_power_w = energy_j / window_s`` over the measured windows, and
``joules_per_token = avg_power_w * step_s / batch`` where ``step_s`` is the mean step time of
the whole model. When only some distinct layers were run, ``step_s`` is the scaled step time
and the point says ``scaled_from_layers``: the energy of the layers not run is taken at the
average power of those that were.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from engine.power.base import PowerSource, Samples, SourceInfo

NO_SOURCE_REASON = "no power source on this machine"
# The boundary a point's headline figures are given at: the first of these it has.
PRIMARY_ORDER = ("gpu-board", "gpu-module", "cpu-package", "node")
TRACE_MAX_POINTS = 2000
DEFAULT_MAX_GAP_S = 3.0  # as InferenceX: a longer hole in a source's samples voids the point
IDLE_MIN_S = 2.0
IDLE_MIN_UPDATES = 20
MIN_OFFSET_CONFIDENCE = 0.5  # correlation needed to trust an estimated meter-clock offset
CLOCK_TOLERANCE = 0.02  # SM clocks within 2% are one operating point
STATE_POLL_S = 0.25  # device state (clocks, throttle reasons) polled this often
STATE_HISTORY = 1 << 14  # states kept (about an hour at 0.25 s): bounded memory
# Clock-event reasons that are not throttling: idle, a clock the user set, display, sync.
BENIGN_CLOCK_EVENTS = frozenset(
    {"gpu_idle", "applications_clocks_setting", "display_clock_setting", "sync_boost", "none"}
)


def _range(values) -> list | None:
    vals = [v for v in values if v is not None]
    return [min(vals), max(vals)] if vals else None


def observed_update_period_s(samples: Samples) -> float | None:
    """The sensor's update period seen in ``samples`` (s): the median time between its
    updates (value changes of a polled source, stamps of a sensor-stamped one)."""
    from engine.energy import sensor_updates

    u_ns, _, _ = sensor_updates(samples)
    if u_ns.size < 3:
        return None
    return float(np.median(np.diff(u_ns))) / 1e9


def trace_power_w(
    samples: Samples, max_points: int = TRACE_MAX_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """A power-over-time trace (t_ns, W) from any source, for plots: power readings as they
    are, energy counters as the power between successive updates; thinned by taking
    every k-th point (never averaged, so what is shown was seen)."""
    t, v = samples.t_ns, samples.value
    if samples.info.quantity == "energy":
        from engine.energy import sensor_updates

        u_ns, _, e_j = sensor_updates(samples)
        if u_ns.size < 2:
            return np.empty(0, np.int64), np.empty(0)
        t, v = u_ns[1:].astype(np.int64), np.diff(e_j) / (np.diff(u_ns) / 1e9)
    step = max(1, math.ceil(t.size / max_points))
    return t[::step], v[::step]


@dataclass
class BoundaryEnergy:
    """Average power of one boundary over a point's attributed windows, from its best source
    per device (W), and how many windows were attributed."""

    boundary: str
    power_w: float
    power_uncertainty_w: float
    sources: list[str]
    coverage: float
    windows_attributed: int
    windows: int


class MeterLog:
    """An external meter's log (node boundary), reread at every call since the meter keeps
    writing. Its clock is mapped to the host's monotonic clock by a given offset, by the
    log's epoch stamps, or (``offset_s="auto"``) by the offset that best correlates the
    logged power with the busy/idle pattern of the windows measured so far
    (``engine.power.replay.estimate_offset``), re-estimated at every point."""

    def __init__(
        self, path: str, offset_s: float | str | None = None, averaging_s: float | None = None
    ) -> None:
        self.path, self.averaging_s = path, averaging_s
        self.auto = offset_s == "auto"
        self.offset_s = None if self.auto else offset_s
        self.estimate: dict | None = None
        self.align_ns = 0.0  # the offset's uncertainty, added to the window edges' (ns)
        self._cache: tuple | None = None
        log = self._load()  # fail now, once, on an unreadable log
        self.name = log.source_info().name
        self.period_s = log.median_interval_s  # None until the log has two rows

    def _load(self):
        """The log as it is now; parsed again only when the file changed (size or mtime), so
        calibrating and reading it at the same point, or at every warm-up span, parse once."""
        from engine.power.replay import ReplayLog

        try:
            stat = os.stat(self.path)
        except OSError:  # the loader says what is wrong, in one line
            return ReplayLog.load(self.path, clock_offset_s=self.offset_s)
        key = (stat.st_size, stat.st_mtime_ns, self.offset_s)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, ReplayLog.load(self.path, clock_offset_s=self.offset_s))
        return self._cache[1]

    def calibrate(self, windows_ns: list[tuple[int, int]]) -> dict:
        """Estimate the offset from ``windows_ns`` (host ns busy spans); returns what was
        found (offset, correlation, confidence) and uses it when the correlation is clear."""
        from engine.power.replay import estimate_offset, indicator_from_windows

        log = self._load()
        try:
            est = estimate_offset(log, indicator_from_windows(windows_ns))
        except ValueError as exc:
            self.estimate = {"offset_s": None, "reason": str(exc)}
            return self.estimate
        self.estimate = {
            "offset_s": est.offset_s,
            "correlation": est.correlation,
            "confidence": est.confidence,
            "log_rows_compared": est.n_points,
            "step_s": est.step_s,
        }
        if est.confidence >= MIN_OFFSET_CONFIDENCE:
            self.offset_s = est.offset_s
            # Half the search step, and half the log's own interval (the stamps say when a
            # row was logged, not where in its interval the power was drawn).
            interval_s = log.median_interval_s or 0.0
            self.align_ns = 0.5 * (est.step_s + interval_s) * 1e9
        else:
            self.estimate["reason"] = (
                f"correlation {est.correlation:.2f} with the busy/idle pattern is too weak "
                f"to place the log (needs >= {MIN_OFFSET_CONFIDENCE})"
            )
        return self.estimate

    def __call__(self) -> Samples:
        log = self._load()
        if self.auto:
            if self.offset_s is None:
                raise ValueError(
                    (self.estimate or {}).get("reason")
                    or "the log's clock offset is not estimated yet (no windows measured)"
                )
            log = log.with_offset(self.offset_s, "estimated from the busy/idle pattern")
        samples = log.samples
        if self.averaging_s is not None and samples.info.quantity == "power":
            info = dataclasses.replace(samples.info, averaging_window_s=self.averaging_s)
            samples = Samples(info, samples.t_ns, samples.value)
        return samples


@dataclass
class PowerSession:
    """Sources, sampler and idle baseline for a sweep; ``energy_for_point`` fills records.

    ``sampler`` is an ``engine.power.sampler.Sampler`` (or anything with ``start``, ``stop``,
    ``samples(t0_ns, t1_ns)`` and ``stats``); ``node_log`` an optional callable returning the
    external meter's samples (reloaded at each point, since the meter keeps writing).
    """

    sources: list[PowerSource]
    sampler: object
    reasons: list[str] = field(default_factory=list)
    node_log: Callable[[], Samples] | None = None
    device_state: Callable[[], dict] | None = None
    max_gap_s: float = DEFAULT_MAX_GAP_S
    idle: dict = field(default_factory=dict)
    update_period_s: dict = field(default_factory=dict)
    seen_sources: dict = field(default_factory=dict)  # name -> (boundary, stated period s)
    _busy_windows: list = field(default_factory=list)  # all windows so far, host ns
    _states: deque = field(default_factory=lambda: deque(maxlen=STATE_HISTORY))
    _watch: threading.Thread | None = None
    _watch_stop: threading.Event | None = None

    @property
    def active(self) -> bool:
        return bool(self.sources) or self.node_log is not None

    @property
    def infos(self) -> list[SourceInfo]:
        return [s.info for s in self.sources]

    def _periods_by_source(self) -> dict[str, tuple[str, float | None]]:
        """name -> (boundary, measured else stated update period in s), the meter log's
        included once idle has been measured."""
        out = {i.name: (i.boundary, i.update_period_s) for i in self.infos}
        if isinstance(self.node_log, MeterLog) and self.node_log.period_s:
            out[self.node_log.name] = ("node", self.node_log.period_s)
        out.update(self.seen_sources)
        for name, period in self.update_period_s.items():
            if name in out:
                out[name] = (out[name][0], period)
        return out

    def slowest_update_period_s(self) -> float | None:
        """The longest measured (else stated) update period among the sources, in s."""
        periods = [p for _b, p in self._periods_by_source().values() if p]
        return max(periods) if periods else None

    def protocol_update_period_s(self) -> float | None:
        """The update period the protocol must respect, in s: for each boundary that of its
        fastest source (the one its energy rests on), and the slowest of those. A slow
        companion such as NVML's 1 s average then does not stretch every point to 50 s;
        a 1 Hz wall meter, the only source of its boundary, does."""
        fastest: dict[str, float] = {}
        for boundary, period in self._periods_by_source().values():
            if period:
                fastest[boundary] = min(period, fastest.get(boundary, period))
        return max(fastest.values()) if fastest else None

    def _samples(self, t0_ns: int, t1_ns: int, reasons: list[str] | None = None) -> list[Samples]:
        """Every source's samples over [t0_ns, t1_ns], the meter log's included."""
        out = list(self.sampler.samples(t0_ns, t1_ns)) if self.sampler is not None else []
        if self.node_log is not None:
            try:
                out.append(self.node_log().between(t0_ns, t1_ns))
            except Exception as exc:  # a meter log that cannot be read must not end the sweep
                if reasons is not None:
                    reasons.append(f"power log: {exc}")
        return out

    def why_inactive(self) -> str:
        """Why no energy can be measured (the reasons each source is missing)."""
        return "; ".join(self.reasons) or NO_SOURCE_REASON

    def recent_power_w(self, t0_ns: int, t1_ns: int) -> float | None:
        """Average power (W) over [t0_ns, t1_ns] from the first source with enough samples:
        a counter's energy difference over time, or the mean of power readings. Used only
        to judge steadiness during warm-up, never reported."""
        from engine.energy import sensor_updates

        for s in self._samples(t0_ns, t1_ns):
            if s.t_ns.size < 2:
                continue
            if s.info.quantity == "energy":
                u_ns, _, e_j = sensor_updates(s)
                if u_ns.size >= 2:
                    return float((e_j[-1] - e_j[0]) / ((u_ns[-1] - u_ns[0]) / 1e9))
            else:
                return float(np.mean(s.value))
        return None

    def device_state_now(self) -> dict | None:
        """Power limit, clocks, temperature and clock-event reasons now (None if unknown),
        stamped with ``t_ns`` (host monotonic)."""
        if self.device_state is None:
            return None
        t_ns = time.monotonic_ns()
        try:
            state = dict(self.device_state())
        except Exception as exc:  # state is provenance, its failure must not void the point
            state = {"error": f"{type(exc).__name__}: {exc}"}
        state["t_ns"] = t_ns
        return state

    def sm_clock_mhz(self) -> float | None:
        """The SM clock now (MHz), or None where it cannot be read."""
        state = self.device_state_now()
        return None if not state else state.get("sm_clock_mhz")

    @staticmethod
    def clocks_agree(a_mhz: float | None, b_mhz: float | None) -> bool:
        """Whether two SM clock readings are the same operating point: within
        CLOCK_TOLERANCE (boost moves the clock by a few bins at steady state); unknown
        clocks agree (nothing says otherwise)."""
        if a_mhz is None or b_mhz is None:
            return True
        return abs(a_mhz - b_mhz) <= CLOCK_TOLERANCE * max(a_mhz, b_mhz)

    def start_state_watch(self, interval_s: float = STATE_POLL_S) -> None:
        """Poll the device state in a background thread (every ``interval_s``) so that a
        throttle or clock change inside a point is seen, not only at its ends."""
        if self.device_state is None or self._watch is not None:
            return
        self._watch_stop = threading.Event()

        def loop() -> None:
            while not self._watch_stop.wait(interval_s):
                self._states.append(self.device_state_now())

        self._watch = threading.Thread(target=loop, name="device-state", daemon=True)
        self._watch.start()

    def summarize_state(self, before: dict | None, after: dict | None) -> dict | None:
        """Device state before and after the point, every clock-event reason seen in between
        (polled states included), and whether the SM clock changed."""
        if before is None and after is None:
            return None
        t0 = (before or {}).get("t_ns", 0)
        t1 = (after or {}).get("t_ns", time.monotonic_ns())
        during = self.state_series(t0, t1)
        states = [st for st in (before, *during, after) if st]
        seen = set()
        for state in states:
            seen |= set(state.get("clock_event_reasons") or [])
        seen -= BENIGN_CLOCK_EVENTS
        clocks = {st.get("sm_clock_mhz") for st in states} - {None}
        return {
            "before": before,
            "after": after,
            "polled_states": len(during),
            "reasons_seen": sorted(seen),
            "throttled": bool(seen),
            "sm_clock_mhz_range": [min(clocks), max(clocks)] if clocks else None,
            "clock_changed": (not self.clocks_agree(min(clocks), max(clocks)) if clocks else None),
            "temperature_c_range": _range(st.get("temperature_c") for st in states),
        }

    def state_series(self, t0_ns: int, t1_ns: int) -> list[dict]:
        """The polled device states between t0_ns and t1_ns (for the point's trace)."""
        return [st for st in list(self._states) if st and t0_ns <= st.get("t_ns", -1) <= t1_ns]

    def close(self) -> None:
        """Stop sampling and release the sources."""
        if self._watch is not None:
            self._watch_stop.set()
            self._watch.join(timeout=5)
            self._watch = None
        try:
            if self.sampler is not None:
                self.sampler.stop()
        finally:
            for src in self.sources:
                # Closing is best effort: the results are already written.
                with contextlib.suppress(Exception):
                    src.close()

    # -- idle -------------------------------------------------------------------------------

    def measure_idle(
        self, seconds: float | None = None, log: Callable[[str], None] = print
    ) -> dict:
        """Sample with the device idle and record each source's idle power (W) and its
        measured update period. Blocks for max(IDLE_MIN_S, IDLE_MIN_UPDATES periods)."""
        from engine.energy import idle_power

        period = self.protocol_update_period_s() or 0.1
        seconds = seconds if seconds is not None else max(IDLE_MIN_S, IDLE_MIN_UPDATES * period)
        log(f"measuring idle power for {seconds:.1f} s (device idle) ...")
        t_begin = time.monotonic_ns()
        time.sleep(seconds)
        t_end = time.monotonic_ns()
        # The first and last quarters (>= 5 updates each) give every source whole update
        # spans before and after the span attributed, as the attribution needs.
        quarter = (t_end - t_begin) // 4
        t0, t1 = t_begin + quarter, t_end - quarter
        for s in self._samples(t_begin, t_end):
            self.seen_sources[s.info.name] = (s.info.boundary, s.info.update_period_s)
            measured = observed_update_period_s(s)
            if measured:
                self.update_period_s[s.info.name] = measured
            try:
                p_w, u_w = idle_power(s, t0, t1)
            except ValueError as exc:
                self.idle[s.info.name] = {
                    "power_w": None,
                    "uncertainty_w": None,
                    "reason": str(exc),
                }
                continue
            ok = p_w is not None and math.isfinite(p_w)
            self.idle[s.info.name] = {
                "power_w": float(p_w) if ok else None,
                "uncertainty_w": float(u_w) if ok else None,
                "reason": None if ok else "too few samples while idle",
                "window_s": (t1 - t0) / 1e9,
            }
        return self.idle

    # -- per point --------------------------------------------------------------------------

    def energy_for_point(
        self,
        start_ns: np.ndarray,
        end_ns: np.ndarray,
        *,
        tokens_per_step: float,
        step_s: float,
        scaled_from_layers: bool,
        align_ns: float = 0.0,
        point_t0_ns: int | None = None,
    ) -> tuple[dict, dict | None]:
        """The record's ``energy`` block and ``trace`` for windows [start_ns, end_ns] (host ns).

        ``tokens_per_step`` is the batch (a rank's share of it under expert parallelism, so
        possibly fractional); ``step_s`` the whole-model mean step time (s).
        """
        from engine.energy import attribute, cross_check, pooled

        start_ns = np.asarray(start_ns, np.int64)
        end_ns = np.asarray(end_ns, np.int64)
        window_s = float(np.sum(end_ns - start_ns)) / 1e9
        # The last window's edge needs whole sensor updates after it: wait for them.
        settle_ns = int(end_ns.max() + 2.5 * (self.protocol_update_period_s() or 0.0) * 1e9)
        if (self.sources or self.node_log) and time.monotonic_ns() < settle_ns:
            time.sleep((settle_ns - time.monotonic_ns()) / 1e9)
        margin_ns = int(max(self.max_gap_s, 2 * (self.slowest_update_period_s() or 0.1)) * 1e9)
        t_lo, t_hi = int(start_ns.min()) - margin_ns, int(end_ns.max()) + margin_ns
        reasons: list[str] = []
        node_clock = None
        if isinstance(self.node_log, MeterLog) and self.node_log.auto:
            # Busy: the warm-up (from the point's start to its first window) and the windows;
            # idle: the pauses between windows and the time between points.
            if point_t0_ns is not None and point_t0_ns < int(start_ns.min()):
                self._busy_windows.append((int(point_t0_ns), int(start_ns.min())))
            self._busy_windows += list(zip(start_ns.tolist(), end_ns.tolist()))
            node_clock = self.node_log.calibrate(self._busy_windows)
        samples = self._samples(t_lo, t_hi, reasons)

        per_source: list[dict] = []
        estimates: dict[str, tuple] = {}
        for s in samples:
            entry = {
                "name": s.info.name,
                "boundary": s.info.boundary,
                "quantity": s.info.quantity,
                "device": s.info.device,
                "samples": int(s.t_ns.size),
                "update_period_s": self.update_period_s.get(s.info.name),
            }
            try:
                align = align_ns
                if s.info.boundary == "node" and isinstance(self.node_log, MeterLog):
                    align = max(align_ns, self.node_log.align_ns)
                we = attribute(s, start_ns, end_ns, align_ns=align, max_gap_s=self.max_gap_s)
            except ValueError as exc:
                entry.update(valid=False, reason=str(exc))
                per_source.append(entry)
                continue
            bad = [r for r, ok in zip(we.reasons, we.valid) if not ok and r]
            n_ok, n_all = int(np.sum(we.valid)), int(we.valid.size)
            entry["windows_attributed"] = f"{n_ok}/{n_all}"
            if n_ok * 2 < n_all or n_ok == 0:
                # Fewer than half the windows seen: too little to stand for the point.
                entry.update(
                    valid=False,
                    reason=f"{n_all - n_ok}/{n_all} windows could not be attributed: "
                    + (bad[0] if bad else "unknown"),
                )
                per_source.append(entry)
                continue
            e_j, u_j = pooled(we)
            t_ok_s = float(np.sum((end_ns - start_ns)[we.valid])) / 1e9
            entry.update(
                valid=True,
                method=we.method,
                energy_j=float(e_j),
                uncertainty_j=float(u_j),
                attributed_window_s=t_ok_s,
                avg_power_w=float(e_j) / t_ok_s,
                coverage=float(np.mean(we.coverage[we.valid])),
                reason=None if n_ok == n_all else f"windows not attributed: {bad[0]}",
            )
            per_source.append(entry)
            estimates[s.info.name] = (
                s.info,
                we,
                float(e_j) / t_ok_s,
                float(u_j) / t_ok_s,
                n_ok,
                n_all,
            )

        by_boundary = self._by_boundary(estimates)
        checks = self._cross_checks(estimates, cross_check)
        block = self._energy_block(
            by_boundary,
            checks,
            per_source,
            reasons,
            window_s,
            tokens_per_step,
            step_s,
            scaled_from_layers,
        )
        if node_clock is not None:
            block["node_clock_offset"] = node_clock
        if self.sampler is not None:
            # The sampler's own achieved rate and cost, cumulative since the sweep began.
            try:
                block["sampler"] = self.sampler.stats()
            except Exception as exc:  # statistics must not void the point
                block["sampler"] = {"error": f"{type(exc).__name__}: {exc}"}
        trace = self._trace(samples, start_ns, end_ns, point_t0_ns)
        return block, trace

    def _by_boundary(self, estimates: dict[str, tuple]) -> dict[str, BoundaryEnergy]:
        # Per boundary and device, keep the estimate with the smallest relative uncertainty;
        # a boundary's power is the sum over its devices (e.g. two CPU packages).
        best: dict[tuple[str, str | None], tuple] = {}
        for name, (info, we, p_w, u_w, n_ok, n_all) in estimates.items():
            key = (info.boundary, info.device)
            rel = u_w / p_w if p_w > 0 else math.inf
            if key not in best or rel < best[key][0]:
                cov = float(np.mean(we.coverage[we.valid]))
                best[key] = (rel, name, p_w, u_w, cov, n_ok, n_all)
        out: dict[str, BoundaryEnergy] = {}
        for (boundary, _device), (_rel, name, p_w, u_w, cov, n_ok, n_all) in sorted(
            best.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))
        ):
            if boundary in out:
                b = out[boundary]
                b.power_w += p_w
                b.power_uncertainty_w += u_w  # devices' errors may share a sign: linear
                b.sources.append(name)
                b.coverage = min(b.coverage, cov)
                b.windows_attributed = min(b.windows_attributed, n_ok)
            else:
                out[boundary] = BoundaryEnergy(boundary, p_w, u_w, [name], cov, n_ok, n_all)
        return out

    @staticmethod
    def _cross_checks(estimates: dict[str, tuple], cross_check) -> list[dict]:
        # Counter vs power reading of the same boundary and device.
        checks = []
        items = list(estimates.values())
        for i, (ia, wa, *_rest) in enumerate(items):
            for ib, wb, *_r in items[i + 1 :]:
                same = ia.boundary == ib.boundary and ia.device == ib.device
                if same and ia.quantity != ib.quantity:
                    result = dict(cross_check(wa, wb))
                    result.update(a=ia.name, b=ib.name)
                    checks.append(result)
        return checks

    def _energy_block(
        self,
        by_boundary: dict[str, BoundaryEnergy],
        checks: list[dict],
        per_source: list[dict],
        reasons: list[str],
        window_s: float,
        tokens_per_step: float,
        step_s: float,
        scaled_from_layers: bool,
    ) -> dict:
        boundaries = {}
        for name, b in by_boundary.items():
            boundaries[name] = self._figures(b, window_s, tokens_per_step, step_s)
        primary = next(
            (b for b in PRIMARY_ORDER if b in boundaries),
            next(iter(boundaries), None),
        )
        flags = []
        for c in checks:
            if c.get("flag") or c.get("agree") is False:
                flags.append(f"counter and power disagree: {c['a']} vs {c['b']}")
        for name, b in by_boundary.items():
            if b.windows_attributed < b.windows:
                flags.append(
                    f"{name}: {b.windows_attributed}/{b.windows} windows attributed; the "
                    "average power of those stands for the rest"
                )
        if primary is None:
            why = [e["name"] + ": " + e["reason"] for e in per_source if e.get("reason")]
            block = null_energy("; ".join(why + reasons + self.reasons) or NO_SOURCE_REASON)
            block["flags"] = flags
        else:
            block = dict(boundaries[primary])
            block.update(boundary=primary, valid=True, flags=flags, reason=None)
        node, gpu = boundaries.get("node"), boundaries.get("gpu-board")
        ratio = None
        if node and gpu and gpu["energy_j"]:
            ratio = node["energy_j"] / gpu["energy_j"]
        block.update(
            scaled_from_layers=scaled_from_layers,
            window_s=window_s,
            by_boundary=boundaries,
            node_to_gpu_energy_ratio=ratio,
            cross_check=checks or None,
            sources=per_source,
        )
        return block

    def _figures(self, b: BoundaryEnergy, window_s: float, batch: int, step_s: float) -> dict:
        power_w, power_u_w = b.power_w, b.power_uncertainty_w
        jpt = power_w * step_s / batch
        tpj = 1.0 / jpt if jpt > 0 else None
        idle = [self.idle.get(name, {}).get("power_w") for name in b.sources]
        idle_u = [self.idle.get(name, {}).get("uncertainty_w") for name in b.sources]
        idle_w = sum(idle) if idle and all(v is not None for v in idle) else None
        idle_u_w = math.sqrt(sum(u * u for u in idle_u)) if idle_w is not None else None
        above = None if idle_w is None else (power_w - idle_w) * step_s / batch
        return {
            "energy_j": power_w * window_s,
            "energy_uncertainty_j": power_u_w * window_s,
            "avg_power_w": power_w,
            "avg_power_uncertainty_w": power_u_w,
            "idle_power_w": idle_w,
            "idle_power_uncertainty_w": idle_u_w,
            "energy_above_idle_j": None if idle_w is None else (power_w - idle_w) * window_s,
            "joules_per_token": jpt,
            "tokens_per_joule": tpj,
            "tokens_per_joule_uncertainty": (
                None if tpj is None or power_w <= 0 else tpj * power_u_w / power_w
            ),
            "tokens_per_joule_above_idle": (1.0 / above) if above and above > 0 else None,
            "coverage": b.coverage,
            "windows_attributed": b.windows_attributed,
            "windows": b.windows,
            "sources": b.sources,
        }

    def _trace(self, samples: list[Samples], start_ns, end_ns, t0_ns: int | None) -> dict | None:
        if not samples:
            return None
        # Prefer a power reading (it is what the sensor saw); else the counter's differences.
        s = next((x for x in samples if x.info.quantity == "power" and x.t_ns.size), None)
        s = s or next((x for x in samples if x.t_ns.size), None)
        if s is None:
            return None
        t_ns, p_w = trace_power_w(s)
        t0 = int(t0_ns if t0_ns is not None else start_ns.min())
        states = self.state_series(t0, int(end_ns.max()))
        return {
            "source": s.info.name,
            "t0_host_ns": t0,
            "t_s": ((t_ns - t0) / 1e9).round(6).tolist(),
            "power_w": np.asarray(p_w).round(3).tolist(),
            "state_t_s": [round((st["t_ns"] - t0) / 1e9, 6) for st in states] or None,
            "sm_clock_mhz": [st.get("sm_clock_mhz") for st in states] or None,
            "temperature_c": [st.get("temperature_c") for st in states] or None,
            "windows_s": [
                [round((a - t0) / 1e9, 6), round((b - t0) / 1e9, 6)]
                for a, b in zip(start_ns, end_ns)
            ],
        }


FIGURE_KEYS = (
    "energy_j",
    "energy_uncertainty_j",
    "avg_power_w",
    "avg_power_uncertainty_w",
    "idle_power_w",
    "idle_power_uncertainty_w",
    "energy_above_idle_j",
    "joules_per_token",
    "tokens_per_joule",
    "tokens_per_joule_uncertainty",
    "tokens_per_joule_above_idle",
    "coverage",
    "windows_attributed",
    "windows",
)


def null_energy(reason: str) -> dict:
    """The energy block of a point without any usable source: every figure null, the reason."""
    block = {k: None for k in FIGURE_KEYS}
    block.update(
        boundary=None,
        valid=False,
        flags=[],
        reason=reason,
        scaled_from_layers=None,
        window_s=None,
        by_boundary={},
        node_to_gpu_energy_ratio=None,
        cross_check=None,
        sources=[],
    )
    return block


def open_session(
    power: str = "auto",
    power_log: str | None = None,
    power_log_offset_s: float | str | None = None,
    power_log_averaging_s: float | None = None,
    gpu_index: int | None = None,
    gpu_pci_bus_id: str | None = None,
    sampler_mode: str | None = None,
    log: Callable[[str], None] = print,
) -> PowerSession:
    """Open the sources named by ``power`` ("auto", "none" or a comma list of modules),
    start sampling them, and return the session (inactive when nothing is usable).

    ``gpu_index`` (NVML's numbering) keeps only the GPU sources of the device the backend
    runs on; ``gpu_pci_bus_id`` finds that index from the device's PCI bus id, which is
    what to pass for a CUDA device (None for both: every GPU's sources are kept).
    ``power_log`` is an external meter's log (node boundary), reread at every point, its
    clock mapped by ``power_log_offset_s`` (s, or "auto": estimated; see ``MeterLog``);
    ``power_log_averaging_s`` the span each of its power values averages, as the meter's
    manual states it (None: unknown, so each value is taken as an instantaneous reading,
    which sees almost none of the time and makes the uncertainty wide).
    Raises ValueError (one line) for an unknown source name or an unreadable log.
    """
    from engine.power.discover import discover_sources
    from engine.power.sampler import Sampler

    sources, reasons = discover_sources(power)
    if gpu_pci_bus_id and any(s.info.name.startswith("nvml:") for s in sources):
        from engine.power.nvml import index_of_pci_bus_id

        found = index_of_pci_bus_id(gpu_pci_bus_id)
        if found is None:
            reasons.append(
                f"NVML does not know the GPU at PCI bus id {gpu_pci_bus_id}; "
                "the sensors of every GPU are kept"
            )
        gpu_index = found if found is not None else gpu_index
    if gpu_index is not None:
        keep = [s for s in sources if not _is_other_gpu(s.info, gpu_index)]
        for s in sources:
            if s not in keep:
                s.close()
        sources = keep
    node_log = None
    if power_log:
        node_log = MeterLog(power_log, power_log_offset_s, power_log_averaging_s)

    for reason in reasons:
        log(f"power: {reason}")
    kwargs = {"mode": sampler_mode} if sampler_mode else {}
    sampler = Sampler(sources, **kwargs) if sources else None
    state = None
    nvml_index = gpu_index if gpu_index is not None else 0
    if any(s.info.name.startswith("nvml") for s in sources):
        from engine.power import nvml

        def state() -> dict:
            return nvml.device_state(nvml_index)

    session = PowerSession(
        sources=sources,
        sampler=sampler,
        reasons=list(reasons),
        node_log=node_log,
        device_state=state,
    )
    if sampler is not None:
        sampler.start()
    session.start_state_watch()
    for s in sources:
        i = s.info
        log(
            f"power: {i.name} ({i.quantity}, {i.boundary}" + (f", {i.device})" if i.device else ")")
        )
    return session


def _is_other_gpu(info: SourceInfo, gpu_index: int) -> bool:
    """Whether a source belongs to a GPU other than ``gpu_index`` (names are module:index:...)."""
    if not info.boundary.startswith("gpu"):
        return False
    parts = info.name.split(":")
    return len(parts) > 1 and parts[1].isdigit() and int(parts[1]) != gpu_index
