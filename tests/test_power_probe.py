"""engine.power.probe: update-period recovery from back-to-back reads, the read cost, the
never-changing case, and the wall-to-monotonic clock offset."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.power.base import PowerSource, SourceError, SourceInfo
from engine.power.probe import (
    measure_buffered_rate,
    measure_update_period,
    wall_to_monotonic_offset_ns,
)


class SteppingSource(PowerSource):
    """A sensor whose value changes every ``period_s``, driven by the host monotonic clock,
    like a counter the firmware refreshes on its own schedule."""

    def __init__(self, period_s: float, phase_s: float = 0.0, stamped: bool = False) -> None:
        self.period_ns = int(period_s * 1e9)
        self.phase_ns = int(phase_s * 1e9)
        self.stamped = stamped
        self.info = SourceInfo(
            name="stepping",
            boundary="node",
            quantity="energy",
            stamped_by="sensor" if stamped else "poll",
        )

    def read(self) -> tuple[int, float]:
        now_ns = time.monotonic_ns()
        tick = (now_ns - self.phase_ns) // self.period_ns
        # a sensor-stamped source reports the instant of its update, a polled one the read
        t_ns = tick * self.period_ns + self.phase_ns if self.stamped else now_ns
        return t_ns, float(tick) * 0.25


class ConstantSource(PowerSource):
    info = SourceInfo(name="flat", boundary="node", quantity="power")

    def read(self) -> tuple[int, float]:
        return time.monotonic_ns(), 42.0


class FailingSource(PowerSource):
    info = SourceInfo(name="failing", boundary="node", quantity="power")

    def __init__(self, fail_after: int) -> None:
        self.left = fail_after

    def read(self) -> tuple[int, float]:
        if self.left == 0:
            raise SourceError("sensor went away")
        self.left -= 1
        return time.monotonic_ns(), float(self.left)


@settings(derandomize=True, deadline=None, max_examples=6)
@given(
    period_s=st.floats(0.005, 0.03),
    phase_s=st.floats(0.0, 0.03),
    stamped=st.booleans(),
)
def test_update_period_is_recovered_within_ten_percent(period_s, phase_s, stamped):
    result = measure_update_period(SteppingSource(period_s, phase_s, stamped), duration_s=0.25)
    assert result["reason"] is None
    assert result["update_period_median_s"] == pytest.approx(period_s, rel=0.10)
    if stamped:
        assert result["update_period_min_s"] == pytest.approx(period_s, rel=0.10)
    else:
        # a polled change is seen at the first read after it: a preempted read (2 busy
        # cores) delays one change and shortens the next interval, so only the median is
        # held to 10% here
        assert result["update_period_min_s"] <= result["update_period_median_s"]
    expected_changes = result["duration_s"] / period_s  # the last read may overrun 0.25 s
    # a read preempted for longer than a period (2 busy cores) sees two updates as one
    assert 0.5 * expected_changes <= result["n_changes"] <= expected_changes + 2
    assert result["n_reads"] > result["n_changes"]
    assert result["read_cost_s"] * result["reads_per_s"] == pytest.approx(1.0)
    assert result["duration_s"] >= 0.25


def test_a_value_that_never_changes_gives_none_and_a_reason():
    result = measure_update_period(ConstantSource(), duration_s=0.05)
    assert result["update_period_median_s"] is None and result["update_period_min_s"] is None
    assert "never changed" in result["reason"] and result["n_changes"] == 0
    assert result["read_cost_s"] > 0


def test_max_reads_bounds_the_probe():
    result = measure_update_period(ConstantSource(), duration_s=10.0, max_reads=500)
    assert result["n_reads"] == 500 and result["duration_s"] < 5.0


def test_a_failing_read_ends_the_probe_with_its_reason():
    result = measure_update_period(FailingSource(50), duration_s=1.0)
    assert result["n_reads"] == 50
    assert result["reason"].startswith("read 51 failed: sensor went away")
    # the 49 changes before the failure are still timed
    assert result["update_period_min_s"] is not None


def test_wall_to_monotonic_offset_matches_the_clocks():
    offset_ns, half_width_ns = wall_to_monotonic_offset_ns()
    m0 = time.monotonic_ns()
    w = time.time_ns()
    m1 = time.monotonic_ns()
    assert abs((w - (m0 + m1) // 2) - offset_ns) <= half_width_ns + (m1 - m0) + 50_000
    assert 0 < half_width_ns < 1_000_000


class BufferingSource(PowerSource):
    """A sensor that buffers a sample every ``period_s`` (stamped on the host clock) and hands
    over what accumulated since the last drain."""

    info = SourceInfo(name="buffering", boundary="node", quantity="power", stamped_by="sensor")

    def __init__(self, period_s: float) -> None:
        self.period_ns = int(period_s * 1e9)
        self.next_ns = time.monotonic_ns()

    def read(self) -> tuple[int, float]:
        return time.monotonic_ns(), 1.0

    def read_buffered(self):
        now_ns = time.monotonic_ns()
        stamps = np.arange(self.next_ns, now_ns + 1, self.period_ns, dtype=np.int64)
        if stamps.size:
            self.next_ns = int(stamps[-1]) + self.period_ns
        return stamps, np.ones(stamps.size)


@pytest.mark.parametrize("period_s", [0.002, 0.0075])
def test_buffered_rate_is_the_interval_between_sensor_stamps(period_s):
    result = measure_buffered_rate(BufferingSource(period_s), duration_s=0.2, poll_s=0.02)
    assert result["reason"] is None
    assert result["sample_interval_median_s"] == pytest.approx(period_s, rel=1e-6)
    assert result["sample_interval_min_s"] == pytest.approx(period_s, rel=1e-6)
    assert abs(result["n_samples"] - result["duration_s"] / period_s) <= 2


def test_buffered_rate_of_an_unbuffered_source_says_so():
    assert measure_buffered_rate(ConstantSource(), 0.01)["reason"] == "the source has no buffer"
