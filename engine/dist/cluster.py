"""Cluster figures of one point from the records of its ranks.

Every rank measures its own decode steps and attributes its own power sources' energy over
the windows common to all ranks. Rank 0 adds them up:

- throughput: the sum of the ranks' throughputs (each rank is credited its share of the
  batch, ``engine.dist.token_share``; the shares add up to B), so the cluster's tokens/s is
  B over the (common) step time;
- step time: the slowest rank's (the collectives make every rank wait for it);
  interactivity is its inverse;
- energy per boundary: the sum over the ranks that own the boundary's sources. Device
  boundaries (``gpu-*``) are owned by every rank when each rank drives its own GPU; every
  other boundary (CPU package, node meter) is sampled once per node, by the node's first
  rank. A boundary's total exists only when every owner measured it; a partial sum is never
  reported. Uncertainties add in quadrature (independent sensors);
- tokens per joule: total tokens/s over total average power, at the first complete boundary
  of gpu-board, gpu-module, cpu-package, node;
- imbalance: the busy time (step time minus time waiting in collectives) of the slowest
  rank over the mean busy time, minus one; the slowest rank is the busiest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from engine.power.session import FIGURE_KEYS, PRIMARY_ORDER, null_energy
from engine.dist.sync import Offsets, barrier_skew, common_windows



def _get(d: dict | None, *path: str):
    for part in path:
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def owners(boundary: str, leaders: Sequence[bool], device_per_rank: bool) -> list[int]:
    """The ranks whose sources make up ``boundary``: every rank for a device boundary when
    each rank drives its own device, else the first rank of each node."""
    if device_per_rank and boundary.startswith("gpu"):
        return list(range(len(leaders)))
    return [r for r, lead in enumerate(leaders) if lead]


def sum_boundary(
    boundary: str,
    blocks: Sequence[dict | None],
    leaders: Sequence[bool],
    device_per_rank: bool,
    throughput_tok_s: float,
) -> tuple[dict | None, str | None]:
    """The cluster's figures at one boundary, or None and why (an owner lacks it)."""
    who = owners(boundary, leaders, device_per_rank)
    parts, missing = [], []
    for r in who:
        fig = _get(blocks[r], "by_boundary", boundary)
        if not fig or fig.get("energy_j") is None:
            why = _get(blocks[r], "reason") or "no source at this boundary"
            missing.append(f"rank {r} ({why})")
        else:
            parts.append((r, fig))
    if missing or not parts:
        return None, f"{boundary}: not measured on " + ", ".join(missing or ["any rank"])
    energy = sum(f["energy_j"] for _, f in parts)
    power = sum(f["avg_power_w"] for _, f in parts)
    power_u = math.sqrt(sum((f.get("avg_power_uncertainty_w") or 0.0) ** 2 for _, f in parts))
    idles = [f.get("idle_power_w") for _, f in parts]
    idle = sum(idles) if all(v is not None for v in idles) else None
    idle_u = (
        math.sqrt(sum((f.get("idle_power_uncertainty_w") or 0.0) ** 2 for _, f in parts))
        if idle is not None
        else None
    )
    above = [f.get("energy_above_idle_j") for _, f in parts]
    tpj = throughput_tok_s / power if power > 0 else None
    above_w = None if idle is None else power - idle
    return {
        "energy_j": energy,
        "energy_uncertainty_j": math.sqrt(
            sum((f.get("energy_uncertainty_j") or 0.0) ** 2 for _, f in parts)
        ),
        "avg_power_w": power,
        "avg_power_uncertainty_w": power_u,
        "idle_power_w": idle,
        "idle_power_uncertainty_w": idle_u,
        "energy_above_idle_j": sum(above) if all(v is not None for v in above) else None,
        "joules_per_token": power / throughput_tok_s if throughput_tok_s > 0 else None,
        "tokens_per_joule": tpj,
        "tokens_per_joule_uncertainty": None if tpj is None else tpj * power_u / power,
        "tokens_per_joule_above_idle": (
            throughput_tok_s / above_w if above_w is not None and above_w > 0 else None
        ),
        "coverage": min((f.get("coverage") or 0.0) for _, f in parts),
        "sources": [f"rank {r}: {s}" for r, f in parts for s in (f.get("sources") or [])],
        "ranks": [r for r, _ in parts],
    }, None


