"""``python -m engine.sweep``: measure a grid of points and record each one.

With no arguments it runs a small default sweep on whatever the machine has (a CUDA GPU
when one is usable, else the CPU). Every point becomes one JSON Lines record in the
output directory (and a CSV row); a rerun with the same directory skips recorded points.

Launched as several ranks (``mpirun -n N python -m engine.sweep --tp T --ep E ...`` or
``srun``, N = T x E, one rank per device), every point runs sharded over the ranks
(``engine.dist``): rank 0 writes one merged record per point (cluster figures) and the
ranks' own records under ``OUT/ranks/``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

from engine import dist
from engine.backends import BACKENDS, select_backend
from engine.backends.base import BackendUnavailable, DoesNotFit, UnsupportedPoint
from engine.cli import OneLineParser, UsageError
from engine.dist.points import Terminated
from engine.measure import Protocol, measure_point
from engine.models import SpecError, list_models, load_spec
from engine.plan import PlanError, build_plan
from engine.point import Point
from engine.power.base import SourceError
from engine.power.session import open_session
from engine.precision import PRESETS, PrecisionError, parse_precision
from engine.provenance import provenance
from engine.results import ResultsError, ResultStore, record_header
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


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(
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
        type=_offset,
        default=None,
        metavar="S|auto",
        help="seconds to add to the log's times to get host monotonic seconds, or auto: "
        "estimated at each point from the busy/idle pattern of the windows (default: epoch "
        "times are mapped through the host's wall clock)",
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
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor-parallel degree: heads, FFN and vocabulary split over TP ranks, summed by "
        "all-reduce (launch TP x EP ranks with mpirun or srun)",
    )
    p.add_argument(
        "--ep",
        type=int,
        default=1,
        help="expert-parallel degree: experts and the batch's sequences split over EP ranks, "
        "tokens exchanged by all-to-all (--batch is the whole cluster's)",
    )
    p.add_argument(
        "--comm-timeout",
        type=float,
        default=dist.DEFAULT_TIMEOUT_S,
        metavar="S",
        help="seconds a rank waits for the others in a collective before the point fails "
        f"(a rank died or hangs; default {dist.DEFAULT_TIMEOUT_S:g})",
    )
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


def _offset(text: str) -> float | str:
    """A clock offset in seconds, or "auto"."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither seconds nor auto") from None


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
    if args.tp < 1 or args.ep < 1:
        raise UsageError("--tp and --ep must be >= 1")
    uneven = [b for b in _ints(args.batch, "batch") if b % args.ep]
    if uneven:
        raise UsageError(
            f"--batch {','.join(map(str, uneven))} does not divide over --ep {args.ep}: expert "
            "parallelism splits the batch's sequences over the expert-parallel ranks"
        )
    if args.comm_timeout <= 0:
        raise UsageError("--comm-timeout must be > 0 seconds")
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
    comm = _connect(args)
    log = _log if comm.is_root else _quiet
    if comm.size > 1:
        from engine.dist.points import install_sigterm

        install_sigterm()
    backend, note = _agree(comm, lambda: _backend(args, comm, precisions))

    def open_store():
        if not comm.is_root:
            return None, set()
        try:
            store = ResultStore(args.out)
            if comm.size > 1:
                from engine.dist.points import recover_inflight

                recover_inflight(store, log)
            return store, store.done_keys(retry_failed=args.retry_failed)
        except ResultsError as exc:
            raise UsageError(str(exc)) from None

    store, done = _agree(comm, open_store)
    points = [
        Point(
            model=spec.name,
            batch=b,
            context=ctx,
            precision=prec,
            tp=args.tp,
            ep=args.ep,
            routing=args.routing,
        )
        for spec in specs
        for prec in precisions
        for ctx in contexts
        for b in batches
    ]
    spec_by_name = {spec.name: spec for spec in specs}
    backend_key = backend.name
    key_of = _key_function(backend_key, comm.size)
    todo_index = [i for i, p in enumerate(points) if key_of(p) not in done]
    todo = [points[i] for i in comm.bcast(todo_index)]
    log(
        f"backend: {note}; {len(points)} points, {len(points) - len(todo)} already in "
        f"{store.path if store else args.out}, {len(todo)} to run"
        + (f"; {comm.size} ranks, tp={args.tp} ep={args.ep}" if comm.size > 1 else "")
    )
    protocol = Protocol(
        warmup_s=args.warmup,
        duration_s=args.duration,
        min_steps=args.min_steps,
        repetitions=args.repetitions,
    )
    interrupted = False
    power = _agree(comm, lambda: _open_power(args, comm, backend, log) if todo else None)
    status = 0
    try:
        if comm.size == 1:
            interrupted = _run_points(
                args, backend, note, todo, spec_by_name, protocol, power, store
            )
        else:
            from engine.dist.points import run_points_ranks

            status = run_points_ranks(
                args, comm, backend, note, todo, spec_by_name, protocol, power, store, log
            )
            interrupted = status == 130
    finally:
        if power is not None:
            power.close()
    if not comm.is_root:
        return status
    keys = {key_of(p) for p in points}
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
    if status:
        log("stopped early: finished points are kept; rerun the same command to resume")
    return status


