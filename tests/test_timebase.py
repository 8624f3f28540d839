"""The device -> host clock map against a simulated device clock with known offset, drift,
1 us quantisation and random asymmetric, heavy-tailed host latency."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.timebase import (
    IDENTITY,
    PRIOR_DRIFT_PPM,
    ClockPair,
    calibrate,
    fit_clock_map,
    needs_recalibration,
)

STEP_NS = 1000  # %globaltimer-like 1 us steps


class SimDevice:
    """A device timer: dev = floor((dev0 + (h - h0) * (1 + drift)) / step) * step at host ns h.

    Round trips have a one-way latency before the read and one after, each a floor plus a
    heavy (Pareto) tail, with different floors so the midpoint is biased, as on real links.
    """

    def __init__(self, rng, offset_ns: int, drift_ppm: float, h0_ns: int = 10**13) -> None:
        self.rng = rng
        self.h0_ns = h0_ns
        self.dev0_ns = h0_ns + offset_ns
        self.drift = drift_ppm * 1e-6
        self.host_ns = h0_ns  # the simulated host clock, advanced by each round trip

    def device_at(self, host_ns: np.ndarray) -> np.ndarray:
        h = np.asarray(host_ns, dtype=np.int64)
        d = self.dev0_ns + (h - self.h0_ns) + np.floor((h - self.h0_ns) * self.drift)
        return (d.astype(np.int64) // STEP_NS) * STEP_NS

    def round_trips(self, n: int, gap_ns: float = 500.0) -> tuple[np.ndarray, ...]:
        """``n`` back-to-back round trips (tightest ~2 us), ``gap_ns`` apart on average."""
        before_lat = 1200 + 600 * self.rng.pareto(1.5, n)
        after_lat = 700 + 400 * self.rng.pareto(1.5, n)
        gaps = self.rng.exponential(gap_ns, n)
        starts = self.host_ns + np.cumsum(before_lat + after_lat + gaps) - (before_lat + after_lat)
        reads = starts + before_lat
        hb = np.floor(starts).astype(np.int64)
        hr = np.floor(reads).astype(np.int64)
        ha = np.floor(reads + after_lat).astype(np.int64)
        self.host_ns = int(ha[-1])
        return hb, self.device_at(hr), ha

    def wait(self, ns: int) -> None:
        self.host_ns += ns


def _errors(sim: SimDevice, clock_map, host_ns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """|mapped - true| host ns at test instants, and the map's bound there."""
    dev = sim.device_at(host_ns)
    err = np.abs(clock_map.to_host_ns(dev) - host_ns).astype(np.float64)
    return err, clock_map.uncertainty_at_ns(dev)


@settings(derandomize=True, deadline=None, max_examples=40)
@given(
    offset_ns=st.integers(-(10**15), 10**15),
    drift_ppm=st.floats(10.0, 100.0).flatmap(lambda d: st.sampled_from([d, -d])),
    seed=st.integers(0, 2**32 - 1),
)
def test_burst_calibration_bounds_error_in_span(offset_ns, drift_ppm, seed):
    rng = np.random.default_rng(seed)
    sim = SimDevice(rng, offset_ns, drift_ppm)
    hb, dv, ha = sim.round_trips(200)
    m = fit_clock_map(hb, dv, ha)
    assert m.n_pairs == 200 and m.n_kept == 40
    assert not m.drift_fitted  # ~1 ms of round trips cannot resolve 10-100 ppm
    assert m.uncertainty_ns < 5000.0  # tight: the tightest round trips are ~2 us
    t = rng.integers(hb[0], ha[-1], size=2000)
    err, bound = _errors(sim, m, t)
    assert np.all(err <= bound), (err.max(), m.uncertainty_ns)
    # Shortly after the burst the bound grows with the prior drift and still holds.
    later = ha[-1] + rng.integers(0, 50_000_000, size=500)
    err, bound = _errors(sim, m, later)
    assert np.all(err <= bound)


