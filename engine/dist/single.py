"""The communicator of a single-process run: one rank, nothing to exchange, no MPI needed."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from engine.dist.base import DEFAULT_TIMEOUT_S, Comm, hostname


class SingleComm(Comm):
    """A group of one: collectives return their input; nothing ever waits."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.rank, self.size = 0, 1
        self.local_rank, self.local_size = 0, 1
        self.node = hostname()
        self.timeout_s = timeout_s

    def allreduce_sum(self, array: np.ndarray) -> None:
        """Nothing to add: the sum over one rank is the array itself."""

    def alltoallv(self, chunks: list[np.ndarray]) -> list[np.ndarray]:
        """The one chunk, sent to itself."""
        if len(chunks) != 1:
            raise ValueError(f"alltoallv over 1 rank needs 1 chunk, got {len(chunks)}")
        return [np.array(chunks[0], copy=True)]

    def bcast(self, obj: Any, root: int = 0, timeout_s: float | None = None) -> Any:
        """``obj`` itself."""
        return obj

    def gather(self, obj: Any, root: int = 0, timeout_s: float | None = None) -> list | None:
        """``[obj]``."""
        return [obj]

    def allgather(self, obj: Any, timeout_s: float | None = None) -> list:
        """``[obj]``."""
        return [obj]

    def barrier(self, timeout_s: float | None = None) -> int:
        """Returns at once (ns, host monotonic)."""
        return time.monotonic_ns()

    def split(self, color: int, key: int) -> Comm:
        """Itself: a group of one splits into itself."""
        return self

    def for_point(self) -> Comm:
        """Itself: one rank can never leave a collective unmatched."""
        return self

    def signal_failure(self, reason: str) -> None:
        """No other rank to tell."""

    def clock_offsets_ns(self, rounds: int = 16) -> list[tuple[float, float]]:
        """One clock, no offset."""
        return [(0.0, 0.0)]
