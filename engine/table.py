"""The summary table printed at the end of a sweep."""

from __future__ import annotations

COLUMNS = (
    "model",
    "B",
    "L",
    "precision",
    "tok/s",
    "tok/s/user",
    "step ms",
    "roofline",
    "layers",
    "W",
    "tok/J",
    "±",
    "boundary",
    "status",
)


def _fmt(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def _row(r: dict) -> list[str]:
    point = r.get("point", {})
    m = r.get("metrics") or {}
    t = r.get("timing") or {}
    e = r.get("energy") or {}
    step = m.get("step_latency_s")
    layers = f"{t['layers_run']}/{t['layers_total']}" if t.get("layers_run") else "-"
    frac = m.get("roofline_fraction")
    tpj = e.get("tokens_per_joule")
    tpj_u = e.get("tokens_per_joule_uncertainty")
    return [
        str(point.get("model", "?")),
        str(point.get("batch", "?")),
        str(point.get("context", "?")),
        str(point.get("precision", {}).get("name", "?")),
        _fmt(m.get("throughput_tok_s")),
        _fmt(m.get("interactivity_tok_s_per_user")),
        _fmt(None if step is None else step * 1e3),
        "-" if frac is None else f"{100 * frac:.0f}%",
        layers,
        _fmt(e.get("avg_power_w"), ".1f"),
        "null" if tpj is None and r.get("status") == "ok" else _fmt(tpj),
        _fmt(tpj_u, ".2g"),
        str(e.get("boundary") or "-"),
        r.get("status", "?") + ("*" if e.get("flags") else ""),
    ]


def summary_table(records: list[dict]) -> str:
    """Fixed-width table of throughput, interactivity, latency, roofline and energy."""
    rows = [list(COLUMNS)] + [_row(r) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = sorted({(r.get("energy") or {}).get("reason") for r in records} - {None})
    for note in notes:
        lines.append(f"tok/J null: {note}")
    if any((r.get("energy") or {}).get("flags") for r in records):
        lines.append("*: flagged (throttled, not steady, counter/power disagree): see the record")
    for r in records:
        if r.get("status") != "ok":
            p = r.get("point", {})
            lines.append(
                f"{r.get('status')}: {p.get('model')} B={p.get('batch')} "
                f"L={p.get('context')}: {r.get('error')}"
            )
    return "\n".join(lines)
