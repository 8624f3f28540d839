"""NCCL through CuPy: the CUDA backend's collectives on device buffers, one GPU per rank.

UNVERIFIED: written against CuPy's NCCL binding (``cupy_backends.cuda.libs.nccl``:
``get_unique_id``, ``NcclCommunicator(ndev, commId, rank)``, ``allReduce(sendbuf, recvbuf,
count, datatype, op, stream)``, ``abort``, ``check_async_error``, as in CuPy's source) and
imported only; no GPU was available to run it. The CPU backend's MPI path is the one tested.

The group is bootstrapped over MPI: rank 0 of the group draws NCCL's unique id and
broadcasts it (with the MPI communicator's timeout). An all-reduce is enqueued on a CUDA
stream (so it can be captured into the step's CUDA graph); ``wait`` polls an event recorded
after it with a deadline and aborts the NCCL communicator on timeout, so a rank whose peer
died does not spin forever inside NCCL.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np

from engine.dist.base import Comm, CommError, CommTimeout

LINK_BYTES = 64 << 20
LINK_REPEATS = 10


def _nccl():
    try:
        from cupy.cuda import nccl
    except ImportError as exc:  # CuPy missing, or built without NCCL
        raise CommError(f"NCCL is not available through CuPy ({exc})") from None
    if not getattr(nccl, "available", True) or not hasattr(nccl, "NcclCommunicator"):
        raise CommError("CuPy cannot load libnccl.so.2 (pip install nvidia-nccl-cu12 or -cu13)")
    return nccl


class NcclGroup:
    """An NCCL communicator over the ranks of ``comm`` (each on its current CUDA device)."""

    def __init__(self, comm: Comm) -> None:
        nccl = _nccl()
        self.nccl = nccl
        self.comm = comm
        uid = nccl.get_unique_id() if comm.is_root else None
        uid = comm.bcast(uid)
        comm.barrier()  # every rank is here: NCCL's blocking init will not wait on a dead one
        try:
            self.nc = nccl.NcclCommunicator(comm.size, uid, comm.rank)
        except Exception as exc:  # NcclError
            raise CommError(f"NCCL init failed: {exc}") from None

    def allreduce_f32(self, ptr: int, count: int, stream_ptr: int) -> None:
        """Enqueue an in-place float32 SUM all-reduce of ``count`` elements at ``ptr``."""
        self.nc.allReduce(ptr, ptr, count, self.nccl.NCCL_FLOAT32, self.nccl.NCCL_SUM, stream_ptr)

    def wait(self, stream, timeout_s: float | None = None) -> None:
        """Wait for ``stream`` (a CuPy stream) to drain, at most ``timeout_s`` (the group's
        timeout by default); on timeout or an NCCL error, abort the communicator and raise."""
        import cupy

        limit_s = self.comm.timeout_s if timeout_s is None else timeout_s
        event = cupy.cuda.Event(disable_timing=True)
        event.record(stream)
        deadline = time.monotonic() + limit_s
        pause = 1e-5
        while not event.done:
            try:
                self.nc.check_async_error()
            except Exception as exc:  # NcclError from a peer's failure
                self.abort()
                raise CommError(f"NCCL failed: {exc}") from None
            if time.monotonic() > deadline:
                self.abort()
                raise CommTimeout(
                    f"NCCL collective did not complete within {limit_s:g} s (a rank died or "
                    "hangs); communicator aborted"
                )
            time.sleep(pause)
            pause = min(2 * pause, 1e-3)

    def abort(self) -> None:
        """Abort the NCCL communicator (pending collectives return); it cannot be reused."""
        # Aborting is best effort: the point is failing anyway.
        with contextlib.suppress(Exception):
            self.nc.abort()


def nccl_bus_bw_gbps(
    comm: Comm, nbytes: int | None = None, repeats: int | None = None
) -> tuple[float | None, str]:
    """All-reduce bus bandwidth (GB/s) between the ranks' GPUs through NCCL, and how it was
    measured (nccl-tests' definition, as ``engine.dist.linkbw``). Collective. UNVERIFIED."""
    nbytes = LINK_BYTES if nbytes is None else nbytes
    repeats = LINK_REPEATS if repeats is None else repeats
    n = comm.size
    if n == 1:
        return None, "one rank: no link"
    try:
        import cupy

        group = NcclGroup(comm)
    except (ImportError, CommError) as exc:
        return None, f"link: not measured ({exc})"
    buf = cupy.full(max(1, nbytes // 4), comm.rank + 1, dtype=cupy.float32)
    stream = cupy.cuda.Stream(non_blocking=True)
    group.allreduce_f32(buf.data.ptr, buf.size, stream.ptr)
    group.wait(stream)
    want = n * (n + 1) / 2
    if not bool((buf == want).all()):
        raise CommError(f"NCCL all-reduce check failed: want {want:g}")
    times_s = []
    for _ in range(repeats):
        comm.barrier()
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(stream)
        group.allreduce_f32(buf.data.ptr, buf.size, stream.ptr)
        stop.record(stream)
        group.wait(stream)
        times_s.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    slowest_s = max(comm.allgather(float(np.median(times_s))))
    bw = 2.0 * (n - 1) / n * buf.nbytes / slowest_s / 1e9
    method = (
        f"link: NCCL all-reduce of {buf.nbytes / 2**20:g} MiB float32 over {n} GPUs, median "
        f"of {repeats} by CUDA events, slowest rank; bus bandwidth = 2 (n - 1) / n x bytes / "
        "time (nccl-tests' definition); latency not included"
    )
    return bw, method
