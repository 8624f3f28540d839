"""Tests for engine.power.sensor_model: the truth integrates exactly, the builders make what
they say, each preset shows its stated update period and averaging window in the samples it
produces, counters quantise, wrap and unwrap, drops and jitter behave."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.power import sensor_model as sm

HYP = settings(derandomize=True, deadline=None, max_examples=40)


def _brute_energy_j(truth: sm.TruePower, t0_ns: float, t1_ns: float) -> float:
    """Energy by walking the cells one by one (float64 sums, partial cells by overlap)."""
    total = 0.0
    n = truth.power_w.size
    for i in range(-1, n + 1):
        # Cells -1 and n stand for the held edge powers outside the grid.
        lo = -np.inf if i == -1 else truth.t0_ns + i * truth.dt_ns
        hi = np.inf if i == n else truth.t0_ns + (i + 1) * truth.dt_ns
        p = truth.power_w[min(max(i, 0), n - 1)]
        overlap = min(hi, t1_ns) - max(lo, t0_ns)
        if overlap > 0:
            total += p * overlap / 1e9
    return total


def test_truth_integrates_exactly_by_hand():
    truth = sm.TruePower(t0_ns=1_000, dt_ns=1_000_000, power_w=np.array([1.0, 2.0, 3.0, 4.0]))
    # 0.5 ms of cell 0, all of cells 1 and 2, 0.25 ms of cell 3.
    e = truth.energy_j(1_000 + 500_000, 1_000 + 3_250_000)
    assert e == pytest.approx(0.5e-3 * 1 + 1e-3 * 2 + 1e-3 * 3 + 0.25e-3 * 4, rel=1e-12)
    # Outside the grid the edge cells' powers hold.
    assert truth.energy_j(1_000 - 2_000_000, 1_000) == pytest.approx(2e-3 * 1.0, rel=1e-12)
    assert truth.energy_j(1_000 + 4_000_000, 1_000 + 5_000_000) == pytest.approx(4e-3)
    assert truth.mean_power_w(1_000 + 1_000_000, 1_000 + 3_000_000) == pytest.approx(2.5)
    assert truth.power_at_w(1_000 + 2_500_000) == 3.0


@HYP
@given(seed=st.integers(0, 2**32 - 1))
def test_truth_matches_brute_force_sums(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    truth = sm.TruePower(
        int(rng.integers(-(10**6), 10**6)), int(rng.integers(1, 10**5)), rng.uniform(0, 1000, n)
    )
    span = truth.t1_ns - truth.t0_ns
    edges = np.sort(rng.uniform(truth.t0_ns - span, truth.t1_ns + span, (8, 2)), axis=1)
    got = truth.energy_j(edges[:, 0], edges[:, 1])
    want = np.array([_brute_energy_j(truth, a, b) for a, b in edges])
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_builders():
    st_ = sm.steps([100.0, 300.0], [0.5, 0.25], dt_s=1e-3, t0_ns=7)
    assert st_.power_w.size == 750 and st_.t0_ns == 7
    assert st_.energy_j(7, st_.t1_ns) == pytest.approx(100 * 0.5 + 300 * 0.25)
    r = sm.ramp(100.0, 300.0, 1.0, dt_s=1e-3)
    assert r.energy_j(0, r.t1_ns) == pytest.approx(200.0)
    rng = np.random.default_rng(3)
    k = sm.decode_steps(rng, 2.0, 0.004, ((0.6, 700.0), (0.3, 450.0), (0.1, 300.0)))
    # Over many steps the mean is the phases' weighted mean; inside a step it alternates.
    assert k.mean_power_w(0, k.t1_ns) == pytest.approx(0.6 * 700 + 0.3 * 450 + 0.1 * 300, rel=0.01)
    assert set(np.unique(k.power_w)) == {700.0, 450.0, 300.0}
    both = sm.concat([st_, r])
    assert both.energy_j(7, both.t1_ns) == pytest.approx(125.0 + 200.0, rel=1e-9)
    noisy = sm.with_noise(sm.steps([50.0], [1.0]), rng, 100.0, floor_w=0.0)
    assert noisy.power_w.min() >= 0.0 and noisy.power_w.std() > 30


def test_workload_windows_are_busy_and_gaps_idle():
    rng = np.random.default_rng(5)
    wl = sm.workload(rng, n_windows=5, window_s=0.3, gap_s=(0.2, 0.6), idle_w=80.0, noise_w=0)
    assert np.all(wl.end_ns - wl.start_ns == 3_000_000_00)
    inside = wl.truth.mean_power_w(wl.start_ns, wl.end_ns)
    assert np.all(inside > 500)
    gaps = wl.truth.mean_power_w(wl.end_ns[:-1], wl.start_ns[1:])
    np.testing.assert_allclose(gaps, 80.0)
    assert np.all(wl.start_ns[1:] - wl.end_ns[:-1] >= 2e8 - 1e5)
    np.testing.assert_allclose(wl.true_energy_j(), inside * 0.3)


def _step_truth(level0: float, level1: float, t_step_s: float, total_s: float) -> sm.TruePower:
    return sm.steps([level0, level1], [t_step_s, total_s - t_step_s], dt_s=1e-5)


@pytest.mark.parametrize(
    "preset", [sm.H100_INSTANT, sm.AVERAGE_1S, sm.METER_1HZ, sm.H100_ENERGY, sm.RAPL_LIKE]
)
def test_presets_show_their_update_period(preset):
    rng = np.random.default_rng(11)
    total_s = max(40 * preset.update_period_s, 2.0)
    truth = sm.with_noise(sm.steps([300.0], [total_s], dt_s=1e-5), rng, 30.0)
    poll_s = preset.update_period_s / 10
    for stamped in ("sensor", "poll"):
        s = sm.observe(truth, preset, poll_s, rng, 0, truth.t1_ns, stamped_by=stamped)
        if stamped == "sensor":
            gaps = np.diff(s.t_ns)
        else:
            changed = np.flatnonzero(np.diff(s.value) != 0) + 1
            gaps = np.diff(s.t_ns[changed])
        # Sensor stamps are the update instants (jitter only); a poller sees each change
        # within one poll period of it.
        tol = 2 * preset.jitter_s + (0 if stamped == "sensor" else 1.3 * poll_s)
        assert np.median(gaps) / 1e9 == pytest.approx(preset.update_period_s, abs=tol + 1e-9)
        assert s.info.stamped_by == stamped and s.info.quantity == preset.quantity


@pytest.mark.parametrize("preset", [sm.H100_INSTANT, sm.AVERAGE_1S, sm.METER_1HZ])
def test_power_presets_show_their_averaging_window(preset):
    # Steps between 100 W and 500 W at phases that drift against the updates: a reading
    # whose window straddles a step is old + (new - old) * (time since the step) / window,
    # so the window can be read back from the samples.
    rng = np.random.default_rng(2)
    w = preset.averaging_window_s
    hold_s = 1.37 * preset.update_period_s + w
    levels = [100.0, 500.0] * 8
    truth = sm.steps(levels, [hold_s] * len(levels), dt_s=1e-5)
    s = sm.observe(truth, preset, 0.001, rng, 0, truth.t1_ns, stamped_by="sensor")
    k = np.floor(s.t_ns / 1e9 / hold_s).astype(int)  # the level in force at the stamp
    since_s = s.t_ns / 1e9 - k * hold_s
    new = np.where(k % 2 == 0, 100.0, 500.0)
    old = 600.0 - new
    mid = (k > 0) & (since_s < w - 1e-4) & (since_s > 1e-4)
    assert mid.sum() >= 2
    w_seen = (new[mid] - old[mid]) * since_s[mid] / (s.value[mid] - old[mid])
    np.testing.assert_allclose(w_seen, w, rtol=2e-3)
    # One window after a step every reading is the new level.
    settled = (k > 0) & (since_s > w + 1e-4)
    np.testing.assert_allclose(s.value[settled], new[settled], atol=1e-2)


def test_integrating_counter_is_the_exact_integral_at_updates():
    rng = np.random.default_rng(4)
    truth = sm.with_noise(sm.ramp(100.0, 700.0, 3.0, dt_s=1e-4), rng, 40.0)
    ob = sm.observe_raw(truth, sm.H100_ENERGY, 0.01, rng, 0, truth.t1_ns, stamped_by="sensor")
    v = ob.samples.value
    exact = truth.cumulative_j(ob.update_ns)
    # Same offset for all, truncated to 1 mJ.
    diff = (v - v[0]) - (exact - exact[0])
    assert np.all(np.abs(diff) <= 1e-3 + 1e-9)
    np.testing.assert_allclose(np.round(v / 1e-3) * 1e-3, v, atol=1e-9)


def test_sampled_counter_advances_by_window_mean_times_interval():
    rng = np.random.default_rng(8)
    truth = sm.with_noise(sm.steps([200.0, 600.0], [1.0, 1.0], dt_s=1e-4), rng, 50.0)
    model = sm.SensorModel("energy", 0.05, 0.01, jitter_s=0.005)
    ob = sm.observe_raw(truth, model, 0.01, rng, 0, truth.t1_ns, stamped_by="sensor")
    u, v = ob.update_ns, ob.samples.value
    mean_w = truth.mean_power_w(u[1:] - 1e7, u[1:])
    np.testing.assert_allclose(np.diff(v), mean_w * np.diff(u) / 1e9, rtol=1e-9, atol=1e-9)


@HYP
@given(seed=st.integers(0, 2**32 - 1), wrap_j=st.floats(5.0, 200.0))
def test_counter_wrap_and_unwrap_round_trip(seed, wrap_j):
    rng = np.random.default_rng(seed)
    truth = sm.with_noise(sm.steps([900.0], [2.0], dt_s=1e-4), rng, 100.0)
    model = sm.SensorModel("energy", 0.002, None, resolution=1e-4, wrap_j=wrap_j)
    ob = sm.observe_raw(truth, model, 0.001, rng, 0, truth.t1_ns)
    assert np.all((ob.raw >= 0) & (ob.raw < wrap_j))
    assert np.any(np.diff(ob.raw) < 0)  # it did wrap
    back = sm.unwrap_counter_j(ob.raw, wrap_j)
    np.testing.assert_allclose(back - back[0], ob.samples.value - ob.samples.value[0], atol=1e-6)


def test_rapl_like_wraps_at_32_bits_of_its_unit():
    assert sm.RAPL_LIKE.wrap_j == pytest.approx(65536.0)
    rng = np.random.default_rng(1)
    truth = sm.steps([40.0], [0.5], dt_s=1e-4)
    ob = sm.observe_raw(truth, sm.RAPL_LIKE, 0.001, rng, 0, truth.t1_ns)
    assert np.all(ob.raw < 65536.0)
    np.testing.assert_allclose(ob.raw / 2.0**-16, np.round(ob.raw / 2.0**-16), atol=1e-6)


def test_drops_jitter_gain_and_resolution():
    rng = np.random.default_rng(9)
    truth = sm.with_noise(sm.steps([400.0], [20.0], dt_s=1e-4), rng, 20.0)
    lossy = sm.SensorModel("power", 0.1, 0.025, jitter_s=0.003, drop_prob=0.5, resolution=0.5)
    ob = sm.observe_raw(truth, lossy, 0.01, rng, 0, truth.t1_ns, stamped_by="sensor")
    assert 60 < ob.update_ns.size < 140  # about half of 200 updates published
    off = (ob.update_ns - ob.update_ns[0]) / 1e8
    assert np.max(np.abs(off - np.round(off))) * 0.1 <= 2 * 0.003 + 1e-9
    np.testing.assert_allclose(ob.samples.value / 0.5, np.round(ob.samples.value / 0.5))
    hot = sm.SensorModel("power", 0.1, 0.025, gain=1.1)
    a = sm.observe(truth, hot, 0.01, np.random.default_rng(1), 0, truth.t1_ns, stamped_by="sensor")
    exact = truth.mean_power_w(a.t_ns - 2.5e7, a.t_ns)
    np.testing.assert_allclose(a.value, 1.1 * exact, rtol=1e-6)


def test_poll_stamped_samples_hold_the_last_published_value():
    rng = np.random.default_rng(12)
    truth = sm.with_noise(sm.steps([250.0], [3.0], dt_s=1e-4), rng, 30.0)
    ob = sm.observe_raw(truth, sm.H100_INSTANT, 0.005, rng, 0, truth.t1_ns)
    s = ob.samples
    assert s.info.stamped_by == "poll"
    assert np.all(np.diff(s.t_ns) > 0)
    # Each poll returns the value computed at the last update before it: the mean over
    # the 25 ms before that update, to 1 mW.
    u = ob.update_ns
    after = s.t_ns > u[0]
    last_u = u[np.searchsorted(u, s.t_ns[after], side="right") - 1]
    want = np.round(truth.mean_power_w(last_u - 2.5e7, last_u) / 1e-3) * 1e-3
    np.testing.assert_allclose(s.value[after], want, atol=1e-9)
    assert np.all(s.t_ns[after] - last_u >= 0)


def test_model_validation():
    with pytest.raises(ValueError):
        sm.SensorModel("heat", 0.1, 0.0)
    with pytest.raises(ValueError):
        sm.SensorModel("power", 0.1, None)
    with pytest.raises(ValueError):
        sm.SensorModel("power", 0.1, 0.01, wrap_j=10.0)
    with pytest.raises(ValueError):
        sm.SensorModel("energy", 0.1, None, jitter_s=0.06)
