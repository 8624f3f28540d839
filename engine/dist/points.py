"""The sweep's point loop across ranks: every point started and stopped together, its
outcome agreed by all ranks, one merged record per point (rank 0) plus each rank's own.

Per point: a barrier (every rank alive and done with the previous point), the clock offsets
to rank 0, a fresh group for the point split into tensor- and expert-parallel groups, then
``engine.measure.measure_point`` on every rank. A rank that fails tells the others
(``Comm.signal_failure``), which stop waiting at once. The ranks then send their outcome
and record to rank 0 (with a timeout that names any rank that does not answer): if every
rank answered, rank 0 writes the merged record (failed on every rank when any failed, with
the reasons of the ranks whose own failure it was) and the ranks' records, and the sweep
goes on; if a rank did not answer (it died or hangs), rank 0 writes the point as failed
with that reason and ends the run (MPI_Abort), keeping every finished point.

A launcher that ends the job when a rank dies (mpirun's default: SIGTERM, then SIGKILL a
second later) is covered twice: rank 0 turns SIGTERM into a failed record of the point in
flight, and a marker file of the point in flight (``inflight.json``) is turned into a failed
record by the next run if rank 0 had no time to write it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import time
from pathlib import Path

from engine.dist import (
    DEFAULT_SETUP_TIMEOUT_S,
    Comm,
    CommTimeout,
    Groups,
    PeerFailed,
    PointContext,
    layout,
    token_share,
)
from engine.point import Point
from engine.results import record_header

RANKS_DIR = "ranks"  # the ranks' own records, beside the merged ones
INFLIGHT = "inflight.json"
TERMINATED_REASON = (
    "the job was terminated (SIGTERM) during this point; mpirun does that to every rank "
    "when one dies: see the launcher's message for which"
)
UNFINISHED_REASON = (
    "the run ended during this point without recording it (a rank died or the job was "
    "killed; see the launcher's log)"
)


class Terminated(BaseException):
    """SIGTERM arrived. Not an Exception, so a point's error handling does not swallow it."""


_sigterm = {"critical": False, "pending": False}


def _on_sigterm(signum, frame) -> None:
    if _sigterm["critical"]:
        _sigterm["pending"] = True
        return
    raise Terminated(f"signal {signum}")


def install_sigterm() -> None:
    """Turn SIGTERM into ``Terminated`` (deferred while a record is being written)."""
    signal.signal(signal.SIGTERM, _on_sigterm)


@contextlib.contextmanager
def _writing():
    """A section that a SIGTERM must not cut (appending records); it is raised after it."""
    _sigterm["critical"] = True
    try:
        yield
    finally:
        _sigterm["critical"] = False
        if _sigterm["pending"]:
            _sigterm["pending"] = False
            raise Terminated("signal 15")


def cluster_key(backend_key: str, point: Point) -> str:
    """The merged record's key: the point's key with ``rank=all``."""
    return f"{backend_key}|{dataclasses.replace(point, rank=0).key()}".replace(
        "|rank=0|", "|rank=all|"
    )


def _cluster_point(point: Point) -> dict:
    data = point.to_dict()
    data["rank"] = None
    return data


def recover_inflight(store, log) -> None:
    """Turn the marker of a point a previous run did not finish into a failed record."""
    path = Path(store.dir) / INFLIGHT
    if not path.exists():
        return
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
        key = marker["key"]
    except (OSError, ValueError, KeyError):
        path.unlink(missing_ok=True)
        return
    if not _recorded(store, key):
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(marker.get("started_unix_s", 0)))
        store.append(
            {
                "key": key,
                "status": "failed",
                "error": f"{UNFINISHED_REASON}; it started at {since}",
                "scope": "cluster",
                "world_size": marker.get("world_size"),
                "backend": marker.get("backend"),
                "point": marker.get("point"),
            }
        )
        log(f"recorded the unfinished point {key} of the previous run as failed")
    path.unlink(missing_ok=True)


def _mark(store, key: str, point: Point, backend_key: str, world: int) -> None:
    marker = {
        "key": key,
        "point": _cluster_point(point),
        "backend": backend_key,
        "world_size": world,
        "started_unix_s": time.time(),
    }
    (Path(store.dir) / INFLIGHT).write_text(json.dumps(marker), encoding="utf-8")


def _recorded(store, key: str) -> bool:
    return key in {r.get("key") for r in store.read()}


def _unmark(store) -> None:
    (Path(store.dir) / INFLIGHT).unlink(missing_ok=True)


