"""Launching ``mpirun -n N`` from a test: skip reasons, flags, environment, a hard timeout.

Imported by the ``test_mpi_*`` files (not a test module itself).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def skip_reason() -> str | None:
    """Why MPI tests cannot run here (None when they can)."""
    if shutil.which("mpirun") is None:
        return "mpirun not found (install Open MPI: apt-get install openmpi-bin libopenmpi-dev)"
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py not installed (pip install '.[mpi]')"
    return None


if os.environ.get("TPJ_REQUIRE_MPI") and skip_reason() is not None:
    # CI installed MPI: a missing piece must fail the run, not skip the tests quietly.
    raise RuntimeError(f"TPJ_REQUIRE_MPI is set but {skip_reason()}")

needs_mpi = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))


def root_flags() -> list[str]:
    """Open MPI refuses to run as root unless told to (CI containers run as root)."""
    return ["--allow-run-as-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []


def mpirun_argv(n: int, extra: list[str] | None = None) -> list[str]:
    """``mpirun -n N --oversubscribe`` (and ``--allow-run-as-root`` as root)."""
    return ["mpirun", "-n", str(n), "--oversubscribe", *root_flags(), *(extra or [])]


def mpi_env(**extra: str) -> dict[str, str]:
    """The environment for the ranks: no shared-memory single-copy (it needs ptrace, which
    containers often forbid), one Numba thread pool per rank."""
    env = dict(os.environ)
    env.setdefault("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra)
    return env


def run_ranks(
    n: int, program: list[str], timeout_s: float, extra: list[str] | None = None, **env: str
) -> subprocess.CompletedProcess:
    """Run ``python <program...>`` on ``n`` ranks; fail the test (not hang) past the timeout."""
    argv = mpirun_argv(n, extra) + [sys.executable] + program
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=mpi_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"mpirun did not finish within {timeout_s} s (a rank hangs)\n{err[-3000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def small_cpu_peaks() -> None:
    """Measure peaks and the link on small buffers so that a rank starts in a second."""
    import engine.backends.cpu as cpu
    import engine.dist.linkbw as linkbw

    cpu.PEAK_COPY_BYTES = 16 << 20
    cpu.PEAK_MATMUL_N = 256
    linkbw.LINK_BYTES = 1 << 20
