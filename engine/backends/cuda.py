"""The CUDA backend: synthetic decode steps on an NVIDIA GPU, as fast as the hardware allows.

GEMMs go to cuBLASLt (BF16, FP8 with scales on sm_89+, block-scaled FP4 on sm_100+) through
nvmath-python's low-level bindings; our kernels (``kernels/``) do attention decode, weight-only
FP8/FP4 GEMV and tensor-core GEMM (how FP4 runs on Hopper), norms, SwiGLU, MoE routing and the
``%globaltimer`` stamps. A step is laid out as data (``cuda_layout``), captured in a CUDA graph
and replayed (``cuda_runner``). Points the device cannot run (FP8 arithmetic below sm_89,
native FP4 below sm_100) raise UnsupportedPoint at ``prepare``: the sweep records them as
unsupported and goes on.
"""

from __future__ import annotations

import importlib.metadata

import numpy as np

from engine.backends import cuda_gemm as cg
from engine.backends.base import Backend, BackendUnavailable, UnsupportedPoint
from engine.backends.cuda_layout import DeviceCaps, LtGemm, Ref
from engine.plan import Plan
from engine.precision import Precision
from engine.roofline import Peaks

#: Memory left free for the driver, cuBLASLt and CuPy (bytes), at least.
MEMORY_MARGIN_BYTES = 2 << 30
MEMORY_MARGIN_FRACTION = 0.05
#: Copy-bandwidth buffer: far larger than any L2 cache (bytes, per direction).
PEAK_COPY_BYTES = 2 << 30
#: Matmul size for the peak rate per arithmetic (m = n = k).
PEAK_MATMUL_N = 8192
PEAK_REPEATS = 10
MIN_CC = (8, 0)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