def merge_energy(
    blocks: Sequence[dict | None],
    leaders: Sequence[bool],
    device_per_rank: bool,
    throughput_tok_s: float,
    window_s: float | None,
) -> dict:
    """The cluster's energy block (same fields as one rank's, plus ``per_rank``)."""
    names = sorted({b for blk in blocks for b in (_get(blk, "by_boundary") or {})})
    by_boundary: dict[str, dict] = {}
    reasons: list[str] = []
    for name in names:
        fig, why = sum_boundary(name, blocks, leaders, device_per_rank, throughput_tok_s)
        if fig is None:
            reasons.append(str(why))
        else:
            by_boundary[name] = fig
    primary = next((b for b in PRIMARY_ORDER if b in by_boundary), next(iter(by_boundary), None))
    flags = [f"rank {r}: {f}" for r, blk in enumerate(blocks) for f in (_get(blk, "flags") or [])]
    if primary is None:
        rank_reasons = grouped(
            [
                (r, str(blk.get("reason")))
                for r, blk in enumerate(blocks)
                if blk and blk.get("reason")
            ]
        )
        block = null_energy("; ".join(reasons + rank_reasons) or "no power source on any rank")
        block["flags"] = flags
    else:
        block = {k: by_boundary[primary].get(k) for k in FIGURE_KEYS}
        block.update(
            boundary=primary,
            valid=True,
            flags=flags,
            reason=None,
            sources=by_boundary[primary]["sources"],
        )
    node, gpu = by_boundary.get("node"), by_boundary.get("gpu-board")
    block.update(
        scaled_from_layers=any(bool(_get(b, "scaled_from_layers")) for b in blocks),
        window_s=window_s,
        by_boundary=by_boundary,
        node_to_gpu_energy_ratio=(
            node["energy_j"] / gpu["energy_j"] if node and gpu and gpu["energy_j"] else None
        ),
        incomplete_boundaries=reasons,
        per_rank=[
            {
                "rank": r,
                "boundary": _get(blk, "boundary"),
                "energy_j": _get(blk, "energy_j"),
                "avg_power_w": _get(blk, "avg_power_w"),
                "tokens_per_joule": _get(blk, "tokens_per_joule"),
                "reason": _get(blk, "reason"),
            }
            for r, blk in enumerate(blocks)
        ],
    )
    return block


def grouped(items: Sequence[tuple[int, str]]) -> list[str]:
    """``(rank, message)`` pairs as one line per message: ``ranks 1, 3: message``."""
    by_message: dict[str, list[int]] = {}
    for rank, message in items:
        by_message.setdefault(message, []).append(rank)
    return [
        f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {m}"
        for m, rs in by_message.items()
    ]


