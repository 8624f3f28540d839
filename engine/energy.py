"""Energy attributed to time windows from a power source's samples, with uncertainty.

A window is a span [start_ns, end_ns] of host-monotonic time (from device stamps);
``attribute`` estimates the energy (J) of many windows at once from one source's
``Samples``, with an expanded uncertainty, the fraction of each window the sensor observed,
and whether the window can be attributed at all (with the reason if not).

The model
---------
1. Updates. Sensor-stamped samples are sensor updates at their stamps. In poll-stamped
   samples a value change between two polls is an update between them: placed at the
   midpoint, +- half the poll gap. (An unchanged value is not an update: harmless for
   power; a counter under load always advances. No change for longer than ``max_gap_s``
   is a gap.)
2. Spans. The updates cut time into spans of known mean power.
   - Integrating counter (energy, ``averaging_window_s`` None): span k is (u_{k-1}, u_k]
     with energy E_k - E_{k-1}, exact; the whole time is observed (coverage 1).
   - Power reading averaging over w (0 or None: instantaneous): reading k is the mean over
     [u_k - w, u_k], held over a span centred on that window (span edges half-way between
     consecutive window centres): unbiased for linear trends and, for a step at a random
     phase, on average. Only the window part of a span is observed. A sampled counter (its
     increments are a w-window mean times the interval) is read as such power readings,
     each seeing w / period of the time since the previous one (more after lost updates).
   Energy over whole spans is a cumulative sum; windows find their spans by
   ``searchsorted``; the per-window arithmetic is one compiled pass (numba).
3. Edges: a two-level model. A span straddling a window edge mixes inside and outside
   power; splitting it in proportion to time is biased when power steps at the edge (an
   integrating counter loses dP * t_in * t_out / L per edge, ~dP * period / 6 on average).
   Instead the outside part is taken at the outside level, the power of the nearest span of
   the same kind as that outside part, and the inside part at the inside level:
   - counter: with a span wholly inside the window (and a known spread inside), the
     straddled span's energy is split in proportion to P_out * t_out : P_in * t_in (energy
     conserved); otherwise the inside part is the span's energy less P_out * t_out, clipped
     to [0, span energy];
   - power: the inside part of an edge span takes the level of its own reading if that
     reading's window lies inside the window even with its timing uncertainty; else the
     surer (smaller uncertainty) of the next reading's level (wholly inside) and its own
     reading's with the outside part removed at P_out. A window within two spans takes one
     level from its readings (only those surely inside, if any; else with the outside
     parts of readings across an edge removed at P_out); a window no reading surely saw
     (its inside part within the readings' timing uncertainty) is invalid (coverage 0).
   ``edges="step"`` (default) means power changes at the window edges, as it does around
   the kernel activity the engine stamps: "same kind" is decided from the windows
   themselves (a span with no window time is outside; one wholly in windows, e.g. adjacent
   windows, is inside), within ``NEAR_SPANS`` of the edge. An outside part partly in other
   windows (windows closer than an update period) takes each level for its share; a pause
   with no wholly-outside span near lies between 0 and the window level (the middle, +-
   half, in the uncertainty). With no span of the kind needed near, the window is invalid.
   ``edges="free"`` assumes nothing: the outside level is the span beside the edge and
   the whole two-level correction (two-level minus linear split) goes into the
   uncertainty (``idle_power`` uses it).
4. Uncertainty. Expanded; systematic terms at full size, random terms at
   ``COVERAGE_FACTOR`` (k = 5) times their estimated standard deviations (the estimates
   come from a few spans: k leaves room for their own error); a window's uncertainty is
   the sum of the two parts.
   - systematic (the sign may be shared by many windows; ``pooled`` adds them linearly):
     the trend of the outside level (change between the two nearest spans of that kind,
     times the outside time it is applied to, scaled up like the inside level it feeds),
     for a counter the inside trend and the step model's energy mismatch |E_span - P_out *
     t_out - P_in * t_in|, for power the trend of an inside level carried from the next
     reading; (free) the two-level correction; window-edge timing ``align_ns`` x the
     power at the edge; the sensor's resolution. Counter edge terms are capped by
     non-negative power (part of a span's energy lies in [0, span energy]).
   - random (independent between windows; in quadrature when pooling), with sigma the
     spread of span powers after removing trends (squared second differences / 6, RMS;
     "step": over spans of the same kind near the edge, else over all such spans; "free":
     around the span, or the largest nearby value where a load changes):
     counter: fluctuation unresolved inside a straddled span, k * sigma * sqrt(L * min(L,
     4 t)) for the part t that carries it; update timing, dt x the power at the edge.
     power: each span's unobserved part g (the span not in its reading's window, plus
     twice the reading's timing uncertainty) k * sigma * sqrt(g * (g + w)) (a window mean
     spreads less than the power over a shorter unobserved part), in quadrature over the
     spans; the same for the inside parts of edge spans and the unobserved part of a short
     window ("step": where a window has too few spans of its own, sigma is the spread of
     the mean levels of windows of about the same length, within a factor 2: the same work
     repeated at random phases, differences in the work only making it larger); the
     outside levels' spread where a reading's outside part is removed; update timing x
     the power step at span edges and x |inside - outside| for readings an edge may cut.
     "step" also bounds the level error by that spread of window levels times the
     unobserved time: readings of a periodic load err together for many updates when its
     phase drifts slowly against the sensor's, which no spread inside one window shows.
   Not included: the sensor's gain error (a software sensor is not a calibrated meter;
   ``cross_check`` compares two sensors), and power changes the sensor cannot see at all:
   a burst shorter than the unobserved part of a span, a load phase-locked to (or beating
   slowly with) the sensor's updates seen in a single window, a window whose load differs
   from the spans the levels come from, fluctuation that every reading averages away but
   its unobserved part does not (a kernel period dividing the averaging window). On random
   loads (steps and ramps lasting >= 3 update periods, 2-10 ms kernels, noise, 40-1000 W)
   and random sensors (1-200 ms, windows 10-100%, jitter, drops, resolution) all 5,622
   valid windows of 300 traces fell within their uncertainty with "free" (median
   uncertainty 5% of the energy for windows of 2-4 s); on random decode workloads with
   "step", 2,878 of 2,891 (99.5%): the misses were kernels beating with the sensor's
   updates or averaging window.
5. Validity. A window is invalid (NaN energy, a reason) if its end is not after its start,
   there is no full span before or after it, a gap between updates longer than
   ``max_gap_s`` (or a counter going backwards) lies in or next to it, or for the reasons
   above.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numba import njit

from engine.power.base import Samples

NS_PER_S = 1e9
#: Coverage factor on the random terms (their standard deviations are estimated from a few
#: spans; 5 leaves room for that estimate's own error).
COVERAGE_FACTOR = 5.0
#: Spans each side used for the spread of span powers around a span.
SPREAD_SPANS = 5
#: How far (spans) from a window edge "step" looks for the outside level and spreads.
NEAR_SPANS = 12
#: A span with less than this fraction (or more than 1 - it) of its time in windows is
#: wholly outside (inside) windows.
PURE_TOL = 0.01
EDGE_MODELS = ("step", "free")
# Why a window is invalid beyond the common checks.
_OK, _NO_OBS, _NO_OUTSIDE = 0, 1, 2


@dataclass
class WindowEnergy:
    """Energy attributed to each window (J), with its expanded uncertainty (J).

    ``coverage``: the fraction of each window's time the sensor observed (0..1).
    ``systematic_j`` + ``random_j`` = ``uncertainty_j``: the parts ``pooled`` adds linearly
    and in quadrature. Invalid windows have NaN energy and a reason.
    """

    energy_j: np.ndarray
    uncertainty_j: np.ndarray
    coverage: np.ndarray
    valid: np.ndarray
    reasons: list[str | None]
    method: str
    systematic_j: np.ndarray | None = None
    random_j: np.ndarray | None = None


@dataclass
class _Spans:
    """A source's samples as spans of known mean power (internal)."""

    b_ns: np.ndarray  # n + 1 span edges
    db_ns: np.ndarray  # n + 1 timing half-widths of the edges
    du_ns: np.ndarray  # n timing half-widths of each span's reading (power)
    p_w: np.ndarray  # n mean powers
    e_j: np.ndarray  # n energies
    os_ns: np.ndarray  # n observed part of each span: [os, oe]
    oe_ns: np.ndarray
    ws_ns: np.ndarray  # n each reading's whole averaging window [ws, we] (may overlap)
    we_ns: np.ndarray
    bad: np.ndarray  # n: a gap or a counter going backwards
    gap_s: np.ndarray  # n: the gap length that made a span bad (else 0)
    counter: bool
    resolution_w_s: float  # energy per second of window from rounding the value (J/s)
    resolution_j: float  # energy per window from counter quantisation (J)


