"""Host bytes of a layout's filled regions: weights in their packed formats, KV caches,
constant tables, and cuBLASLt's interleaved copy of FP4 block scales.

The weights are those of ``engine.weights`` for the run seed, so the CUDA backend, the CPU
backend and the float64 reference compute with the same model. Used by the device runner
(which uploads the bytes) and by the NumPy emulator (which copies them into its arena).
"""

from __future__ import annotations

import numpy as np

from engine.backends.cuda_layout import Layout, tensor_scale
from engine.formats import QTensor
from engine.weights import KVCache, kv_cache, layer_weights


class WeightSource:
    """Generates each layer's weights and caches once and serves region bytes from them."""

    def __init__(self, layout: Layout, seed: int) -> None:
        self.layout, self.plan, self.seed = layout, layout.plan, seed
        self._weights: dict[int, dict] = {}
        self._caches: dict[int, KVCache] = {}

    def weights(self, layer: int) -> dict:
        if layer not in self._weights:
            self._weights[layer] = layer_weights(self.plan, layer, self.seed)
        return self._weights[layer]

    def cache(self, layer: int) -> KVCache:
        if layer not in self._caches:
            self._caches[layer] = kv_cache(self.plan, layer, self.seed)
        return self._caches[layer]

    def release(self, layer: int) -> None:
        """Drop a layer's host copies once its regions are uploaded."""
        self._weights.pop(layer, None)
        self._caches.pop(layer, None)

    def region_bytes(self, name: str) -> np.ndarray | None:
        """The bytes region ``name`` starts with (uint8), or None for scratch."""
        reg = self.layout.regions[name]
        kind = reg.source[0]
        if kind == "const":
            return (
                np.ascontiguousarray(self.layout.consts[reg.source[1]]).view(np.uint8).reshape(-1)
            )
        if kind == "zero":
            return np.zeros(reg.nbytes, dtype=np.uint8)
        if kind == "kv":
            _, layer, which = reg.source
            cache = self.cache(layer)
            want = tensor_scale(cache.fmt, 1.0)
            if np.float32(cache.scale) != np.float32(want):
                raise RuntimeError(f"layer {layer} KV scale {cache.scale} != laid out {want}")
            arr = cache.k if which == "k" else cache.v
            return np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
        if kind == "weight":
            _, _copy, layer, op, part, index = reg.source
            return self._weight_part(layer, op, part, index)
        return None

    def _weight_part(self, layer: int, op: str, part: str, index: int) -> np.ndarray:
        w = self.weights(layer)
        value = w[op]
        if part == "norm":
            return np.asarray(value, dtype=np.float32).view(np.uint8).reshape(-1)
        tensors: list[QTensor] = list(value) if isinstance(value, list) else [value]
        if index >= 0:
            tensors = [tensors[index]]
        if part == "data":
            return np.concatenate([t.data.view(np.uint8).reshape(-1) for t in tensors])
        if part == "scale":
            return np.concatenate([np.asarray(t.scale, np.uint8).reshape(-1) for t in tensors])
        if part == "wscale":
            vals = []
            for t in tensors:
                if t.global_scale is not None:
                    vals.append(t.global_scale)
                elif t.scale is not None and t.scale.shape == ():
                    vals.append(float(t.scale))
                else:
                    raise RuntimeError(f"{op}: per-row FP8 weight scales are not supported")
            want = tensor_scale(tensors[0].fmt, tensors[0].shape[1] ** -0.5)
            if any(np.float32(v) != np.float32(want) for v in vals):
                raise RuntimeError(f"{op}: weight scale differs from the laid-out {want}")
            return np.asarray(vals, dtype=np.float32).view(np.uint8)
        if part == "lt_scale":
            (t,) = tensors
            return interleave_block_scales(np.asarray(t.scale, np.uint8))
        raise ValueError(f"unknown weight part {part}")


def block_scale_offsets(rows: int, groups: int) -> np.ndarray:
    """Offsets (rows, groups) of block scales in cuBLASLt's interleaved layout.

    Tiles of 128 rows x 4 groups (512 bytes); rows padded to 128 and groups to 4. Inside a
    tile, row r and group g sit at (r % 32) * 16 + (r // 32) * 4 + g. Source: the cuBLAS
    guide's "1D block scaling factors layout", as nvmath-python's ``get_block_scale_offset``
    computes it (and ``tpj_block_scale_offset`` in kernels/tpj_codecs.cuh).
    """
    groups_p = -(-groups // 4) * 4
    r = np.arange(rows)[:, None]
    g = np.arange(groups)[None, :]
    tile = (g // 4) * 4 + (r // 128) * groups_p
    rr = r % 128
    return tile * 128 + (rr % 32) * 16 + (rr // 32) * 4 + g % 4


def interleave_block_scales(scale: np.ndarray) -> np.ndarray:
    """Block scales (rows, groups) rearranged into cuBLASLt's padded interleaved layout."""
    rows, groups = scale.shape
    rows_p, groups_p = -(-rows // 128) * 128, -(-groups // 4) * 4
    out = np.zeros(rows_p * groups_p, dtype=np.uint8)
    out[block_scale_offsets(rows, groups)] = scale
    return out
