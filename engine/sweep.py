"""``python -m engine.sweep``: measure a grid of points and record each one.

With no arguments it runs a small default sweep on whatever the machine has (a CUDA GPU
when one is usable, else the CPU). Every point becomes one JSON Lines record in the
output directory (and a CSV row); a rerun with the same directory skips recorded points.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import time

from engine.backends import BACKENDS, select_backend
from engine.backends.base import BackendUnavailable, DoesNotFit, UnsupportedPoint
from engine.measure import Protocol, measure_point
from engine.models import SpecError, list_models, load_spec
from engine.plan import PlanError, build_plan
from engine.point import Point
from engine.power.base import SourceError
from engine.power.session import open_session
from engine.precision import PRESETS, PrecisionError, parse_precision
from engine.provenance import provenance
from engine.results import ResultsError, ResultStore
from engine.routing import RoutingError, parse_routing
from engine.table import summary_table

DEFAULTS = {
    "model": "llama-3.1-8b",
    "batch": "1,8",
    "context": "1024",
    "precision": "bf16,w8a16,w4a16",
    "warmup": 1.0,
    "duration": 3.0,
    "out": "results",
    "cpu_memory_gb": 4.0,
}


class UsageError(Exception):
    """Bad command-line input: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UsageError(f"{message} (see --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m engine.sweep",
        description="Measure decode throughput, interactivity and (where a power source exists) "
        "energy per token over a grid of model x batch x context x precision.",
    )
    p.add_argument(
        "--model",
        default=DEFAULTS["model"],
        help="comma-separated preset names or spec files (.toml/.json); "
        f"default {DEFAULTS['model']}; --list-models shows presets",
    )
    p.add_argument("--batch", default=DEFAULTS["batch"], help="comma-separated batch sizes B")
    p.add_argument(
        "--context",
        default=DEFAULTS["context"],
        help="comma-separated context lengths L (tokens in the KV cache)",
    )
    p.add_argument(
        "--precision",
        action="append",
        default=None,
        help=f"comma-separated presets ({', '.join(PRESETS)}), or one explicit "
        "w=FMT,a=FMT,kv=FMT; repeat the option for several explicit ones; "
        f"default {DEFAULTS['precision']}",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="auto picks cuda when a GPU and CuPy are present, else cpu",
    )
    p.add_argument(
        "--warmup", type=float, default=DEFAULTS["warmup"], help="warm-up seconds per point"
    )
    p.add_argument(
        "--duration", type=float, default=DEFAULTS["duration"], help="timed seconds per point"
    )
    p.add_argument("--min-steps", type=int, default=3, help="at least this many timed steps")
    p.add_argument("--out", default=DEFAULTS["out"], help="output directory (resumed if it exists)")
    p.add_argument(
        "--memory-gb",
        type=float,
        default=None,
        help="memory for a point's weights and KV cache; layers beyond it are not "
        "run and the step time is scaled from the distinct layers that were "
        f"(default: {DEFAULTS['cpu_memory_gb']:g} GB on the cpu backend, the "
        "device's free memory on cuda)",
    )
    p.add_argument(
        "--power",
        default="auto",
        help="power sources: auto (every one this machine has), none, or a comma list of "
        "nvml, rapl, amdsmi; python -m engine.info shows what exists",
    )
    p.add_argument(
        "--power-log",
        default=None,
        metavar="FILE",
        help="an external meter's log (CSV or JSON Lines of t_s and power_w or energy_j), "
        "attributed at the node boundary",
    )
    p.add_argument(
        "--power-log-offset",
        type=float,
        default=None,
        metavar="S",
        help="seconds to add to the log's times to get host monotonic seconds (default: "
        "epoch times are mapped through the host's wall clock)",
    )
    p.add_argument(
        "--power-log-averaging",
        type=float,
        default=None,
        metavar="S",
        help="seconds each power value of the log averages, as the meter states it (default: "
        "unknown, taken as instantaneous: a wide uncertainty)",
    )
    p.add_argument(
        "--idle",
        type=float,
        default=None,
        metavar="S",
        help="seconds of idle sampling before the sweep (default: max(2 s, 20 sensor updates))",
    )
    p.add_argument(
        "--repetitions",
        type=int,
        default=Protocol.repetitions,
        help="measured windows per point, separated by random pauses (phase shifts)",
    )
    p.add_argument("--routing", default="uniform", help="MoE routing: uniform or zipf:S")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    p.add_argument(
        "--report",
        nargs="?",
        const="",
        default=None,
        metavar="DIR",
        help="then write a report (summary.md, PNG figures) into DIR (default OUT/report)",
    )
    p.add_argument("--retry-failed", action="store_true", help="rerun points recorded as failed")
    p.add_argument("--list-models", action="store_true", help="list model presets and exit")
    return p


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--{name} '{text}' must be comma-separated whole numbers") from None
    if not values or any(v < 1 for v in values):
        raise UsageError(f"--{name} '{text}' must list numbers >= 1")
    return values


