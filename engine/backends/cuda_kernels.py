"""Loading our CUDA kernels: prebuilt fatbins when they fit the device, else NVRTC.

``CMakeLists.txt`` builds one fatbin per ``kernels/*.cu`` for sm_80, sm_89, sm_90a, sm_100a
and sm_120 and writes ``manifest.json`` (architectures, sources, and a digest of the sources).
At run time :func:`load_decision` (pure; tested without a device) picks the fatbins when
every source is built, the digest matches the sources on disk, and one of the built targets
runs on the device's compute capability by the CUDA binary-compatibility rules; otherwise it
compiles the sources with NVRTC through CuPy, which caches the result (``CUPY_CACHE_DIR``),
so only the first run on a new device pays for it. Nothing here is needed to install or
import the package.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.backends import cuda_abi as abi
from engine.backends.base import BackendUnavailable

#: The repository's kernels/ (a source checkout or an editable install); TPJ_KERNELS_DIR wins.
KERNELS_DIR = Path(
    os.environ.get("TPJ_KERNELS_DIR", Path(__file__).resolve().parents[2] / "kernels")
)
#: Where CMake puts the fatbins; TPJ_FATBIN_DIR wins.
FATBIN_DIR = Path(
    os.environ.get("TPJ_FATBIN_DIR", Path(__file__).resolve().parents[2] / "build" / "kernels")
)


def sources_digest(kernel_dir: Path = KERNELS_DIR) -> str:
    """SHA-256 over the kernel sources and headers, as CMakeLists.txt computes it: the hex
    digests of ``*.cu`` and ``*.cuh`` files in lexicographic path order, concatenated."""
    files = sorted([*kernel_dir.glob("*.cu"), *kernel_dir.glob("*.cuh")], key=lambda p: str(p))
    joined = "".join(hashlib.sha256(p.read_bytes()).hexdigest() for p in files)
    return hashlib.sha256(joined.encode()).hexdigest()


def arch_runs_on(arch: str, cc: tuple[int, int]) -> bool:
    """Whether machine code built for ``arch`` ("80", "90a", ...) runs on compute capability
    ``cc``: an arch-specific target ("90a") only on exactly that capability; a plain one on the
    same major version with an equal or higher minor (CUDA's binary compatibility)."""
    specific = arch.endswith("a") or arch.endswith("f")
    digits = arch.rstrip("af")
    major, minor = int(digits[:-1]), int(digits[-1])
    if specific:
        return (major, minor) == tuple(cc)
    return major == cc[0] and minor <= cc[1]


@dataclass(frozen=True)
class LoadDecision:
    """How the kernels will be loaded: ``fatbin`` (from ``directory``) or ``nvrtc``, and why."""

    mode: str
    reason: str
    directory: Path | None = None


def load_decision(
    cc: tuple[int, int],
    fatbin_dir: Path = FATBIN_DIR,
    kernel_dir: Path = KERNELS_DIR,
    needed: tuple[str, ...] | None = None,
) -> LoadDecision:
    """Prebuilt fatbins or NVRTC for a device of compute capability ``cc`` (see module doc)."""
    needed = tuple(abi.sources()) if needed is None else needed
    manifest_path = fatbin_dir / "manifest.json"
    if not manifest_path.is_file():
        return LoadDecision("nvrtc", f"no prebuilt kernels in {fatbin_dir} (run cmake)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        return LoadDecision("nvrtc", f"unreadable {manifest_path}: {exc}")
    missing = [
        s
        for s in needed
        if s not in manifest.get("sources", []) or not (fatbin_dir / f"{s}.fatbin").is_file()
    ]
    if missing:
        return LoadDecision("nvrtc", f"prebuilt kernels lack {', '.join(missing)}")
    digest = manifest.get("digest")
    if kernel_dir.is_dir() and digest != sources_digest(kernel_dir):
        return LoadDecision("nvrtc", "the kernel sources changed since the fatbins were built")
    archs = manifest.get("archs", [])
    fits = [a for a in archs if arch_runs_on(a, cc)]
    if not fits:
        return LoadDecision(
            "nvrtc", f"no prebuilt target runs on sm_{cc[0]}{cc[1]} (built: {', '.join(archs)})"
        )
    return LoadDecision(
        "fatbin", f"prebuilt sm_{fits[0]} code runs on sm_{cc[0]}{cc[1]}", fatbin_dir
    )


def pack_args(name: str, values: list) -> tuple:
    """Arguments of kernel ``name`` as the numpy scalars CuPy passes by value (see cuda_abi)."""
    codes = abi.SIGNATURES[name][1]
    if len(codes) != len(values):
        raise ValueError(f"{name}: {len(values)} arguments for {len(codes)} parameters")
    conv = {"p": np.uint64, "q": np.int64, "i": np.int32, "f": np.float32}
    return tuple(conv[c](v) for c, v in zip(codes, values))


class KernelSet:
    """Every entry point of our kernels as a launchable CuPy function (device side)."""

    def __init__(self, cc: tuple[int, int], decision: LoadDecision | None = None) -> None:
        try:
            import cupy
        except ImportError as exc:  # pragma: no cover - needs CuPy
            raise BackendUnavailable(f"CuPy is not installed ({exc})") from None
        self.decision = decision or load_decision(cc)
        self._modules = {}
        for src in abi.sources():
            try:
                if self.decision.mode == "fatbin":
                    assert self.decision.directory is not None
                    path = self.decision.directory / f"{src}.fatbin"
                    self._modules[src] = cupy.RawModule(path=str(path))
                else:
                    code = (KERNELS_DIR / f"{src}.cu").read_text()
                    self._modules[src] = cupy.RawModule(
                        code=code,
                        options=("-std=c++17", f"-I{KERNELS_DIR}"),
                        backend="nvrtc",
                    )
            except Exception as exc:  # CuPy raises several types for compile/load failures
                msg = " ".join(str(exc).split())[:300]
                raise BackendUnavailable(
                    f"cannot load kernels/{src}.cu ({self.decision.mode}): {type(exc).__name__}: {msg}"
                ) from None
        self._functions: dict = {}

    def function(self, name: str):
        """The CuPy RawKernel of entry point ``name``."""
        if name not in self._functions:
            src = abi.SIGNATURES[name][0]
            self._functions[name] = self._modules[src].get_function(name)
        return self._functions[name]

    def launch(self, name: str, grid, block: int, values: list, stream) -> None:
        """Launch ``name`` on ``stream`` with raw argument values (pointers as ints)."""
        # CuPy launches on the current stream (RawKernel takes no stream argument).
        with stream:
            self.function(name)(tuple(grid), (int(block), 1, 1), pack_args(name, values))
