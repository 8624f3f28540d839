"""Reading result records for a report: files, schema checks, and one flat view per point.

Inputs are directories (their ``records.jsonl``) or JSON Lines files, from one or many runs
and machines. Every line must be a ``tpj.record/1`` object; anything else is refused with a
one-line error naming the file and line, so a report never silently mixes record versions.
Within one file the last record of a point key on one host and device wins (a retried
point is appended again); across files every record is kept, since two runs can measure the
same key.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from engine.results import RECORDS, SCHEMA

SUPPORTED_SCHEMAS = (SCHEMA,)


class ReportError(Exception):
    """Input that a report cannot use; the message is one line."""


@dataclass
class Loaded:
    """The records of one input file and what was skipped while reading it."""

    path: Path
    records: list[dict]
    notes: list[str]


def _resolve(item: str) -> Path:
    p = Path(item)
    if p.is_dir():
        f = p / RECORDS
        if not f.is_file():
            raise ReportError(f"{item}: directory has no {RECORDS}")
        return f
    if p.is_file():
        return p
    raise ReportError(f"{item}: no such file or directory")


def _read(path: Path) -> Loaded:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ReportError(f"{path}: not UTF-8 text, so not a records file") from None
    except OSError as exc:
        raise ReportError(f"{path}: cannot read ({exc.strerror})") from None
    lines = text.split("\n")
    torn = not text.endswith("\n")
    records, notes, by_key = [], [], {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if torn and n == len(lines):
                # A crash mid-append leaves a torn last line; the store drops it too.
                notes.append(f"{path}:{n}: torn last line skipped")
                continue
            raise ReportError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        _check(record, path, n)
        key = _identity(record)
        if key is not None and key in by_key:
            records[by_key[key]] = None  # superseded by a later record of the same point
        if key is not None:
            by_key[key] = len(records)
        records.append(record)
    kept = [r for r in records if r is not None]
    if len(kept) < len(records):
        notes.append(f"{path}: {len(records) - len(kept)} superseded record(s) of a rerun point")
    return Loaded(path, kept, notes)


def _identity(record: dict) -> tuple | None:
    """A point's key on one machine: a later record with the same identity replaces it."""
    key = record.get("key")
    if key is None:
        return None
    host = get(record, "provenance", "host", "hostname")
    return (key, host, get(record, "provenance", "device", "name"))


def _check(record, path: Path, n: int) -> None:
    where = f"{path}:{n}"
    if not isinstance(record, dict):
        raise ReportError(f"{where}: a record must be a JSON object")
    if "schema" not in record:
        raise ReportError(f"{where}: no 'schema' field, so not a tpj result record")
    point = record.get("point")
    if not isinstance(point, dict) or not isinstance(point.get("model"), str):
        raise ReportError(f"{where}: record has no point.model")
    if not _int(point.get("batch")):
        raise ReportError(f"{where}: record has no whole point.batch")
    if not isinstance(record.get("status"), str):
        raise ReportError(f"{where}: record has no status")


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def load(paths: list[str]) -> list[Loaded]:
    """Every input read and checked; raises ReportError (one line) on the first problem,
    including records of another or mixed schema version."""
    if not paths:
        raise ReportError("no results given")
    seen: dict[Path, None] = {}
    for item in paths:
        seen.setdefault(_resolve(item).resolve(), None)
    loaded = [_read(p) for p in seen]
    schemas: dict[str, str] = {}
    for lf in loaded:
        for i, r in enumerate(lf.records):
            schemas.setdefault(str(r["schema"]), f"{lf.path.name} record {i + 1}")
    if len(schemas) > 1:
        found = ", ".join(f"{s} ({w})" for s, w in schemas.items())
        raise ReportError(
            f"mixed record schemas: {found}; this report reads {', '.join(SUPPORTED_SCHEMAS)} only"
        )
    for s, w in schemas.items():
        if s not in SUPPORTED_SCHEMAS:
            raise ReportError(
                f"records are {s} ({w}); this report reads {', '.join(SUPPORTED_SCHEMAS)} only"
            )
    if not any(lf.records for lf in loaded):
        raise ReportError(f"no records in {', '.join(str(lf.path) for lf in loaded)}")
    return loaded


def get(record: dict, *path: str):
    """The value at ``path`` in nested dicts, or None where any part is missing."""
    v = record
    for part in path:
        if not isinstance(v, dict):
            return None
        v = v.get(part)
    return v