def sensor_updates(samples: Samples) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sensor update instants (float ns, strictly increasing), their timing half-widths
    (ns), and values: sensor-stamped samples as they are; in poll-stamped ones each value
    change, placed half-way between the two polls around it."""
    t_ns = samples.t_ns
    v = samples.value
    if samples.info.stamped_by == "sensor":
        keep = np.ones(t_ns.size, bool)
        keep[:-1] = t_ns[1:] > t_ns[:-1]  # of equal stamps keep the last value
        return t_ns[keep].astype(np.float64), np.zeros(int(keep.sum())), v[keep]
    if t_ns.size < 2:
        empty = np.zeros(0)
        return empty, empty, empty
    ch = np.flatnonzero(v[1:] != v[:-1]) + 1
    lo, hi = t_ns[ch - 1].astype(np.float64), t_ns[ch].astype(np.float64)
    u, d, val = 0.5 * (lo + hi), 0.5 * (hi - lo), v[ch]
    keep = np.ones(u.size, bool)
    keep[:-1] = u[1:] > u[:-1]
    return u[keep], d[keep], val[keep]


def _spans(samples: Samples, max_gap_s: float) -> _Spans:
    info = samples.info
    u, d, v = sensor_updates(samples)
    res = float(info.resolution or 0.0)
    max_gap_ns = max_gap_s * NS_PER_S
    if info.quantity == "energy" and info.averaging_window_s is None:
        if u.size < 2:
            raise ValueError("fewer than 2 counter updates in the samples")
        e = np.diff(v)
        length = np.diff(u)
        gap = (u[1:] + d[1:]) - (u[:-1] - d[:-1])
        bad = (e < 0) | (gap > max_gap_ns)
        return _Spans(
            b_ns=u,
            db_ns=d,
            du_ns=np.zeros(e.size),
            p_w=e / (length / NS_PER_S),
            e_j=e,
            os_ns=u[:-1],
            oe_ns=u[1:],
            ws_ns=u[:-1],
            we_ns=u[1:],
            bad=bad,
            gap_s=np.where(gap > max_gap_ns, gap / NS_PER_S, np.where(e < 0, -1.0, 0.0)),
            counter=True,
            resolution_w_s=0.0,
            resolution_j=3.0 * res,
        )
    w_ns: float | np.ndarray = float(info.averaging_window_s or 0.0) * NS_PER_S
    res_w = res
    backwards = np.zeros(0, bool)
    if info.quantity == "energy":
        # A sampled counter: each increment is a window's mean power times the interval,
        # so an increment over k intervals (updates lost in between) saw k windows: read
        # as a mean over the same fraction of its interval, at its end.
        de = np.diff(v)
        backwards = de < 0
        dt_s = np.diff(u) / NS_PER_S
        v = de / dt_s
        period_s = info.update_period_s or (float(np.median(dt_s)) if dt_s.size else 1.0)
        w_ns = min(1.0, float(w_ns) / NS_PER_S / period_s) * dt_s * NS_PER_S
        # The reading divides by an interval whose two ends are both uncertain.
        u, d = u[1:], d[1:] + d[:-1]
        res_w = res / float(np.median(dt_s)) if dt_s.size else res
    if u.size < 3:
        raise ValueError("fewer than 3 sensor updates in the samples")
    n = u.size
    c = u - 0.5 * w_ns
    b = np.empty(n + 1)
    b[1:-1] = 0.5 * (c[:-1] + c[1:])
    b[0] = c[0] - 0.5 * (c[1] - c[0])
    b[-1] = c[-1] + 0.5 * (c[-1] - c[-2])
    db = np.empty(n + 1)
    db[1:-1] = 0.5 * (d[:-1] + d[1:])
    db[0], db[-1] = d[0], d[-1]
    length_s = np.diff(b) / NS_PER_S
    w_eff = np.maximum(w_ns, 1.0)  # an instantaneous reading still marks its instant
    os_ns = np.maximum(u - w_eff, b[:-1])
    oe_ns = np.minimum(u, b[1:])
    oe_ns = np.maximum(oe_ns, os_ns)
    # A gap between consecutive updates spoils the spans on both sides of it.
    gap = (u[1:] + d[1:]) - (u[:-1] - d[:-1])
    long = gap > max_gap_ns
    g_s = np.where(long, gap / NS_PER_S, 0.0)
    gap_s = np.zeros(n)
    gap_s[:-1] = g_s
    gap_s[1:] = np.maximum(gap_s[1:], g_s)
    if backwards.size:
        gap_s = np.where(backwards & (gap_s == 0), -1.0, gap_s)
    return _Spans(
        b_ns=b,
        db_ns=db,
        du_ns=d,
        p_w=v,
        e_j=v * length_s,
        os_ns=os_ns,
        oe_ns=oe_ns,
        ws_ns=u - w_eff,
        we_ns=u,
        bad=gap_s != 0,
        gap_s=gap_s,
        counter=False,
        resolution_w_s=0.5 * res_w,
        resolution_j=0.0,
    )


def _cum(x: np.ndarray) -> np.ndarray:
    out = np.empty(x.size + 1)
    out[0] = 0.0
    np.cumsum(x, out=out[1:])
    return out


class _Spread:
    """Detrended spread of span powers (W): second differences of consecutive span powers
    over sqrt(6) (the standard deviation of independent span errors), as RMS over ranges.
    ``s2``: the squared second differences / 6 (NaN where undefined); with ``mask`` only
    those whose three spans are all in the mask count."""

    def __init__(self, s2: np.ndarray, mask: np.ndarray | None = None) -> None:
        self.n = n = s2.size
        self.cum = np.empty(n + 1)
        self.cnt = np.empty(n + 1)
        _masked_cums(s2, mask if mask is not None else np.zeros(0, np.bool_), self.cum, self.cnt)

    def rms(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """RMS spread over span indices [lo, hi] (inclusive, clipped); NaN where empty."""
        lo = np.clip(lo, 0, self.n)
        hi = np.maximum(np.clip(np.asarray(hi) + 1, 0, self.n), lo)
        k = self.cnt[hi] - self.cnt[lo]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.sqrt((self.cum[hi] - self.cum[lo]) / k)

    def overall(self) -> float:
        """RMS spread over all spans (NaN where none count)."""
        return float(np.sqrt(self.cum[-1] / self.cnt[-1])) if self.cnt[-1] > 0 else np.nan


@njit(cache=True)
def _masked_cums(s2, mask, cum, cnt):
    """Cumulative sums of the finite ``s2[j]`` whose spans j-1, j, j+1 are all in ``mask``
    (an empty mask: all spans), and of their count (one pass)."""
    n = s2.size
    every = mask.size == 0
    cum[0] = 0.0
    cnt[0] = 0.0
    for j in range(n):
        ok = np.isfinite(s2[j]) and 0 < j < n - 1
        if ok and not every:
            ok = mask[j - 1] and mask[j] and mask[j + 1]
        cum[j + 1] = cum[j] + (s2[j] if ok else 0.0)
        cnt[j + 1] = cnt[j] + (1.0 if ok else 0.0)


def _second_diff2(p_w: np.ndarray) -> np.ndarray:
    s2 = np.full(p_w.size, np.nan)
    if p_w.size >= 3:
        s2[1:-1] = (p_w[2:] - 2.0 * p_w[1:-1] + p_w[:-2]) ** 2 / 6.0
    return s2


def _window_time(a: np.ndarray, b: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """W(t): the time (ns) before t that lies in any window (windows must not overlap)."""
    ok = np.isfinite(a) & np.isfinite(b) & (b > a)
    starts, ends = a[ok], b[ok]
    if starts.size and np.any(starts[1:] < starts[:-1]):
        order = np.argsort(starts, kind="stable")
        starts, ends = starts[order], ends[order]
    dur = ends - starts
    if starts.size == 0:
        return np.zeros_like
    before = _cum(dur)

    def w(t: np.ndarray) -> np.ndarray:
        if t.size > 4 * starts.size and np.all(t[1:] >= t[:-1]):
            out = np.empty(t.size)
            _window_time_sorted(starts, dur, before, t, out)
            return out
        k = np.searchsorted(starts, t, side="right") - 1
        kc = np.maximum(k, 0)
        return np.where(k >= 0, before[kc] + np.clip(t - starts[kc], 0.0, dur[kc]), 0.0)

    return w


@njit(cache=True)
def _window_time_sorted(starts, dur, before, t, out):
    """``_window_time`` for sorted query times: one merge pass over windows and times."""
    k = -1
    for i in range(t.size):
        while k + 1 < starts.size and starts[k + 1] <= t[i]:
            k += 1
        out[i] = 0.0 if k < 0 else before[k] + min(max(t[i] - starts[k], 0.0), dur[k])


@njit(cache=True)
def _nearest_scan(mask, i, step, limit, none, out):
    """For each start index i, the first index at or beyond it (by ``step``) where
    ``mask`` is set, looking ``limit`` spans at most; ``none`` where there is none."""
    n = mask.size
    for q in range(i.size):
        j = i[q]
        out[q] = none
        for _ in range(limit + 1):
            if j < 0 or j >= n:
                break
            if mask[j]:
                out[q] = j
                break
            j += step


@njit(cache=True)
def _rolling_rms(cum, cnt, h, fallback, out):
    """Per span j, the RMS (sqrt of the mean) over spans j-h..j+h of what ``cum``/``cnt``
    accumulate; ``fallback`` where none counts."""
    n = out.size
    for j in range(n):
        lo = max(j - h, 0)
        hi = min(j + h + 1, n)
        k = cnt[hi] - cnt[lo]
        out[j] = np.sqrt((cum[hi] - cum[lo]) / k) if k > 0 else fallback


class _Context:
    """What the edges need besides their own spans, per window: the outside level beside
    each edge (``po``, W) and how far it may be off (``uo``, W), the spreads outside and
    inside each edge (``sig_o``, ``sig_i``, W; inside NaN where nothing tells), and why the
    window cannot be attributed (``trouble``). Per span, on demand: ``local_at`` (the
    spread around a span, load changes included) and ``interior`` (for spans inside
    windows).

    "free": the outside level is the span beside the edge; spreads are the straddled span's
    own. "step": the outside level comes from the nearest span of the same kind (wholly
    outside windows, or wholly inside windows where windows are adjacent) as the outside
    part of the straddled span, within NEAR_SPANS; spreads come from spans of the same
    kind, so the steps at window edges do not count as fluctuation.
    """

    def __init__(self, sp: _Spans, a, b, ja, jb, edges: str) -> None:
        p = sp.p_w
        n = p.size
        self.n = n
        self.s2 = _second_diff2(p)
        self._every: _Spread | None = None
        self.busy_sp: _Spread | None = None
        self.trouble = np.zeros(a.size, np.int8)

        def at(x, i):
            return x[np.clip(i, 0, n - 1)]

        if edges == "free":
            self.po_a, self.po_b = p[ja - 1], at(p, jb + 1)
            self.uo_a = np.abs(self.po_a - at(p, ja - 2))
            self.uo_b = np.abs(self.po_b - at(p, jb + 2))
            self.sig_oa = self.sig_ia = self.local_at(ja)
            self.sig_ob = self.sig_ib = self.local_at(jb)
            return

        bn = sp.b_ns
        win_time = _window_time(a, b)
        wb = win_time(bn)
        length = bn[1:] - bn[:-1]
        frac = (wb[1:] - wb[:-1]) / length
        idle, busy = frac < PURE_TOL, frac > 1.0 - PURE_TOL
        idle_sp, busy_sp = _Spread(self.s2, idle), _Spread(self.s2, busy)
        self.busy_sp = busy_sp
        # The outside part of each straddled span: the fraction of it in other windows.
        tout_a, tout_b = a - bn[ja], bn[jb + 1] - b
        with np.errstate(invalid="ignore", divide="ignore"):
            fo_a = np.where(tout_a > 0, (win_time(a) - wb[ja]) / tout_a, 0.0)
            fo_b = np.where(tout_b > 0, (wb[jb + 1] - win_time(b)) / tout_b, 0.0)
        fo_a, fo_b = np.clip(fo_a, 0.0, 1.0), np.clip(fo_b, 0.0, 1.0)
        masks = {"idle": idle, "busy": busy}

        def nearest(kind: str, i: np.ndarray, step: int) -> np.ndarray:
            """Index of the nearest span of a kind at or beyond i in direction ``step``
            (-1: at or before, +1: at or after), within NEAR_SPANS + 1; -1 or n where none."""
            out = np.empty(np.shape(i), np.int64)
            none = n if step > 0 else -1
            _nearest_scan(masks[kind], np.asarray(i, np.int64), step, NEAR_SPANS + 1, none, out)
            return out

        def level(kind: str, edge_j, step: int):
            """The nearest span of a kind beyond the edge span: its power (W, NaN if none
            within NEAR_SPANS), the change to the next one of that kind (W), its index.
            Spans in windows may also come from the other side (the same work)."""
            src = nearest(kind, edge_j + step, step)
            ok = (src >= 0) & (src < n) & (np.abs(src - edge_j) <= NEAR_SPANS)
            use = np.zeros(src.shape, bool)
            if kind == "busy" and not np.all(ok):
                other = nearest(kind, edge_j - step, -step)
                use = ~ok & (other >= 0) & (other < n) & (np.abs(other - edge_j) <= NEAR_SPANS)
                src = np.where(use, other, src)
                ok |= use
            sc = np.clip(src, 0, n - 1)
            src2 = nearest(kind, sc + step, step)
            if np.any(use):
                src2[use] = nearest(kind, sc[use] - step, -step)
            ok2 = ok & (src2 >= 0) & (src2 < n) & (np.abs(src2 - sc) <= NEAR_SPANS)
            # The change between the two nearest, carried over the distance to the edge.
            reach = np.maximum(1.0, np.abs(edge_j - sc) / np.maximum(np.abs(sc - src2), 1))
            trend = np.where(ok2, np.abs(p[sc] - at(p, src2)) * reach, np.nan)
            fill = ok & ~ok2
            if np.any(fill):
                trend[fill] = self.local_at(sc[fill])
            return np.where(ok, p[sc], np.nan), trend, sc

        def outside(fo, edge_j, step):
            """Outside level (W) and its uncertainty (W) for an outside part whose fraction
            ``fo`` lies in other windows: that fraction at the level of the nearest span
            wholly in windows, the rest at the nearest wholly outside windows. Where the
            rest (a pause shorter than a span between windows) has no such span near, it
            lies between 0 and the level of the windows (or of the straddled span): the
            middle, +- half."""
            pb, tb, sb = level("busy", edge_j, step)
            pi, ti, si = level("idle", edge_j, step)
            in_w, out_w = fo > 1.0 - PURE_TOL, fo < PURE_TOL
            known = np.isfinite(pi)
            half = 0.5 * np.fmax(pb, at(p, edge_j))
            rest, rest_u = np.where(known, pi, half), np.where(known, ti, half)
            mix = fo * np.nan_to_num(pb) + (1.0 - fo) * rest
            mix_u = fo * np.nan_to_num(tb) + (1.0 - fo) * rest_u
            po = np.where(in_w, pb, np.where(out_w, rest, mix))
            uo = np.where(in_w, tb, np.where(out_w, rest_u, mix_u))
            missing = ~out_w & ~np.isfinite(pb)
            return po, uo, missing, np.where(in_w, sb, si), in_w

        self.po_a, self.uo_a, miss_a, sa, in_a = outside(fo_a, ja, -1)
        self.po_b, self.uo_b, miss_b, sb, in_b = outside(fo_b, jb, 1)
        self.po_a = np.nan_to_num(self.po_a)
        self.po_b = np.nan_to_num(self.po_b)
        self.uo_a = np.nan_to_num(self.uo_a)
        self.uo_b = np.nan_to_num(self.uo_b)
        far = miss_a | miss_b

        def near(spread: _Spread, lo, hi):
            x = spread.rms(lo, hi)
            return np.where(np.isfinite(x), x, spread.overall())

        self.sig_oa = np.where(
            in_a, near(busy_sp, sa - NEAR_SPANS, sa), near(idle_sp, sa - NEAR_SPANS, sa)
        )
        self.sig_ob = np.where(
            in_b, near(busy_sp, sb, sb + NEAR_SPANS), near(idle_sp, sb, sb + NEAR_SPANS)
        )
        self._fill(self.sig_oa, sa)
        self._fill(self.sig_ob, sb)
        self.sig_ia = near(busy_sp, ja + 2, np.minimum(ja + NEAR_SPANS, jb - 2))
        self.sig_ib = near(busy_sp, np.maximum(jb - NEAR_SPANS, ja + 2), jb - 2)
        self.trouble = np.where(far, _NO_OUTSIDE, _OK).astype(np.int8)

    def _fill(self, x: np.ndarray, idx: np.ndarray) -> None:
        bad = ~np.isfinite(x)
        if np.any(bad):
            x[bad] = self.local_at(idx[bad])

    def local_at(self, idx: np.ndarray) -> np.ndarray:
        """Spread (W) around spans ``idx``: the RMS over SPREAD_SPANS each side, or the
        largest single value within two spans where that is larger (a load change)."""
        idx = np.asarray(idx)
        h = SPREAD_SPANS
        if self._every is None:
            self._every = _Spread(self.s2)
        out = self._every.rms(idx - h, idx + h)
        for shift in range(-2, 3):
            out = np.fmax(out, np.sqrt(self.s2[np.clip(idx + shift, 0, self.n - 1)]))
        return np.nan_to_num(out, nan=0.0)

    def interior(self) -> np.ndarray:
        """Per span, the spread (W) used for its unobserved part when it lies inside a
        window: of spans wholly in windows nearby ("step"; NaN where none), else around it."""
        if self.busy_sp is None:
            return self.local_at(np.arange(self.n))
        x = np.empty(self.n)
        _rolling_rms(self.busy_sp.cum, self.busy_sp.cnt, SPREAD_SPANS, self.busy_sp.overall(), x)
        return x


def attribute(
    samples: Samples,
    start_ns,
    end_ns,
    *,
    align_ns: float = 0.0,
    max_gap_s: float = 3.0,
    edges: str = "step",
) -> WindowEnergy:
    """Energy (J) of each window [start_ns, end_ns] (host monotonic ns) from ``samples``.

    ``align_ns``: the timing uncertainty (ns) of the window edges (device-clock mapping).
    ``max_gap_s``: a longer gap between sensor updates in or next to a window invalidates it.
    ``edges``: "step" (power changes at window edges, as around kernel activity; windows
    must not overlap) or "free" (no assumption about where power changes: the two-level
    correction counts fully as uncertainty). See the module docstring for the model.
    Raises ValueError when the samples hold too few sensor updates.
    """
    if edges not in EDGE_MODELS:
        raise ValueError(f"edges must be one of {EDGE_MODELS}, got {edges!r}")
    a = np.atleast_1d(np.asarray(start_ns, dtype=np.float64))
    b = np.atleast_1d(np.asarray(end_ns, dtype=np.float64))
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError("start_ns and end_ns must be 1-D arrays of the same length")
    sp = _spans(samples, max_gap_s)
    method = "counter" if sp.counter else "power"
    if a.size == 0:
        empty = np.zeros(0)
        return WindowEnergy(empty, empty, empty, np.zeros(0, bool), [], method, empty, empty)
    ja, jb, ja_raw, jb_raw = _locate(sp, a, b)
    ctx = _Context(sp, a, b, ja, jb, edges)
    windows = _counter_windows if sp.counter else _power_windows
    est, sys_j, rnd_var, coverage, trouble = windows(sp, a, b, ja, jb, ctx, edges)
    sys_j = sys_j + align_ns / NS_PER_S * _edge_power_w(sp, ja, jb, ctx)
    rnd_j = np.sqrt(rnd_var)
    valid, reasons = _validity(sp, a, b, ja_raw, jb_raw, trouble)
    nan = np.full(a.size, np.nan)
    return WindowEnergy(
        energy_j=np.where(valid, est, nan),
        uncertainty_j=np.where(valid, sys_j + rnd_j, nan),
        coverage=np.where(valid, coverage, nan),
        valid=valid,
        reasons=reasons,
        method=method,
        systematic_j=np.where(valid, sys_j, nan),
        random_j=np.where(valid, rnd_j, nan),
    )


def _locate(sp: _Spans, a: np.ndarray, b: np.ndarray):
    """Span indices of each window's start and end: clipped (so gathers stay in range, with
    a span on either side) and raw."""
    n = sp.p_w.size
    ja = np.searchsorted(sp.b_ns, a, side="right") - 1
    jb = np.searchsorted(sp.b_ns, b, side="left") - 1
    jb_c = np.clip(jb, 1, n - 2)
    ja_c = np.minimum(np.clip(ja, 1, n - 2), jb_c)
    return ja_c, jb_c, ja, jb


def _edge_power_w(sp: _Spans, ja: np.ndarray, jb: np.ndarray, ctx: _Context) -> np.ndarray:
    """The larger power (W) either side of each edge, summed over both edges: moving an
    edge by dt moves at most that power times dt of energy across it."""
    p = np.abs(sp.p_w)
    n = p.size
    pa = np.maximum(np.abs(ctx.po_a), np.maximum(p[ja], p[np.minimum(ja + 1, n - 1)]))
    pb = np.maximum(np.abs(ctx.po_b), np.maximum(p[jb], p[np.maximum(jb - 1, 0)]))
    return pa + pb


@njit(cache=True)
def _ov(lo: float, hi: float, a: float, b: float) -> float:
    """Length of [lo, hi] inside [a, b] (0 if none)."""
    return max(0.0, min(hi, b) - max(lo, a))


@njit(cache=True)
def _fast_j(sig_w: float, t_s: float, length_s: float, k: float) -> float:
    """Fluctuation (J) a counter cannot resolve in a part t of a span: the span-to-span
    spread times sqrt(L * t) (noise), at most the spread times L (a partial cycle)."""
    return k * sig_w * np.sqrt(length_s * min(length_s, 4.0 * t_s))


@njit(cache=True)
def _counter_kernel(a, b, ja, jb, bn, p, e, cum, db, po_a, po_b, uo_a, uo_b, sig_oa, sig_ob,
                    sig_ia, sig_ib, free, k, res_j, est, sys, var):  # fmt: skip
    """Per window: energy, systematic and random-variance parts for a counter (module doc).
    One pass, no temporaries: the windows are many."""
    n = p.size
    for i in range(a.size):
        j0, j1 = ja[i], jb[i]
        dur = (b[i] - a[i]) / NS_PER_S
        len0 = (bn[j0 + 1] - bn[j0]) / NS_PER_S
        if j0 >= j1:
            # Inside one span: the span's energy less its outside parts at outside levels.
            eps = e[j0]
            tl = (a[i] - bn[j0]) / NS_PER_S
            tr = (bn[j0 + 1] - b[i]) / NS_PER_S
            two = min(max(eps - po_a[i] * tl - po_b[i] * tr, 0.0), max(eps, 0.0))
            s = uo_a[i] * tl + uo_b[i] * tr
            if free:
                s += abs(two - eps * dur / len0)
            s = min(s, max(two, eps - two))
            f = np.hypot(_fast_j(sig_oa[i], tl, len0, k), _fast_j(sig_ob[i], tr, len0, k))
            lvl = abs(two) / dur
            t = db[j0] * max(abs(po_a[i]), lvl) + db[j0 + 1] * max(abs(po_b[i]), lvl)
            est[i] = two
            sys[i] = s + res_j
            var[i] = f * f + t * t
            continue
        # The proportional split needs an inside level with a known spread.
        deep = j1 - j0 >= 2 and np.isfinite(sig_ia[i]) and np.isfinite(sig_ib[i])
        total = cum[j1] - cum[j0 + 1]
        s_tot = 0.0
        v_tot = 0.0
        for side in range(2):
            if side == 0:
                j, po, uo, so, si = j0, po_a[i], uo_a[i], sig_oa[i], sig_ia[i]
                tin = (bn[j0 + 1] - a[i]) / NS_PER_S
                tout = (a[i] - bn[j0]) / NS_PER_S
                jin, jin2, has2 = min(j0 + 1, n - 1), min(j0 + 2, n - 1), j0 + 2 < j1
            else:
                j, po, uo, so, si = j1, po_b[i], uo_b[i], sig_ob[i], sig_ib[i]
                tin = (b[i] - bn[j1]) / NS_PER_S
                tout = (bn[j1 + 1] - b[i]) / NS_PER_S
                jin, jin2, has2 = max(j1 - 1, 0), max(j1 - 2, 0), j1 - 2 > j0
            eps = e[j]
            length = (bn[j + 1] - bn[j]) / NS_PER_S
            pi = p[jin]
            s = uo * tout
            if deep:
                den = po * tout + pi * tin
                two = eps * pi * tin / den if den > 0 else eps * tin / (tin + tout)
                s += abs(eps - den)
                if has2:
                    s += abs(pi - p[jin2]) * tin
                f = _fast_j(np.hypot(so, si), min(tin, tout), length, k)
            else:
                two = eps - po * tout
                f = _fast_j(so, tout, length, k)
            two = min(max(two, 0.0), max(eps, 0.0))
            if free:
                s += abs(two - eps * tin / length)
            s_tot += min(s, max(two, eps - two))
            v_tot += f * f
            total += two
        lvl = abs(total) / dur
        t_a = db[j0] * max(abs(po_a[i]), lvl) + (db[j0 + 1] * lvl if deep else 0.0)
        t_b = db[j1 + 1] * max(abs(po_b[i]), lvl) + (db[j1] * lvl if deep else 0.0)
        est[i] = total
        sys[i] = s_tot + res_j
        var[i] = v_tot + t_a * t_a + t_b * t_b


def _counter_windows(sp, a, b, ja, jb, ctx: _Context, edges: str):
    """An integrating counter: whole spans exact, the straddled spans split (module doc)."""
    m = a.size
    est, sys_j, var = np.empty(m), np.empty(m), np.empty(m)
    _counter_kernel(
        a, b, ja, jb, sp.b_ns, sp.p_w, sp.e_j, _cum(sp.e_j), sp.db_ns / NS_PER_S,
        ctx.po_a, ctx.po_b, ctx.uo_a, ctx.uo_b, ctx.sig_oa, ctx.sig_ob, ctx.sig_ia, ctx.sig_ib,
        edges == "free", COVERAGE_FACTOR, sp.resolution_j, est, sys_j, var,
    )  # fmt: skip
    return est, sys_j, var, np.ones(m), ctx.trouble


@njit(cache=True)
def _reading(r, a, b, ws, we, p, po_a, po_b):
    """Reading r (the mean over its whole window [ws, we]) against window [a, b]: its
    inside time (s), outside parts before and after (s), and the inside energy (J) with
    the outside parts at outside levels."""
    t_in = _ov(ws[r], we[r], a, b) / NS_PER_S
    ol = _ov(ws[r], we[r], -np.inf, a) / NS_PER_S
    orr = _ov(ws[r], we[r], b, np.inf) / NS_PER_S
    e_in = p[r] * (we[r] - ws[r]) / NS_PER_S - po_a * ol - po_b * orr
    return t_in, ol, orr, e_in


@njit(cache=True)
def _inside(r, a, b, ws, we, du) -> bool:
    """Whether reading r's window lies inside [a, b] even if its timing is off."""
    return ws[r] - du[r] >= a and we[r] + du[r] <= b


