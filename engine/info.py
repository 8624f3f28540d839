"""``python -m engine.info``: what this machine offers for measuring tokens per joule.

Host and CPU, the CUDA devices CuPy sees, and every power source with its boundary and
quantity, whether it buffers samples, its update period and read cost as measured here by
back-to-back reads (``--probe-seconds``), the NVML clock / power-limit state of each GPU,
and one line for each source that is missing and why. Plain text by default, ``--json``
for JSON. Exits 0 even when no power source exists: that is information too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from engine.backends import cuda_unavailable_reason
from engine.power import nvml
from engine.power.base import PowerSource
from engine.power.discover import CHOICES, discover_sources
from engine.power.probe import measure_buffered_rate, measure_update_period
from engine.provenance import cpu_name, host_info, library_versions


def cuda_devices() -> dict:
    """The CUDA devices CuPy sees: ``available``, ``reason`` (None when available) and
    ``devices`` (index, name, compute capability, memory in GiB)."""
    reason = cuda_unavailable_reason()
    if reason is not None:
        return {"available": False, "reason": reason, "devices": []}
    devices = []
    try:
        import cupy

        for i in range(cupy.cuda.runtime.getDeviceCount()):
            props = cupy.cuda.runtime.getDeviceProperties(i)
            name = props.get("name", b"")
            devices.append(
                {
                    "index": i,
                    "name": name.decode() if isinstance(name, bytes) else str(name),
                    "compute_capability": f"{props.get('major')}.{props.get('minor')}",
                    "memory_gib": props.get("totalGlobalMem", 0) / 2**30,
                }
            )
    except Exception as exc:  # any CUDA runtime failure is reported, not raised
        return {"available": False, "reason": f"{type(exc).__name__}: {exc}", "devices": []}
    return {"available": True, "reason": None, "devices": devices}


def describe_sources(sources: list, probe_seconds: float) -> tuple[list[dict], dict]:
    """Each source's SourceInfo, what it supports and its probe results; and the NVML state
    of every GPU that has a source, keyed by GPU index."""
    entries = []
    gpu_state: dict = {}
    for source in sources:
        # Overriding read_buffered is how a source says it buffers (calling it would drain it).
        buffered = type(source).read_buffered is not PowerSource.read_buffered
        entry = {
            **source.info.to_dict(),
            "supports": {"read": True, "read_buffered": buffered},
            "probe": measure_update_period(source, duration_s=probe_seconds),
        }
        if buffered:
            entry["buffer_probe"] = measure_buffered_rate(
                source, duration_s=probe_seconds, poll_s=min(0.05, probe_seconds / 4)
            )
        entries.append(entry)
        if isinstance(source, nvml.NvmlSource) and source.index not in gpu_state:
            gpu_state[source.index] = nvml.device_state(source.index)
    return entries, gpu_state


def collect(spec: str = "auto", power_log: str | None = None, probe_seconds: float = 0.5) -> dict:
    """Everything ``engine.info`` reports, as a dict."""
    sources, reasons = discover_sources(spec, power_log=power_log)
    try:
        entries, gpu_state = describe_sources(sources, probe_seconds)
    finally:
        for source in sources:
            source.close()
    return {
        "host": {**host_info(), "cpu": cpu_name(), "logical_cpus": os.cpu_count()},
        "libraries": library_versions(),
        "cuda": cuda_devices(),
        "power_sources": entries,
        "gpu_state": {str(k): v for k, v in sorted(gpu_state.items())},
        "missing_sources": reasons,
        "probe_seconds": probe_seconds,
    }


def _num(value, unit: str, spec: str = ".3g") -> str:
    return "?" if value is None else f"{value:{spec}} {unit}"


def _time(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def format_text(report: dict) -> str:
    """The report as plain text for a terminal."""
    host = report["host"]
    lines = [
        f"host       {host['hostname']} ({host['os']}, Python {host['python']})",
        f"cpu        {host['cpu'] or '?'}, {host['logical_cpus']} logical CPUs",
    ]
    cuda = report["cuda"]
    if cuda["available"]:
        for d in cuda["devices"]:
            lines.append(
                f"cuda       device {d['index']}: {d['name']} (sm {d['compute_capability']}, "
                f"{d['memory_gib']:.1f} GiB)"
            )
    else:
        lines.append(f"cuda       none: {cuda['reason']}")
    present = [f"{k} {v}" for k, v in report["libraries"].items() if v]
    lines.append(f"libraries  {', '.join(present) or 'none of note'}")
    sources = report["power_sources"]
    lines.append("")
    lines.append(f"power sources ({len(sources)}):")
    for s in sources:
        probe = s["probe"]
        nominal = (
            f"stated update {_time(s['update_period_s'])}"
            if s["update_period_s"] is not None
            else "no stated update period"
        )
        lines.append(
            f"  {s['name']}: {s['quantity']} at {s['boundary']}, stamped by {s['stamped_by']}"
            f"{', buffered' if s['supports']['read_buffered'] else ''}; {nominal}"
        )
        if probe["update_period_median_s"] is not None:
            measured = (
                f"measured update median {_time(probe['update_period_median_s'])}, "
                f"min {_time(probe['update_period_min_s'])} ({probe['n_changes']} changes)"
            )
        else:
            measured = f"update period not measured: {probe['reason']}"
        lines.append(
            f"      {measured}; read cost {_time(probe['read_cost_s'])} "
            f"({_num(probe['reads_per_s'], 'reads/s', '.3g')})"
        )
        if "buffer_probe" in s:
            b = s["buffer_probe"]
            lines.append(
                f"      buffer: {b['n_samples']} samples in {_time(b['duration_s'])}, "
                f"interval median {_time(b['sample_interval_median_s'])}, "
                f"min {_time(b['sample_interval_min_s'])}"
                + (f" ({b['reason']})" if b["reason"] else "")
            )
        if s["device"]:
            lines.append(f"      device: {s['device']}")
    for index, state in report["gpu_state"].items():
        reasons = state["clock_event_reasons"]
        lines.append(
            f"  GPU {index} state: power limit {_num(state['power_limit_w'], 'W')}, "
            f"SM {_num(state['sm_clock_mhz'], 'MHz', '.0f')}, "
            f"memory {_num(state['mem_clock_mhz'], 'MHz', '.0f')}, "
            f"{_num(state['temperature_c'], 'C', '.0f')}, clock events: "
            + ("?" if reasons is None else (", ".join(reasons) or "none"))
        )
        for key, why in state["unavailable"].items():
            lines.append(f"      {key} unknown: {why}")
    lines.append("")
    missing = report["missing_sources"]
    lines.append(f"missing or skipped sources ({len(missing)}):")
    lines.extend(f"  - {r}" for r in missing)
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine.info",
        description="What this machine offers: host, CPU, CUDA devices, power sources "
        "(with their measured update periods and read costs) and why any are missing.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument(
        "--probe-seconds",
        type=float,
        default=0.5,
        help="seconds of back-to-back reads per source to measure its update period (0.5)",
    )
    parser.add_argument(
        "--sources",
        default="auto",
        help=f"power sources to open: {', '.join(CHOICES)}, or a comma list (auto)",
    )
    parser.add_argument("--power-log", help="an external meter's log (CSV or JSON Lines)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Print the report; 0 even without power sources, 2 for bad arguments."""
    args = _parser().parse_args(argv)
    if not args.probe_seconds > 0:
        print("engine.info: --probe-seconds must be > 0", file=sys.stderr)
        return 2
    try:
        report = collect(args.sources, args.power_log, args.probe_seconds)
    except ValueError as exc:  # a bad --sources or an unusable --power-log
        print(f"engine.info: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, default=str) if args.json else format_text(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