def merge_ranks(records: Sequence[dict], offsets: Offsets, device_per_rank: bool) -> dict:
    """The merged record's measured fields (timing, metrics, roofline, energy, cluster) from
    the ranks' records (index = rank), each as ``engine.measure.measure_point`` returns it
    with its ``rank`` block."""
    ranks = [r["rank"] for r in records]
    metrics = [r["metrics"] for r in records]
    throughput = sum(m["throughput_tok_s"] for m in metrics)
    slow_step = max(range(len(records)), key=lambda i: metrics[i]["step_latency_s"])
    step_s = metrics[slow_step]["step_latency_s"]
    rl_steps = [r["roofline"]["step_time_s"] for r in records]
    busy = [k["busy_s_per_step"] for k in ranks]
    known_busy = [b for b in busy if b is not None]
    busiest = max(range(len(busy)), key=lambda i: -1.0 if busy[i] is None else busy[i])
    mean_busy = sum(known_busy) / len(known_busy) if known_busy else None
    starts = [[w[0] for w in k["windows_ns"]] for k in ranks]
    ends = [[w[1] for w in k["windows_ns"]] for k in ranks]
    common_s = None
    try:
        c0, c1 = common_windows(starts, ends, offsets)
        common_s = float((c1 - c0).sum()) / 1e9
    except ValueError:
        pass
    energy = merge_energy(
        [r.get("energy") for r in records],
        [k["node_leader"] for k in ranks],
        device_per_rank,
        throughput,
        common_s,
    )
    timing = dict(records[slow_step]["timing"])
    timing.update(
        steps=min(r["timing"]["steps"] for r in records),
        window_s=common_s,
        window="the spans common to all ranks' windows, on rank 0's clock",
        slowest_rank_by_step_time=slow_step,
    )
    return {
        "timing": timing,
        "metrics": {
            "throughput_tok_s": throughput,
            "interactivity_tok_s_per_user": 1.0 / step_s,
            "step_latency_s": step_s,
            "roofline_fraction": max(rl_steps) / step_s,
            "achieved_bw_gbps": sum(m["achieved_bw_gbps"] for m in metrics),
            "achieved_tflops": sum(m["achieved_tflops"] for m in metrics),
        },
        "roofline": dict(records[max(range(len(records)), key=lambda i: rl_steps[i])]["roofline"]),
        "energy": energy,
        "cluster": {
            "world_size": len(records),
            "throughput_is": "sum of the ranks' throughputs (each credited its share of B)",
            "step_time_is": "the slowest rank's mean step time",
            "slowest_rank": busiest if known_busy else slow_step,
            "imbalance": (max(known_busy) / mean_busy - 1.0 if known_busy and mean_busy else None),
            "imbalance_is": "busiest rank's busy time (step minus collective waits) / mean - 1",
            "sync": {
                **barrier_skew([k["barrier_exit_ns"] for k in ranks], offsets),
                "clock_offsets_ns": [list(o) for o in offsets],
            },
            "ranks": [
                {
                    "rank": i,
                    "host": k.get("host"),
                    "local_rank": k.get("local_rank"),
                    "tp_rank": k.get("tp_rank"),
                    "ep_rank": k.get("ep_rank"),
                    "device": k.get("device"),
                    "tokens_per_step": k.get("tokens_per_step"),
                    "throughput_tok_s": metrics[i]["throughput_tok_s"],
                    "step_latency_s": metrics[i]["step_latency_s"],
                    "comm_s_per_step": k.get("comm_s_per_step"),
                    "busy_s_per_step": busy[i],
                    "roofline_step_time_s": rl_steps[i],
                    "energy_boundary": _get(records[i], "energy", "boundary"),
                    "energy_j": _get(records[i], "energy", "energy_j"),
                    "avg_power_w": _get(records[i], "energy", "avg_power_w"),
                }
                for i, k in enumerate(ranks)
            ],
        },
    }


def merge_status(outcomes: Sequence[tuple[str, str | None, bool]]) -> tuple[str, str | None]:
    """The point's status on every rank from each rank's ``(status, error, secondary)``;
    ``secondary`` marks a rank that stopped only because another one failed.

    ok when every rank is ok; unsupported when every failing rank says so; else failed. The
    error names the ranks whose own failure ended the point.
    """
    bad = [(r, s, e, sec) for r, (s, e, sec) in enumerate(outcomes) if s != "ok"]
    if not bad:
        return "ok", None
    primary = [b for b in bad if not b[3]] or bad
    status = "unsupported" if all(s == "unsupported" for _, s, _, _ in primary) else "failed"
    return status, "; ".join(grouped([(r, str(e)) for r, _, e, _ in primary]))