@njit(cache=True)
def _crossing(r, edge, dl, ws, we, du):
    """Energy (J) a reading whose window may cross ``edge`` (given its timing uncertainty)
    moves across it: the inside-outside level difference ``dl`` times that uncertainty."""
    if ws[r] - du[r] < edge < we[r] + du[r]:
        return du[r] / NS_PER_S * dl
    return 0.0


@njit(cache=True)
def _edge_level(
    r, j, jc, edge, a, b, tin, seen, w_len, po, pa, pb, uo, so, si, k, ws, we, p, du, dl
):
    """The inside level (W) of edge span j from reading r (j itself, or the next one
    inside), with the systematic (J) and random variance (J^2) it brings to the inside part
    ``tin`` (s) of span j: the outside levels removed from r's window, the part of span j
    that r did not see (``seen``: what j's own reading saw inside, 0 for another reading),
    the trend when carried from another span, the timing of r's window at the edge (which
    moves ``dl``, the inside-outside level difference; dl < 0 for a reading surely inside,
    whose |level - po| is used). A reading an edge may cut gives no level if it saw less of
    the window than its timing uncertainty."""
    t1, ol1, or1, e1 = _reading(r, a, b, ws, we, p, pa, pb)
    if not t1 > (0.0 if dl < 0 else 2.0 * du[r] / NS_PER_S):
        return np.nan, np.inf, np.inf
    lvl = e1 / t1
    w = tin / t1
    out = ol1 + or1
    blind = min(max(tin - seen, 0.0) + 2.0 * du[j] / NS_PER_S, tin)
    carried = abs(p[r] - p[jc]) if r != j else 0.0
    sys_j = uo * out * w + carried * blind
    r_edge = k * si * np.sqrt(blind * (blind + w_len))
    r_out = k * so * out * w
    c = _crossing(r, edge, abs(lvl - po) if dl < 0 else dl, ws, we, du) * w
    return lvl, sys_j, r_edge**2 + r_out**2 + c**2


