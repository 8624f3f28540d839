"""The CUDA runner: a layout made real on the device, replayed as a CUDA graph.

One arena (a plain ``cudaMalloc``) holds every region of the layout; weights and KV caches
are uploaded in their packed formats (``cuda_weights``), scratch is poisoned with 0xFF bytes
(NaN floats) so anything read before written shows. Each weight copy's step is captured once
into a CUDA graph; ``run_steps`` replays the graphs back to back, cycling the copies so that
consecutive steps read different weights (the L2 cache never holds them), and reads the
``%globaltimer`` stamps the kernels wrote into the device's stamp ring. The stamps go to the
host monotonic clock through ``engine.timebase`` (re-anchored when its error bound grows).

Tensor parallelism (one rank per GPU under MPI): the layout's ``AllReduce`` steps are NCCL
all-reduces (``engine.dist.nccl``) enqueued on the runner's stream and captured into the
graph with the kernels; every wait on the stream then has a deadline. UNVERIFIED: written
and imported, never run on GPUs (none was available); the CPU backend's MPI path is tested.
"""

from __future__ import annotations

import time

import numpy as np

from engine.backends.base import DoesNotFit, Runner, StepWindows
from engine.backends.cuda_layout import (
    STAMP_RING,
    AllReduce,
    Layout,
    LtGemm,
    Ref,
    build_layout,
    rotation_copies,
    variant_blob,
    windows_from_stamps,
)
from engine.backends.cuda_weights import WeightSource
from engine.plan import Plan

#: Largest clock-mapping error tolerated before the timebase is re-anchored (ns).
MAX_CLOCK_ERROR_NS = 5_000.0
CALIBRATION_PAIRS = 200
REANCHOR_PAIRS = 50


def weight_bytes(layout: Layout, copy: int = 0) -> int:
    """Bytes of one weight copy's regions in a layout."""
    return sum(
        r.nbytes for r in layout.regions.values() if r.source[0] == "weight" and r.source[1] == copy
    )


