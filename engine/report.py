"""``python -m engine.report RESULTS...``: frontiers, economics and comparisons as a report.

Reads result records (directories or JSON Lines files, one or many runs, possibly from
different machines) and writes a self-contained directory: ``summary.md`` and PNG figures.
It prints the summary table. ``write_report`` is the same as a function, for the sweep's
``--report``.

Tokens here are output (decode) tokens: a decode step yields one output token per sequence
and no input token, so these numbers are not InferenceX's "total tokens" (input + output).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from engine.cli import OneLineParser, UsageError
from engine.report_compare import (
    PROVENANCE_FIELDS,
    fairness_notes,
    geometric_mean,
    provenance_rows,
    ratio_along,
)
from engine.report_economics import (
    EconomicsError,
    PointEconomics,
    Settings,
    load_presets,
    point_economics,
    resolve_settings,
)
from engine.report_frontier import Frontier, Query
from engine.report_records import PointView, ReportError, load, views

DEFAULT_INTERACTIVITY = 50.0
SUMMARY = "summary.md"
TOKENS_NOTE = (
    "Tokens are output tokens: a decode step yields one output token per sequence and no "
    "input token. InferenceX's 'total tokens' also count input (prefill) tokens, so compare "
    "these with its output-token figures."
)


@dataclass
class MetricFrontier:
    """A metric of one series against interactivity: the points that have it, its frontier
    (indices into ``points``) and its value at the queried interactivity."""

    name: str
    unit: str
    points: list[PointView]
    xs: list[float]
    ys: list[float]
    frontier: Frontier | None
    on: list[int]
    query: Query | None
    missing: list[PointView] = field(default_factory=list)


def metric_frontier(
    name: str,
    unit: str,
    points: list[PointView],
    value,
    target: float,
    maximize: bool = True,
) -> MetricFrontier:
    """Frontier of ``value(point)`` against interactivity over ``points`` (missing values
    are kept aside, never zero) and its interpolated value at ``target`` tok/s/user."""
    have = [(p, value(p)) for p in points]
    missing = [p for p, v in have if v is None]
    have = [(p, v) for p, v in have if v is not None]
    xs = [p.interactivity for p, _ in have]
    ys = [v for _, v in have]
    front, on, query = None, [], None
    if have:
        sign = 1.0 if maximize else -1.0
        made = Frontier.of_points(xs, [sign * y for y in ys])
        if made:
            front, on = made
            front = Frontier(front.xs, [sign * y for y in front.ys])
            query = front.at(target)
    return MetricFrontier(name, unit, [p for p, _ in have], xs, ys, front, on, query, missing)


@dataclass
class SeriesReport:
    """Everything the report says about one series of one model and context."""

    label: str
    color: str
    points: list[PointView]
    economics: dict[int, PointEconomics]
    metrics: dict[str, MetricFrontier]


@dataclass
class Report:
    """The analysed records: groups of (model, context) with their series."""

    inputs: list[str]
    notes: list[str]
    all_points: list[PointView]
    groups: dict[tuple[str, int | None], list[SeriesReport]]
    settings: Settings
    target: float
    figures: list[tuple[str, str]] = field(default_factory=list)


def analyse(
    paths: list[str],
    target: float = DEFAULT_INTERACTIVITY,
    models: list[str] | None = None,
    settings: Settings | None = None,
) -> Report:
    """Read the records and compute frontiers, queries and economics per series."""
    if not (math.isfinite(target) and target > 0):
        raise ReportError(f"--at-interactivity must be a number > 0, got {target:g}")
    settings = settings or Settings()
    loaded = load(paths)
    notes = [n for lf in loaded for n in lf.notes]
    pts = views(loaded)
    if models:
        known = sorted({p.model for p in pts})
        unknown = [m for m in models if m not in known]
        if unknown:
            raise ReportError(
                f"--model {','.join(unknown)}: not in the records (they have {', '.join(known)})"
            )
        pts = [p for p in pts if p.model in models]
    from engine.report_figures import PALETTE

    labels = list(dict.fromkeys(p.series for p in pts))
    colors = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}
    groups: dict[tuple[str, int | None], list[SeriesReport]] = {}
    for key in dict.fromkeys((p.model, p.context) for p in pts):
        members = [p for p in pts if (p.model, p.context) == key and p.ok]
        series = []
        for label in dict.fromkeys(p.series for p in members):
            sp = sorted((p for p in members if p.series == label), key=lambda p: p.batch)
            series.append(_series(label, colors[label], sp, settings, target))
        if series:  # a model whose every point failed is listed under "Not measured" only
            groups[key] = series
    return Report(list(paths), notes, pts, groups, settings, target)


def _series(
    label: str, color: str, points: list[PointView], settings: Settings, target: float
) -> SeriesReport:
    econ = {
        id(p): point_economics(
            p.throughput_per_device, p.avg_power_w, p.boundary, settings, p.energy_reason
        )
        for p in points
    }
    metrics = {
        "tpj": metric_frontier("tokens per joule", "tok/J", points, _tpj, target),
        "throughput": metric_frontier(
            "throughput per device", "tok/s", points, lambda p: p.throughput_per_device, target
        ),
        "mw_measured": metric_frontier(
            "tokens/s per MW (measured)",
            "tok/s/MW",
            points,
            lambda p: econ[id(p)].measured_tokens_per_s_per_mw,
            target,
        ),
        "mw_assumed": metric_frontier(
            "tokens/s per MW (assumed all-in kW)",
            "tok/s/MW",
            points,
            lambda p: econ[id(p)].assumed_tokens_per_s_per_mw,
            target,
        ),
        "cost": metric_frontier(
            "cost per million output tokens",
            "$/Mtok",
            points,
            lambda p: econ[id(p)].usd_per_mtok,
            target,
            maximize=False,
        ),
    }
    return SeriesReport(label, color, points, econ, metrics)


def _tpj(p: PointView) -> float | None:
    return p.tokens_per_joule


# -- text -------------------------------------------------------------------------------------


def _g(v: float | None, missing: str = "-") -> str:
    if v is None:
        return missing
    return f"{v:.4g}" if abs(v) < 1e6 else f"{v:.3e}"


def fixed_table(headers: list[str], rows: list[list[str]]) -> str:
    """A fixed-width text table, right-aligned."""
    cells = [headers] + rows
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    esc = [[c.replace("|", "\\|") for c in r] for r in [headers] + rows]
    out = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(out)


def _group_title(key: tuple[str, int | None]) -> str:
    model, ctx = key
    return f"{model}, L={ctx}" if ctx is not None else model


def _query_text(m: MetricFrontier, long: bool = False) -> str:
    """The value at the queried interactivity, "missing" (no point has the metric) or the
    refusal; ``long`` adds the reason in words."""
    if m.frontier is None:
        reasons = sorted({p.energy_reason for p in m.missing if p.energy_reason})
        if m.name != "tokens per joule" or not reasons:
            return "missing"
        return "missing" + (f" ({'; '.join(reasons)})" if long else "")
    q = m.query
    if q is not None and q.value is not None:
        return _g(q.value)
    if long:
        return f"refused: {q.reason if q else '?'}"
    return f"outside {_g(m.frontier.xs[0])}..{_g(m.frontier.xs[-1])}"


def _point_rows(report: Report) -> list[list[str]]:
    rows = []
    for p in report.all_points:
        unc = p.tokens_per_joule_uncertainty
        tpj = "missing" if p.tokens_per_joule is None else _g(p.tokens_per_joule)
        if not p.ok:
            tpj = "-"
        if p.tokens_per_joule is not None and unc is not None:
            tpj += f" ± {_g(unc)}"
        frac = p.roofline_fraction
        rows.append(
            [
                p.model,
                str(p.context) if p.context is not None else "-",
                p.device,
                p.precision,
                str(p.batch),
                _g(p.interactivity),
                _g(p.throughput_per_device),
                _g(None if p.step_time_s is None else p.step_time_s * 1e3),
                "-" if frac is None else f"{100 * frac:.0f}%",
                tpj,
                p.boundary or "-",
                p.status,
            ]
        )
    return rows


POINT_HEADERS = [
    "model",
    "L",
    "device",
    "precision",
    "B",
    "tok/s/user",
    "tok/s/device",
    "step ms",
    "roofline",
    "tok/J",
    "boundary",
    "status",
]


def _target_rows(report: Report) -> list[list[str]]:
    rows = []
    for key, series in report.groups.items():
        for s in series:
            m = s.metrics
            rows.append(
                [
                    _group_title(key),
                    s.label,
                    _query_text(m["tpj"]),
                    _query_text(m["throughput"]),
                    _query_text(m["mw_measured"]) if m["mw_measured"].frontier else "missing",
                    _query_text(m["mw_assumed"]) if m["mw_assumed"].frontier else "not set",
                    _query_text(m["cost"]) if m["cost"].frontier else "not set",
                ]
            )
    return rows


def _target_headers(target: float) -> list[str]:
    at = f"@{target:g}"
    return [
        "model",
        "series",
        f"tok/J {at}",
        f"tok/s/device {at}",
        f"tok/s/MW measured {at}",
        f"tok/s/MW assumed {at}",
        f"$/Mtok {at}",
    ]


def summary_text(report: Report, out_dir: Path | None = None) -> str:
    """The printed summary: the point table, values at the queried interactivity, notes."""
    parts = [fixed_table(POINT_HEADERS, _point_rows(report)), ""]
    parts.append(f"at {report.target:g} tok/s/user (monotone interpolation along each frontier):")
    parts.append(fixed_table(_target_headers(report.target), _target_rows(report)))
    parts += [
        "",
        "outside a..b: the interactivity is beyond the measured frontier; not extrapolated",
        TOKENS_NOTE,
    ]
    reasons = sorted({p.energy_reason for p in report.all_points if p.ok and p.energy_reason})
    parts += [f"tok/J missing: {r}" for r in reasons]
    for p in report.all_points:
        if p.status != "ok":
            parts.append(f"{p.status}: {p.model} B={p.batch} {p.precision}: {p.error}")
    parts += report.notes + list(report.settings.notes)
    drawn = [name for name, what in report.figures if not what.startswith("Not drawn")]
    skipped = [name for name, what in report.figures if what.startswith("Not drawn")]
    if drawn:
        parts.append("figures: " + ", ".join(drawn))
    if skipped:
        parts.append("not drawn (see summary.md): " + ", ".join(skipped))
    if out_dir is not None:
        parts.append(f"report: {out_dir / SUMMARY}")
    return "\n".join(parts)


def _frontier_section(report: Report) -> list[str]:
    out = ["## Frontiers", ""]
    out.append(
        "A point is on a frontier when no other point of its series is at least as interactive "
        "and at least as good. Values between frontier points come from a monotone cubic "
        "(PCHIP) through them; outside the measured range nothing is extrapolated."
    )
    for key, series in report.groups.items():
        out += ["", f"### {_group_title(key)}", ""]
        rows = []
        for s in series:
            for mk in ("tpj", "throughput"):
                m = s.metrics[mk]
                pts = (
                    ", ".join(
                        f"B={m.points[i].batch} ({_g(m.xs[i])} tok/s/user, {_g(m.ys[i])})"
                        for i in m.on
                    )
                    or "none"
                )
                dominated = len(m.points) - len(m.on)
                missing = f"; {len(m.missing)} point(s) missing it" if m.missing else ""
                rows.append(
                    [
                        s.label,
                        f"{m.name} ({m.unit})",
                        pts,
                        f"{dominated} dominated{missing}",
                        _query_text(m, long=True),
                    ]
                )
        out.append(
            md_table(
                ["series", "metric", "frontier points", "off frontier", f"@{report.target:g}"],
                rows,
            )
        )
    return out


def _economics_section(report: Report) -> list[str]:
    st = report.settings
    out = ["## Economics", ""]
    out.append(
        "tokens/s per MW = T / kW × 1000, with T the measured output tokens/s per device and kW "
        "either the measured average power at the record's boundary (+ host share per device) "
        "× PUE, or an assumed all-in kW per device. Cost per million output tokens = "
        "1e6 × ($/device-hour / 3600 + kW × $/kWh / 3600) / T, with kW the assumed all-in "
        "figure when set, else the measured one."
    )
    out += ["", md_table(["factor", "value", "from"], [list(r) for r in st.describe()])]
    if st.preset:
        src = load_presets()[st.preset]["source"]
        out += [
            "",
            f"Preset `{st.preset}`: {src.get('title')} ({src.get('url')}, as of "
            f"{src.get('as_of')}). {src.get('notes') or ''}",
        ]
    out += [f"- note: {n}" for n in st.notes]
    rows = []
    for key, series in report.groups.items():
        for s in series:
            for p in s.points:
                e = s.economics[id(p)]
                rows.append(
                    [
                        _group_title(key),
                        s.label,
                        str(p.batch),
                        _g(e.tokens_per_s),
                        f"{_g(e.measured_power_w, 'missing')} ({e.boundary or '-'})",
                        _g(e.host_w),
                        _g(e.pue),
                        _g(e.measured_tokens_per_s_per_mw, "missing"),
                        _g(e.assumed_kw, "not set"),
                        _g(e.assumed_tokens_per_s_per_mw, "not set"),
                        _g(e.usd_per_mtok_device),
                        _g(e.usd_per_mtok_energy),
                        _g(e.usd_per_mtok, "not set"),
                        e.cost_kw_basis or "-",
                    ]
                )
    out += [
        "",
        md_table(
            [
                "model",
                "series",
                "B",
                "T tok/s/device",
                "measured W (boundary)",
                "host W",
                "PUE",
                "tok/s/MW measured",
                "all-in kW",
                "tok/s/MW assumed",
                "$/Mtok device-hour",
                "$/Mtok energy",
                "$/Mtok total",
                "energy-term kW from",
            ],
            rows,
        ),
    ]
    why = sorted(
        {
            e.measured_reason
            for series in report.groups.values()
            for s in series
            for e in s.economics.values()
            if e.measured_reason
        }
        | {
            e.cost_reason
            for series in report.groups.values()
            for s in series
            for e in s.economics.values()
            if e.cost_reason
        }
    )
    out += [""] + [f"- missing: {w}" for w in why]
    if st.host_w_per_device and any(p.boundary == "node" for p in report.all_points):
        out.append(
            "- host share not added to node-boundary points: the node already includes the host"
        )
    return out


def _compare_section(report: Report) -> list[str]:
    out = ["## Comparison", ""]
    out.append(
        "Each series against the first series of the same model and context, over the overlap "
        "of their measured interactivity ranges only."
    )
    for key, series in report.groups.items():
        out += ["", f"### {_group_title(key)}", ""]
        if len(series) < 2:
            out.append("Only one series: nothing to compare.")
            continue
        base = series[0]
        rows = []
        for other in series[1:]:
            for mk in ("tpj", "throughput"):
                rows.append(_ratio_row(base, other, mk, report.target))
        out.append(
            md_table(
                [
                    "series / baseline",
                    "metric",
                    "overlap (tok/s/user)",
                    f"ratio @{report.target:g}",
                    "ratio at frontier points",
                    "geometric mean",
                ],
                rows,
            )
        )
        prov = {s.label: provenance_rows(s.points) for s in series}
        out += ["", "Provenance of the compared series:", ""]
        out.append(
            md_table(
                ["field"] + list(prov),
                [[f] + [prov[s][f] for s in prov] for f in PROVENANCE_FIELDS],
            )
        )
        notes = fairness_notes(prov)
        out += [""] + [f"- check: {n}" for n in notes] if notes else []
    return out


def _ratio_row(base: SeriesReport, other: SeriesReport, mk: str, target: float) -> list[str]:
    a, b = base.metrics[mk], other.metrics[mk]
    label = f"{other.label} / {base.label}"
    if a.frontier is None or b.frontier is None:
        return [label, a.name, "-", "missing", "missing: a series has no value of it", "-"]
    r = ratio_along(a.frontier, b.frontier)
    if r.overlap is None:
        return [label, a.name, "none", "-", r.reason or "", "-"]
    qa, qb = a.frontier.at(target).value, b.frontier.at(target).value
    at = _g(qb / qa) if qa and qb is not None else "refused: outside the overlap"
    knots = ", ".join(f"{_g(x)}: {r_:.3g}" for x, r_ in r.knots)
    gm = geometric_mean([v for _, v in r.knots])
    return [label, a.name, f"{_g(r.overlap[0])}..{_g(r.overlap[1])}", at, knots, _g(gm)]


def summary_markdown(report: Report, compare: bool) -> str:
    """The full Markdown summary written as ``summary.md``."""
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    ok = sum(1 for p in report.all_points if p.status == "ok")
    out = [
        "# Tokens-per-joule report",
        "",
        f"Generated {now} by `python -m engine.report` from: "
        + ", ".join(f"`{i}`" for i in report.inputs)
        + f". {len(report.all_points)} records ({ok} ok).",
        "",
        f"- {TOKENS_NOTE}",
        "- A missing value is shown as missing with its reason, never as zero.",
    ]
    reasons = sorted({p.energy_reason for p in report.all_points if p.ok and p.energy_reason})
    out += [f"- tokens per joule missing: {r}" for r in reasons]
    out += [f"- {n}" for n in report.notes]
    out += ["", "## Points", "", md_table(POINT_HEADERS, _point_rows(report))]
    failed = [p for p in report.all_points if p.status != "ok"]
    if failed:
        out += ["", "Not measured:", ""]
        out += [f"- {p.status}: {p.model} B={p.batch} {p.precision}: {p.error}" for p in failed]
    flagged = [p for p in report.all_points if p.energy_flags]
    if flagged:
        out += ["", "Energy flags:", ""]
        out += [f"- {p.series} B={p.batch}: {'; '.join(p.energy_flags)}" for p in flagged]
    out += ["", f"## At {report.target:g} tok/s/user", ""]
    out.append(md_table(_target_headers(report.target), _target_rows(report)))
    out += [""] + _frontier_section(report)
    out += [""] + _economics_section(report)
    if compare:
        out += [""] + _compare_section(report)
    if report.figures:
        out += ["", "## Figures", ""]
        for name, what in report.figures:
            out += [f"### {name}", "", what, "", f"![{name}]({name})", ""]
    return "\n".join(out) + "\n"


# -- figures ----------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def _sources_note(points: list[PointView]) -> str:
    files = sorted(
        {
            p.source.name
            if p.source.name != "records.jsonl"
            else f"{p.source.parent.name}/records.jsonl"
            for p in points
        }
    )
    return "source: " + ", ".join(files)


def draw_figures(report: Report, out_dir: Path, compare: bool, trace_point: str | None) -> None:
    """Draw every figure the records allow into ``out_dir``; each one is listed in
    ``report.figures`` with what it shows, and each skipped one with why."""
    from engine.report_figures import (
        RatioCurve,
        RooflineSeries,
        Series,
        plot_ratio,
        plot_roofline,
        plot_trace,
        plot_vs_interactivity,
    )

    for key, series in report.groups.items():
        title = _group_title(key)
        slug = _slug(f"{key[0]}_L{key[1]}" if key[1] is not None else key[0])
        pts = [p for s in series for p in s.points]
        if not pts:
            continue
        src = _sources_note(pts)
        for mk, fname, ylabel, what in (
            (
                "tpj",
                f"tokens_per_joule_{slug}.png",
                "tokens per joule (output tok/J)",
                "Tokens per joule against interactivity per device/precision, with each "
                "series' Pareto frontier (filled points, monotone curve) and error bars from "
                "the energy uncertainty.",
            ),
            (
                "throughput",
                f"throughput_{slug}.png",
                "throughput per device (output tok/s)",
                "Throughput per device against interactivity with its frontier: the InferenceX "
                "view, in output tokens.",
            ),
        ):
            figs = []
            for s in series:
                m = s.metrics[mk]
                if not m.points:
                    continue
                err = None
                if mk == "tpj":
                    err = [p.tokens_per_joule_uncertainty for p in m.points]
                on = set(m.on)
                figs.append(
                    Series(
                        label=s.label,
                        color=s.color,
                        xs=m.xs,
                        ys=m.ys,
                        batches=[p.batch for p in m.points],
                        on_frontier=[i in on for i in range(len(m.points))],
                        yerr=err,
                        curve=m.frontier.curve() if m.frontier else None,
                        missing=len(m.missing),
                    )
                )
            missing = [
                f"{s.label}: {len(s.metrics[mk].missing)}" for s in series if s.metrics[mk].missing
            ]
            if not figs:
                reasons = sorted({p.energy_reason or "?" for p in pts})
                report.figures.append(
                    (fname, f"Not drawn: no point has {ylabel} ({'; '.join(reasons)}).")
                )
                continue
            note = src + (
                f"; not drawn, no value: {', '.join(missing)} point(s)" if missing else ""
            )
            if mk == "tpj":
                bounds = sorted({p.boundary for s in series for p in s.metrics[mk].points})
                note += f"; energy boundary: {', '.join(str(b) for b in bounds)}"
            plot_vs_interactivity(
                out_dir / fname,
                f"{ylabel.split(' (')[0].capitalize()} vs interactivity: {title}",
                ylabel,
                figs,
                report.target,
                note,
            )
            report.figures.append((fname, what))
        rl = [
            RooflineSeries(
                s.label,
                s.color,
                [p.roofline_step_time_s for p in s.points if _both_steps(p)],
                [p.step_time_s for p in s.points if _both_steps(p)],
                [p.batch for p in s.points if _both_steps(p)],
            )
            for s in series
        ]
        rl = [r for r in rl if r.roofline_s]
        fname = f"roofline_{slug}.png"
        if rl:
            plot_roofline(out_dir / fname, f"Measured vs roofline step time: {title}", rl, src)
            report.figures.append(
                (
                    fname,
                    "Measured step time against the roofline's predicted step time per point; "
                    "the diagonal lines mark 100%, 50% and 25% of the ceiling (the roofline "
                    "fraction).",
                )
            )
        _trace_figure(report, out_dir, key, pts, trace_point, plot_trace)
        if compare and len(series) > 1:
            _ratio_figure(report, out_dir, key, series, slug, plot_ratio, RatioCurve)


def _both_steps(p: PointView) -> bool:
    return bool(p.roofline_step_time_s and p.step_time_s)


def _trace_figure(report, out_dir, key, pts, trace_point, plot_trace) -> None:
    with_trace = [
        p
        for p in pts
        if isinstance(p.record.get("trace"), dict) and (p.record["trace"].get("t_s") or [])
    ]
    fname = f"trace_{_slug(key[0])}{'_L' + str(key[1]) if key[1] is not None else ''}.png"
    if trace_point:
        with_trace = [p for p in with_trace if trace_point in str(p.record.get("key"))]
    if not with_trace:
        why = (
            f"no point matching --trace-point '{trace_point}' has a trace"
            if trace_point
            else "no record has a power trace (energy not measured)"
        )
        report.figures.append((fname, f"Not drawn: {why}."))
        return
    # The point nearest the queried interactivity is the one the summary talks about.
    p = min(with_trace, key=lambda q: abs(math.log(q.interactivity / report.target)))
    tr = p.record["trace"]
    plot_trace(
        out_dir / fname,
        f"Power, clocks and temperature: {p.series}, {_group_title(key)}, B={p.batch}",
        tr,
        f"{_sources_note([p])}; trace source: {tr.get('source', 'not recorded')}; "
        f"point key {p.record.get('key')}",
    )
    report.figures.append(
        (
            fname,
            f"Power, SM clock and temperature over time for {p.series} B={p.batch} (the traced "
            f"point nearest {report.target:g} tok/s/user), steady-state windows shaded.",
        )
    )


def _ratio_figure(report, out_dir, key, series, slug, plot_ratio, RatioCurve) -> None:
    base = series[0]
    fname = f"compare_tokens_per_joule_{slug}.png"
    curves = []
    for other in series[1:]:
        a, b = base.metrics["tpj"].frontier, other.metrics["tpj"].frontier
        if a is None or b is None:
            continue
        r = ratio_along(a, b)
        if r.overlap is not None:
            curves.append(RatioCurve(other.label, other.color, r.xs, r.ratios, r.knots))
    if not curves:
        report.figures.append(
            (fname, "Not drawn: no two series both have tokens per joule over a shared range.")
        )
        return
    plot_ratio(
        out_dir / fname,
        f"Tokens per joule relative to {base.label}: {_group_title(key)}",
        f"tok/J ratio to {base.label}",
        curves,
        _sources_note([p for s in series for p in s.points]),
        report.target,
    )
    report.figures.append(
        (
            fname,
            f"Ratio of tokens per joule along the frontiers to {base.label}, over the overlap "
            "of the measured interactivity ranges.",
        )
    )


# -- entry points -----------------------------------------------------------------------------


def write_report(
    record_paths: list[str],
    out_dir: str,
    *,
    model: str | list[str] | None = None,
    at_interactivity: float = DEFAULT_INTERACTIVITY,
    economics: str | None = None,
    usd_per_kwh: float | None = None,
    usd_per_device_hour: float | None = None,
    host_w_per_device: float | None = None,
    pue: float | None = None,
    all_in_kw: float | None = None,
    compare: bool = False,
    figures: bool = True,
    trace_point: str | None = None,
) -> str:
    """Write a report of the records in ``record_paths`` (directories or JSONL files) into
    ``out_dir`` (created): ``summary.md`` and PNG figures. Returns the summary text that the
    CLI prints. Raises ReportError (one-line message) on unusable input; matplotlib missing
    is such an error unless ``figures`` is False."""
    try:
        settings = resolve_settings(
            economics, usd_per_kwh, usd_per_device_hour, host_w_per_device, pue, all_in_kw
        )
    except EconomicsError as exc:
        raise ReportError(str(exc)) from None
    models = model.split(",") if isinstance(model, str) else model
    report = analyse(record_paths, at_interactivity, [m for m in models or [] if m], settings)
    out = Path(out_dir)
    if figures:
        from engine.report_figures import pyplot

        pyplot()  # fail before writing anything when matplotlib is absent
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot create report directory {out}: {exc.strerror}") from None
    if figures:
        draw_figures(report, out, compare, trace_point)
    (out / SUMMARY).write_text(summary_markdown(report, compare), encoding="utf-8")
    return summary_text(report, out)


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m engine.report",
        description="Frontiers, economics and comparisons of sweep results, as a directory "
        "with summary.md and PNG figures.",
    )
    p.add_argument("results", nargs="*", help="result directories or records .jsonl files")
    p.add_argument("--out", default=None, help="report directory (default: RESULTS/report)")
    p.add_argument("--model", default=None, help="comma-separated models to include")
    p.add_argument(
        "--at-interactivity",
        type=float,
        default=DEFAULT_INTERACTIVITY,
        metavar="TOK_S_USER",
        help=f"interactivity to query each frontier at (default {DEFAULT_INTERACTIVITY:g})",
    )
    p.add_argument(
        "--economics",
        default=None,
        metavar="PRESET",
        help="assumed economics preset (--list-presets shows them)",
    )
    p.add_argument("--usd-per-kwh", type=float, default=None, help="electricity price, $/kWh")
    p.add_argument(
        "--usd-per-device-hour", type=float, default=None, help="cost of one device for one hour, $"
    )
    p.add_argument(
        "--host-w-per-device",
        type=float,
        default=None,
        help="host power per device added to measured power, W",
    )
    p.add_argument(
        "--pue",
        type=float,
        default=None,
        help="facility power usage effectiveness applied to measured power (>= 1)",
    )
    p.add_argument(
        "--all-in-kw",
        type=float,
        default=None,
        help="assumed all-in kW per device (replaces measured power)",
    )
    p.add_argument(
        "--compare", action="store_true", help="compare series of the same model side by side"
    )
    p.add_argument("--no-figures", action="store_true", help="write summary.md only")
    p.add_argument(
        "--trace-point",
        default=None,
        metavar="KEY",
        help="draw the power trace of the point whose key contains KEY",
    )
    p.add_argument("--list-presets", action="store_true", help="list economics presets and exit")
    return p


def _default_out(first: str) -> str:
    p = Path(first)
    return str((p if p.is_dir() else p.parent) / "report")


def run(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.list_presets:
        try:
            presets = load_presets()
        except EconomicsError as exc:
            raise ReportError(str(exc)) from None
        for name, p in presets.items():
            usd = p["usd_per_device_hour"]
            print(
                f"{name}: {p['device']}, {p['all_in_kw']} kW all-in"
                + (f", ${usd}/device-hour ({p['tier']})" if usd is not None else "")
                + f"; {p['source']['title']}, as of {p['source']['as_of']}"
            )
        return 0
    if not args.results:
        raise UsageError("give one or more result directories or records files (see --help)")
    out = args.out or _default_out(args.results[0])
    text = write_report(
        args.results,
        out,
        model=args.model,
        at_interactivity=args.at_interactivity,
        economics=args.economics,
        usd_per_kwh=args.usd_per_kwh,
        usd_per_device_hour=args.usd_per_device_hour,
        host_w_per_device=args.host_w_per_device,
        pue=args.pue,
        all_in_kw=args.all_in_kw,
        compare=args.compare,
        figures=not args.no_figures,
        trace_point=args.trace_point,
    )
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: the CLI with one-line errors (exit status 2)."""
    try:
        return run(argv)
    except (UsageError, ReportError) as exc:
        print(f"engine.report: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
