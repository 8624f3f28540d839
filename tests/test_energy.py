"""Tests for engine.energy against exact ground truth from engine.power.sensor_model.

Random loads x random sensors x random windows: every valid window's error within its
uncertainty, and the uncertainty not absurd. H100-like sensors on a decode workload with the
protocol's repetitions: the pooled error reached (printed and asserted). The naive 1 Hz
trapezoid against attribution on the instant reading. Cross-check, idle power, gaps.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import energy as en
from engine.power import sensor_model as sm
from engine.power.base import Samples

HYP = settings(derandomize=True, deadline=None, max_examples=30)


# -- random loads and sensors -----------------------------------------------------------


def _random_load(rng: np.random.Generator, period_s: float) -> sm.TruePower:
    """Pieces of >= 3 update periods: constant levels, ramps, decode kernels of 2-10 ms
    steps (random lengths: not phase-locked to the sensor), 40..1000 W, noise on top."""
    total_s = max(6.0, 40 * period_s)
    parts, t_s = [], 0.0
    level = rng.uniform(40, 1000)
    while t_s < total_s:
        dur_s = rng.uniform(3, 12) * period_s + rng.uniform(0, 1.0)
        kind = rng.integers(3)
        if kind == 0:
            level = rng.uniform(40, 1000)
            part = sm.steps([level], [dur_s])
        elif kind == 1:
            new = rng.uniform(40, 1000)
            part = sm.ramp(level, new, dur_s)
            level = new
        else:
            hi = rng.uniform(100, 1000)
            lo = rng.uniform(40, hi)
            phases = ((rng.uniform(0.3, 0.8), hi), (rng.uniform(0.1, 0.5), lo))
            part = sm.decode_steps(rng, dur_s, rng.uniform(0.002, 0.01), phases, step_jitter=0.3)
        parts.append(part)
        t_s += dur_s
    truth = sm.concat(parts)
    if rng.random() < 0.7:
        truth = sm.with_noise(truth, rng, rng.uniform(0, 50))
    return truth


sensors = st.builds(
    dict,
    period_s=st.floats(0.001, 0.2),
    window_frac=st.floats(0.1, 1.0),
    quantity=st.sampled_from(["power", "energy", "energy-sampled"]),
    jitter_frac=st.floats(0.0, 0.1),
    drop_prob=st.sampled_from([0.0, 0.0, 0.02, 0.08]),
    res_exp=st.floats(-3.0, 0.0),
    stamped_by=st.sampled_from(["poll", "poll", "sensor"]),
    poll_frac=st.floats(0.05, 0.5),
)


def _sensor(p: dict) -> tuple[sm.SensorModel, float]:
    period = p["period_s"]
    if p["quantity"] == "power":
        q, w, res = "power", p["window_frac"] * period, 10 ** p["res_exp"]
    elif p["quantity"] == "energy":
        q, w, res = "energy", None, 10 ** (p["res_exp"] - 3)
    else:
        q, w, res = "energy", p["window_frac"] * period, 10 ** (p["res_exp"] - 3)
    model = sm.SensorModel(
        q,
        period,
        w,
        jitter_s=p["jitter_frac"] * period,
        drop_prob=p["drop_prob"],
        resolution=res,
        stamped_by=p["stamped_by"],
    )
    return model, p["poll_frac"] * period


def _random_windows(rng, truth: sm.TruePower, period_s: float, n: int = 12):
    lo, hi = truth.t0_ns + 1e9, truth.t1_ns - 1e9
    dur = np.exp(rng.uniform(np.log(max(0.5 * period_s, 0.01)), np.log(4.0), n)) * 1e9
    a = rng.uniform(lo, np.maximum(lo + 1, hi - dur))
    return np.round(a).astype(np.int64), np.round(a + dur).astype(np.int64)


LONG_REL_UNC: list[float] = []


@HYP
@given(seed=st.integers(0, 2**32 - 1), sensor=sensors)
def test_random_loads_every_valid_window_within_uncertainty(seed, sensor):
    rng = np.random.default_rng(seed)
    model, poll_s = _sensor(sensor)
    truth = _random_load(rng, model.update_period_s)
    s = sm.observe(truth, model, poll_s, rng, truth.t0_ns, truth.t1_ns)
    a, b = _random_windows(rng, truth, model.update_period_s)
    we = en.attribute(s, a, b, edges="free")
    true_j = truth.energy_j(a, b)
    v = we.valid
    assert v.sum() >= 1
    err = np.abs(we.energy_j[v] - true_j[v])
    assert np.all(err <= we.uncertainty_j[v]), (err / we.uncertainty_j[v]).max()
    assert np.all((we.coverage[v] >= 0) & (we.coverage[v] <= 1))
    np.testing.assert_allclose(we.uncertainty_j[v], we.systematic_j[v] + we.random_j[v])
    assert all(r is not None for r, ok in zip(we.reasons, v) if not ok)
    long = v & ((b - a) >= 2e9)
    LONG_REL_UNC.extend((we.uncertainty_j[long] / true_j[long]).tolist())


def test_random_loads_uncertainty_is_not_absurd():
    # Runs after the test above (file order) and sums up its long windows.
    if len(LONG_REL_UNC) < 10:
        pytest.skip("run with the random-loads test")
    med = float(np.median(LONG_REL_UNC))
    print(f"\nrandom loads, windows >= 2 s: median uncertainty / truth {med:.3f}")
    assert med < 0.15


def _random_workload(rng, period_s: float) -> sm.Workload:
    hi = rng.uniform(300, 1000)
    mid = rng.uniform(100, hi)
    lo = rng.uniform(40, mid)
    gap_lo = max(0.3, 3 * period_s)
    return sm.workload(
        rng,
        n_windows=int(rng.integers(4, 16)),
        window_s=float(np.exp(rng.uniform(np.log(0.05), np.log(3.0)))),
        gap_s=(gap_lo, gap_lo + rng.uniform(0.1, 1.5)),
        idle_w=rng.uniform(40, 200),
        busy=((rng.uniform(0.3, 0.7), hi), (rng.uniform(0.1, 0.4), mid), (0.1, lo)),
        step_s=rng.uniform(0.002, 0.01),
        noise_w=rng.uniform(0, 40),
        lead_s=2.0,
        tail_s=2.0,
    )


@HYP
@given(seed=st.integers(0, 2**32 - 1), sensor=sensors)
def test_random_workloads_step_model_every_valid_window_within_uncertainty(seed, sensor):
    rng = np.random.default_rng(seed)
    model, poll_s = _sensor(sensor)
    wl = _random_workload(rng, model.update_period_s)
    s = sm.observe(wl.truth, model, poll_s, rng, wl.truth.t0_ns, wl.truth.t1_ns)
    we = en.attribute(s, wl.start_ns, wl.end_ns)
    true_j = wl.true_energy_j()
    v = we.valid
    # Invalid only where the sensor cannot tell: it saw none of a short window, or the
    # window and its neighbours share a span.
    allowed = ("coverage 0", "outside power", "sensor gap")
    assert all(any(x in r for x in allowed) for r, ok in zip(we.reasons, v) if not ok)
    err = np.abs(we.energy_j[v] - true_j[v])
    assert np.all(err <= we.uncertainty_j[v]), (err / we.uncertainty_j[v]).max()


# -- H100-like sensors, decode workload, the protocol's repetitions ------------------------


def _pooled_error(model, n_windows: int, window_s: float, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    wl = sm.workload(rng, n_windows=n_windows, window_s=window_s, gap_s=(0.3, 1.0))
    s = sm.observe(wl.truth, model, rng.uniform(0.005, 0.01), rng, 0, wl.truth.t1_ns)
    we = en.attribute(s, wl.start_ns, wl.end_ns)
    # A 100 ms window can fall between the instant reading's 25 ms windows (as far as the
    # poll timing tells): invalid, "coverage 0". The rest pool.
    assert we.valid.mean() >= 0.9, we.reasons
    assert all("coverage 0" in r for r, ok in zip(we.reasons, we.valid) if not ok)
    e_j, u_j = en.pooled(we)
    true_j = float(wl.true_energy_j()[we.valid].sum())
    assert abs(e_j - true_j) <= u_j
    return (e_j - true_j) / true_j, u_j / true_j


@pytest.mark.parametrize(
    ("model", "n_windows", "window_s", "bound"),
    [
        (sm.H100_ENERGY, 8, 5.0, 0.002),
        (sm.H100_INSTANT, 8, 5.0, 0.003),
        (sm.H100_ENERGY, 64, 0.1, 0.01),
        (sm.H100_INSTANT, 64, 0.1, 0.03),
    ],
)
def test_h100_like_accuracy(model, n_windows, window_s, bound):
    """5 s windows x 8 and 100 ms windows x 64 at random phases (gaps 0.3-1 s), polled
    every 5-10 ms; the worst pooled error over a few workloads within ``bound``."""
    res = np.array([_pooled_error(model, n_windows, window_s, seed) for seed in range(4)])
    worst = float(np.abs(res[:, 0]).max())
    print(
        f"\n{model.name}: {n_windows} x {window_s * 1e3:.0f} ms windows: worst pooled error "
        f"{100 * worst:.3f}% (bound {100 * bound:.1f}%), mean reported uncertainty "
        f"{100 * res[:, 1].mean():.2f}%"
    )
    assert worst <= bound


def test_h100_instant_100ms_with_32_repetitions_reports_what_it_reaches():
    # 32 repetitions of 100 ms on the instant reading: the error is about 1/sqrt(2) of
    # the 64-repetition one; assert only what is reached (5%) and print it.
    res = np.array([_pooled_error(sm.H100_INSTANT, 32, 0.1, seed) for seed in range(4)])
    worst = float(np.abs(res[:, 0]).max())
    print(f"\nh100-instant 32 x 100 ms: worst pooled error {100 * worst:.2f}%")
    assert worst <= 0.05


def test_linear_split_is_biased_where_power_steps_at_edges():
    # An integrating counter and 100 ms windows of busy power between idle: splitting the
    # straddled spans in proportion to time loses ~dP * period / 3 per window.
    rng = np.random.default_rng(21)
    wl = sm.workload(rng, n_windows=64, window_s=0.1, gap_s=(0.3, 1.0), noise_w=5.0)
    s = sm.observe(wl.truth, sm.H100_ENERGY, 0.005, rng, 0, wl.truth.t1_ns)
    u = s.t_ns[np.flatnonzero(np.diff(s.value)) + 1].astype(float)
    e_at = s.value[np.flatnonzero(np.diff(s.value)) + 1]
    linear = np.interp(wl.end_ns, u, e_at) - np.interp(wl.start_ns, u, e_at)
    true_j = wl.true_energy_j()
    we = en.attribute(s, wl.start_ns, wl.end_ns)
    lin_err = (linear.sum() - true_j.sum()) / true_j.sum()
    our_err = (np.sum(we.energy_j) - true_j.sum()) / true_j.sum()
    print(
        f"\ncounter 64 x 100 ms: linear split {100 * lin_err:+.1f}%, two-level {100 * our_err:+.2f}%"
    )
    assert lin_err < -0.10
    assert abs(our_err) < 0.01


# -- undersampling: the 1 Hz trapezoid over a 1 s average -----------------------------------


def _decode_burst() -> sm.TruePower:
    phases = ((0.6, 700.0), (0.3, 450.0), (0.1, 300.0))
    return sm.decode_steps(np.random.default_rng(1), 2.0, 0.004, phases)


def _square_bursts() -> sm.TruePower:
    return sm.steps([900.0, 200.0] * 3 + [900.0], [0.4, 0.25, 0.3, 0.2, 0.35, 0.2, 0.3])


@pytest.mark.parametrize(("load", "bound"), [(_decode_burst, 0.01), (_square_bursts, 0.05)])
@pytest.mark.parametrize("seed", [0, 1])
def test_naive_1hz_trapezoid_is_badly_wrong_where_attribution_is_not(load, bound, seed):
    # 2 s of load between idle: decode steps, or bursts of 200-400 ms. The 1 s average
    # polled at 1 Hz lags a second behind; the instant reading does not.
    rng = np.random.default_rng(seed)
    burst = load()
    idle = sm.steps([90.0], [4.0])
    truth = sm.with_noise(sm.concat([idle, burst, idle]), rng, 15.0)
    a = np.array([4_000_000_000])
    b = a + int(round(burst.duration_s * 1e9))
    true_j = truth.energy_j(a, b)[0]
    slow = sm.observe(truth, sm.AVERAGE_1S, 1.0, rng, 0, truth.t1_ns)
    naive = en.naive_trapezoid(slow, a, b)[0]
    inst = sm.observe(truth, sm.H100_INSTANT, 0.005, rng, 0, truth.t1_ns)
    we = en.attribute(inst, a, b)
    ours = we.energy_j[0]
    naive_err = (naive - true_j) / true_j
    our_err = (ours - true_j) / true_j
    print(
        f"\n{load.__name__} (seed {seed}): naive 1 Hz trapezoid over the 1 s average "
        f"{100 * naive_err:+.1f}%, attribute on the instant reading {100 * our_err:+.2f}% "
        f"(uncertainty {100 * we.uncertainty_j[0] / true_j:.1f}%)"
    )
    assert abs(naive_err) > 0.20
    assert abs(ours - true_j) <= we.uncertainty_j[0]
    assert abs(our_err) < bound


def test_naive_trapezoid_is_exact_for_linear_power():
    truth = sm.ramp(100.0, 500.0, 10.0, dt_s=1e-3)
    model = sm.SensorModel("power", 0.5, 0.0, stamped_by="sensor")
    s = sm.observe(truth, model, 0.1, np.random.default_rng(0), 0, truth.t1_ns)
    a, b = np.array([1.3e9, 2.0e9, -1.0]), np.array([7.9e9, 2.7e9, 5.0e9])
    got = en.naive_trapezoid(s, a, b)
    np.testing.assert_allclose(got[:2], truth.energy_j(a[:2], b[:2]), rtol=2e-4)
    assert np.isnan(got[2])  # not bracketed by samples


# -- cross-check, idle power, pooling --------------------------------------------------------


@pytest.mark.parametrize(("gain", "flagged"), [(1.0, False), (0.998, False), (1.06, True)])
def test_cross_check_flags_a_gain_error(gain, flagged):
    rng = np.random.default_rng(31)
    wl = sm.workload(rng, n_windows=4, window_s=5.0, gap_s=(0.5, 1.0))
    counter = sm.observe(wl.truth, sm.H100_ENERGY, 0.005, rng, 0, wl.truth.t1_ns)
    inst = sm.SensorModel("power", 0.1, 0.025, jitter_s=0.002, resolution=1e-3, gain=gain)
    power = sm.observe(wl.truth, inst, 0.005, rng, 0, wl.truth.t1_ns)
    a = en.attribute(counter, wl.start_ns, wl.end_ns)
    b = en.attribute(power, wl.start_ns, wl.end_ns)
    out = en.cross_check(a, b)
    print(
        f"\ngain {gain}: difference {out['difference_j']:+.1f} J, combined uncertainty "
        f"{out['combined_uncertainty_j']:.1f} J, flag {out['flag']}"
    )
    assert out["flag"] is flagged and out["agree"] is not flagged
    assert out["windows"] == 4
    assert out["difference_j"] == pytest.approx(out["energy_a_j"] - out["energy_b_j"])


@pytest.mark.parametrize("model", [sm.H100_INSTANT, sm.H100_ENERGY, sm.METER_1HZ])
def test_idle_power_recovers_the_idle_level(model):
    rng = np.random.default_rng(41)
    truth = sm.with_noise(sm.steps([87.3], [30.0]), rng, 25.0)
    s = sm.observe(truth, model, 0.01, rng, 0, truth.t1_ns)
    t0, t1 = 5_000_000_000, 25_000_000_000
    p_w, u_w = en.idle_power(s, t0, t1)
    true_w = truth.mean_power_w(t0, t1)
    print(f"\n{model.name}: idle {p_w:.3f} +- {u_w:.3f} W (true {true_w:.3f} W)")
    assert abs(p_w - true_w) <= u_w
    assert u_w < 1.0


def test_idle_power_raises_with_the_reason():
    truth = sm.with_noise(sm.steps([80.0], [10.0]), np.random.default_rng(1), 10.0)
    s = sm.observe(truth, sm.H100_INSTANT, 0.01, np.random.default_rng(0), 2e9, truth.t1_ns)
    with pytest.raises(ValueError, match="no full sensor update span before"):
        en.idle_power(s, 1e9, 5e9)


def test_pooled_adds_systematic_linearly_and_random_in_quadrature():
    we = en.WindowEnergy(
        energy_j=np.array([10.0, 20.0, np.nan]),
        uncertainty_j=np.array([1.0 + 3.0, 2.0 + 4.0, np.nan]),
        coverage=np.array([1.0, 1.0, np.nan]),
        valid=np.array([True, True, False]),
        reasons=[None, None, "gap"],
        method="counter",
        systematic_j=np.array([1.0, 2.0, np.nan]),
        random_j=np.array([3.0, 4.0, np.nan]),
    )
    assert en.pooled(we) == (30.0, 3.0 + 5.0)
    none = en.WindowEnergy(
        np.array([np.nan]), np.array([np.nan]), np.array([np.nan]), np.array([False]),
        ["gap"], "power",
    )  # fmt: skip
    assert all(np.isnan(x) for x in en.pooled(none))


# -- validity: gaps, missing samples, bad windows --------------------------------------------


@pytest.mark.parametrize("model", [sm.H100_ENERGY, sm.H100_INSTANT])
def test_a_gap_longer_than_max_gap_invalidates_exactly_the_affected_windows(model):
    rng = np.random.default_rng(51)
    truth = sm.with_noise(sm.steps([300.0], [40.0]), rng, 20.0)
    s = sm.observe(truth, model, 0.005, rng, 0, truth.t1_ns)
    g0, g1 = 15.2e9, 19.5e9  # 4.3 s without samples
    keep = (s.t_ns < g0) | (s.t_ns > g1)
    holed = Samples(s.info, s.t_ns[keep], s.value[keep])
    a = np.arange(2e9, 36e9, 1.5e9)
    b = a + 1.0e9
    we = en.attribute(holed, a, b, max_gap_s=3.0)
    # Affected: windows in the hole or within an update period of it; the rest valid.
    near = (b > g0 - 0.05e9) & (a < g1 + 0.05e9)
    far = (b < g0 - 0.5e9) | (a > g1 + 0.5e9)
    assert not we.valid[near].any()
    assert we.valid[far].all()
    for i in np.flatnonzero(~we.valid):
        assert "sensor gap of 4." in we.reasons[i] and "max_gap_s" in we.reasons[i]
    assert np.isnan(we.energy_j[~we.valid]).all()
    # A longer max_gap_s accepts the same hole (a window inside it is then invalid only
    # because no reading saw it).
    relaxed = en.attribute(holed, a, b, max_gap_s=10.0)
    assert not any("gap" in r for r in relaxed.reasons if r)
    assert relaxed.valid[far].all()


def test_windows_without_samples_around_them_or_reversed_are_invalid_with_reasons():
    truth = sm.steps([200.0], [10.0])
    s = sm.observe(truth, sm.H100_ENERGY, 0.005, np.random.default_rng(3), 2e9, 8e9)
    a = np.array([1.0e9, 7.95e9, 5.0e9, 4.0e9])
    b = np.array([3.0e9, 9.0e9, 4.0e9, 5.0e9])
    we = en.attribute(s, a, b)
    assert list(we.valid) == [False, False, False, True]
    assert "before the window" in we.reasons[0]
    assert "after the window" in we.reasons[1]
    assert "not after its start" in we.reasons[2]
    assert we.reasons[3] is None
    assert we.energy_j[3] == pytest.approx(200.0, abs=we.uncertainty_j[3])


@pytest.mark.parametrize("model", [sm.H100_ENERGY, sm.H100_INSTANT])
def test_windows_with_pauses_shorter_than_an_update_period(model):
    # The engine's repetitions: back-to-back steps with random pauses shorter than an
    # update period between them. The pause power is never seen alone: it is bounded.
    rng = np.random.default_rng(61)
    wl = sm.workload(rng, n_windows=8, window_s=1.5, gap_s=(0.0, 0.1))
    s = sm.observe(wl.truth, model, 0.005, rng, 0, wl.truth.t1_ns)
    we = en.attribute(s, wl.start_ns, wl.end_ns)
    true_j = wl.true_energy_j()
    assert we.valid.all(), we.reasons
    assert np.all(np.abs(we.energy_j - true_j) <= we.uncertainty_j)
    e_j, u_j = en.pooled(we)
    print(
        f"\n{model.name} 8 x 1.5 s, pauses < 0.1 s: error {100 * (e_j / true_j.sum() - 1):+.2f}%, "
        f"uncertainty {100 * u_j / true_j.sum():.2f}%"
    )
    assert abs(e_j - true_j.sum()) <= u_j < 0.05 * true_j.sum()


def test_no_span_of_the_needed_kind_near_makes_a_window_invalid():
    # 100 ms windows with a 1 s average: no span lies wholly inside windows, and the
    # outside part of each edge span holds other windows' time.
    rng = np.random.default_rng(62)
    wl = sm.workload(rng, n_windows=12, window_s=0.1, gap_s=(0.2, 0.5))
    s = sm.observe(wl.truth, sm.AVERAGE_1S, 0.05, rng, 0, wl.truth.t1_ns)
    we = en.attribute(s, wl.start_ns, wl.end_ns)
    assert not we.valid.all()
    assert all("outside power is unknown" in r for r, ok in zip(we.reasons, we.valid) if not ok)
    v = we.valid
    assert np.all(np.abs(we.energy_j[v] - wl.true_energy_j()[v]) <= we.uncertainty_j[v])


def test_counter_that_goes_backwards_invalidates_nearby_windows():
    truth = sm.steps([200.0], [10.0])
    s = sm.observe(truth, sm.H100_ENERGY, 0.005, np.random.default_rng(4), 0, truth.t1_ns)
    v = s.value.copy()
    v[s.t_ns > 5e9] -= 1000.0  # a reset the source did not undo
    we = en.attribute(Samples(s.info, s.t_ns, v), np.array([2e9, 4.8e9]), np.array([3e9, 5.3e9]))
    assert we.valid[0] and not we.valid[1]
    assert "backwards" in we.reasons[1]


def test_adjacent_windows_on_a_steady_load():
    # Back-to-back 100 ms windows (a few decode steps each) inside a steady run: each
    # within its uncertainty, and so their sum and the whole.
    rng = np.random.default_rng(71)
    phases = ((0.6, 700.0), (0.4, 400.0))
    truth = sm.with_noise(sm.decode_steps(rng, 12.0, 0.004, phases), rng, 20.0)
    edges = np.linspace(2e9, 10e9, 81)
    for model in (sm.H100_ENERGY, sm.H100_INSTANT):
        s = sm.observe(truth, model, 0.005, rng, 0, truth.t1_ns)
        we = en.attribute(s, edges[:-1], edges[1:])
        whole = en.attribute(s, edges[:1], edges[-1:])
        true_j = truth.energy_j(edges[:-1], edges[1:])
        v = we.valid
        assert whole.valid[0] and v.all()
        assert np.all(np.abs(we.energy_j[v] - true_j[v]) <= we.uncertainty_j[v])
        e_j, u_j = en.pooled(we)
        assert abs(e_j - true_j[v].sum()) <= u_j
        assert abs(whole.energy_j[0] - true_j.sum()) <= whole.uncertainty_j[0]


def test_rejects_bad_arguments():
    truth = sm.steps([200.0], [3.0])
    s = sm.observe(truth, sm.H100_INSTANT, 0.005, np.random.default_rng(0), 0, truth.t1_ns)
    with pytest.raises(ValueError, match="edges"):
        en.attribute(s, [1e9], [2e9], edges="linear")
    with pytest.raises(ValueError, match="same length"):
        en.attribute(s, [1e9, 2e9], [2e9])
    few = Samples(s.info, s.t_ns[:2], s.value[:2])
    with pytest.raises(ValueError, match="fewer than"):
        en.attribute(few, [1e9], [2e9])
    counter = sm.observe(truth, sm.H100_ENERGY, 0.01, np.random.default_rng(0), 0, truth.t1_ns)
    with pytest.raises(ValueError, match="power readings"):
        en.naive_trapezoid(counter, [0], [1])
