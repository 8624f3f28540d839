"""A plan: the ordered ops of one decode step on one device's shard.

Each op carries its shapes, formats, FLOPs and the minimum bytes it must move: weights
read once (for MoE, only the experts the batch is expected to touch), the KV cache read
once, activations in and out, and collective bytes when tensor-parallel. The plan is pure
data; backends execute it and the roofline prices it.

Conventions (stated once, used everywhere):
- A linear layer's weight has shape (N, K) = (out, in) and y = x @ W.T; a GEMM op has
  m = rows of x (tokens), n, k. FLOPs = 2 * m * n * k.
- Embedding, LM head, norms and MoE routers stay in BF16 (as deployed quantized
  checkpoints keep them); every other linear layer uses the point's weight format.
- The KV cache holds ``context`` positions per sequence, the new token's included; a
  sliding-window layer reads at most ``sliding_window`` of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.formats import bits_per_element, storage_bytes
from engine.models import ModelSpec
from engine.point import Point
from engine.routing import expected_distinct_experts, inclusion_probabilities

NORM_BYTES_PER_ELEMENT = 2  # norm weights are read in BF16


class PlanError(ValueError):
    """A point that cannot be planned for this model (one-line message)."""


@dataclass(frozen=True)
class Op:
    """One operation of a decode step on this shard.

    kind: ``gemm`` (one weight), ``moe_gemm`` (``experts`` weights of the same shape, the
    expected distinct experts touched), ``bgemm`` (per-head weights, MLA absorption),
    ``attention``, ``mla_attention``, ``norm``, ``act``, ``rope``, ``router_topk``,
    ``embed``, ``allreduce``. ``held`` is how many weight matrices of shape (n, k) the
    shard stores for the op (local experts, or heads of a ``bgemm``).
    Byte counts are per step; ``weight_storage_bytes`` is the whole tensor(s) held in
    memory (all experts), used to size allocations.
    """

    name: str
    kind: str
    layer: int
    m: int = 0
    n: int = 0
    k: int = 0
    experts: float = 1.0
    held: int = 1
    weight_fmt: str = ""
    compute: str = "bf16"
    flops: float = 0.0
    weight_bytes: float = 0.0
    kv_bytes: float = 0.0
    act_bytes: float = 0.0
    comm_bytes: float = 0.0
    weight_storage_bytes: int = 0
    params: int = 0

    @property
    def bytes(self) -> float:
        """Bytes moved through device memory by this op (weights + KV + activations)."""
        return self.weight_bytes + self.kv_bytes + self.act_bytes


@dataclass(frozen=True)
class Plan:
    """The ordered ops of one decode step on one shard, and the point and spec it is for."""

    spec: ModelSpec
    point: Point
    ops: tuple[Op, ...]
    kv_storage_bytes_per_layer: tuple[int, ...]
    expected_experts_per_moe_layer: float | None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def flops(self) -> float:
        return sum(op.flops for op in self.ops)

    @property
    def bytes(self) -> float:
        return sum(op.bytes for op in self.ops)

    @property
    def weight_bytes(self) -> float:
        return sum(op.weight_bytes for op in self.ops)

    @property
    def kv_bytes(self) -> float:
        return sum(op.kv_bytes for op in self.ops)

    @property
    def comm_bytes(self) -> float:
        return sum(op.comm_bytes for op in self.ops)

    @property
    def params(self) -> int:
        """Parameters held by this shard (all experts), embedding and LM head included."""
        return sum(op.params for op in self.ops)

    def layer_ops(self, layer: int) -> list[Op]:
        return [op for op in self.ops if op.layer == layer]

    def totals(self) -> dict:
        """Plain-data totals for records: FLOPs, bytes by kind, parameters."""
        return {
            "flops": self.flops,
            "bytes": self.bytes,
            "weight_bytes": self.weight_bytes,
            "kv_bytes": self.kv_bytes,
            "act_bytes": sum(op.act_bytes for op in self.ops),
            "comm_bytes": self.comm_bytes,
            "params_on_shard": self.params,
            "weight_storage_bytes": sum(op.weight_storage_bytes for op in self.ops),
            "kv_storage_bytes": sum(self.kv_storage_bytes_per_layer),
            "expected_experts_per_moe_layer": self.expected_experts_per_moe_layer,
            "num_ops": len(self.ops),
        }


def _elem_bytes(fmt: str) -> float:
    return bits_per_element(fmt) / 8.0


class _Builder:
    """Accumulates the ops of one plan; one method per op family."""

    def __init__(self, spec: ModelSpec, point: Point) -> None:
        self.spec = spec
        self.point = point
        self.batch = point.batch
        self.act = point.precision.activation
        self.act_b = _elem_bytes(self.act)
        self.wfmt = point.precision.weight
        self.compute = point.precision.gemm_compute
        self.ops: list[Op] = []

    def gemm(self, name: str, layer: int, n: int, k: int, fmt: str | None = None) -> None:
        fmt = fmt or self.wfmt
        m = self.batch
        store = storage_bytes(fmt, n, k)
        compute = self.compute if fmt == self.wfmt else "bf16"
        act_b = self.act_b if fmt == self.wfmt else 2.0
        self.ops.append(
            Op(
                name=name,
                kind="gemm",
                layer=layer,
                m=m,
                n=n,
                k=k,
                weight_fmt=fmt,
                compute=compute,
                flops=2.0 * m * n * k,
                weight_bytes=float(store),
                act_bytes=m * k * act_b + m * n * act_b,
                weight_storage_bytes=store,
                params=n * k,
            )
        )

    def moe_gemm(
        self, name: str, layer: int, n: int, k: int, experts_held: int, touched: float, pairs: float
    ) -> None:
        store_one = storage_bytes(self.wfmt, n, k)
        self.ops.append(
            Op(
                name=name,
                kind="moe_gemm",
                layer=layer,
                m=max(1, round(pairs / max(touched, 1e-12))),
                n=n,
                k=k,
                experts=touched,
                held=experts_held,
                weight_fmt=self.wfmt,
                compute=self.compute,
                flops=2.0 * pairs * n * k,
                weight_bytes=touched * store_one,
                act_bytes=pairs * (k + n) * self.act_b,
                weight_storage_bytes=experts_held * store_one,
                params=experts_held * n * k,
            )
        )

    def bgemm(self, name: str, layer: int, heads: int, n: int, k: int) -> None:
        """Per-head GEMM (MLA weight absorption): ``heads`` weights of shape (n, k)."""
        m = self.batch
        store = heads * storage_bytes(self.wfmt, n, k)
        self.ops.append(
            Op(
                name=name,
                kind="bgemm",
                layer=layer,
                m=m,
                n=n,
                k=k,
                experts=float(heads),
                held=heads,
                weight_fmt=self.wfmt,
                compute=self.compute,
                flops=2.0 * m * heads * n * k,
                weight_bytes=float(store),
                act_bytes=m * heads * (n + k) * self.act_b,
                weight_storage_bytes=store,
                params=heads * n * k,
            )
        )

    def elementwise(
        self,
        name: str,
        kind: str,
        layer: int,
        elems_in: float,
        elems_out: float,
        flops_per_elem: float,
        params: int = 0,
    ) -> None:
        weight = params * NORM_BYTES_PER_ELEMENT
        self.ops.append(
            Op(
                name=name,
                kind=kind,
                layer=layer,
                m=self.batch,
                flops=flops_per_elem * elems_in,
                weight_bytes=float(weight),
                act_bytes=(elems_in + elems_out) * self.act_b,
                weight_storage_bytes=weight,
                params=params,
            )
        )

    def allreduce(self, name: str, layer: int, elems: int) -> None:
        tp = self.point.tp
        if tp == 1:
            return
        # Ring all-reduce: each rank sends (and receives) 2 (tp - 1) / tp of the buffer.
        self.ops.append(
            Op(
                name=name,
                kind="allreduce",
                layer=layer,
                m=self.batch,
                comm_bytes=2.0 * (tp - 1) / tp * elems * self.act_b,
            )
        )


def _shard(total: int, parts: int, what: str, spec: ModelSpec) -> int:
    if total % parts:
        raise PlanError(
            f"model '{spec.name}': {what}={total} is not divisible by the parallel degree {parts}"
        )
    return total // parts


def build_plan(spec: ModelSpec, point: Point) -> Plan:
    """The decode step of ``spec`` at ``point`` on shard ``point.rank``."""
    if point.batch < 1 or point.context < 1:
        raise PlanError(f"batch and context must be >= 1 (got B={point.batch}, L={point.context})")
    if point.tp < 1 or point.ep < 1 or not 0 <= point.rank < point.tp * point.ep:
        raise PlanError(f"bad parallelism tp={point.tp} ep={point.ep} rank={point.rank}")
    b = _Builder(spec, point)
    tp, batch, ctx = point.tp, point.batch, point.context
    h = spec.hidden_size
    kv_b = _elem_bytes(point.precision.kv)
    heads = _shard(spec.num_heads, tp, "num_heads", spec)
    kv_heads = max(1, spec.num_kv_heads // tp) if spec.attention == "gqa" else 0
    vocab_local = -(-spec.vocab_size // tp)
    kv_storage: list[int] = []
    expected_experts: float | None = None
    notes: list[str] = []

    # Embedding: B rows gathered (BF16); the table is held whole.
    embed_store = spec.vocab_size * h * 2
    b.ops.append(
        Op(
            name="embed",
            kind="embed",
            layer=-1,
            m=batch,
            n=h,
            weight_fmt="bf16",
            weight_bytes=float(batch * h * 2),
            act_bytes=batch * h * b.act_b,
            weight_storage_bytes=embed_store,
            params=spec.vocab_size * h,
        )
    )

    pi = None
    if spec.num_experts:
        pi = inclusion_probabilities(point.routing, spec.num_experts, spec.experts_per_token)
        if spec.num_experts % point.ep:
            raise PlanError(
                f"model '{spec.name}': num_experts={spec.num_experts} is not divisible by ep={point.ep}"
            )

    for layer in range(spec.num_layers):
        b.elementwise("attn_norm", "norm", layer, batch * h, batch * h, 4, params=h)
        if spec.attention == "mla":
            kv_storage.append(_mla_attention(b, spec, layer, heads, ctx, kv_b))
        else:
            kv_storage.append(_gqa_attention(b, spec, layer, heads, kv_heads, ctx, kv_b))
        b.allreduce("attn_allreduce", layer, batch * h)
        b.elementwise("ffn_norm", "norm", layer, batch * h, batch * h, 4, params=h)
        if spec.is_moe_layer(layer):
            assert pi is not None
            expected_experts = _moe_ffn(b, spec, layer, pi, tp, point)
        else:
            inter = _shard(spec.intermediate_size, tp, "intermediate_size", spec)
            b.gemm("ffn.gate_up", layer, 2 * inter, h)
            b.elementwise("ffn.swiglu", "act", layer, batch * 2 * inter, batch * inter, 5)
            b.gemm("ffn.down", layer, h, inter)
        b.allreduce("ffn_allreduce", layer, batch * h)

    b.elementwise("final_norm", "norm", -1, batch * h, batch * h, 4, params=h)
    b.gemm("lm_head", -1, vocab_local, h, fmt="bf16")
    if spec.tie_word_embeddings:
        # The LM head reads the embedding table: count its parameters once.
        last = b.ops[-1]
        b.ops[-1] = Op(**{**last.__dict__, "params": 0, "weight_storage_bytes": 0})
        notes.append("tied embeddings: the LM head reads the embedding table")
    return Plan(
        spec=spec,
        point=point,
        ops=tuple(b.ops),
        kv_storage_bytes_per_layer=tuple(kv_storage),
        expected_experts_per_moe_layer=expected_experts,
        notes=tuple(notes),
    )


def _gqa_attention(
    b: _Builder, spec: ModelSpec, layer: int, heads: int, kv_heads: int, ctx: int, kv_b: float
) -> int:
    """Append GQA attention ops; return this layer's KV-cache storage bytes."""
    batch, h, hd = b.batch, spec.hidden_size, spec.head_dim
    b.gemm("attn.qkv_proj", layer, (heads + 2 * kv_heads) * hd, h)
    b.elementwise(
        "attn.rope",
        "rope",
        layer,
        batch * (heads + kv_heads) * hd,
        batch * (heads + kv_heads) * hd,
        3,
    )
    span = ctx
    if spec.layer_attention_kind(layer) == "sliding" and spec.sliding_window:
        span = min(ctx, spec.sliding_window)
    b.ops.append(
        Op(
            name="attn.decode",
            kind="attention",
            layer=layer,
            m=batch,
            n=span,
            k=hd,
            compute="bf16",
            flops=4.0 * batch * heads * span * hd,
            # Read K and V over the span, and write the new token's K and V.
            kv_bytes=batch * 2 * kv_heads * hd * kv_b * (span + 1),
            act_bytes=2 * batch * heads * hd * b.act_b,
        )
    )
    b.gemm("attn.o_proj", layer, h, heads * hd)
    return int(batch * ctx * 2 * kv_heads * hd * kv_b)


