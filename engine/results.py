"""Result records: schema, atomic append to JSON Lines, a CSV beside it, resume.

Each point gives one JSON object on one line of ``records.jsonl``. A line is written with
a single ``write`` on a file opened for appending and then fsync'd, so a crash leaves at
worst a torn last line, which the reader drops (and the next append repairs). The CSV is
rewritten from the JSON Lines after each append via a temporary file and a rename.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from pathlib import Path

SCHEMA = "tpj.record/1"
RECORDS = "records.jsonl"
CSV = "results.csv"


def record_header(
    key: str,
    *,
    backend: str,
    note: str,
    point: dict,
    spec,
    protocol,
    seed: int,
    peaks,
    provenance: dict | None,
    status: str = "ok",
    error: str | None = None,
    **scope,
) -> dict:
    """The fields every record of a point starts with: its key and status, ``scope`` fields
    (e.g. a rank's ``scope`` and ``cluster_key``), what ran it and how (backend, point, model
    spec, protocol, seed, measured peaks or None, provenance)."""
    return {
        "key": key,
        "status": status,
        "error": error,
        **scope,
        "backend": backend,
        "backend_note": note,
        "point": point,
        "model_spec": dataclasses.asdict(spec),
        "protocol": dataclasses.asdict(protocol),
        "seed": seed,
        "peaks": None if peaks is None else peaks.to_dict(),
        "provenance": provenance,
    }


# Flat columns of the CSV: (column, path into the record).
CSV_COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("status", ("status",)),
    ("model", ("point", "model")),
    ("backend", ("backend",)),
    ("batch", ("point", "batch")),
    ("context", ("point", "context")),
    ("precision", ("point", "precision", "name")),
    ("weight", ("point", "precision", "weight")),
    ("activation", ("point", "precision", "activation")),
    ("kv", ("point", "precision", "kv")),
    ("tokens_per_s", ("metrics", "throughput_tok_s")),
    ("tok_per_s_per_user", ("metrics", "interactivity_tok_s_per_user")),
    ("step_time_s", ("timing", "step_time_s", "mean")),
    ("step_time_p10_s", ("timing", "step_time_s", "p10")),
    ("step_time_p90_s", ("timing", "step_time_s", "p90")),
    ("steps", ("timing", "steps")),
    ("layers_run", ("timing", "layers_run")),
    ("layers_total", ("timing", "layers_total")),
    ("roofline_step_time_s", ("roofline", "step_time_s")),
    ("roofline_fraction", ("metrics", "roofline_fraction")),
    ("energy_j", ("energy", "energy_j")),
    ("tokens_per_joule", ("energy", "tokens_per_joule")),
    ("joules_per_token", ("energy", "joules_per_token")),
    ("energy_reason", ("energy", "reason")),
    ("error", ("error",)),
    ("key", ("key",)),
)


class ResultsError(RuntimeError):
    """The output directory cannot be used (one-line message)."""


def _get(record: dict, path: tuple[str, ...]):
    value = record
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _clean(value):
    """JSON has no NaN or infinity: store them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class ResultStore:
    """The records of one output directory."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ResultsError(
                f"cannot create output directory {self.dir}: {exc.strerror}"
            ) from None
        self.path = self.dir / RECORDS
        self.csv_path = self.dir / CSV

    def read(self) -> list[dict]:
        """All complete records; a torn or foreign line is skipped."""
        if not self.path.exists():
            return []
        records = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # torn last line from an interrupted write
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and record.get("schema") == SCHEMA:
                    records.append(record)
        return records

    def done_keys(self, retry_failed: bool = False) -> set[str]:
        """Keys of points that already have a record (failed ones too unless retried)."""
        keys = set()
        for record in self.read():
            if retry_failed and record.get("status") == "failed":
                continue
            keys.add(record.get("key"))
        return keys

    def _repair_tail(self) -> None:
        """Cut a torn last line so that the next record starts on a line of its own."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
            data = f.seek(0) or f.read()
            f.truncate(data.rfind(b"\n") + 1)

    def append(self, record: dict) -> None:
        """Append one record atomically, then refresh the CSV."""
        record = _clean({"schema": SCHEMA, **record})
        line = (json.dumps(record, sort_keys=False) + "\n").encode("utf-8")
        self._repair_tail()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.write_csv()

    def write_csv(self) -> None:
        """Rewrite the CSV from the records (temporary file, then rename)."""
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow([name for name, _ in CSV_COLUMNS])
            for record in self.read():
                row = []
                for _, path in CSV_COLUMNS:
                    value = _get(record, path)
                    row.append("" if value is None else value)
                writer.writerow(row)
        os.replace(tmp, self.csv_path)
