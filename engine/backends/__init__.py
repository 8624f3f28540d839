"""Backends: what executes a plan. ``select_backend`` resolves a name to an instance."""

from __future__ import annotations

import importlib.util

from engine.backends.base import Backend, BackendUnavailable

BACKENDS = ("auto", "cpu", "cuda")


def cuda_unavailable_reason() -> str | None:
    """Why the CUDA backend cannot run here (None when it can)."""
    if importlib.util.find_spec("engine.backends.cuda") is None:
        return "the cuda backend is not part of this engine version yet"
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed (pip install '.[cuda13]' or '.[cuda12]')"
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device is visible"
    except Exception as exc:  # any CUDA runtime failure means no usable GPU
        return f"no usable CUDA device ({type(exc).__name__}: {exc})"
    return None


def select_backend(name: str, memory_budget_gb: float | None = None) -> tuple[Backend, str]:
    """The backend for ``name`` and a note on why it was chosen.

    ``auto`` picks CUDA when a GPU and CuPy are present, else the CPU.
    Raises BackendUnavailable (one-line message) when an explicit choice cannot run.
    """
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend '{name}'; choose from {', '.join(BACKENDS)}")
    if name in ("auto", "cuda"):
        reason = cuda_unavailable_reason()
        if reason is None:
            from engine.backends.cuda import CudaBackend  # type: ignore[import-not-found]

            return CudaBackend(memory_budget_gb=memory_budget_gb), "a CUDA device is present"
        if name == "cuda":
            raise BackendUnavailable(f"backend cuda cannot run here: {reason}")
        note = f"cpu (cuda not used: {reason})"
    else:
        note = "cpu (asked for)"
    from engine.backends.cpu import CpuBackend

    return CpuBackend(memory_budget_gb=memory_budget_gb), note
