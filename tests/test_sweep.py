"""The sweep end to end on the CPU backend: files, table, resume, failures, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import engine.sweep as sweep
from engine.results import ResultStore

QUICK = [
    "--model",
    "tiny",
    "--batch",
    "1,2",
    "--context",
    "32",
    "--precision",
    "bf16",
    "--warmup",
    "0.05",
    "--duration",
    "0.1",
    "--backend",
    "cpu",
]


def test_sweep_writes_records_table_and_resumes(tmp_path, capsys, small_peaks):
    out = tmp_path / "run"
    assert sweep.main(QUICK + ["--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "tok/s/user" in printed.out and "tiny" in printed.out
    records = ResultStore(out).read()
    assert len(records) == 2 and all(r["status"] == "ok" for r in records)
    r = records[0]
    for field in ("engine_version", "git", "host", "libraries", "device"):
        assert field in r["provenance"]
    assert r["energy"]["energy_j"] is None and r["energy"]["reason"]
    assert r["timing"]["steps"] >= 3 and r["metrics"]["throughput_tok_s"] > 0
    assert r["plan"]["flops"] > 0 and r["roofline"]["step_time_s"] > 0
    assert (out / "results.csv").read_text().count("\n") == 3
    # Rerun: nothing left to do, nothing duplicated.
    assert sweep.main(QUICK + ["--out", str(out)]) == 0
    assert "0 to run" in capsys.readouterr().err
    assert len(ResultStore(out).read()) == 2


def test_failed_point_is_recorded_and_sweep_goes_on(tmp_path, monkeypatch, small_peaks):
    real = sweep.measure_point
    calls = {"n": 0}

    def flaky(backend, plan, *args, **kwargs):
        calls["n"] += 1
        if plan.point.batch == 1:
            raise MemoryError
        return real(backend, plan, *args, **kwargs)

    monkeypatch.setattr(sweep, "measure_point", flaky)
    assert sweep.main(QUICK + ["--out", str(tmp_path)]) == 0
    by_batch = {r["point"]["batch"]: r for r in ResultStore(tmp_path).read()}
    assert by_batch[1]["status"] == "failed" and "out of memory" in by_batch[1]["error"]
    assert by_batch[2]["status"] == "ok"
    # A rerun keeps the failure unless asked to retry it.
    monkeypatch.setattr(sweep, "measure_point", real)
    assert sweep.main(QUICK + ["--out", str(tmp_path)]) == 0
    assert len(ResultStore(tmp_path).read()) == 2
    assert sweep.main(QUICK + ["--out", str(tmp_path), "--retry-failed"]) == 0
    assert [r["status"] for r in ResultStore(tmp_path).read()] == ["failed", "ok", "ok"]


def test_interrupt_keeps_finished_points_and_resumes(tmp_path, monkeypatch, small_peaks):
    real = sweep.measure_point

    def interrupted(backend, plan, *args, **kwargs):
        if plan.point.batch == 2:
            raise KeyboardInterrupt
        return real(backend, plan, *args, **kwargs)

    monkeypatch.setattr(sweep, "measure_point", interrupted)
    assert sweep.main(QUICK + ["--out", str(tmp_path)]) == 130
    assert [r["point"]["batch"] for r in ResultStore(tmp_path).read()] == [1]
    monkeypatch.setattr(sweep, "measure_point", real)
    assert sweep.main(QUICK + ["--out", str(tmp_path)]) == 0
    assert sorted(r["point"]["batch"] for r in ResultStore(tmp_path).read()) == [1, 2]


def test_too_big_for_memory_budget_is_a_failed_point(tmp_path, small_peaks):
    args = [
        "--model",
        "llama-3.1-8b",
        "--batch",
        "1",
        "--context",
        "16",
        "--precision",
        "bf16",
        "--backend",
        "cpu",
        "--memory-gb",
        "0.5",
        "--out",
        str(tmp_path),
    ]
    assert sweep.main(args) == 0
    (record,) = ResultStore(tmp_path).read()
    assert record["status"] == "failed" and "--memory-gb" in record["error"]


def test_layers_beyond_budget_are_scaled_and_said(tmp_path, small_peaks):
    args = [
        "--model",
        "tiny-moe",
        "--batch",
        "2",
        "--context",
        "16",
        "--precision",
        "bf16",
        "--backend",
        "cpu",
        "--warmup",
        "0",
        "--duration",
        "0.05",
        "--out",
        str(tmp_path),
    ]
    # Budget for the head and two of the three layers.
    from engine.models import load_spec
    from engine.plan import build_plan
    from engine.point import Point
    from engine.precision import parse_precision
    from engine.weights import layer_footprint_bytes

    spec = load_spec("tiny-moe")
    plan = build_plan(spec, Point("tiny-moe", 2, 16, parse_precision("bf16")))
    head = sum(op.weight_storage_bytes for op in plan.ops if op.layer == -1)
    budget = head + layer_footprint_bytes(plan, 0) + layer_footprint_bytes(plan, 1) + 100
    assert sweep.main(args + ["--memory-gb", str(budget / 1e9)]) == 0
    (record,) = ResultStore(tmp_path).read()
    t = record["timing"]
    assert record["status"] == "ok"
    assert (t["layers_run"], t["layers_total"], t["scaled_from_layers"]) == (2, 3, True)
    assert t["step_time_s"]["mean"] > t["measured_step_time_s"]["mean"]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--model", "no-such-model"], "no-such-model"),
        (["--batch", "0"], "--batch"),
        (["--batch", "two"], "--batch"),
        (["--context", "-5"], "--context"),
        (["--precision", "fp3"], "fp3"),
        (["--precision", "fp4"], "cpu backend has no nvfp4"),
        (["--backend", "tpu"], "tpu"),
        (["--routing", "zipf:-2"], "routing"),
        (["--duration", "0"], "--duration"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, words, capsys, tmp_path):
    assert (
        sweep.main(
            args + ["--backend", "cpu", "--out", str(tmp_path)]
            if "--backend" not in args
            else args + ["--out", str(tmp_path)]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and "Traceback" not in err


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "engine.sweep", "--model", "nope", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_list_models(capsys):
    assert sweep.main(["--list-models"]) == 0
    names = capsys.readouterr().out.split()
    assert "llama-3.1-8b" in names and "deepseek-v3" in names


def test_records_are_json_lines(tmp_path, small_peaks):
    assert sweep.main(QUICK + ["--batch", "1", "--out", str(tmp_path)]) == 0
    for line in (tmp_path / "records.jsonl").read_text().splitlines():
        json.loads(line)
