"""The plan of one rank, with expert parallelism as it is deployed.

``engine.plan.build_plan`` gives the rank's shard of heads, FFN columns, vocabulary and
experts, and the all-reduce bytes of tensor parallelism; it plans every rank over the whole
batch. Expert parallelism as deployed (and as the CPU backend runs it) splits the batch's
sequences over the ``ep`` groups instead: attention, dense layers, routers and shared
experts run on the rank's B / ep sequences, the rank's experts run on every token of the
whole batch routed to them, and two all-to-alls per MoE layer carry those tokens' hidden
vectors to the experts' ranks and their outputs back.

``rank_plan`` builds exactly that from two ``build_plan`` calls (the rank's sequences, and
the whole batch for the routed experts' ops) and adds the all-to-all ops with the bytes this
rank sends, at the activation precision (as ``build_plan`` counts all-reduce bytes), one
vector per (token, expert) pair: dispatch sends the rank's pairs routed to other ranks'
experts, combine returns the outputs of the pairs it received. It equals ``build_plan``
when ep = 1.
"""

from __future__ import annotations

import dataclasses

from engine.formats import bits_per_element
from engine.models import ModelSpec
from engine.plan import Op, Plan, PlanError, build_plan
from engine.point import Point
from engine.routing import inclusion_probabilities

#: Ops of the routed experts: they see every pair of the whole batch routed to this rank.
EXPERT_OPS = ("moe.gate_up", "moe.swiglu", "moe.down")


def rank_plan(spec: ModelSpec, point: Point) -> Plan:
    """The decode step of ``point.rank`` with the batch's sequences split over the EP groups.

    ``point.batch`` is the batch of the whole cluster; it must divide by ``point.ep``.
    Raises PlanError (one line) when it does not.
    """
    if point.ep == 1 or not spec.num_experts:
        return build_plan(spec, point)
    if point.batch % point.ep:
        raise PlanError(
            f"batch {point.batch} does not divide over ep={point.ep}: expert parallelism "
            "splits the sequences over the expert-parallel ranks"
        )
    local_batch = point.batch // point.ep
    local = build_plan(spec, dataclasses.replace(point, batch=local_batch))
    whole = build_plan(spec, point)
    experts = {(op.layer, op.name): op for op in whole.ops if op.name in EXPERT_OPS}
    pi = inclusion_probabilities(point.routing, spec.num_experts, spec.experts_per_token)
    per_rank = spec.num_experts // point.ep
    ep_rank = point.rank % point.ep
    mine = float(pi[ep_rank * per_rank : (ep_rank + 1) * per_rank].sum())
    row_bytes = spec.hidden_size * bits_per_element(point.precision.activation) / 8
    # Expected pairs sent: this rank's tokens routed elsewhere; pairs returned: the other
    # ranks' tokens routed here, computed here and sent back.
    sent_pairs = local_batch * (spec.experts_per_token - mine)
    returned_pairs = (point.ep - 1) * local_batch * mine
    ops: list[Op] = []
    for op in local.ops:
        ops.append(experts.get((op.layer, op.name), op))
        if op.name == "moe.topk":
            ops.append(_alltoall("moe.dispatch", op.layer, local_batch, sent_pairs * row_bytes))
        elif op.name == "moe.down":
            ops.append(
                _alltoall("moe.combine_alltoall", op.layer, local_batch, returned_pairs * row_bytes)
            )
    notes = local.notes + (
        f"expert parallel: {local_batch} of {point.batch} sequences on this rank; its experts "
        "serve every pair of the whole batch routed to them; all-to-all bytes are sent bytes",
    )
    return Plan(
        spec=spec,
        point=point,
        ops=tuple(ops),
        kv_storage_bytes_per_layer=local.kv_storage_bytes_per_layer,
        expected_experts_per_moe_layer=whole.expected_experts_per_moe_layer,
        notes=notes,
    )


def _alltoall(name: str, layer: int, rows: int, sent_bytes: float) -> Op:
    return Op(name=name, kind="alltoall", layer=layer, m=rows, comm_bytes=float(sent_bytes))