@njit(cache=True)
def _power_kernel(a, b, ja, jb, bn, p, os_, oe, ws, we, du, db, cum_e, cum_v, cum_o, po_a, po_b,
                  uo_a, uo_b, sig_oa, sig_ob, sig_in, free, k, res_w, est, sys, var,
                  coverage, level, blind2):  # fmt: skip
    """Per window: energy, systematic and random-variance parts for power readings
    (module doc). For short windows ``blind2`` returns the squared blind time scale whose
    spread is added afterwards (it needs all windows' levels); else 0. ``level`` is the
    window's mean power (W), NaN where no reading saw it. ``sig_in``: the inside spreads
    at the start edges, then at the end edges."""
    n = p.size
    for i in range(a.size):
        j0, j1 = ja[i], jb[i]
        ai, bi = a[i], b[i]
        dur = (bi - ai) / NS_PER_S
        pa, pb = po_a[i], po_b[i]
        tim_a = db[j0] * abs(p[j0] - pa) + db[j0 + 1] * abs(p[min(j0 + 1, n - 1)] - p[j0])
        tim_b = db[j1 + 1] * abs(p[j1] - pb) + db[j1] * abs(p[j1] - p[max(j1 - 1, 0)])
        if j1 - j0 <= 1:
            # Short: one level from the readings that saw the window; only from those
            # surely inside it if there are any (a reading across an edge carries the
            # uncertainty of where the edge cut it).
            clean0 = _inside(j0, ai, bi, ws, we, du)
            clean1 = j1 > j0 and _inside(j1, ai, bi, ws, we, du)
            t_s, ol_s, or_s, e_s, miss = 0.0, 0.0, 0.0, 0.0, 0.0
            seen = 0.0
            for r in range(j0, j1 + 1):
                t1, ol1, or1, e1 = _reading(r, ai, bi, ws, we, p, pa, pb)
                seen += _ov(os_[r], oe[r], ai, bi) / NS_PER_S
                if (clean0 or clean1) and not _inside(r, ai, bi, ws, we, du):
                    continue
                t_s += t1
                ol_s += ol1
                or_s += or1
                e_s += e1
                miss += 2.0 * du[r] / NS_PER_S
            lin = p[j0] * (min(bn[j0 + 1], bi) - ai) / NS_PER_S
            if j1 > j0:
                lin += p[j1] * (bi - bn[j1]) / NS_PER_S
            # Readings that may, given their timing, have missed the window saw nothing.
            if not t_s > (0.0 if clean0 or clean1 else miss):
                est[i] = np.nan
                level[i] = np.nan
                sys[i] = np.nan
                var[i] = np.nan
                coverage[i] = 0.0
                blind2[i] = 0.0
                continue
            lvl = e_s / t_s
            e_hat = lvl * dur
            w = dur / t_s
            s = (uo_a[i] * ol_s + uo_b[i] * or_s) * w
            if free:
                s += abs(e_hat - lin)
            r_out = k * (sig_oa[i] * ol_s + sig_ob[i] * or_s) * w
            cross = 0.0
            for r in range(j0, j1 + 1):
                cross += _crossing(r, ai, abs(lvl - pa), ws, we, du)
                cross += _crossing(r, bi, abs(lvl - pb), ws, we, du)
            cross *= w
            miss = min(max(dur - t_s, 0.0) + miss, dur)
            est[i] = e_hat
            level[i] = lvl
            sys[i] = s + res_w * dur
            var[i] = r_out**2 + tim_a**2 + tim_b**2 + cross**2
            coverage[i] = min(max(seen / dur, 0.0), 1.0)
            blind2[i] = miss * (miss + (oe[j0] - os_[j0]) / NS_PER_S)
            continue
        # Long: spans inside held, each edge span's inside part at the inside level seen
        # next to that edge.
        interior = cum_e[j1] - cum_e[j0 + 1]
        v = cum_v[j1] - cum_v[j0 + 1]
        obs = cum_o[j1] - cum_o[j0 + 1]
        e_hat = interior
        lin = interior
        s = res_w * dur
        cross2 = 0.0
        for side in range(2):
            # j: the edge span, j2: the next span inside, jc: the one after (for a trend).
            if side == 0:
                j, j2, jc, edge, po = j0, j0 + 1, min(j0 + 2, n - 1), ai, pa
                uo, so, si = uo_a[i], sig_oa[i], sig_in[i]
                tin = (bn[j0 + 1] - ai) / NS_PER_S
            else:
                j, j2, jc, edge, po = j1, j1 - 1, max(j1 - 2, 0), bi, pb
                uo, so, si = uo_b[i], sig_ob[i], sig_in[a.size + i]
                tin = (bi - bn[j1]) / NS_PER_S
            seen = _ov(os_[j], oe[j], ai, bi) / NS_PER_S
            w_len = (oe[j] - os_[j]) / NS_PER_S
            # The level from the edge span's own reading (its outside part removed at
            # P_out when an edge may cut it), or carried from the next reading, wholly
            # inside: whichever is surer.
            if _inside(j, ai, bi, ws, we, du):
                lvl, s_e, v_e = _edge_level(
                    j, j, jc, edge, ai, bi, tin, seen, w_len, po, pa, pb, uo, so, si, k,
                    ws, we, p, du, -1.0,
                )  # fmt: skip
            else:
                lvl, s_e, v_e = _edge_level(
                    j2, j, jc, edge, ai, bi, tin, 0.0, w_len, po, pa, pb, uo, so, si, k,
                    ws, we, p, du, -1.0,
                )  # fmt: skip
                # The cut reading, if surer: the edge may cut it anywhere its timing allows,
                # moving up to the larger of the two level differences across.
                t_own = _reading(j, ai, bi, ws, we, p, pa, pb)
                dl = abs(lvl - po)
                if t_own[0] > 0:
                    dl = max(dl, abs(t_own[3] / t_own[0] - po))
                lvl1, s1, v1 = _edge_level(
                    j, j, jc, edge, ai, bi, tin, seen, w_len, po, pa, pb, uo, so, si, k,
                    ws, we, p, du, dl,
                )  # fmt: skip
                if s1 + np.sqrt(v1) < s_e + np.sqrt(v_e):
                    lvl, s_e, v_e = lvl1, s1, v1
            e_hat += lvl * tin
            lin += p[j] * tin
            s += s_e
            cross2 += v_e
            obs += seen
        if free:
            s += abs(e_hat - lin)
        est[i] = e_hat
        level[i] = e_hat / dur
        sys[i] = s
        var[i] = v + tim_a**2 + tim_b**2 + cross2
        coverage[i] = min(max(obs / dur, 0.0), 1.0)
        blind2[i] = 0.0


