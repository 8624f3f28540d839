"""engine.power.replay: loading CSV / JSON Lines meter logs, clock mapping, one-line errors,
real-time replay, and offset recovery from a shifted synthetic trace."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.power.base import SourceError
from engine.power.replay import (
    ReplayError,
    ReplayLog,
    ReplaySource,
    estimate_offset,
    indicator_from_windows,
)

SETTINGS = settings(derandomize=True, deadline=None, max_examples=25)


def _write(path, fmt: str, t_col: str, v_col: str, rows: list[tuple[float, float]]) -> None:
    if fmt == "csv":
        lines = [f"# exported by a meter\n{t_col},{v_col},note"]
        lines += [f"{t!r},{v!r},x" for t, v in rows]
        path.write_text("\n".join(lines) + "\n")
    else:
        path.write_text("\n".join(json.dumps({t_col: t, v_col: v, "n": 1}) for t, v in rows))


@SETTINGS
@given(
    fmt=st.sampled_from(["csv", "jsonl"]),
    t_col=st.sampled_from(["t", "t_s", "T_S"]),
    column=st.sampled_from(
        [("power_w", "power"), ("watts", "power"), ("W", "power"), ("energy_j", "energy")]
        + [("joules", "energy"), ("j", "energy")]
    ),
    gaps=st.lists(st.floats(1e-3, 5.0), min_size=1, max_size=30),
    levels=st.lists(st.floats(0.0, 5000.0), min_size=31, max_size=31),
    offset_s=st.floats(-1e6, 1e6),
)
def test_load_reads_values_and_maps_with_the_given_offset(
    tmp_path_factory, fmt, t_col, column, gaps, levels, offset_s
):
    v_col, quantity = column
    t = np.concatenate(([0.0], np.cumsum(gaps)))
    v = np.array(levels[: t.size])
    if quantity == "energy":
        v = np.cumsum(v)
    path = tmp_path_factory.mktemp("log") / f"meter.{fmt}"
    _write(path, fmt, t_col, v_col, list(zip(t.tolist(), v.tolist(), strict=True)))
    log = ReplayLog.load(path, clock_offset_s=offset_s)
    assert log.quantity == quantity and not log.epoch
    np.testing.assert_array_equal(log.log_t_s, t)
    np.testing.assert_array_equal(log.value, v)
    expected_ns = np.round((t + offset_s) * 1e9)
    assert np.all(np.abs(log.t_ns - expected_ns) <= 1)
    assert log.median_interval_s == pytest.approx(float(np.median(np.diff(t))))


def test_epoch_stamps_map_through_the_host_wall_clock(tmp_path):
    now_s = time.time()
    rows = [(now_s - 2.0 + 0.5 * i, 100.0 + i) for i in range(5)]
    path = tmp_path / "wall.csv"
    _write(path, "csv", "t", "power_w", rows)
    log = ReplayLog.load(path)
    assert log.epoch and "NTP" in log.offset_source
    offset_ns = time.time_ns() - time.monotonic_ns()
    expected_ns = np.array([t for t, _ in rows]) * 1e9 - offset_ns
    # float64 epoch seconds carry ~0.2 µs; the two offset readings differ by µs
    assert np.all(np.abs(log.t_ns - expected_ns) < 1e6)


def test_relative_stamps_without_offset_stay_unaligned(tmp_path):
    path = tmp_path / "rel.csv"
    _write(path, "csv", "t_s", "w", [(0.0, 1.0), (1.0, 2.0)])
    log = ReplayLog.load(path)
    assert log.t_ns is None and log.clock_offset_s is None
    assert log.with_offset(5.0).t_ns.tolist() == [5_000_000_000, 6_000_000_000]


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("time,power_w\n1,2\n", "no time column (t or t_s)"),
        ("t,volts\n1,2\n", "no value column (power_w, watts, w, energy_j, joules, j)"),
        ("t,power_w,energy_j\n1,2,3\n", "both a power (power_w) and an energy (energy_j)"),
        ("t,power_w\n0,1\n1,abc\n", "line 3: bad power_w value 'abc'"),
        ("t,power_w\n0,1\n# note\n1,2\n1,3\n", "line 5: t=1 does not increase"),
        ("t,power_w\n0,1\n1,nan\n", "line 3: power_w is 'nan', not a finite number"),
        ("t,power_w\n0,1\n1,-4\n", "line 3: negative power"),
        ("t,energy_j\n0,10\n1,9\n", "line 3: energy decreases"),
        ("t,power_w\n0,1\n1\n", "line 3: 1 fields, the header has 2"),
        ("t,power_w\n", "no data rows"),
        ('{"t": 0, "w": 1}\n{"t": 1}\n', "line 2: bad w value None"),
        ('{"t": 0, "w": 1}\n[1, 2]\n', "line 2: not a JSON object"),
        ('{"t": 0, "w": 1}\n{"t": 1, \n', "line 2: not JSON"),
    ],
)
def test_bad_logs_give_one_line_errors_naming_file_and_place(tmp_path, text, fragment):
    path = tmp_path / "bad.log"
    path.write_text(text)
    with pytest.raises(ReplayError) as info:
        ReplayLog.load(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and fragment in message
    assert isinstance(info.value, SourceError) and isinstance(info.value, ValueError)


def test_missing_file_is_a_replay_error(tmp_path):
    with pytest.raises(ReplayError, match="cannot read the log"):
        ReplayLog.load(tmp_path / "absent.csv")


def test_quantity_picks_a_column_when_both_exist(tmp_path):
    path = tmp_path / "both.csv"
    path.write_text("t,power_w,energy_j\n0,5,0\n1,7,6\n")
    assert ReplayLog.load(path, 0.0, quantity="energy").value.tolist() == [0.0, 6.0]
    assert ReplayLog.load(path, 0.0, quantity="power").value.tolist() == [5.0, 7.0]


def test_replay_source_returns_the_last_value_at_or_before_now(tmp_path):
    rng = np.random.default_rng()
    t = np.arange(0.0, 4.0, 0.05)
    v = rng.uniform(50, 500, t.size).round(3)
    path = tmp_path / "meter.jsonl"
    _write(path, "jsonl", "t", "power_w", list(zip(t.tolist(), v.tolist(), strict=True)))
    # put the log's middle at now: half of it is history, half is still to come
    offset_s = time.monotonic() - 2.0
    src = ReplaySource(ReplayLog.load(path, clock_offset_s=offset_s), boundary="node")
    assert src.info.stamped_by == "sensor" and src.info.update_period_s == pytest.approx(0.05)
    before_ns = time.monotonic_ns()
    t_ns, power_w = src.read()
    after_ns = time.monotonic_ns()
    log_ns = np.round((t + offset_s) * 1e9).astype(np.int64)
    # the row read is the last one at or before some instant inside the read
    lo = int(np.searchsorted(log_ns, before_ns, side="right")) - 1
    hi = int(np.searchsorted(log_ns, after_ns, side="right")) - 1
    i = int(np.searchsorted(log_ns, t_ns))
    assert lo <= i <= hi and log_ns[i] == t_ns and power_w == float(v[i])

    first_t, first_v = src.read_buffered()
    assert first_t[0] == log_ns[0] and np.all(first_t <= time.monotonic_ns())
    np.testing.assert_array_equal(first_v, v[: first_t.size])
    time.sleep(0.12)
    more_t, more_v = src.read_buffered()
    assert more_t.size >= 1 and more_t[0] > first_t[-1]
    start = first_t.size
    np.testing.assert_array_equal(more_v, v[start : start + more_t.size])


def test_replay_of_a_log_that_has_not_started_is_a_source_error(tmp_path):
    path = tmp_path / "future.csv"
    _write(path, "csv", "t", "w", [(0.0, 1.0), (1.0, 2.0)])
    src = ReplaySource(ReplayLog.load(path, clock_offset_s=time.monotonic() + 100.0))
    with pytest.raises(SourceError, match="no logged value yet"):
        src.read()
    assert src.read_buffered()[0].size == 0


def test_unaligned_log_replays_from_creation(tmp_path):
    path = tmp_path / "rel.csv"
    _write(path, "csv", "t", "w", [(10.0, 1.0), (10.05, 2.0), (60.0, 3.0)])
    before_ns = time.monotonic_ns()
    src = ReplaySource(ReplayLog.load(path))
    t_ns, value = src.read()
    assert value == 1.0 and t_ns >= before_ns
    time.sleep(0.06)
    assert src.read()[1] == 2.0


def _busy_idle(rng, duration_s: float) -> list[tuple[float, float]]:
    """Random busy windows (start s, end s) over [0, duration_s]."""
    t, windows = 0.0, []
    while t < duration_s:
        idle = rng.uniform(0.15, 1.5)
        busy = rng.uniform(0.15, 1.5)
        windows.append((t + idle, t + idle + busy))
        t += idle + busy
    return windows


@settings(derandomize=True, deadline=None, max_examples=12)
@given(
    seed=st.integers(0, 2**32 - 1),
    true_lag_s=st.floats(-4.0, 4.0),
    meter_hz=st.sampled_from([10.0, 50.0]),
    step_s=st.sampled_from([0.02, 0.05]),
)
def test_estimate_offset_recovers_a_known_shift_within_a_step(seed, true_lag_s, meter_hz, step_s):
    rng = np.random.default_rng(seed)
    host_start_s = 5000.0
    windows = _busy_idle(rng, 70.0)
    windows_ns = [
        (int((host_start_s + a) * 1e9), int((host_start_s + b) * 1e9)) for a, b in windows
    ]
    ref_t, ref_v = indicator_from_windows(windows_ns)

    # The meter's clock runs true_lag_s off the start-aligned guess (its log starts at 0).
    true_offset_s = host_start_s + 1.0 + true_lag_s
    # The data pin the offset down to about the meter interval over the number of busy/idle
    # edges (the offsets that move no row across an edge fit equally): ~60 s of a 10-50 Hz
    # meter resolves well under the 20-50 ms steps searched here.
    log_t = np.arange(0.0, 60.0, 1.0 / meter_hz) + rng.uniform(0, 1.0 / meter_hz)
    host_t = log_t + true_offset_s
    busy = np.zeros(log_t.size, bool)
    for a, b in windows:
        busy |= (host_t >= host_start_s + a) & (host_t < host_start_s + b)
    log_w = np.where(busy, 420.0, 95.0) + rng.normal(0.0, 8.0, log_t.size)

    est = estimate_offset(
        (log_t, log_w),
        (ref_t, ref_v),
        max_lag_s=5.0,
        step_s=step_s,
        initial_offset_s=host_start_s + 1.0,
    )
    assert abs(est.offset_s - true_offset_s) <= step_s + 1e-9
    assert est.correlation > 0.9 and est.confidence == pytest.approx(est.correlation)
    assert not est.at_search_edge


def test_estimate_offset_flags_a_peak_on_the_search_edge():
    rng = np.random.default_rng()
    t = np.arange(0.0, 30.0, 0.1)
    ref = (np.sin(t * 0.7) > 0).astype(float)
    log_v = ref + rng.normal(0, 0.05, t.size)
    # true offset 3 s away, search only ±1 s: the best found is on the edge
    est = estimate_offset((t, log_v), (t + 3.0, ref), max_lag_s=1.0, step_s=0.1, initial_offset_s=0)
    assert est.at_search_edge and est.confidence == 0.0


def test_estimate_offset_from_an_energy_log(tmp_path):
    rng = np.random.default_rng()
    windows = _busy_idle(rng, 30.0)
    ref_t, ref_v = indicator_from_windows([(int(a * 1e9), int(b * 1e9)) for a, b in windows])
    # a meter integrating energy at 20 Hz, its clock 123.4 s behind the host's
    fine_t = np.arange(0.0, 30.0, 1e-3)
    idx = np.searchsorted(ref_t, fine_t, side="right") - 1
    power = np.where(idx >= 0, ref_v[np.clip(idx, 0, None)], 0.0) * 300.0 + 80.0
    energy = np.concatenate(([0.0], np.cumsum(power[:-1]) * 1e-3))
    pick = np.arange(0, fine_t.size, 50)
    path = tmp_path / "energy.csv"
    _write(
        path,
        "csv",
        "t",
        "energy_j",
        list(zip((fine_t[pick] - 123.4).tolist(), energy[pick].tolist(), strict=True)),
    )
    log = ReplayLog.load(path)
    # differenced to power at mid-interval stamps: no half-interval bias
    est = estimate_offset(log, (ref_t, ref_v), max_lag_s=2.0, step_s=0.005, initial_offset_s=123.0)
    assert abs(est.offset_s - 123.4) <= 0.005 + 1e-9


def test_samples_place_the_log_on_the_host_clock(tmp_path):
    path = tmp_path / "m.csv"
    _write(path, "csv", "t", "power_w", [(1.0, 10.0), (2.5, 20.0)])
    samples = ReplayLog.load(path, clock_offset_s=100.0).samples
    assert samples.t_ns.tolist() == [101_000_000_000, 102_500_000_000]
    assert samples.value.tolist() == [10.0, 20.0]
    assert samples.info.boundary == "node" and samples.info.update_period_s == 1.5
    with pytest.raises(ReplayError, match="relative stamps and no clock_offset_s"):
        ReplayLog.load(path).samples  # noqa: B018 - the property raises