def _precisions(values: list[str] | None) -> list:
    items: list[str] = []
    for value in values or [DEFAULTS["precision"]]:
        # An explicit w=..,a=..,kv=.. value is one precision; otherwise commas list presets.
        items += [value] if "=" in value else [t for t in value.split(",") if t.strip()]
    if not items:
        raise UsageError("--precision is empty")
    try:
        return [parse_precision(t) for t in items]
    except PrecisionError as exc:
        raise UsageError(str(exc)) from None


def _validate(args: argparse.Namespace):
    if args.warmup < 0 or args.duration <= 0:
        raise UsageError("--warmup must be >= 0 and --duration > 0 seconds")
    if args.min_steps < 1:
        raise UsageError("--min-steps must be >= 1")
    if args.repetitions < 1:
        raise UsageError("--repetitions must be >= 1")
    if args.power_log_averaging is not None and args.power_log_averaging < 0:
        raise UsageError("--power-log-averaging must be >= 0 seconds")
    if args.idle is not None and args.idle <= 0:
        raise UsageError("--idle must be > 0 seconds")
    if args.memory_gb is not None and args.memory_gb <= 0:
        raise UsageError("--memory-gb must be > 0")
    try:
        specs = [load_spec(m.strip()) for m in args.model.split(",") if m.strip()]
        parse_routing(args.routing)
    except (SpecError, RoutingError) as exc:
        raise UsageError(str(exc)) from None
    if not specs:
        raise UsageError("--model is empty")
    return (
        specs,
        _ints(args.batch, "batch"),
        _ints(args.context, "context"),
        _precisions(args.precision),
    )