def num(v) -> float | None:
    """A finite number as float, else None (missing is never turned into zero)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


@dataclass
class PointView:
    """What a report needs of one record; every quantity None when the record lacks it."""

    record: dict
    source: Path
    device: str
    series: str
    model: str
    context: int | None
    batch: int
    precision: str
    status: str
    error: str | None
    interactivity: float | None
    throughput_per_device: float | None
    tokens_per_joule: float | None
    tokens_per_joule_uncertainty: float | None
    energy_reason: str | None
    energy_flags: list[str]
    boundary: str | None
    avg_power_w: float | None
    step_time_s: float | None
    roofline_step_time_s: float | None
    roofline_fraction: float | None

    @property
    def ok(self) -> bool:
        """The point was measured (it has a status of ok and an interactivity)."""
        return self.status == "ok" and self.interactivity is not None


def device_name(record: dict) -> str:
    """A short name of the device a record was measured on."""
    name = get(record, "provenance", "device", "name") or record.get("backend") or "unknown"
    name = re.sub(r"\((R|TM|tm|r)\)", "", str(name))
    return re.sub(r"\s+", " ", name).strip()


def _energy(record: dict) -> tuple[float | None, float | None, str | None, list[str]]:
    e = record.get("energy") if isinstance(record.get("energy"), dict) else {}
    tpj = num(e.get("tokens_per_joule"))
    flags = [str(f) for f in (e.get("flags") or [])]
    reason = e.get("reason")
    if tpj is not None and tpj <= 0:
        tpj, reason = None, f"tokens_per_joule {tpj:g} is not positive"
    if tpj is not None and e.get("valid") is False:
        tpj, reason = None, "energy marked invalid: " + ("; ".join(flags) or "no flag given")
    if tpj is None and not reason:
        reason = "energy not recorded" if record.get("status") == "ok" else "point not measured"
    if tpj is not None and "valid" not in e:
        flags.append("validity not recorded")
    unc = num(e.get("tokens_per_joule_uncertainty")) if tpj is not None else None
    return tpj, unc, (None if tpj is not None else str(reason)), flags


def view(record: dict, source: Path, device: str) -> PointView:
    """The flat view of one record (``device`` is its disambiguated device label)."""
    point = record["point"]
    precision = get(point, "precision", "name") or "?"
    tp = point.get("tp") if _int(point.get("tp")) and point.get("tp") > 0 else 1
    ep = point.get("ep") if _int(point.get("ep")) and point.get("ep") > 0 else 1
    throughput = num(get(record, "metrics", "throughput_tok_s"))
    tpj, unc, reason, flags = _energy(record)
    e = record.get("energy") if isinstance(record.get("energy"), dict) else {}
    step = num(get(record, "metrics", "step_latency_s"))
    return PointView(
        record=record,
        source=source,
        device=device,
        series=f"{device} {precision}",
        model=point["model"],
        context=point.get("context") if _int(point.get("context")) else None,
        batch=point["batch"],
        precision=str(precision),
        status=record["status"],
        error=record.get("error"),
        interactivity=num(get(record, "metrics", "interactivity_tok_s_per_user")),
        # A point's throughput is its whole group's: tp x ep devices share it.
        throughput_per_device=None if throughput is None else throughput / (tp * ep),
        tokens_per_joule=tpj,
        tokens_per_joule_uncertainty=unc,
        energy_reason=reason,
        energy_flags=flags,
        boundary=e.get("boundary") if tpj is not None else None,
        avg_power_w=num(e.get("avg_power_w")) if tpj is not None else None,
        step_time_s=step if step is not None else num(get(record, "timing", "step_time_s", "mean")),
        roofline_step_time_s=num(get(record, "roofline", "step_time_s")),
        roofline_fraction=num(get(record, "metrics", "roofline_fraction")),
    )


def views(loaded: list[Loaded]) -> list[PointView]:
    """Flat views of every record, with device labels made unique across runs: a device
    name shared by two hosts gets the host, and by two files of one host the file's run."""
    groups: dict[tuple, list[tuple[dict, Path]]] = {}
    for lf in loaded:
        for r in lf.records:
            host = get(r, "provenance", "host", "hostname") or "?"
            groups.setdefault((device_name(r), host, lf.path), []).append((r, lf.path))
    names = [k[0] for k in groups]
    hosts = {(k[0], k[1]) for k in groups}
    out = []
    for (name, host, path), items in groups.items():
        label = name
        if names.count(name) > 1:
            same_host = sum(1 for k in groups if k[0] == name and k[1] == host) > 1
            by_host = sum(1 for h in hosts if h[0] == name) > 1
            label = f"{name} @{host}" if by_host else name
            if same_host:
                label += f" [{_run_name(path)}]"
        out += [view(r, p, label) for r, p in items]
    return out


def _run_name(path: Path) -> str:
    return path.parent.name if path.name == RECORDS else path.stem
