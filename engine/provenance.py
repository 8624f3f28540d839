"""Where a result came from: engine version, git commit, host, libraries, device."""

from __future__ import annotations

import datetime as _dt
import platform
import socket
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import engine

LIBRARIES = (
    "numpy",
    "numba",
    "ml_dtypes",
    "nvidia-ml-py",
    "cupy-cuda12x",
    "cupy-cuda13x",
    "nvmath-python",
    "mpi4py",
)


@lru_cache(maxsize=1)
def git_commit() -> dict:
    """The engine checkout's commit and whether it had uncommitted changes, if it is one."""
    root = Path(engine.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = (
            subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            != ""
        )
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


@lru_cache(maxsize=1)
def library_versions() -> dict:
    """Installed versions of the libraries that shape results (None when absent)."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_name() -> str:
    """The CPU's model name as the OS reports it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_info() -> dict:
    """The host: name, OS, Python."""
    return {
        "hostname": socket.gethostname(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def provenance(device: dict) -> dict:
    """Everything a record needs to say where it came from."""
    return {
        "engine_version": engine.__version__,
        "git": git_commit(),
        "host": host_info(),
        "libraries": library_versions(),
        "device": device,
        "recorded_at_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