def _connect(args) -> dist.Comm:
    """The run's communicator, checked against ``--tp`` x ``--ep``."""
    try:
        comm = dist.connect(timeout_s=args.comm_timeout)
    except dist.CommError as exc:
        raise UsageError(str(exc)) from None
    if comm.size != args.tp * args.ep:
        if comm.size == 1:
            raise UsageError(
                f"--tp {args.tp} --ep {args.ep} needs {args.tp * args.ep} ranks: launch with "
                f"mpirun -n {args.tp * args.ep} python -m engine.sweep ... (or srun)"
            )
        _silence(comm)
        raise UsageError(
            f"{comm.size} ranks were launched but --tp {args.tp} x --ep {args.ep} = "
            f"{args.tp * args.ep}: give --tp and --ep so that their product is {comm.size}"
        )
    return comm


def _silence(comm: dist.Comm) -> None:
    """Only rank 0 prints usage errors (every rank sees the same one)."""
    global _QUIET
    _QUIET = not comm.is_root


def _agree(comm: dist.Comm, make):
    """``make()`` on every rank; a UsageError on any rank stops every rank with it (so no
    rank waits for one that left)."""
    error, value = None, None
    try:
        value = make()
    except UsageError as exc:
        error = str(exc)
    if comm.size > 1:
        errors = [e for e in comm.allgather(error) if e]
        if errors:
            _silence(comm)
            raise UsageError(errors[0])
    elif error:
        raise UsageError(error)
    return value


def _backend(args, comm: dist.Comm, precisions):
    """The backend of this rank (its own GPU under MPI) and why it was chosen."""
    memory_gb = args.memory_gb
    device_note = ""
    if comm.size > 1 and args.backend in ("auto", "cuda"):
        from engine.dist.devices import DeviceError, apply_gpu_choice, choose_gpu, nvml_gpu_count

        count = nvml_gpu_count()
        try:
            if args.backend == "cuda" or count:
                choice = choose_gpu(
                    comm.local_rank, comm.local_size, os.environ.get("CUDA_VISIBLE_DEVICES"), count
                )
                apply_gpu_choice(choice)
                device_note = f"; rank {comm.rank}: {choice.note}"
        except DeviceError as exc:
            raise UsageError(str(exc)) from None
    try:
        backend, note = select_backend(args.backend, memory_gb)
    except BackendUnavailable as exc:
        raise UsageError(str(exc)) from None
    if backend.name == "cpu":
        threads = None
        if comm.size > 1:
            from engine.dist.devices import cpu_threads

            threads = cpu_threads(comm.local_size)
            device_note = f"; {threads} compute thread(s) per rank"
        if memory_gb is None or threads is not None:
            budget = memory_gb if memory_gb is not None else DEFAULTS["cpu_memory_gb"]
            backend = type(backend)(memory_budget_gb=budget, threads=threads)
    for precision in precisions:
        reason = backend.precision_unsupported(precision)
        if reason:
            raise UsageError(f"precision {precision.name}: {reason}")
    return backend, note + device_note


