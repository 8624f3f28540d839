"""The sampler: polls power sources beside the workload into bounded ring buffers.

Each source is polled on its own deadline schedule (``t0 + k * interval``, so sleeps never
accumulate drift; a slot missed because the poller was held up is skipped and counted, not
caught up in a burst). Every sample keeps the host monotonic ns its source's ``read``
returned. Samples go into preallocated NumPy rings (int64 ``t_ns``, float64 ``value``) of
``capacity`` per source, so memory is bounded on long runs: once full, the oldest samples
are overwritten and counted. A source's own buffer (``read_buffered``, drained every
``BUFFER_DRAIN_S``) goes into a second ring of the same size, because its sensor stamps
interleave with those of ``read``; ``samples()`` merges the two in time order.

Two modes:

- ``mode="thread"``: a daemon thread of this process. It needs the GIL for every poll, so
  a workload that holds the GIL (Python code, or native code that does not release it)
  delays or starves it; ``stats()`` shows that as ``missed_polls`` and a long p99 interval.
- ``mode="process"``: the same polling loop in a child process (multiprocessing, spawn
  context), immune to the workload's GIL. Sources then cross a process boundary, so they
  are given as picklable factories (``Callable[[], PowerSource]``: a module-level class or
  function, or a ``functools.partial`` of one), built inside the child. Samples and stats
  come back through a Pipe on request; the child exits when ``stop()`` is called, when the
  Sampler is garbage-collected, or when the parent dies (its end of the Pipe closes).

The constructor takes a list whose items are ``PowerSource`` instances or factories. Thread
mode accepts both (it builds, owns and closes the sources its factories make, and never
closes instances it was given); process mode accepts factories only.

Sources are built in the child by unpickling the factories, so the main module must be
importable without side effects (the usual ``if __name__ == "__main__":`` guard of spawn).

Default mode: thread. Measured with ``bench/test_bench_sampler.py`` on the 2-core Xeon VM
(1-min load 0.19 before the run): the CPU backend's llama-3.1-8b B=1 L=1024 BF16 decode step
(1 GB budget: embedding and LM head only, a ~1 GB weight stream through Numba parallel
kernels on both cores), 10 rounds x 20 steps, modes shuffled in each round, change = median
over rounds of on/off, from the median step time (IQR across rounds in brackets):

    ========================  ==================  ==================
    polling a 1 ms source at  thread              process
    ========================  ==================  ==================
    1000/s                    -6.9 % (1.0 pp)     -7.3 % (1.4 pp)
    100/s                     -0.0 % (1.1 pp)     -0.7 % (0.8 pp)
    sampler CPU, 1000/s       4.4 % of a core     5.9 % of a core
    sampler CPU, 100/s        0.6 % of a core     2.1 % of a core
    ========================  ==================  ==================

(an earlier run, whole-trial throughput: -5.7 % thread, -6.2 % process at 1000/s; runs
while other jobs shared the VM were discarded). The thread disturbs the workload no more than
the process and costs less CPU (likely because waking a thread of the running process needs
no switch of address space), starts in microseconds rather than ~0.1 s, and takes the
sources as they are. At 1 kHz neither mode meets a 1 % budget on this machine: each wake-up
costs ~20 us of CPU on this VM even for an empty sleep loop, and, we believe, it delays one
of the two workers of a statically split parallel kernel, which the other then waits for;
the default intervals (10 ms for a 100 ms sensor) keep the cost within noise. The Numba kernels release the GIL (numba's parallel launcher does),
so the thread polled at 992/s beside them; where the workload holds the GIL instead (pure
Python for 2 s in the bench), a thread got 242 polls/s of 1000 asked (one per 5 ms switch
interval) and a process 999/s: use ``mode="process"`` for such workloads.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from engine.power.base import PowerSource, Samples, SourceError, SourceInfo

log = logging.getLogger(__name__)

MODES = ("thread", "process")
DEFAULT_MODE = "thread"
#: Polls per sensor update period when the period is known (sees each change within 10 %).
POLLS_PER_UPDATE = 10
#: Slowest default poll interval for a source whose period is known, s.
MAX_DEFAULT_POLL_S = 10e-3
#: Fastest default poll interval, s: below this the sleep overshoot (timer slack, ~50-100 us)
#: dominates and the sampler's own cost grows for no new information.
MIN_DEFAULT_POLL_S = 0.5e-3
#: Fastest default poll interval of an integrating energy counter, s.
INTEGRATING_COUNTER_POLL_S = 5e-3
#: Poll interval for a source whose update period is unknown, s.
UNKNOWN_PERIOD_POLL_S = 5e-3
#: How often a source's own buffer is drained, s: a driver buffer holds many samples, so
#: draining it at every 1 ms poll would repeat a costly call for nothing.
BUFFER_DRAIN_S = 20e-3
#: Poll instants kept per source for the interval statistics (the newest ones).
POLL_HISTORY = 1 << 16
#: Longest single sleep, s, so that a stop request is seen within this.
MAX_SLEEP_S = 20e-3
#: How long start() waits for the child process to build its sources, s.
START_TIMEOUT_S = 120.0
#: How long a request to the child process may take, s.
REPLY_TIMEOUT_S = 60.0


def default_poll_interval_s(info: SourceInfo) -> float:
    """The poll interval, in s, used for a source when none is asked: a tenth of its update
    period, at most 10 ms and at least 0.5 ms; 5 ms when the period is unknown. An
    integrating counter is polled at most every 5 ms: it loses no energy between polls, a poll
    only places window edges (to +-2.5 ms), and polling a 1 ms counter (RAPL) at 2 kHz would
    cost the CPU workload it measures several percent (see the table above)."""
    period_s = info.update_period_s
    if period_s is None or not period_s > 0:
        return UNKNOWN_PERIOD_POLL_S
    interval_s = max(MIN_DEFAULT_POLL_S, min(period_s / POLLS_PER_UPDATE, MAX_DEFAULT_POLL_S))
    if info.quantity == "energy" and info.averaging_window_s is None:
        interval_s = max(interval_s, INTEGRATING_COUNTER_POLL_S)
    return interval_s


def one_line(exc: BaseException) -> str:
    """An exception as one line of text: its message's first line, or its type's name."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0]
    return line if isinstance(exc, SourceError) else f"{type(exc).__name__}: {line}"


