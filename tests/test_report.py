"""Reports from recorded result files: frontiers, interpolation, economics, missing values,
schema checks and one-line errors (figures are tested in test_report_figures.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import engine.report as report
from engine.report_compare import ratio_along
from engine.report_economics import (
    EconomicsError,
    cost_per_million_tokens,
    load_presets,
    point_economics,
    resolve_settings,
    tokens_per_s_per_mw,
)
from engine.report_frontier import Frontier, pareto_frontier, pchip_slopes
from engine.report_records import ReportError

DATA = Path(__file__).parent / "data" / "reports"
HANDMADE = str(DATA / "handmade_two_devices.jsonl")
CPU_A = str(DATA / "cpu_tiny_bf16_w4a16.jsonl")
CPU_B = str(DATA / "cpu_tiny_w8a16.jsonl")
GROUP = ("handmade-8b", 1024)


def _series(rep, label):
    return next(s for s in rep.groups[GROUP] if s.label == label)


# -- frontier and interpolation: hand-worked numbers ------------------------------------------


def test_pchip_three_points_hand_worked():
    # x = 10, 20, 40; y = 100, 60, 50: secants -4 and -1/2.
    # interior slope: (50 + 40) / (50 / -4 + 40 / -0.5) = -36/37;
    # left end: ((2*10 + 20)(-4) - 10(-0.5)) / 30 = -31/6; right end: 11/6 has the wrong
    # sign, so 0.
    f = Frontier([10, 20, 40], [100, 60, 50])
    assert f.slopes == pytest.approx([-31 / 6, -36 / 37, 0.0], rel=1e-12)
    # At a segment's middle: (y0 + y1) / 2 + h/8 (d0 - d1).
    assert f.at(15).value == pytest.approx(80 + 1.25 * (-31 / 6 + 36 / 37), rel=1e-12)
    assert f.at(30).value == pytest.approx(55 - 90 / 37, rel=1e-12)
    assert f.at(10).value == 100 and f.at(40).value == 50


def test_frontier_points_of_handmade_runs():
    rep = report.analyse([HANDMADE])
    a = _series(rep, "handmade-gpu-A bf16")
    tpj = a.metrics["tpj"]
    # B=4 (90 tok/s/user, 3.5 tok/J) is dominated by B=2 (95 tok/s/user, 3.6 tok/J).
    assert [tpj.points[i].batch for i in tpj.on] == [64, 32, 16, 8, 2, 1]
    assert tpj.frontier.xs == [25, 40, 60, 80, 95, 100]
    assert tpj.frontier.ys == [16, 14, 10, 6, 3.6, 2]
    thr = a.metrics["throughput"]
    assert [thr.points[i].batch for i in thr.on] == [64, 32, 16, 8, 4, 2, 1]


def test_interpolation_at_50_tok_s_per_user_hand_worked():
    rep = report.analyse([HANDMADE], target=50)
    a = _series(rep, "handmade-gpu-A bf16")
    # tok/J knots (25, 16), (40, 14), (60, 10), (80, 6): slope at 60 is -1/5 (equal secants);
    # at 40: (55 + 50) / (55 / (-2/15) + 50 / (-1/5)) = -42/265. Middle of [40, 60]:
    # 12 + 20/8 (d40 - d60) = 12 + 2.5 * 11/265 = 12 + 11/106.
    assert a.metrics["tpj"].query.value == pytest.approx(12 + 11 / 106, rel=1e-12)
    assert a.metrics["tpj"].query.between == (1, 2)
    # Throughput knots (25, 1600), (40, 1280), (60, 960), (80, 640): slope at 40 is
    # 105 / (55 / (-64/3) + 50 / -16) = -1344/73, at 60 is -16; value 1160 - 3360/73.
    assert a.metrics["throughput"].query.value == pytest.approx(81320 / 73, rel=1e-12)
    b = _series(rep, "handmade-gpu-B bf16")  # the same shape with twice the tok/J
    assert b.metrics["tpj"].query.value == pytest.approx(2 * (12 + 11 / 106), rel=1e-12)


@pytest.mark.parametrize("target", [20.0, 24.999, 100.001, 120.0])
def test_interpolation_refused_beyond_measured_range(target):
    rep = report.analyse([HANDMADE], target=target)
    q = _series(rep, "handmade-gpu-A bf16").metrics["tpj"].query
    assert q.value is None
    assert "outside the measured frontier range 25..100" in q.reason
    assert "not extrapolated" in q.reason


def _dominates(a, b) -> bool:
    return a[0] >= b[0] and a[1] >= b[1] and (a[0] > b[0] or a[1] > b[1])


points_strategy = st.lists(
    st.tuples(
        st.floats(1, 1e4, allow_nan=False, allow_infinity=False),
        st.floats(1e-3, 1e3, allow_nan=False, allow_infinity=False),
    ),
    min_size=1,
    max_size=30,
)


@settings(derandomize=True, deadline=None, max_examples=200)
@given(points_strategy)
def test_frontier_against_brute_force_dominance(pts):
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    idx = pareto_frontier(xs, ys)
    on = set(idx)
    for i, p in enumerate(pts):
        dominated = any(_dominates(q, p) for q in pts)
        duplicate_kept_elsewhere = any(pts[j] == p for j in on if j != i)
        if dominated or duplicate_kept_elsewhere:
            assert i not in on
        else:
            assert i in on
    # Along the frontier interactivity rises and the metric falls, strictly.
    assert all(xs[a] < xs[b] and ys[a] > ys[b] for a, b in zip(idx, idx[1:]))


@settings(derandomize=True, deadline=None, max_examples=200)
@given(points_strategy, st.floats(0, 1))
def test_interpolant_is_monotone_and_exact_at_knots(pts, u):
    made = Frontier.of_points([p[0] for p in pts], [p[1] for p in pts])
    f, _ = made
    for x, y in zip(f.xs, f.ys):
        assert f.at(x).value == pytest.approx(y, rel=1e-12)
    for k in range(len(f.xs) - 1):
        a, b = f.xs[k], f.xs[k + 1]
        x1 = a + (b - a) * u
        x2 = a + (b - a) * min(1.0, u + 0.1)
        v1, v2 = f.at(x1).value, f.at(x2).value
        tol = 1e-9 * max(f.ys[k], 1.0)
        # Never above the left knot nor below the right one, and non-increasing.
        assert f.ys[k + 1] - tol <= v2 <= v1 + tol <= f.ys[k] + 2 * tol


@settings(derandomize=True, deadline=None, max_examples=100)
@given(
    st.floats(-5, -0.01),
    st.floats(10, 1000),
    st.lists(st.floats(0.5, 50), min_size=2, max_size=8),
    st.floats(0, 1),
)
def test_pchip_reproduces_a_line(slope, intercept, gaps, u):
    xs = [1.0]
    for g in gaps:
        xs.append(xs[-1] + g)
    ys = [intercept + slope * x for x in xs]
    assert pchip_slopes(xs, ys) == pytest.approx([slope] * len(xs), rel=1e-9)
    x = xs[0] + (xs[-1] - xs[0]) * u
    assert Frontier(xs, ys).at(x).value == pytest.approx(intercept + slope * x, rel=1e-9)


# -- economics: hand-worked numbers -----------------------------------------------------------


def test_economics_formulas_hand_worked():
    # 960 tok/s per device at 1.73 kW all-in: 960 / 1.73 * 1000 tok/s per MW.
    assert tokens_per_s_per_mw(960, 1.73) == pytest.approx(554913.2947976878, rel=1e-12)
    # 1e6 * ($1.30/3600 + 1.73 kW * $0.10/kWh / 3600) / 960 = 1e6 * 1.473 / 3600 / 960.
    dev, energy, total = cost_per_million_tokens(960, 1.30, 1.73, 0.10)
    assert dev == pytest.approx(1.30 / 3.456, rel=1e-12)
    assert energy == pytest.approx(0.173 / 3.456, rel=1e-12)
    assert total == pytest.approx(1.473 / 3.456, rel=1e-12)  # 0.42621527...


def test_point_economics_measured_with_host_share_and_pue():
    rep = report.analyse(
        [HANDMADE],
        settings=resolve_settings(
            usd_per_device_hour=1.30, usd_per_kwh=0.10, host_w_per_device=104, pue=1.25
        ),
    )
    a = _series(rep, "handmade-gpu-A bf16")
    p16 = next(p for p in a.points if p.batch == 16)
    e = a.economics[id(p16)]
    # 960 tok/s and 10 tok/J: 96 W on the board; (96 + 104) W x 1.25 = 250 W = 0.25 kW.
    assert e.measured_power_w == pytest.approx(96.0, rel=1e-12)
    assert e.measured_kw == pytest.approx(0.25, rel=1e-12)
    assert e.measured_tokens_per_s_per_mw == pytest.approx(3.84e6, rel=1e-12)
    assert e.cost_kw_basis == "measured gpu-board power"
    # 1e6 * (1.30 + 0.25 * 0.10) / 3600 / 960
    assert e.usd_per_mtok == pytest.approx(1.325 / 3.456, rel=1e-12)
    assert e.usd_per_mtok_energy == pytest.approx(0.025 / 3.456, rel=1e-12)


def test_point_economics_assumed_kw_replaces_measured_for_cost():
    s = resolve_settings(all_in_kw=1.73, usd_per_device_hour=1.30, usd_per_kwh=0.10)
    e = point_economics(960.0, 96.0, "gpu-board", s)
    assert e.cost_kw == 1.73 and e.cost_kw_basis == "assumed all-in kW"
    assert e.usd_per_mtok == pytest.approx(1.473 / 3.456, rel=1e-12)
    assert e.assumed_tokens_per_s_per_mw == pytest.approx(960 / 1.73 * 1000, rel=1e-12)
    assert e.measured_tokens_per_s_per_mw == pytest.approx(1e7, rel=1e-12)  # 960 / 96 W


def test_node_boundary_gets_no_host_share():
    s = resolve_settings(host_w_per_device=100)
    e = point_economics(1000.0, 500.0, "node", s)
    assert e.host_w is None and e.measured_kw == pytest.approx(0.5)


def test_missing_power_and_prices_are_missing_not_zero():
    e = point_economics(960.0, None, None, resolve_settings(), "no power source here")
    assert e.measured_tokens_per_s_per_mw is None and e.usd_per_mtok is None
    assert "no power source here" in e.measured_reason
    assert "$/device-hour" in e.cost_reason
    only_price = point_economics(
        960.0, None, None, resolve_settings(usd_per_device_hour=2.0, usd_per_kwh=0.1)
    )
    assert only_price.usd_per_mtok is None and "no power" in only_price.cost_reason


def test_presets_have_sources_and_overrides_win():
    presets = load_presets()
    h100 = presets["inferencex-2026-05:h100:hyperscaler"]
    assert h100["all_in_kw"] == 1.73 and h100["usd_per_device_hour"] == 1.30
    assert presets["inferencex-2026-05:b200"]["all_in_kw"] == 2.17
    for p in presets.values():
        assert p["source"]["url"].startswith("https://") and p["source"]["as_of"]
    s = resolve_settings("inferencex-2026-05:h100:hyperscaler", usd_per_device_hour=2.5)
    assert s.all_in_kw == 1.73 and s.usd_per_device_hour == 2.5 and s.usd_per_kwh == 0.0
    assert s.origin["usd_per_device_hour"] == "--usd-per-device-hour"
    assert s.origin["all_in_kw"].startswith("preset inferencex-2026-05:h100:hyperscaler")
    with pytest.raises(EconomicsError, match="unknown economics preset 'nope'"):
        resolve_settings("nope")
    with pytest.raises(EconomicsError, match="--pue"):
        resolve_settings(pue=0.9)


def test_cost_frontier_at_target_uses_assumed_kw():
    rep = report.analyse(
        [HANDMADE],
        target=50,
        settings=resolve_settings(all_in_kw=1.73, usd_per_device_hour=1.30, usd_per_kwh=0.10),
    )
    a = _series(rep, "handmade-gpu-A bf16")
    # Cost is 1.473/3.6 * 1e3 / T per point (an exact function of T): its frontier runs
    # through every point, so compare at a knot, where no interpolation is involved.
    cost = a.metrics["cost"]
    at60 = cost.frontier.at(60).value
    assert at60 == pytest.approx(1e6 * 1.473 / 3600 / 960, rel=1e-12)
    assert cost.query.value is not None and cost.query.value < at60  # cheaper at lower I


# -- records: missing values, schemas, malformed files ----------------------------------------


def test_cpu_records_show_missing_energy_as_missing(tmp_path):
    text = report.write_report([CPU_A, CPU_B], str(tmp_path / "r"), figures=False)
    rep = report.analyse([CPU_A, CPU_B])
    ok = [p for p in rep.all_points if p.ok]
    assert len(ok) == 13 and all(p.tokens_per_joule is None for p in ok)
    assert all(
        p.energy_reason == "no power source on this machine (python -m engine.info says why)"
        for p in ok
    )
    lines = [ln for ln in text.splitlines() if ln.strip().startswith("tiny ")]
    assert len(lines) == 13 and all(" missing " in ln for ln in lines)
    md = (tmp_path / "r" / "summary.md").read_text()
    assert "tokens per joule missing: no power source on this machine" in md
    assert "failed: llama-3.1-8b B=1 bf16" in md
    for s in rep.groups[("tiny", 256)]:
        assert s.metrics["tpj"].frontier is None and s.metrics["tpj"].query is None
        assert s.metrics["throughput"].frontier is not None


def _write(path: Path, records: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def _cpu_record() -> dict:
    return json.loads(Path(CPU_A).read_text().splitlines()[0])


def test_mixed_schema_versions_are_refused(tmp_path):
    newer = dict(_cpu_record(), schema="tpj.record/2")
    other = _write(tmp_path / "other.jsonl", [newer])
    with pytest.raises(ReportError) as exc:
        report.analyse([CPU_A, other])
    msg = str(exc.value)
    assert "mixed record schemas" in msg and "tpj.record/1" in msg and "tpj.record/2" in msg
    assert "\n" not in msg
    with pytest.raises(ReportError, match=r"records are tpj.record/2 .* reads tpj.record/1"):
        report.analyse([other])


@pytest.mark.parametrize(
    "lines, expected",
    [
        (["{not json", None], r"bad\.jsonl:1: not valid JSON"),
        ([None, "[1, 2]"], r"bad\.jsonl:2: a record must be a JSON object"),
        ([{"point": {"model": "m", "batch": 1}, "status": "ok"}], r":1: no 'schema' field"),
        ([{"schema": "tpj.record/1", "status": "ok"}], r":1: record has no point\.model"),
        (
            [{"schema": "tpj.record/1", "point": {"model": "m", "batch": "2"}, "status": "ok"}],
            r"no whole point\.batch",
        ),
    ],
)
def test_malformed_file_gets_one_line_error(tmp_path, capsys, lines, expected):
    good = _cpu_record()
    bad = _write(tmp_path / "bad.jsonl", [good if x is None else x for x in lines])
    assert report.main([bad, "--no-figures", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("engine.report: error: ")
    import re

    assert re.search(expected, err), err
    assert not (tmp_path / "r").exists()


def test_binary_and_missing_inputs_get_one_line_errors(tmp_path, capsys):
    blob = tmp_path / "blob.jsonl"
    blob.write_bytes(bytes(range(256)))
    assert report.main([str(blob), "--no-figures"]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err
    assert report.main([str(tmp_path / "nothing-here"), "--no-figures"]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert report.main([str(tmp_path), "--no-figures"]) == 2
    assert "directory has no records.jsonl" in capsys.readouterr().err
    empty = _write(tmp_path / "empty.jsonl", [])
    assert report.main([empty, "--no-figures"]) == 2
    assert "no records in" in capsys.readouterr().err
    assert report.main([CPU_A, "--pue", "0.5", "--no-figures"]) == 2
    assert "--pue must be a number >= 1" in capsys.readouterr().err
    assert report.main([CPU_A, "--model", "nope", "--no-figures"]) == 2
    assert "--model nope: not in the records" in capsys.readouterr().err


def test_torn_last_line_skipped_and_rerun_point_superseded(tmp_path):
    first = _cpu_record()
    rerun = json.loads(json.dumps(first))
    rerun["metrics"]["interactivity_tok_s_per_user"] = 1234.5
    path = tmp_path / "run.jsonl"
    path.write_text(json.dumps(first) + "\n" + json.dumps(rerun) + "\n" + '{"schema": "tpj.re')
    rep = report.analyse([str(path)])
    assert [p.interactivity for p in rep.all_points] == [1234.5]
    assert any("torn last line skipped" in n for n in rep.notes)
    assert any("1 superseded record" in n for n in rep.notes)


def test_directory_input_and_default_out(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "records.jsonl").write_text(Path(CPU_B).read_text())
    assert report.main([str(run), "--no-figures", "--at-interactivity", "3000"]) == 0
    out = capsys.readouterr().out
    assert (run / "report" / "summary.md").is_file()
    assert "at 3000 tok/s/user" in out and "tok/s/device @3000" in out


def test_model_filter_and_list_presets(tmp_path, capsys):
    rep = report.analyse([CPU_A], models=["tiny"])
    assert {p.model for p in rep.all_points} == {"tiny"}
    assert report.main(["--list-presets"]) == 0
    out = capsys.readouterr().out
    assert "inferencex-2026-05:h100:hyperscaler: NVIDIA H100, 1.73 kW all-in, $1.3" in out


# -- comparison -------------------------------------------------------------------------------


def test_comparison_ratio_along_frontier_and_provenance(tmp_path):
    rep = report.analyse([HANDMADE])
    a = _series(rep, "handmade-gpu-A bf16").metrics["tpj"].frontier
    b = _series(rep, "handmade-gpu-B bf16").metrics["tpj"].frontier
    r = ratio_along(a, b)
    assert r.overlap == (25, 100)
    # B's points have the same interactivities and exactly twice the tok/J: PCHIP is linear
    # in y, so the ratio is 2 everywhere along the overlap.
    assert [x for x, _ in r.knots] == [25, 40, 60, 80, 95, 100]
    assert all(v == pytest.approx(2.0, rel=1e-12) for v in r.ratios)
    report.write_report([HANDMADE], str(tmp_path / "r"), compare=True, figures=False)
    md = (tmp_path / "r" / "summary.md").read_text()
    assert "| handmade-gpu-B bf16 / handmade-gpu-A bf16 | tokens per joule | 25..100 | 2 |" in md
    assert "check: power limit (W) differs" in md and "700" in md and "1000" in md
    assert "check: driver differs" in md


def test_ratio_refused_without_overlap():
    a = Frontier([10, 20], [5, 4])
    b = Frontier([30, 40], [3, 2])
    r = ratio_along(a, b)
    assert r.overlap is None and "do not overlap" in r.reason


def test_write_report_returns_summary_text(tmp_path):
    text = report.write_report(
        [HANDMADE],
        str(tmp_path / "r"),
        economics="inferencex-2026-05:h100:hyperscaler",
        figures=False,
    )
    assert text.splitlines()[0].split()[:3] == ["model", "L", "device"]
    assert "Tokens are output tokens" in text
    assert str(tmp_path / "r" / "summary.md") in text
    md = (tmp_path / "r" / "summary.md").read_text()
    assert "https://github.com/SemiAnalysisAI/InferenceX-app" in md and "as of 2026-05-07" in md
    assert math.isclose(
        _series(report.analyse([HANDMADE]), "handmade-gpu-A bf16").metrics["tpj"].query.value,
        12 + 11 / 106,
    )


def test_invalid_energy_is_kept_off_the_frontier_and_flags_are_shown(tmp_path):
    lines = Path(HANDMADE).read_text().splitlines()
    recs = [json.loads(x) for x in lines[:7]]  # device A, bf16, B = 1..64
    recs[4]["energy"]["valid"] = False  # B=16, the knot at 60 tok/s/user
    recs[4]["energy"]["flags"] = ["counter and power disagree: a vs b"]
    recs[5]["energy"]["flags"] = ["not_steady"]  # B=32 stays valid, flagged
    path = _write(tmp_path / "run.jsonl", recs)
    rep = report.analyse([path])
    a = _series(rep, "handmade-gpu-A bf16")
    p16 = next(p for p in a.points if p.batch == 16)
    assert p16.tokens_per_joule is None
    assert p16.energy_reason == "energy marked invalid: counter and power disagree: a vs b"
    assert [a.metrics["tpj"].points[i].batch for i in a.metrics["tpj"].on] == [64, 32, 8, 2, 1]
    report.write_report([path], str(tmp_path / "r"), figures=False)
    md = (tmp_path / "r" / "summary.md").read_text()
    assert "- handmade-gpu-A bf16 B=32: not_steady" in md
    assert "energy marked invalid" in md


def test_cli_without_results_is_a_one_line_error(capsys):
    assert report.main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "give one or more result directories" in err


def test_node_boundary_note_in_summary(tmp_path):
    recs = [json.loads(x) for x in Path(HANDMADE).read_text().splitlines()[:7]]
    for r in recs:
        r["energy"]["boundary"] = "node"
    path = _write(tmp_path / "node.jsonl", recs)
    report.write_report([path], str(tmp_path / "r"), host_w_per_device=50.0, figures=False)
    md = (tmp_path / "r" / "summary.md").read_text()
    assert "host share not added to node-boundary points" in md
    rep = report.analyse([path], settings=resolve_settings(host_w_per_device=50.0, pue=1.2))
    a = _series(rep, "handmade-gpu-A bf16")
    p16 = next(p for p in a.points if p.batch == 16)
    # 96 W at the node, no host share, x 1.2: 960 / 115.2e-6 tok/s per MW.
    assert a.economics[id(p16)].measured_tokens_per_s_per_mw == pytest.approx(960 / 115.2e-6)


METER = str(DATA / "handmade_meter_replay_cpu_tiny.jsonl")


def test_records_with_energy_from_the_sweep_power_session(tmp_path):
    # A real CPU sweep whose energy the engine attributed from a made-up meter log
    # (--power-log: epoch-stamped 150 W +- 1 W at 10 Hz): the energy block as the sweep writes it.
    rep = report.analyse([METER], target=2000)
    pts = [p for p in rep.all_points if p.ok]
    assert len(pts) == 6
    for p in pts:
        assert p.boundary == "node" and p.tokens_per_joule is not None
        # tokens per joule = throughput / average power, from the record's own numbers.
        assert p.tokens_per_joule == pytest.approx(
            p.throughput_per_device / p.avg_power_w, rel=1e-9
        )
    for s in rep.groups[("tiny", 256)]:
        tpj = s.metrics["tpj"]
        assert tpj.query.value is not None and tpj.on
        lo, hi = tpj.query.between
        assert tpj.frontier.ys[hi] <= tpj.query.value <= tpj.frontier.ys[lo]


def test_throughput_per_device_divides_by_every_device_of_the_group():
    from engine.report_records import view

    rec = json.loads(
        (Path(__file__).parent / "data/reports/cpu_tiny_w8a16.jsonl").read_text().splitlines()[0]
    )
    total = rec["metrics"]["throughput_tok_s"]
    rec["point"].update(tp=2, ep=2)
    assert view(rec, Path("x"), "dev").throughput_per_device == pytest.approx(total / 4)
