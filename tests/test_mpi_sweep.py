"""A 2-rank sweep on the CPU backend: merged records, the ranks' records, cluster sums.

``mpirun -n 2`` runs this file as the sweep (``python -m engine.sweep`` with peaks measured
on small buffers). The node's power comes from a meter log whose true power is known; the
first rank of the node samples it, the other rank has no source of its own.
"""

from __future__ import annotations

import json
import math
import sys
import time

import numpy as np
import pytest
from mpi_launch import needs_mpi, run_ranks

QUICK = ["--context", "32", "--precision", "bf16", "--warmup", "0.05", "--duration", "0.3"]
QUICK += ["--backend", "cpu", "--repetitions", "2"]


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _meter_log(path, power_w: float) -> None:
    """A 100 Hz meter on the host's monotonic clock reading a constant ``power_w`` from
    10 s ago to 10 minutes ahead (each value the mean of its last 10 ms)."""
    t0 = time.monotonic() - 10.0
    rows = [f"{t0 + 0.01 * i:.6f},{power_w:.3f}" for i in range(61000)]
    path.write_text("t_s,power_w\n" + "\n".join(rows) + "\n")


def _check_cluster_sums(merged: dict, ranks: list[dict]) -> None:
    """The merged record's figures are the sums (or the slowest) of the ranks' figures."""
    assert [r["rank"]["rank"] for r in ranks] == [0, 1]
    throughputs = [r["metrics"]["throughput_tok_s"] for r in ranks]
    assert merged["metrics"]["throughput_tok_s"] == pytest.approx(sum(throughputs), rel=1e-12)
    steps = [r["metrics"]["step_latency_s"] for r in ranks]
    assert merged["metrics"]["step_latency_s"] == max(steps)
    for r in ranks:
        share = r["rank"]["tokens_per_step"]
        assert share == merged["point"]["batch"] / 2
        assert r["metrics"]["throughput_tok_s"] == pytest.approx(
            share / r["metrics"]["step_latency_s"], rel=1e-12
        )
        assert 0 <= r["rank"]["comm_s_per_step"] < r["metrics"]["step_latency_s"]
    busy = [r["rank"]["busy_s_per_step"] for r in ranks]
    assert merged["cluster"]["imbalance"] == pytest.approx(max(busy) / np.mean(busy) - 1)
    assert merged["cluster"]["slowest_rank"] == int(np.argmax(busy))


@needs_mpi
def test_two_rank_tp_sweep_merges_ranks_and_resumes(tmp_path):
    log, out = tmp_path / "meter.csv", tmp_path / "run"
    _meter_log(log, 150.0)
    argv = ["--model", "tiny", "--batch", "2,4", "--tp", "2", "--out", str(out), "--power"]
    argv += ["none", "--power-log", str(log), "--power-log-offset", "0"]
    argv += ["--power-log-averaging", "0.01", "--idle", "0.5"]
    done = run_ranks(2, [__file__, *QUICK, *argv], timeout_s=120)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("tok/s/user") == 1  # only rank 0 prints the table
    merged = _records(out / "records.jsonl")
    ranks = _records(out / "ranks" / "records.jsonl")
    assert [m["point"]["batch"] for m in merged] == [2, 4]
    assert len(ranks) == 4
    for m in merged:
        assert m["status"] == "ok" and m["scope"] == "cluster" and m["world_size"] == 2
        assert "|tp=2|ep=1|rank=all|" in m["key"]
        mine = [r for r in ranks if r["cluster_key"] == m["key"]]
        assert [f"|rank={i}|" in r["key"] for i, r in enumerate(mine)] == [True, True]
        _check_cluster_sums(m, mine)
        # Energy: the node meter is the first rank's; the cluster's is the sum of owners'.
        e, e0, e1 = m["energy"], mine[0]["energy"], mine[1]["energy"]
        assert e["boundary"] == "node" and e["valid"] and e["reason"] is None
        assert e1["energy_j"] is None and "first rank" in e1["reason"]
        assert e["energy_j"] == e0["by_boundary"]["node"]["energy_j"]
        assert e["avg_power_w"] == e0["by_boundary"]["node"]["avg_power_w"]
        assert abs(e["avg_power_w"] - 150.0) <= max(e["avg_power_uncertainty_w"], 1e-6) + 1e-3
        assert e["tokens_per_joule"] == pytest.approx(
            m["metrics"]["throughput_tok_s"] / e["avg_power_w"], rel=1e-12
        )
        # Both ranks attributed energy over the same (common) windows.
        assert mine[0]["timing"]["energy_windows"] == "common to all ranks"
        assert e["window_s"] == pytest.approx(mine[0]["timing"]["common_window_s"], abs=1e-9)
        # One node, one clock: rank 1's measured offset is zero within its uncertainty.
        offset, unc = m["cluster"]["sync"]["clock_offsets_ns"][1]
        assert abs(offset) <= unc
        assert m["cluster"]["sync"]["max_skew_ns"] >= 0
        assert m["peaks"]["link_bw_gbps"] > 0 and m["roofline"]["comm_time_s"] > 0
    # A rerun resumes: nothing left to do, nothing duplicated.
    again = run_ranks(2, [__file__, *QUICK, *argv], timeout_s=120)
    assert again.returncode == 0 and "0 to run" in again.stderr
    assert len(_records(out / "records.jsonl")) == 2


@needs_mpi
def test_two_rank_ep_sweep_moves_tokens_between_ranks(tmp_path):
    out = tmp_path / "run"
    argv = ["--model", "tiny-moe", "--batch", "4", "--ep", "2", "--out", str(out)]
    done = run_ranks(2, [__file__, *QUICK, *argv, "--power", "none"], timeout_s=120)
    assert done.returncode == 0, done.stderr[-4000:]
    [merged] = _records(out / "records.jsonl")
    ranks = _records(out / "ranks" / "records.jsonl")
    assert merged["status"] == "ok" and "|tp=1|ep=2|rank=all|" in merged["key"]
    _check_cluster_sums(merged, ranks)
    from engine.models import load_spec
    from engine.plan import build_plan
    from engine.point import Point
    from engine.precision import parse_precision

    spec = load_spec("tiny-moe")
    one = build_plan(spec, Point("tiny-moe", 4, 32, parse_precision("bf16"))).params
    h, k, inter = spec.hidden_size, spec.experts_per_token, spec.moe_intermediate_size
    moe_layers = spec.num_layers - spec.first_dense_layers
    for r in ranks:
        # Each rank holds half of the routed experts (gate, up and down matrices each).
        held = moe_layers * (spec.num_experts // 2) * 3 * h * inter
        assert one - r["plan"]["params_on_shard"] == held
        # Uniform routing: each of the rank's 2 sequences sends k/2 of its k pairs to the
        # other rank and gets as many pairs back to compute; a hidden vector is h BF16
        # values; dispatch and combine, in every MoE layer.
        assert r["plan"]["comm_bytes"] == moe_layers * 2 * (2 * k / 2 * h * 2)
    assert merged["energy"]["tokens_per_joule"] is None and merged["energy"]["reason"]
    assert math.isfinite(merged["metrics"]["roofline_fraction"])


if __name__ == "__main__":
    from mpi_launch import small_cpu_peaks

    small_cpu_peaks()
    from engine.sweep import main

    sys.exit(main(sys.argv[1:]))