@njit(cache=True)
def _span_cums(bn, os_, oe, du, db, p, e, sig, k, cum_e, cum_o, cum_v):
    """Cumulative energy (J), observed time (s) and random variance (J^2) over the spans.
    A span's variance: its unobserved length g (the span outside its reading's window,
    plus the reading's timing uncertainty at both ends) with the spread of readings,
    k * sig * sqrt(g * (g + w)), and its left edge's timing times the power step."""
    cum_e[0] = cum_o[0] = cum_v[0] = 0.0
    for j in range(p.size):
        w = (oe[j] - os_[j]) / NS_PER_S
        g = abs((bn[j + 1] - bn[j]) / NS_PER_S - w) + 2.0 * du[j] / NS_PER_S
        step = abs(p[j] - p[j - 1]) * db[j] / NS_PER_S if j > 0 else 0.0
        cum_e[j + 1] = cum_e[j] + e[j]
        cum_o[j + 1] = cum_o[j] + w
        cum_v[j + 1] = cum_v[j] + (k * sig[j]) ** 2 * g * (g + w) + step * step


def _power_windows(sp, a, b, ja, jb, ctx: _Context, edges: str):
    """Power readings: spans inside a window held, edge spans at the inside level seen
    next to the edge, short windows at the level their readings saw (module doc)."""
    n = sp.p_w.size
    k = COVERAGE_FACTOR
    bn, p, os_, oe = sp.b_ns, sp.p_w, sp.os_ns, sp.oe_ns
    db_s = sp.db_ns / NS_PER_S
    sig_span = ctx.interior()
    unknown_span = ~np.isfinite(sig_span)
    if np.any(unknown_span):
        sig_span[unknown_span] = ctx.local_at(np.flatnonzero(unknown_span))
    m = a.size
    cum_e, cum_o, cum_v = (np.empty(n + 1) for _ in range(3))

    def run(sig_ia, sig_ib, sig_span):
        _span_cums(bn, os_, oe, sp.du_ns, sp.db_ns, p, sp.e_j, sig_span, k, cum_e, cum_o, cum_v)
        out = tuple(np.empty(m) for _ in range(6))
        _power_kernel(
            a, b, ja, jb, bn, p, os_, oe, sp.ws_ns, sp.we_ns, sp.du_ns, db_s, cum_e, cum_v, cum_o,
            ctx.po_a, ctx.po_b, ctx.uo_a, ctx.uo_b, ctx.sig_oa, ctx.sig_ob,
            np.concatenate([sig_ia, sig_ib]), edges == "free", k, sp.resolution_w_s, *out,
        )  # fmt: skip
        return out

    # Where the inside spread is unknown (windows of a few spans): around the span first.
    known_a, known_b = np.isfinite(ctx.sig_ia), np.isfinite(ctx.sig_ib)
    sig_ia, sig_ib = ctx.sig_ia.copy(), ctx.sig_ib.copy()
    sig_ia[~known_a] = ctx.local_at(np.minimum(ja[~known_a] + 1, n - 1))
    sig_ib[~known_b] = ctx.local_at(np.maximum(jb[~known_b] - 1, 0))
    est, sys_j, var, cov, lvl, blind2 = run(sig_ia, sig_ib, sig_span)
    dur_s = (b - a) / NS_PER_S
    no_obs = ~np.isfinite(lvl)
    trouble = np.where(no_obs, _NO_OBS, ctx.trouble)
    short = blind2 > 0
    sig_s = np.zeros(m)
    sig_s[short] = np.maximum(ctx.local_at(ja[short]), ctx.local_at(jb[short]))
    if edges == "step":
        # The spread of the mean levels of windows of about the same length (the same work
        # at random phases; differences in the work only make it larger). It stands in for
        # an unknown inside spread, and bounds the level error over the unobserved time:
        # readings of a periodic load can err together for many updates (its phase drifts
        # slowly against the sensor's), which no spread within a window shows.
        sig_w = _spread_of_alike(lvl, dur_s, (trouble == _OK) & ~no_obs)
        alike = sig_w > 0
        if np.any(alike & ~(known_a & known_b)) or np.any(unknown_span):
            sig_ia = np.where(known_a | ~alike, sig_ia, sig_w)
            sig_ib = np.where(known_b | ~alike, sig_ib, sig_w)
            in_win = _window_of(bn, a, b)
            sub = unknown_span & (in_win >= 0)
            sub[sub] &= alike[in_win[sub]]
            sig_span = sig_span.copy()
            sig_span[sub] = sig_w[in_win[sub]]
            est, sys_j, var, cov, lvl, blind2 = run(sig_ia, sig_ib, sig_span)
        sig_s = np.where(known_a, ctx.sig_ia, np.where(alike, sig_w, sig_s))
    # A short window's unobserved time, with the spread found above.
    var = var + k**2 * sig_s**2 * np.where(short, blind2, 0.0)
    if edges == "step":
        blind_w = np.maximum(dur_s * (1.0 - np.nan_to_num(cov)), 0.0)
        var = np.maximum(var, (k * sig_w * blind_w) ** 2)
    return est, sys_j, var, cov, trouble


