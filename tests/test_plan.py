"""Plan totals checked against hand-worked numbers for real models."""

from __future__ import annotations

import time

import pytest

from engine.models import load_spec
from engine.plan import PlanError, build_plan
from engine.point import Point
from engine.precision import parse_precision
from engine.roofline import Peaks, roofline


def _plan(model: str, batch: int, context: int = 1024, precision: str = "bf16", **kw):
    spec = load_spec(model)
    return build_plan(
        spec,
        Point(
            model=spec.name,
            batch=batch,
            context=context,
            precision=parse_precision(precision),
            **kw,
        ),
    )


def test_llama_8b_params_and_bf16_totals_by_hand():
    h, layers, heads, kv, hd, ffn, vocab = 4096, 32, 32, 8, 128, 14336, 128256
    per_layer = (heads + 2 * kv) * hd * h + heads * hd * h + 3 * h * ffn + 2 * h
    params = layers * per_layer + 2 * vocab * h + h
    assert params == 8_030_261_248  # the published 8.03B
    for batch in (1, 64):
        ctx = 1024
        plan = _plan("llama-3.1-8b", batch, ctx)
        assert plan.params == params
        # Weights read once (BF16, 2 bytes), embedding: B rows only.
        weights = 2 * (layers * per_layer + vocab * h + h) + 2 * batch * h
        assert plan.weight_bytes == pytest.approx(weights, rel=1e-12)
        # KV: read L positions and write one, K and V, 8 KV heads of 128, 2 bytes.
        assert plan.kv_bytes == pytest.approx(layers * batch * 2 * kv * hd * 2 * (ctx + 1))
        gemm_flops = 2 * batch * (layers * (per_layer - 2 * h) + vocab * h)
        attn_flops = layers * 4 * batch * heads * ctx * hd
        gemm_and_attention = sum(op.flops for op in plan.ops if op.kind in ("gemm", "attention"))
        assert gemm_and_attention == pytest.approx(gemm_flops + attn_flops, rel=1e-12)


def test_gpt_oss_120b_mxfp4_totals_by_hand():
    spec = load_spec("gpt-oss-120b")
    h, experts, top_k, width = 2880, 128, 4, 2880
    assert (spec.hidden_size, spec.num_experts, spec.experts_per_token) == (h, experts, top_k)
    # MXFP4: 4 bits a value and one 8-bit scale per 32 values.
    gate_up = 2 * width * h // 2 + 2 * width * h // 32
    down = h * width // 2 + h * width // 32
    for batch, expected_experts in ((1, 4.0), (64, 128 * (1 - (1 - 4 / 128) ** 64))):
        plan = _plan("gpt-oss-120b", batch, 4096, "w4a16")
        assert plan.expected_experts_per_moe_layer == pytest.approx(expected_experts, rel=1e-12)
        expert_bytes = sum(op.weight_bytes for op in plan.ops if op.kind == "moe_gemm")
        assert expert_bytes == pytest.approx(36 * expected_experts * (gate_up + down), rel=1e-12)
        # Alternating sliding-window layers read at most 128 positions of KV.
        attn = [op for op in plan.ops if op.kind == "attention"]
        assert [op.n for op in attn[:2]] == [128, 4096]
        kv_bytes = sum(18 * batch * 2 * 8 * 64 * 2 * (span + 1) for span in (128, 4096))
        assert plan.kv_bytes == pytest.approx(kv_bytes, rel=1e-12)
    assert 64 * 1.0 < 128 * (1 - (1 - 4 / 128) ** 64) < 128  # sanity of the hand formula
    published = 116.83e9
    total = _plan("gpt-oss-120b", 1, precision="bf16").params
    assert abs(total - published) / published < 0.01, total


@pytest.mark.parametrize(
    "model",
    [
        "llama-3.1-8b",
        "llama-3.3-70b",
        "mixtral-8x7b",
        "qwen3-30b-a3b",
        "gpt-oss-120b",
        "deepseek-v3",
    ],
)
def test_plan_params_match_published(model):
    spec = load_spec(model)
    params = _plan(model, 1).params
    assert abs(params - spec.published_params) / spec.published_params < 0.01, (
        f"{model}: plan holds {params / 1e9:.3f}B, published {spec.published_params / 1e9:.3f}B"
    )


def test_deepseek_mla_latent_cache_bytes():
    plan = _plan("deepseek-v3", 8, 2048, "fp8")
    # Latent 512 + rope key 64 per token per layer, FP8: 1 byte each.
    assert sum(plan.kv_storage_bytes_per_layer) == 61 * 8 * 2048 * (512 + 64)
    assert [op.kind for op in plan.layer_ops(0)].count("moe_gemm") == 0  # first 3 are dense
    assert [op.kind for op in plan.layer_ops(3)].count("moe_gemm") == 2


def test_tensor_parallel_shards_weights_and_counts_allreduce():
    one = _plan("llama-3.1-8b", 4)
    two = _plan("llama-3.1-8b", 4, tp=2)
    layer_w = sum(op.weight_bytes for op in one.layer_ops(0))
    assert sum(op.weight_bytes for op in two.layer_ops(0)) == pytest.approx(layer_w / 2, rel=1e-3)
    comm = sum(op.comm_bytes for op in two.ops)
    assert comm == pytest.approx(32 * 2 * (2 * 1 / 2) * 4 * 4096 * 2)
    with pytest.raises(PlanError, match="num_heads"):
        _plan("llama-3.1-8b", 1, tp=3)


def test_roofline_takes_max_of_bytes_and_flops_per_op():
    plan = _plan("llama-3.1-8b", 1)
    peaks = Peaks(copy_bw_gbps=1000.0, matmul_tflops={"bf16": 500.0})
    rl = roofline(plan, peaks)
    assert rl.step_time_s == pytest.approx(
        sum(max(op.bytes / 1e12, op.flops / 5e14) for op in plan.ops)
    )
    # B=1 decode is bound by bytes.
    assert rl.memory_time_s > 10 * rl.compute_time_s
    big = roofline(_plan("llama-3.1-8b", 4096), peaks)
    assert big.compute_bound_ops > 0
    assert roofline(plan, Peaks(copy_bw_gbps=1000.0, matmul_tflops={})).missing_rates == ("bf16",)


def test_fp4_saves_bytes_not_flops_when_weight_only():
    bf16 = _plan("llama-3.1-8b", 1, precision="bf16")
    w4 = _plan("llama-3.1-8b", 1, precision="w4a16")
    gemm = [op for op in w4.ops if op.kind == "gemm" and op.weight_fmt == "mxfp4"]
    assert gemm and all(op.compute == "bf16" for op in gemm)
    assert w4.flops == pytest.approx(bf16.flops)
    assert w4.weight_bytes < 0.45 * bf16.weight_bytes


def test_plan_construction_is_fast_for_the_largest_preset():
    spec = load_spec("deepseek-v3")
    prec = parse_precision("fp8")
    t0 = time.perf_counter()
    for batch in range(1, 65):
        build_plan(spec, Point(model=spec.name, batch=batch, context=4096, precision=prec))
    # Generous bound for a loaded CI machine; the benchmark measures the real figure.
    assert time.perf_counter() - t0 < 10.0