def _mla_attention(
    b: _Builder, spec: ModelSpec, layer: int, heads: int, ctx: int, kv_b: float
) -> int:
    """Append MLA ops in the absorbed decode form; return this layer's latent-cache bytes."""
    batch, h = b.batch, spec.hidden_size
    nope, rope, rank, vdim = (
        spec.qk_nope_head_dim,
        spec.qk_rope_head_dim,
        spec.kv_lora_rank,
        spec.v_head_dim,
    )
    if spec.q_lora_rank:
        b.gemm("mla.q_a_proj", layer, spec.q_lora_rank, h)
        b.elementwise(
            "mla.q_a_norm",
            "norm",
            layer,
            batch * spec.q_lora_rank,
            batch * spec.q_lora_rank,
            4,
            params=spec.q_lora_rank,
        )
        b.gemm("mla.q_b_proj", layer, heads * (nope + rope), spec.q_lora_rank)
    else:
        b.gemm("mla.q_proj", layer, heads * (nope + rope), h)
    b.gemm("mla.kv_a_proj", layer, rank + rope, h)
    b.elementwise("mla.kv_a_norm", "norm", layer, batch * rank, batch * rank, 4, params=rank)
    b.elementwise(
        "mla.rope", "rope", layer, batch * (heads + 1) * rope, batch * (heads + 1) * rope, 3
    )
    # Absorb W_UK into the query and W_UV into the output: both halves of kv_b_proj.
    b.bgemm("mla.q_absorb", layer, heads, rank, nope)
    b.ops.append(
        Op(
            name="mla.decode",
            kind="mla_attention",
            layer=layer,
            m=batch,
            n=ctx,
            k=rank + rope,
            compute="bf16",
            flops=2.0 * batch * heads * ctx * (rank + rope) + 2.0 * batch * heads * ctx * rank,
            kv_bytes=batch * (rank + rope) * kv_b * (ctx + 1),
            act_bytes=batch * heads * (2 * rank + rope) * b.act_b,
        )
    )
    b.bgemm("mla.v_up", layer, heads, vdim, rank)
    b.gemm("attn.o_proj", layer, h, heads * vdim)
    return int(batch * ctx * (rank + rope) * kv_b)


