"""PNG figures of a report (matplotlib with the Agg backend, imported only when drawing).

Each figure labels its axes with units, gives one colour per device/precision series, draws
error bars where the record carries an uncertainty, and says in a footnote where its numbers
came from. Missing values are left out of a plot and counted in its footnote, never drawn as
zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from engine.report_records import ReportError

# Colours that stay apart for up to ten series (matplotlib's tab10), then cycle.
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)

# Marker shapes cycle with the series and shrink a little, so that series measured with the
# same numbers stay visible on top of each other.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


def marker(index: int) -> tuple[str, float]:
    """Marker shape and size (points^2) of the series at ``index``."""
    return MARKERS[index % len(MARKERS)], max(14.0, 48.0 - 7.0 * index)


def pyplot():
    """matplotlib.pyplot on the Agg backend, or a one-line ReportError when it is absent."""
    try:
        import matplotlib
    except ImportError:
        raise ReportError(
            "figures need matplotlib: pip install '.[plot]' (or pass --no-figures)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass
class Series:
    """One device/precision series of points against interactivity."""

    label: str
    color: str
    xs: list[float]
    ys: list[float]
    batches: list[int]
    on_frontier: list[bool]
    yerr: list[float | None] | None = None
    curve: tuple[list[float], list[float]] | None = None
    missing: int = 0


@dataclass
class RooflineSeries:
    """Measured and roofline step times (s) of one series' points."""

    label: str
    color: str
    roofline_s: list[float]
    measured_s: list[float]
    batches: list[int]


@dataclass
class RatioCurve:
    """A ratio of one series to a baseline along interactivity."""

    label: str
    color: str
    xs: list[float]
    ratios: list[float]
    knots: list[tuple[float, float]] = field(default_factory=list)


def _spread(values: list[float]) -> float:
    pos = [v for v in values if v > 0]
    return max(pos) / min(pos) if pos else 1.0


