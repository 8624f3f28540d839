"""The report's PNG figures: produced, non-empty, real images; and a one-line error when
matplotlib is missing."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

import engine.report as report
from engine.report_records import ReportError

DATA = Path(__file__).parent / "data" / "reports"
HANDMADE = str(DATA / "handmade_two_devices.jsonl")
CPU_A = str(DATA / "cpu_tiny_bf16_w4a16.jsonl")
CPU_B = str(DATA / "cpu_tiny_w8a16.jsonl")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_figures_of_handmade_runs_are_pngs(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (the 'plot' extra) is not installed")
    out = tmp_path / "r"
    report.write_report(
        [HANDMADE], str(out), compare=True, economics="inferencex-2026-05:h100:hyperscaler"
    )
    expected = {
        "tokens_per_joule_handmade-8b_L1024.png",
        "throughput_handmade-8b_L1024.png",
        "roofline_handmade-8b_L1024.png",
        "trace_handmade-8b_L1024.png",
        "compare_tokens_per_joule_handmade-8b_L1024.png",
    }
    assert {p.name for p in out.glob("*.png")} == expected
    for name in expected:
        w, h = _png_size(out / name)
        assert w >= 600 and h >= 400 and (out / name).stat().st_size > 10_000
    md = (out / "summary.md").read_text()
    for name in expected:
        assert f"![{name}]({name})" in md
    assert "handmade-gpu-A bf16 B=16 (the traced point nearest 50 tok/s/user)" in md


def test_figures_of_cpu_runs_say_what_is_not_drawn(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (the 'plot' extra) is not installed")
    out = tmp_path / "r"
    text = report.write_report([CPU_A, CPU_B], str(out), compare=True)
    drawn = {p.name for p in out.glob("*.png")}
    assert drawn == {"throughput_tiny_L256.png", "roofline_tiny_L256.png"}
    for name in drawn:
        _png_size(out / name)
    md = (out / "summary.md").read_text()
    assert "### tokens_per_joule_tiny_L256.png\n\nNot drawn: no point has tokens per joule" in md
    assert "### trace_tiny_L256.png\n\nNot drawn: no record has a power trace" in md
    assert "figures: " in text


def test_missing_matplotlib_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    # A None entry in sys.modules makes "import matplotlib" raise ImportError.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ReportError, match=r"pip install '\.\[plot\]'"):
        report.write_report([HANDMADE], str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()
    assert report.main([HANDMADE, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "matplotlib" in err
    # Without figures the report still works.
    assert report.main([HANDMADE, "--out", str(tmp_path / "r"), "--no-figures"]) == 0


def test_trace_point_picks_the_traced_record(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (the 'plot' extra) is not installed")
    out = tmp_path / "r"
    report.write_report([HANDMADE], str(out), trace_point="B=16", figures=True)
    md = (out / "summary.md").read_text()
    assert "for handmade-gpu-A bf16 B=16" in md
    _png_size(out / "trace_handmade-8b_L1024.png")
    report.write_report([HANDMADE], str(tmp_path / "s"), trace_point="B=3|")
    md = (tmp_path / "s" / "summary.md").read_text()
    assert "Not drawn: no point matching --trace-point 'B=3|' has a trace." in md


def test_trace_figure_from_sweep_records(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (the 'plot' extra) is not installed")
    meter = str(DATA / "handmade_meter_replay_cpu_tiny.jsonl")
    out = tmp_path / "r"
    report.write_report([meter], str(out), at_interactivity=2000, compare=True)
    for name in ("tokens_per_joule", "trace", "compare_tokens_per_joule"):
        _png_size(out / f"{name}_tiny_L256.png")
