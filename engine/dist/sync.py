"""Time across ranks: clock offsets applied, barrier skew, and the ranks' common windows.

Each rank stamps on its own host monotonic clock. ``Comm.clock_offsets_ns`` measures, per
rank, ``offset`` with ``t_root = t_rank - offset`` and its uncertainty (half the fastest
ping-pong round trip). On one node every process reads the same clock, so the offsets are
zero within their uncertainty; across nodes they are the boot-time differences.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Offsets = Sequence[tuple[float, float]]


def to_root_ns(t_ns: np.ndarray | int, offset_ns: float) -> np.ndarray:
    """Times of a rank (ns, its clock) on rank 0's clock (ns), rounded to whole ns."""
    return np.rint(np.asarray(t_ns, dtype=np.float64) - offset_ns).astype(np.int64)


def from_root_ns(t_ns: np.ndarray | int, offset_ns: float) -> np.ndarray:
    """Times on rank 0's clock (ns) on a rank's own clock (ns), rounded to whole ns."""
    return np.rint(np.asarray(t_ns, dtype=np.float64) + offset_ns).astype(np.int64)


def barrier_skew(exits_ns: Sequence[Sequence[int]], offsets: Offsets) -> dict:
    """How far apart the ranks left each barrier, on rank 0's clock (ns).

    ``exits_ns[r][i]`` is when rank ``r`` left barrier ``i`` on its own clock. Returns the
    skew of every barrier (latest minus earliest exit), the largest, and the uncertainty of
    a skew (the two largest offset uncertainties added: a skew compares two ranks' clocks).
    """
    counts = {len(e) for e in exits_ns}
    if len(counts) != 1:
        raise ValueError(f"ranks left different numbers of barriers: {sorted(counts)}")
    if not exits_ns or counts == {0}:
        return {"skews_ns": [], "max_skew_ns": None, "uncertainty_ns": None}
    root = np.stack([to_root_ns(e, off) for e, (off, _) in zip(exits_ns, offsets)])
    skews = (root.max(axis=0) - root.min(axis=0)).astype(np.int64)
    unc = sorted((u for _, u in offsets), reverse=True)
    return {
        "skews_ns": skews.tolist(),
        "max_skew_ns": int(skews.max()),
        "uncertainty_ns": float(sum(unc[:2])),
    }


def common_windows(
    starts_ns: Sequence[Sequence[int]], ends_ns: Sequence[Sequence[int]], offsets: Offsets
) -> tuple[np.ndarray, np.ndarray]:
    """The span of every measured window during which all ranks were inside it, on rank 0's
    clock (ns): the latest start and the earliest end over the ranks.

    Raises ValueError when the ranks measured different numbers of windows or a window has
    no common part (the clocks or the synchronisation failed).
    """
    counts = {len(s) for s in starts_ns} | {len(e) for e in ends_ns}
    if len(counts) != 1:
        raise ValueError(f"ranks measured different numbers of windows: {sorted(counts)}")
    s = np.stack([to_root_ns(v, off) for v, (off, _) in zip(starts_ns, offsets)])
    e = np.stack([to_root_ns(v, off) for v, (off, _) in zip(ends_ns, offsets)])
    start, end = s.max(axis=0), e.min(axis=0)
    if np.any(end <= start):
        bad = int(np.flatnonzero(end <= start)[0])
        raise ValueError(f"window {bad} has no span common to all ranks")
    return start, end