def _log_axis(ax, which: str) -> None:
    """Log scale on ``which`` ("x" or "y") with plain tick labels at 1, 2, 5 x 10^k."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _footnote(fig, text: str) -> None:
    fig.text(0.01, 0.01, text, fontsize=7, color="#555555", ha="left", va="bottom", wrap=True)


def _save(fig, plt, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_vs_interactivity(
    path: Path,
    title: str,
    ylabel: str,
    series: list[Series],
    target_x: float | None,
    footnote: str,
) -> Path:
    """A metric against interactivity (tok/s/user) per series: frontier points filled,
    dominated points hollow, the monotone frontier drawn through the filled ones, and a
    dashed line at the queried interactivity."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.4))
    all_x = [x for s in series for x in s.xs]
    all_y = [y for s in series for y in s.ys]
    for n, s in enumerate(series):
        shape, size = marker(n)
        front = [i for i, f in enumerate(s.on_frontier) if f]
        rest = [i for i, f in enumerate(s.on_frontier) if not f]
        if s.yerr and any(e for e in s.yerr):
            ax.errorbar(
                s.xs,
                s.ys,
                yerr=[e or 0.0 for e in s.yerr],
                fmt="none",
                ecolor=s.color,
                elinewidth=1,
                capsize=3,
                alpha=0.8,
            )
        ax.scatter(
            [s.xs[i] for i in front],
            [s.ys[i] for i in front],
            color=s.color,
            s=size,
            marker=shape,
            zorder=3 + n,
            label=s.label,
        )
        ax.scatter(
            [s.xs[i] for i in rest],
            [s.ys[i] for i in rest],
            facecolors="none",
            edgecolors=s.color,
            s=size,
            marker=shape,
            zorder=3 + n,
        )
        if s.curve and len(s.curve[0]) > 1:
            ax.plot(*s.curve, color=s.color, linewidth=1.6, zorder=2)
        for x, y, b in zip(s.xs, s.ys, s.batches):
            ax.annotate(
                f"B={b}",
                (x, y),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color=s.color,
            )
    if _spread(all_x) > 20:
        _log_axis(ax, "x")
    if _spread(all_y) > 20:
        _log_axis(ax, "y")
    if target_x is not None and all_x and min(all_x) / 3 <= target_x <= max(all_x) * 3:
        ax.axvline(target_x, color="#444444", linestyle="--", linewidth=1)
        ax.annotate(
            f"{target_x:g} tok/s/user",
            (target_x, 1.0),
            xycoords=("data", "axes fraction"),
            textcoords="offset points",
            xytext=(3, -12),
            fontsize=8,
            color="#444444",
        )
    ax.set_xlabel("interactivity (output tokens/s per user = 1 / step time)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(
        fontsize=8, loc="best", title="filled: on frontier; hollow: dominated", title_fontsize=7
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    _footnote(fig, footnote)
    return _save(fig, plt, path)


def plot_roofline(path: Path, title: str, series: list[RooflineSeries], footnote: str) -> Path:
    """Measured step time against the roofline's predicted step time per point (both in ms
    on the axes, given in s), with lines
    where the measured time is 100%, 50% and 25% of the ceiling (the roofline fraction)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.6))
    # Milliseconds read better than powers of ten at decode step times.
    xs = [x * 1e3 for s in series for x in s.roofline_s]
    ys = [y * 1e3 for s in series for y in s.measured_s]
    for n, s in enumerate(series):
        shape, size = marker(n)
        rx, my = [x * 1e3 for x in s.roofline_s], [y * 1e3 for y in s.measured_s]
        ax.scatter(rx, my, color=s.color, s=size, marker=shape, label=s.label, zorder=3 + n)
        for x, y, b in zip(rx, my, s.batches):
            ax.annotate(
                f"B={b}",
                (x, y),
                textcoords="offset points",
                xytext=(4, -9),
                fontsize=7,
                color=s.color,
            )
    lo = min(min(xs), min(ys)) / 1.6
    hi = max(max(xs), max(ys)) * 1.6
    for frac, style in ((1.0, "-"), (0.5, "--"), (0.25, ":")):
        ax.plot([lo, hi], [lo / frac, hi / frac], color="#666666", linestyle=style, linewidth=1)
        # Label each line just inside the top edge (or the right edge for 100%).
        x_at = hi / 1.25 * frac
        if x_at > lo:
            ax.annotate(
                f"{frac:.0%} of ceiling",
                (x_at, x_at / frac),
                fontsize=7,
                color="#444444",
                ha="right",
                va="top",
                rotation=0,
            )
    _log_axis(ax, "x")
    _log_axis(ax, "y")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("roofline step time (ms): plan bytes and FLOPs over measured peaks")
    ax.set_ylabel("measured step time (ms)")
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    # Below the 100% line is faster than the ceiling: that corner stays empty for the legend.
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    _footnote(fig, footnote)
    return _save(fig, plt, path)


def plot_trace(path: Path, title: str, trace: dict, footnote: str) -> Path:
    """Power, SM clock and temperature over the point's time, measured windows shaded."""
    plt = pyplot()
    t = trace.get("t_s") or []
    panels = [("power_w", "power (W)", "#d62728")]
    for key, label, color in (
        ("sm_clock_mhz", "SM clock (MHz)", "#1f77b4"),
        ("temperature_c", "temperature (°C)", "#ff7f0e"),
    ):
        vals = trace.get(key)
        times = trace.get("state_t_s") or t  # device state is polled on its own clock
        if vals and len(vals) == len(times) and any(v is not None for v in vals):
            panels.append((key, label, color))
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(8, 2.2 + 1.7 * len(panels)), sharex=True, squeeze=False
    )
    windows = trace.get("windows_s") or []
    for ax, (key, label, color) in zip(axes[:, 0], panels):
        vals = trace.get(key) or []
        times = t if key == "power_w" else (trace.get("state_t_s") or t)
        pts = [(a, b) for a, b in zip(times, vals) if a is not None and b is not None]
        ax.plot(
            [a for a, _ in pts],
            [b for _, b in pts],
            color=color,
            linewidth=1.2,
            marker="." if len(pts) < 80 else None,
            markersize=3,
        )
        for i, (w0, w1) in enumerate(windows):
            ax.axvspan(
                w0,
                w1,
                color="#2ca02c",
                alpha=0.15,
                label="measured (steady-state) window" if i == 0 else None,
            )
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0, 0].set_title(title, fontsize=11)
    if windows:
        axes[0, 0].legend(fontsize=8, loc="lower right")
    axes[-1, 0].set_xlabel("time since the point started (s)")
    missing = [k for k in ("sm_clock_mhz", "temperature_c") if k not in [p[0] for p in panels]]
    note = footnote + (f"; not recorded: {', '.join(missing)}" if missing else "")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    _footnote(fig, note)
    return _save(fig, plt, path)


def plot_ratio(
    path: Path,
    title: str,
    ylabel: str,
    curves: list[RatioCurve],
    footnote: str,
    target_x: float | None = None,
) -> Path:
    """Ratios of series to a baseline along interactivity, 1.0 and the queried
    interactivity marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for c in curves:
        ax.plot(c.xs, c.ratios, color=c.color, linewidth=1.6, label=c.label)
        if c.knots:
            ax.scatter([k[0] for k in c.knots], [k[1] for k in c.knots], color=c.color, s=18)
    xs = [x for c in curves for x in c.xs]
    if xs and _spread(xs) > 20:
        _log_axis(ax, "x")
    ax.axhline(1.0, color="#444444", linewidth=1)
    if target_x is not None and xs and min(xs) <= target_x <= max(xs):
        ax.axvline(target_x, color="#444444", linestyle="--", linewidth=1)
    finite = [r for c in curves for r in c.ratios if math.isfinite(r)]
    if finite:
        ax.set_ylim(min(0.0, min(finite) * 0.9), max(finite) * 1.15)
    ax.set_xlabel("interactivity (output tokens/s per user)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    _footnote(fig, footnote)
    return _save(fig, plt, path)
