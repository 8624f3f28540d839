"""The communicator interface: what the ranks of a multi-device run say to each other.

One rank runs per device. Ranks exchange three kinds of things: tensors on the hot path of a
decode step (``allreduce_sum`` for tensor parallelism, ``alltoallv`` for the expert-parallel
token exchange), small Python objects for coordination (``bcast``, ``gather``, ``allgather``)
and barriers. Every call that waits on another rank gives up after a timeout (``CommTimeout``)
or as soon as another rank says it failed (``PeerFailed``), so no rank waits forever on a rank
that died, hangs, or left the point on an error.

Implementations: ``engine.dist.single`` (one process, no MPI needed), ``engine.dist.mpi``
(mpi4py; host buffers, the CPU backend) and ``engine.dist.nccl`` (device buffers on a CUDA
stream, the CUDA backend's collectives, bootstrapped over MPI).
"""

from __future__ import annotations

import socket
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

DEFAULT_TIMEOUT_S = 120.0
#: Timeout for waits that follow a long local phase (allocating a point's weights).
DEFAULT_SETUP_TIMEOUT_S = 1800.0


class CommError(RuntimeError):
    """A collective could not complete (one-line message)."""


class CommTimeout(CommError):
    """Another rank did not answer in time: it died, hangs, or took another code path.

    After it the ranks cannot be trusted to agree on anything: the run must end."""


class PeerFailed(CommError):
    """Another rank reported that it failed this point (its reason is the message)."""


class Comm(ABC):
    """A group of ranks. ``rank`` is this process's index in the group (0 .. size - 1).

    ``local_rank``/``local_size`` place the rank among the ranks of its node (for the device
    choice); ``node`` names the node. ``timeout_s`` bounds every wait (seconds).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    node: str = ""
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_root(self) -> bool:
        """Whether this is rank 0 (the rank that decides, gathers and writes)."""
        return self.rank == 0

    @property
    def is_node_leader(self) -> bool:
        """Whether this rank is the first of its node (it samples the node-wide sources)."""
        return self.local_rank == 0

    # -- tensors ---------------------------------------------------------------------------

    @abstractmethod
    def allreduce_sum(self, array: np.ndarray) -> None:
        """Sum ``array`` (C-contiguous, float32/float64) over the ranks, in place."""

    @abstractmethod
    def alltoallv(self, chunks: list[np.ndarray]) -> list[np.ndarray]:
        """Send ``chunks[d]`` to rank ``d``; return the chunk received from each rank.

        Chunks are arrays of one dtype and one trailing shape ``(n_d, *tail)``; each rank
        may send a different number of rows to each other rank (zero included).
        """

    # -- small objects ---------------------------------------------------------------------

    @abstractmethod
    def bcast(self, obj: Any, root: int = 0, timeout_s: float | None = None) -> Any:
        """``obj`` of rank ``root`` on every rank (picklable)."""

    @abstractmethod
    def gather(self, obj: Any, root: int = 0, timeout_s: float | None = None) -> list | None:
        """Every rank's ``obj`` as a list on ``root`` (None elsewhere). A timeout names the
        ranks that did not answer."""

    @abstractmethod
    def allgather(self, obj: Any, timeout_s: float | None = None) -> list:
        """Every rank's ``obj`` as a list (index = rank), on every rank."""

    @abstractmethod
    def barrier(self, timeout_s: float | None = None) -> int:
        """Wait for every rank; return the host monotonic time (ns) this rank left it."""

    # -- structure -------------------------------------------------------------------------

    @abstractmethod
    def split(self, color: int, key: int) -> Comm:
        """The ranks with the same ``color``, ordered by ``key`` (collective)."""

    @abstractmethod
    def for_point(self) -> Comm:
        """A fresh group for one point (collective). A failure inside a point leaves its
        group's collectives unmatched; the next point starts clean on a new one."""

    @abstractmethod
    def signal_failure(self, reason: str) -> None:
        """Tell the other ranks of this point that this rank failed, so their waits end
        with ``PeerFailed(reason)`` instead of a timeout."""

    def free(self) -> None:  # noqa: B027 - optional hook, nothing to free by default
        """Release the group after a point that ended cleanly on every rank."""

    def abort(self, code: int) -> None:
        """End every rank of the run now (a rank that died or hangs cannot be waited for)."""
        raise SystemExit(code)

    # -- clocks ----------------------------------------------------------------------------

    @abstractmethod
    def clock_offsets_ns(self, rounds: int = 16) -> list[tuple[float, float]]:
        """Per rank ``(offset_ns, uncertainty_ns)``: ``t_root = t_rank - offset`` between the
        ranks' host monotonic clocks, from ping-pongs (the fastest round trip wins; its half
        is the uncertainty). The same list on every rank (collective)."""


def hostname() -> str:
    """This node's name as the OS knows it."""
    return socket.gethostname()
