"""The float64 NumPy reference of one decode step, written independently of any backend.

It reads the same packed weights and KV-cache codes (decoded in float64) and follows the
same definition of the step, so a backend's output can be compared with it on random
inputs. It is slow by design: for tests on small models only.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from engine.formats import QTensor, dequantize, fake_quantize_activation
from engine.weights import KVCache

RMS_EPS = 1e-5
ROPE_THETA = 10000.0


def _w(q: QTensor) -> np.ndarray:
    return dequantize(q, dtype=np.float64)


def _kv(codes: np.ndarray, fmt: str, scale: float) -> np.ndarray:
    kinds = {
        "bf16": ml_dtypes.bfloat16,
        "fp8_e4m3": ml_dtypes.float8_e4m3fn,
        "fp8_e5m2": ml_dtypes.float8_e5m2,
    }
    return codes.view(kinds[fmt]).astype(np.float64) * scale


def _encode(x: np.ndarray, fmt: str, scale: float) -> np.ndarray:
    """Round-trip a new KV entry through the cache format, as the cache stores it."""
    kinds = {
        "bf16": ml_dtypes.bfloat16,
        "fp8_e4m3": ml_dtypes.float8_e4m3fn,
        "fp8_e5m2": ml_dtypes.float8_e5m2,
    }
    limits = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}
    if fmt == "bf16":
        return x.astype(kinds[fmt]).astype(np.float64)
    y = np.clip(x / scale, -limits[fmt], limits[fmt]).astype(kinds[fmt]).astype(np.float64)
    return y * scale


def _rms(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + RMS_EPS) * weight


def _rope(x: np.ndarray, position: int) -> np.ndarray:
    d = x.shape[-1]
    half = d // 2
    inv_freq = ROPE_THETA ** (-np.arange(half) * 2.0 / d)
    angle = position * inv_freq
    cos, sin = np.cos(angle), np.sin(angle)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


class ReferenceStep:
    """The decode step in float64 over given weights and caches (caches are not modified)."""

    def __init__(
        self, spec, point, head: dict, weights: dict[int, dict], caches: dict[int, KVCache]
    ) -> None:
        self.spec, self.point = spec, point
        self.head, self.weights, self.caches = head, weights, caches
        self.act = point.precision.activation

    def _fq(self, x: np.ndarray) -> np.ndarray:
        if self.act == "bf16":
            return x
        return fake_quantize_activation(x, self.act).astype(np.float64)

    def forward(self, tokens: np.ndarray, assignments: dict[int, np.ndarray] | None) -> np.ndarray:
        """Logits (B, vocab shard), float64."""
        x = _w(self.head["embed"])[tokens]
        for layer in sorted(self.weights):
            w = self.weights[layer]
            h = _rms(x, w["attn_norm"])
            if self.spec.attention == "mla":
                x = x + self._mla(layer, w, h)
            else:
                x = x + self._gqa(layer, w, h)
            h = _rms(x, w["ffn_norm"])
            if self.spec.is_moe_layer(layer):
                x = x + self._moe(w, h, assignments[layer])
            else:
                x = x + self._dense(w, h, "ffn.gate_up", "ffn.down")
        h = _rms(x, self.head["final_norm"])
        return h @ _w(self.head["lm_head"]).T

    def _dense(self, w: dict, x: np.ndarray, gate_up: str, down: str) -> np.ndarray:
        gu = self._fq(x) @ _w(w[gate_up]).T
        f = gu.shape[1] // 2
        return self._fq(_silu(gu[:, :f]) * gu[:, f:]) @ _w(w[down]).T

    def _gqa(self, layer: int, w: dict, x: np.ndarray) -> np.ndarray:
        spec, cache = self.spec, self.caches[layer]
        batch, hd = x.shape[0], spec.head_dim
        kv_heads = cache.k.shape[1]
        qkv = (self._fq(x) @ _w(w["attn.qkv_proj"]).T).reshape(batch, -1, hd)
        heads = qkv.shape[1] - 2 * kv_heads
        pos = self.point.context - 1
        q = _rope(qkv[:, :heads], pos)
        k_new = _rope(qkv[:, heads : heads + kv_heads], pos)
        v_new = qkv[:, heads + kv_heads :]
        keys = _kv(cache.k, cache.fmt, cache.scale)
        values = _kv(cache.v, cache.fmt, cache.scale)
        keys[:, :, pos] = _encode(k_new, cache.fmt, cache.scale)
        values[:, :, pos] = _encode(v_new, cache.fmt, cache.scale)
        lo = 0
        if spec.layer_attention_kind(layer) == "sliding":
            lo = max(0, pos + 1 - spec.sliding_window)
        group = heads // kv_heads
        keys = np.repeat(keys[:, :, lo : pos + 1], group, axis=1)
        values = np.repeat(values[:, :, lo : pos + 1], group, axis=1)
        scores = np.einsum("bhd,bhtd->bht", q, keys) * hd**-0.5
        out = np.einsum("bht,bhtd->bhd", _softmax(scores), values)
        return self._fq(out.reshape(batch, heads * hd)) @ _w(w["attn.o_proj"]).T

    def _mla(self, layer: int, w: dict, x: np.ndarray) -> np.ndarray:
        spec, cache = self.spec, self.caches[layer]
        batch = x.shape[0]
        nope, rope, rank = spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.kv_lora_rank
        a = self._fq(x)
        if spec.q_lora_rank:
            qa = _rms(a @ _w(w["mla.q_a_proj"]).T, w["mla.q_a_norm"])
            q = self._fq(qa) @ _w(w["mla.q_b_proj"]).T
        else:
            q = a @ _w(w["mla.q_proj"]).T
        heads = q.shape[1] // (nope + rope)
        q = q.reshape(batch, heads, nope + rope)
        pos = self.point.context - 1
        q_rope = _rope(q[:, :, nope:], pos)
        kva = a @ _w(w["mla.kv_a_proj"]).T
        latent_new = _rms(kva[:, :rank], w["mla.kv_a_norm"])
        k_rope_new = _rope(kva[:, rank:], pos)
        latent = _kv(cache.k, cache.fmt, cache.scale)
        k_rope = _kv(cache.v, cache.fmt, cache.scale)
        latent[:, pos] = _encode(latent_new, cache.fmt, cache.scale)
        k_rope[:, pos] = _encode(k_rope_new, cache.fmt, cache.scale)
        w_uk = np.stack([_w(t) for t in w["mla.q_absorb"]])  # (H, rank, nope)
        q_latent = np.einsum("bhn,hrn->bhr", self._fq(q[:, :, :nope]), w_uk)
        scores = (
            np.einsum("bhr,btr->bht", q_latent, latent[:, : pos + 1])
            + np.einsum("bhp,btp->bht", q_rope, k_rope[:, : pos + 1])
        ) * (nope + rope) ** -0.5
        out_latent = np.einsum("bht,btr->bhr", _softmax(scores), latent[:, : pos + 1])
        w_uv = np.stack([_w(t) for t in w["mla.v_up"]])  # (H, vdim, rank)
        values = np.einsum("bhr,hvr->bhv", self._fq(out_latent), w_uv)
        return self._fq(values.reshape(batch, -1)) @ _w(w["attn.o_proj"]).T

    def _moe(self, w: dict, x: np.ndarray, assigned: np.ndarray) -> np.ndarray:
        logits = x @ _w(w["moe.router"]).T
        gates = _softmax(np.take_along_axis(logits, assigned, axis=1))
        a = self._fq(x)
        out = np.zeros_like(x)
        for b in range(x.shape[0]):
            for slot, expert in enumerate(assigned[b]):
                gu = a[b : b + 1] @ _w(w["moe.gate_up"][expert]).T
                f = gu.shape[1] // 2
                act = self._fq(_silu(gu[:, :f]) * gu[:, f:])
                out[b] += gates[b, slot] * (act @ _w(w["moe.down"][expert]).T)[0]
        if "moe.shared_gate_up" in w:
            out += self._dense(w, x, "moe.shared_gate_up", "moe.shared_down")
        return out
