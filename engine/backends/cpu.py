"""The CPU backend: runs a plan's decode step for real with NumPy and Numba.

Weights stay in their packed formats and are dequantised on the fly inside the GEMM
kernels, so the bytes streamed are the plan's bytes. Activations are held in float32
(a BF16 activation precision is computed in float32; an FP8 one is emulated by rounding
the GEMM inputs through FP8 with a per-tensor scale). It is a real CPU baseline, not a
stand-in for a GPU.

Under MPI (one rank per process, ``engine.dist``) a rank runs its shard of the step for
real: tensor parallelism splits heads and FFN columns/rows and sums the attention output
projection and the FFN output over the tensor-parallel group with an MPI all-reduce; expert
parallelism keeps the rank's experts and sequences and moves each (token, expert) pair's
hidden vector to the expert's rank and its output back with two MPI all-to-alls. The rank's
weights are the slices of the one-device model for the same seed (``engine.dist.shard``),
so the ranks together compute the same step as one device.
"""

from __future__ import annotations

import dataclasses
import os
import time

import ml_dtypes
import numba
import numpy as np

from engine.backends import cpu_kernels as K
from engine.backends.base import Backend, Runner, StepWindows
from engine.formats import fake_quantize_activation
from engine.plan import Plan, build_plan
from engine.precision import Precision
from engine.provenance import cpu_name
from engine.roofline import Peaks
from engine.routing import inclusion_probabilities, sample_assignments
from engine.weights import EMBED_LAYER, KVCache, kv_cache, layer_class, layer_weights

