"""Random model weights and KV caches for a shard, in the true storage formats.

Weights are random but have the model's true shapes and packed formats (FP4 two values a
byte with its block scales). Every layer gets its own weights from its own random stream
(seeded by the run seed and the layer index), so no layer reuses another's and caches
cannot flatter a measurement. The CPU backend, the CUDA backend and the float64 reference
all draw from here, so the same seed gives the same model everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.formats import QTensor, random_qtensor
from engine.plan import Plan

EMBED_LAYER = -1  # layer index of the embedding, final norm and LM head in a plan


@dataclass
class KVCache:
    """One layer's cache for B sequences, as format codes plus a per-tensor scale.

    GQA: ``k`` and ``v`` have shape (B, Hkv, L, D). MLA: ``k`` is the latent cache
    (B, L, kv_lora_rank) and ``v`` the rope key cache (B, L, qk_rope_head_dim).
    Values are ``decode(code) * scale``.
    """

    fmt: str
    scale: float
    k: np.ndarray
    v: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes)


def _rng(seed: int, layer: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, layer + 1, stream])


def layer_weights(plan: Plan, layer: int, seed: int) -> dict[str, object]:
    """Weights of one layer (or of the embedding/head when ``layer`` is -1), by op name.

    A ``gemm`` op gives a QTensor; ``moe_gemm`` and ``bgemm`` ops give a list of QTensors
    (one per local expert or head); a ``norm`` op gives a float32 vector.
    """
    rng = _rng(seed, layer)
    out: dict[str, object] = {}
    for op in plan.ops:
        if op.layer != layer:
            continue
        if op.kind == "gemm":
            if op.params == 0:  # tied LM head: reads the embedding table
                continue
            out[op.name] = random_qtensor(rng, (op.n, op.k), op.weight_fmt, std=op.k**-0.5)
        elif op.kind in ("moe_gemm", "bgemm"):
            out[op.name] = [
                random_qtensor(rng, (op.n, op.k), op.weight_fmt, std=op.k**-0.5)
                for _ in range(op.held)
            ]
        elif op.kind == "norm":
            out[op.name] = (1.0 + 0.1 * rng.standard_normal(op.params)).astype(np.float32)
        elif op.kind == "embed":
            table = random_qtensor(rng, (plan.spec.vocab_size, op.n), "bf16", std=1.0)
            out[op.name] = table
            if plan.spec.tie_word_embeddings:
                out["lm_head"] = table
    return out


def kv_cache(plan: Plan, layer: int, seed: int) -> KVCache:
    """A filled KV cache for one layer: ``context`` positions of random values (std ~1)."""
    spec, point = plan.spec, plan.point
    fmt = point.precision.kv
    rng = _rng(seed, layer, stream=1)
    batch, ctx = point.batch, point.context
    if spec.attention == "mla":
        shapes = [(batch, ctx, spec.kv_lora_rank), (batch, ctx, spec.qk_rope_head_dim)]
    else:
        kv_heads = max(1, spec.num_kv_heads // point.tp)
        shapes = [(batch, kv_heads, ctx, spec.head_dim)] * 2
    tensors: list[QTensor] = [
        random_qtensor(rng, (int(np.prod(s[:-1])), s[-1]), fmt, std=1.0) for s in shapes
    ]
    scales = [
        1.0 if t.scale is None else float(np.asarray(t.scale).reshape(-1)[0]) for t in tensors
    ]
    # One scale per layer cache: re-scale the second tensor's codes is not needed when the
    # format has no scale; for FP8 both tensors share the first tensor's scale.
    scale = scales[0]
    k = tensors[0].data.reshape(shapes[0])
    v = tensors[1].data.reshape(shapes[1])
    return KVCache(fmt=fmt, scale=scale, k=k, v=v)


def layer_footprint_bytes(plan: Plan, layer: int) -> int:
    """Memory one layer needs on this shard: all its weights (all experts) and its KV cache."""
    weights = sum(op.weight_storage_bytes for op in plan.ops if op.layer == layer)
    return int(weights + plan.kv_storage_bytes_per_layer[layer])


def layer_class(plan: Plan, layer: int) -> tuple[str, str]:
    """What makes layers differ in cost: attention kind (full/sliding/mla) and FFN kind."""
    spec = plan.spec
    attention = "mla" if spec.attention == "mla" else spec.layer_attention_kind(layer)
    return attention, "moe" if spec.is_moe_layer(layer) else "dense"


def select_layers(plan: Plan, budget_bytes: float) -> list[int]:
    """Distinct layers to run within a memory budget, covering every layer class.

    Returns all layers when they fit. Otherwise as many as fit, at least one per class
    and the rest in proportion to each class's share of the model, so a step time
    scaled per class stays faithful. Empty when not even one layer of each class fits.
    """
    spec = plan.spec
    all_layers = list(range(spec.num_layers))
    footprint = {layer: layer_footprint_bytes(plan, layer) for layer in all_layers}
    head = sum(op.weight_storage_bytes for op in plan.ops if op.layer == EMBED_LAYER)
    budget = budget_bytes - head
    if sum(footprint.values()) <= budget:
        return all_layers
    classes: dict[tuple[str, str], list[int]] = {}
    for layer in all_layers:
        classes.setdefault(layer_class(plan, layer), []).append(layer)
    chosen = {key: [members[0]] for key, members in classes.items()}
    used = sum(footprint[members[0]] for members in classes.values())
    if used > budget:
        return []
    # Add layers to the class furthest below its share until the budget is spent.
    while True:
        total = sum(len(v) for v in chosen.values())
        best = None
        for key, members in classes.items():
            if len(chosen[key]) >= len(members):
                continue
            deficit = len(members) / spec.num_layers - len(chosen[key]) / (total + 1)
            if best is None or deficit > best[0]:
                best = (deficit, key)
        if best is None:
            break
        key = best[1]
        nxt = classes[key][len(chosen[key])]
        if used + footprint[nxt] > budget:
            break
        chosen[key].append(nxt)
        used += footprint[nxt]
    return sorted(layer for members in chosen.values() for layer in members)