class CudaRunner(Runner):
    """A plan's run layers on the GPU, ready to replay decode steps."""

    def __init__(self, backend, plan: Plan, layers: list[int], seed: int, groups=None) -> None:
        """``groups`` (``engine.dist.Groups``): the rank's communicators when ``plan`` is a
        tensor-parallel shard (its all-reduces run over ``groups.tp`` through NCCL)."""
        import cupy

        self.cp = cupy
        self.backend = backend
        self.plan = plan
        self.layers_run = list(layers)
        self.layers_total = plan.spec.num_layers
        self.clock_uncertainty_ns = 0.0
        caps = backend.caps
        layout = build_layout(plan, layers, seed, caps, copies=1)
        spare = backend.memory_budget_bytes() - layout.total_bytes
        copies = rotation_copies(weight_bytes(layout), caps.l2_bytes, spare)
        if copies > 1:
            layout = build_layout(plan, layers, seed, caps, copies=copies)
        self.layout = layout
        self.copies = copies
        try:
            self.arena = cupy.cuda.Memory(layout.total_bytes)
        except cupy.cuda.memory.OutOfMemoryError as exc:
            raise DoesNotFit(
                f"{layout.total_bytes / 1e9:.2f} GB for weights, KV caches and scratch do not fit "
                f"on the device ({exc.__class__.__name__})"
            ) from None
        self.base = int(self.arena.ptr)
        cupy.cuda.runtime.memset(self.base, 0xFF, layout.total_bytes)
        self._upload(WeightSource(layout, seed))
        self.kernels = backend.kernels
        self.lt = backend.lt
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.nccl = None
        if plan.point.tp > 1:
            if groups is None:
                raise ValueError("a tensor-parallel shard needs its communicators")
            from engine.dist.nccl import NcclGroup

            self.nccl = NcclGroup(groups.tp)
        self.counter = 0
        # One eager step per copy: loads kernels, runs the cuBLASLt heuristics, and surfaces
        # launch errors outside graph capture.
        for copy in range(copies):
            self._enqueue(copy)
            self.counter += 1
        self._sync()
        self.graphs = [self._capture(copy) for copy in range(copies)]
        self._timer = cupy.cuda.Memory(64)
        self._pairs: list[tuple[int, int, int]] = []
        self.clock_map = self._calibrate(CALIBRATION_PAIRS)

    # -- setup ----------------------------------------------------------------------------

    def ptr(self, ref: Ref | None) -> int:
        """Device address of a reference (0 for null)."""
        if ref is None:
            return 0
        return self.base + self.layout.offsets[ref.region] + ref.offset

    def _upload(self, source: WeightSource) -> None:
        rt = self.cp.cuda.runtime
        by_layer: dict[int | None, list[str]] = {}
        for name, reg in self.layout.regions.items():
            layer = (
                reg.source[2]
                if reg.source[0] == "weight"
                else (reg.source[1] if reg.source[0] == "kv" else None)
            )
            by_layer.setdefault(layer, []).append(name)
        for layer, names in by_layer.items():
            for name in names:
                raw = source.region_bytes(name)
                if raw is None:
                    continue
                raw = np.ascontiguousarray(raw)
                rt.memcpy(self.ptr(Ref(name)), raw.ctypes.data, raw.nbytes, rt.memcpyHostToDevice)
            if layer is not None:
                source.release(layer)

    def _value(self, arg) -> int | float:
        if arg is None:
            return 0
        if isinstance(arg, Ref):
            return self.ptr(arg)
        return arg.value

    def _enqueue(self, copy: int) -> None:
        stream = self.stream
        for st in self.layout.programs[copy]:
            if isinstance(st, AllReduce):
                self.nccl.allreduce_f32(self.ptr(st.buf), st.count, stream.ptr)
            elif isinstance(st, LtGemm):
                self.lt.matmul(
                    st,
                    self.ptr(st.w),
                    self.ptr(st.x),
                    self.ptr(st.y),
                    self.ptr(st.w_scales),
                    self.ptr(st.x_scales),
                    stream.ptr,
                )
            else:
                self.kernels.launch(
                    st.kernel, st.grid, st.block, [self._value(a) for a in st.args], stream
                )

    def _capture(self, copy: int):
        self.stream.begin_capture()
        try:
            self._enqueue(copy)
        finally:
            graph = self.stream.end_capture()
        graph.upload(self.stream)
        return graph

    # -- clock ----------------------------------------------------------------------------

    def _read_pair(self) -> tuple[int, int, int]:
        rt = self.cp.cuda.runtime
        before = time.monotonic_ns()
        self.kernels.launch("tpj_read_globaltimer", (1,), 32, [self._timer.ptr, 0], self.stream)
        self.stream.synchronize()
        after = time.monotonic_ns()
        out = np.zeros(1, dtype=np.uint64)
        rt.memcpy(out.ctypes.data, self._timer.ptr, 8, rt.memcpyDeviceToHost)
        return before, int(out[0]), after

    def _calibrate(self, n: int):
        from engine.timebase import fit_clock_map

        self._pairs.extend(self._read_pair() for _ in range(n))
        pairs = np.array(self._pairs, dtype=np.int64)
        return fit_clock_map(pairs[:, 0], pairs[:, 1], pairs[:, 2])

    # -- steps ----------------------------------------------------------------------------

    def _stamp_rows(self, first_counter: int, steps: int) -> np.ndarray:
        rt = self.cp.cuda.runtime
        per = self.layout.stamps_per_step
        ring = np.empty(STAMP_RING * per, dtype=np.uint64)
        rt.memcpy(ring.ctypes.data, self.ptr(Ref("stamps")), ring.nbytes, rt.memcpyDeviceToHost)
        rows = [(first_counter + i) % STAMP_RING for i in range(steps)]
        stamps = ring.reshape(STAMP_RING, per)[rows].astype(np.int64)
        if (stamps <= 0).any() or (np.diff(stamps, axis=1) < 0).any():
            raise RuntimeError("device stamps are missing or out of order: a kernel did not run")
        return stamps

    def run_steps(self, n: int) -> StepWindows:
        from engine.timebase import needs_recalibration

        parts = []
        done = 0
        self.last_events_ms = []
        while done < n:
            chunk = min(n - done, STAMP_RING)
            first = self.counter + 1
            start, stop = self.cp.cuda.Event(), self.cp.cuda.Event()
            start.record(self.stream)
            for i in range(chunk):
                self.graphs[(self.counter + i) % self.copies].launch(self.stream)
            stop.record(self.stream)
            self._sync()
            # CUDA-event time of the chunk's replays: the stamps must lie inside it.
            self.last_events_ms.append(self.cp.cuda.get_elapsed_time(start, stop))
            self.counter += chunk
            parts.append(self._stamp_rows(first, chunk))
            done += chunk
        stamps = np.concatenate(parts)
        if needs_recalibration(self.clock_map, time.monotonic_ns(), MAX_CLOCK_ERROR_NS):
            self.clock_map = self._calibrate(REANCHOR_PAIRS)
        host = self.clock_map.to_host_ns(stamps)
        self.clock_uncertainty_ns = max(
            self.clock_uncertainty_ns, float(np.max(self.clock_map.uncertainty_at_ns(stamps)))
        )
        start, end, class_ns, other = windows_from_stamps(host, self.layout)
        return StepWindows(start_ns=start, end_ns=end, class_ns=class_ns, other_ns=other)

    def forward(self, tokens: np.ndarray, assignments: dict[int, np.ndarray] | None) -> np.ndarray:
        """One graph replay on given tokens and routing; returns logits (B, vocab shard)."""
        rt = self.cp.cuda.runtime
        blob = variant_blob(self.layout.variants, tokens, assignments)
        slot = self.counter % self.layout.n_variants
        at = self.ptr(Ref("variants")) + slot * blob.size
        rt.memcpy(at, blob.ctypes.data, blob.nbytes, rt.memcpyHostToDevice)
        self.graphs[self.counter % self.copies].launch(self.stream)
        self._sync()
        self.counter += 1
        # Restore the timed variant so later timed steps see the drawn routing.
        keep = self.layout.variant_blobs[slot]
        rt.memcpy(at, keep.ctypes.data, keep.nbytes, rt.memcpyHostToDevice)
        n = next(op.n for op in self.plan.ops if op.name == "lm_head")
        out = np.empty((self.plan.point.batch, n), dtype=np.float32)
        rt.memcpy(
            out.ctypes.data, self.ptr(Ref(self.layout.logits)), out.nbytes, rt.memcpyDeviceToHost
        )
        return out

    def _sync(self) -> None:
        """Wait for the stream; with NCCL, within the group's timeout (else abort, raise)."""
        if self.nccl is None:
            self.stream.synchronize()
        else:
            self.nccl.wait(self.stream)

    def close(self) -> None:
        if getattr(self, "graphs", None) is None:
            return
        try:
            self._sync()
        finally:
            if self.nccl is not None:
                self.nccl.abort()  # frees the communicator (it is per point)
                self.nccl = None
        self.graphs = None
        self.arena = None
        self._timer = None
        self.lt.release()