@settings(derandomize=True, deadline=None, max_examples=40)
@given(
    offset_ns=st.integers(-(10**15), 10**15),
    drift_ppm=st.floats(10.0, 100.0).flatmap(lambda d: st.sampled_from([d, -d])),
    seed=st.integers(0, 2**32 - 1),
)
def test_reanchored_calibration_fits_drift(offset_ns, drift_ppm, seed):
    """Two bursts 2 s apart, fitted together: drift recovered, error bounded over the run."""
    rng = np.random.default_rng(seed)
    sim = SimDevice(rng, offset_ns, drift_ppm)
    first = sim.round_trips(200)
    sim.wait(2_000_000_000)
    second = sim.round_trips(200)
    hb, dv, ha = (np.concatenate(pair) for pair in zip(first, second))
    m = fit_clock_map(hb, dv, ha)
    assert m.drift_fitted
    # The map's drift is the host's rate against the device's: 1 / (1 + d) - 1.
    expected_ppm = (1.0 / (1.0 + drift_ppm * 1e-6) - 1.0) * 1e6
    assert abs(m.drift_ppm - expected_ppm) <= m.drift_uncertainty_ppm
    assert m.drift_uncertainty_ppm < 5.0
    assert m.uncertainty_ns < 5000.0
    assert 1.99 < m.span_s < 2.01
    t = rng.integers(hb[0], ha[-1] + 10**9, size=3000)  # across the run and 1 s beyond
    err, bound = _errors(sim, m, t)
    assert np.all(err <= bound), (err.max(), m.uncertainty_ns)
    # A flat (offset-only) map across 2 s would be off by drift x 1 s; the fit is not.
    assert np.abs(m.to_host_ns(sim.device_at(t)) - t).max() < 5000


def test_slow_round_trips_are_not_kept():
    """A tenth of the round trips are very slow with a skewed midpoint: they must not move
    the map (the tightest of each slice are kept)."""
    rng = np.random.default_rng(123)
    sim = SimDevice(rng, offset_ns=-7_000_000_123, drift_ppm=50.0)
    hb, dv, ha = sim.round_trips(300)
    slow = rng.choice(300, size=30, replace=False)
    hb = hb.copy()
    hb[slow] -= 400_000  # 0.4 ms stalls before the read
    m = fit_clock_map(hb, dv, ha)
    assert m.kept_round_trip_max_ns < 10_000
    t = rng.integers(hb.min(), ha[-1], size=1000)
    err, bound = _errors(sim, m, t)
    assert np.all(err <= bound)
    assert err.max() < 3000


def test_calibrate_calls_read_pair_and_fits():
    rng = np.random.default_rng(9)
    sim = SimDevice(rng, offset_ns=123_456_789_000, drift_ppm=-35.0)
    calls = []

    def read_pair() -> ClockPair:
        hb, dv, ha = sim.round_trips(1)
        calls.append(1)
        return ClockPair(int(hb[0]), int(dv[0]), int(ha[0]))

    m = calibrate(read_pair, n=150)
    assert len(calls) == 150 and m.n_pairs == 150
    t = rng.integers(sim.h0_ns, sim.host_ns, size=500)
    err, bound = _errors(sim, m, t)
    assert np.all(err <= bound)
    assert m.uncertainty_ns < 5000.0


def test_needs_recalibration_from_drift_bound():
    rng = np.random.default_rng(4)
    sim = SimDevice(rng, offset_ns=5_000_000, drift_ppm=100.0)
    hb, dv, ha = sim.round_trips(200)
    m = fit_clock_map(hb, dv, ha)
    end = int(ha[-1])
    # At the end of the burst (< 1 ms past the last kept round trip: < 200 ns more).
    assert not needs_recalibration(m, end, max_error_ns=m.uncertainty_ns + 200)
    # After 1 s the prior drift bound allows 200 us: more than 50 us tolerated.
    one_s = end + 1_000_000_000
    assert needs_recalibration(m, one_s, max_error_ns=50_000)
    bound = PRIOR_DRIFT_PPM * 1e-6 * 1e9 + m.uncertainty_ns
    assert not needs_recalibration(m, one_s, max_error_ns=bound * 1.01)
    # And the true error there (100 ppm x 1 s = 100 us) is inside that bound.
    err, b = _errors(sim, m, np.array([one_s]))
    assert 50_000 < err[0] <= b[0]


def test_identity_is_exact():
    x = np.random.default_rng(0).integers(-(2**62), 2**62, size=100)
    assert np.array_equal(IDENTITY.to_host_ns(x), x)
    assert np.all(IDENTITY.uncertainty_at_ns(x) == 0.0)
    assert not needs_recalibration(IDENTITY, 10**18, max_error_ns=0.0)
    assert IDENTITY.to_host_ns(x).dtype == np.int64


def test_to_dict_is_plain_json():
    rng = np.random.default_rng(2)
    m = fit_clock_map(*SimDevice(rng, 0, 20.0).round_trips(50))
    d = json.loads(json.dumps(m.to_dict(), allow_nan=False))
    assert d["n_pairs"] == 50 and d["uncertainty_ns"] == m.uncertainty_ns
    json.dumps(IDENTITY.to_dict(), allow_nan=False)


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        fit_clock_map([1], [1], [2])
    with pytest.raises(ValueError):
        fit_clock_map([1, 2], [1, 2], [2])
    with pytest.raises(ValueError):
        fit_clock_map([5, 6], [1, 2], [4, 7])  # ends before it starts
    with pytest.raises(ValueError):
        fit_clock_map([1, 2], [1, 2], [2, 3], keep_fraction=0.0)
