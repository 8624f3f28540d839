"""Model specs as data: the shapes of real models, their parameter counts, and a loader.

A :class:`ModelSpec` holds only the shape of a decoder-only transformer (dense or
mixture-of-experts, GQA or MLA attention, optional sliding-window layers). Every size is
an element count, never bytes: precision belongs to the point being measured, not to the
model. Specs are plain data files (TOML or JSON), so a user adds a model with a small
file and no code; the presets in ``engine/models/presets/`` carry the numbers of the
models' public ``config.json`` files, with the URL in ``source``.

Parameter counting follows the usual SwiGLU decoder layout::

    embedding        vocab * hidden
    per layer        RMSNorm before attention and before the FFN (hidden each)
                     attention (GQA or MLA, see ModelSpec.attention_params)
                     FFN: dense 3 * hidden * intermediate (gate, up, down), or
                          MoE router + routed experts + shared experts
    final norm       hidden
    LM head          vocab * hidden (absent when tied to the embedding)
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["ModelSpec", "SpecError", "load_spec", "list_models", "PRESET_DIR"]

AttentionKind = Literal["gqa", "mla"]
LayerAttention = Literal["full", "sliding"]

#: Directory of the preset model files (``NAME.toml`` or ``NAME.json``).
PRESET_DIR = Path(__file__).resolve().parent / "presets"

_SUFFIXES = (".toml", ".json")
_ATTENTION_KINDS = ("gqa", "mla")
_LAYER_KINDS = ("full", "sliding")


class SpecError(ValueError):
    """A model spec that cannot be used. The message is one line naming the model and field."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a decoder-only transformer. All sizes are element counts.

    ``head_dim`` may be left at 0 to derive it: ``hidden_size // num_heads`` for GQA (which
    then requires ``num_heads`` to divide ``hidden_size``), ``qk_nope_head_dim +
    qk_rope_head_dim`` for MLA. After construction it always holds the value in use.
    ``q_lora_rank`` of 0 is read as ``None`` (a plain query projection).
    """

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    #: Dense FFN width (elements); used by dense layers only, may be 0 if every layer is MoE.
    intermediate_size: int = 0
    #: Per-head query/key/value width (elements); 0 = derive (see the class docstring).
    head_dim: int = 0
    tie_word_embeddings: bool = False
    attention: AttentionKind = "gqa"
    #: q/k/v/o projection biases (GQA only).
    attention_bias: bool = False
    #: Per-head RMSNorm of q and k, one weight of head_dim each per layer (Qwen3).
    qk_norm: bool = False
    #: Key/value positions a sliding-window layer attends to (tokens).
    sliding_window: int | None = None
    #: Attention kind of each layer, cycled over the layers: "full" or "sliding".
    attention_pattern: tuple[str, ...] = ("full",)
    # Mixture of experts; num_experts = 0 means a dense model.
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    num_shared_experts: int = 0
    #: Width of each shared expert (elements); 0 = moe_intermediate_size.
    shared_expert_intermediate_size: int = 0
    #: Layers [0, first_dense_layers) use the dense FFN; later layers are MoE.
    first_dense_layers: int = 0
    #: Biases on every expert's gate/up (2 * width) and down (hidden) projections.
    expert_bias: bool = False
    #: One bias per expert on the router.
    router_bias: bool = False
    # Multi-head latent attention (attention == "mla").
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # Provenance.
    #: URL of the public config the numbers come from.
    source: str = ""
    #: Published total parameter count (parameters), if any.
    published_params: float | None = None
    #: Published active parameters per token (parameters); conventions differ, see notes.
    published_active_params: float | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.attention_pattern, list):
            object.__setattr__(self, "attention_pattern", tuple(self.attention_pattern))
        if self.q_lora_rank == 0:
            object.__setattr__(self, "q_lora_rank", None)
        self._validate()

    # ------------------------------------------------------------------ validation

    def _fail(self, message: str) -> SpecError:
        return SpecError(f"model '{self.name}': {message}")

    def _validate(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise SpecError(f"model {self.name!r}: name must be a non-empty string; set name")
        for field in _INT_FIELDS:
            value = getattr(self, field)
            if value is None and field in _OPTIONAL_INT_FIELDS:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise self._fail(f"{field}={value!r} must be an integer; fix {field}")
        for field in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size"):
            if getattr(self, field) <= 0:
                raise self._fail(f"{field}={getattr(self, field)} must be > 0; fix {field}")
        for field in _INT_FIELDS:
            value = getattr(self, field)
            if value is not None and value < 0:
                raise self._fail(f"{field}={value} must be >= 0; fix {field}")
        for field in _BOOL_FIELDS:
            if not isinstance(getattr(self, field), bool):
                raise self._fail(f"{field}={getattr(self, field)!r} must be true or false")

        if self.attention not in _ATTENTION_KINDS:
            raise self._fail(
                f"attention={self.attention!r} is not a known attention kind; "
                f"set attention to one of {', '.join(repr(k) for k in _ATTENTION_KINDS)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise self._fail(
                f"num_kv_heads={self.num_kv_heads} does not divide num_heads={self.num_heads}; "
                "fix num_kv_heads"
            )
        if self.attention == "mla":
            self._validate_mla()
        else:
            self._validate_gqa()

        # Layer attention pattern.
        pattern = self.attention_pattern
        if not isinstance(pattern, tuple) or not pattern:
            raise self._fail(
                f"attention_pattern={pattern!r} must be a non-empty list of "
                "'full' or 'sliding'; fix attention_pattern"
            )
        for entry in pattern:
            if entry not in _LAYER_KINDS:
                raise self._fail(
                    f"attention_pattern entry {entry!r} is not 'full' or 'sliding'; "
                    "fix attention_pattern"
                )
        if self.sliding_window is not None and (
            isinstance(self.sliding_window, bool) or self.sliding_window <= 0
        ):
            raise self._fail(
                f"sliding_window={self.sliding_window!r} must be a positive number of tokens; "
                "fix sliding_window or remove it"
            )
        if "sliding" in pattern and self.sliding_window is None:
            raise self._fail(
                "attention_pattern has 'sliding' layers but sliding_window is not set; "
                "set sliding_window (tokens) or use only 'full'"
            )

        # FFN: dense layers need a width; MoE needs experts, top-k and an expert width.
        if self.first_dense_layers >= self.num_layers:
            raise self._fail(
                f"first_dense_layers={self.first_dense_layers} must be < "
                f"num_layers={self.num_layers}; fix first_dense_layers"
            )
        has_dense = self.num_experts == 0 or self.first_dense_layers > 0
        if has_dense and self.intermediate_size <= 0:
            raise self._fail(
                f"intermediate_size={self.intermediate_size} must be > 0 for the dense FFN "
                "layers; set intermediate_size"
            )
        if self.num_experts > 0:
            if self.experts_per_token <= 0:
                raise self._fail(
                    f"experts_per_token={self.experts_per_token} must be > 0 for an MoE model "
                    f"(num_experts={self.num_experts}); set experts_per_token"
                )
            if self.experts_per_token > self.num_experts:
                raise self._fail(
                    f"experts_per_token={self.experts_per_token} exceeds "
                    f"num_experts={self.num_experts}; fix experts_per_token"
                )
            if self.moe_intermediate_size <= 0:
                raise self._fail(
                    f"moe_intermediate_size={self.moe_intermediate_size} must be > 0 for an "
                    "MoE model; set moe_intermediate_size"
                )
        else:
            for field in _MOE_ONLY_FIELDS:
                value = getattr(self, field)
                if value:
                    raise self._fail(
                        f"{field}={value!r} is set but num_experts=0 (a dense model); "
                        f"set num_experts or remove {field}"
                    )

    def _validate_gqa(self) -> None:
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise self._fail(
                    f"num_heads={self.num_heads} does not divide "
                    f"hidden_size={self.hidden_size}; set head_dim explicitly or fix num_heads"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        for field in _MLA_FIELDS:
            value = getattr(self, field)
            if value:
                raise self._fail(
                    f"{field}={value!r} is an MLA field but attention='gqa'; "
                    f"set attention = 'mla' or remove {field}"
                )

    def _validate_mla(self) -> None:
        for field in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, field) <= 0:
                raise self._fail(
                    f"{field}={getattr(self, field)} must be > 0 when attention='mla'; set {field}"
                )
        if self.attention_bias:
            raise self._fail(
                "attention_bias is only modelled for attention='gqa'; remove attention_bias"
            )
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.qk_nope_head_dim + self.qk_rope_head_dim)

    # ------------------------------------------------------------------ layers

    def layer_attention_kind(self, layer: int) -> LayerAttention:
        """Attention kind of ``layer`` (0-based): the pattern cycled over the layers."""
        self._check_layer(layer)
        kind = self.attention_pattern[layer % len(self.attention_pattern)]
        return "sliding" if kind == "sliding" else "full"

    def is_moe_layer(self, layer: int) -> bool:
        """Whether ``layer`` (0-based) has a mixture-of-experts FFN (else the dense FFN)."""
        self._check_layer(layer)
        return self.num_experts > 0 and layer >= self.first_dense_layers

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"model '{self.name}': layer {layer} not in [0, {self.num_layers})")

    @property
    def shared_expert_width(self) -> int:
        """Width of one shared expert (elements); 0 when there are none."""
        if not self.num_shared_experts:
            return 0
        return self.shared_expert_intermediate_size or self.moe_intermediate_size

    # ------------------------------------------------------------------ parameters

    def embedding_params(self) -> int:
        """Parameters of the token embedding table (vocab * hidden)."""
        return self.vocab_size * self.hidden_size

    def lm_head_params(self) -> int:
        """Parameters of the LM head; 0 when tied to the embedding table."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    def attention_params(self) -> int:
        """Parameters of one layer's attention block (projections, biases, inner norms)."""
        h, heads = self.hidden_size, self.num_heads
        if self.attention == "mla":
            nope, rope, vdim = self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
            rank = self.kv_lora_rank
            if self.q_lora_rank:
                q = (
                    h * self.q_lora_rank
                    + self.q_lora_rank
                    + self.q_lora_rank * heads * (nope + rope)
                )
            else:
                q = h * heads * (nope + rope)
            kv = h * (rank + rope) + rank + rank * heads * (nope + vdim)
            return q + kv + heads * vdim * h
        hd, kv_heads = self.head_dim, self.num_kv_heads
        weights = h * heads * hd + 2 * h * kv_heads * hd + heads * hd * h
        biases = (heads * hd + 2 * kv_heads * hd + h) if self.attention_bias else 0
        norms = 2 * hd if self.qk_norm else 0
        return weights + biases + norms

    def dense_ffn_params(self) -> int:
        """Parameters of one dense SwiGLU FFN (gate, up, down)."""
        return 3 * self.hidden_size * self.intermediate_size

    def expert_params(self) -> int:
        """Parameters of one routed expert (SwiGLU gate, up, down, and biases if any)."""
        h, width = self.hidden_size, self.moe_intermediate_size
        return 3 * h * width + ((2 * width + h) if self.expert_bias else 0)

    def shared_experts_params(self) -> int:
        """Parameters of all shared experts of one MoE layer."""
        h, width = self.hidden_size, self.shared_expert_width
        one = 3 * h * width + ((2 * width + h) if self.expert_bias else 0)
        return self.num_shared_experts * one

    def router_params(self) -> int:
        """Parameters of one MoE layer's router (hidden * experts, + bias)."""
        return self.num_experts * self.hidden_size + (self.num_experts if self.router_bias else 0)

    def layer_params(self, layer: int, active: bool = False) -> int:
        """Parameters of ``layer``: norms, attention and FFN.

        With ``active``, an MoE layer counts ``experts_per_token`` routed experts (the ones
        one token touches) instead of all of them.
        """
        total = 2 * self.hidden_size + self.attention_params()
        if self.is_moe_layer(layer):
            routed = self.experts_per_token if active else self.num_experts
            total += self.router_params() + routed * self.expert_params()
            total += self.shared_experts_params()
        else:
            total += self.dense_ffn_params()
        return total

    def _layers_params(self, active: bool) -> int:
        dense_layers = self.first_dense_layers if self.num_experts else self.num_layers
        total = 0
        if dense_layers:
            total += dense_layers * self.layer_params(0, active)
        if self.num_layers > dense_layers:
            total += (self.num_layers - dense_layers) * self.layer_params(dense_layers, active)
        return total

    def param_count(self) -> int:
        """Total parameters: embedding, every layer, final norm, and LM head unless tied."""
        return (
            self.embedding_params()
            + self._layers_params(active=False)
            + self.hidden_size
            + self.lm_head_params()
        )

    def active_param_count(self, include_embedding: bool = False) -> int:
        """Parameters touched per token: ``experts_per_token`` routed experts per MoE layer.

        The embedding table is left out by default, as a token reads one row of it (the
        convention of OpenAI's and DeepSeek's published active counts); the LM head is
        always counted, and a tied table is counted once, as the head. Pass
        ``include_embedding=True`` for the convention of Mistral's and Qwen's figures.
        """
        total = self._layers_params(active=True) + self.hidden_size
        total += self.vocab_size * self.hidden_size  # the LM head, tied or not
        if include_embedding and not self.tie_word_embeddings:
            total += self.embedding_params()
        return total

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data (the schema of a model file; tuples become lists)."""
        data = dataclasses.asdict(self)
        data["attention_pattern"] = list(self.attention_pattern)
        return data


_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(ModelSpec)}
_REQUIRED = tuple(
    name
    for name, f in _FIELDS.items()
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
)
_INT_FIELDS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "vocab_size",
    "intermediate_size",
    "head_dim",
    "num_experts",
    "experts_per_token",
    "moe_intermediate_size",
    "num_shared_experts",
    "shared_expert_intermediate_size",
    "first_dense_layers",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "sliding_window",
)
_OPTIONAL_INT_FIELDS = ("q_lora_rank", "sliding_window")
_BOOL_FIELDS = (
    "tie_word_embeddings",
    "attention_bias",
    "qk_norm",
    "expert_bias",
    "router_bias",
)
_STR_FIELDS = ("name", "attention", "source", "notes")
_FLOAT_FIELDS = ("published_params", "published_active_params")
_MOE_ONLY_FIELDS = (
    "experts_per_token",
    "moe_intermediate_size",
    "num_shared_experts",
    "shared_expert_intermediate_size",
    "expert_bias",
    "router_bias",
)
_MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")

#: Hugging Face config.json keys and the field of ours they correspond to (for error hints).
_HF_ALIASES = {
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "num_local_experts": "num_experts",
    "n_routed_experts": "num_experts",
    "num_experts_per_tok": "experts_per_token",
    "n_shared_experts": "num_shared_experts",
    "first_k_dense_replace": "first_dense_layers",
    "layer_types": "attention_pattern",
}


# ---------------------------------------------------------------------- loading


def list_models() -> list[str]:
    """Names of the preset models (sorted, lower case)."""
    if not PRESET_DIR.is_dir():
        return []
    return sorted(
        {p.stem.lower() for p in PRESET_DIR.iterdir() if p.suffix in _SUFFIXES and p.is_file()}
    )


def _preset_path(name: str) -> Path | None:
    want = name.strip().lower()
    if PRESET_DIR.is_dir():
        for p in sorted(PRESET_DIR.iterdir()):
            if p.suffix in _SUFFIXES and p.is_file() and p.stem.lower() == want:
                return p
    return None


def load_spec(name_or_path: str | Path) -> ModelSpec:
    """Load a model spec from a preset name (case-insensitive) or a ``.toml``/``.json`` file.

    Raises :class:`SpecError` with a one-line message for an unknown name, an unreadable
    or malformed file, an unknown or missing field, or an invalid shape.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    looks_like_path = (
        isinstance(name_or_path, Path)
        or path.suffix.lower() in _SUFFIXES
        or "/" in text
        or "\\" in text
    )
    if looks_like_path or path.is_file():
        if not path.is_file():
            raise SpecError(f"model file '{text}' does not exist; check the path")
        return _load_file(path)
    preset = _preset_path(text)
    if preset is None:
        raise SpecError(
            f"unknown model '{text}'; available presets: {', '.join(list_models())}; "
            "or pass the path of a .toml or .json model file"
        )
    return _load_file(preset)


