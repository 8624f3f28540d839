"""The CUDA executor's pure-Python parts, without a device.

The step layout (allocation plan, launch program, routing tables, stamps) is executed by the
NumPy emulator of every kernel's contract and compared with the float64 reference; the GEMM
dispatch, cuBLASLt layouts and algorithm cache, the fatbin-or-NVRTC decision and the argument
packing are checked directly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.backends import cuda_abi as abi
from engine.backends import cuda_gemm as cg
from engine.backends.base import BackendUnavailable, UnsupportedPoint
from engine.backends.cuda_blaslt import (
    CUDA_R_8F_E4M3,
    CUDA_R_16BF,
    CUDA_R_32F,
    SCALE_VEC16_UE4M3,
    SCALE_VEC32_UE8M0,
    AlgoCache,
    layouts,
    scale_mode,
)
from engine.backends.cuda_emulate import Emulator
from engine.backends.cuda_kernels import arch_runs_on, load_decision, pack_args, sources_digest
from engine.backends.cuda_layout import (
    ALIGN,
    DeviceCaps,
    Launch,
    LtGemm,
    Ref,
    attention_splits,
    build_layout,
    rotation_copies,
    slot_tables,
    step_variants,
    tile_table,
    windows_from_stamps,
)
from engine.models import load_spec
from engine.plan import build_plan
from engine.point import Point
from engine.precision import parse_precision
from engine.reference import ReferenceStep
from engine.weights import EMBED_LAYER, kv_cache, layer_class, layer_weights

H100 = DeviceCaps(cc=(9, 0), sm_count=132, l2_bytes=50 << 20)
B200 = DeviceCaps(cc=(10, 0), sm_count=148, l2_bytes=126 << 20)
A100 = DeviceCaps(cc=(8, 0), sm_count=108, l2_bytes=40 << 20)


def _plan(model: str, precision: str, batch: int = 3, context: int = 40):
    spec = load_spec(model)
    point = Point(
        model=spec.name, batch=batch, context=context, precision=parse_precision(precision)
    )
    return spec, build_plan(spec, point)


def _seed() -> int:
    return int(np.random.default_rng().integers(2**31))


# ----------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize(
    "weight, act, grouped, rows, cc, path, container",
    [
        ("bf16", "bf16", False, 1, (9, 0), "lt", abi.ACT_BF16),
        ("bf16", "fp8_e4m3", False, 64, (9, 0), "lt", abi.ACT_E4M3_IN_BF16),
        ("fp8_e4m3", "fp8_e4m3", False, 1, (9, 0), "lt", abi.ACT_E4M3),
        ("fp8_e5m2", "fp8_e5m2", False, 1, (9, 0), "gemv", abi.ACT_E5M2_IN_BF16),
        ("fp8_e4m3", "bf16", False, 1, (8, 0), "gemv", abi.ACT_BF16),
        ("mxfp4", "bf16", False, 4, (9, 0), "gemv", abi.ACT_BF16),
        ("mxfp4", "bf16", False, 5, (9, 0), "wq", abi.ACT_BF16),
        ("nvfp4", "bf16", True, 64, (9, 0), "wq", abi.ACT_BF16),
        ("bf16", "bf16", True, 2, (9, 0), "gemv", abi.ACT_BF16),
        ("nvfp4", "nvfp4", False, 8, (10, 0), "lt", cg.NATIVE_FP4),
        ("nvfp4", "nvfp4", True, 8, (10, 0), "wq", abi.ACT_NVFP4_IN_BF16),
        ("mxfp4", "fp8_e4m3", False, 1, (9, 0), "gemv", abi.ACT_E4M3_IN_BF16),
    ],
)
def test_gemm_dispatch(weight, act, grouped, rows, cc, path, container):
    choice = cg.choose_gemm(weight, act, grouped=grouped, rows=rows, cc=cc)
    assert (choice.path, choice.container) == (path, container)
    if path in ("gemv", "wq"):
        assert choice.kernel in abi.SIGNATURES
        assert choice.rows >= rows or path == "wq"


@pytest.mark.parametrize(
    "weight, act, cc, word",
    [("fp8_e4m3", "fp8_e4m3", (8, 0), "sm_89"), ("nvfp4", "nvfp4", (9, 0), "sm_100")],
)
def test_device_limits_are_one_line_unsupported_points(weight, act, cc, word):
    with pytest.raises(UnsupportedPoint) as info:
        cg.choose_gemm(weight, act, grouped=False, rows=1, cc=cc)
    assert word in str(info.value) and "\n" not in str(info.value)
    # Weight-only FP4 and FP8 run everywhere through our kernels.
    assert cg.unsupported_reason(weight, "bf16", cc) is None


def test_fp8_point_on_sm80_is_unsupported_by_the_layout():
    _, plan = _plan("tiny", "fp8")
    with pytest.raises(UnsupportedPoint, match="sm_89"):
        build_layout(plan, [0, 1], 1, A100)


# ----------------------------------------------------------------------------- allocation


@pytest.mark.parametrize("model", ["tiny", "tiny-moe", "tiny-mla"])
@pytest.mark.parametrize("precision", ["bf16", "fp8", "nvfp4-w4a16"])
def test_allocation_plan(model, precision):
    spec, plan = _plan(model, precision, batch=5)
    layers = list(range(spec.num_layers))
    layout = build_layout(plan, layers, 1, H100)
    spans = sorted((layout.offsets[n], r.nbytes, n) for n, r in layout.regions.items())
    for (lo, size, name), (nxt, _, _) in zip(spans, spans[1:] + [(layout.total_bytes, 0, "")]):
        assert lo % ALIGN == 0 and lo + size <= nxt, f"{name} overlaps the next region"
    # Every pointer of every launch lands inside its region.
    for prog in layout.programs:
        for st in prog:
            refs = (
                [a for a in st.args if isinstance(a, Ref)]
                if isinstance(st, Launch)
                else [r for r in (st.w, st.x, st.y, st.w_scales, st.x_scales) if r is not None]
            )
            for ref in refs:
                assert ref.region in layout.regions, f"{st.op}: no region {ref.region}"
                assert 0 <= ref.offset < layout.regions[ref.region].nbytes
            if isinstance(st, Launch):
                assert st.grid[1] < 65536 and st.grid[2] < 65536 and st.block <= 1024
    # The device holds exactly the plan's packed weight bytes (norm vectors are float32 here).
    held = sum(
        r.nbytes
        for r in layout.regions.values()
        if r.source[0] == "weight" and r.source[4] in ("data", "scale", "wscale")
    )
    want = sum(op.weight_storage_bytes for op in plan.ops if op.kind != "norm")
    assert held == want
    for layer in layers:
        kv = layout.regions[f"kv/L{layer}/k"].nbytes + layout.regions[f"kv/L{layer}/v"].nbytes
        assert kv == plan.kv_storage_bytes_per_layer[layer]


def test_rotation_copies_cycle_distinct_weights_past_the_l2():
    assert rotation_copies(10 << 30, 50 << 20, 80 << 30) == 1
    assert rotation_copies(10 << 20, 50 << 20, 1 << 30) == 8  # capped
    assert rotation_copies(30 << 20, 50 << 20, 1 << 30) == 7  # 4 x L2 / step bytes
    assert rotation_copies(30 << 20, 50 << 20, 40 << 20) == 2  # what memory allows
    spec, plan = _plan("tiny", "bf16")
    layout = build_layout(plan, [0, 1], 1, H100, copies=3)
    weights = [
        {r.name for r in layout.regions.values() if r.source[0] == "weight" and r.source[1] == c}
        for c in range(3)
    ]
    assert all(w for w in weights) and not (weights[0] & weights[1])
    kv_refs = {
        a.region for st in layout.programs[2] if isinstance(st, Launch) for a in st.args
        if isinstance(a, Ref) and a.region.startswith("kv/")
    }  # fmt: skip
    assert kv_refs == {f"kv/L{layer}/{x}" for layer in (0, 1) for x in "kv"}


@pytest.mark.parametrize("items, span", [(1, 40), (8, 8192), (264, 8192), (4, 100000), (2, 64)])
def test_attention_splits_cover_the_span(items, span):
    splits, chunk = attention_splits(items, span, 132)
    assert 1 <= splits <= 256 and splits * chunk >= span > (splits - 1) * chunk
    assert chunk >= min(span, 64)


# ----------------------------------------------------------------------------- routing tables


def test_slot_and_tile_tables():
    rng = np.random.default_rng()
    batch, k, experts = int(rng.integers(1, 40)), 3, 16
    assigned = np.stack([rng.choice(experts, k, replace=False) for _ in range(batch)])
    x_rows, slot_of, ex, starts = slot_tables(assigned)
    flat = assigned.reshape(-1)
    assert np.array_equal(x_rows[slot_of], np.repeat(np.arange(batch), k))
    sorted_experts = flat[np.argsort(flat, kind="stable")]
    assert np.array_equal(np.sort(flat), sorted_experts)
    assert np.array_equal(ex, np.unique(flat))
    cap = 8
    rows = ex.size + -(-flat.size // cap)
    tiles = tile_table(ex, starts, flat.size, cap, rows)
    used = tiles[tiles[:, 2] > 0]
    assert (used[:, 2] <= cap).all() and used[:, 2].sum() == flat.size
    covered = np.concatenate([np.arange(f, f + c) for _, f, c in used])
    assert np.array_equal(np.sort(covered), np.arange(flat.size))
    assert all(sorted_experts[f] == e and sorted_experts[f + c - 1] == e for e, f, c in used)


# ----------------------------------------------------------------------------- the step


def _reference(plan, layers, seed, tokens, assigned):
    head = layer_weights(plan, EMBED_LAYER, seed)
    weights = {layer: layer_weights(plan, layer, seed) for layer in layers}
    caches = {layer: kv_cache(plan, layer, seed) for layer in layers}
    return ReferenceStep(plan.spec, plan.point, head, weights, caches).forward(tokens, assigned)


# (model, precision, batch, device): every GEMM engine (cuBLASLt BF16/FP8/FP4, GEMV, tensor-core
# kernel), every KV format, GQA with sliding windows, MLA, MoE with shared experts.
STEP_CASES = [
    ("tiny", "bf16", 1, H100, 2e-2),
    ("tiny", "w4a16", 12, H100, 2e-2),
    ("tiny", "fp8", 3, H100, 8e-2),
    ("tiny", "fp4", 6, B200, 8e-2),
    ("tiny-moe", "bf16", 3, H100, 2e-2),
    ("tiny-moe", "nvfp4-w4a16", 40, H100, 2e-2),
    ("tiny-moe", "w=fp8_e5m2,a=bf16,kv=fp8_e5m2", 2, H100, 2e-2),
    ("tiny-moe", "fp8", 4, H100, 8e-2),
    ("tiny-mla", "w8a16", 3, H100, 2e-2),
    ("tiny-mla", "w4a16", 20, H100, 2e-2),
    ("tiny-mla", "fp8", 2, H100, 8e-2),
]


@pytest.mark.parametrize("model, precision, batch, caps, tol", STEP_CASES)
def test_emulated_step_matches_float64_reference(model, precision, batch, caps, tol):
    spec, plan = _plan(model, precision, batch=batch)
    layers = list(range(spec.num_layers))
    seed = _seed()
    layout = build_layout(plan, layers, seed, caps)
    emu = Emulator(layout, seed)  # scratch poisoned with NaN
    tokens, assignments = step_variants(plan, layers, seed)
    assigned = assignments[0] if assignments else None
    got = emu.forward(tokens[0], assigned)
    want = _reference(plan, layers, seed, tokens[0], assigned)
    assert np.isfinite(got).all(), "a logit was never written"
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < tol, f"{model} {precision} B={batch} seed={seed}: relative error {err:.2e}"


def test_steps_cycle_variants_and_stamp_every_layer():
    spec, plan = _plan("tiny-moe", "bf16", batch=2)
    layers = [0, 2]
    layout = build_layout(plan, layers, 5, H100)
    emu = Emulator(layout, 5)
    logits = []
    for _ in range(3):
        emu.step()
        logits.append(emu.arena.view(emu.ptr(Ref(layout.logits)), np.float32, 2 * 512).copy())
    assert not np.array_equal(logits[0], logits[1])  # a new token/routing draw each step
    stamps = emu.stamps(3)
    assert stamps.shape == (3, len(layers) + 3)
    assert (np.diff(stamps, axis=1) >= 0).all() and (stamps > 0).all()
    start, end, class_ns, other = windows_from_stamps(stamps, layout)
    assert np.array_equal(start, stamps[:, 0]) and np.array_equal(end, stamps[:, -1])
    assert set(class_ns) == {"/".join(layer_class(plan, layer)) for layer in layers}
    total = sum(class_ns.values()) + other
    assert np.array_equal(total, end - start) and (other >= 0).all()


def test_same_class_layers_launch_the_same_kernels():
    spec, plan = _plan("tiny-moe", "w4a16", batch=4)
    layout = build_layout(plan, [0, 1, 2], 1, H100)
    per_layer: dict[int, list[str]] = {}
    stamping = []
    for st in layout.programs[0]:
        name = st.kernel if isinstance(st, Launch) else f"lt_{st.kind}"
        per_layer.setdefault(st.layer, []).append(name)
        if isinstance(st, Launch) and st.kernel == "tpj_add_rmsnorm" and st.args[-1].value >= 0:
            stamping.append(st.args[-1].value)
    assert per_layer[0] == per_layer[2]  # both sliding-window MoE layers
    assert stamping == [1, 2, 3, 4]  # each layer's start, then the final norm


# ----------------------------------------------------------------------------- cuBLASLt


def _lt(kind, m, n, k, w_fmt="bf16", x_fmt="bf16"):
    return LtGemm(
        kind, m, n, k, w_fmt, x_fmt, Ref("w"), Ref("x"), Ref("y"), 1.0, None, None, "op", 0
    )


def test_cublaslt_layouts_are_tn_with_float32_output():
    lay = layouts(_lt("fp8", 3, 4096, 1024, "fp8_e4m3", "fp8_e4m3"))
    assert (lay["a"].dtype, lay["a"].rows, lay["a"].cols, lay["a"].ld) == (
        CUDA_R_8F_E4M3,
        1024,
        4096,
        1024,
    )
    assert (lay["b"].rows, lay["b"].cols, lay["b"].ld) == (1024, 3, 1024)
    assert (lay["d"].dtype, lay["d"].rows, lay["d"].cols, lay["d"].ld) == (
        CUDA_R_32F,
        4096,
        3,
        4096,
    )
    assert layouts(_lt("bf16", 1, 8, 16))["a"].dtype == CUDA_R_16BF
    assert scale_mode(_lt("fp4", 1, 8, 64, "nvfp4", "nvfp4")) == SCALE_VEC16_UE4M3
    assert scale_mode(_lt("fp4", 1, 8, 64, "mxfp4", "mxfp4")) == SCALE_VEC32_UE8M0
    assert scale_mode(_lt("fp8", 1, 8, 64, "fp8_e4m3", "fp8_e4m3")) is None


def test_algorithm_cache_queries_once_per_shape():
    calls = []

    def query(g):
        calls.append(g.key())
        return object(), 1000 * g.m

    cache = AlgoCache(query)
    a1 = cache.get(_lt("bf16", 1, 4096, 4096))
    assert cache.get(_lt("bf16", 1, 4096, 4096)) is a1
    cache.get(_lt("bf16", 8, 4096, 4096))
    cache.get(_lt("fp8", 8, 4096, 4096, "fp8_e4m3", "fp8_e4m3"))
    assert cache.queries == len(calls) == 3 and cache.workspace_bytes == 8000


def test_layout_gemm_keys_share_algorithms_across_layers():
    spec, plan = _plan("tiny", "bf16", batch=2)
    layout = build_layout(plan, [0, 1], 1, H100)
    keys = [st.key() for st in layout.programs[0] if isinstance(st, LtGemm)]
    shapes = {(op.n, op.k) for op in plan.ops if op.kind == "gemm"}
    assert len(keys) == 9 and len(set(keys)) == len(shapes) == 4  # the LM head is qkv's shape


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize(
    "arch, cc, runs",
    [
        ("80", (8, 0), True),
        ("80", (8, 6), True),
        ("89", (8, 6), False),
        ("90a", (9, 0), True),
        ("90a", (10, 0), False),
        ("100a", (10, 3), False),
        ("120", (12, 1), True),
        ("80", (9, 0), False),
    ],
)
def test_binary_compatibility_rules(arch, cc, runs):
    assert arch_runs_on(arch, cc) is runs


def test_fatbin_or_nvrtc_decision(tmp_path):
    fat = tmp_path / "fat"
    assert load_decision((9, 0), fat).mode == "nvrtc"
    fat.mkdir()
    sources = abi.sources()
    for s in sources:
        (fat / f"{s}.fatbin").write_bytes(b"\x7fELF")
    manifest = {"archs": ["80", "89", "90a", "100a", "120"], "sources": sources}
    (fat / "manifest.json").write_text(json.dumps({**manifest, "digest": sources_digest()}))
    assert load_decision((9, 0), fat).mode == "fatbin"
    assert load_decision((8, 6), fat).mode == "fatbin"
    d = load_decision((10, 3), fat)
    assert d.mode == "nvrtc" and "sm_103" in d.reason
    (fat / "manifest.json").write_text(json.dumps({**manifest, "digest": "stale"}))
    assert "changed" in load_decision((9, 0), fat).reason
    (fat / "gemv.fatbin").unlink()
    (fat / "manifest.json").write_text(json.dumps({**manifest, "digest": sources_digest()}))
    assert "gemv" in load_decision((9, 0), fat).reason


def test_arguments_are_packed_by_the_abi():
    args = pack_args("tpj_attn_merge", [1 << 40, 8, 3, 128, 0])
    assert [type(a) for a in args] == [np.uint64, np.uint64, np.int32, np.int32, np.uint64]
    with pytest.raises(ValueError):
        pack_args("tpj_attn_merge", [1, 2])


def test_backend_without_a_device_is_unavailable():
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() > 0:
            pytest.skip("a CUDA device is present")
    except Exception:
        pass
    from engine.backends.cuda import CudaBackend

    with pytest.raises(BackendUnavailable):
        CudaBackend()


def test_gpu_check_cases_run_through_their_contracts():
    """The self-test's cases are well formed: each contract writes every output it checks."""
    from engine.backends.cuda_check import correctness_cases, output_bytes, prepare, reference

    seed = _seed()
    cases = correctness_cases(seed, cc=(10, 0))
    kernels = {c.kernel for c in cases if c.kernel}
    families = {k.split("_d")[0].split("_r")[0] if "decode" in k else k for k in kernels}
    assert {
        "tpj_add_rmsnorm",
        "tpj_attn_merge",
        "tpj_moe_combine",
        "tpj_quant_fp4_native",
    } <= families
    assert {abi.gemv_kernel(w, 4) for w in abi.W_SUFFIX} <= kernels
    for case in cases:
        arena, offsets = prepare(case, seed)
        reference(case, arena, offsets)
        for out in case.outs:
            raw = output_bytes(out, arena.mem, offsets)
            assert not (raw == 0xFF).all(), f"{case.name}: {out.buf} never written"
