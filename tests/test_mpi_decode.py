"""Tensor- and expert-parallel decode on 2 and 4 MPI ranks equals the one-device step.

``mpirun -n 2`` (and ``-n 4``) runs this file as a program: for each case, both ranks build their shard of
the same model (same seed, fresh each run) and run one decode step with a real MPI
all-reduce (TP) or all-to-all (EP); rank 0 assembles the ranks' logits (TP: vocabulary
parts; EP: sequences) and compares them with the one-device CPU step of the same point.
"""

from __future__ import annotations

import json
import sys

import pytest
from mpi_launch import needs_mpi, run_ranks

# (model, precision, tp, ep, batch, tolerance on the relative error of the logits). Each
# rank sums in another order than one device, so float32 rounding differs slightly; FP8
# activations are left out of TP: each rank scales its own shard (as deployed), which
# changes the rounding by design.
CASES = [
    ("tiny", "bf16", 2, 1, 2, 1e-4),
    ("tiny", "w4a16", 2, 1, 3, 1e-4),
    ("tiny-moe", "nvfp4-w4a16", 2, 1, 2, 1e-4),
    ("tiny-mla", "w8a16", 2, 1, 2, 1e-4),
    ("tiny-moe", "bf16", 1, 2, 4, 1e-4),
    ("tiny-moe", "fp8", 1, 2, 2, 1e-4),
    ("tiny-mla", "bf16", 1, 2, 4, 1e-4),
]
# On 4 ranks: both kinds at once (sub-communicators per TP and EP group), and more TP ranks
# than KV heads (each keeps the one its query heads read).
CASES_4 = [
    ("tiny-moe", "bf16", 2, 2, 4, 1e-4),
    ("tiny-mla", "w4a16", 2, 2, 2, 1e-4),
    ("tiny-moe", "w8a16", 4, 1, 2, 1e-4),
]


@needs_mpi
@pytest.mark.parametrize("ranks, cases", [(2, CASES), (4, CASES_4)])
def test_tp_and_ep_decode_equal_one_device(ranks, cases):
    done = run_ranks(ranks, [__file__], timeout_s=120)
    assert done.returncode == 0, done.stderr[-4000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(cases), done.stdout + done.stderr[-2000:]
    for r, case in zip(results, cases):
        assert r["case"] == list(case[:5])
        assert r["covered"], f"{case}: some logits came from no rank"
        assert r["err"] < case[5], f"{case} seed={r['seed']}: relative error {r['err']:.2e}"


def _program() -> int:
    import dataclasses

    import numpy as np

    from engine.backends.cpu import CpuRunner
    from engine.dist import Groups, connect, layout
    from engine.dist.rank_plan import rank_plan
    from engine.dist.shard import Cut
    from engine.models import load_spec
    from engine.plan import build_plan
    from engine.point import Point
    from engine.precision import parse_precision
    from engine.routing import inclusion_probabilities, sample_assignments

    comm = connect(timeout_s=60)
    for model, precision, tp, ep, batch, _tol in CASES if comm.size == 2 else CASES_4:
        seed = comm.bcast(int(np.random.default_rng().integers(2**31)))
        spec = load_spec(model)
        point = Point(
            model=spec.name,
            batch=batch,
            context=int(np.random.default_rng(seed).integers(8, 40)),
            precision=parse_precision(precision),
            tp=tp,
            ep=ep,
            rank=comm.rank,
        )
        layers = list(range(spec.num_layers))
        groups = Groups.make(comm.for_point(), tp, ep)
        runner = CpuRunner(rank_plan(spec, point), layers, seed, groups=groups)
        rng = np.random.default_rng(seed + 1)
        tokens = rng.integers(0, spec.vocab_size, size=batch)
        routed = None
        if spec.num_experts:
            pi = inclusion_probabilities("uniform", spec.num_experts, spec.experts_per_token)
            routed = {i: sample_assignments(rng, pi, batch) for i in layers if spec.is_moe_layer(i)}
        cut = Cut(spec, layout(comm.rank, tp, ep))
        rows = cut.sequences(batch)
        mine = None if routed is None else {i: a[rows] for i, a in routed.items()}
        logits = runner.forward(tokens[rows], mine)
        parts = comm.gather((rows.start, rows.stop, cut.vocab(), logits))
        if comm.is_root:
            one = build_plan(spec, dataclasses.replace(point, tp=1, ep=1, rank=0))
            want = CpuRunner(one, layers, seed).forward(tokens, routed)
            got = np.full_like(want, np.nan)
            for r0, r1, (v0, v1), part in parts:
                got[r0:r1, v0:v1] = part
            result = {
                "case": [model, precision, tp, ep, batch],
                "seed": seed,
                "covered": bool(np.all(np.isfinite(got))),
                "err": float(np.linalg.norm(np.nan_to_num(got) - want) / np.linalg.norm(want)),
            }
            print(json.dumps(result), flush=True)
        groups.free()
    return 0


if __name__ == "__main__":
    sys.exit(_program())
