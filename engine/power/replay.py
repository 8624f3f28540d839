"""An external meter's log (a wall-power analyzer, a PDU, a smart plug) as a power source.

The log is CSV with a header row, or JSON Lines (one object per line), of timestamped watts
or joules: a time column ``t`` or ``t_s`` (seconds: unix epoch, or relative to anything) and
one value column, ``power_w`` / ``watts`` / ``w`` (W) or ``energy_j`` / ``joules`` / ``j``
(cumulative J). Lines that are blank or start with ``#`` are skipped.

Clocks: a meter stamps with its own clock, so the log is mapped to the host's monotonic
clock by an offset in seconds, ``log_time + clock_offset_s = host monotonic seconds``:

- given explicitly (``ReplayLog.load(path, clock_offset_s=...)``, e.g. from
  ``estimate_offset``);
- for epoch stamps with no offset given, from the host's current
  ``time.time() - time.monotonic()``. That assumes the meter's clock and this host's wall
  clock agree, which is only as true as both hosts' NTP state (often a few ms, sometimes
  far worse), and that the host's wall clock has not been stepped since the log was written.
  ``estimate_offset`` refines it against a reference power trace;
- relative stamps with no offset stay unaligned (``t_ns`` is None); a ``ReplaySource`` made
  from such a log replays it from the moment the source is created (demos and tests).

``estimate_offset`` finds the offset that maximises the correlation of the log's power with
a reference trace on the host clock (GPU power, or a busy/idle indicator built from kernel
windows with ``indicator_from_windows``).
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from engine.power.base import BOUNDARIES, PowerSource, Samples, SourceError, SourceInfo
from engine.power.probe import wall_to_monotonic_offset_ns

TIME_COLUMNS = ("t", "t_s")
POWER_COLUMNS = ("power_w", "watts", "w")
ENERGY_COLUMNS = ("energy_j", "joules", "j")
# A first stamp after 2001-09-09 is read as unix epoch seconds; a relative log would have
# to run for 31 years to be mistaken for one.
EPOCH_THRESHOLD_S = 1e9


class ReplayError(SourceError, ValueError):
    """A log that cannot be used: one line naming the file and the column or row at fault."""


@dataclass(frozen=True)
class ReplayLog:
    """A loaded meter log.

    ``log_t_s``: the stamps as logged (s, strictly increasing); ``value``: W or cumulative J
    as ``quantity`` says; ``epoch``: whether the stamps are unix epoch seconds;
    ``clock_offset_s``: log_time + clock_offset_s = host monotonic seconds, None when
    unaligned; ``offset_source``: how the offset was obtained, and its uncertainty.
    """

    path: Path
    quantity: str
    log_t_s: np.ndarray
    value: np.ndarray
    epoch: bool
    clock_offset_s: float | None
    offset_source: str
    columns: tuple[str, str]

    @classmethod
    def load(
        cls,
        path: str | Path,
        clock_offset_s: float | None = None,
        quantity: str | None = None,
    ) -> ReplayLog:
        """Read a CSV or JSON Lines meter log and map it to the host monotonic clock.

        ``clock_offset_s`` (s): log_time + offset = host monotonic seconds; None maps epoch
        stamps through the host's current wall-to-monotonic offset and leaves relative
        stamps unaligned. ``quantity`` ("power" or "energy") picks the value column when the
        log has both. Raises ReplayError (one line) for an unreadable file, a missing or
        ambiguous column, or a bad row.
        """
        path = Path(path)
        if quantity not in (None, "power", "energy"):
            raise ValueError(f"quantity must be 'power', 'energy' or None, got {quantity!r}")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ReplayError(f"{path}: cannot read the log ({exc})") from None
        first = next(
            (s for s in (ln.strip() for ln in text.splitlines()) if s and not s.startswith("#")),
            None,
        )
        if first is None:
            raise ReplayError(f"{path}: the log is empty")
        header, rows = _jsonl_rows(path, text) if first.startswith("{") else _csv_rows(path, text)
        t_col, v_col, kind = _columns(path, header, quantity)
        t_s, values = _parse(path, rows, t_col, v_col, kind)
        epoch = bool(t_s[0] >= EPOCH_THRESHOLD_S)
        if clock_offset_s is not None:
            source = "given by the caller"
        elif epoch:
            offset_ns, half_width_ns = wall_to_monotonic_offset_ns()
            clock_offset_s = -offset_ns * 1e-9
            source = (
                "epoch stamps mapped with this host's current time.time()-time.monotonic() "
                f"(read to ±{half_width_ns * 1e-3:.1f} µs); uncertainty is the meter's and "
                "this host's NTP state, plus any wall-clock step since the log was written"
            )
        else:
            source = "unaligned: relative stamps and no clock_offset_s"
        return cls(
            path=path,
            quantity=kind,
            log_t_s=t_s,
            value=values,
            epoch=epoch,
            clock_offset_s=None if clock_offset_s is None else float(clock_offset_s),
            offset_source=source,
            columns=(t_col, v_col),
        )

    @property
    def t_ns(self) -> np.ndarray | None:
        """The stamps on the host monotonic clock (ns, int64), None when unaligned."""
        if self.clock_offset_s is None:
            return None
        return np.round((self.log_t_s + self.clock_offset_s) * 1e9).astype(np.int64)

    def source_info(self, boundary: str = "node", name: str | None = None) -> SourceInfo:
        """How this log describes itself as a source (``boundary`` defaults to a wall meter)."""
        offset = "unaligned" if self.clock_offset_s is None else f"{self.clock_offset_s:.6f} s"
        return SourceInfo(
            name=name or f"replay:{self.path.name}",
            boundary=boundary,
            quantity=self.quantity,
            update_period_s=self.median_interval_s,
            averaging_window_s=None,
            resolution=None,
            stamped_by="sensor",
            device=str(self.path),
            notes=(
                f"meter log ({self.columns[1]} over {self.columns[0]}); update_period_s is the "
                f"median log interval; clock offset {offset}: {self.offset_source}"
            ),
        )

    @property
    def samples(self) -> Samples:
        """The whole log as Samples on the host monotonic clock (boundary ``node``).

        Raises ReplayError when the log is unaligned (relative stamps, no offset)."""
        t_ns = self.t_ns
        if t_ns is None:
            raise ReplayError(
                f"{self.path}: relative stamps and no clock_offset_s: cannot place the log on "
                "the host clock (give an offset, e.g. from estimate_offset)"
            )
        return Samples(self.source_info(), t_ns, self.value)

    def with_offset(self, clock_offset_s: float, source: str = "given by the caller") -> ReplayLog:
        """The same log mapped with another offset (s), e.g. one from ``estimate_offset``."""
        return replace(self, clock_offset_s=float(clock_offset_s), offset_source=source)

    @property
    def median_interval_s(self) -> float | None:
        """The median time between logged rows (s), None for a one-row log."""
        if self.log_t_s.size < 2:
            return None
        return float(np.median(np.diff(self.log_t_s)))

    def power(self) -> tuple[np.ndarray, np.ndarray]:
        """The log as (log-clock s, W): power as logged, or for an energy log the average
        power of each interval (differences of J over s), stamped at the interval's middle,
        the instant an interval average describes without bias on a linear trend."""
        if self.quantity == "power":
            return self.log_t_s, self.value
        mid_t_s = 0.5 * (self.log_t_s[1:] + self.log_t_s[:-1])
        return mid_t_s, np.diff(self.value) / np.diff(self.log_t_s)


def _csv_rows(path: Path, text: str) -> tuple[set[str], list[tuple[int, dict]]]:
    """The header's lower-case column names, and (line number, {column: text}) per data row."""
    lines = [
        (i, ln)
        for i, ln in enumerate(text.splitlines(), 1)
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    parsed = list(csv.reader(ln for _, ln in lines))
    header = [h.strip().lower() for h in parsed[0]]
    if len(set(header)) != len(header):
        raise ReplayError(f"{path}: the header repeats a column: {','.join(header)}")
    rows = []
    for (line_no, _), cells in zip(lines[1:], parsed[1:], strict=False):
        if len(cells) != len(header):
            raise ReplayError(
                f"{path}: line {line_no}: {len(cells)} fields, the header has {len(header)}"
            )
        rows.append((line_no, {h: c.strip() for h, c in zip(header, cells, strict=False)}))
    return set(header), rows


def _jsonl_rows(path: Path, text: str) -> tuple[set[str], list[tuple[int, dict]]]:
    """Every key any object has (lower case), and (line number, {key: value}) per object."""
    rows = []
    for line_no, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            obj = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise ReplayError(f"{path}: line {line_no}: not JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise ReplayError(f"{path}: line {line_no}: not a JSON object")
        rows.append((line_no, {str(k).strip().lower(): v for k, v in obj.items()}))
    return {k for _, row in rows for k in row}, rows


def _columns(path: Path, header: set[str], quantity: str | None) -> tuple[str, str, str]:
    """(time column, value column, "power" | "energy") from the names the log has."""
    t_col = next((c for c in TIME_COLUMNS if c in header), None)
    if t_col is None:
        raise ReplayError(
            f"{path}: no time column ({' or '.join(TIME_COLUMNS)}); "
            f"columns are {', '.join(sorted(header))}"
        )
    power_col = next((c for c in POWER_COLUMNS if c in header), None)
    energy_col = next((c for c in ENERGY_COLUMNS if c in header), None)
    if quantity == "power":
        energy_col = None
    elif quantity == "energy":
        power_col = None
    if power_col and energy_col:
        raise ReplayError(
            f"{path}: both a power ({power_col}) and an energy ({energy_col}) column: "
            "pass quantity='power' or 'energy'"
        )
    if power_col:
        return t_col, power_col, "power"
    if energy_col:
        return t_col, energy_col, "energy"
    wanted = {"power": POWER_COLUMNS, "energy": ENERGY_COLUMNS}.get(
        quantity or "", POWER_COLUMNS + ENERGY_COLUMNS
    )
    raise ReplayError(
        f"{path}: no value column ({', '.join(wanted)}); columns are {', '.join(sorted(header))}"
    )


def _number(path: Path, line_no: int, column: str, raw) -> float:
    if isinstance(raw, bool):
        raw = None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ReplayError(f"{path}: line {line_no}: bad {column} value {raw!r}") from None
    if not math.isfinite(value):
        raise ReplayError(f"{path}: line {line_no}: {column} is {raw!r}, not a finite number")
    return value


def _parse(
    path: Path, rows: list[tuple[int, dict]], t_col: str, v_col: str, kind: str
) -> tuple[np.ndarray, np.ndarray]:
    """The stamps and values, checked row by row: finite numbers, time strictly increasing,
    power not negative, energy not decreasing."""
    if not rows:
        raise ReplayError(f"{path}: no data rows after the header")
    t_s = np.empty(len(rows))
    values = np.empty(len(rows))
    for i, (line_no, row) in enumerate(rows):
        t_s[i] = _number(path, line_no, t_col, row.get(t_col))
        values[i] = _number(path, line_no, v_col, row.get(v_col))
        if i and t_s[i] <= t_s[i - 1]:
            raise ReplayError(
                f"{path}: line {line_no}: {t_col}={row.get(t_col)} does not increase "
                f"(previous row {t_s[i - 1]!r})"
            )
        if kind == "power" and values[i] < 0:
            raise ReplayError(f"{path}: line {line_no}: negative power {row.get(v_col)!r}")
        if kind == "energy" and i and values[i] < values[i - 1]:
            raise ReplayError(
                f"{path}: line {line_no}: energy decreases ({row.get(v_col)!r} after "
                f"{values[i - 1]!r}): a counter reset?"
            )
    return t_s, values


class ReplaySource(PowerSource):
    """A meter log replayed in real time: ``read`` gives the last logged value at or before
    now, stamped with its logged time mapped to the host monotonic clock."""

    def __init__(self, log: ReplayLog, boundary: str = "node", name: str | None = None) -> None:
        if boundary not in BOUNDARIES:
            raise ValueError(f"boundary must be one of {BOUNDARIES}, got {boundary!r}")
        self.log = log
        if log.clock_offset_s is None:
            # A relative log with no offset: replay it from now, the only anchor there is.
            offset_s = time.monotonic_ns() * 1e-9 - float(log.log_t_s[0])
            self.log = log.with_offset(
                offset_s, "replayed from the source's creation: not aligned to anything"
            )
        self._t_ns = self.log.t_ns
        self._last_buffered_ns: int | None = None
        self.info = self.log.source_info(boundary=boundary, name=name)

    def read(self) -> tuple[int, float]:
        """(host monotonic ns of the newest logged row at or before now, its W or J)."""
        now_ns = time.monotonic_ns()
        i = int(np.searchsorted(self._t_ns, now_ns, side="right")) - 1
        if i < 0:
            raise SourceError(
                f"replay {self.log.path.name}: no logged value yet (the log starts in "
                f"{(self._t_ns[0] - now_ns) * 1e-9:.3g} s)"
            )
        return int(self._t_ns[i]), float(self.log.value[i])

    def read_buffered(self) -> tuple[np.ndarray, np.ndarray]:
        """The logged rows stamped after the previous call and at or before now."""
        now_ns = time.monotonic_ns()
        start = (
            0
            if self._last_buffered_ns is None
            else int(np.searchsorted(self._t_ns, self._last_buffered_ns, side="right"))
        )
        stop = int(np.searchsorted(self._t_ns, now_ns, side="right"))
        if stop > start:
            self._last_buffered_ns = int(self._t_ns[stop - 1])
        return self._t_ns[start:stop].copy(), self.log.value[start:stop].copy()


def discover(
    power_log: str | Path, clock_offset_s: float | None = None, boundary: str = "node"
) -> tuple[list[PowerSource], list[str]]:
    """A ReplaySource for ``power_log``. An explicitly requested log that cannot be loaded
    raises ReplayError (one line) rather than becoming a reason: the run asked for it."""
    log = ReplayLog.load(power_log, clock_offset_s=clock_offset_s)
    return [ReplaySource(log, boundary=boundary)], []


@dataclass(frozen=True)
class OffsetEstimate:
    """The clock offset that best aligns a log with a reference trace.

    ``offset_s``: log_time + offset_s = host monotonic s; ``correlation``: Pearson r at that
    offset; ``confidence``: r clipped to [0, 1], and 0 when the best offset lies on the edge
    of the searched range (the true one may be outside it); ``n_points``: log rows compared;
    ``step_s``: the search step, the resolution of ``offset_s``.
    """

    offset_s: float
    correlation: float
    confidence: float
    n_points: int
    step_s: float
    at_search_edge: bool


def _as_trace(samples, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(t s, W) from Samples (host ns), a ReplayLog (its log clock) or a (t_s, value) pair."""
    if isinstance(samples, Samples):
        return samples.t_ns.astype(np.float64) * 1e-9, samples.value
    if isinstance(samples, ReplayLog):
        return samples.power()
    t_s, value = samples
    t_s = np.asarray(t_s, dtype=np.float64)
    value = np.asarray(value, dtype=np.float64)
    if t_s.shape != value.shape or t_s.ndim != 1:
        raise ValueError(f"{name}: times and values must be 1-D arrays of one length")
    if t_s.size > 1 and np.any(np.diff(t_s) <= 0):
        raise ValueError(f"{name}: times must increase strictly")
    return t_s, value


def indicator_from_windows(windows_ns: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """A busy/idle reference trace from device windows (start, end) in host monotonic ns:
    (t s, 1.0 from each start, 0.0 from each end), for ``estimate_offset``."""
    pairs = sorted((int(a), int(b)) for a, b in windows_ns)
    t = np.array([x for a, b in pairs for x in (a, b)], dtype=np.float64) * 1e-9
    v = np.tile([1.0, 0.0], len(pairs))
    keep = np.concatenate((np.diff(t) > 0, [True])) if t.size else np.array([], bool)
    return t[keep], v[keep]


def estimate_offset(
    log_samples,
    reference_samples,
    max_lag_s: float = 10.0,
    step_s: float = 0.01,
    initial_offset_s: float | None = None,
) -> OffsetEstimate:
    """The clock offset (s) that maximises the correlation between a meter log's power and a
    reference power trace on the host monotonic clock.

    ``log_samples``: a ReplayLog (an energy log is differenced to power) or (log-clock s, W);
    ``reference_samples``: Samples or (host monotonic s, W or a 0/1 busy indicator). The
    offsets searched are ``initial_offset_s ± max_lag_s`` in steps of ``step_s`` (s);
    ``initial_offset_s`` defaults to the log's own offset if it has one, else to the one that
    lines up the two traces' first stamps.

    Each log row is compared, as a point sample at its stamp, with the reference's last value
    at or before the shifted stamp. A meter that logs power averaged over an interval and
    stamps the interval's end describes the interval's middle, so the offset found is about
    half an interval smaller than the stamps' true offset: add it back, or pass a reference
    averaged the same way. (An energy log is differenced to mid-interval stamps already.)
    """
    if step_s <= 0 or max_lag_s < 0:
        raise ValueError("step_s must be > 0 and max_lag_s >= 0")
    log_t, log_v = _as_trace(log_samples, "log_samples")
    ref_t, ref_v = _as_trace(reference_samples, "reference_samples")
    if log_t.size < 3 or ref_t.size < 2:
        raise ValueError("need at least 3 log rows and 2 reference samples")
    if initial_offset_s is None:
        if isinstance(log_samples, ReplayLog) and log_samples.clock_offset_s is not None:
            initial_offset_s = log_samples.clock_offset_s
        else:
            initial_offset_s = float(ref_t[0] - log_t[0])
    n_steps = int(math.ceil(max_lag_s / step_s - 1e-9))
    offsets = initial_offset_s + step_s * np.arange(-n_steps, n_steps + 1)
    r = np.full(offsets.size, np.nan)
    counts = np.zeros(offsets.size, dtype=np.int64)
    log_centred = log_v - log_v.mean()
    for k, offset in enumerate(offsets):
        host_t = log_t + offset
        valid = (host_t >= ref_t[0]) & (host_t <= ref_t[-1])
        n = int(valid.sum())
        if n < 3:
            continue
        ref_at = ref_v[np.searchsorted(ref_t, host_t[valid], side="right") - 1]
        x = log_centred[valid] - log_centred[valid].mean()
        y = ref_at - ref_at.mean()
        denom = math.sqrt(float(x @ x) * float(y @ y))
        if denom > 0:
            r[k] = float(x @ y) / denom
            counts[k] = n
    if np.all(np.isnan(r)):
        raise ValueError(
            "the log and the reference never overlap with enough variation to correlate in "
            f"the searched offsets ({offsets[0]:.6g} .. {offsets[-1]:.6g} s)"
        )
    # Only offsets at which the log covers (nearly) as much of the reference as it can
    # compete: a shift that leaves most of the reference uncovered can match one part of it
    # by chance (one repeated pattern laid over another) with a higher r.
    r = np.where(counts >= 0.9 * counts.max(), r, np.nan)
    best = int(np.nanargmax(r))
    # A step-like reference (a busy/idle indicator) gives exactly equal r over every offset
    # that moves no log row across an edge: all of them fit the data equally, so take the
    # middle of that run rather than its first offset.
    ties = np.nan_to_num(r, nan=-np.inf) >= r[best] - 1e-12 * abs(r[best])
    lo, hi = best, best
    while lo > 0 and ties[lo - 1]:
        lo -= 1
    while hi < offsets.size - 1 and ties[hi + 1]:
        hi += 1
    best = (lo + hi) // 2
    at_edge = n_steps > 0 and best in (0, offsets.size - 1)
    return OffsetEstimate(
        offset_s=float(offsets[best]),
        correlation=float(r[best]),
        confidence=0.0 if at_edge else float(min(max(r[best], 0.0), 1.0)),
        n_points=int(counts[best]),
        step_s=step_s,
        at_search_edge=bool(at_edge),
    )
