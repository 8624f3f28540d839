"""The CUDA step as data: where every buffer lives and which launches make one decode step.

``build_layout`` turns a plan, the layers to run and the device's capabilities into a
:class:`Layout`: named regions of one device arena (weights in their packed formats, KV
caches, scratch, constant tables, the per-step variant tables and the stamp ring) and the
ordered launches of one decode step (our kernels by ABI name with typed arguments, and
cuBLASLt matmuls). Nothing here touches a device: the runner executes the launches on a GPU
inside a CUDA graph, and ``cuda_emulate`` executes the very same launches with NumPy on the
host, which is how the layout is tested without a GPU.

Step structure (one graph): ``tpj_step_begin`` (step counter, stamp 0) and
``tpj_select_variant`` (copies this step's token and routing tables into place), the embedding,
then per layer the fused residual add + RMSNorm that also stamps the layer's start, attention
and FFN, then the final norm (stamping the end of the last layer), the LM head and
``tpj_step_end``. A step's stamps are thus: begin, the start of every run layer, the start
of the final norm, and the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from engine.backends import cuda_abi as abi
from engine.backends import cuda_gemm as cg
from engine.backends.base import UnsupportedPoint
from engine.formats import random_qtensor
from engine.plan import Op, Plan
from engine.routing import inclusion_probabilities, sample_assignments
from engine.weights import EMBED_LAYER, layer_class

ALIGN = 256  # bytes: every region starts on a 256-byte boundary
RMS_EPS = 1e-5
ROPE_THETA = 10000.0
ASSIGNMENT_VARIANTS = 8  # as the CPU backend: distinct token/routing draws cycled by steps
STAMP_RING = 1024  # steps of stamps kept on the device between reads
ROW_BLOCK = 256  # threads of the row kernels
MIN_SPLIT_ROWS = 64  # KV positions a split-K attention block handles at least
MAX_SPLITS = 256
GEMV_ROWS_PER_BLOCK = 16


class LayoutError(ValueError):
    """A plan this backend cannot lay out (one-line message)."""


# ----------------------------------------------------------------------------- arguments


@dataclass(frozen=True)
class Ref:
    """A device pointer: ``offset`` bytes into region ``region``."""

    region: str
    offset: int = 0


@dataclass(frozen=True)
class I32:
    value: int


@dataclass(frozen=True)
class I64:
    value: int


@dataclass(frozen=True)
class F32:
    value: float


Arg = Ref | I32 | I64 | F32 | None


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ABI name, grid (x, y, z), threads per block, arguments in order."""

    kernel: str
    grid: tuple[int, int, int]
    block: int
    args: tuple[Arg, ...]
    op: str
    layer: int


@dataclass(frozen=True)
class LtGemm:
    """``y[m, n] = alpha * x[m, :k] . w[n, :k]`` through cuBLASLt (row-major x and y).

    ``kind``: ``bf16`` (x, w bf16), ``fp8`` (x in ``x_fmt`` codes, w in ``w_fmt`` codes) or
    ``fp4`` (packed ``w_fmt`` with interleaved block scales ``w_scales``/``x_scales``); y is
    float32. ``alpha`` folds the weight's per-tensor scale (FP8 scale or NVFP4 global scale).
    """

    kind: str
    m: int
    n: int
    k: int
    w_fmt: str
    x_fmt: str
    w: Ref
    x: Ref
    y: Ref
    alpha: float
    w_scales: Ref | None
    x_scales: Ref | None
    op: str
    layer: int

    def key(self) -> tuple:
        """What the algorithm heuristic depends on: one cached algorithm per key."""
        return (self.kind, self.m, self.n, self.k, self.w_fmt, self.x_fmt)


@dataclass(frozen=True)
class AllReduce:
    """An in-place float32 SUM all-reduce of ``count`` elements at ``buf`` over the
    tensor-parallel group (NCCL on the runner's stream; captured into the step's graph)."""

    buf: Ref
    count: int
    op: str
    layer: int


Step = Launch | LtGemm | AllReduce


# ----------------------------------------------------------------------------- regions


@dataclass(frozen=True)
class Region:
    """A named span of the arena. ``source`` says what fills it before the first step:

    ``("weight", copy, layer, op, part, index)`` with part ``data``/``scale``/``lt_scale``/
    ``wscale``/``norm`` and index the expert or head (-1: the whole op); ``("kv", layer,
    "k"|"v")``; ``("const", key)`` for a host array in ``Layout.consts``; ``("zero",)`` for
    scratch and tables that must start at zero; ``("none",)`` for scratch written before read.
    """

    name: str
    nbytes: int
    source: tuple = ("none",)


@dataclass(frozen=True)
class DeviceCaps:
    """What the layout needs to know of the device."""

    cc: tuple[int, int]
    sm_count: int
    l2_bytes: int


@dataclass
class VariantTables:
    """Offsets (bytes) of the per-step tables inside one variant blob."""

    tokens: int = 0
    moe: dict[int, dict[str, int]] = field(default_factory=dict)
    nbytes: int = 0


@dataclass
class Layout:
    """Regions (ordered; ``offsets`` into one arena) and the launches of each weight copy."""

    plan: Plan
    layers: list[int]
    regions: dict[str, Region]
    offsets: dict[str, int]
    total_bytes: int
    programs: list[list[Step]]
    consts: dict[str, np.ndarray]
    variants: VariantTables
    n_variants: int
    variant_blobs: np.ndarray  # (n_variants, nbytes) uint8
    stamps_per_step: int
    stamp_layer_slots: dict[int, int]
    logits: str
    notes: list[str]
    gemm_choices: dict[tuple[int, str], cg.GemmChoice]

    def ptr(self, ref: Ref) -> int:
        """Byte offset of a reference inside the arena."""
        return self.offsets[ref.region] + ref.offset