class _Ring:
    """Preallocated ring of (t_ns int64, value float64): the newest ``capacity`` are kept."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.t_ns = np.empty(capacity, dtype=np.int64)
        self.value = np.empty(capacity, dtype=np.float64)
        self.count = 0  # written since the start, kept or not

    @property
    def kept(self) -> int:
        return min(self.count, self.capacity)

    @property
    def overwritten(self) -> int:
        return self.count - self.kept

    def last_t_ns(self) -> int | None:
        return int(self.t_ns[(self.count - 1) % self.capacity]) if self.count else None

    def push(self, t_ns: int, value: float) -> None:
        i = self.count % self.capacity
        self.t_ns[i] = t_ns
        self.value[i] = value
        self.count += 1

    def extend(self, t_ns: np.ndarray, value: np.ndarray) -> None:
        n = len(t_ns)
        if n == 0:
            return
        skip = max(0, n - self.capacity)  # those would be overwritten within this call
        t_ns, value = t_ns[skip:], value[skip:]
        self.count += skip
        i = self.count % self.capacity
        first = min(len(t_ns), self.capacity - i)
        self.t_ns[i : i + first] = t_ns[:first]
        self.value[i : i + first] = value[:first]
        rest = len(t_ns) - first
        self.t_ns[:rest] = t_ns[first:]
        self.value[:rest] = value[first:]
        self.count += len(t_ns)

    def ordered(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the kept samples, oldest first."""
        if self.count <= self.capacity:
            return self.t_ns[: self.count].copy(), self.value[: self.count].copy()
        i = self.count % self.capacity
        return (
            np.concatenate((self.t_ns[i:], self.t_ns[:i])),
            np.concatenate((self.value[i:], self.value[:i])),
        )


