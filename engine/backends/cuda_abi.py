"""The kernels' stable ABI as data: every ``extern "C"`` entry point of ``kernels/*.cu`` and its
parameter types, in order.

Type codes: ``p`` a device pointer (or null), ``q`` a 64-bit integer (``long long``), ``i`` a
32-bit integer (``int`` or ``unsigned``), ``f`` a 32-bit float. The launcher packs arguments from
these codes, the emulator (``cuda_emulate``) reads them by position, and
``tests/test_cuda_build.py`` checks the table against the parameter list nvcc emits in PTX for
every entry, so the three cannot drift apart. The meaning of each parameter is documented at the
top of the kernel's source file.
"""

from __future__ import annotations

import itertools

ACT_BF16 = 0
ACT_E4M3 = 1
ACT_E5M2 = 2
ACT_F32 = 3
ACT_E4M3_IN_BF16 = 4
ACT_E5M2_IN_BF16 = 5
ACT_MXFP4_IN_BF16 = 6
ACT_NVFP4_IN_BF16 = 7

#: Bytes per element of each activation container (the FP4-in-BF16 ones hold bf16).
ACT_ELEM_BYTES = {
    ACT_BF16: 2,
    ACT_E4M3: 1,
    ACT_E5M2: 1,
    ACT_F32: 4,
    ACT_E4M3_IN_BF16: 2,
    ACT_E5M2_IN_BF16: 2,
    ACT_MXFP4_IN_BF16: 2,
    ACT_NVFP4_IN_BF16: 2,
}

KV_CODES = {"bf16": 0, "fp8_e4m3": 1, "fp8_e5m2": 2}
KV_SUFFIX = {"bf16": "bf16", "fp8_e4m3": "e4m3", "fp8_e5m2": "e5m2"}
#: Weight formats as kernel-name suffixes.
W_SUFFIX = {
    "bf16": "bf16",
    "fp8_e4m3": "e4m3",
    "fp8_e5m2": "e5m2",
    "mxfp4": "mxfp4",
    "nvfp4": "nvfp4",
}

GQA_HEAD_DIMS = (64, 128, 256)
GQA_GROUPS = (1, 2, 4, 8)
#: (kv_lora_rank, qk_rope_head_dim) pairs with an MLA kernel.
MLA_SHAPES = ((64, 16), (512, 64))
GEMV_ROWS = (1, 2, 4)
#: (m16 tiles of weight rows, n8 tiles of slots) per warp of the tensor-core GEMM.
WQ_SHAPES = ((1, 1), (1, 2), (2, 4), (2, 8))

_GEMV = "pqpqppqpppppqiii"
_WQ = "pqpqppqpppppqii"

#: Source file of each entry point (without ``.cu``), and its parameter type codes.
SIGNATURES: dict[str, tuple[str, str]] = {
    "tpj_read_globaltimer": ("stamp", "pi"),
    "tpj_embed": ("elementwise", "ppip"),
    "tpj_add_rmsnorm": ("elementwise", "pqpppipfipppppiii"),
    "tpj_swiglu": ("elementwise", "ppiipp"),
    "tpj_quant_rows": ("elementwise", "pqpiiipppi"),
    "tpj_absmax_groups": ("elementwise", "pqpiiiip"),
    "tpj_rope_qkv": ("elementwise", "ppiiippppifii"),
    "tpj_rope_rows": ("elementwise", "pqipiipp"),
    "tpj_mla_kv_write": ("elementwise", "ppiipfpppifii"),
    "tpj_step_begin": ("elementwise", "ppii"),
    "tpj_select_variant": ("elementwise", "ppqip"),
    "tpj_step_end": ("elementwise", "ppiii"),
    "tpj_attn_merge": ("attention", "ppiip"),
    "tpj_moe_topk_softmax": ("moe", "piipp"),
    "tpj_moe_gates": ("moe", "pipip"),
    "tpj_moe_permute": ("moe", "pqpip"),
    "tpj_moe_combine": ("moe", "ppppippip"),
    "tpj_quant_fp4_native": ("fp4quant", "pqpiippipp"),
}
for _d, _g, _kv in itertools.product(GQA_HEAD_DIMS, GQA_GROUPS, KV_SUFFIX.values()):
    SIGNATURES[f"tpj_gqa_decode_d{_d}_g{_g}_{_kv}"] = ("attention", "pppfiiiiiifppp")
for (_r, _p), _kv in itertools.product(MLA_SHAPES, KV_SUFFIX.values()):
    SIGNATURES[f"tpj_mla_decode_r{_r}_p{_p}_{_kv}"] = ("attention", "ppppfiiiifppp")
for _w, _m in itertools.product(W_SUFFIX.values(), GEMV_ROWS):
    SIGNATURES[f"tpj_gemv_{_w}_m{_m}"] = ("gemv", _GEMV)
for _w, (_wm, _wn) in itertools.product(W_SUFFIX.values(), WQ_SHAPES):
    SIGNATURES[f"tpj_wq_gemm_{_w}_w{_wm}n{_wn}"] = ("wq_gemm", _WQ)

#: PTX parameter type of each code.
PTX_TYPES = {"p": ".u64", "q": ".u64", "i": ".u32", "f": ".f32"}

#: Kernels whose register report must show no spills and no local memory (all but the MLA
#: variant sized for the tiny test model, which nothing measures).
HOT_EXEMPT = frozenset(n for n in SIGNATURES if n.startswith("tpj_mla_decode_r64_"))


def sources() -> list[str]:
    """Kernel source files (without ``.cu``) that define entry points."""
    return sorted({src for src, _ in SIGNATURES.values()})


def gqa_kernel(head_dim: int, group: int, kv_fmt: str) -> str:
    """Entry point of GQA decode attention for a head size, query heads per block and KV format."""
    return f"tpj_gqa_decode_d{head_dim}_g{group}_{KV_SUFFIX[kv_fmt]}"


def mla_kernel(rank: int, rope: int, kv_fmt: str) -> str:
    """Entry point of MLA decode attention for a latent rank, RoPE width and KV format."""
    return f"tpj_mla_decode_r{rank}_p{rope}_{KV_SUFFIX[kv_fmt]}"


def gemv_kernel(weight_fmt: str, rows: int) -> str:
    """Entry point of the CUDA-core GEMV for a weight format and rows of x per pass."""
    return f"tpj_gemv_{W_SUFFIX[weight_fmt]}_m{rows}"


def wq_kernel(weight_fmt: str, wm: int, wn: int) -> str:
    """Entry point of the tensor-core weight-only GEMM for a weight format and warp tile."""
    return f"tpj_wq_gemm_{W_SUFFIX[weight_fmt]}_w{wm}n{wn}"