def run_points_ranks(
    args, comm: Comm, backend, note, todo, spec_by_name, protocol, power, store, log
) -> int:
    """Measure every point of ``todo`` on all ranks; rank 0 writes the records. Returns the
    exit status (0, 130 interrupted, 143 terminated); ends the run when a rank is lost."""
    from engine.measure import measure_point
    from engine.provenance import provenance
    from engine.results import ResultStore
    from engine.sweep import classify_failure, describe_result

    if not todo:
        return 0
    world, root = comm.size, comm.is_root
    rank_store = ResultStore(Path(store.dir) / RANKS_DIR) if root else None
    backend_key = backend.name
    device_per_rank = backend_key != "cpu"  # a GPU rank drives its own device
    setup_timeout_s = max(DEFAULT_SETUP_TIMEOUT_S, 10 * comm.timeout_s)
    inflight = None
    try:
        log("measuring device peaks (copy bandwidth, matmul rate) on every rank ...")
        peaks = backend.measure_peaks()
        comm.barrier(setup_timeout_s)
        peaks = _with_link(peaks, comm, backend)
        log(
            f"peaks (rank 0): copy {peaks.copy_bw_gbps:.1f} GB/s, link "
            + (f"{peaks.link_bw_gbps:.2f} GB/s" if peaks.link_bw_gbps else "not measured")
        )
        device = backend.device_info()
        prov = provenance(device)
        idle = None
        if power is not None and power.active:  # every rank's devices idle at once
            idle = power.measure_idle(args.idle, log=log)
        comm.barrier(setup_timeout_s)
        t_start = time.monotonic()
        for i, point in enumerate(todo, 1):
            spec = spec_by_name[point.model]
            key = cluster_key(backend_key, point)
            eta = ""
            if i > 1:
                per = (time.monotonic() - t_start) / (i - 1)
                eta = f" (about {per * (len(todo) - i + 1):.0f} s left)"
            log(
                f"[{i}/{len(todo)}] {point.model} B={point.batch} L={point.context} "
                f"{point.precision.name} tp={point.tp} ep={point.ep} on {world} ranks{eta}"
            )
            if root:
                _mark(store, key, point, backend_key, world)
            inflight = (key, point, spec)
            comm.barrier()
            offsets = comm.clock_offsets_ns()
            point_comm = comm.for_point()
            groups = Groups.make(point_comm, point.tp, point.ep)
            outcome, record = _measure_rank(
                args, comm, backend, note, point, spec, protocol, power, peaks, prov, idle,
                offsets, groups, setup_timeout_s, measure_point, classify_failure, log,
            )  # fmt: skip
            try:
                gathered = comm.gather((outcome, record))
            except CommTimeout as exc:
                if root:
                    reason = str(exc)
                    if outcome[0] != "ok":
                        reason += f"; rank 0 had stopped with: {outcome[1]}"
                    _write(store, rank_store, key, point, spec, backend_key, note, args,
                           protocol, peaks, prov, None, reason, offsets, device_per_rank)  # fmt: skip
                    log(f"    failed: {exc}; stopping (finished points are kept)")
                comm.abort(1)
                return 1
            verdict = None
            if root:
                _write(store, rank_store, key, point, spec, backend_key, note, args, protocol,
                       peaks, prov, gathered, None, offsets, device_per_rank, describe_result,
                       log)  # fmt: skip
                # Groups whose collectives all completed can be freed (collectively).
                verdict = all(o[0] == "ok" for o, _ in gathered)
            inflight = None
            if comm.bcast(verdict, timeout_s=2 * comm.timeout_s):
                groups.free()
        return 0
    except KeyboardInterrupt:
        if root:
            _unmark(store)  # an interrupted point is rerun, not failed
        return 130
    except Terminated:
        if root and inflight is not None and not _recorded(store, inflight[0]):
            key, point, spec = inflight
            with contextlib.suppress(Terminated):
                _write(store, rank_store, key, point, spec, backend_key, note, args, protocol,
                       None, None, None, TERMINATED_REASON, None, device_per_rank)  # fmt: skip
            log(f"    failed: {TERMINATED_REASON}")
        return 143
    except CommTimeout as exc:
        # Between points (a barrier, the clock ping-pong): a rank is gone.
        if root and inflight is not None:
            key, point, spec = inflight
            _write(store, rank_store, key, point, spec, backend_key, note, args, protocol,
                   None, None, None, str(exc), None, device_per_rank)  # fmt: skip
        log(f"stopping: {exc} (finished points are kept)")
        comm.abort(1)
        return 1


