"""A rank's slice of the model: the very weights, KV caches and inputs one device holds for
the same seed, cut along the dimensions that tensor and expert parallelism split.

Tensor parallelism (``tp`` ranks, this one ``tp_rank``): attention heads (the rows of the
query/key/value projection, the columns of the output projection, the heads of MLA's
absorbed projections), FFN and expert intermediate columns (rows of gate/up, columns of
down) and vocabulary rows of the LM head. With fewer KV heads than ranks, each rank keeps
the one KV head its query heads read. Expert parallelism (``ep`` ranks): the routed experts
``[ep_rank * E / ep, (ep_rank + 1) * E / ep)`` and the sequences
``[ep_rank * B / ep, (ep_rank + 1) * B / ep)``. Norms, routers, the embedding and MLA's
shared latent projections are whole on every rank.

Weights are drawn in the order and from the random streams of ``engine.weights`` (one
tensor at a time, keeping only this rank's part, so a rank never holds a whole MoE layer);
a test checks that the result equals slicing ``engine.weights.layer_weights``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.dist import RankPos
from engine.formats import BLOCK_SIZE, QTensor, random_qtensor
from engine.models import ModelSpec
from engine.plan import Plan
from engine.weights import KVCache, kv_cache


class ShardError(ValueError):
    """The model cannot be cut this way (one-line message)."""


# ------------------------------------------------------------------------------ tensors


def rows(q: QTensor, lo: int, hi: int) -> QTensor:
    """Output rows ``[lo, hi)`` of a weight (its scales follow)."""
    scale = q.scale
    if scale is not None and scale.ndim > 0:
        scale = np.ascontiguousarray(scale[lo:hi])
    return QTensor(q.fmt, (hi - lo, q.shape[1]), np.ascontiguousarray(q.data[lo:hi]), scale,
                   q.global_scale)  # fmt: skip


def cols(q: QTensor, lo: int, hi: int) -> QTensor:
    """Input columns ``[lo, hi)`` of a weight; block formats need whole blocks."""
    block = BLOCK_SIZE.get(q.fmt)
    if block:
        if lo % block or hi % block:
            raise ShardError(
                f"{q.fmt} weights split along K at {lo}:{hi} cut through {block}-element blocks"
            )
        data = q.data[:, lo // 2 : hi // 2]
        scale = q.scale[:, lo // block : hi // block]
    else:
        data, scale = q.data[:, lo:hi], q.scale
    return QTensor(
        q.fmt,
        (q.shape[0], hi - lo),
        np.ascontiguousarray(data),
        scale if scale is None or scale.ndim == 0 else np.ascontiguousarray(scale),
        q.global_scale,
    )


def cat_rows(parts: list[QTensor]) -> QTensor:
    """Row slices of one weight stacked back into one tensor."""
    first = parts[0]
    if first.scale is not None and first.scale.ndim == 0:
        scale = first.scale  # one per-tensor scale, shared by every slice of the tensor
    elif first.scale is not None:
        scale = np.ascontiguousarray(np.concatenate([p.scale for p in parts]))
    else:
        scale = None
    data = np.ascontiguousarray(np.concatenate([p.data for p in parts]))
    return QTensor(first.fmt, (sum(p.shape[0] for p in parts), first.shape[1]), data, scale,
                   first.global_scale)  # fmt: skip


# ------------------------------------------------------------------------------ the cut


@dataclass(frozen=True)
class Cut:
    """What one rank keeps of a model."""

    spec: ModelSpec
    pos: RankPos

    def _part(self, total: int, parts: int, index: int, what: str) -> tuple[int, int]:
        if total % parts:
            raise ShardError(f"{what}={total} does not divide over {parts} ranks")
        size = total // parts
        return index * size, (index + 1) * size

    def heads(self) -> tuple[int, int]:
        """This rank's query heads ``[lo, hi)``."""
        return self._part(self.spec.num_heads, self.pos.tp, self.pos.tp_rank, "num_heads")

    def kv_heads(self) -> tuple[int, int]:
        """The KV heads this rank keeps ``[lo, hi)`` (one shared head when fewer than tp)."""
        spec, tp = self.spec, self.pos.tp
        kv = spec.num_kv_heads
        if kv >= tp:
            return self._part(kv, tp, self.pos.tp_rank, "num_kv_heads")
        if tp % kv:
            raise ShardError(f"num_kv_heads={kv} below tp={tp} must divide it")
        group = spec.num_heads // kv
        first = self.heads()[0] // group
        return first, first + 1

    def experts(self) -> tuple[int, int]:
        """This rank's routed experts ``[lo, hi)``."""
        return self._part(self.spec.num_experts, self.pos.ep, self.pos.ep_rank, "num_experts")

    def sequences(self, batch: int) -> slice:
        """This rank's sequences of the batch."""
        lo, hi = self._part(batch, self.pos.ep, self.pos.ep_rank, "batch")
        return slice(lo, hi)

    def vocab(self) -> tuple[int, int]:
        """This rank's LM-head rows (the plan's ceil(V / tp) per rank; the last may be short)."""
        v = self.spec.vocab_size
        per = -(-v // self.pos.tp)
        return min(v, self.pos.tp_rank * per), min(v, (self.pos.tp_rank + 1) * per)

    def _ffn(self, width: int) -> tuple[int, int]:
        return self._part(width, self.pos.tp, self.pos.tp_rank, "FFN width")

    def gate_up(self, q: QTensor) -> QTensor:
        """Gate and up rows of this rank (the weight is [gate; up], F rows each)."""
        f = q.shape[0] // 2
        lo, hi = self._ffn(f)
        return cat_rows([rows(q, lo, hi), rows(q, f + lo, f + hi)])

    def down(self, q: QTensor) -> QTensor:
        """Columns of this rank's FFN slice."""
        lo, hi = self._ffn(q.shape[1])
        return cols(q, lo, hi)

    def weight(self, name: str, q: QTensor) -> QTensor:
        """This rank's part of the single weight ``name``."""
        spec = self.spec
        if self.pos.tp == 1 and name != "lm_head":
            return q
        h0, h1 = self.heads()
        if name == "attn.qkv_proj":
            d = spec.head_dim
            k0, k1 = self.kv_heads()
            q_rows = spec.num_heads * d
            kv_rows = spec.num_kv_heads * d
            return cat_rows(
                [
                    rows(q, h0 * d, h1 * d),
                    rows(q, q_rows + k0 * d, q_rows + k1 * d),
                    rows(q, q_rows + kv_rows + k0 * d, q_rows + kv_rows + k1 * d),
                ]
            )
        if name == "attn.o_proj":
            d = spec.v_head_dim if spec.attention == "mla" else spec.head_dim
            return cols(q, h0 * d, h1 * d)
        if name in ("mla.q_proj", "mla.q_b_proj"):
            d = spec.qk_nope_head_dim + spec.qk_rope_head_dim
            return rows(q, h0 * d, h1 * d)
        if name in ("ffn.gate_up", "moe.shared_gate_up"):
            return self.gate_up(q)
        if name in ("ffn.down", "moe.shared_down"):
            return self.down(q)
        if name == "lm_head":
            v0, v1 = self.vocab()
            return q if (v0, v1) == (0, q.shape[0]) else rows(q, v0, v1)
        return q  # replicated: routers, MLA latent projections

    def kept(self, name: str, count: int) -> range:
        """Which of the ``count`` tensors of a per-expert or per-head op this rank keeps."""
        if name in ("moe.gate_up", "moe.down"):
            return range(*self.experts())
        if name in ("mla.q_absorb", "mla.v_up"):
            return range(*self.heads())
        return range(count)

    def one_of_many(self, name: str, q: QTensor) -> QTensor:
        """This rank's part of one kept expert's (or head's) weight."""
        if self.pos.tp > 1 and name == "moe.gate_up":
            return self.gate_up(q)
        if self.pos.tp > 1 and name == "moe.down":
            return self.down(q)
        return q


def rank_layer_weights(full: Plan, layer: int, seed: int, cut: Cut) -> dict[str, object]:
    """``engine.weights.layer_weights(full, layer, seed)`` as this rank keeps it.

    ``full`` is the plan of the unsplit model (tp = ep = 1). Tensors are drawn one at a
    time in ``layer_weights``' order and stream, and only this rank's part is kept.
    """
    rng = np.random.default_rng([seed, layer + 1, 0])
    out: dict[str, object] = {}
    for op in full.ops:
        if op.layer != layer:
            continue
        if op.kind == "gemm":
            if op.params == 0:  # tied LM head: reads the embedding table
                continue
            q = random_qtensor(rng, (op.n, op.k), op.weight_fmt, std=op.k**-0.5)
            out[op.name] = cut.weight(op.name, q)
        elif op.kind in ("moe_gemm", "bgemm"):
            keep = cut.kept(op.name, op.held)
            kept = []
            for i in range(op.held):
                q = random_qtensor(rng, (op.n, op.k), op.weight_fmt, std=op.k**-0.5)
                if i in keep:
                    kept.append(cut.one_of_many(op.name, q))
            out[op.name] = kept
        elif op.kind == "norm":
            out[op.name] = (1.0 + 0.1 * rng.standard_normal(op.params)).astype(np.float32)
        elif op.kind == "embed":
            table = random_qtensor(rng, (full.spec.vocab_size, op.n), "bf16", std=1.0)
            out[op.name] = table
            if full.spec.tie_word_embeddings:
                out["lm_head"] = cut.weight("lm_head", table)
    return out


def rank_kv_cache(full: Plan, layer: int, seed: int, cut: Cut) -> KVCache:
    """``engine.weights.kv_cache(full, layer, seed)`` cut to this rank's sequences and KV
    heads (MLA's latent cache has no heads: only the sequences are cut)."""
    whole = kv_cache(full, layer, seed)
    seqs = cut.sequences(full.point.batch)
    if full.spec.attention == "mla":
        k, v = whole.k[seqs], whole.v[seqs]
    else:
        k0, k1 = cut.kv_heads() if cut.pos.tp > 1 else (0, whole.k.shape[1])
        k, v = whole.k[seqs, k0:k1], whole.v[seqs, k0:k1]
    return KVCache(
        fmt=whole.fmt, scale=whole.scale, k=np.ascontiguousarray(k), v=np.ascontiguousarray(v)
    )