def _window_of(b_ns: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per span (edges ``b_ns``), the index of the window holding its centre, else -1."""
    centre = 0.5 * (b_ns[1:] + b_ns[:-1])
    order = np.argsort(a, kind="stable")
    k = np.searchsorted(a[order], centre, side="right") - 1
    kc = np.maximum(k, 0)
    inside = (k >= 0) & (centre < b[order][kc])
    return np.where(inside, order[kc], -1)


def _spread_of_alike(level_w: np.ndarray, dur_s: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Per window, the standard deviation (W) of ``level_w`` over the ok windows whose
    duration is within a factor of 2 of its own (0 where fewer than 3 such windows)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        cls = np.floor(np.log2(np.where(dur_s > 0, dur_s, 1.0))).astype(np.int64)
    cls = cls - cls.min() if cls.size else cls
    m = int(cls.max()) + 1 if cls.size else 0
    x = np.where(ok, level_w, 0.0)
    cnt = np.bincount(cls, weights=ok.astype(np.float64), minlength=m)
    s1 = np.bincount(cls, weights=x, minlength=m)
    mean = s1 / np.maximum(cnt, 1)
    dev2 = np.where(ok, (x - mean[cls]) ** 2, 0.0)
    s2 = np.bincount(cls, weights=dev2, minlength=m)
    sd = np.sqrt(s2 / np.maximum(cnt - 1, 1))
    return np.where(cnt[cls] >= 3, sd[cls], 0.0)


def _validity(
    sp: _Spans, a: np.ndarray, b: np.ndarray, ja: np.ndarray, jb: np.ndarray, trouble
) -> tuple[np.ndarray, list[str | None]]:
    n = sp.p_w.size
    finite = np.isfinite(a) & np.isfinite(b)
    order = finite & (b > a)
    before = ja >= 1
    after = jb <= n - 2
    lo = np.clip(ja - 1, 0, n)
    hi = np.clip(jb + 2, 0, n)
    bad_cum = np.concatenate([[0], np.cumsum(sp.bad)])
    gap = (bad_cum[hi] - bad_cum[lo]) > 0
    valid = order & before & after & ~gap & (trouble == _OK)
    reasons: list[str | None] = [None] * a.size
    bad_idx = np.flatnonzero(~valid)
    if bad_idx.size:
        gap_len = np.zeros(a.size)
        gi = np.flatnonzero(gap & order & before & after)
        if gi.size:
            # Longest gap in each window's span range: reduceat over interleaved bounds.
            bounds = np.stack([lo[gi], hi[gi]], axis=1).ravel()
            padded = np.append(np.abs(sp.gap_s), 0.0)
            gap_len[gi] = np.maximum.reduceat(padded, bounds)[::2]
            back = np.minimum.reduceat(np.append(sp.gap_s, 0.0), bounds)[::2] < 0
            gap_len[gi] = np.where(back & (gap_len[gi] <= 1.0), -1.0, gap_len[gi])
        first_s = sp.b_ns[0] / NS_PER_S
        last_s = sp.b_ns[-1] / NS_PER_S
        for i in bad_idx.tolist():
            if not finite[i]:
                reasons[i] = "window edge is not a finite time"
            elif not order[i]:
                reasons[i] = "window end is not after its start"
            elif not before[i]:
                reasons[i] = (
                    f"no full sensor update span before the window (spans start at "
                    f"{first_s:.3f} s, window at {a[i] / NS_PER_S:.3f} s)"
                )
            elif not after[i]:
                reasons[i] = (
                    f"no full sensor update span after the window (spans end at "
                    f"{last_s:.3f} s, window ends at {b[i] / NS_PER_S:.3f} s)"
                )
            elif gap[i]:
                if gap_len[i] < 0:
                    reasons[i] = "energy counter went backwards in or next to the window"
                else:
                    reasons[i] = (
                        f"sensor gap of {gap_len[i]:.2f} s (> max_gap_s) in or next to the window"
                    )
            elif trouble[i] == _NO_OBS:
                reasons[i] = "the sensor observed none of the window (coverage 0)"
            else:
                reasons[i] = (
                    f"no sensor span wholly outside the windows within {NEAR_SPANS} spans "
                    "of an edge: the outside power is unknown"
                )
    return valid, reasons


def pooled(we: WindowEnergy) -> tuple[float, float]:
    """Total energy (J) of the valid windows and its expanded uncertainty (J): systematic
    parts added linearly, random parts in quadrature. (nan, nan) when no window is valid."""
    v = we.valid
    if not np.any(v):
        return float("nan"), float("nan")
    total = float(np.sum(we.energy_j[v]))
    if we.systematic_j is None or we.random_j is None:
        return total, float(np.sum(we.uncertainty_j[v]))
    return total, float(np.sum(we.systematic_j[v]) + np.sqrt(np.sum(we.random_j[v] ** 2)))


def cross_check(a: WindowEnergy, b: WindowEnergy) -> dict:
    """Compare two sources' estimates of the same windows (e.g. counter vs power reading).

    Over windows valid in both: the pooled energies (J), their difference a - b (J), the
    combined uncertainty (J, the two sources' uncertainties in quadrature: independent
    sensors), ``agree`` (|difference| <= combined) and ``flag`` (the opposite).
    """
    if a.valid.shape != b.valid.shape:
        raise ValueError("cross_check needs the same windows in both estimates")
    both = a.valid & b.valid
    out: dict = {"methods": [a.method, b.method], "windows": int(np.sum(both))}
    if not np.any(both):
        out.update(agree=None, flag=False, reason="no window valid in both")
        return out
    sub_a = _subset(a, both)
    sub_b = _subset(b, both)
    ea, ua = pooled(sub_a)
    eb, ub = pooled(sub_b)
    diff = ea - eb
    comb = float(np.hypot(ua, ub))
    agree = abs(diff) <= comb
    out.update(
        energy_a_j=ea,
        energy_b_j=eb,
        uncertainty_a_j=ua,
        uncertainty_b_j=ub,
        difference_j=diff,
        relative_difference=diff / eb if eb else None,
        combined_uncertainty_j=comb,
        agree=bool(agree),
        flag=not agree,
        reason=None if agree else "difference exceeds the combined uncertainty",
    )
    return out


def _subset(we: WindowEnergy, keep: np.ndarray) -> WindowEnergy:
    def pick(x):
        return None if x is None else x[keep]

    return WindowEnergy(
        energy_j=we.energy_j[keep],
        uncertainty_j=we.uncertainty_j[keep],
        coverage=we.coverage[keep],
        valid=we.valid[keep],
        reasons=[r for r, k in zip(we.reasons, keep) if k],
        method=we.method,
        systematic_j=pick(we.systematic_j),
        random_j=pick(we.random_j),
    )


def idle_power(samples: Samples, t0_ns, t1_ns) -> tuple[float, float]:
    """Mean power (W) over [t0_ns, t1_ns] (the device idle) and its expanded uncertainty (W).

    Raises ValueError with the reason when that span cannot be attributed."""
    we = attribute(samples, np.array([t0_ns]), np.array([t1_ns]), edges="free")
    if not we.valid[0]:
        raise ValueError(f"idle power: {we.reasons[0]}")
    span_s = (float(t1_ns) - float(t0_ns)) / NS_PER_S
    return float(we.energy_j[0] / span_s), float(we.uncertainty_j[0] / span_s)


def naive_trapezoid(samples: Samples, start_ns, end_ns) -> np.ndarray:
    """Energy (J) per window by the trapezoid rule over power samples as they come (the
    1 Hz ``nvidia-smi`` method), the samples linearly interpolated to the window edges.
    NaN where a window is not bracketed by samples. For comparison only."""
    if samples.info.quantity != "power":
        raise ValueError("naive_trapezoid integrates power readings")
    a = np.atleast_1d(np.asarray(start_ns, dtype=np.float64))
    b = np.atleast_1d(np.asarray(end_ns, dtype=np.float64))
    t = samples.t_ns.astype(np.float64)
    v = samples.value
    if t.size < 2:
        return np.full(a.size, np.nan)
    dt_s = np.diff(t) / NS_PER_S
    cum = _cum(0.5 * (v[1:] + v[:-1]) * dt_s)

    def at(x):
        i = np.clip(np.searchsorted(t, x, side="right") - 1, 0, t.size - 2)
        h_s = (x - t[i]) / NS_PER_S
        with np.errstate(invalid="ignore", divide="ignore"):
            slope = np.where(dt_s[i] > 0, (v[i + 1] - v[i]) / dt_s[i], 0.0)
        return cum[i] + v[i] * h_s + 0.5 * slope * h_s**2

    inside = (a >= t[0]) & (b <= t[-1]) & (b > a)
    return np.where(inside, at(b) - at(a), np.nan)
