"""MoE routing distributions: inclusion probabilities, expected distinct experts, sampling."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.routing import (
    RoutingError,
    expected_distinct_experts,
    inclusion_probabilities,
    parse_routing,
    sample_assignments,
)


def test_uniform_expected_distinct_by_hand():
    pi = inclusion_probabilities("uniform", 8, 2)
    assert pi.sum() == pytest.approx(2.0)
    # One token touches exactly k experts; two tokens: 8 * (1 - (6/8)^2) = 3.5.
    assert expected_distinct_experts(pi, 1) == pytest.approx(2.0)
    assert expected_distinct_experts(pi, 2) == pytest.approx(3.5)


@settings(max_examples=25, deadline=None)
@given(
    experts=st.integers(4, 64),
    k=st.integers(1, 4),
    skew=st.floats(0.0, 2.5),
    seed=st.integers(0, 2**31),
)
def test_sampling_matches_stated_distribution(experts, k, skew, seed):
    k = min(k, experts)
    pi = inclusion_probabilities(f"zipf:{skew}", experts, k)
    assert pi.sum() == pytest.approx(k)
    assert np.all(pi <= 1 + 1e-12) and np.all(pi >= 0)
    rng = np.random.default_rng(seed)
    draws = sample_assignments(rng, pi, 4000)
    assert draws.shape == (4000, k)
    assert all(len(set(row)) == k for row in draws[:200])
    freq = np.bincount(draws.ravel(), minlength=experts) / 4000
    assert np.max(np.abs(freq - pi)) < 0.06


def test_expected_distinct_matches_monte_carlo_under_skew():
    pi = inclusion_probabilities("zipf:1.2", 64, 4)
    rng = np.random.default_rng(7)
    counts = [len(np.unique(sample_assignments(rng, pi, 16))) for _ in range(400)]
    assert np.mean(counts) == pytest.approx(expected_distinct_experts(pi, 16), rel=0.03)
    assert expected_distinct_experts(pi, 16) < expected_distinct_experts(
        inclusion_probabilities("uniform", 64, 4), 16
    )


@pytest.mark.parametrize("bad", ["zipf", "zipf:-1", "zipf:x", "normal"])
def test_bad_routing_is_one_line_error(bad):
    with pytest.raises(RoutingError) as info:
        parse_routing(bad)
    assert "\n" not in str(info.value)
