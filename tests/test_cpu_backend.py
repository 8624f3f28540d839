"""The CPU backend's decode step against the float64 reference, per precision and model kind."""

from __future__ import annotations

import numpy as np
import pytest

from engine.backends.cpu import CpuRunner
from engine.models import load_spec
from engine.plan import build_plan
from engine.point import Point
from engine.precision import parse_precision
from engine.reference import ReferenceStep
from engine.routing import inclusion_probabilities, sample_assignments
from engine.weights import layer_weights, select_layers

# Relative error of the logits (Frobenius norm) that each precision's arithmetic allows:
# BF16/FP8/FP4 weights are decoded exactly, so with float32 accumulation only rounding
# of float32 remains; FP8 activations or KV add re-rounding that may differ near ties.
CASES = [
    ("bf16", 2e-4),
    ("w8a16", 2e-4),
    ("w4a16", 2e-4),
    ("nvfp4-w4a16", 2e-4),
    ("w=fp8_e5m2,a=bf16,kv=fp8_e5m2", 2e-2),
    ("fp8", 5e-2),
]


def _step(model: str, precision: str, batch: int = 3, context: int = 40, seed: int | None = None):
    spec = load_spec(model)
    point = Point(
        model=spec.name, batch=batch, context=context, precision=parse_precision(precision)
    )
    plan = build_plan(spec, point)
    seed = int(np.random.default_rng().integers(2**31)) if seed is None else seed
    runner = CpuRunner(plan, list(range(spec.num_layers)), seed)
    rng = np.random.default_rng(seed + 1)
    tokens = rng.integers(0, spec.vocab_size, size=batch)
    assignments = None
    if spec.num_experts:
        pi = inclusion_probabilities("uniform", spec.num_experts, spec.experts_per_token)
        assignments = {
            layer: sample_assignments(rng, pi, batch)
            for layer in range(spec.num_layers)
            if spec.is_moe_layer(layer)
        }
    ref = ReferenceStep(spec, point, runner.head, runner.weights, runner.caches)
    return runner.forward(tokens, assignments), ref.forward(tokens, assignments), seed


@pytest.mark.parametrize("model", ["tiny", "tiny-moe", "tiny-mla"])
@pytest.mark.parametrize("precision, tol", CASES)
def test_decode_step_matches_float64_reference(model, precision, tol):
    got, want, seed = _step(model, precision)
    assert got.dtype == np.float32 and np.all(np.isfinite(got))
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < tol, f"{model} {precision} seed={seed}: relative error {err:.2e} > {tol:.0e}"


def test_a_step_depends_on_every_layer():
    """Different layers hold different weights, so no layer's weights are reused."""
    spec = load_spec("tiny")
    plan = build_plan(spec, Point("tiny", 1, 8, parse_precision("bf16")))
    w0, w1 = layer_weights(plan, 0, 5), layer_weights(plan, 1, 5)
    assert not np.array_equal(w0["attn.qkv_proj"].data, w1["attn.qkv_proj"].data)
    again = layer_weights(plan, 0, 5)
    assert np.array_equal(w0["attn.qkv_proj"].data, again["attn.qkv_proj"].data)


def test_select_layers_covers_every_class_within_budget():
    spec = load_spec("deepseek-v3")
    plan = build_plan(spec, Point("deepseek-v3", 1, 128, parse_precision("w4a16")))
    from engine.weights import layer_footprint_bytes

    head = sum(op.weight_storage_bytes for op in plan.ops if op.layer == -1)
    dense, moe = layer_footprint_bytes(plan, 0), layer_footprint_bytes(plan, 3)
    chosen = select_layers(plan, head + dense + 3 * moe + 1)
    assert chosen == [0, 3, 4, 5] or (0 in chosen and len(chosen) == 4)
    assert sum(layer_footprint_bytes(plan, x) for x in chosen) + head <= head + dense + 3 * moe + 1
    assert select_layers(plan, head + moe) == []
    assert select_layers(plan, 1e15) == list(range(61))
