"""Device clock -> host monotonic clock, with the uncertainty of the mapping.

A GPU backend stamps its step windows with the device's ``%globaltimer`` (ns; on Hopper set
to OS time at boot, then free-running, ~1 us steps, 10-100 ppm drift against the host, as
DESIGN.md's "Power sensors" notes), while power samples are on the host monotonic clock. A
round trip (read the host clock, read the device clock with a tiny kernel, read the host
clock again) pins the device reading inside [host_before, host_after]. Many round trips
are fitted to

    host_ns = offset_ns + (1 + drift) * (device_ns - device_ref_ns)

by least squares on the round trips' midpoints, keeping only the tightest round trips (the
smallest host_after - host_before) of each of several slices of the calibration, so that a
burst of slow round trips (a scheduler hiccup) neither enters the fit nor leaves a stretch of
time unanchored.

Uncertainty (``ClockMap.uncertainty_ns``) inside the calibrated span: half the largest kept
round trip (a hard bound: each device read happened inside its round trip, so no midpoint
is further than that from the truth, even with a systematically asymmetric latency) plus
three times the RMS residual of the kept midpoints about the fit (the random part: the
device clock's quantisation and the jitter of where in the round trip the read fell; ~99.7 %
if it were Gaussian), plus, when the drift is not fitted, the largest drift the prior allows
over half the span. Outside the span the error can grow with the drift error:
``ClockMap.uncertainty_at_ns`` adds ``drift_uncertainty_ppm`` times the distance to the span.

The drift is fitted only when the span resolves it better than the prior bound
(``PRIOR_DRIFT_PPM``): a 200-round-trip burst spans about a millisecond, where a 1.5 us
error in each anchor would mean a 3000 ppm error in the slope; the drift is then fixed at 0
and bounded by the prior, which costs at most 0.1 us inside such a span.

Re-anchoring for long runs: with a burst-only calibration the error grows by
``PRIOR_DRIFT_PPM`` (100 us per second of run) away from the burst. Calibrate again during
or after the run (another burst of ``calibrate``'s round trips), then fit all the round trips
together with ``fit_clock_map``: the span now covers the run, the drift is fitted, and its
uncertainty is a few ppm. ``needs_recalibration(map, now_ns, max_error_ns)`` tells when the
extrapolated error at ``now_ns`` would exceed what the attribution can tolerate.

The CPU backend stamps its windows with the host clock itself: ``IDENTITY`` (no error).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

#: Drift of a device timer against the host assumed possible when the data cannot resolve
#: it, ppm: twice the 10-100 ppm reported for %globaltimer (DESIGN.md).
PRIOR_DRIFT_PPM = 200.0
#: Multiple of the RMS fit residual added to the round-trip bound.
RESIDUAL_COVERAGE = 3.0
#: Most slices the calibration is cut into (fewer when there are few round trips).
MAX_SLICES = 8
#: Fewest round trips per slice.
MIN_PER_SLICE = 5
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


class ClockPair(NamedTuple):
    """One round trip: host monotonic ns before, the device clock (ns), host ns after."""

    host_before_ns: int
    device_ns: int
    host_after_ns: int


@dataclass(frozen=True)
class ClockMap:
    """host_ns = offset_ns + (device_ns - device_ref_ns) * (1 + drift_ppm * 1e-6).

    ``drift_ppm`` > 0: the host clock runs faster than the device's (a device running fast by
    d gives 1 / (1 + d) - 1, about -d).
    ``uncertainty_ns``: bound on the mapping error for device times inside
    [device_lo_ns, device_hi_ns] (the kept round trips' span); ``drift_uncertainty_ppm``:
    bound on the drift's error, which makes the error grow outside that span.
    ``drift_fitted``: False when the span was too short to resolve the drift (then 0).
    ``span_s``: device time from the first to the last round trip of the calibration (None
    for ``IDENTITY``, which needs none).
    """

    offset_ns: int
    device_ref_ns: int
    drift_ppm: float
    uncertainty_ns: float
    drift_uncertainty_ppm: float
    drift_fitted: bool
    n_pairs: int
    n_kept: int
    span_s: float | None
    device_lo_ns: int
    device_hi_ns: int
    kept_round_trip_max_ns: int
    residual_rms_ns: float
    method: str

    def to_host_ns(self, device_ns: np.ndarray | int) -> np.ndarray:
        """Device clock readings (ns) as host monotonic ns (int64 array)."""
        d = np.asarray(device_ns, dtype=np.int64) - np.int64(self.device_ref_ns)
        # Integer part exact; only the small drift correction goes through float64.
        corr = np.rint(d.astype(np.float64) * (self.drift_ppm * 1e-6)).astype(np.int64)
        return np.int64(self.offset_ns) + d + corr

    def uncertainty_at_ns(self, device_ns: np.ndarray | int) -> np.ndarray:
        """Bound on the mapping error (ns, float64) at device times ``device_ns``: the
        in-span uncertainty, grown by the drift bound with the distance to the span."""
        d = np.asarray(device_ns, dtype=np.float64)
        outside_ns = np.maximum(
            0.0, np.maximum(self.device_lo_ns - d, d - float(self.device_hi_ns))
        )
        return self.uncertainty_ns + outside_ns * self.drift_uncertainty_ppm * 1e-6

    def to_dict(self) -> dict:
        """Plain data for result records."""
        return asdict(self)


IDENTITY = ClockMap(
    offset_ns=0,
    device_ref_ns=0,
    drift_ppm=0.0,
    uncertainty_ns=0.0,
    drift_uncertainty_ppm=0.0,
    drift_fitted=False,
    n_pairs=0,
    n_kept=0,
    span_s=None,
    device_lo_ns=_INT64_MIN,
    device_hi_ns=_INT64_MAX,
    kept_round_trip_max_ns=0,
    residual_rms_ns=0.0,
    method="identity: the device stamps are the host monotonic clock",
)


def _kept_indices(device_ns: np.ndarray, rtt_ns: np.ndarray, keep_fraction: float) -> np.ndarray:
    """Indices of the tightest round trips of each slice (equal counts, device-time order)."""
    n = device_ns.size
    slices = max(1, min(MAX_SLICES, n // MIN_PER_SLICE))
    order = np.argsort(device_ns, kind="stable")
    kept = []
    for chunk in np.array_split(order, slices):
        k = max(1, round(keep_fraction * chunk.size))
        kept.append(chunk[np.argsort(rtt_ns[chunk], kind="stable")[:k]])
    return np.sort(np.concatenate(kept))


def fit_clock_map(
    host_before_ns: np.ndarray,
    device_ns: np.ndarray,
    host_after_ns: np.ndarray,
    keep_fraction: float = 0.2,
) -> ClockMap:
    """Fit the device -> host map from round trips (all ns; see the module docstring).

    Keeps the ``keep_fraction`` tightest round trips of each slice. Raises ValueError for
    fewer than 2 round trips, mismatched lengths, or a round trip that ends before it starts.
    """
    hb = np.asarray(host_before_ns, dtype=np.int64).reshape(-1)
    dv = np.asarray(device_ns, dtype=np.int64).reshape(-1)
    ha = np.asarray(host_after_ns, dtype=np.int64).reshape(-1)
    if not (hb.size == dv.size == ha.size):
        raise ValueError("host_before_ns, device_ns and host_after_ns differ in length")
    if hb.size < 2:
        raise ValueError(f"need at least 2 round trips, got {hb.size}")
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    rtt = ha - hb
    if np.any(rtt < 0):
        raise ValueError("a round trip has host_after_ns < host_before_ns")

    idx = _kept_indices(dv, rtt, keep_fraction)
    d_ref = int(dv[idx[0]])
    h_ref = int(hb[idx[0]])
    # Relative to the first kept pair, so float64 carries every ns exactly.
    x = (dv[idx] - d_ref).astype(np.float64)
    y = (hb[idx] - h_ref).astype(np.float64) + 0.5 * rtt[idx].astype(np.float64)
    u_pair_ns = 0.5 * float(rtt[idx].max())
    span_kept_ns = float(x.max() - x.min())

    # Two anchors each off by up to u_pair in opposite directions tilt the slope by this much.
    drift_resolution_ppm = 2.0 * u_pair_ns / span_kept_ns * 1e6 if span_kept_ns > 0 else math.inf
    drift_fitted = idx.size >= 3 and drift_resolution_ppm < PRIOR_DRIFT_PPM
    if drift_fitted:
        xm = x.mean()
        slope_minus_1 = float(np.sum((x - xm) * (y - x - (y - x).mean())) / np.sum((x - xm) ** 2))
        intercept = float((y - x).mean() - slope_minus_1 * xm)
        residual = y - (intercept + (1.0 + slope_minus_1) * x)
        dof = max(1, idx.size - 2)
        se_ppm = float(np.sqrt(np.sum(residual**2) / dof / np.sum((x - xm) ** 2))) * 1e6
        drift_unc_ppm = drift_resolution_ppm + RESIDUAL_COVERAGE * se_ppm
        drift_term_ns = 0.0
    else:
        slope_minus_1 = 0.0
        intercept = float((y - x).mean())
        residual = y - (intercept + x)
        drift_unc_ppm = PRIOR_DRIFT_PPM
        # An unfitted drift bends the data away from the flat fit by at most this in-span.
        drift_term_ns = PRIOR_DRIFT_PPM * 1e-6 * span_kept_ns / 2.0
    rms_ns = float(np.sqrt(np.mean(residual**2)))
    uncertainty_ns = u_pair_ns + RESIDUAL_COVERAGE * rms_ns + drift_term_ns

    return ClockMap(
        offset_ns=h_ref + round(intercept),
        device_ref_ns=d_ref,
        drift_ppm=slope_minus_1 * 1e6,
        uncertainty_ns=uncertainty_ns,
        drift_uncertainty_ppm=drift_unc_ppm,
        drift_fitted=drift_fitted,
        n_pairs=int(hb.size),
        n_kept=int(idx.size),
        span_s=float(dv.max() - dv.min()) * 1e-9,
        device_lo_ns=int(dv[idx].min()),
        device_hi_ns=int(dv[idx].max()),
        kept_round_trip_max_ns=int(rtt[idx].max()),
        residual_rms_ns=rms_ns,
        method=(
            f"least squares on the midpoints of the {keep_fraction:.0%} tightest round trips of "
            f"each slice; uncertainty = half the largest kept round trip + "
            f"{RESIDUAL_COVERAGE:g} x RMS residual"
            + ("" if drift_fitted else f" + {PRIOR_DRIFT_PPM:g} ppm x half span (drift unfitted)")
        ),
    )


def calibrate(read_pair: Callable[[], tuple[int, int, int]], n: int = 200) -> ClockMap:
    """Call ``read_pair`` ``n`` times (each returns a ClockPair-like (host_before_ns,
    device_ns, host_after_ns)) and fit the device -> host map to the round trips."""
    if n < 2:
        raise ValueError(f"need at least 2 round trips, got n={n}")
    pairs = np.array([tuple(read_pair()) for _ in range(n)], dtype=np.int64)
    return fit_clock_map(pairs[:, 0], pairs[:, 1], pairs[:, 2])


def needs_recalibration(clock_map: ClockMap, now_ns: int, max_error_ns: float) -> bool:
    """Whether the map's error bound at host monotonic time ``now_ns`` exceeds
    ``max_error_ns``: True once the drift bound, over the time since the calibrated span,
    has grown the error past it. Never for ``IDENTITY``."""
    # Host and device run at the same rate to within ppm, which is negligible for a distance.
    device_now_ns = clock_map.device_ref_ns + (now_ns - clock_map.offset_ns)
    return bool(clock_map.uncertainty_at_ns(device_now_ns) > max_error_ns)
