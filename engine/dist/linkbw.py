"""The link bandwidth between ranks, measured: the roofline prices collective bytes at it.

The figure is the bus bandwidth of an all-reduce, as nccl-tests defines it: a ring
all-reduce of S bytes over n ranks sends and receives ``2 (n - 1) / n * S`` bytes per rank,
and ``engine.plan`` counts a tensor-parallel all-reduce's bytes the same way, so
``time = comm_bytes / bus bandwidth``. The expert-parallel all-to-all bytes are priced at
the same figure (each rank's sent bytes over its link). Small messages of a decode step
(a few kB per layer) are dominated by latency, which this figure does not include: the
roofline's collective time is a floor.
"""

from __future__ import annotations

import time

import numpy as np

from engine.dist.base import Comm, CommError

LINK_BYTES = 16 << 20
LINK_REPEATS = 5


def allreduce_bus_bw_gbps(
    comm: Comm, nbytes: int | None = None, repeats: int | None = None
) -> tuple[float | None, str]:
    """Bus bandwidth (GB/s, 1e9 B/s) of a host all-reduce over ``comm`` and how it was
    measured; None for one rank. Collective: every rank calls it.

    The median time of ``repeats`` all-reduces of ``nbytes`` (float32) is taken on each
    rank, and the slowest rank's is used. The first all-reduce also checks the sum.
    """
    nbytes = LINK_BYTES if nbytes is None else nbytes
    repeats = LINK_REPEATS if repeats is None else repeats
    n = comm.size
    if n == 1:
        return None, "one rank: no link"
    buf = np.full(max(1, nbytes // 4), comm.rank + 1, dtype=np.float32)
    comm.allreduce_sum(buf)
    want = n * (n + 1) / 2
    if not np.all(buf == want):
        raise CommError(f"all-reduce check failed: got {buf[0]:g}, want {want:g}")
    times_s = []
    for _ in range(repeats):
        comm.barrier()
        t0 = time.perf_counter()
        comm.allreduce_sum(buf)
        times_s.append(time.perf_counter() - t0)
    slowest_s = max(comm.allgather(float(np.median(times_s))))
    bw = 2.0 * (n - 1) / n * buf.nbytes / slowest_s / 1e9
    method = (
        f"link: host all-reduce (MPI) of {buf.nbytes / 2**20:g} MiB float32 over {n} ranks, "
        f"median of {repeats}, slowest rank; bus bandwidth = 2 (n - 1) / n x bytes / time "
        "(nccl-tests' definition, matching the plan's all-reduce bytes); latency not included"
    )
    return bw, method