def _key_function(backend_key: str, world: int):
    """The record key of a point: the point's own, or its cluster key under MPI."""
    if world == 1:
        return lambda p: f"{backend_key}|{p.key()}"
    from engine.dist.points import cluster_key

    return lambda p: cluster_key(backend_key, p)


def _open_power(args, comm: dist.Comm, backend, log):
    """This rank's power session, or None. One process: every source. Several ranks: the
    first rank of each node samples the node-wide sources (CPU package, a meter's log) and,
    with the CPU backend, every GPU's (none is a rank's own device); on a GPU backend each
    rank samples its own GPU's sensors (matched by PCI bus id)."""
    spec, power_log = args.power, args.power_log
    if comm.size > 1 and not comm.is_node_leader:
        power_log = None
        if backend.name == "cpu" or spec == "none":
            spec = "none"
        else:
            gpu = [m for m in ("nvml", "amdsmi") if spec == "auto" or m in spec.split(",")]
            spec = ",".join(gpu) or "none"
    if spec == "none" and not power_log:
        return None
    try:
        return open_session(
            spec,
            power_log=power_log,
            power_log_offset_s=args.power_log_offset,
            power_log_averaging_s=args.power_log_averaging,
            gpu_pci_bus_id=getattr(backend, "pci_bus_id", None),
            log=log,
        )
    except (ValueError, SourceError) as exc:
        raise UsageError(str(exc)) from None


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
            record = record_header(
                f"{backend_key}|{point.key()}",
                backend=backend_key,
                note=note,
                point=point.to_dict(),
                spec=spec,
                protocol=protocol,
                seed=args.seed,
                peaks=peaks,
                provenance=prov,
            )
            record["idle"] = idle
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
                log("    " + describe_result(record))
            except KeyboardInterrupt:
                interrupted = True
                break
            except Exception as exc:  # a point's failure must not end the sweep
                status, error = classify_failure(exc)
                record.update(status=status, error=error)
            if record["status"] != "ok":
                log(f"    {record['status']}: {record['error']}")
            store.append(record)
    return interrupted


def describe_result(record: dict) -> str:
    """One line of a measured point: throughput, interactivity, roofline, energy."""
    m, e = record["metrics"], record["energy"]
    energy = f"; energy null: {e['reason']}"
    if e.get("tokens_per_joule") is not None:
        energy = (
            f", {e['tokens_per_joule']:.3g} ± {e['tokens_per_joule_uncertainty']:.2g} "
            f"tok/J at {e['boundary']} ({e['avg_power_w']:.1f} W)"
        )
        if e.get("flags"):
            energy += " flags: " + "; ".join(e["flags"])
    return (
        f"{m['throughput_tok_s']:.3g} tok/s, {m['interactivity_tok_s_per_user']:.3g} "
        f"tok/s/user, roofline fraction {m['roofline_fraction']:.2f}" + energy
    )


def classify_failure(exc: BaseException) -> tuple[str, str]:
    """A point's exception as the record's ``(status, error)``."""
    if isinstance(exc, UnsupportedPoint):
        return "unsupported", str(exc)
    if isinstance(exc, (DoesNotFit, PlanError)):
        return "failed", str(exc)
    if isinstance(exc, MemoryError):
        return "failed", "out of memory while allocating or running"
    return "failed", f"{type(exc).__name__}: {exc}"


_QUIET = False  # set on ranks other than 0, which leave messages to rank 0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _quiet(message: str) -> None:
    """The log of ranks other than 0: nothing (rank 0 speaks for the run)."""


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except UsageError as exc:
        if not _QUIET:
            print(f"engine.sweep: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("engine.sweep: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("engine.sweep: terminated (SIGTERM)", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
