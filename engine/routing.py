"""MoE routing as a stated distribution: which experts the tokens of a batch touch.

Each token selects ``k`` distinct experts out of ``E``. The distribution is stated as
per-token *inclusion probabilities* ``pi_i`` (the probability that a token selects expert
``i``; they sum to ``k``). ``uniform`` gives ``pi_i = k / E``; ``zipf:S`` gives
``pi_i`` proportional to ``(rank_i + 1) ** -S`` capped at 1, with expert popularity ranks
assigned by a fixed permutation so that expert-parallel shards are not systematically
hot or cold. Sampling uses systematic probability-proportional-to-size sampling, which
selects ``k`` distinct experts with exactly these inclusion probabilities, so the
plan's expected count of distinct experts is what the backend really touches.
"""

from __future__ import annotations

import numpy as np


class RoutingError(ValueError):
    """A routing distribution that cannot be parsed (one-line message)."""


def parse_routing(text: str) -> tuple[str, float]:
    """Parse ``uniform`` or ``zipf:S`` (S >= 0) into (kind, skew)."""
    text = text.strip().lower()
    if text == "uniform":
        return "uniform", 0.0
    if text.startswith("zipf:"):
        try:
            skew = float(text.split(":", 1)[1])
        except ValueError:
            skew = -1.0
        if skew >= 0 and np.isfinite(skew):
            return "zipf", skew
    raise RoutingError(f"unknown routing '{text}'; use 'uniform' or 'zipf:S' with S >= 0")


def inclusion_probabilities(routing: str, num_experts: int, top_k: int) -> np.ndarray:
    """Per-token probability that each expert is selected (float64, sums to ``top_k``)."""
    kind, skew = parse_routing(routing)
    if kind == "uniform" or skew == 0.0:
        return np.full(num_experts, top_k / num_experts)
    weights = (np.arange(num_experts) + 1.0) ** -skew
    # A fixed permutation spreads popular experts across expert-parallel shards.
    weights = weights[np.random.default_rng(0x5EED).permutation(num_experts)]
    pi = np.zeros(num_experts)
    capped = np.zeros(num_experts, dtype=bool)
    # Water-filling: scale to sum k, cap at 1, redistribute the excess; at most E rounds.
    for _ in range(num_experts):
        free = ~capped
        remaining = top_k - capped.sum()
        pi[free] = weights[free] * remaining / weights[free].sum()
        pi[capped] = 1.0
        over = free & (pi > 1.0)
        if not over.any():
            break
        capped |= over
    return pi


def expected_distinct_experts(pi: np.ndarray, batch: int) -> float:
    """Expected number of distinct experts touched by ``batch`` independent tokens."""
    return float(np.sum(1.0 - (1.0 - pi) ** batch))


def sample_assignments(rng: np.random.Generator, pi: np.ndarray, batch: int) -> np.ndarray:
    """Experts selected by each token, shape (batch, k), int64, distinct within a row.

    Systematic sampling over a random order of the experts: with ``u ~ U(0, 1)`` the
    selected experts are those whose cumulative-probability interval holds one of
    ``u, u + 1, ..., u + k - 1``; each expert is selected with probability exactly ``pi_i``.
    """
    top_k = int(round(pi.sum()))
    num_experts = pi.size
    order = np.argsort(rng.random((batch, num_experts)), axis=1)
    cumulative = np.cumsum(pi[order], axis=1)
    points = rng.random((batch, 1)) + np.arange(top_k)[None, :]
    # Index of the first cumulative value above each point, per row.
    idx = (cumulative[:, :, None] <= points[:, None, :]).sum(axis=1)
    idx = np.minimum(idx, num_experts - 1)
    return np.take_along_axis(order, idx, axis=1).astype(np.int64)
