"""``python -m engine.info`` and ``engine.power.discover``: the report on this machine (no GPU,
no RAPL here), its JSON form, and the GPU sources it lists with a stand-in pynvml."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from fake_pynvml import NVML_ERROR_LIBRARY_NOT_FOUND, FakeGpu, FakeNvml

from engine import info
from engine.power import rapl
from engine.power.discover import discover_sources, parse_spec

MODULE_LABELS = {"nvml": "NVML", "rapl": "RAPL", "amdsmi": "AMD SMI"}


class TickingNvml(FakeNvml):
    """A fake whose energy counter advances by 7 mJ every ``period_s`` of host time."""

    def __init__(self, gpus, period_s: float) -> None:
        super().__init__(gpus)
        self.period_ns = int(period_s * 1e9)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle) -> int:
        super().nvmlDeviceGetTotalEnergyConsumption(handle)
        return 7 * (time.monotonic_ns() // self.period_ns)


def _no_hardware(monkeypatch, tmp_path) -> None:
    """Pin the machine to 'nothing here', whatever the test host has."""
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([], NVML_ERROR_LIBRARY_NOT_FOUND))
    monkeypatch.setitem(sys.modules, "amdsmi", None)
    monkeypatch.setattr(rapl, "DEFAULT_ROOT", tmp_path / "no-powercap")


def test_parse_spec():
    assert parse_spec("auto") == ("nvml", "rapl", "amdsmi")
    assert parse_spec("none") == ()
    assert parse_spec(" RAPL , nvml,rapl") == ("rapl", "nvml")
    for bad in ("nvml,foo", "", "auto,nvml"):
        with pytest.raises(ValueError) as err:
            parse_spec(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="choose from auto, none, nvml, rapl, amdsmi"):
        parse_spec("nvml,foo")


def test_discover_lists_each_missing_module_once(monkeypatch, tmp_path):
    _no_hardware(monkeypatch, tmp_path)
    sources, reasons = discover_sources("auto")
    assert sources == []
    assert len(reasons) == 3
    for label in MODULE_LABELS.values():
        assert sum(r.startswith(label) for r in reasons) == 1
    sources, reasons = discover_sources("rapl,rapl")
    assert reasons == [
        f"RAPL: no powercap interface at {tmp_path / 'no-powercap'} (not Linux, or no RAPL driver)"
    ]


def test_discover_with_a_power_log_only(tmp_path):
    log = tmp_path / "meter.csv"
    log.write_text(f"t,power_w\n{time.time() - 1:.3f},250\n{time.time():.3f},260\n")
    sources, reasons = discover_sources("none", power_log=log)
    assert [s.info.boundary for s in sources] == ["node"] and reasons == []
    with pytest.raises(ValueError, match="no value column"):
        discover_sources("none", power_log=_bad_log(tmp_path))


def _bad_log(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("t,volts\n0,1\n")
    return path


def test_info_on_this_machine_prints_sources_or_reasons(capsys):
    assert info.main(["--probe-seconds", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "power sources (" in out and "missing or skipped sources (" in out
    # whatever this host has, each module shows up as a source or as a reason
    for module, label in MODULE_LABELS.items():
        assert f"  {module}:" in out or f"  - {label}" in out


def test_info_with_nothing_prints_the_reasons(monkeypatch, tmp_path, capsys):
    _no_hardware(monkeypatch, tmp_path)
    assert info.main(["--probe-seconds", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "power sources (0):" in out
    assert "NVML: nvmlInit failed: NVML Shared Library Not Found" in out
    assert "RAPL: no powercap interface" in out
    assert "AMD SMI: the amdsmi Python library is not installed" in out


def test_info_json_parses_from_the_command_line():
    done = subprocess.run(
        [sys.executable, "-m", "engine.info", "--json", "--probe-seconds", "0.05"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report) >= {"host", "cuda", "power_sources", "missing_sources", "gpu_state"}
    assert report["host"]["logical_cpus"] >= 1
    assert len(report["power_sources"]) + len(report["missing_sources"]) >= 3


def test_info_lists_gpu_sources_with_a_fake_nvml(monkeypatch, tmp_path, capsys):
    _no_hardware(monkeypatch, tmp_path)
    now_us = time.time_ns() // 1000
    samples = [(now_us - 10_000 * k, 200_000 + k) for k in range(5, 0, -1)]  # every 10 ms
    gpu = FakeGpu(
        instant={0: (250_000, now_us)}, average_mw=240_000, reason_bits=0x4, samples=samples
    )
    monkeypatch.setitem(sys.modules, "pynvml", TickingNvml([gpu], period_s=0.02))
    assert info.main(["--json", "--probe-seconds", "0.3"]) == 0
    report = json.loads(capsys.readouterr().out)
    by_name = {s["name"]: s for s in report["power_sources"]}
    assert set(by_name) == {
        "nvml:0:energy",
        "nvml:0:power-instant",
        "nvml:0:power-average",
        "nvml:0:power-samples",
    }
    buffered = by_name["nvml:0:power-samples"]
    assert buffered["supports"]["read_buffered"]
    assert not by_name["nvml:0:energy"]["supports"]["read_buffered"]
    # discovery's probe drained the buffer; the info probe saw what came after (nothing)
    assert buffered["buffer_probe"]["n_samples"] == 0
    energy = by_name["nvml:0:energy"]
    assert energy["quantity"] == "energy" and energy["boundary"] == "gpu-board"
    # the counter ticks every 20 ms: the probe measures that, not the 100 ms stated
    assert energy["update_period_s"] == 0.1
    assert energy["probe"]["update_period_median_s"] == pytest.approx(0.02, rel=0.2)
    assert by_name["nvml:0:power-average"]["probe"]["update_period_median_s"] is None
    state = report["gpu_state"]["0"]
    assert state["power_limit_w"] == 700.0 and state["clock_event_reasons"] == ["sw_power_cap"]
    assert any("module" in r for r in report["missing_sources"])


def test_info_rejects_a_bad_source_name(capsys):
    assert info.main(["--sources", "nvml,bogus", "--probe-seconds", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "unknown power source 'bogus'" in err and err.count("\n") == 1
