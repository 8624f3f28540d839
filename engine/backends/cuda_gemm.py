"""Which engine runs each GEMM of a plan on a CUDA device, and in what input container.

Pure logic (no device): given the weight and activation formats, whether the GEMM is grouped
(MoE experts, MLA per-head weights) and its rows per group, and the device's compute
capability, pick one of

- ``lt``: cuBLASLt (dense GEMMs): BF16, FP8 with per-tensor scales on sm_89+, block-scaled
  NVFP4 / MXFP4 on sm_100+;
- ``gemv``: our CUDA-core weight-streaming GEMV (``kernels/gemv.cu``), up to 4 rows a pass;
- ``wq``: our tensor-core weight-only GEMM (``kernels/wq_gemm.cu``) for more rows.

Our kernels read activations as BF16, so a narrow activation format is held exactly in BF16
(an FP8 or FP4 value is a BF16 value) with its per-row scale beside it; cuBLASLt's FP8 path
reads FP8 codes and its FP4 path packed FP4 with block scales in its interleaved layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.backends import cuda_abi as abi
from engine.backends.base import UnsupportedPoint

FP8 = ("fp8_e4m3", "fp8_e5m2")
FP4 = ("mxfp4", "nvfp4")
#: Rows of x per pass of the CUDA-core GEMV; above it the tensor-core kernel runs.
GEMV_MAX_ROWS = 4
#: Compute capabilities of FP8 tensor cores (Ada, Hopper) and of FP4 ones (Blackwell).
FP8_MIN_CC = (8, 9)
FP4_MIN_CC = (10, 0)
#: Activation container our kernels (and cuBLASLt BF16) read, per activation format.
BF16_CONTAINER = {
    "bf16": abi.ACT_BF16,
    "fp8_e4m3": abi.ACT_E4M3_IN_BF16,
    "fp8_e5m2": abi.ACT_E5M2_IN_BF16,
    "mxfp4": abi.ACT_MXFP4_IN_BF16,
    "nvfp4": abi.ACT_NVFP4_IN_BF16,
}
CODE_CONTAINER = {"fp8_e4m3": abi.ACT_E4M3, "fp8_e5m2": abi.ACT_E5M2}
#: Pseudo-container for cuBLASLt's native FP4: packed E2M1 plus interleaved block scales.
NATIVE_FP4 = 100
#: FP8 operand pairs (weight, activation) cuBLASLt multiplies (E5M2 x E5M2 it does not).
LT_FP8_PAIRS = {
    ("fp8_e4m3", "fp8_e4m3"),
    ("fp8_e4m3", "fp8_e5m2"),
    ("fp8_e5m2", "fp8_e4m3"),
}


@dataclass(frozen=True)
class GemmChoice:
    """How one GEMM runs: engine, kernel, and the container its input must be in.

    ``lt_kind`` is ``bf16``, ``fp8`` or ``fp4`` for cuBLASLt; ``kernel`` names our entry point;
    ``rows`` is the GEMV's rows per pass; ``wm``/``wn`` the tensor-core kernel's warp tile.
    ``scale_inside`` says whether the kernel applies the input's row scales itself (our
    kernels do; a cuBLASLt output's consumer must apply them).
    """

    path: str
    container: int
    lt_kind: str = ""
    kernel: str = ""
    rows: int = 0
    wm: int = 0
    wn: int = 0

    @property
    def scale_inside(self) -> bool:
        return self.path != "lt"

    @property
    def tile_rows(self) -> int:
        """Slots one block of the tensor-core kernel covers (8 per n8 tile)."""
        return 8 * self.wn


def compute_kind(weight: str, act: str) -> str:
    """The arithmetic a GEMM of these formats runs in (as ``Precision.gemm_compute``)."""
    if weight in FP8 and act in FP8:
        return "fp8"
    if weight in FP4 and act in FP4:
        return "fp4"
    if weight in FP4 and act in FP8:
        return "fp8"
    return "bf16"


def unsupported_reason(weight: str, act: str, cc: tuple[int, int]) -> str | None:
    """Why a device of compute capability ``cc`` cannot run GEMMs of these formats."""
    kind = compute_kind(weight, act)
    if kind == "fp8" and cc < FP8_MIN_CC:
        return (
            f"FP8 arithmetic (w={weight}, a={act}) needs FP8 tensor cores (sm_89 or newer); "
            f"this device is sm_{cc[0]}{cc[1]}"
        )
    if kind == "fp4" and cc < FP4_MIN_CC:
        return (
            f"native FP4 arithmetic (w={weight}, a={act}) needs FP4 tensor cores (sm_100 or "
            f"newer); this device is sm_{cc[0]}{cc[1]}; use weight-only FP4 (w4a16) instead"
        )
    return None


def wq_shape(rows: int) -> tuple[int, int]:
    """Warp tile (m16 tiles, n8 tiles) of the tensor-core kernel for ``rows`` slots a group."""
    if rows <= 8:
        return 1, 1
    if rows <= 16:
        return 1, 2
    if rows <= 32:
        return 2, 4
    return 2, 8


def our_kernel(weight: str, rows: int, container: int) -> GemmChoice:
    """Our GEMV for up to ``GEMV_MAX_ROWS`` rows a group, else the tensor-core kernel."""
    if rows <= GEMV_MAX_ROWS:
        per_pass = 1 if rows <= 1 else (2 if rows <= 2 else 4)
        return GemmChoice(
            "gemv", container, kernel=abi.gemv_kernel(weight, per_pass), rows=per_pass
        )
    wm, wn = wq_shape(rows)
    return GemmChoice("wq", container, kernel=abi.wq_kernel(weight, wm, wn), wm=wm, wn=wn)


def choose_gemm(
    weight: str,
    act: str,
    *,
    grouped: bool,
    rows: int,
    cc: tuple[int, int],
    allow_codes: bool = True,
) -> GemmChoice:
    """Pick the engine of one GEMM (see the module docstring).

    ``act`` is the format the GEMM's input is quantised to (``bf16`` for the router and the
    LM head, which read unquantised activations); ``rows`` the rows of x per group;
    ``allow_codes`` False keeps cuBLASLt's code containers out (when the same producer feeds
    our kernels too). Raises UnsupportedPoint (one line) for formats the device cannot run.
    """
    reason = unsupported_reason(weight, act, cc)
    if reason:
        raise UnsupportedPoint(reason)
    bf16_container = BF16_CONTAINER[act]
    if grouped:
        return our_kernel(weight, rows, bf16_container)
    kind = compute_kind(weight, act)
    if weight == "bf16":
        return GemmChoice("lt", bf16_container, lt_kind="bf16")
    if kind == "fp8" and weight in FP8 and allow_codes and (weight, act) in LT_FP8_PAIRS:
        return GemmChoice("lt", CODE_CONTAINER[act], lt_kind="fp8")
    if kind == "fp4" and allow_codes and weight == act:
        return GemmChoice("lt", NATIVE_FP4, lt_kind="fp4")
    return our_kernel(weight, rows, bf16_container)