def _clip(
    t_ns: np.ndarray, value: np.ndarray, t0_ns: int | None, t1_ns: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """The samples with t0_ns <= t_ns <= t1_ns (a bound left None is open)."""
    i0 = 0 if t0_ns is None else int(np.searchsorted(t_ns, t0_ns, side="left"))
    i1 = len(t_ns) if t1_ns is None else int(np.searchsorted(t_ns, t1_ns, side="right"))
    return t_ns[i0:i1], value[i0:i1]


def _merge(
    t_a: np.ndarray, v_a: np.ndarray, t_b: np.ndarray, v_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Two time-ordered series as one, in time order; at a stamp present in both, ``a``'s
    sample is kept."""
    t_ns = np.concatenate((t_a, t_b))
    value = np.concatenate((v_a, v_b))
    order = np.argsort(t_ns, kind="stable")
    t_ns, value = t_ns[order], value[order]
    if t_ns.size > 1:
        first = np.concatenate(([True], np.diff(t_ns) > 0))
        t_ns, value = t_ns[first], value[first]
    return t_ns, value


class _Channel:
    """One source's polling state: schedule, rings and counters."""

    def __init__(self, source: PowerSource, interval_s: float, capacity: int) -> None:
        self.source = source
        self.info = source.info
        self.interval_ns = max(1, round(interval_s * 1e9))
        self.next_ns = 0
        self.ring = _Ring(capacity)
        self.capacity = capacity
        self.buffered: _Ring | None = None
        self.has_buffer: bool | None = None  # unknown until read_buffered is first called
        self.next_drain_ns = 0
        # (poll instant, read duration) of the newest polls, for interval statistics.
        self.polls = _Ring(POLL_HISTORY)
        self.first_poll_ns = 0
        self.missed_polls = 0
        self.repeated = 0
        self.out_of_order = 0
        self.errors = 0
        self.first_error: str | None = None
        self.last_error: str | None = None

    def error(self, exc: BaseException) -> None:
        msg = one_line(exc)
        self.errors += 1
        self.last_error = msg
        if self.first_error is None:
            self.first_error = msg
            log.warning(
                "power source %s: %s (later errors of this source are counted in "
                "Sampler.stats(), not logged)",
                self.info.name,
                msg,
            )

    def store(self, t_ns: int, value: float) -> None:
        last = self.ring.last_t_ns()
        if last is not None and t_ns <= last:
            # A sensor-stamped read of a sample already kept, or a clock that went back.
            if t_ns == last and value == self.ring.value[(self.ring.count - 1) % self.capacity]:
                self.repeated += 1
                return
            if t_ns < last:
                self.out_of_order += 1
                return
        self.ring.push(t_ns, value)

    def store_buffered(self, t_ns: np.ndarray, value: np.ndarray) -> None:
        t_ns = np.asarray(t_ns, dtype=np.int64).reshape(-1)
        value = np.asarray(value, dtype=np.float64).reshape(-1)
        if t_ns.shape != value.shape:
            raise SourceError(f"read_buffered gave {t_ns.size} stamps for {value.size} values")
        if self.buffered is None:
            self.buffered = _Ring(self.capacity)
        if t_ns.size > 1 and np.any(np.diff(t_ns) < 0):
            order = np.argsort(t_ns, kind="stable")
            t_ns, value = t_ns[order], value[order]
        last = self.buffered.last_t_ns()
        if last is not None:
            fresh = t_ns > last  # a driver buffer may hand back samples it gave before
            self.repeated += int(t_ns.size - np.count_nonzero(fresh))
            t_ns, value = t_ns[fresh], value[fresh]
        self.buffered.extend(t_ns, value)

    def drain(self, now_ns: int, lock: threading.Lock) -> None:
        """Store what the source buffered since the last drain (reading outside ``lock``)."""
        if self.has_buffer is False:
            return
        self.next_drain_ns = now_ns + round(BUFFER_DRAIN_S * 1e9)
        try:
            got = self.source.read_buffered()
            if got is None:
                if self.has_buffer is None:
                    self.has_buffer = False
                return
            self.has_buffer = True
            with lock:
                self.store_buffered(*got)
        except Exception as exc:  # a buggy source must not end the sampling of the others
            with lock:
                self.error(exc)

    def poll(self, now_ns: int, lock: threading.Lock) -> None:
        """Read the source once and store the sample; a slow read does not hold ``lock``."""
        t_call = time.monotonic_ns()
        failure: Exception | None = None
        try:
            t_ns, value = self.source.read()
            t_ns, value = int(t_ns), float(value)
        except Exception as exc:  # a buggy source must not end the sampling of the others
            failure = exc
        read_s = (time.monotonic_ns() - t_call) * 1e-9
        with lock:
            if failure is None:
                self.store(t_ns, value)
            else:
                self.error(failure)
            if self.polls.count == 0:
                self.first_poll_ns = t_call
            self.polls.push(t_call, read_s)
        if now_ns >= self.next_drain_ns:
            self.drain(now_ns, lock)

    def stats(self) -> dict[str, Any]:
        t_poll, read_s = self.polls.ordered()
        interval_s = np.diff(t_poll) * 1e-9
        n = self.polls.count
        span_ns = int(t_poll[-1]) - self.first_poll_ns if n >= 2 else 0
        return {
            "name": self.info.name,
            "asked_interval_s": self.interval_ns * 1e-9,
            "asked_polls_per_s": 1e9 / self.interval_ns,
            "polls": n,
            # Intervals per s from the first poll to the last: a whole run's mean rate.
            "polls_per_s": (n - 1) / (span_ns * 1e-9) if span_ns > 0 else None,
            "missed_polls": self.missed_polls,
            "interval_mean_s": float(interval_s.mean()) if interval_s.size else None,
            "interval_p99_s": float(np.percentile(interval_s, 99)) if interval_s.size else None,
            "interval_max_s": float(interval_s.max()) if interval_s.size else None,
            "read_mean_s": float(read_s.mean()) if read_s.size else None,
            "interval_stats_over_polls": int(t_poll.size),
            "samples_kept": self.ring.kept,
            "overwritten": self.ring.overwritten,
            "repeated": self.repeated,
            "out_of_order": self.out_of_order,
            "buffered_kept": self.buffered.kept if self.buffered else 0,
            "buffered_overwritten": self.buffered.overwritten if self.buffered else 0,
            "errors": self.errors,
            "first_error": self.first_error,
            "last_error": self.last_error,
        }


class _PollLoop:
    """The polling loop shared by both modes; ``run`` blocks until ``stop`` is set."""

    def __init__(
        self, sources: Sequence[PowerSource], poll_interval_s: float | None, capacity: int
    ) -> None:
        self.channels = [
            _Channel(
                s,
                poll_interval_s if poll_interval_s is not None else default_poll_interval_s(s.info),
                capacity,
            )
            for s in sources
        ]
        self.lock = threading.Lock()
        self.t_start_ns: int | None = None
        self.t_stop_ns: int | None = None
        self.busy_ns = 0
        self.cpu_clock: int | None = None  # the polling thread's CPU clock id, where known
        self.cpu_start_s: float | None = None
        self.cpu_end_s: float | None = None

    def run(self, stop: threading.Event) -> None:
        try:
            self.cpu_clock = time.pthread_getcpuclockid(threading.get_ident())
        except (AttributeError, OSError):  # not on every platform
            self.cpu_clock = None
        self.cpu_start_s = time.thread_time()
        now = time.monotonic_ns()
        self.t_start_ns = now
        for ch in self.channels:
            ch.next_ns = now
            ch.next_drain_ns = now
        try:
            while not stop.is_set():
                now = time.monotonic_ns()
                due_ns = min(ch.next_ns for ch in self.channels)
                if due_ns > now:
                    time.sleep(min((due_ns - now) * 1e-9, MAX_SLEEP_S))
                    continue
                for ch in self.channels:
                    if ch.next_ns > now:
                        continue
                    ch.poll(now, self.lock)
                    ch.next_ns += ch.interval_ns
                    if ch.next_ns <= now:  # held up: skip the missed slots, stay on the grid
                        missed = (now - ch.next_ns) // ch.interval_ns + 1
                        ch.next_ns += missed * ch.interval_ns
                        ch.missed_polls += missed
                self.busy_ns += time.monotonic_ns() - now
        finally:
            now = time.monotonic_ns()
            for ch in self.channels:
                ch.drain(now, self.lock)  # what the sensors buffered since the last drain
            with self.lock:
                self.t_stop_ns = time.monotonic_ns()
                self.cpu_end_s = time.thread_time()

    def snapshot(self, t0_ns: int | None, t1_ns: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each source's kept samples, oldest first, clipped to [t0_ns, t1_ns]: the polled
        ones merged with the source's buffered ones, a stamp seen in both kept once."""
        out = []
        with self.lock:
            for ch in self.channels:
                t_ns, value = ch.ring.ordered()
                if ch.buffered is not None and ch.buffered.count:
                    t_buf, v_buf = ch.buffered.ordered()
                    t_ns, value = _merge(t_buf, v_buf, t_ns, value)
                out.append(_clip(t_ns, value, t0_ns, t1_ns))
        return out

    def cpu_s(self) -> float | None:
        if self.cpu_start_s is None:
            return None
        if self.cpu_end_s is not None:
            return self.cpu_end_s - self.cpu_start_s
        if self.cpu_clock is None:
            return None
        try:
            return time.clock_gettime(self.cpu_clock) - self.cpu_start_s
        except OSError:
            return None

    def stats(self) -> dict[str, Any]:
        with self.lock:
            if self.t_start_ns is None:
                wall_s = 0.0
            else:
                end_ns = self.t_stop_ns if self.t_stop_ns is not None else time.monotonic_ns()
                wall_s = (end_ns - self.t_start_ns) * 1e-9
            cpu_s = self.cpu_s()
            return {
                "wall_s": wall_s,
                "busy_fraction": self.busy_ns * 1e-9 / wall_s if wall_s > 0 else None,
                "cpu_s": cpu_s,
                "cpu_fraction": cpu_s / wall_s if cpu_s is not None and wall_s > 0 else None,
                "cpu_scope": "the polling thread" if cpu_s is not None else None,
                "sources": [ch.stats() for ch in self.channels],
            }


def _child_main(
    factories: list[Callable[[], PowerSource]],
    poll_interval_s: float | None,
    capacity: int,
    conn: Any,
) -> None:
    """Process mode: build the sources, poll them in a thread, answer the parent's requests
    on ``conn`` until it says stop or goes away."""
    sources: list[PowerSource] = []
    try:
        for make in factories:
            src = make()
            if not isinstance(src, PowerSource):
                raise TypeError(
                    f"factory {make!r} returned {type(src).__name__}, not a PowerSource"
                )
            sources.append(src)
        loop = _PollLoop(sources, poll_interval_s, capacity)
    except Exception as exc:
        conn.send(("error", one_line(exc)))
        for src in sources:
            _close_quietly(src)
        conn.close()
        return
    conn.send(("ready", [ch.info for ch in loop.channels]))
    stop = threading.Event()
    cpu0_s = time.process_time()
    poller = threading.Thread(target=loop.run, args=(stop,), name="power-sampler", daemon=True)
    poller.start()

    def stats() -> dict[str, Any]:
        out = loop.stats()
        # The whole child is sampler overhead: polling and serving requests.
        out["cpu_s"] = time.process_time() - cpu0_s
        out["cpu_fraction"] = out["cpu_s"] / out["wall_s"] if out["wall_s"] > 0 else None
        out["cpu_scope"] = "the sampler process (polling and serving requests)"
        return out

    try:
        while True:
            try:
                request = conn.recv()
            except (EOFError, OSError):  # the parent is gone
                break
            kind = request[0]
            if kind == "samples":
                conn.send(("samples", loop.snapshot(*request[1:])))
            elif kind == "stats":
                conn.send(("stats", stats()))
            elif kind == "stop":
                stop.set()
                poller.join()
                conn.send(("final", loop.snapshot(None, None), stats()))
                break
    finally:
        stop.set()
        poller.join()
        for src in sources:
            _close_quietly(src)
        conn.close()


def _close_quietly(source: PowerSource) -> None:
    try:
        source.close()
    except Exception as exc:  # closing must not hide the data already sampled
        log.warning("power source %s: close failed: %s", source.info.name, one_line(exc))


class Sampler:
    """Polls power sources beside the workload; see the module docstring.

    ``sources``: ``PowerSource`` instances or factories (``Callable[[], PowerSource]``,
    picklable in process mode, where only factories are accepted). ``poll_interval_s``: one
    interval for every source, s; None gives each source ``default_poll_interval_s``.
    ``capacity``: samples kept per source (a second ring of the same size holds a source's
    own buffered samples, allocated only if it has any). ``mode``: "thread" or "process".
    """

    def __init__(
        self,
        sources: Sequence[PowerSource | Callable[[], PowerSource]],
        poll_interval_s: float | None = None,
        capacity: int = 1 << 20,
        mode: str = DEFAULT_MODE,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if poll_interval_s is not None and not poll_interval_s > 0:
            raise ValueError(f"poll_interval_s must be > 0, got {poll_interval_s}")
        items = list(sources)
        if not items:
            raise ValueError("no sources to sample")
        for item in items:
            if mode == "process" and isinstance(item, PowerSource):
                raise TypeError(
                    "process mode builds its sources in the child: pass picklable factories "
                    f"(e.g. functools.partial of a module-level function), not {item!r}"
                )
            if not (isinstance(item, PowerSource) or callable(item)):
                raise TypeError(f"not a PowerSource nor a factory of one: {item!r}")
        self.mode = mode
        self.poll_interval_s = poll_interval_s
        self.capacity = capacity
        self._items = items
        self._infos: list[SourceInfo] | None = None
        self._started = False
        self._stopped = False
        self._request_lock = threading.Lock()
        # thread mode
        self._loop: _PollLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._owned: list[PowerSource] = []
        # process mode
        self._proc: Any = None
        self._conn: Any = None
        self._final: tuple[list, dict] | None = None

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> Sampler:
        """Start polling; returns self. Raises SourceError when a source cannot be built."""
        if self._started:
            raise RuntimeError("a Sampler starts once; make a new one")
        if self.mode == "thread":
            self._start_thread()
        else:
            self._start_process()
        self._started = True
        return self

    def _start_thread(self) -> None:
        sources = []
        try:
            for item in self._items:
                if isinstance(item, PowerSource):
                    sources.append(item)
                else:
                    src = item()
                    if not isinstance(src, PowerSource):
                        raise TypeError(f"factory {item!r} returned {type(src).__name__}")
                    self._owned.append(src)
                    sources.append(src)
        except BaseException:
            for src in self._owned:
                _close_quietly(src)
            self._owned.clear()
            raise
        self._loop = _PollLoop(sources, self.poll_interval_s, self.capacity)
        self._infos = [ch.info for ch in self._loop.channels]
        self._thread = threading.Thread(
            target=self._loop.run, args=(self._stop_event,), name="power-sampler", daemon=True
        )
        self._thread.start()

    def _start_process(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        proc = ctx.Process(
            target=_child_main,
            args=(self._items, self.poll_interval_s, self.capacity, child_conn),
            name="power-sampler",
            daemon=True,
        )
        proc.start()
        child_conn.close()  # so that the child's death reads as EOF here
        self._proc, self._conn = proc, parent_conn
        try:
            reply = self._recv(START_TIMEOUT_S)
        except BaseException:
            self._kill_child()
            raise
        if reply[0] == "error":
            self._kill_child()
            raise SourceError(f"sampler process could not build its sources: {reply[1]}")
        self._infos = list(reply[1])

    def stop(self) -> None:
        """Stop polling and keep what was sampled (``samples`` and ``stats`` still work);
        closes the sources the sampler built. Calling it again does nothing."""
        if not self._started or self._stopped:
            self._stopped = self._started
            return
        self._stopped = True
        if self.mode == "thread":
            self._stop_event.set()
            assert self._thread is not None
            self._thread.join()
            for src in self._owned:
                _close_quietly(src)
            return
        with self._request_lock:
            try:
                reply = self._exchange(("stop",))
                self._final = (reply[1], reply[2])
            finally:
                self._proc.join(timeout=10.0)
                self._kill_child()

    def _kill_child(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout=5.0)
        if self._conn is not None:
            self._conn.close()

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:
        # A forgotten sampler must not leave a thread or a child polling.
        try:
            self._stop_event.set()
            if self._proc is not None and self._proc.is_alive():
                self._proc.terminate()
        except Exception:
            pass

    @property
    def running(self) -> bool:
        """True between start() and stop()."""
        return self._started and not self._stopped

    @property
    def infos(self) -> list[SourceInfo]:
        """Each source's SourceInfo, in the order given (known once started)."""
        if self._infos is None:
            raise RuntimeError("the sources are built at start(); start the sampler first")
        return list(self._infos)

    @property
    def child_pid(self) -> int | None:
        """The sampler process's pid in process mode (None in thread mode or before start)."""
        return self._proc.pid if self._proc is not None else None

    # -- data ----------------------------------------------------------------------------

    def samples(self, t0_ns: int | None = None, t1_ns: int | None = None) -> list[Samples]:
        """A copy of each source's kept samples, in time order, with t0_ns <= t_ns <= t1_ns
        (host monotonic ns; None leaves a bound open), one Samples per source in the order
        given; usable while running. A source that buffers its own samples
        (``read_buffered``) has them merged with its polled ones (a stamp seen in both is
        kept once): such a source stamps by sensor (base.py), so both share one meaning.
        """
        infos = self.infos
        if self.mode == "thread":
            assert self._loop is not None
            arrays = self._loop.snapshot(t0_ns, t1_ns)
        elif self._final is not None:
            arrays = [_clip(t, v, t0_ns, t1_ns) for t, v in self._final[0]]
        else:
            arrays = self._request(("samples", t0_ns, t1_ns))[1]
        return [Samples(info, t, v) for info, (t, v) in zip(infos, arrays)]

    def stats(self) -> dict[str, Any]:
        """How the sampling went, so far or in all.

        Keys: ``mode``; ``running``; ``wall_s`` (s polled); ``busy_fraction`` (fraction of
        wall time the poller spent polling: reads and stores); ``cpu_s`` and
        ``cpu_fraction`` (CPU s of the polling thread, or of the whole sampler process in
        process mode, and per wall s; None where not measurable) with ``cpu_scope``;
        ``sources``: one dict per source, in order: ``asked_polls_per_s``, ``polls``,
        ``polls_per_s`` (achieved), ``missed_polls`` (slots skipped because the poller was
        held up), ``interval_mean_s``, ``interval_p99_s``, ``interval_max_s`` (over the newest
        ``interval_stats_over_polls`` polls), ``read_mean_s``, ``samples_kept``,
        ``overwritten``, ``repeated`` (a sample read again, not stored twice),
        ``out_of_order``, ``buffered_kept``, ``buffered_overwritten``, ``errors``,
        ``first_error``, ``last_error`` (one-line messages).
        """
        if not self._started:
            raise RuntimeError("the sampler has not started")
        if self.mode == "thread":
            assert self._loop is not None
            out = self._loop.stats()
        elif self._final is not None:
            out = dict(self._final[1])
        else:
            out = self._request(("stats",))[1]
        return {"mode": self.mode, "running": self.running, **out}

    # -- process mode plumbing -------------------------------------------------------------

    def _recv(self, timeout_s: float) -> tuple:
        try:
            if not self._conn.poll(timeout_s):
                raise SourceError(f"sampler process gave no answer within {timeout_s:.0f} s")
            return self._conn.recv()
        except (EOFError, OSError) as exc:
            raise self._ended() from exc

    def _exchange(self, request: tuple) -> tuple:
        try:
            self._conn.send(request)
        except OSError as exc:
            raise self._ended() from exc
        return self._recv(REPLY_TIMEOUT_S)

    def _ended(self) -> SourceError:
        if self._proc is not None:
            self._proc.join(timeout=1.0)
        code = self._proc.exitcode if self._proc is not None else None
        return SourceError(f"sampler process ended unexpectedly (exit code {code})")

    def _request(self, request: tuple) -> tuple:
        with self._request_lock:
            if self._final is not None:
                raise RuntimeError("the sampler process has stopped")
            return self._exchange(request)
