"""cuBLASLt through nvmath-python's low-level bindings, on raw device pointers.

A layout's ``LtGemm`` computes ``y[m, n] = alpha * x[m, :k] . w[n, :k]`` with row-major x and
y. In cuBLAS's column-major terms that is ``D (n x m) = alpha * op(A) B`` with A = w stored
k x n (op = transpose), B = x stored k x m, D = y; this "TN" form is also the one cuBLASLt's
FP8 and FP4 kernels require. FP8 GEMMs take the weight's per-tensor scale in alpha (the
activation's per-row scale is applied by the GEMM's consumer); block-scaled FP4 GEMMs
(sm_100+) point A_SCALE/B_SCALE at the interleaved E4M3 (NVFP4, 16-element blocks) or E8M0
(MXFP4, 32-element blocks) scales. The algorithm is chosen by cuBLASLt's heuristic once per
shape and cached (:class:`AlgoCache`); the workspace is one buffer sized for every algorithm
used. The pure parts (layouts, scale modes, cache keys) are tested without a device.

API looked up in nvmath-python 1.0 (``nvmath.bindings.cublasLt``): ``create``,
``matmul_desc_create(compute_type, scale_type)``, ``matmul_desc_set_attribute(desc, attr,
ptr, size)`` with ``get_matmul_desc_attribute_dtype``, ``matrix_layout_create(type, rows,
cols, ld)``, ``matmul_preference_create`` / ``_set_attribute``,
``matmul_algo_get_heuristic(handle, desc, a, b, c, d, pref, count, results_ptr,
count_ptr)`` into ``MatmulHeuristicResult``, and ``matmul(handle, desc, alpha, a, adesc, b,
bdesc, beta, c, cdesc, d, ddesc, algo, workspace, workspace_size, stream)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from engine.backends.base import BackendUnavailable, UnsupportedPoint
from engine.backends.cuda_layout import LtGemm

# cudaDataType_t values (library_types.h; nvmath.CudaDataType).
CUDA_R_32F = 0
CUDA_R_16BF = 14
CUDA_R_8F_E4M3 = 28
CUDA_R_8F_E5M2 = 29
CUDA_R_4F_E2M1 = 33
COMPUTE_32F = 68  # cublasComputeType_t CUBLAS_COMPUTE_32F
OP_N, OP_T = 0, 1
# cublasLtMatmulMatrixScale_t
SCALE_VEC16_UE4M3 = 1
SCALE_VEC32_UE8M0 = 2
#: cuBLASLt's recommended workspace on Hopper and Blackwell (bytes).
WORKSPACE_BYTES = 32 << 20

_TYPES = {
    "bf16": CUDA_R_16BF,
    "fp8_e4m3": CUDA_R_8F_E4M3,
    "fp8_e5m2": CUDA_R_8F_E5M2,
    "mxfp4": CUDA_R_4F_E2M1,
    "nvfp4": CUDA_R_4F_E2M1,
}


@dataclass(frozen=True)
class MatrixLayout:
    """cublasLtMatrixLayoutCreate arguments: data type, rows, columns, leading dimension."""

    dtype: int
    rows: int
    cols: int
    ld: int


def layouts(g: LtGemm, c_type: int = CUDA_R_32F) -> dict[str, MatrixLayout]:
    """A (weights, k x n), B (activations, k x m), C (``c_type``) and D (float32), n x m,
    column-major. C is never read (beta = 0); its type only selects cuBLASLt's kernel family:
    FP8 and FP4 GEMMs with a float32 D may need a BF16 C (``C_TYPES`` are tried in turn)."""
    w_type = CUDA_R_16BF if g.kind == "bf16" else _TYPES[g.w_fmt]
    x_type = CUDA_R_16BF if g.kind == "bf16" else _TYPES[g.x_fmt]
    return {
        "a": MatrixLayout(w_type, g.k, g.n, g.k),
        "b": MatrixLayout(x_type, g.k, g.m, g.k),
        "c": MatrixLayout(c_type, g.n, g.m, g.n),
        "d": MatrixLayout(CUDA_R_32F, g.n, g.m, g.n),
    }


#: C types tried for a float32 D, in order (float32 first).
C_TYPES = (CUDA_R_32F, CUDA_R_16BF)


def scale_mode(g: LtGemm) -> int | None:
    """The block-scale mode of A and B for an FP4 GEMM, None for the others."""
    if g.kind != "fp4":
        return None
    return SCALE_VEC16_UE4M3 if g.w_fmt == "nvfp4" else SCALE_VEC32_UE8M0


class AlgoCache:
    """One heuristic query per GEMM key (``LtGemm.key``); remembers the largest workspace.

    ``query(g)`` returns an opaque algorithm and the workspace bytes it needs, or raises
    UnsupportedPoint when cuBLASLt has none for the shape.
    """

    def __init__(self, query: Callable[[LtGemm], tuple[object, int]]) -> None:
        self._query = query
        self._algos: dict[tuple, tuple[object, int]] = {}
        self.queries = 0

    def get(self, g: LtGemm) -> tuple[object, int]:
        key = g.key()
        if key not in self._algos:
            self.queries += 1
            self._algos[key] = self._query(g)
        return self._algos[key]

    @property
    def workspace_bytes(self) -> int:
        """Workspace every cached algorithm fits in."""
        return max((ws for _, ws in self._algos.values()), default=0)


class CublasLt:
    """A cuBLASLt handle, its algorithm cache and workspace (device side; needs nvmath)."""

    def __init__(self) -> None:
        try:
            import cupy
            import nvmath.bindings.cublasLt as lt
        except ImportError as exc:
            raise BackendUnavailable(
                f"nvmath-python is needed for cuBLASLt ({exc}); pip install nvmath-python"
            ) from None
        self.lt = lt
        self.cupy = cupy
        try:
            self.handle = lt.create()
        except Exception as exc:  # nvmath raises cuBLASLtError
            raise BackendUnavailable(f"cuBLASLt unavailable: {exc}") from None
        self.workspace = cupy.cuda.Memory(WORKSPACE_BYTES)
        self.cache = AlgoCache(self._heuristic)
        self._keep: list = []  # descriptors and host scalars referenced by captured graphs
        self._c_buf = None
        self._keep_buffers: list = []

    def _set(self, desc: int, attr: str, value) -> None:
        lt = self.lt
        enum = lt.MatmulDescAttribute[attr]
        buf = np.array([value], dtype=lt.get_matmul_desc_attribute_dtype(enum))
        lt.matmul_desc_set_attribute(desc, enum, buf.ctypes.data, buf.itemsize)

    def _descriptors(
        self, g: LtGemm, w_scales: int = 0, x_scales: int = 0, c_type: int = CUDA_R_32F
    ) -> tuple:
        lt = self.lt
        desc = lt.matmul_desc_create(COMPUTE_32F, CUDA_R_32F)
        self._set(desc, "TRANSA", OP_T)
        self._set(desc, "TRANSB", OP_N)
        mode = scale_mode(g)
        if mode is not None:
            self._set(desc, "A_SCALE_MODE", mode)
            self._set(desc, "B_SCALE_MODE", mode)
            if w_scales:
                self._set(desc, "A_SCALE_POINTER", w_scales)
                self._set(desc, "B_SCALE_POINTER", x_scales)
        lays = {
            name: lt.matrix_layout_create(m.dtype, m.rows, m.cols, m.ld)
            for name, m in layouts(g, c_type).items()
        }
        return desc, lays

    def _heuristic(self, g: LtGemm) -> tuple[object, int]:
        """(algorithm, workspace bytes); the algorithm carries the C type it was found for."""
        lt = self.lt
        pref = lt.matmul_preference_create()
        ws = np.array([WORKSPACE_BYTES], dtype=np.uint64)
        lt.matmul_preference_set_attribute(
            pref, lt.MatmulPreferenceAttribute.MAX_WORKSPACE_BYTES, ws.ctypes.data, 8
        )
        why = ""
        for c_type in C_TYPES:
            desc, lays = self._descriptors(g, c_type=c_type)
            results = lt.MatmulHeuristicResult(1)
            count = np.zeros(1, dtype=np.int32)
            try:
                lt.matmul_algo_get_heuristic(
                    self.handle, desc, lays["a"], lays["b"], lays["c"], lays["d"], pref, 1,
                    results.ptr, count.ctypes.data,
                )  # fmt: skip
            except Exception as exc:  # nvmath raises cuBLASLtError (not supported)
                count[0] = 0
                why = f": {' '.join(str(exc).split())[:120]}"
            if count[0] >= 1:
                if c_type != CUDA_R_32F:
                    self._grow_c(2 * g.m * g.n)
                # The algorithm struct is the result's first field, so results.ptr points at it.
                return (results, c_type), min(int(results.workspace_size), WORKSPACE_BYTES)
        raise UnsupportedPoint(
            f"cuBLASLt has no {g.kind} algorithm for m={g.m} n={g.n} k={g.k} "
            f"(w={g.w_fmt}, x={g.x_fmt}, float32 output){why}"
        )

    def _grow_c(self, nbytes: int) -> None:
        """A C buffer of another type than D: cuBLASLt forbids C == D then. Grown here, outside
        graph capture (heuristics run on the eager step); old buffers stay alive for graphs."""
        if self._c_buf is None or self._c_buf.size < nbytes:
            if self._c_buf is not None:
                self._keep_buffers.append(self._c_buf)
            self._c_buf = self.cupy.cuda.Memory(nbytes)

    def matmul(
        self, g: LtGemm, w: int, x: int, y: int, w_scales: int, x_scales: int, stream: int
    ) -> None:
        """Enqueue one GEMM on ``stream`` (capturable: no allocation happens here)."""
        lt = self.lt
        (algo, c_type), _ = self.cache.get(g)
        desc, lays = self._descriptors(g, w_scales, x_scales, c_type)
        alpha = np.array([g.alpha], dtype=np.float32)
        beta = np.zeros(1, dtype=np.float32)
        self._keep.append((desc, lays, alpha, beta))
        lt.matmul(
            self.handle,
            desc,
            alpha.ctypes.data,
            w,
            lays["a"],
            x,
            lays["b"],
            beta.ctypes.data,
            y if c_type == CUDA_R_32F else self._c_buf.ptr,  # C is not read (beta = 0)
            lays["c"],
            y,
            lays["d"],
            algo.ptr,
            self.workspace.ptr,
            WORKSPACE_BYTES,
            stream,
        )

    def release(self) -> None:
        """Destroy the descriptors kept for captured graphs (after the graphs are gone)."""
        lt = self.lt
        for desc, lays, _, _ in self._keep:
            for lay in lays.values():
                lt.matrix_layout_destroy(lay)
            lt.matmul_desc_destroy(desc)
        self._keep.clear()