RMS_EPS = 1e-5
ROPE_THETA = 10000.0
ASSIGNMENT_VARIANTS = 8  # distinct routing draws cycled through the timed steps
PEAK_COPY_BYTES = 512 << 20  # copy-bandwidth buffer, far larger than the caches
PEAK_MATMUL_N = 2048
CPU_ACTIVATIONS = ("bf16", "fp8_e4m3", "fp8_e5m2")
FP8_MAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}
FP8_DTYPE = {"fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2}


def available_memory_bytes() -> int:
    """Memory the OS says is available now (MemAvailable), in bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def encode_kv(x: np.ndarray, fmt: str, scale: float) -> np.ndarray:
    """Codes of ``x`` in a KV-cache format with a fixed per-tensor scale (RNE, saturating)."""
    if fmt == "bf16":
        return x.astype(ml_dtypes.bfloat16).view(np.uint16)
    limit = FP8_MAX[fmt]
    return np.clip(x / scale, -limit, limit).astype(FP8_DTYPE[fmt]).view(np.uint8)


class CpuBackend(Backend):
    """NumPy + Numba on the host CPU."""

    name = "cpu"

    def __init__(self, memory_budget_gb: float | None = None, threads: int | None = None) -> None:
        """``threads``: Numba compute threads (None: Numba's default, one per core); ranks
        sharing a node each take their share (``engine.dist.devices.cpu_threads``)."""
        self._budget_gb = memory_budget_gb
        if threads is not None:
            numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))

    def device_info(self) -> dict:
        return {
            "kind": "cpu",
            "name": cpu_name(),
            "cores": os.cpu_count(),
            "numba_threads": numba.get_num_threads(),
            "memory_available_bytes": available_memory_bytes(),
        }

    def precision_unsupported(self, precision: Precision) -> str | None:
        if precision.activation not in CPU_ACTIVATIONS:
            return (
                f"the cpu backend has no {precision.activation} activations; "
                f"use one of {', '.join(CPU_ACTIVATIONS)}"
            )
        return None

    def measure_peaks(self) -> Peaks:
        copy = K.copy_bandwidth_gbps(nbytes=PEAK_COPY_BYTES, repeats=5)
        rate = _matmul_tflops_fp32(PEAK_MATMUL_N)
        return Peaks(
            copy_bw_gbps=copy["max_gbps"],
            matmul_tflops={"*": rate},
            method=(
                "copy: best of 5 copies of 512 MiB, NumPy and Numba-parallel, max, bytes read"
                " + written; matmul: best of 5 float32 NumPy matmuls 2048^3 (the CPU computes"
                " every precision in float32)"
            ),
        )

    def memory_budget_bytes(self) -> int:
        if self._budget_gb is not None:
            return int(self._budget_gb * 1e9)
        return int(0.6 * available_memory_bytes())

    def prepare(self, plan: Plan, layers: list[int], seed: int, comm=None) -> CpuRunner:
        """A runner for ``plan``; ``comm`` (``engine.dist.Groups``) when it is one rank's
        shard of a tensor- or expert-parallel step."""
        return CpuRunner(plan, layers, seed, groups=comm)


def _matmul_tflops_fp32(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 matmul rate of NumPy's BLAS on this host, TFLOP/s."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e12


class CpuRunner(Runner):
    """A plan's layers allocated in host memory, ready to run decode steps.

    ``groups`` (``engine.dist.Groups``) is required when the plan is one rank's shard
    (tp or ep above 1); ``comm_ns`` then counts the ns spent in collectives.
    """

    def __init__(self, plan: Plan, layers: list[int], seed: int, groups=None) -> None:
        self.plan = plan
        self.spec = plan.spec
        self.point = plan.point
        self.layers_run = list(layers)
        self.layers_total = plan.spec.num_layers
        self.seed = seed
        self.act_fmt = plan.point.precision.activation
        self.tp, self.ep = plan.point.tp, plan.point.ep
        self.groups = groups
        self.comm_ns = 0
        sharded = self.tp > 1 or self.ep > 1
        if sharded and groups is None:
            raise ValueError(f"a tp={self.tp} ep={self.ep} shard needs its communicators")
        # The one-device plan of the same point: its weights, caches and inputs, cut to this
        # rank's part when sharded, are what every rank draws from.
        full = build_plan(
            plan.spec, dataclasses.replace(plan.point, tp=1, ep=1, rank=0)
        ) if sharded else plan  # fmt: skip
        if sharded:
            from engine.dist import layout
            from engine.dist.shard import Cut, rank_kv_cache, rank_layer_weights

            cut = Cut(plan.spec, layout(plan.point.rank, self.tp, self.ep))
            self.cut = cut
            self.head = rank_layer_weights(full, EMBED_LAYER, seed, cut)
            self.weights = {layer: rank_layer_weights(full, layer, seed, cut) for layer in layers}
            self.caches: dict[int, KVCache] = {
                layer: rank_kv_cache(full, layer, seed, cut) for layer in layers
            }
            rows = cut.sequences(plan.point.batch)
            if self.ep > 1:
                self.experts_per_rank = plan.spec.num_experts // self.ep
        else:
            self.head = layer_weights(plan, EMBED_LAYER, seed)
            self.weights = {layer: layer_weights(plan, layer, seed) for layer in layers}
            self.caches = {layer: kv_cache(plan, layer, seed) for layer in layers}
            rows = slice(None)
        self.classes = {layer: "/".join(layer_class(plan, layer)) for layer in layers}
        rng = np.random.default_rng([seed, 0xA55])
        batch = full.point.batch
        self.token_variants = [
            rng.integers(0, plan.spec.vocab_size, size=batch)[rows]
            for _ in range(ASSIGNMENT_VARIANTS)
        ]
        self.assignment_variants: list[dict[int, np.ndarray]] = []
        if plan.spec.num_experts:
            pi = inclusion_probabilities(
                plan.point.routing, plan.spec.num_experts, plan.spec.experts_per_token
            )
            for _ in range(ASSIGNMENT_VARIANTS):
                self.assignment_variants.append(
                    {
                        layer: sample_assignments(rng, pi, batch)[rows]
                        for layer in layers
                        if plan.spec.is_moe_layer(layer)
                    }
                )
        self._step_index = 0

    # -- collectives ---------------------------------------------------------------------

    def _allreduce_tp(self, x: np.ndarray) -> None:
        """Sum a layer's partial output over the tensor-parallel group, in place."""
        if self.tp > 1:
            t0 = time.perf_counter_ns()
            self.groups.tp.allreduce_sum(x)
            self.comm_ns += time.perf_counter_ns() - t0

    def _alltoall_ep(self, chunks: list[np.ndarray]) -> list[np.ndarray]:
        t0 = time.perf_counter_ns()
        out = self.groups.ep.alltoallv(chunks)
        self.comm_ns += time.perf_counter_ns() - t0
        return out

    # -- the decode step -----------------------------------------------------------------

    def _fq(self, x: np.ndarray) -> np.ndarray:
        """GEMM input in the activation precision (identity for BF16, held in float32)."""
        if self.act_fmt == "bf16":
            return x
        return np.ascontiguousarray(fake_quantize_activation(x, self.act_fmt), dtype=np.float32)

    @staticmethod
    def _gemm(x: np.ndarray, q) -> np.ndarray:
        out = np.empty((x.shape[0], q.shape[0]), dtype=np.float32)
        K.gemm_q(np.ascontiguousarray(x, dtype=np.float32), q, out)
        return out

    def forward(
        self,
        tokens: np.ndarray,
        assignments: dict[int, np.ndarray] | None = None,
        layer_ns: dict[str, int] | None = None,
    ) -> np.ndarray:
        """One decode step for ``tokens`` (B,); returns logits (B, vocab shard), float32.

        ``assignments[layer]`` (B, k) are the experts each token is routed to in MoE layers.
        When ``layer_ns`` is given, the ns spent in each layer class are added to it.
        On a rank of a sharded step, ``tokens`` and ``assignments`` are the rank's sequences
        (B / ep of them) and the logits its vocabulary rows (every rank of a tensor-parallel
        group returns its part of the same tokens' logits).
        """
        embed = self.head["embed"]
        rows = embed.data[tokens].astype(np.uint32) << 16
        residual = np.ascontiguousarray(rows.view(np.float32))
        hidden = np.empty_like(residual)
        for layer in self.layers_run:
            t0 = time.perf_counter_ns()
            w = self.weights[layer]
            K.rmsnorm(residual, w["attn_norm"], RMS_EPS, hidden)
            if self.spec.attention == "mla":
                attn = self._mla(layer, w, hidden)
            else:
                attn = self._gqa(layer, w, hidden)
            self._allreduce_tp(attn)
            K.add_rmsnorm(attn, residual, w["ffn_norm"], RMS_EPS, hidden)
            if self.spec.is_moe_layer(layer):
                ffn = self._moe(layer, w, hidden, (assignments or {}).get(layer))
            else:
                ffn = self._dense(w, hidden, "ffn.gate_up", "ffn.down")
            self._allreduce_tp(ffn)
            residual += ffn
            if layer_ns is not None:
                key = self.classes[layer]
                layer_ns[key] = layer_ns.get(key, 0) + time.perf_counter_ns() - t0
        K.rmsnorm(residual, self.head["final_norm"], RMS_EPS, hidden)
        return self._gemm(hidden, self.head["lm_head"])

    def _dense(self, w: dict, x: np.ndarray, gate_up: str, down: str) -> np.ndarray:
        gu = self._gemm(self._fq(x), w[gate_up])
        act = np.empty((x.shape[0], gu.shape[1] // 2), dtype=np.float32)
        K.swiglu(gu, act)
        return self._gemm(self._fq(act), w[down])

    def _gqa(self, layer: int, w: dict, x: np.ndarray) -> np.ndarray:
        spec, cache = self.spec, self.caches[layer]
        batch, hd = x.shape[0], spec.head_dim
        kv_heads = cache.k.shape[1]
        heads = w["attn.qkv_proj"].shape[0] // hd - 2 * kv_heads
        qkv = self._gemm(self._fq(x), w["attn.qkv_proj"]).reshape(batch, heads + 2 * kv_heads, hd)
        q = np.ascontiguousarray(qkv[:, :heads])
        k = np.ascontiguousarray(qkv[:, heads : heads + kv_heads])
        v = qkv[:, heads + kv_heads :]
        pos = self.point.context - 1
        K.rope(q, pos, ROPE_THETA)
        K.rope(k, pos, ROPE_THETA)
        cache.k[:, :, pos, :] = encode_kv(k, cache.fmt, cache.scale)
        cache.v[:, :, pos, :] = encode_kv(v, cache.fmt, cache.scale)
        window = None
        if spec.layer_attention_kind(layer) == "sliding":
            window = spec.sliding_window
        out = np.empty_like(q)
        K.attention_decode(
            q, cache.k, cache.v, cache.scale, cache.fmt, self.point.context, window, hd**-0.5, out
        )
        return self._gemm(self._fq(out.reshape(batch, heads * hd)), w["attn.o_proj"])

    def _mla(self, layer: int, w: dict, x: np.ndarray) -> np.ndarray:
        spec, cache = self.spec, self.caches[layer]
        batch = x.shape[0]
        nope, rope, rank = spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.kv_lora_rank
        a = self._fq(x)
        if spec.q_lora_rank:
            qa = self._gemm(a, w["mla.q_a_proj"])
            K.rmsnorm(qa, w["mla.q_a_norm"], RMS_EPS, qa)
            q = self._gemm(self._fq(qa), w["mla.q_b_proj"])
        else:
            q = self._gemm(a, w["mla.q_proj"])
        heads = q.shape[1] // (nope + rope)
        q = q.reshape(batch, heads, nope + rope)
        q_rope = np.ascontiguousarray(q[:, :, nope:])
        kva = self._gemm(a, w["mla.kv_a_proj"])
        latent = np.ascontiguousarray(kva[:, :rank])
        k_rope = np.ascontiguousarray(kva[:, rank:]).reshape(batch, 1, rope)
        K.rmsnorm(latent, w["mla.kv_a_norm"], RMS_EPS, latent)
        pos = self.point.context - 1
        K.rope(q_rope, pos, ROPE_THETA)
        K.rope(k_rope, pos, ROPE_THETA)
        cache.k[:, pos, :] = encode_kv(latent, cache.fmt, cache.scale)
        cache.v[:, pos, :] = encode_kv(k_rope[:, 0, :], cache.fmt, cache.scale)
        q_latent = np.empty((batch, heads, rank), dtype=np.float32)
        for head, w_uk in enumerate(w["mla.q_absorb"]):
            q_latent[:, head, :] = self._gemm(self._fq(q[:, head, :nope]), w_uk)
        out_latent = np.empty_like(q_latent)
        K.mla_attention_decode(
            q_latent,
            q_rope,
            cache.k,
            cache.v,
            cache.scale,
            cache.fmt,
            self.point.context,
            (nope + rope) ** -0.5,
            out_latent,
        )
        vdim = spec.v_head_dim
        values = np.empty((batch, heads * vdim), dtype=np.float32)
        for head, w_uv in enumerate(w["mla.v_up"]):
            values[:, head * vdim : (head + 1) * vdim] = self._gemm(
                self._fq(out_latent[:, head, :]), w_uv
            )
        return self._gemm(self._fq(values), w["attn.o_proj"])

    def _moe(self, layer: int, w: dict, x: np.ndarray, assigned: np.ndarray | None) -> np.ndarray:
        if assigned is None:
            raise ValueError(f"layer {layer} is MoE: routing assignments are required")
        logits = self._gemm(x, w["moe.router"])
        chosen = np.take_along_axis(logits, assigned, axis=1)
        gates = np.exp(chosen - chosen.max(axis=1, keepdims=True))
        gates /= gates.sum(axis=1, keepdims=True)
        a = self._fq(x)
        if self.ep > 1:
            out = self._experts_ep(w, a, assigned, gates)
        else:
            out = self._experts_local(w, a, assigned, gates)
        if "moe.shared_gate_up" in w:
            out += self._dense(w, x, "moe.shared_gate_up", "moe.shared_down")
        return out

    def _expert(self, w: dict, expert: int, xe: np.ndarray) -> np.ndarray:
        """One expert's output for its tokens ``xe`` (already in the activation format)."""
        gu = self._gemm(xe, w["moe.gate_up"][expert])
        act = np.empty((xe.shape[0], gu.shape[1] // 2), dtype=np.float32)
        K.swiglu(gu, act)
        return self._gemm(self._fq(act), w["moe.down"][expert])

    def _experts_local(
        self, w: dict, a: np.ndarray, assigned: np.ndarray, gates: np.ndarray
    ) -> np.ndarray:
        """Routed experts of one device: every expert is here."""
        top_k = assigned.shape[1]
        out = np.zeros_like(a)
        flat = assigned.reshape(-1)
        order = np.argsort(flat, kind="stable")
        experts, starts = np.unique(flat[order], return_index=True)
        ends = np.append(starts[1:], flat.size)
        for expert, lo, hi in zip(experts, starts, ends):
            slots = order[lo:hi]
            tokens = slots // top_k
            ye = self._expert(w, int(expert), np.ascontiguousarray(a[tokens]))
            ye *= gates.reshape(-1)[slots][:, None]
            np.add.at(out, tokens, ye)
        return out

    def _experts_ep(
        self, w: dict, a: np.ndarray, assigned: np.ndarray, gates: np.ndarray
    ) -> np.ndarray:
        """Routed experts spread over the expert-parallel group: each (token, expert) pair's
        vector goes to the expert's rank (all-to-all), is computed there, and comes back."""
        top_k = assigned.shape[1]
        flat = assigned.reshape(-1)
        per = self.experts_per_rank
        dest = flat // per
        order = np.argsort(dest, kind="stable")  # pairs grouped by destination, token order kept
        bounds = np.searchsorted(dest[order], np.arange(self.ep + 1))
        send_rows = [a[order[bounds[d] : bounds[d + 1]] // top_k] for d in range(self.ep)]
        send_ids = [
            (flat[order[bounds[d] : bounds[d + 1]]] - d * per).astype(np.int32)
            for d in range(self.ep)
        ]
        got_rows = self._alltoall_ep(send_rows)
        got_ids = self._alltoall_ep(send_ids)
        rows = np.concatenate(got_rows)
        ids = np.concatenate(got_ids)
        results = np.empty_like(rows)
        by_expert = np.argsort(ids, kind="stable")
        experts, starts = np.unique(ids[by_expert], return_index=True)
        ends = np.append(starts[1:], ids.size)
        for expert, lo, hi in zip(experts, starts, ends):
            idx = by_expert[lo:hi]
            results[idx] = self._expert(w, int(expert), np.ascontiguousarray(rows[idx]))
        cuts = np.cumsum([0] + [r.shape[0] for r in got_rows])
        back = self._alltoall_ep([results[cuts[s] : cuts[s + 1]] for s in range(self.ep)])
        returned = np.concatenate(back)
        out = np.zeros_like(a)
        returned *= gates.reshape(-1)[order][:, None]
        np.add.at(out, order // top_k, returned)
        return out

    # -- timing ---------------------------------------------------------------------------

    def run_steps(self, n: int) -> StepWindows:
        start = np.empty(n, dtype=np.int64)
        end = np.empty(n, dtype=np.int64)
        other = np.empty(n, dtype=np.int64)
        class_ns = {c: np.zeros(n, dtype=np.int64) for c in set(self.classes.values())}
        for i in range(n):
            v = self._step_index % ASSIGNMENT_VARIANTS
            self._step_index += 1
            tokens = self.token_variants[v]
            assignments = self.assignment_variants[v] if self.assignment_variants else None
            spent: dict[str, int] = {}
            start[i] = time.monotonic_ns()
            self.forward(tokens, assignments, spent)
            end[i] = time.monotonic_ns()
            for c, ns in spent.items():
                class_ns[c][i] = ns
            other[i] = end[i] - start[i] - sum(spent.values())
        return StepWindows(start_ns=start, end_ns=end, class_ns=class_ns, other_ns=other)

    def close(self) -> None:
        self.weights.clear()
        self.caches.clear()