# ----------------------------------------------------------------------------- helpers


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def rope_table(dim: int, position: int, theta: float = ROPE_THETA) -> np.ndarray:
    """cos then sin of the rotate-half RoPE angles at one position, float32 (dim,)."""
    i = np.arange(dim // 2, dtype=np.float64)
    ang = float(position) * theta ** (-2.0 * i / dim)
    return np.concatenate([np.cos(ang), np.sin(ang)]).astype(np.float32)


def tensor_scale(fmt: str, std: float) -> float:
    """The per-tensor scale ``engine.formats.random_qtensor`` gives a tensor of ``fmt`` and
    ``std``: the FP8 scale or the NVFP4 global scale (it depends on the format and std only, not
    on the random bits); 1 for the other formats. The runner checks it against the weights."""
    q = random_qtensor(np.random.default_rng(0), (1, 32), fmt, std=std)
    if q.global_scale is not None:
        return float(q.global_scale)
    if fmt in cg.FP8:
        return float(np.asarray(q.scale).reshape(-1)[0])
    return 1.0


def attention_splits(items: int, span: int, sm_count: int) -> tuple[int, int]:
    """(splits, chunk) of split-K attention: enough blocks for two waves of the SMs.

    ``items`` blocks exist without splitting; each split covers ``chunk`` positions, at least
    ``MIN_SPLIT_ROWS`` (so short contexts are not split into slivers).
    """
    want = max(1, math.ceil(2 * sm_count / max(items, 1)))
    most = max(1, min(MAX_SPLITS, span // MIN_SPLIT_ROWS))
    splits = min(want, most)
    chunk = math.ceil(span / splits)
    return math.ceil(span / chunk), chunk


def gqa_group(heads: int, kv_heads: int) -> int:
    """Query heads per attention block: the heads sharing a KV head, at most 8."""
    g = heads // kv_heads
    for cand in (8, 4, 2, 1):
        if g % cand == 0 and cand <= g:
            return cand
    return 1


def slot_tables(assigned: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Routing of one MoE layer as tables: (x_rows, slot_of, experts, starts).

    Slots are the (token, choice) pairs sorted by expert (stable), as the CPU backend orders
    them: ``x_rows[s]`` is slot s's token, ``slot_of[b * k + j]`` the slot of token b's j-th
    choice; ``experts``/``starts`` the distinct experts and their first slots.
    """
    batch, top_k = assigned.shape
    flat = assigned.reshape(-1)
    order = np.argsort(flat, kind="stable")
    x_rows = (order // top_k).astype(np.int32)
    slot_of = np.empty(flat.size, dtype=np.int32)
    slot_of[order] = np.arange(flat.size, dtype=np.int32)
    experts, starts = np.unique(flat[order], return_index=True)
    return x_rows, slot_of, experts.astype(np.int32), starts.astype(np.int32)


def group_table(experts: np.ndarray, starts: np.ndarray, total: int, rows: int) -> np.ndarray:
    """(expert, first slot, count) per touched expert, padded with zero rows to ``rows``."""
    ends = np.append(starts[1:], total)
    table = np.zeros((rows, 3), dtype=np.int32)
    table[: experts.size] = np.stack([experts, starts, ends - starts], axis=1)
    return table


def tile_table(
    experts: np.ndarray, starts: np.ndarray, total: int, cap: int, rows: int
) -> np.ndarray:
    """Groups cut into tiles of at most ``cap`` slots, padded with zero rows to ``rows``."""
    ends = np.append(starts[1:], total)
    tiles = []
    for e, lo, hi in zip(experts, starts, ends):
        for first in range(int(lo), int(hi), cap):
            tiles.append((int(e), first, min(cap, int(hi) - first)))
    if len(tiles) > rows:
        raise LayoutError(f"{len(tiles)} expert tiles exceed the {rows} laid out")
    table = np.zeros((rows, 3), dtype=np.int32)
    if tiles:
        table[: len(tiles)] = np.array(tiles, dtype=np.int32)
    return table


def step_variants(plan: Plan, layers: list[int], seed: int) -> tuple[list, list]:
    """Token and routing draws of the timed steps, drawn exactly as the CPU backend draws them."""
    rng = np.random.default_rng([seed, 0xA55])
    batch, spec = plan.point.batch, plan.spec
    tokens = [rng.integers(0, spec.vocab_size, size=batch) for _ in range(ASSIGNMENT_VARIANTS)]
    assignments: list[dict[int, np.ndarray]] = []
    if spec.num_experts:
        pi = inclusion_probabilities(plan.point.routing, spec.num_experts, spec.experts_per_token)
        for _ in range(ASSIGNMENT_VARIANTS):
            assignments.append(
                {
                    layer: sample_assignments(rng, pi, batch)
                    for layer in layers
                    if spec.is_moe_layer(layer)
                }
            )
    return tokens, assignments


# ----------------------------------------------------------------------------- builder


class _Builder:
    """Accumulates regions and launches; one method per part of the step."""

    def __init__(self, plan: Plan, layers: list[int], caps: DeviceCaps, copies: int) -> None:
        self.plan, self.spec, self.point = plan, plan.spec, plan.point
        self.layers = list(layers)
        self.caps = caps
        self.copies = copies
        self.batch = plan.point.batch
        self.ctx = plan.point.context
        self.prec = plan.point.precision
        self.act = self.prec.activation
        self.kv_fmt = self.prec.kv
        self.regions: dict[str, Region] = {}
        self.consts: dict[str, np.ndarray] = {}
        self.steps: list[Step] = []
        self.notes: list[str] = []
        self.choices: dict[tuple[int, str], cg.GemmChoice] = {}
        self.copy = 0
        self.ops = {(op.layer, op.name): op for op in plan.ops}
        self.variants = VariantTables()
        self.stamp_slots = {layer: 1 + i for i, layer in enumerate(self.layers)}
        self.stamps_per_step = len(self.layers) + 3
        self._check_point()

    # -- checks -------------------------------------------------------------------------

    def _check_point(self) -> None:
        spec, point = self.spec, self.point
        if point.ep > 1:
            raise UnsupportedPoint(
                "expert parallelism (ep > 1) is not implemented on the cuda backend (its token "
                "all-to-all runs on the cpu backend); tensor parallelism is"
            )
        if self.act == "nvfp4" and spec.num_experts:
            raise UnsupportedPoint(
                "NVFP4 activations in MoE layers need a global scale per expert's tokens; the "
                "cuda backend does not implement it"
            )
        if spec.attention == "gqa":
            d = spec.head_dim
            if d not in abi.GQA_HEAD_DIMS:
                raise UnsupportedPoint(
                    f"head_dim {d} has no attention kernel (built: {abi.GQA_HEAD_DIMS})"
                )
        else:
            shape = (spec.kv_lora_rank, spec.qk_rope_head_dim)
            if shape not in abi.MLA_SHAPES:
                raise UnsupportedPoint(
                    f"MLA (kv_lora_rank, qk_rope_head_dim) = {shape} has no kernel "
                    f"(built: {abi.MLA_SHAPES})"
                )

    # -- regions ------------------------------------------------------------------------

    def region(self, name: str, nbytes: int, source: tuple = ("none",)) -> Ref:
        """Declare (or grow, for shared scratch) a region and return a reference to it."""
        nbytes = int(nbytes)
        old = self.regions.get(name)
        if old is not None:
            if old.source != source:
                raise LayoutError(f"region {name} declared with two sources")
            if nbytes > old.nbytes:
                self.regions[name] = Region(name, nbytes, source)
        else:
            self.regions[name] = Region(name, nbytes, source)
        return Ref(name)

    def const(self, key: str, array: np.ndarray) -> Ref:
        array = np.ascontiguousarray(array)
        if key in self.consts and not np.array_equal(self.consts[key], array):
            raise LayoutError(f"constant {key} defined twice with different values")
        self.consts[key] = array
        return self.region(f"const/{key}", array.nbytes, ("const", key))

    def scratch(self, name: str, nbytes: int) -> Ref:
        return self.region(f"scratch/{name}", nbytes)

    def weight(self, layer: int, op: str, part: str, nbytes: int, index: int = -1) -> Ref:
        name = f"w{self.copy}/L{layer}/{op}/{part}" + (f"/{index}" if index >= 0 else "")
        return self.region(name, nbytes, ("weight", self.copy, layer, op, part, index))

    def launch(self, kernel: str, grid, block: int, args: tuple, op: str, layer: int) -> None:
        if kernel not in abi.SIGNATURES:
            raise LayoutError(f"no kernel {kernel}")
        codes = abi.SIGNATURES[kernel][1]
        if len(codes) != len(args):
            raise LayoutError(f"{kernel}: {len(args)} arguments for {len(codes)} parameters")
        for code, arg in zip(codes, args):
            ok = {
                "p": arg is None or isinstance(arg, Ref),
                "q": isinstance(arg, I64),
                "i": isinstance(arg, I32),
                "f": isinstance(arg, F32),
            }[code]
            if not ok:
                raise LayoutError(f"{kernel}: argument {arg!r} does not fit type code {code}")
        grid = tuple(int(g) for g in (tuple(grid) + (1, 1))[:3])
        if min(grid) < 1:
            raise LayoutError(f"{kernel}: empty grid {grid}")
        self.steps.append(Launch(kernel, grid, int(block), tuple(args), op, layer))

    # -- weights ------------------------------------------------------------------------

    def _wparts(self, layer: int, op: Op, choice: cg.GemmChoice) -> dict[str, Ref | int | None]:
        """Regions of one weight op: data (all experts stacked), scales, per-expert floats."""
        n, k, fmt = op.n, op.k, op.weight_fmt
        count = op.held if op.kind in ("moe_gemm", "bgemm") else 1
        if fmt == "bf16":
            data_bytes = 2 * n * k
        elif fmt in cg.FP8:
            data_bytes = n * k
        else:
            data_bytes = n * k // 2
        scale_bytes = 0
        if fmt in cg.FP4:
            scale_bytes = n * k // (32 if fmt == "mxfp4" else 16)
        name = op.name
        if layer == EMBED_LAYER and name == "lm_head" and self.spec.tie_word_embeddings:
            name = "embed"  # the LM head reads the embedding table
        parts: dict[str, Ref | int | None] = {
            "data": self.weight(layer, name, "data", data_bytes * count),
            "expert_bytes": data_bytes,
            "scale": None,
            "scale_bytes": scale_bytes,
            "wscale": None,
            "lt_scale": None,
        }
        if scale_bytes:
            parts["scale"] = self.weight(layer, name, "scale", scale_bytes * count)
        if fmt in cg.FP8 or fmt == "nvfp4":
            parts["wscale"] = self.weight(layer, name, "wscale", 4 * count)
        if choice.path == "lt" and choice.lt_kind == "fp4":
            rows_p = -(-n // 128) * 128
            groups_p = -(-(k // (32 if fmt == "mxfp4" else 16)) // 4) * 4
            parts["lt_scale"] = self.weight(layer, name, "lt_scale", rows_p * groups_p)
        return parts

    # -- GEMMs --------------------------------------------------------------------------

    def choose(self, layer: int, op: Op, act: str, rows: int, grouped: bool, codes: bool):
        choice = cg.choose_gemm(
            op.weight_fmt, act, grouped=grouped, rows=rows, cc=self.caps.cc, allow_codes=codes
        )
        if choice.path == "lt" and choice.lt_kind == "fp4" and op.k % 64:
            choice = cg.our_kernel(op.weight_fmt, rows, cg.BF16_CONTAINER[act])
        self._check_shape(op, choice)
        self.choices[(layer, op.name)] = choice
        return choice

    def _check_shape(self, op: Op, choice: cg.GemmChoice) -> None:
        k, fmt = op.k, op.weight_fmt
        need = {"bf16": 8, "fp8_e4m3": 16, "fp8_e5m2": 16, "mxfp4": 32, "nvfp4": 32}[fmt]
        if choice.path == "lt":
            need = max(need, 16)
        if k % need:
            raise UnsupportedPoint(
                f"{op.name}: K={k} is not a multiple of {need}, which the {fmt} GEMM needs"
            )

    def gemm_dense(
        self,
        layer: int,
        op: Op,
        choice: cg.GemmChoice,
        x: Ref,
        x_scale: Ref | None,
        y: Ref,
    ) -> None:
        """A plain (ungrouped) GEMM of ``batch`` rows: x (container) -> y float32."""
        m, n, k = self.batch, op.n, op.k
        w = self._wparts(layer, op, choice)
        if choice.path == "lt":
            # cuBLASLt folds the weight's per-tensor scale (FP8 scale, NVFP4 global) into alpha.
            alpha = tensor_scale(op.weight_fmt, op.k**-0.5) if choice.lt_kind != "bf16" else 1.0
            self.steps.append(
                LtGemm(
                    kind=choice.lt_kind,
                    m=m,
                    n=n,
                    k=k,
                    w_fmt=op.weight_fmt,
                    x_fmt=self.act if choice.lt_kind != "bf16" else "bf16",
                    w=w["data"],
                    x=x,
                    y=y,
                    alpha=alpha,
                    w_scales=w["lt_scale"],
                    x_scales=Ref(f"{x.region}:scales") if choice.lt_kind == "fp4" else None,
                    op=op.name,
                    layer=layer,
                )
            )
            return
        tiles = None
        if choice.path == "wq":
            cap = choice.tile_rows
            firsts = list(range(0, m, cap))
            table = np.array([(0, f, min(cap, m - f)) for f in firsts], dtype=np.int32)
            tiles = self.const(f"tiles/m{m}/cap{cap}", table)
        self._our_gemm(layer, op, choice, w, x, x_scale, y, n, k, m, tiles, None, None, n, 1)

    def _our_gemm(
        self,
        layer: int,
        op: Op,
        choice: cg.GemmChoice,
        w: dict,
        x: Ref,
        x_scale: Ref | None,
        y: Ref,
        n: int,
        k: int,
        m: int,
        table: Ref | None,
        x_rows: Ref | None,
        y_rows: Ref | None,
        y_stride: int,
        table_rows: int,
    ) -> None:
        x_stride = I64(k)
        common = (
            w["data"],
            I64(w["expert_bytes"]),
            w["scale"],
            I64(w["scale_bytes"]),
            w["wscale"],
            x,
            x_stride,
            x_scale,
            table,
            x_rows,
            y_rows,
            y,
            I64(y_stride),
            I32(n),
            I32(k),
        )
        if choice.path == "gemv":
            grid = (math.ceil(n / GEMV_ROWS_PER_BLOCK), table_rows if table else 1, 1)
            self.launch(choice.kernel, grid, 128, common + (I32(m),), op.name, layer)
        else:
            assert table is not None
            grid = (math.ceil(n / (16 * choice.wm)), table_rows, 1)
            self.launch(choice.kernel, grid, 128, common, op.name, layer)

    # -- producers of GEMM inputs -------------------------------------------------------

    def act_buffers(self, name: str, rows: int, k: int, container: int) -> tuple[Ref, Ref]:
        """The container and row-scale regions a producer writes for the next GEMM."""
        if container == cg.NATIVE_FP4:
            data = self.scratch(f"act/{name}", rows * k // 2)
            rows_p = -(-rows // 128) * 128
            groups_p = -(-(k // 16) // 4) * 4  # sized for NVFP4 (the larger)
            self.region(f"scratch/act/{name}:scales", rows_p * groups_p, ("zero",))
        else:
            data = self.scratch(f"act/{name}", rows * k * abi.ACT_ELEM_BYTES[container])
        scale = self.scratch(f"scale/{name}", 4 * rows)
        return data, scale

    def quantize_stage(
        self,
        name: str,
        stage: Ref,
        stage_stride: int,
        in_scale: Ref | None,
        scale_div: int,
        rows: int,
        k: int,
        container: int,
        groups: int,
        layer: int,
        fmt_for_native: str = "",
    ) -> tuple[Ref, Ref]:
        """Quantise float32 rows (``stage``) into ``container``: the path for formats that need
        a scale over several rows first (NVFP4) or cuBLASLt's native FP4 packing."""
        data, scale = self.act_buffers(name, rows, k, container)
        amax = None
        if container in (abi.ACT_NVFP4_IN_BF16, cg.NATIVE_FP4):
            amax = self.scratch(f"amax/{name}", 4 * groups)
            self.launch(
                "tpj_absmax_groups",
                (groups,),
                ROW_BLOCK,
                (
                    stage,
                    I64(stage_stride),
                    in_scale,
                    I32(scale_div),
                    I32(rows),
                    I32(k),
                    I32(groups),
                    amax,
                ),
                f"{name}.amax",
                layer,
            )
        if container == cg.NATIVE_FP4:
            nv = fmt_for_native == "nvfp4"
            groups_p = -(-(k // (16 if nv else 32)) // 4) * 4
            self.launch(
                "tpj_quant_fp4_native",
                (rows,),
                128,
                (
                    stage,
                    I64(stage_stride),
                    in_scale,
                    I32(k),
                    I32(int(nv)),
                    data,
                    Ref(f"scratch/act/{name}:scales"),
                    I32(groups_p),
                    scale,
                    amax,
                ),
                f"{name}.quant",
                layer,
            )
            return data, scale
        self.launch(
            "tpj_quant_rows",
            (rows,),
            ROW_BLOCK,
            (
                stage,
                I64(stage_stride),
                in_scale,
                I32(scale_div),
                I32(k),
                I32(container),
                data,
                scale,
                amax,
                I32(groups),
            ),
            f"{name}.quant",
            layer,
        )
        return data, scale

    @staticmethod
    def needs_stage(container: int) -> bool:
        return container in (abi.ACT_NVFP4_IN_BF16, cg.NATIVE_FP4)

    def norm(
        self,
        name: str,
        x: Ref,
        x_stride: int,
        x_scale: Ref | None,
        add: Ref | None,
        add_scale: Ref | None,
        h: int,
        weight: Ref,
        container: int,
        layer: int,
        stamp: int = -1,
        aux: bool = False,
        fmt_for_native: str = "",
    ) -> tuple[Ref, Ref, Ref | None]:
        """Fused residual add + RMSNorm writing the next GEMM's input; returns (data, scale,
        aux bf16 copy or None)."""
        rows = self.batch
        aux_ref = self.scratch(f"aux/{name}", 2 * rows * h) if aux else None
        stage = self.needs_stage(container)
        if stage:
            out = self.scratch(f"stage/{name}", 4 * rows * h)
            out_scale = None
            fmt = abi.ACT_F32
        else:
            out, out_scale = self.act_buffers(name, rows, h, container)
            fmt = container
        self.launch(
            "tpj_add_rmsnorm",
            (rows,),
            ROW_BLOCK,
            (
                x,
                I64(x_stride),
                x_scale,
                add,
                add_scale,
                I32(h),
                weight,
                F32(RMS_EPS),
                I32(fmt),
                out,
                out_scale,
                aux_ref,
                Ref("stamps") if stamp >= 0 else None,
                Ref("counter"),
                I32(STAMP_RING),
                I32(self.stamps_per_step),
                I32(stamp),
            ),
            name,
            layer,
        )
        if stage:
            data, scale = self.quantize_stage(
                name, out, h, None, 1, rows, h, container, 1, layer, fmt_for_native
            )
            return data, scale, aux_ref
        return out, out_scale, aux_ref

    def rows_to_container(
        self,
        name: str,
        x: Ref,
        x_stride: int,
        in_scale: Ref | None,
        scale_div: int,
        rows: int,
        k: int,
        container: int,
        groups: int,
        layer: int,
        fmt_for_native: str = "",
    ) -> tuple[Ref, Ref]:
        """Float32 rows (maybe strided, maybe row-scaled) into a GEMM input container."""
        if self.needs_stage(container):
            return self.quantize_stage(
                name,
                x,
                x_stride,
                in_scale,
                scale_div,
                rows,
                k,
                container,
                groups,
                layer,
                fmt_for_native,
            )
        data, scale = self.act_buffers(name, rows, k, container)
        self.launch(
            "tpj_quant_rows",
            (rows,),
            ROW_BLOCK,
            (
                x,
                I64(x_stride),
                in_scale,
                I32(scale_div),
                I32(k),
                I32(container),
                data,
                scale,
                None,
                I32(1),
            ),
            name,
            layer,
        )
        return data, scale

    def swiglu(
        self,
        name: str,
        gate_up: Ref,
        in_scale: Ref | None,
        rows: int,
        f: int,
        container: int,
        layer: int,
        fmt_for_native: str = "",
    ) -> tuple[Ref, Ref]:
        if self.needs_stage(container):
            stage = self.scratch(f"stage/{name}", 4 * rows * f)
            self.launch(
                "tpj_swiglu",
                (rows,),
                ROW_BLOCK,
                (gate_up, in_scale, I32(f), I32(abi.ACT_F32), stage, None),
                name,
                layer,
            )
            return self.quantize_stage(
                name, stage, f, None, 1, rows, f, container, 1, layer, fmt_for_native
            )
        data, scale = self.act_buffers(name, rows, f, container)
        self.launch(
            "tpj_swiglu",
            (rows,),
            ROW_BLOCK,
            (gate_up, in_scale, I32(f), I32(container), data, scale),
            name,
            layer,
        )
        return data, scale

    # -- the step -----------------------------------------------------------------------

    def norm_weight(self, layer: int, name: str, n: int) -> Ref:
        return self.weight(layer, name, "norm", 4 * n)

    def build(self) -> list[Step]:
        spec, batch = self.spec, self.batch
        h = spec.hidden_size
        self.steps = []
        self.region("counter", 16, ("zero",))
        self.region("stamps", 8 * STAMP_RING * self.stamps_per_step, ("zero",))
        current = self.region("current", self.variants.nbytes, ("zero",))
        variants = self.region(
            "variants", self.variants.nbytes * ASSIGNMENT_VARIANTS, ("const", "variants")
        )
        self.launch(
            "tpj_step_begin",
            (1,),
            32,
            (Ref("counter"), Ref("stamps"), I32(STAMP_RING), I32(self.stamps_per_step)),
            "step_begin",
            EMBED_LAYER,
        )
        self.launch(
            "tpj_select_variant",
            (max(1, min(1024, math.ceil(self.variants.nbytes / 16 / 256))),),
            256,
            (
                Ref("counter"),
                variants,
                I64(self.variants.nbytes),
                I32(ASSIGNMENT_VARIANTS),
                current,
            ),
            "select_variant",
            EMBED_LAYER,
        )
        residual = self.scratch("residual", 4 * batch * h)
        embed = self.ops[(EMBED_LAYER, "embed")]
        table = self.weight(EMBED_LAYER, "embed", "data", 2 * spec.vocab_size * embed.n)
        self.launch(
            "tpj_embed",
            (batch,),
            ROW_BLOCK,
            (Ref("current", self.variants.tokens), table, I32(h), residual),
            "embed",
            EMBED_LAYER,
        )
        add: tuple[Ref | None, Ref | None] = (None, None)
        for layer in self.layers:
            add = self.layer(layer, residual, add)
        # Final norm (stamps the end of the last layer) and the LM head.
        lm = self.ops[(EMBED_LAYER, "lm_head")]
        choice = self.choose(EMBED_LAYER, lm, "bf16", batch, grouped=False, codes=True)
        x, xs, _ = self.norm(
            "final_norm",
            residual,
            h,
            None,
            add[0],
            add[1],
            h,
            self.norm_weight(EMBED_LAYER, "final_norm", h),
            choice.container,
            EMBED_LAYER,
            stamp=1 + len(self.layers),
        )
        logits = self.scratch("logits", 4 * batch * lm.n)
        self.gemm_dense(EMBED_LAYER, lm, choice, x, xs, logits)
        self.launch(
            "tpj_step_end",
            (1,),
            32,
            (
                Ref("counter"),
                Ref("stamps"),
                I32(STAMP_RING),
                I32(self.stamps_per_step),
                I32(2 + len(self.layers)),
            ),
            "step_end",
            EMBED_LAYER,
        )
        return self.steps

    def layer(self, layer: int, residual: Ref, add: tuple) -> tuple[Ref, Ref | None]:
        """One layer; ``add`` is the previous layer's FFN output (and its row scale)."""
        spec, h = self.spec, self.spec.hidden_size
        first = self.layer_first_gemm(layer)
        x, xs, _ = self.norm(
            "attn_norm",
            residual,
            h,
            None,
            add[0],
            add[1],
            h,
            self.norm_weight(layer, "attn_norm", h),
            first.container,
            layer,
            stamp=self.stamp_slots[layer],
            fmt_for_native=self.prec.weight,
        )
        if spec.attention == "mla":
            attn, attn_scale = self.mla(layer, x, xs, first)
        else:
            attn, attn_scale = self.gqa(layer, x, xs, first)
        self.allreduce(layer, "attn_allreduce", attn, attn_scale)
        if spec.is_moe_layer(layer):
            out = self.moe(layer, residual, attn, attn_scale)
        else:
            out = self.dense_ffn(layer, residual, attn, attn_scale)
        self.allreduce(layer, "ffn_allreduce", *out)
        return out

    def allreduce(self, layer: int, name: str, buf: Ref, row_scale: Ref | None) -> None:
        """Sum a layer's partial output (B x hidden, float32) over the tensor-parallel group,
        as ``engine.plan`` places it: after the attention output projection and the FFN."""
        if self.point.tp == 1:
            return
        # A 16-bit activation container's row scales are ones, so the partial outputs can be
        # summed as they are; FP8/FP4 rows carry per-rank scales that must be applied first.
        if row_scale is not None and self.act != "bf16":
            raise UnsupportedPoint(
                "tensor parallelism with activation scales applied after the GEMM (FP8/FP4 "
                "activations) would sum unscaled partial outputs; the cuda backend does not "
                "implement it (use 16-bit activations)"
            )
        self.steps.append(AllReduce(buf, self.batch * self.spec.hidden_size, name, layer))

    def layer_first_gemm(self, layer: int) -> cg.GemmChoice:
        """The choice for the GEMMs reading the attention norm's output (all share it)."""
        names = (
            ["mla.q_a_proj", "mla.kv_a_proj"]
            if self.spec.q_lora_rank
            else ["mla.q_proj", "mla.kv_a_proj"]
        )
        if self.spec.attention != "mla":
            names = ["attn.qkv_proj"]
        choices = [
            self.choose(layer, self.ops[(layer, n)], self.act, self.batch, False, True)
            for n in names
        ]
        if len({c.container for c in choices}) > 1:
            choices = [
                self.choose(layer, self.ops[(layer, n)], self.act, self.batch, False, False)
                for n in names
            ]
        return choices[0]

    def gqa(self, layer: int, x: Ref, xs: Ref, choice: cg.GemmChoice) -> tuple[Ref, Ref | None]:
        spec, batch = self.spec, self.batch
        qkv_op = self.ops[(layer, "attn.qkv_proj")]
        d = spec.head_dim
        kv_heads = max(1, spec.num_kv_heads // self.point.tp)
        heads = qkv_op.n // d - 2 * kv_heads
        qkv = self.scratch("y/qkv", 4 * batch * qkv_op.n)
        self.gemm_dense(layer, qkv_op, choice, x, xs, qkv)
        rs = None if choice.scale_inside else xs
        q = self.scratch("attn/q", 4 * batch * heads * d)
        kv_code = abi.KV_CODES[self.kv_fmt]
        elem = 2 if self.kv_fmt == "bf16" else 1
        cache_bytes = batch * kv_heads * self.ctx * d * elem
        k_cache = self.region(f"kv/L{layer}/k", cache_bytes, ("kv", layer, "k"))
        v_cache = self.region(f"kv/L{layer}/v", cache_bytes, ("kv", layer, "v"))
        kv_scale = F32(tensor_scale(self.kv_fmt, 1.0))  # engine.weights.kv_cache's scale
        cos_sin = self.const(f"rope/d{d}/p{self.ctx - 1}", rope_table(d, self.ctx - 1))
        self.launch(
            "tpj_rope_qkv",
            (batch, heads + 2 * kv_heads),
            max(32, d // 2),
            (
                qkv,
                rs,
                I32(heads),
                I32(kv_heads),
                I32(d),
                cos_sin,
                q,
                k_cache,
                v_cache,
                I32(kv_code),
                kv_scale,
                I32(self.ctx),
                I32(self.ctx - 1),
            ),
            "attn.rope",
            layer,
        )
        t1 = self.ctx
        t0 = 0
        if spec.layer_attention_kind(layer) == "sliding" and spec.sliding_window:
            t0 = max(0, t1 - spec.sliding_window)
        g = gqa_group(heads, kv_heads)
        items = batch * (heads // g)
        splits, chunk = attention_splits(items, t1 - t0, self.caps.sm_count)
        out = self.scratch("attn/out", 4 * batch * heads * d)
        part_acc = self.scratch("attn/part_acc", 4 * batch * heads * splits * d)
        part_ml = self.scratch("attn/part_ml", 8 * batch * heads * splits)
        self.launch(
            abi.gqa_kernel(d, g, self.kv_fmt),
            (splits, heads // g, batch),
            128,
            (
                q,
                k_cache,
                v_cache,
                kv_scale,
                I32(heads),
                I32(kv_heads),
                I32(self.ctx),
                I32(t0),
                I32(t1),
                I32(chunk),
                F32(d**-0.5),
                out,
                part_acc,
                part_ml,
            ),
            "attn.decode",
            layer,
        )
        if splits > 1:
            self.launch(
                "tpj_attn_merge",
                (batch * heads,),
                128,
                (part_acc, part_ml, I32(splits), I32(d), out),
                "attn.merge",
                layer,
            )
        return self.o_proj(layer, out, heads * d)

    def o_proj(self, layer: int, out: Ref, width: int) -> tuple[Ref, Ref | None]:
        op = self.ops[(layer, "attn.o_proj")]
        choice = self.choose(layer, op, self.act, self.batch, False, True)
        x, xs = self.rows_to_container(
            "attn_out",
            out,
            width,
            None,
            1,
            self.batch,
            width,
            choice.container,
            1,
            layer,
            self.prec.weight,
        )
        y = self.scratch("y/o_proj", 4 * self.batch * op.n)
        self.gemm_dense(layer, op, choice, x, xs, y)
        return y, (None if choice.scale_inside else xs)

    def mla(self, layer: int, x: Ref, xs: Ref, choice: cg.GemmChoice) -> tuple[Ref, Ref | None]:
        spec, batch = self.spec, self.batch
        nope, rope, rank, vdim = (
            spec.qk_nope_head_dim,
            spec.qk_rope_head_dim,
            spec.kv_lora_rank,
            spec.v_head_dim,
        )
        rs = None if choice.scale_inside else xs
        if spec.q_lora_rank:
            qa_op = self.ops[(layer, "mla.q_a_proj")]
            qa = self.scratch("y/q_a", 4 * batch * qa_op.n)
            self.gemm_dense(layer, qa_op, choice, x, xs, qa)
            qb_op = self.ops[(layer, "mla.q_b_proj")]
            qb_choice = self.choose(layer, qb_op, self.act, batch, False, True)
            qa_x, qa_s, _ = self.norm(
                "q_a_norm",
                qa,
                qa_op.n,
                rs,
                None,
                None,
                qa_op.n,
                self.norm_weight(layer, "mla.q_a_norm", qa_op.n),
                qb_choice.container,
                layer,
                fmt_for_native=self.prec.weight,
            )
            q = self.scratch("y/q", 4 * batch * qb_op.n)
            self.gemm_dense(layer, qb_op, qb_choice, qa_x, qa_s, q)
            q_scale = None if qb_choice.scale_inside else qa_s
            heads = qb_op.n // (nope + rope)
        else:
            q_op = self.ops[(layer, "mla.q_proj")]
            q = self.scratch("y/q", 4 * batch * q_op.n)
            self.gemm_dense(layer, q_op, choice, x, xs, q)
            q_scale = rs
            heads = q_op.n // (nope + rope)
        kv_op = self.ops[(layer, "mla.kv_a_proj")]
        kva = self.scratch("y/kva", 4 * batch * kv_op.n)
        self.gemm_dense(layer, kv_op, choice, x, xs, kva)
        kv_code = abi.KV_CODES[self.kv_fmt]
        elem = 2 if self.kv_fmt == "bf16" else 1
        ckv = self.region(f"kv/L{layer}/k", batch * self.ctx * rank * elem, ("kv", layer, "k"))
        krope = self.region(f"kv/L{layer}/v", batch * self.ctx * rope * elem, ("kv", layer, "v"))
        kv_scale = F32(tensor_scale(self.kv_fmt, 1.0))
        cos_sin = self.const(f"rope/d{rope}/p{self.ctx - 1}", rope_table(rope, self.ctx - 1))
        self.launch(
            "tpj_mla_kv_write",
            (batch,),
            ROW_BLOCK,
            (
                kva,
                rs,
                I32(rank),
                I32(rope),
                self.norm_weight(layer, "mla.kv_a_norm", rank),
                F32(RMS_EPS),
                cos_sin,
                ckv,
                krope,
                I32(kv_code),
                kv_scale,
                I32(self.ctx),
                I32(self.ctx - 1),
            ),
            "mla.kv_write",
            layer,
        )
        rows = batch * heads
        q_rope = self.scratch("mla/q_rope", 4 * rows * rope)
        self.launch(
            "tpj_rope_rows",
            (rows,),
            max(32, rope // 2),
            (q, I64(nope + rope), I32(nope), q_scale, I32(heads), I32(rope), cos_sin, q_rope),
            "mla.rope",
            layer,
        )
        # Per-head GEMMs: slot s = head * B + b reads row b * H + head and writes it back there.
        absorb_op = self.ops[(layer, "mla.q_absorb")]
        absorb = self.choose(layer, absorb_op, self.act, batch, True, False)
        s = np.arange(rows)
        rows_tab = self.const(
            f"mla/rows/b{batch}/h{heads}", ((s % batch) * heads + s // batch).astype(np.int32)
        )
        groups = np.stack([s[:heads], s[:heads] * batch, np.full(heads, batch)], 1)
        group_tab = self.const(f"mla/groups/b{batch}/h{heads}", groups.astype(np.int32))
        if absorb.path == "wq":
            cap = absorb.tile_rows
            tiles = [
                (hh, hh * batch + f, min(cap, batch - f))
                for hh in range(heads)
                for f in range(0, batch, cap)
            ]
            group_tab = self.const(f"mla/tiles/b{batch}/h{heads}/c{cap}", np.array(tiles, np.int32))
            n_groups = len(tiles)
        else:
            n_groups = heads
        q_nope, q_nope_s = self.rows_to_container(
            "q_nope", q, nope + rope, q_scale, heads, rows, nope, absorb.container, heads, layer
        )
        q_latent = self.scratch("mla/q_latent", 4 * rows * rank)
        w = self._wparts(layer, absorb_op, absorb)
        self._our_gemm(
            layer, absorb_op, absorb, w, q_nope, q_nope_s, q_latent, rank, nope, batch,
            group_tab, rows_tab, rows_tab, rank, n_groups,
        )  # fmt: skip
        splits, chunk = attention_splits(batch * math.ceil(heads / 8), self.ctx, self.caps.sm_count)
        out_latent = self.scratch("mla/out_latent", 4 * rows * rank)
        part_acc = self.scratch("mla/part_acc", 4 * rows * splits * rank)
        part_ml = self.scratch("mla/part_ml", 8 * rows * splits)
        self.launch(
            abi.mla_kernel(rank, rope, self.kv_fmt),
            (splits, math.ceil(heads / 8), batch),
            256,
            (
                q_latent,
                q_rope,
                ckv,
                krope,
                kv_scale,
                I32(heads),
                I32(self.ctx),
                I32(self.ctx),
                I32(chunk),
                F32((nope + rope) ** -0.5),
                out_latent,
                part_acc,
                part_ml,
            ),
            "mla.decode",
            layer,
        )
        if splits > 1:
            self.launch(
                "tpj_attn_merge",
                (rows,),
                128,
                (part_acc, part_ml, I32(splits), I32(rank), out_latent),
                "mla.merge",
                layer,
            )
        vup_op = self.ops[(layer, "mla.v_up")]
        vup = self.choose(layer, vup_op, self.act, batch, True, False)
        if vup.path != absorb.path or vup.tile_rows != absorb.tile_rows:
            raise LayoutError("MLA per-head GEMMs disagree on their grouping")
        lat, lat_s = self.rows_to_container(
            "latent", out_latent, rank, None, 1, rows, rank, vup.container, heads, layer
        )
        values = self.scratch("mla/values", 4 * rows * vdim)
        w = self._wparts(layer, vup_op, vup)
        self._our_gemm(
            layer, vup_op, vup, w, lat, lat_s, values, vdim, rank, batch,
            group_tab, rows_tab, rows_tab, vdim, n_groups,
        )  # fmt: skip
        return self.o_proj(layer, values, heads * vdim)

    def dense_ffn(self, layer: int, residual: Ref, attn: Ref, attn_scale) -> tuple:
        h, batch = self.spec.hidden_size, self.batch
        gu_op = self.ops[(layer, "ffn.gate_up")]
        down_op = self.ops[(layer, "ffn.down")]
        gu = self.choose(layer, gu_op, self.act, batch, False, True)
        down = self.choose(layer, down_op, self.act, batch, False, True)
        x, xs, _ = self.norm(
            "ffn_norm",
            residual,
            h,
            None,
            attn,
            attn_scale,
            h,
            self.norm_weight(layer, "ffn_norm", h),
            gu.container,
            layer,
            fmt_for_native=self.prec.weight,
        )
        y = self.scratch("y/gate_up", 4 * batch * gu_op.n)
        self.gemm_dense(layer, gu_op, gu, x, xs, y)
        f = gu_op.n // 2
        a, a_s = self.swiglu(
            "ffn_act",
            y,
            None if gu.scale_inside else xs,
            batch,
            f,
            down.container,
            layer,
            self.prec.weight,
        )
        out = self.scratch("y/down", 4 * batch * h)
        self.gemm_dense(layer, down_op, down, a, a_s, out)
        return out, (None if down.scale_inside else a_s)

    def moe(self, layer: int, residual: Ref, attn: Ref, attn_scale) -> tuple:
        spec, h, batch = self.spec, self.spec.hidden_size, self.batch
        k = spec.experts_per_token
        slots = batch * k
        gu_op = self.ops[(layer, "moe.gate_up")]
        down_op = self.ops[(layer, "moe.down")]
        router_op = self.ops[(layer, "moe.router")]
        per_expert = max(1, round(gu_op.m))
        gu = self.choose(layer, gu_op, self.act, per_expert, True, False)
        down = self.choose(layer, down_op, self.act, per_expert, True, False)
        router = self.choose(layer, router_op, "bf16", batch, False, True)
        x, xs, aux = self.norm(
            "ffn_norm",
            residual,
            h,
            None,
            attn,
            attn_scale,
            h,
            self.norm_weight(layer, "ffn_norm", h),
            gu.container,
            layer,
            aux=True,
        )
        logits = self.scratch("moe/logits", 4 * batch * router_op.n)
        self.gemm_dense(layer, router_op, router, aux, None, logits)
        tabs = self.variants.moe[layer]
        gates = self.scratch("moe/gates", 4 * slots)
        self.launch(
            "tpj_moe_gates",
            (batch,),
            32,
            (logits, I32(router_op.n), Ref("current", tabs["assign"]), I32(k), gates),
            "moe.gates",
            layer,
        )
        shared_out, shared_scale = None, None
        if (layer, "moe.shared_gate_up") in self.ops:
            sgu_op = self.ops[(layer, "moe.shared_gate_up")]
            sd_op = self.ops[(layer, "moe.shared_down")]
            sgu = self.choose(layer, sgu_op, self.act, batch, False, False)
            sd = self.choose(layer, sd_op, self.act, batch, False, False)
            if sgu.container != gu.container:
                raise LayoutError("shared and routed experts need different input containers")
            sy = self.scratch("y/shared_gate_up", 4 * batch * sgu_op.n)
            self.gemm_dense(layer, sgu_op, sgu, x, xs, sy)
            sa, sa_s = self.swiglu(
                "shared_act",
                sy,
                None if sgu.scale_inside else xs,
                batch,
                sgu_op.n // 2,
                sd.container,
                layer,
            )
            shared_out = self.scratch("y/shared_down", 4 * batch * h)
            self.gemm_dense(layer, sd_op, sd, sa, sa_s, shared_out)
            shared_scale = None if sd.scale_inside else sa_s
        # Routed experts: grouped GEMMs over this step's routing tables.
        f = gu_op.n // 2
        if gu.path == "wq":
            table, table_rows = Ref("current", tabs["tiles"]), tabs["tile_rows"]
        else:
            table, table_rows = Ref("current", tabs["groups"]), tabs["group_rows"]
        ey = self.scratch("moe/gate_up", 4 * slots * gu_op.n)
        w = self._wparts(layer, gu_op, gu)
        self._our_gemm(
            layer, gu_op, gu, w, x, xs, ey, gu_op.n, gu_op.k, 0,
            table, Ref("current", tabs["x_rows"]), None, gu_op.n, table_rows,
        )  # fmt: skip
        ea, ea_s = self.swiglu("moe_act", ey, None, slots, f, down.container, layer)
        ed = self.scratch("moe/down", 4 * slots * h)
        w = self._wparts(layer, down_op, down)
        self._our_gemm(
            layer, down_op, down, w, ea, ea_s, ed, down_op.n, down_op.k, 0,
            table, None, None, down_op.n, table_rows,
        )  # fmt: skip
        out = self.scratch("moe/out", 4 * batch * h)
        self.launch(
            "tpj_moe_combine",
            (batch,),
            ROW_BLOCK,
            (
                ed,
                None,
                Ref("current", tabs["slot_of"]),
                gates,
                I32(k),
                shared_out,
                shared_scale,
                I32(h),
                out,
            ),
            "moe.combine",
            layer,
        )
        return out, None


# ----------------------------------------------------------------------------- variants


def _variant_tables(plan: Plan, layers: list[int], caps: DeviceCaps) -> VariantTables:
    spec, batch = plan.spec, plan.point.batch
    vt = VariantTables()
    pos = 0

    def take(nbytes: int) -> int:
        nonlocal pos
        at = pos
        pos += -(-nbytes // 16) * 16
        return at

    vt.tokens = take(4 * batch)
    if spec.num_experts:
        k = spec.experts_per_token
        slots = batch * k
        experts_local = spec.num_experts // plan.point.ep
        touched_max = min(experts_local, slots)
        for layer in layers:
            if not spec.is_moe_layer(layer):
                continue
            gu_op = next(o for o in plan.ops if o.layer == layer and o.name == "moe.gate_up")
            choice = cg.choose_gemm(
                gu_op.weight_fmt,
                plan.point.precision.activation,
                grouped=True,
                rows=max(1, round(gu_op.m)),
                cc=caps.cc,
                allow_codes=False,
            )
            cap = choice.tile_rows if choice.path == "wq" else 1
            tile_rows = touched_max + (-(-slots // cap) if choice.path == "wq" else 0)
            vt.moe[layer] = {
                "assign": take(4 * slots),
                "slot_of": take(4 * slots),
                "x_rows": take(4 * slots),
                "groups": take(12 * touched_max),
                "group_rows": touched_max,
                "tiles": take(12 * tile_rows),
                "tile_rows": tile_rows,
                "tile_cap": cap,
            }
    vt.nbytes = max(16, -(-pos // 16) * 16)
    return vt


def variant_blob(
    vt: VariantTables, tokens: np.ndarray, assignments: dict[int, np.ndarray] | None
) -> np.ndarray:
    """One step's tables as bytes (the layout of ``vt``): tokens and per-layer routing."""
    blob = np.zeros(vt.nbytes, dtype=np.uint8)

    def put(at: int, arr: np.ndarray) -> None:
        raw = np.ascontiguousarray(arr, dtype=np.int32).view(np.uint8).reshape(-1)
        blob[at : at + raw.size] = raw

    put(vt.tokens, np.asarray(tokens))
    for layer, tabs in vt.moe.items():
        if assignments is None or layer not in assignments:
            raise LayoutError(f"layer {layer} is MoE: routing assignments are required")
        assigned = np.asarray(assignments[layer])
        x_rows, slot_of, experts, starts = slot_tables(assigned)
        put(tabs["assign"], assigned)
        put(tabs["slot_of"], slot_of)
        put(tabs["x_rows"], x_rows)
        put(tabs["groups"], group_table(experts, starts, x_rows.size, tabs["group_rows"]))
        if tabs["tile_cap"] > 1:
            put(
                tabs["tiles"],
                tile_table(experts, starts, x_rows.size, tabs["tile_cap"], tabs["tile_rows"]),
            )
    return blob


# ----------------------------------------------------------------------------- entry


def rotation_copies(step_weight_bytes: int, l2_bytes: int, spare_bytes: int, most: int = 8) -> int:
    """Copies of the run layers' weights to cycle through so the L2 cache never holds them.

    One copy suffices when a step already streams more than 4x the L2 size; otherwise enough
    copies that consecutive steps together stream that much, as far as ``spare_bytes`` of
    memory allows, at most ``most``.
    """
    if step_weight_bytes <= 0:
        return 1
    want = max(1, math.ceil(4 * l2_bytes / step_weight_bytes))
    fit = 1 + max(0, spare_bytes) // step_weight_bytes
    return int(max(1, min(want, fit, most)))


def build_layout(
    plan: Plan, layers: list[int], seed: int, caps: DeviceCaps, copies: int = 1
) -> Layout:
    """Lay out the decode step of ``plan`` over ``layers`` (see the module docstring).

    Raises UnsupportedPoint for a point this device or backend cannot run (one line).
    """
    if plan.point.tp > 1:
        note = "tensor-parallel shard run alone: its all-reduce collectives are not executed"
    else:
        note = ""
    vt = _variant_tables(plan, layers, caps)
    builder = _Builder(plan, layers, caps, copies)
    builder.variants = vt
    programs = []
    for copy in range(copies):
        builder.copy = copy
        programs.append(builder.build())
    tokens, assignments = step_variants(plan, layers, seed)
    blobs = np.stack(
        [
            variant_blob(vt, tokens[i], assignments[i] if assignments else None)
            for i in range(ASSIGNMENT_VARIANTS)
        ]
    )
    builder.consts["variants"] = blobs.reshape(-1)
    offsets: dict[str, int] = {}
    pos = 0
    for name, reg in builder.regions.items():
        offsets[name] = pos
        pos += _align(max(reg.nbytes, 1))
    notes = builder.notes + ([note] if note else [])
    return Layout(
        plan=plan,
        layers=list(layers),
        regions=builder.regions,
        offsets=offsets,
        total_bytes=pos,
        programs=programs,
        consts=builder.consts,
        variants=vt,
        n_variants=ASSIGNMENT_VARIANTS,
        variant_blobs=blobs,
        stamps_per_step=builder.stamps_per_step,
        stamp_layer_slots=builder.stamp_slots,
        logits="scratch/logits",
        notes=notes,
        gemm_choices=builder.choices,
    )


def layer_classes(layout: Layout) -> dict[int, str]:
    """Layer class key (as the measure module keys them) of every run layer."""
    return {layer: "/".join(layer_class(layout.plan, layer)) for layer in layout.layers}


def windows_from_stamps(
    stamps: np.ndarray, layout: Layout
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """(start, end, ns per layer class, ns outside layers) from rows of device stamps (ns).

    ``stamps`` is (steps, stamps_per_step): begin, the start of each run layer, the start of
    the final norm, the end. A layer lasts from its start to the next layer's (or the final
    norm's) start.
    """
    stamps = np.asarray(stamps, dtype=np.int64)
    start, end = stamps[:, 0], stamps[:, -1]
    classes = layer_classes(layout)
    class_ns: dict[str, np.ndarray] = {
        c: np.zeros(len(stamps), np.int64) for c in set(classes.values())
    }
    inside = np.zeros(len(stamps), np.int64)
    for i, layer in enumerate(layout.layers):
        span = stamps[:, 2 + i] - stamps[:, 1 + i]
        class_ns[classes[layer]] += span
        inside += span
    return start, end, class_ns, (end - start) - inside
