"""Many devices under MPI: one rank per device, launched by ``mpirun`` or ``srun``.

``connect()`` returns the run's communicator: ``SingleComm`` when the process was not
started by an MPI launcher (no MPI needed), ``MpiComm`` over mpi4py when it was. Ranks are
laid out as ``rank = tp_rank * ep + ep_rank`` (``engine.plan`` takes ``ep_rank = rank % ep``):
a tensor-parallel group holds the ranks of one ``ep_rank``, an expert-parallel group those of
one ``tp_rank``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from engine.dist.base import (
    DEFAULT_SETUP_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    Comm,
    CommError,
    CommTimeout,
    PeerFailed,
)
from engine.dist.single import SingleComm

__all__ = [
    "DEFAULT_SETUP_TIMEOUT_S",
    "DEFAULT_TIMEOUT_S",
    "Comm",
    "CommError",
    "CommTimeout",
    "PeerFailed",
    "PointContext",
    "SingleComm",
    "Groups",
    "connect",
    "launch_size",
    "layout",
    "RankPos",
    "token_share",
]

#: Environment variables through which launchers announce the number of ranks:
#: Open MPI's mpirun, PMI/PMI2 launchers (MPICH's hydra, Intel MPI, srun --mpi=pmi2),
#: MVAPICH2, and Slurm's srun itself (whatever its MPI plugin).
LAUNCH_SIZE_VARS = (
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "MV2_COMM_WORLD_SIZE",
    "SLURM_STEP_NUM_TASKS",
)


def launch_size(env: Mapping[str, str] | None = None) -> tuple[int, str] | None:
    """How many ranks a launcher started and the variable that says so (None: no launcher)."""
    env = os.environ if env is None else env
    for var in LAUNCH_SIZE_VARS:
        value = env.get(var, "").strip()
        if value.isdigit() and int(value) >= 1:
            return int(value), var
    return None


def connect(timeout_s: float = DEFAULT_TIMEOUT_S) -> Comm:
    """The run's communicator: MPI when a launcher started several ranks, else one rank.

    Raises CommError (one line) when a launcher started several ranks but mpi4py cannot be
    imported, or MPI sees another number of ranks than the launcher started.
    """
    found = launch_size()
    if found is None or found[0] <= 1:
        return SingleComm(timeout_s)
    n, var = found
    try:
        from engine.dist.mpi import MpiComm
    except ImportError as exc:
        raise CommError(
            f"started as {n} ranks ({var}={n}) but mpi4py cannot be imported ({exc}); "
            "install it with pip install '.[mpi]' against the MPI that launches the run"
        ) from None
    comm = MpiComm.world(timeout_s)
    if comm.size != n:
        raise CommError(
            f"the launcher started {n} ranks ({var}) but MPI sees {comm.size}: under Slurm "
            "use srun --mpi=pmix (or pmi2) so that the ranks find each other"
        )
    return comm


@dataclass(frozen=True)
class RankPos:
    """Where a rank sits: its tensor- and expert-parallel coordinates."""

    tp: int
    ep: int
    tp_rank: int
    ep_rank: int


def layout(rank: int, tp: int, ep: int) -> RankPos:
    """The coordinates of ``rank`` in a ``tp x ep`` grid (``rank = tp_rank * ep + ep_rank``)."""
    if tp < 1 or ep < 1 or not 0 <= rank < tp * ep:
        raise ValueError(f"rank {rank} is not in a tp={tp} x ep={ep} grid")
    return RankPos(tp=tp, ep=ep, tp_rank=rank // ep, ep_rank=rank % ep)


def token_share(batch: int, tp: int, ep: int) -> float:
    """Tokens per step credited to one rank (tokens): the batch split over the ranks.

    Expert parallelism splits the B sequences over the ``ep`` groups (B / ep each); inside a
    group the ``tp`` ranks produce those tokens together, so each is credited an equal part.
    The shares of all ranks add up to B.
    """
    return batch / (tp * ep)


@dataclass
class Groups:
    """A point's communicators: all ranks, the rank's tensor-parallel and expert-parallel
    groups. ``free`` releases them after a point that ended cleanly on every rank."""

    all: Comm
    tp: Comm
    ep: Comm

    @classmethod
    def make(cls, point_comm: Comm, tp: int, ep: int) -> Groups:
        """Split a point's group into TP and EP groups (collective; call after a barrier)."""
        where = layout(point_comm.rank, tp, ep)
        tp_comm = point_comm.split(where.ep_rank, where.tp_rank) if tp > 1 else SingleComm()
        ep_comm = point_comm.split(where.tp_rank, where.ep_rank) if ep > 1 else SingleComm()
        return cls(all=point_comm, tp=tp_comm, ep=ep_comm)

    def free(self) -> None:
        """Release the point's groups (the sub-groups with their parent)."""
        self.all.free()


@dataclass
class PointContext:
    """What one rank of a multi-rank point needs to measure its part.

    ``offsets``: every rank's clock offset to rank 0 (``Comm.clock_offsets_ns``);
    ``tokens_per_step``: this rank's share of the batch (``token_share``);
    ``setup_timeout_s``: how long ranks wait for the slowest to allocate its shard;
    ``info``: what the rank record says of the rank (host, local rank, device, ...).
    """

    groups: Groups
    offsets: list[tuple[float, float]]
    tokens_per_step: float
    setup_timeout_s: float
    info: dict
