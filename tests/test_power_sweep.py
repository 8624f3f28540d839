"""The sweep end to end with a power source whose truth is known: an external meter's log.

The log is written beforehand from a known true power waveform over the time the sweep
will run (a 100 Hz meter, each line the mean power of its last 10 ms, stamped by the meter
on the host's monotonic clock). The sweep must attribute to each point's windows the true
energy within the uncertainty it reports, at the node boundary.
"""

from __future__ import annotations

import json
import time

import numpy as np

from engine.power import sensor_model as sm
from engine.sweep import main

METER_100HZ = sm.SensorModel(
    "power", 0.01, 0.01, resolution=0.01, stamped_by="sensor", boundary="node", name="meter"
)


def test_sweep_attributes_a_meter_log_within_its_uncertainty(tmp_path, capsys) -> None:
    rng = np.random.default_rng(11)
    t0_ns = time.monotonic_ns() - int(1e9)
    # Levels between 80 and 200 W held 20-40 s, a 0.35 s swing of +-40 W on top (so that
    # a window misplaced by tens of ms gets a different energy), and noise.
    levels = rng.uniform(80.0, 200.0, 20)
    durations = rng.uniform(20.0, 40.0, 20)
    base = sm.steps(levels, durations, dt_s=1e-3, t0_ns=t0_ns)
    t_s = np.arange(base.power_w.size) * 1e-3
    swing = sm.from_array(base.power_w + 40.0 * np.sin(2 * np.pi * t_s / 0.35), 1e-3, t0_ns)
    truth = sm.with_noise(swing, rng, 5.0, floor_w=0.0)
    samples = sm.observe(truth, METER_100HZ, 0.01, rng, truth.t0_ns, truth.t1_ns)
    log = tmp_path / "meter.csv"
    rows = "\n".join(f"{t / 1e9:.6f},{p:.3f}" for t, p in zip(samples.t_ns, samples.value))
    log.write_text("t_s,power_w\n" + rows + "\n")

    out = tmp_path / "run"
    argv = ["--model", "tiny", "--batch", "1,4", "--precision", "bf16", "--power", "none"]
    argv += ["--power-log", str(log), "--power-log-offset", "0", "--idle", "1"]
    argv += ["--power-log-averaging", "0.01"]
    argv += ["--warmup", "0.1", "--duration", "0.6", "--out", str(out)]
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for r in records:
        e = r["energy"]
        assert r["status"] == "ok" and e["boundary"] == "node" and e["valid"], e
        start = r["trace"]["t0_host_ns"] + np.array(r["trace"]["windows_s"])[:, 0] * 1e9
        end = r["trace"]["t0_host_ns"] + np.array(r["trace"]["windows_s"])[:, 1] * 1e9
        window_s = float(np.sum(end - start)) / 1e9
        true_power_w = float(np.sum(truth.energy_j(start, end))) / window_s
        # Window edges in the trace are rounded to 1 us: far below the uncertainty.
        assert abs(e["avg_power_w"] - true_power_w) <= e["avg_power_uncertainty_w"]
        assert e["avg_power_uncertainty_w"] < 0.1 * true_power_w
        step_s = r["metrics"]["step_latency_s"]
        assert e["joules_per_token"] == e["avg_power_w"] * step_s / r["point"]["batch"]
        assert e["idle_power_w"] is not None and 80.0 <= e["idle_power_w"] <= 200.0
        assert r["idle"]["replay:meter.csv"]["power_w"] == e["idle_power_w"]
    table = capsys.readouterr().out
    assert "node" in table and "null" not in table.split("\n")[2]


def test_sweep_estimates_an_unknown_meter_clock_offset(tmp_path, monkeypatch) -> None:
    """A live 'meter' in a thread logs, every 20 ms, 40 W plus 150 W times the fraction of
    its interval the device spent running decode steps, stamped on its own clock: host
    monotonic + 1234.5 s. With ``--power-log-offset auto`` the sweep must find that offset
    from the busy/idle pattern of its windows."""
    import threading

    from engine.backends.cpu import CpuRunner

    busy = {"ns": 0, "since": None}
    run_steps = CpuRunner.run_steps

    def timed_run_steps(self, n):  # the device's activity, as a meter on it would see it
        busy["since"] = time.monotonic_ns()
        try:
            return run_steps(self, n)
        finally:
            busy["ns"] += time.monotonic_ns() - busy["since"]
            busy["since"] = None

    def busy_ns(now_ns: int) -> int:
        since = busy["since"]
        return busy["ns"] + (now_ns - since if since is not None else 0)

    monkeypatch.setattr(CpuRunner, "run_steps", timed_run_steps)
    true_offset_s = -1234.5  # log time + offset = host monotonic
    log = tmp_path / "meter.csv"
    log.write_text("t_s,power_w\n")
    stop = threading.Event()

    def meter() -> None:
        t_prev = time.monotonic_ns()
        busy_prev = busy_ns(t_prev)
        with log.open("a") as f:
            while not stop.wait(0.02):
                t = time.monotonic_ns()
                b = busy_ns(t)
                watts = 40.0 + 150.0 * min(1.0, (b - busy_prev) / (t - t_prev))
                f.write(f"{t / 1e9 - true_offset_s:.6f},{watts:.3f}\n")
                f.flush()
                busy_prev, t_prev = b, t

    thread = threading.Thread(target=meter, daemon=True)
    thread.start()
    try:
        time.sleep(0.5)
        out = tmp_path / "run"
        argv = ["--model", "tiny", "--batch", "4,16", "--precision", "bf16", "--power", "none"]
        argv += ["--power-log", str(log), "--power-log-offset", "auto", "--idle", "0.5"]
        argv += ["--warmup", "0.2", "--duration", "1.0", "--out", str(out)]
        assert main(argv) == 0
    finally:
        stop.set()
        thread.join()
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    for r in records:
        found = r["energy"]["node_clock_offset"]
        assert found["confidence"] >= 0.5, found
        # The busy/idle edges are seen through 20 ms meter rows: within a few rows.
        assert abs(found["offset_s"] - true_offset_s) <= 0.06, found
        e = r["energy"]
        assert e["boundary"] == "node" and e["valid"], e
        assert 40.0 < e["avg_power_w"] <= 190.0 + e["avg_power_uncertainty_w"]
