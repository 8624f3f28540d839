"""The sampler against fake sources whose values are known functions of the host monotonic
clock (or of the number of reads), in both modes."""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.power.base import PowerSource, SourceError, SourceInfo
from engine.power.sampler import Sampler, default_poll_interval_s

STEP_NS = 3_000_000  # the fake counter advances every 3 ms


class StepCounter(PowerSource):
    """A counter (J) that advances by 1 every ``step_ns`` from ``origin_ns`` (host monotonic).

    The value is computed from one clock read and stamped with a later one, so the stamp's
    own step is the value's or the next: the ground truth is within one update step.
    """

    def __init__(self, origin_ns: int, step_ns: int = STEP_NS, name: str = "step") -> None:
        self.origin_ns = origin_ns
        self.step_ns = step_ns
        self.info = SourceInfo(
            name=name, boundary="node", quantity="energy", update_period_s=step_ns * 1e-9
        )

    def read(self) -> tuple[int, float]:
        value = (time.monotonic_ns() - self.origin_ns) // self.step_ns
        return time.monotonic_ns(), float(value)


class ReadCounter(PowerSource):
    """Returns how many times it was read before: the n-th read gives n - 1."""

    def __init__(self) -> None:
        self.reads = 0
        self.info = SourceInfo(name="reads", boundary="node", quantity="power")

    def read(self) -> tuple[int, float]:
        self.reads += 1
        return time.monotonic_ns(), float(self.reads - 1)


class Failing(PowerSource):
    """Every read fails with a two-line message."""

    def __init__(self) -> None:
        self.info = SourceInfo(name="failing", boundary="gpu-board", quantity="power")

    def read(self) -> tuple[int, float]:
        raise SourceError("sensor gone\nsecond line that must not be kept")


class SensorBuffer(PowerSource):
    """A sensor that samples every ``step_ns`` on a grid from ``origin_ns`` and stamps its own
    samples: ``read`` gives the newest one (the same one until the next), ``read_buffered``
    every one since the last call. Value of grid sample k: 100 + k % 7 W."""

    def __init__(self, origin_ns: int, step_ns: int = 1_000_000) -> None:
        self.origin_ns = origin_ns
        self.step_ns = step_ns
        self.next_k = 0  # first grid sample not yet handed out by read_buffered
        self.info = SourceInfo(
            name="buffered",
            boundary="gpu-board",
            quantity="power",
            update_period_s=step_ns * 1e-9,
            stamped_by="sensor",
        )

    def _newest_k(self) -> int:
        return (time.monotonic_ns() - self.origin_ns) // self.step_ns

    def read(self) -> tuple[int, float]:
        k = self._newest_k()
        return self.origin_ns + k * self.step_ns, 100.0 + k % 7

    def read_buffered(self) -> tuple[np.ndarray, np.ndarray]:
        k1 = self._newest_k()
        k = np.arange(self.next_k, k1 + 1, dtype=np.int64)
        self.next_k = k1 + 1
        return self.origin_ns + k * self.step_ns, 100.0 + (k % 7).astype(np.float64)


def make_broken() -> PowerSource:
    raise SourceError("no such device")


def _run(sampler: Sampler, seconds: float) -> tuple[int, int]:
    """Run ``sampler`` for ``seconds``; the host ns just before start and after stop."""
    t0 = time.monotonic_ns()
    with sampler:
        time.sleep(seconds)
    return t0, time.monotonic_ns()


def _check_step_values(t_ns: np.ndarray, value: np.ndarray, origin_ns: int) -> None:
    expected = (t_ns - origin_ns) // STEP_NS
    lag = expected - value
    assert np.all((lag == 0) | (lag == 1)), np.unique(lag)


def test_default_poll_interval():
    def info(period_s):
        return SourceInfo(name="x", boundary="node", quantity="power", update_period_s=period_s)

    assert default_poll_interval_s(info(0.1)) == pytest.approx(0.01)  # NVML-like: 10 ms cap
    assert default_poll_interval_s(info(1.0)) == pytest.approx(0.01)
    assert default_poll_interval_s(info(0.02)) == pytest.approx(0.002)
    assert default_poll_interval_s(info(1e-3)) == pytest.approx(5e-4)  # 0.5 ms floor
    assert default_poll_interval_s(info(None)) == pytest.approx(5e-3)


