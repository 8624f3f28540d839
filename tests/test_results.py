"""Result records: atomic append, torn-line recovery, CSV, resume keys."""

from __future__ import annotations

import csv
import json

from engine.results import SCHEMA, ResultStore


def _record(key: str, status: str = "ok", tps: float | None = 12.5) -> dict:
    return {
        "key": key,
        "status": status,
        "point": {"model": "tiny", "batch": 1},
        "metrics": {"throughput_tok_s": tps},
        "energy": {"energy_j": None, "reason": "no power source"},
    }


def test_append_read_and_csv(tmp_path):
    store = ResultStore(tmp_path / "out")
    store.append(_record("a"))
    store.append(_record("b", status="failed", tps=float("nan")))
    records = store.read()
    assert [r["key"] for r in records] == ["a", "b"]
    assert all(r["schema"] == SCHEMA for r in records)
    assert records[1]["metrics"]["throughput_tok_s"] is None  # NaN never reaches JSON
    with open(store.csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["tokens_per_s"] == "12.5" and rows[0]["energy_j"] == ""
    assert rows[1]["status"] == "failed"
    assert store.done_keys() == {"a", "b"}
    assert store.done_keys(retry_failed=True) == {"a"}


def test_torn_last_line_is_dropped_and_repaired(tmp_path):
    store = ResultStore(tmp_path)
    store.append(_record("a"))
    with open(store.path, "ab") as f:
        f.write(b'{"schema": "' + SCHEMA.encode() + b'", "key": "tor')  # crash mid-write
    assert [r["key"] for r in store.read()] == ["a"]
    store.append(_record("c"))
    assert [r["key"] for r in store.read()] == ["a", "c"]
    lines = store.path.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line) for line in lines)
