"""A rank killed in the middle of a point: a failed record, the finished points kept, no hang.

The sweep runs on 2 ranks (``mpirun -n 2``); once rank 0 says the second point is being
measured, the test kills rank 1 with SIGKILL. With mpirun's defaults the launcher then
ends the job (SIGTERM to rank 0, SIGKILL a second later), and rank 0 must have recorded the
point as failed; with ``--enable-recovery`` (Open MPI 4) rank 0 lives on, and its collective
must time out (``--comm-timeout``) instead of waiting forever.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mpi_launch import ROOT, mpi_env, mpirun_argv, needs_mpi, root_flags

SWEEP = ["--model", "tiny", "--batch", "2,4", "--context", "32", "--precision", "bf16"]
SWEEP += ["--warmup", "0.05", "--duration", "2", "--backend", "cpu", "--tp", "2"]
SWEEP += ["--power", "none", "--repetitions", "2"]


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc)."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found += kids
        frontier += kids
    return found


def _rank_pid(launcher: int, rank: int) -> int | None:
    for pid in _children(launcher):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"OMPI_COMM_WORLD_RANK={rank}".encode() in env:
            return pid
    return None


def _kill_rank1_during_point2(out: Path, extra: list[str], timeout_s: float) -> tuple[int, str]:
    argv = mpirun_argv(2, extra) + [sys.executable, str(Path(__file__))] + SWEEP
    argv += ["--out", str(out), "--comm-timeout", "3"]
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=mpi_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    second_point_measuring = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "[2/2]" in "".join(lines) and "measuring" in line:
                second_point_measuring.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert second_point_measuring.wait(60), "".join(lines)[-3000:]
        time.sleep(0.3)  # well inside the 2 s of measured windows
        victim = _rank_pid(proc.pid, 1)
        assert victim is not None, "rank 1 not found among mpirun's children"
        os.kill(victim, signal.SIGKILL)
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the run hung after rank 1 died\n{''.join(lines)[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(5)
    return code, "".join(lines)


def _check_records(out: Path) -> dict:
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    by_batch = {r["point"]["batch"]: r for r in records}
    assert sorted(by_batch) == [2, 4] and len(records) == 2
    assert by_batch[2]["status"] == "ok"  # the finished point is kept
    failed = by_batch[4]
    assert failed["status"] == "failed" and failed["scope"] == "cluster"
    assert "|rank=all|" in failed["key"]
    assert not (out / "inflight.json").exists()
    return failed


@needs_mpi
def test_killed_rank_fails_the_point_under_mpiruns_default(tmp_path):
    code, log = _kill_rank1_during_point2(tmp_path, [], timeout_s=60)
    assert code != 0
    failed = _check_records(tmp_path)
    assert "terminated" in failed["error"] or "did not answer" in failed["error"], failed


def _has_enable_recovery() -> bool:
    try:
        argv = ["mpirun", *root_flags(), "--help", "all"]
        text = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--enable-recovery" in text


@needs_mpi
def test_killed_rank_times_out_when_the_launcher_lets_rank0_live(tmp_path):
    if not _has_enable_recovery():
        pytest.skip("this mpirun has no --enable-recovery (Open MPI 4's)")
    t0 = time.monotonic()
    code, log = _kill_rank1_during_point2(tmp_path, ["--enable-recovery"], timeout_s=60)
    failed = _check_records(tmp_path)
    assert "did not answer within 3 s" in failed["error"], failed
    assert "rank(s) 1" in failed["error"]
    assert time.monotonic() - t0 < 60


if __name__ == "__main__":
    from mpi_launch import small_cpu_peaks

    small_cpu_peaks()
    from engine.sweep import main

    sys.exit(main(sys.argv[1:]))