def run(argv: list[str] | None = None) -> int:
    """The sweep; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.list_models:
        print("\n".join(list_models()))
        return 0
    specs, batches, contexts, precisions = _validate(args)
    memory_gb = args.memory_gb
    try:
        backend, note = select_backend(args.backend, memory_gb)
    except BackendUnavailable as exc:
        raise UsageError(str(exc)) from None
    if memory_gb is None and backend.name == "cpu":
        backend = type(backend)(memory_budget_gb=DEFAULTS["cpu_memory_gb"])
    for precision in precisions:
        reason = backend.precision_unsupported(precision)
        if reason:
            raise UsageError(f"precision {precision.name}: {reason}")
    try:
        store = ResultStore(args.out)
        done = store.done_keys(retry_failed=args.retry_failed)
    except ResultsError as exc:
        raise UsageError(str(exc)) from None

    points = [
        Point(model=spec.name, batch=b, context=ctx, precision=prec, routing=args.routing)
        for spec in specs
        for prec in precisions
        for ctx in contexts
        for b in batches
    ]
    spec_by_name = {spec.name: spec for spec in specs}
    backend_key = backend.name
    todo = [p for p in points if f"{backend_key}|{p.key()}" not in done]
    log = _log
    log(
        f"backend: {note}; {len(points)} points, {len(points) - len(todo)} already in "
        f"{store.path}, {len(todo)} to run"
    )
    protocol = Protocol(
        warmup_s=args.warmup,
        duration_s=args.duration,
        min_steps=args.min_steps,
        repetitions=args.repetitions,
    )
    interrupted = False
    power = None
    if todo and (args.power != "none" or args.power_log):
        try:
            power = open_session(
                args.power,
                power_log=args.power_log,
                power_log_offset_s=args.power_log_offset,
                power_log_averaging_s=args.power_log_averaging,
                gpu_pci_bus_id=getattr(backend, "pci_bus_id", None),
                log=log,
            )
        except (ValueError, SourceError) as exc:
            raise UsageError(str(exc)) from None
    try:
        interrupted = _run_points(args, backend, note, todo, spec_by_name, protocol, power, store)
    finally:
        if power is not None:
            power.close()
    keys = {f"{backend_key}|{p.key()}" for p in points}
    records = [r for r in store.read() if r.get("key") in keys]
    print(summary_table(records))
    print(f"\n{len(records)} records in {store.path} (CSV: {store.csv_path})")
    if args.report is not None and not interrupted:
        from engine.report import ReportError, write_report

        figures = importlib.util.find_spec("matplotlib") is not None
        if not figures:
            log("report: no figures (matplotlib is missing: pip install '.[plot]')")
        try:
            out_dir = args.report or str(store.dir / "report")
            print(write_report([str(store.path)], out_dir, figures=figures))
        except ReportError as exc:
            log(f"report not written: {exc}")
    if interrupted:
        log("interrupted: finished points are kept; rerun the same command to resume")
        return 130
    return 0


def _run_points(args, backend, note, todo, spec_by_name, protocol, power, store) -> bool:
    """Measure each point of ``todo`` and append its record; True when interrupted."""
    log = _log
    backend_key = backend.name
    interrupted = False
    if todo:
        log("measuring device peaks (copy bandwidth, matmul rate) ...")
        peaks = backend.measure_peaks()
        log(
            f"peaks: copy {peaks.copy_bw_gbps:.1f} GB/s, matmul "
            + ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in peaks.matmul_tflops.items())
        )
        device = backend.device_info()
        prov = provenance(device)
        idle = None
        if power is not None and power.active:
            try:
                idle = power.measure_idle(args.idle, log=log)
            except KeyboardInterrupt:
                return True
        t_start = time.monotonic()
        for i, point in enumerate(todo, 1):
            spec = spec_by_name[point.model]
            label = (
                f"[{i}/{len(todo)}] {point.model} B={point.batch} L={point.context} "
                f"{point.precision.name}"
            )
            eta = ""
            if i > 1:
                per = (time.monotonic() - t_start) / (i - 1)
                eta = f" (about {per * (len(todo) - i + 1):.0f} s left)"
            log(label + eta)
            record = {
                "key": f"{backend_key}|{point.key()}",
                "status": "ok",
                "error": None,
                "backend": backend_key,
                "backend_note": note,
                "point": point.to_dict(),
                "model_spec": dataclasses.asdict(spec),
                "protocol": dataclasses.asdict(protocol),
                "seed": args.seed,
                "peaks": peaks.to_dict(),
                "provenance": prov,
                "idle": idle,
            }
            try:
                plan = build_plan(spec, point)
                record["plan"] = plan.totals()
                record.update(
                    measure_point(
                        backend,
                        plan,
                        peaks,
                        protocol,
                        args.seed,
                        progress=lambda msg: log("    " + msg),
                        power=power,
                    )
                )
                m, e = record["metrics"], record["energy"]
                energy = f"; energy null: {e['reason']}"
                if e.get("tokens_per_joule") is not None:
                    energy = (
                        f", {e['tokens_per_joule']:.3g} ± {e['tokens_per_joule_uncertainty']:.2g} "
                        f"tok/J at {e['boundary']} ({e['avg_power_w']:.1f} W)"
                    )
                    if e.get("flags"):
                        energy += " flags: " + "; ".join(e["flags"])
                log(
                    f"    {m['throughput_tok_s']:.3g} tok/s, {m['interactivity_tok_s_per_user']:.3g} "
                    f"tok/s/user, roofline fraction {m['roofline_fraction']:.2f}" + energy
                )
            except KeyboardInterrupt:
                interrupted = True
                break
            except UnsupportedPoint as exc:
                record.update(status="unsupported", error=str(exc))
            except (DoesNotFit, PlanError) as exc:
                record.update(status="failed", error=str(exc))
            except MemoryError:
                record.update(status="failed", error="out of memory while allocating or running")
            except Exception as exc:  # a point's failure must not end the sweep
                record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            if record["status"] != "ok":
                log(f"    {record['status']}: {record['error']}")
            store.append(record)
    return interrupted


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except UsageError as exc:
        print(f"engine.sweep: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("engine.sweep: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