def test_thread_samples_timestamps_rate_and_values():
    origin = time.monotonic_ns()
    src = StepCounter(origin)
    sampler = Sampler([src], poll_interval_s=2e-3, mode="thread")
    t_start, t_stop = _run(sampler, 0.6)
    (s,) = sampler.samples()
    assert s.info is src.info
    assert s.t_ns.dtype == np.int64 and s.value.dtype == np.float64
    assert np.all(np.diff(s.t_ns) > 0)
    assert t_start <= s.t_ns[0] and s.t_ns[-1] <= t_stop
    _check_step_values(s.t_ns, s.value, origin)
    st = sampler.stats()["sources"][0]
    assert st["asked_polls_per_s"] == pytest.approx(500.0)
    # Loose: a CI runner has two slow cores; the schedule does not drift, so never above.
    assert 0.4 * 500 <= st["polls_per_s"] <= 1.05 * 500
    assert st["samples_kept"] == s.t_ns.size == st["polls"]
    assert 1.5e-3 <= st["interval_mean_s"] <= 5e-3
    assert st["overwritten"] == 0 and st["errors"] == 0


def test_ring_keeps_newest_capacity_and_counts_the_rest():
    src = ReadCounter()
    sampler = Sampler([src], poll_interval_s=1e-3, capacity=50, mode="thread")
    _run(sampler, 0.3)
    (s,) = sampler.samples()
    total = src.reads
    assert total > 100
    assert np.array_equal(s.value, np.arange(total - 50, total, dtype=np.float64))
    st = sampler.stats()["sources"][0]
    assert st["samples_kept"] == 50
    assert st["overwritten"] == total - 50


def test_failing_source_reported_once_others_keep_going(caplog):
    origin = time.monotonic_ns()
    good = StepCounter(origin)
    with caplog.at_level(logging.WARNING, logger="engine.power.sampler"):
        sampler = Sampler([Failing(), good], poll_interval_s=2e-3, mode="thread")
        _run(sampler, 0.4)
    logged = [r for r in caplog.records if "failing" in r.getMessage()]
    assert len(logged) == 1
    bad_st, good_st = sampler.stats()["sources"]
    assert bad_st["errors"] == bad_st["polls"] > 50
    assert bad_st["first_error"] == bad_st["last_error"] == "sensor gone"
    assert bad_st["samples_kept"] == 0
    assert good_st["errors"] == 0 and good_st["polls"] > 50
    bad, ok = sampler.samples()
    assert bad.t_ns.size == 0
    _check_step_values(ok.t_ns, ok.value, origin)