def _with_link(peaks, comm: Comm, backend):
    """``peaks`` with the measured link bandwidth between the ranks."""
    if backend.name == "cuda":
        from engine.dist.nccl import nccl_bus_bw_gbps

        bw, method = nccl_bus_bw_gbps(comm)
    else:
        from engine.dist.linkbw import allreduce_bus_bw_gbps

        bw, method = allreduce_bus_bw_gbps(comm)
    return dataclasses.replace(peaks, link_bw_gbps=bw, method=f"{peaks.method}; {method}")


def _measure_rank(
    args, comm, backend, note, point, spec, protocol, power, peaks, prov, idle,
    offsets, groups, setup_timeout_s, measure_point, classify_failure, log,
) -> tuple[tuple[str, str | None, bool], dict]:  # fmt: skip
    """This rank's part of one point: its outcome ``(status, error, secondary)`` and record."""
    from engine.dist.rank_plan import rank_plan

    rank = comm.rank
    rank_point = dataclasses.replace(point, rank=rank)
    where = layout(rank, point.tp, point.ep)
    record = record_header(
        f"{backend.name}|{rank_point.key()}",
        scope="rank",
        cluster_key=cluster_key(backend.name, point),
        backend=backend.name,
        note=note,
        point=rank_point.to_dict(),
        spec=spec,
        protocol=protocol,
        seed=args.seed,
        peaks=peaks,
        provenance=prov,
    )
    record["idle"] = idle
    ctx = PointContext(
        groups=groups,
        offsets=offsets,
        tokens_per_step=token_share(point.batch, point.tp, point.ep),
        setup_timeout_s=setup_timeout_s,
        info={
            "rank": rank,
            "world_size": comm.size,
            "tp_rank": where.tp_rank,
            "ep_rank": where.ep_rank,
            "host": comm.node,
            "local_rank": comm.local_rank,
            "node_leader": comm.is_node_leader,
            "device": prov.get("device", {}).get("name") if isinstance(prov, dict) else None,
        },
    )
    quiet = (lambda msg: None) if rank else (lambda msg: log("    " + msg))
    try:
        plan = rank_plan(spec, rank_point)
        record["plan"] = plan.totals()
        record.update(
            measure_point(backend, plan, peaks, protocol, args.seed, quiet, power, dist=ctx)
        )
        return ("ok", None, False), record
    except PeerFailed as exc:
        record.update(status="failed", error=f"stopped because {exc}")
        return ("failed", str(exc), True), record
    except CommTimeout as exc:
        record.update(status="failed", error=str(exc))
        return ("failed", str(exc), True), record
    except (KeyboardInterrupt, Terminated):
        raise
    except Exception as exc:  # a rank's failure fails the point on every rank
        status, error = classify_failure(exc)
        groups.all.signal_failure(f"{status}: {error}")
        record.update(status=status, error=error)
        if rank:
            log(f"[rank {rank}] {status}: {error}")
        return (status, error, False), record


def _write(
    store, rank_store, key, point, spec, backend_key, note, args, protocol, peaks, prov,
    gathered, lost_reason, offsets, device_per_rank, describe_result=None, log=None,
) -> None:  # fmt: skip
    """Rank 0: append the merged record of one point and the ranks' records. ``gathered``
    is every rank's (outcome, record), or None when a rank was lost (``lost_reason``)."""
    from engine.dist.cluster import merge_ranks, merge_status

    merged = record_header(
        key,
        status="failed",
        error=lost_reason,
        scope="cluster",
        world_size=None,
        backend=backend_key,
        note=note,
        point=_cluster_point(point),
        spec=spec,
        protocol=protocol,
        seed=args.seed,
        peaks=peaks,
        provenance=prov,
    )
    answered = [g for g in (gathered or []) if g is not None]
    records = [rec for _, rec in answered]
    if gathered is not None:
        merged["world_size"] = len(gathered)
        status, error = merge_status([o for o, _ in gathered])
        merged.update(status=status, error=error)
        merged["idle"] = {"by_rank": [rec.get("idle") for rec in records]}
        merged["plan"] = dict(records[0].get("plan") or {})
        merged["plan"]["by_rank"] = [rec.get("plan") for rec in records]
        if status == "ok":
            try:
                merged.update(merge_ranks(records, offsets, device_per_rank))
            except Exception as exc:  # an inconsistent set of rank records voids the point
                merged.update(status="failed", error=f"merging the ranks' records: {exc}")
    with _writing():
        store.append(merged)
        for rec in records:
            rank_store.append(rec)
        _unmark(store)
    if log is not None:
        if merged["status"] == "ok" and describe_result is not None:
            log("    cluster: " + describe_result(merged))
        else:
            log(f"    {merged['status']}: {merged['error']}")
