"""Precisions of a point: the storage format of weights, activations and the KV cache.

A precision is named either by a preset (data below) or spelled out as
``w=FMT,a=FMT,kv=FMT``. Embeddings, the LM head and MoE routers stay in BF16 in every
preset, as deployed quantized checkpoints keep them.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.formats import ACTIVATION_FORMATS, KV_FORMATS, WEIGHT_FORMATS

# name -> (weight, activation, kv cache); a note says where each is deployed.
PRESETS: dict[str, tuple[str, str, str, str]] = {
    "bf16": ("bf16", "bf16", "bf16", "BF16 everywhere"),
    "fp8": ("fp8_e4m3", "fp8_e4m3", "fp8_e4m3", "FP8 E4M3 weights, activations and KV (W8A8)"),
    "w8a16": ("fp8_e4m3", "bf16", "bf16", "FP8 weight-only"),
    "fp4": ("nvfp4", "nvfp4", "fp8_e4m3", "native NVFP4 weights and activations (Blackwell)"),
    "w4a16": ("mxfp4", "bf16", "bf16", "MXFP4 weight-only, unpacked to BF16 (as on Hopper)"),
    "nvfp4-w4a16": ("nvfp4", "bf16", "bf16", "NVFP4 weight-only, unpacked to BF16"),
}


class PrecisionError(ValueError):
    """A precision that cannot be parsed; the message is one line saying how to fix it."""


@dataclass(frozen=True)
class Precision:
    """Storage formats of one point: weights, activations and KV cache."""

    weight: str
    activation: str
    kv: str

    @property
    def name(self) -> str:
        """The preset name when one matches, else the explicit ``w=..,a=..,kv=..`` spelling."""
        for preset, (w, a, kv, _) in PRESETS.items():
            if (w, a, kv) == (self.weight, self.activation, self.kv):
                return preset
        return f"w={self.weight},a={self.activation},kv={self.kv}"

    @property
    def gemm_compute(self) -> str:
        """The arithmetic a GEMM of this precision runs in on a tensor-core device.

        FP8 x FP8 runs in FP8 and FP4 x FP4 in FP4; a low-precision weight with BF16
        activations is unpacked to BF16, so it saves bytes, not FLOPs.
        """
        w, a = self.weight, self.activation
        if w.startswith("fp8") and a.startswith("fp8"):
            return "fp8"
        if w in ("mxfp4", "nvfp4") and a in ("mxfp4", "nvfp4"):
            return "fp4"
        if w in ("mxfp4", "nvfp4") and a.startswith("fp8"):
            return "fp8"
        return "bf16"


def parse_precision(text: str) -> Precision:
    """Parse a preset name (``bf16``, ``fp8``, ``fp4``, ...) or ``w=FMT,a=FMT,kv=FMT``."""
    text = text.strip().lower()
    if text in PRESETS:
        w, a, kv, _ = PRESETS[text]
        return Precision(w, a, kv)
    if "=" not in text:
        raise PrecisionError(
            f"unknown precision '{text}'; use one of {', '.join(PRESETS)} or w=FMT,a=FMT,kv=FMT"
        )
    parts: dict[str, str] = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in ("w", "a", "kv"):
            raise PrecisionError(f"precision '{text}': unknown key '{key}'; keys are w, a, kv")
        parts[key] = value.strip()
    weight = parts.get("w", "bf16")
    activation = parts.get("a", "bf16")
    kv = parts.get("kv", "bf16")
    for label, value, allowed in (
        ("w", weight, WEIGHT_FORMATS),
        ("a", activation, ACTIVATION_FORMATS),
        ("kv", kv, KV_FORMATS),
    ):
        if value not in allowed:
            raise PrecisionError(
                f"precision '{text}': {label}={value} is not a format; choose from {', '.join(allowed)}"
            )
    return Precision(weight, activation, kv)