def test_samples_clipping_while_running_and_after():
    src = StepCounter(time.monotonic_ns())
    with Sampler([src], poll_interval_s=1e-3, mode="thread") as sampler:
        time.sleep(0.2)
        live = sampler.samples()[0]
        assert live.t_ns.size > 20
        assert sampler.running
        mid = int(live.t_ns[live.t_ns.size // 2])
        (head,) = sampler.samples(t1_ns=mid)
        assert head.t_ns[-1] == mid and np.array_equal(head.t_ns, live.t_ns[: head.t_ns.size])
        time.sleep(0.1)
    assert not sampler.running
    (full,) = sampler.samples()
    assert full.t_ns.size > live.t_ns.size
    t0, t1 = int(full.t_ns[7]) + 1, int(full.t_ns[-7])
    (clip,) = sampler.samples(t0, t1)
    keep = (full.t_ns >= t0) & (full.t_ns <= t1)
    assert np.array_equal(clip.t_ns, full.t_ns[keep])
    assert np.array_equal(clip.value, full.value[keep])
    assert clip.t_ns[0] == full.t_ns[8] and clip.t_ns[-1] == t1
    assert sampler.samples(t1, t0)[0].t_ns.size == 0


def test_buffered_samples_merged_without_repeats():
    src = SensorBuffer(time.monotonic_ns())
    sampler = Sampler([src], poll_interval_s=0.5e-3, mode="thread")
    _run(sampler, 0.3)
    (s,) = sampler.samples()
    k = (s.t_ns - src.origin_ns) // src.step_ns
    # Every grid sample the sensor produced, from the first to the last drained, once each.
    assert np.array_equal(k, np.arange(k[0], src.next_k))
    assert np.all((s.t_ns - src.origin_ns) % src.step_ns == 0)
    assert np.array_equal(s.value, 100.0 + (k % 7))
    st = sampler.stats()["sources"][0]
    assert st["buffered_kept"] == src.next_k
    assert st["repeated"] > 0  # read() handed back samples already kept


def test_factories_in_thread_mode_are_built_and_closed():
    closed = []

    class Closing(StepCounter):
        def close(self) -> None:
            closed.append(self)

    sampler = Sampler([functools.partial(Closing, time.monotonic_ns())], poll_interval_s=1e-3)
    _run(sampler, 0.05)
    assert len(closed) == 1 and sampler.infos[0].name == "step"


def test_process_mode_round_trips_samples():
    origin = time.monotonic_ns()
    factories = [functools.partial(StepCounter, origin), ReadCounter]
    sampler = Sampler(factories, poll_interval_s=2e-3, capacity=100, mode="process")
    t_start = time.monotonic_ns()
    with sampler:
        assert sampler.child_pid is not None and sampler.child_pid != os.getpid()
        time.sleep(0.5)
        live_step, live_reads = sampler.samples()
        assert live_step.t_ns.size > 30
        assert sampler.stats()["running"]
    t_stop = time.monotonic_ns()
    step, reads = sampler.samples()
    assert [s.info.name for s in (step, reads)] == ["step", "reads"]
    assert np.all(np.diff(step.t_ns) > 0)
    assert t_start <= step.t_ns[0] and step.t_ns[-1] <= t_stop
    _check_step_values(step.t_ns, step.value, origin)
    # What was read while running is still there unless overwritten since (capacity 100).
    still = live_step.t_ns[live_step.t_ns >= step.t_ns[0]]
    assert still.size > 0 and np.array_equal(step.t_ns[: still.size], still)
    st = sampler.stats()
    assert st["mode"] == "process" and not st["running"]
    assert st["cpu_s"] is not None and st["cpu_s"] > 0
    step_st, reads_st = st["sources"]
    assert 0.4 * 500 <= step_st["polls_per_s"] <= 1.05 * 500
    total = reads_st["polls"]
    assert total > 100 and reads_st["overwritten"] == total - 100
    assert np.array_equal(reads.value, np.arange(total - 100, total, dtype=np.float64))
    assert not sampler._proc.is_alive()


def test_process_mode_needs_factories_and_reports_build_errors():
    with pytest.raises(TypeError, match="factories"):
        Sampler([StepCounter(0)], mode="process")
    with pytest.raises(SourceError, match="no such device"):
        Sampler([make_broken], mode="process").start()
    with pytest.raises(ValueError):
        Sampler([], mode="thread")
    with pytest.raises(ValueError):
        Sampler([ReadCounter()], mode="fiber")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # reparented to an init that does not reap: a zombie has exited
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] == "Z"
    except (OSError, IndexError):
        return True


def test_process_mode_child_exits_when_parent_dies(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(
        "import functools, sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_sampler import StepCounter\n"
        "from engine.power.sampler import Sampler\n"
        "if __name__ == '__main__':\n"
        "    s = Sampler([functools.partial(StepCounter, 0)], mode='process').start()\n"
        "    print(s.child_pid, flush=True)\n"
        "    time.sleep(60)\n"
    )
    # The repository on the path too, in case the package is not installed.
    path = os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    parent = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
    )
    try:
        child_pid = int(parent.stdout.readline())
        assert not _gone(child_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while not _gone(child_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(child_pid)
    finally:
        parent.kill()
        parent.wait(10)


def test_default_poll_interval_follows_what_the_source_needs() -> None:
    from engine.power.base import SourceInfo
    from engine.power.sampler import default_poll_interval_s

    def info(quantity, period_s, window_s):
        return SourceInfo("s", "gpu-board", quantity, period_s, window_s)

    # A sampling power reading: ten polls per update, within [0.5 ms, 10 ms].
    assert default_poll_interval_s(info("power", 0.1, 0.025)) == pytest.approx(0.01)
    assert default_poll_interval_s(info("power", 0.002, 0.0)) == pytest.approx(0.0005)
    # An integrating counter updating every 1 ms (RAPL) needs no 2 kHz polling.
    assert default_poll_interval_s(info("energy", 0.001, None)) == pytest.approx(0.005)
    assert default_poll_interval_s(info("energy", 0.1, None)) == pytest.approx(0.01)
    assert default_poll_interval_s(info("power", None, None)) == pytest.approx(0.005)