class CudaBackend(Backend):
    """One CUDA device (the current one) with CuPy, cuBLASLt and our kernels."""

    name = "cuda"

    def __init__(self, memory_budget_gb: float | None = None, device: int = 0) -> None:
        try:
            import cupy
        except ImportError as exc:
            raise BackendUnavailable(f"CuPy is not installed ({exc})") from None
        self.cp = cupy
        try:
            cupy.cuda.Device(device).use()
            self.props = cupy.cuda.runtime.getDeviceProperties(device)
        except Exception as exc:  # CuPy raises CUDARuntimeError
            raise BackendUnavailable(f"no usable CUDA device {device}: {exc}") from None
        self.device = device
        try:  # matches the device to its NVML sensors (CUDA and NVML number GPUs differently)
            self.pci_bus_id: str | None = cupy.cuda.Device(device).pci_bus_id
        except Exception:
            self.pci_bus_id = None
        cc = (int(self.props["major"]), int(self.props["minor"]))
        if cc < MIN_CC:
            raise BackendUnavailable(
                f"the cuda backend needs sm_80 or newer (BF16 tensor cores); this is sm_{cc[0]}{cc[1]}"
            )
        self.caps = DeviceCaps(
            cc=cc,
            sm_count=int(self.props["multiProcessorCount"]),
            l2_bytes=int(self.props["l2CacheSize"]),
        )
        self._budget_gb = memory_budget_gb
        self._kernels = None
        self._lt = None

    # -- lazily created device resources -------------------------------------------------

    @property
    def kernels(self):
        """Our kernels, loaded from fatbins or compiled with NVRTC on first use."""
        if self._kernels is None:
            from engine.backends.cuda_kernels import KernelSet

            self._kernels = KernelSet(self.caps.cc)
        return self._kernels

    @property
    def lt(self):
        """The cuBLASLt handle, algorithm cache and workspace."""
        if self._lt is None:
            from engine.backends.cuda_blaslt import CublasLt

            self._lt = CublasLt()
        return self._lt

    # -- Backend ---------------------------------------------------------------------------

    def device_info(self) -> dict:
        rt = self.cp.cuda.runtime
        free_b, total_b = rt.memGetInfo()
        name = self.props["name"]
        from engine.backends.cuda_kernels import load_decision

        decision = load_decision(self.caps.cc)
        return {
            "kind": "cuda",
            "name": name.decode() if isinstance(name, bytes) else str(name),
            "compute_capability": f"{self.caps.cc[0]}.{self.caps.cc[1]}",
            "sm_count": self.caps.sm_count,
            "l2_bytes": self.caps.l2_bytes,
            "memory_total_bytes": int(total_b),
            "memory_free_bytes": int(free_b),
            "sm_clock_max_khz": int(self.props.get("clockRate", 0)) or None,
            "memory_clock_max_khz": int(self.props.get("memoryClockRate", 0)) or None,
            "memory_bus_bits": int(self.props.get("memoryBusWidth", 0)) or None,
            "driver_version": rt.driverGetVersion(),
            "runtime_version": rt.runtimeGetVersion(),
            "kernels": {"mode": decision.mode, "reason": decision.reason},
            "cupy": _version("cupy-cuda13x") or _version("cupy-cuda12x") or _version("cupy"),
            "nvmath_python": _version("nvmath-python"),
        }

    def device_unsupported(self, precision: Precision) -> str | None:
        """Why this device cannot run ``precision`` (FP8 below sm_89, native FP4 below sm_100)."""
        return cg.unsupported_reason(precision.weight, precision.activation, self.caps.cc)

    def precision_unsupported(self, precision: Precision) -> str | None:
        # Every format runs on some CUDA device; what this device lacks is raised per point by
        # prepare() (UnsupportedPoint), so a sweep records it and goes on.
        return None

    def memory_budget_bytes(self) -> int:
        if self._budget_gb is not None:
            return int(self._budget_gb * 1e9)
        free_b, total_b = self.cp.cuda.runtime.memGetInfo()
        margin = max(MEMORY_MARGIN_BYTES, int(MEMORY_MARGIN_FRACTION * total_b))
        return max(0, int(free_b) - margin)

    def prepare(self, plan: Plan, layers: list[int], seed: int, comm=None):
        """A runner for ``plan``; ``comm`` (``engine.dist.Groups``) when it is one rank's
        tensor-parallel shard (NCCL all-reduces; unverified on GPUs)."""
        reason = self.device_unsupported(plan.point.precision)
        if reason:
            raise UnsupportedPoint(reason)
        from engine.backends.cuda_runner import CudaRunner

        return CudaRunner(self, plan, layers, seed, groups=comm)

    # -- peaks -----------------------------------------------------------------------------

    def _time_ms(self, fn, repeats: int = PEAK_REPEATS, warmup: int = 3) -> float:
        """Median time of ``fn()`` (device work on the current stream) in ms, by CUDA events."""
        cp = self.cp
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start, stop = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, stop))
        return float(np.median(times))

    def copy_bandwidth_gbps(self, nbytes: int = PEAK_COPY_BYTES) -> float:
        """Device-to-device copy rate, bytes read + written, GB/s (median of repeats)."""
        cp = self.cp
        src = cp.random.default_rng(1).integers(0, 2**31, size=nbytes // 4, dtype=cp.int32)
        dst = cp.empty_like(src)
        rt = cp.cuda.runtime
        stream = cp.cuda.get_current_stream()

        def copy():
            rt.memcpyAsync(dst.data.ptr, src.data.ptr, nbytes, rt.memcpyDeviceToDevice, stream.ptr)

        ms = self._time_ms(copy)
        return 2 * nbytes / (ms * 1e-3) / 1e9

    def matmul_tflops(self, kind: str, n: int = PEAK_MATMUL_N) -> float:
        """cuBLASLt rate for an n x n x n GEMM of arithmetic ``kind`` on random operands."""
        cp = self.cp
        rng = cp.random.default_rng(2)
        fmt = {"bf16": "bf16", "fp8": "fp8_e4m3", "fp4": "nvfp4"}[kind]
        if kind == "bf16":
            bits = rng.standard_normal(2 * n * n, dtype=cp.float32).view(cp.uint32) >> 16
            w, x = bits[: n * n].astype(cp.uint16), bits[n * n :].astype(cp.uint16)
        else:
            raw = rng.integers(0, 256, size=2 * n * n, dtype=cp.int32).astype(cp.uint8)
            if kind == "fp8":
                raw &= 0xF7  # no NaN codes (0x7f / 0xff)
            else:
                raw = raw[: n * n]  # two FP4 values a byte
            w, x = raw[: raw.size // 2], raw[raw.size // 2 :]
        y = cp.empty(n * n, dtype=cp.float32)
        scales = {}
        if kind == "fp4":
            rows_p, groups_p = n, n // 16
            for name in ("w", "x"):
                s = rng.integers(0x30, 0x40, size=rows_p * groups_p, dtype=cp.int32).astype(
                    cp.uint8
                )
                scales[name] = s
        g = LtGemm(
            kind=kind, m=n, n=n, k=n, w_fmt=fmt, x_fmt=fmt, w=Ref("w"), x=Ref("x"), y=Ref("y"),
            alpha=1.0, w_scales=None, x_scales=None, op="peak", layer=-1,
        )  # fmt: skip
        stream = cp.cuda.get_current_stream()
        lt = self.lt

        def run():
            lt.matmul(
                g,
                w.data.ptr,
                x.data.ptr,
                y.data.ptr,
                scales["w"].data.ptr if scales else 0,
                scales["x"].data.ptr if scales else 0,
                stream.ptr,
            )

        ms = self._time_ms(run)
        return 2.0 * n**3 / (ms * 1e-3) / 1e12

    def measure_peaks(self) -> Peaks:
        rates: dict[str, float] = {"bf16": self.matmul_tflops("bf16")}
        skipped = []
        for kind, need in (("fp8", cg.FP8_MIN_CC), ("fp4", cg.FP4_MIN_CC)):
            if self.caps.cc >= need:
                try:
                    rates[kind] = self.matmul_tflops(kind)
                except UnsupportedPoint as exc:
                    skipped.append(f"{kind}: {exc}")
        copy = self.copy_bandwidth_gbps()
        method = (
            f"copy: device-to-device cudaMemcpyAsync of {PEAK_COPY_BYTES >> 30} GiB (random data, "
            f"far larger than the {self.caps.l2_bytes >> 20} MiB L2), median of {PEAK_REPEATS} "
            f"by CUDA events, bytes read + written; matmul: cuBLASLt {PEAK_MATMUL_N}^3 per "
            f"arithmetic on random operands (FP8 E4M3 TN, NVFP4 block-scaled), float32 output, "
            f"median of {PEAK_REPEATS}"
        )
        if skipped:
            method += "; not measured: " + "; ".join(skipped)
        return Peaks(copy_bw_gbps=copy, matmul_tflops=rates, method=method)