def _load_file(path: Path) -> ModelSpec:
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise SpecError(
            f"model file '{path.name}': unsupported suffix '{suffix}'; use .toml or .json"
        )
    try:
        raw = path.read_bytes()
        content = raw.decode("utf-8")
        data = tomllib.loads(content) if suffix == ".toml" else json.loads(content)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise SpecError(f"cannot read model file '{path.name}': {err}") from None
    if not isinstance(data, dict):
        raise SpecError(
            f"model file '{path.name}': the top level must be a table of fields, "
            f"not {type(data).__name__}"
        )
    try:
        return spec_from_dict(data, default_name=path.stem)
    except SpecError as err:
        raise SpecError(f"{path.name}: {err}") from None


def spec_from_dict(data: dict[str, Any], default_name: str | None = None) -> ModelSpec:
    """Build a validated :class:`ModelSpec` from plain data (a parsed model file).

    ``name`` defaults to ``default_name`` (the file's stem) when the data has none.
    """
    data = dict(data)
    if "name" not in data and default_name is not None:
        data["name"] = default_name
    label = data.get("name", "?")
    unknown = [key for key in data if key not in _FIELDS]
    if unknown:
        key = unknown[0]
        hint = _HF_ALIASES.get(key) or next(
            iter(difflib.get_close_matches(key, list(_FIELDS), n=1)), None
        )
        fix = f"did you mean '{hint}'?" if hint else "remove it"
        raise SpecError(f"model '{label}': unknown field '{key}'; {fix}")
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise SpecError(
            f"model '{label}': missing required field '{missing[0]}'; "
            f"add {missing[0]} (required: {', '.join(_REQUIRED)})"
        )
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        kwargs[key] = _coerce(label, key, value)
    return ModelSpec(**kwargs)


def _coerce(label: str, key: str, value: Any) -> Any:
    """Check one field's type from a file and convert lists to tuples."""

    def bad(expected: str) -> SpecError:
        return SpecError(
            f"model '{label}': field '{key}' must be {expected}, got {value!r}; fix {key}"
        )

    if key in _INT_FIELDS:
        if value is None and key in _OPTIONAL_INT_FIELDS:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if key in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if key in _STR_FIELDS:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if key in _FLOAT_FIELDS:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad("a number")
        return float(value)
    if key == "attention_pattern":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise bad("a list of 'full' or 'sliding'")
        return tuple(value)
    raise AssertionError(f"field {key} has no type rule")  # pragma: no cover
