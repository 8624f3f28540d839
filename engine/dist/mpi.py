"""The MPI communicator (mpi4py): host buffers between ranks launched by mpirun or srun.

Every collective is started non-blocking and then polled until it completes, another rank
reports a failure, or the timeout passes. Polling spins for the first couple of
milliseconds (a tensor-parallel all-reduce in a decode step usually completes within them),
then sleeps with a growing pause so that a rank waiting on a slow peer leaves the core alone.

A point's group (``for_point``) has a control channel: a duplicate of the group on which a
rank that fails sends its reason to every other rank (tag ``TAG_ABORT``). Waits probe it,
so the others stop at once with ``PeerFailed`` instead of waiting for the timeout. Small
objects travel pickled; a gather is point-to-point so that a timeout can name the ranks that
did not answer.
"""

from __future__ import annotations

import pickle
import time
from typing import Any

import numpy as np
from mpi4py import MPI

from engine.dist.base import DEFAULT_TIMEOUT_S, Comm, CommError, CommTimeout, PeerFailed

TAG_ABORT = 7101
TAG_GATHER = 7102
TAG_PING = 7103
TAG_PONG = 7104
SPIN_S = 0.002  # busy-poll this long before sleeping between polls
SLEEP_MAX_S = 0.001  # longest pause between polls once sleeping
ABORT_PROBE_S = 0.002  # how often a wait looks for a peer's failure message
SIGNAL_WAIT_S = 2.0  # how long a failing rank waits for its failure messages to leave


def _mpi_type(dtype: np.dtype) -> MPI.Datatype:
    """The predefined MPI datatype of a NumPy dtype (reductions need a predefined one)."""
    try:
        return MPI._typedict[np.dtype(dtype).char]
    except KeyError:
        raise CommError(f"no MPI datatype for {np.dtype(dtype).name}") from None