def _moe_ffn(b: _Builder, spec: ModelSpec, layer: int, pi, tp: int, point: Point) -> float:
    """Append router, routed experts and shared experts; return expected experts touched."""
    batch, h = b.batch, spec.hidden_size
    experts_local = spec.num_experts // point.ep
    ep_rank = point.rank % point.ep
    local = pi[ep_rank * experts_local : (ep_rank + 1) * experts_local]
    touched = expected_distinct_experts(local, batch)
    pairs = batch * float(local.sum())
    inter = _shard(spec.moe_intermediate_size, tp, "moe_intermediate_size", spec)
    b.gemm("moe.router", layer, spec.num_experts, h, fmt="bf16")
    b.elementwise(
        "moe.topk",
        "router_topk",
        layer,
        batch * spec.num_experts,
        batch * spec.experts_per_token,
        4,
    )
    b.moe_gemm("moe.gate_up", layer, 2 * inter, h, experts_local, touched, pairs)
    b.elementwise("moe.swiglu", "act", layer, pairs * 2 * inter, pairs * inter, 5)
    b.moe_gemm("moe.down", layer, h, inter, experts_local, touched, pairs)
    b.elementwise("moe.combine", "act", layer, pairs * h, batch * h, 2)
    if spec.num_shared_experts:
        width = spec.shared_expert_intermediate_size or spec.moe_intermediate_size
        shared = _shard(width * spec.num_shared_experts, tp, "shared expert width", spec)
        b.gemm("moe.shared_gate_up", layer, 2 * shared, h)
        b.elementwise("moe.shared_swiglu", "act", layer, batch * 2 * shared, batch * shared, 5)
        b.gemm("moe.shared_down", layer, h, shared)
    return touched
