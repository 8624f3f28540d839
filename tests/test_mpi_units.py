"""The parts of multi-rank runs that need no MPI: shards, the EP rank plan, cluster sums,
clock arithmetic, device choice, status agreement, and that one process needs no MPI."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.dist import RankPos, SingleComm, launch_size, layout, token_share
from engine.dist.cluster import merge_energy, merge_status
from engine.dist.devices import DeviceError, choose_gpu, cpu_threads
from engine.dist.points import INFLIGHT, cluster_key, recover_inflight
from engine.dist.rank_plan import rank_plan
from engine.dist.shard import Cut, ShardError, rank_kv_cache, rank_layer_weights
from engine.dist.sync import barrier_skew, common_windows
from engine.formats import dequantize
from engine.models import load_spec
from engine.plan import build_plan
from engine.point import Point
from engine.precision import parse_precision
from engine.results import ResultStore
from engine.routing import inclusion_probabilities, sample_assignments
from engine.weights import EMBED_LAYER, kv_cache, layer_weights

# ----------------------------------------------------------------------------- shards


def _split(total: int, parts: int, index: int) -> np.ndarray:
    size = total // parts
    return np.arange(index * size, (index + 1) * size)


def _expected_index(spec, name: str, pos: RankPos, shape: tuple[int, int]):
    """Rows and columns of the one-device weight that rank ``pos`` must hold, from the
    model's shapes (query head q reads KV head q // (heads / kv_heads))."""
    n, k = shape
    rows, cols = np.arange(n), np.arange(k)
    t, tp = pos.tp_rank, pos.tp
    heads = _split(spec.num_heads, tp, t)
    if name == "attn.qkv_proj":
        d, h, kv = spec.head_dim, spec.num_heads, spec.num_kv_heads
        kv_heads = np.unique(heads // (h // kv))
        q = (heads[:, None] * d + np.arange(d)).ravel()
        kvr = (kv_heads[:, None] * d + np.arange(d)).ravel()
        rows = np.concatenate([q, h * d + kvr, (h + kv) * d + kvr])
    elif name == "attn.o_proj":
        d = spec.v_head_dim if spec.attention == "mla" else spec.head_dim
        cols = (heads[:, None] * d + np.arange(d)).ravel()
    elif name in ("mla.q_proj", "mla.q_b_proj"):
        d = spec.qk_nope_head_dim + spec.qk_rope_head_dim
        rows = (heads[:, None] * d + np.arange(d)).ravel()
    elif name in ("ffn.gate_up", "moe.shared_gate_up", "moe.gate_up"):
        f = n // 2
        part = _split(f, tp, t)
        rows = np.concatenate([part, f + part])
    elif name in ("ffn.down", "moe.shared_down", "moe.down"):
        cols = _split(k, tp, t)
    elif name == "lm_head":
        per = -(-n // tp)
        rows = np.arange(min(n, t * per), min(n, (t + 1) * per))
    return rows, cols


SHARD_CASES = [
    ("tiny", 2, 1),
    ("tiny-moe", 2, 1),
    ("tiny-moe", 1, 2),
    ("tiny-moe", 2, 2),
    ("tiny-moe", 4, 1),  # fewer KV heads (2) than ranks: each rank keeps the one it reads
    ("tiny-mla", 2, 1),
    ("tiny-mla", 1, 2),
]


@pytest.mark.parametrize("model, tp, ep", SHARD_CASES)
def test_rank_weights_and_caches_are_slices_of_the_one_device_model(model, tp, ep):
    rng = np.random.default_rng()
    seed = int(rng.integers(2**31))
    precision = str(rng.choice(["bf16", "w8a16", "w4a16", "nvfp4-w4a16"]))
    spec = load_spec(model)
    batch = 2 * ep
    one = build_plan(spec, Point(spec.name, batch, 24, parse_precision(precision)))
    for rank in range(tp * ep):
        pos = layout(rank, tp, ep)
        cut = Cut(spec, pos)
        for layer in [EMBED_LAYER, *range(spec.num_layers)]:
            full = layer_weights(one, layer, seed)
            mine = rank_layer_weights(one, layer, seed, cut)
            assert sorted(mine) == sorted(full), (model, layer)
            for name, value in full.items():
                where = f"{model} {precision} seed={seed} rank={rank} layer={layer} {name}"
                if isinstance(value, np.ndarray):  # norms: whole on every rank
                    assert np.array_equal(mine[name], value), where
                    continue
                many = isinstance(value, list)
                whole = value if many else [value]
                kept = whole
                if name in ("moe.gate_up", "moe.down"):
                    kept = whole[_split(spec.num_experts, ep, pos.ep_rank)[0] :][
                        : spec.num_experts // ep
                    ]
                elif name in ("mla.q_absorb", "mla.v_up"):
                    kept = [whole[h] for h in _split(spec.num_heads, tp, pos.tp_rank)]
                got = mine[name] if many else [mine[name]]
                assert len(got) == len(kept), where
                for w_full, w_mine in zip(kept, got):
                    rows, cols = _expected_index(spec, name, pos, w_full.shape)
                    if name in ("mla.q_absorb", "mla.v_up", "moe.router", "embed"):
                        rows, cols = np.arange(w_full.shape[0]), np.arange(w_full.shape[1])
                    want = dequantize(w_full)[np.ix_(rows, cols)]
                    assert np.array_equal(dequantize(w_mine), want), where
        for layer in range(spec.num_layers):
            full, mine = kv_cache(one, layer, seed), rank_kv_cache(one, layer, seed, cut)
            seqs = _split(batch, ep, pos.ep_rank)
            if spec.attention == "mla":
                want_k, want_v = full.k[seqs], full.v[seqs]
            else:
                heads = _split(spec.num_heads, tp, pos.tp_rank)
                kv = np.unique(heads // (spec.num_heads // spec.num_kv_heads))
                want_k, want_v = full.k[np.ix_(seqs, kv)], full.v[np.ix_(seqs, kv)]
            assert mine.scale == full.scale and mine.fmt == full.fmt
            assert np.array_equal(mine.k, want_k) and np.array_equal(mine.v, want_v)


def test_cuts_that_do_not_divide_are_refused():
    spec = load_spec("tiny")  # 4 heads, 2 KV heads
    with pytest.raises(ShardError, match="num_heads"):
        Cut(spec, layout(0, 3, 1)).heads()
    moe = load_spec("tiny-moe")  # 8 experts
    with pytest.raises(ShardError, match="num_experts"):
        Cut(moe, RankPos(tp=1, ep=3, tp_rank=0, ep_rank=0)).experts()


# ----------------------------------------------------------------------------- rank plan


def test_ep_rank_plan_splits_sequences_and_counts_the_all_to_all():
    spec = load_spec("tiny-moe")
    prec = parse_precision("bf16")
    batch, ep = 8, 2
    for rank in range(ep):
        point = Point(spec.name, batch, 64, prec, ep=ep, rank=rank)
        plan = rank_plan(spec, point)
        local = build_plan(spec, dataclasses.replace(point, batch=batch // ep))
        whole = build_plan(spec, point)
        by = {(op.layer, op.name): op for op in plan.ops}
        for op in local.ops:
            want = op
            if op.name in ("moe.gate_up", "moe.swiglu", "moe.down"):
                want = next(o for o in whole.ops if (o.layer, o.name) == (op.layer, op.name))
            assert by[(op.layer, op.name)] == want
        assert plan.kv_storage_bytes_per_layer == local.kv_storage_bytes_per_layer
        # Uniform routing over 8 experts, top-2: each pair leaves the rank with probability
        # 1/2; 4 sequences x 2 pairs x 1/2 x 256 BF16 values, and as many come back.
        a2a = [op for op in plan.ops if op.kind == "alltoall"]
        assert len(a2a) == 2 * spec.num_layers
        assert all(op.comm_bytes == 4 * 2 * 0.5 * 256 * 2 for op in a2a)


def test_ep_all_to_all_bytes_match_sampled_routing():
    """Skewed (zipf) routing: the plan's expected pairs sent and returned match a count
    over many sampled routings."""
    spec = load_spec("tiny-moe")
    batch, ep = 4, 2
    pi = inclusion_probabilities("zipf:1.2", spec.num_experts, spec.experts_per_token)
    rng = np.random.default_rng()
    draws = [sample_assignments(rng, pi, batch) for _ in range(20000)]
    row_bytes = spec.hidden_size * 2
    for rank in range(ep):
        point = Point(spec.name, batch, 32, parse_precision("bf16"), ep=ep, rank=rank,
                      routing="zipf:1.2")  # fmt: skip
        ops = [op for op in rank_plan(spec, point).ops if op.kind == "alltoall" and op.layer == 0]
        dispatch, combine = (op.comm_bytes / row_bytes for op in ops)
        mine = range(rank * 4, rank * 4 + 4)
        local = slice(rank * 2, rank * 2 + 2)
        sent = np.mean([np.isin(a[local], mine, invert=True).sum() for a in draws])
        other = slice((1 - rank) * 2, (1 - rank) * 2 + 2)
        returned = np.mean([np.isin(a[other], mine).sum() for a in draws])
        assert dispatch == pytest.approx(sent, rel=0.03)
        assert combine == pytest.approx(returned, rel=0.03)


def test_token_shares_add_up_to_the_batch():
    for tp, ep, batch in [(1, 1, 3), (2, 1, 3), (1, 4, 8), (2, 2, 6), (8, 1, 1)]:
        assert sum(token_share(batch, tp, ep) for _ in range(tp * ep)) == pytest.approx(batch)


# ----------------------------------------------------------------------------- cluster sums


def _figures(rng, tokens_s: float) -> dict:
    e = float(rng.uniform(1, 500))
    w = float(rng.uniform(0.5, 2))
    idle = float(rng.uniform(0, 50))
    return {
        "energy_j": e,
        "energy_uncertainty_j": float(rng.uniform(0, 5)),
        "avg_power_w": e / w,
        "avg_power_uncertainty_w": float(rng.uniform(0, 3)),
        "idle_power_w": idle,
        "idle_power_uncertainty_w": float(rng.uniform(0, 1)),
        "energy_above_idle_j": e - idle * w,
        "coverage": float(rng.uniform(0.9, 1)),
        "sources": ["src"],
    }


@settings(derandomize=True, deadline=None, max_examples=60)
@given(
    n=st.integers(2, 6),
    seed=st.integers(0, 2**31),
    device_per_rank=st.booleans(),
    drop=st.booleans(),
)
def test_cluster_energy_is_the_sum_over_the_ranks_that_own_a_boundary(
    n, seed, device_per_rank, drop
):
    rng = np.random.default_rng(seed)
    leaders = [r % 2 == 0 for r in range(n)]  # two ranks per node
    throughput = float(rng.uniform(10, 1e4))
    blocks = []
    for r in range(n):
        by = {"gpu-board": _figures(rng, throughput)}
        if leaders[r]:
            by["node"] = _figures(rng, throughput)
        blocks.append({"by_boundary": by, "flags": [], "reason": None})
    if drop:  # one owner of the node boundary lost its meter
        del blocks[0]["by_boundary"]["node"]
        blocks[0]["reason"] = "meter log unreadable"
    e = merge_energy(blocks, leaders, device_per_rank, throughput, 1.0)
    gpu_owners = range(n) if device_per_rank else [r for r in range(n) if leaders[r]]
    gpu = [blocks[r]["by_boundary"]["gpu-board"] for r in gpu_owners]
    g = e["by_boundary"]["gpu-board"]
    assert g["energy_j"] == pytest.approx(sum(f["energy_j"] for f in gpu), rel=1e-12)
    assert g["avg_power_w"] == pytest.approx(sum(f["avg_power_w"] for f in gpu), rel=1e-12)
    u = math.sqrt(sum(f["energy_uncertainty_j"] ** 2 for f in gpu))
    assert g["energy_uncertainty_j"] == pytest.approx(u, rel=1e-12)
    assert g["tokens_per_joule"] == pytest.approx(throughput / g["avg_power_w"], rel=1e-12)
    assert g["ranks"] == list(gpu_owners)
    # The primary boundary is the GPUs'; the node's total exists only with every meter.
    assert e["boundary"] == "gpu-board" and e["energy_j"] == g["energy_j"]
    if drop:
        assert "node" not in e["by_boundary"]
        # Another node's meter saw its part: the missing part is named, never summed away.
        named = any("node" in r and "rank 0" in r for r in e["incomplete_boundaries"])
        assert named == any(leaders[1:])
    else:
        node = [blocks[r]["by_boundary"]["node"]["energy_j"] for r in range(n) if leaders[r]]
        assert e["by_boundary"]["node"]["energy_j"] == pytest.approx(sum(node), rel=1e-12)


def test_cluster_energy_is_null_with_the_ranks_reasons_when_nothing_was_measured():
    blocks = [{"by_boundary": {}, "reason": "no power source"}, {"reason": "not sampled here"}]
    e = merge_energy(blocks, [True, False], False, 100.0, 1.0)
    assert e["energy_j"] is None and e["tokens_per_joule"] is None and not e["valid"]
    assert "rank 0: no power source" in e["reason"] and "rank 1: not sampled" in e["reason"]


def test_point_status_names_the_ranks_whose_own_failure_ended_it():
    assert merge_status([("ok", None, False)] * 3) == ("ok", None)
    status, error = merge_status(
        [("failed", "stopped because rank 1: x", True), ("failed", "MemoryError", False)]
    )
    assert status == "failed" and error == "rank 1: MemoryError"
    unsupported = merge_status([("unsupported", "no fp4", False), ("failed", "peer", True)])
    assert unsupported == ("unsupported", "rank 0: no fp4")
    same = merge_status([("failed", "PlanError: x", False)] * 2 + [("ok", None, False)])
    assert same == ("failed", "ranks 0, 1: PlanError: x")


# ----------------------------------------------------------------------------- clocks


@settings(derandomize=True, deadline=None, max_examples=50)
@given(n=st.integers(1, 5), seed=st.integers(0, 2**31))
def test_skews_and_common_windows_on_rank0s_clock(n, seed):
    rng = np.random.default_rng(seed)
    offsets = [(0.0, 0.0)] + [(float(rng.integers(-(10**12), 10**12)), 100.0) for _ in range(n - 1)]
    # True times on rank 0's clock; rank r reads t + offset_r.
    exits = rng.integers(0, 10**6, size=(n, 3)) + 10**9
    starts = rng.integers(0, 1000, size=(n, 4)) + np.arange(4) * 10**7 + 10**9
    ends = starts + 10**6 + rng.integers(0, 1000, size=(n, 4))
    own = [np.rint(exits[r] + offsets[r][0]).astype(np.int64) for r in range(n)]
    skew = barrier_skew(own, offsets)
    assert skew["skews_ns"] == (exits.max(axis=0) - exits.min(axis=0)).tolist()
    s_own = [np.rint(starts[r] + offsets[r][0]).astype(np.int64) for r in range(n)]
    e_own = [np.rint(ends[r] + offsets[r][0]).astype(np.int64) for r in range(n)]
    c0, c1 = common_windows(s_own, e_own, offsets)
    assert c0.tolist() == starts.max(axis=0).tolist()
    assert c1.tolist() == ends.min(axis=0).tolist()


def test_windows_without_a_common_span_are_refused():
    with pytest.raises(ValueError, match="no span common"):
        common_windows([[0], [200]], [[100], [300]], [(0.0, 0.0), (0.0, 0.0)])


# ----------------------------------------------------------------------------- devices


def test_gpu_choice_by_local_rank_or_the_launchers_list():
    assert choose_gpu(3, 8, None, 8).visible == "3"
    assert choose_gpu(1, 2, "4,6", None).visible == "6"
    assert choose_gpu(5, 8, "GPU-abc", None).visible == "GPU-abc"  # Slurm's per-task GPU
    with pytest.raises(DeviceError, match="has no GPU"):
        choose_gpu(4, 8, None, 4)
    with pytest.raises(DeviceError, match="lists 2 GPUs"):
        choose_gpu(0, 4, "0,1", None)


def test_cpu_ranks_share_the_cores():
    assert cpu_threads(2, cores=16, allowed=16) == 8
    assert cpu_threads(3, cores=2, allowed=2) == 1
    assert cpu_threads(4, cores=64, allowed=4) == 4  # the launcher bound it to 4 cores


# ----------------------------------------------------------------------------- one process


def test_launchers_are_recognised_from_their_environment():
    assert launch_size({}) is None
    assert launch_size({"OMPI_COMM_WORLD_SIZE": "4"}) == (4, "OMPI_COMM_WORLD_SIZE")
    assert launch_size({"PMI_SIZE": "2"}) == (2, "PMI_SIZE")
    assert launch_size({"SLURM_STEP_NUM_TASKS": "8"}) == (8, "SLURM_STEP_NUM_TASKS")


def test_a_single_process_never_imports_mpi(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if "OMPI" not in k}
    for var in ("PMI_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        env.pop(var, None)
    code = (
        "import sys, engine.sweep, engine.dist as d\n"
        "c = d.connect()\n"
        "print(type(c).__name__, c.size, 'mpi4py' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["SingleComm", "1", "False"], out.stderr


def test_single_comm_collectives_return_their_input():
    comm = SingleComm()
    x = np.arange(4, dtype=np.float32)
    comm.allreduce_sum(x)
    assert x.tolist() == [0, 1, 2, 3]
    assert comm.gather("a") == ["a"] and comm.allgather(1) == [1] and comm.bcast(2) == 2
    assert [c.tolist() for c in comm.alltoallv([x])] == [[0, 1, 2, 3]]
    assert comm.clock_offsets_ns() == [(0.0, 0.0)]


def test_sweep_asks_for_a_launcher_when_tp_needs_ranks(capsys):
    from engine.sweep import main

    assert main(["--model", "tiny", "--backend", "cpu", "--tp", "2"]) == 2
    assert "mpirun -n 2" in capsys.readouterr().err


def test_sweep_refuses_a_batch_that_does_not_split_over_ep(capsys):
    from engine.sweep import main

    assert main(["--model", "tiny-moe", "--backend", "cpu", "--ep", "2", "--batch", "2,3"]) == 2
    assert "--batch 3 does not divide over --ep 2" in capsys.readouterr().err


def test_unfinished_point_of_a_killed_run_is_recorded_failed_once(tmp_path):
    store = ResultStore(tmp_path)
    point = Point("tiny", 2, 32, parse_precision("bf16"), tp=2)
    key = cluster_key("cpu", point)
    assert "|rank=all|" in key
    marker = {"key": key, "point": point.to_dict(), "backend": "cpu", "started_unix_s": 0}
    (tmp_path / INFLIGHT).write_text(json.dumps(marker))
    recover_inflight(store, lambda msg: None)
    [record] = store.read()
    assert record["key"] == key and record["status"] == "failed"
    assert "without recording it" in record["error"]
    assert not (tmp_path / INFLIGHT).exists()
    recover_inflight(store, lambda msg: None)
    assert len(store.read()) == 1


# ----------------------------------------------------------------------------- cuda layout


def test_cuda_layout_all_reduces_follow_the_attention_and_ffn_outputs():
    from engine.backends.base import UnsupportedPoint
    from engine.backends.cuda_layout import AllReduce, DeviceCaps, LtGemm, build_layout

    caps = DeviceCaps(cc=(9, 0), sm_count=132, l2_bytes=50 << 20)
    for model in ("tiny", "tiny-moe", "tiny-mla"):
        spec = load_spec(model)
        point = Point(spec.name, 2, 32, parse_precision("bf16"), tp=2)
        plan = build_plan(spec, point)
        layers = list(range(spec.num_layers))
        steps = build_layout(plan, layers, 0, caps).programs[0]
        found = [(i, s) for i, s in enumerate(steps) if isinstance(s, AllReduce)]
        assert [s.op for _, s in found] == ["attn_allreduce", "ffn_allreduce"] * len(layers)
        for i, reduce in found:
            prev = steps[i - 1]
            assert reduce.count == 2 * spec.hidden_size and reduce.layer == prev.layer
            written = prev.y if isinstance(prev, LtGemm) else prev.args
            assert reduce.buf == written or reduce.buf in written, (model, prev.op)
        one = build_layout(build_plan(spec, dataclasses.replace(point, tp=1)), layers, 0, caps)
        assert not any(isinstance(s, AllReduce) for s in one.programs[0])
    fp8 = Point("tiny", 2, 32, parse_precision("fp8"), tp=2)
    with pytest.raises(UnsupportedPoint, match="activation scales"):
        build_layout(build_plan(load_spec("tiny"), fp8), [0, 1], 0, caps)


class _ScaleComm:
    """A stand-in group whose 'sum over ranks' multiplies by ``ranks`` (identical peers)."""

    def __init__(self, ranks: int) -> None:
        self.ranks, self.sizes = ranks, []

    def allreduce_sum(self, array: np.ndarray) -> None:
        self.sizes.append(array.size)
        array *= self.ranks


def test_cuda_emulator_sums_the_all_reduced_buffers_into_the_step():
    from engine.backends.cuda_emulate import Emulator
    from engine.backends.cuda_layout import DeviceCaps, build_layout

    spec = load_spec("tiny")
    plan = build_plan(spec, Point(spec.name, 2, 32, parse_precision("bf16"), tp=2))
    layout = build_layout(plan, [0, 1], 0, DeviceCaps(cc=(9, 0), sm_count=132, l2_bytes=1 << 25))
    tokens = np.random.default_rng().integers(0, spec.vocab_size, size=2)
    outs = []
    for ranks in (1, 2):
        comm = _ScaleComm(ranks)
        outs.append(Emulator(layout, 0, comm=comm).forward(tokens, None))
        assert comm.sizes == [2 * spec.hidden_size] * 4  # attention and FFN, two layers
    assert np.all(np.isfinite(outs[1])) and not np.allclose(outs[0], outs[1])