class MpiComm(Comm):
    """A group of MPI ranks (an ``MPI.Intracomm``) with timeouts on every wait."""

    def __init__(
        self,
        comm: MPI.Intracomm,
        timeout_s: float,
        ctl: MPI.Intracomm | None,
        local: tuple[int, int, str],
        owned: bool,
        owns_ctl: bool = False,
    ) -> None:
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.timeout_s = timeout_s
        self.ctl = ctl
        self.local_rank, self.local_size, self.node = local
        self._owned = owned
        self._owns_ctl = owns_ctl
        self._children: list[MpiComm] = []

    @classmethod
    def world(cls, timeout_s: float = DEFAULT_TIMEOUT_S) -> MpiComm:
        """Every rank the launcher started, on a private duplicate of ``COMM_WORLD`` (so no
        other library's messages mix with ours); node placement from shared-memory groups."""
        comm = MPI.COMM_WORLD.Dup()
        shared = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
        local = (shared.Get_rank(), shared.Get_size(), MPI.Get_processor_name())
        shared.Free()
        return cls(comm, timeout_s, None, local, owned=False)

    # -- waiting ---------------------------------------------------------------------------

    def _check_abort(self) -> None:
        if self.ctl is None:
            return
        status = MPI.Status()
        if self.ctl.Iprobe(MPI.ANY_SOURCE, TAG_ABORT, status):
            buf = bytearray(status.Get_count(MPI.BYTE))
            self.ctl.Recv([buf, MPI.BYTE], status.Get_source(), TAG_ABORT)
            raise PeerFailed(f"rank {status.Get_source()}: {buf.decode(errors='replace')}")

    def _poll(self, done, what: str, timeout_s: float | None, missing=None) -> None:
        """Call ``done()`` until it is true; PeerFailed or CommTimeout otherwise."""
        limit_s = self.timeout_s if timeout_s is None else timeout_s
        start = time.monotonic()
        deadline, spin_end, next_probe = start + limit_s, start + SPIN_S, start
        pause = 1e-5
        while not done():
            now = time.monotonic()
            if now >= next_probe:
                self._check_abort()
                next_probe = now + ABORT_PROBE_S
            if now > deadline:
                who = f"rank(s) {', '.join(map(str, missing()))}" if missing else "a rank"
                raise CommTimeout(
                    f"{what}: {who} did not answer within {limit_s:g} s (died, hangs, or "
                    "left on another path)"
                )
            if now > spin_end:
                time.sleep(pause)
                pause = min(2 * pause, SLEEP_MAX_S)

    def _wait(self, reqs: list[MPI.Request], what: str, timeout_s: float | None = None) -> None:
        self._poll(lambda: MPI.Request.Testall(reqs), what, timeout_s)

    # -- tensors ---------------------------------------------------------------------------

    def allreduce_sum(self, array: np.ndarray) -> None:
        """Sum ``array`` over the ranks in place (MPI all-reduce, SUM)."""
        if not array.flags.c_contiguous:
            raise ValueError("allreduce_sum needs a C-contiguous array")
        req = self.comm.Iallreduce(MPI.IN_PLACE, [array, _mpi_type(array.dtype)], MPI.SUM)
        self._wait([req], "all-reduce")

    def alltoallv(self, chunks: list[np.ndarray]) -> list[np.ndarray]:
        """Exchange ``chunks[d]`` with rank ``d`` (counts first, then the rows)."""
        if len(chunks) != self.size:
            raise ValueError(f"alltoallv over {self.size} ranks needs {self.size} chunks")
        dtype, tail = chunks[0].dtype, chunks[0].shape[1:]
        if any(c.dtype != dtype or c.shape[1:] != tail for c in chunks):
            raise ValueError("alltoallv chunks must share dtype and trailing shape")
        row = int(np.prod(tail, dtype=np.int64))
        send_rows = np.array([c.shape[0] for c in chunks], dtype=np.intc)
        recv_rows = np.empty(self.size, dtype=np.intc)
        self._wait([self.comm.Ialltoall(send_rows, recv_rows)], "all-to-all (counts)")
        send = np.ascontiguousarray(
            np.concatenate([c.reshape(c.shape[0] * row) for c in chunks]), dtype=dtype
        )
        sc = send_rows.astype(np.int64) * row
        rc = recv_rows.astype(np.int64) * row
        if max(sc.sum(), rc.sum()) >= 2**31:
            raise CommError("all-to-all of 2**31 elements or more is not supported")
        sd = np.concatenate([[0], np.cumsum(sc)[:-1]]).astype(np.intc)
        rd = np.concatenate([[0], np.cumsum(rc)[:-1]]).astype(np.intc)
        recv = np.empty(int(rc.sum()), dtype=dtype)
        mpi_type = _mpi_type(dtype)
        req = self.comm.Ialltoallv(
            [send, (sc.astype(np.intc), sd), mpi_type], [recv, (rc.astype(np.intc), rd), mpi_type]
        )
        self._wait([req], "all-to-all")
        return [
            recv[rd[i] : rd[i] + rc[i]].reshape((int(recv_rows[i]), *tail))
            for i in range(self.size)
        ]

    # -- small objects ---------------------------------------------------------------------

    def bcast(self, obj: Any, root: int = 0, timeout_s: float | None = None) -> Any:
        """``obj`` of ``root`` on every rank (its pickled length, then its bytes)."""
        data = pickle.dumps(obj) if self.rank == root else b""
        n = np.array([len(data)], dtype=np.int64)
        self._wait([self.comm.Ibcast(n, root)], "broadcast", timeout_s)
        buf = bytearray(data) if self.rank == root else bytearray(int(n[0]))
        self._wait([self.comm.Ibcast([buf, MPI.BYTE], root)], "broadcast", timeout_s)
        return obj if self.rank == root else pickle.loads(buf)

    def gather(self, obj: Any, root: int = 0, timeout_s: float | None = None) -> list | None:
        """Every rank's ``obj`` on ``root``, point to point (a timeout names the missing)."""
        if self.rank != root:
            data = pickle.dumps(obj)
            req = self.comm.Isend([data, MPI.BYTE], root, TAG_GATHER)
            self._wait([req], f"sending to rank {root}", timeout_s)
            return None
        out: list = [None] * self.size
        out[root] = obj
        pending = set(range(self.size)) - {root}

        def receive_ready() -> bool:
            for r in sorted(pending):
                status = MPI.Status()
                msg = self.comm.Improbe(r, TAG_GATHER, status)
                if msg is not None:
                    buf = bytearray(status.Get_count(MPI.BYTE))
                    msg.Recv([buf, MPI.BYTE])
                    out[r] = pickle.loads(buf)
                    pending.discard(r)
            return not pending

        self._poll(receive_ready, "gather", timeout_s, missing=lambda: sorted(pending))
        return out

    def allgather(self, obj: Any, timeout_s: float | None = None) -> list:
        """Every rank's ``obj`` on every rank (gather on rank 0, then broadcast)."""
        return self.bcast(self.gather(obj, 0, timeout_s), 0, timeout_s)

    def barrier(self, timeout_s: float | None = None) -> int:
        """Non-blocking barrier, polled; the host monotonic ns at which this rank left."""
        self._wait([self.comm.Ibarrier()], "barrier", timeout_s)
        return time.monotonic_ns()

    # -- structure -------------------------------------------------------------------------

    def _local(self) -> tuple[int, int, str]:
        return self.local_rank, self.local_size, self.node

    def split(self, color: int, key: int) -> MpiComm:
        """Sub-group sharing this group's control channel (blocking MPI_Comm_split: call it
        right after a barrier, when every rank is known to be there)."""
        sub = MpiComm(self.comm.Split(color, key), self.timeout_s, self.ctl, self._local(), True)
        self._children.append(sub)
        return sub

    def for_point(self) -> MpiComm:
        """A fresh duplicate of this group with its own control channel."""
        new, req = self.comm.Idup()
        self._wait([req], "creating the point's group")
        ctl, req = new.Idup()
        self._wait([req], "creating the point's control channel")
        return MpiComm(new, self.timeout_s, ctl, self._local(), owned=True, owns_ctl=True)

    def signal_failure(self, reason: str) -> None:
        """Send ``reason`` to every other rank on the control channel (best effort)."""
        if self.ctl is None:
            return
        data = reason.encode()[:4000]
        reqs = [
            self.ctl.Isend([data, MPI.BYTE], r, TAG_ABORT)
            for r in range(self.ctl.Get_size())
            if r != self.ctl.Get_rank()
        ]
        deadline = time.monotonic() + SIGNAL_WAIT_S
        while not MPI.Request.Testall(reqs) and time.monotonic() < deadline:
            time.sleep(1e-4)

    def free(self) -> None:
        """Free this point's groups (every rank calls it, in the same order, after a point
        that ended cleanly; a failed point's groups are left alone: they may hold unmatched
        collectives)."""
        for sub in self._children:
            sub.free()
        self._children = []
        if self._owned:
            self.comm.Free()
            self._owned = False
        if self._owns_ctl and self.ctl is not None:
            self.ctl.Free()
            self._owns_ctl = False

    def abort(self, code: int) -> None:
        """MPI_Abort on every rank of the run (the launcher ends them all)."""
        MPI.COMM_WORLD.Abort(code)

    # -- clocks ----------------------------------------------------------------------------

    def clock_offsets_ns(self, rounds: int = 16) -> list[tuple[float, float]]:
        """Ping-pong each rank from rank 0 (Cristian's method, best of ``rounds``)."""
        stamp = np.zeros(1, dtype=np.int64)
        offsets = [(0.0, 0.0)] * self.size
        if self.rank == 0:
            for r in range(1, self.size):
                best: tuple[float, float] | None = None
                for _ in range(rounds):
                    t0 = time.monotonic_ns()
                    self._wait([self.comm.Isend(stamp, r, TAG_PING)], f"ping to rank {r}")
                    self._wait([self.comm.Irecv(stamp, r, TAG_PONG)], f"pong from rank {r}")
                    t1 = time.monotonic_ns()
                    rtt = float(t1 - t0)
                    if best is None or rtt < 2 * best[1]:
                        best = (float(stamp[0]) - (t0 + t1) / 2.0, rtt / 2.0)
                offsets[r] = best or (0.0, 0.0)
        else:
            for _ in range(rounds):
                self._wait([self.comm.Irecv(stamp, 0, TAG_PING)], "ping from rank 0")
                stamp[0] = time.monotonic_ns()
                self._wait([self.comm.Isend(stamp, 0, TAG_PONG)], "pong to rank 0")
        return self.bcast(offsets)
