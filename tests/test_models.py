"""Model specs: presets load, parameter counts match published figures, bad files fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.models import ModelSpec, SpecError, list_models, load_spec

REAL = [
    "llama-3.1-8b",
    "llama-3.3-70b",
    "mixtral-8x7b",
    "qwen3-30b-a3b",
    "gpt-oss-120b",
    "deepseek-v3",
]
TINY = ["tiny", "tiny-moe", "tiny-mla"]

TINY_TOML = """
name = "my-model"
hidden_size = 256
num_layers = 2
num_heads = 4
num_kv_heads = 2
vocab_size = 512
intermediate_size = 512
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _one_line_error(exc: pytest.ExceptionInfo, *words: str) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


# ---------------------------------------------------------------------- presets


def test_every_preset_is_listed_and_loads():
    names = list_models()
    assert set(REAL + TINY) <= set(names)
    for name in names:
        spec = load_spec(name)
        assert spec.name == name
        assert spec.param_count() > spec.active_param_count() or spec.num_experts == 0
        for layer in range(spec.num_layers):
            assert spec.layer_attention_kind(layer) in ("full", "sliding")
            spec.is_moe_layer(layer)


def test_preset_names_are_case_insensitive():
    assert load_spec("Llama-3.1-8B") == load_spec("llama-3.1-8b")
    assert load_spec(" TINY ") == load_spec("tiny")


@pytest.mark.parametrize("model", REAL)
def test_real_presets_have_provenance(model):
    spec = load_spec(model)
    assert spec.source.startswith("https://") and "config.json" in spec.source
    assert spec.published_params and spec.published_params > 1e9


@pytest.mark.parametrize("model", REAL)
def test_param_count_within_1pc_of_published(model):
    spec = load_spec(model)
    counted, published = spec.param_count(), spec.published_params
    assert published is not None
    rel = abs(counted - published) / published
    assert rel < 0.01, (
        f"{model}: counted {counted:,} ({counted / 1e9:.3f}B) vs published "
        f"{published / 1e9:.3f}B, off by {100 * rel:.2f}%"
    )


# Published active counts differ in whether the embedding table is counted: OpenAI
# (gpt-oss model card, 5.13B) and DeepSeek (README_WEIGHTS.md, 36.6B incl. the 0.9B output
# head) leave it out; Qwen (3.3B) and Mistral (12.9B) count it.
ACTIVE = [
    ("gpt-oss-120b", 5.13e9, False, 0.01),
    ("deepseek-v3", 37e9, False, 0.03),  # the headline figure; 36.6B precisely
    ("deepseek-v3", 36.6e9, False, 0.01),
    ("qwen3-30b-a3b", 3.3e9, True, 0.03),
    ("mixtral-8x7b", 12.9e9, True, 0.01),
]


@pytest.mark.parametrize("model, published, with_embedding, tol", ACTIVE)
def test_active_params_match_published(model, published, with_embedding, tol):
    spec = load_spec(model)
    active = spec.active_param_count(include_embedding=with_embedding)
    rel = abs(active - published) / published
    assert rel < tol, (
        f"{model}: active {active:,} ({active / 1e9:.3f}B, embedding "
        f"{'in' if with_embedding else 'out'}) vs published {published / 1e9:.2f}B, "
        f"off by {100 * rel:.2f}%"
    )


def test_active_equals_total_for_dense_models():
    spec = load_spec("llama-3.1-8b")
    assert spec.active_param_count(include_embedding=True) == spec.param_count()
    assert spec.param_count() - spec.active_param_count() == spec.vocab_size * spec.hidden_size


def test_tiny_param_count_by_hand():
    spec = load_spec("tiny")
    h, layers, heads, kv_heads, hd, ffn, vocab = 256, 2, 4, 2, 64, 512, 512
    q = h * heads * hd  # 65,536
    k = v = h * kv_heads * hd  # 32,768 each
    o = heads * hd * h  # 65,536
    gate = up = down = h * ffn  # 131,072 each
    norms = 2 * h  # before attention and before the FFN
    per_layer = q + k + v + o + gate + up + down + norms
    assert per_layer == 590_336
    embed = lm_head = vocab * h  # untied
    total = embed + layers * per_layer + h + lm_head  # + final norm
    assert total == 1_443_072
    assert spec.param_count() == total
    assert spec.active_param_count() == total - embed


def test_tiny_moe_and_mla_counts_by_hand():
    moe = load_spec("tiny-moe")
    h, vocab = 256, 512
    attn = 2 * h * 4 * 64 + 2 * h * 2 * 64
    expert = 3 * h * 128
    layer = 2 * h + attn + 8 * h + 8 * expert + expert  # router, 8 routed, 1 shared
    assert moe.param_count() == 2 * vocab * h + 3 * layer + h
    active_layer = layer - 6 * expert
    assert moe.active_param_count() == vocab * h + 3 * active_layer + h
    assert [moe.layer_attention_kind(i) for i in range(3)] == ["sliding", "full", "sliding"]

    mla = load_spec("tiny-mla")
    assert mla.head_dim == 32 + 16
    q_part = h * 64 + 64 + 64 * 4 * (32 + 16)  # q_a_proj, q_a_layernorm, q_b_proj
    kv_part = h * (64 + 16) + 64 + 64 * 4 * (32 + 32)  # kv_a_proj_with_mqa, norm, kv_b_proj
    attn = q_part + kv_part + 4 * 32 * h  # + o_proj
    dense = 2 * h + attn + 3 * h * 512
    moe_layer = 2 * h + attn + 8 * h + 9 * expert
    assert mla.param_count() == 2 * vocab * h + dense + 2 * moe_layer + h
    assert [mla.is_moe_layer(i) for i in range(3)] == [False, True, True]


def test_real_shapes_from_public_configs():
    oss = load_spec("gpt-oss-120b")
    assert [oss.layer_attention_kind(i) for i in range(4)] == ["sliding", "full"] * 2
    assert (oss.sliding_window, oss.head_dim, oss.num_kv_heads) == (128, 64, 8)
    assert oss.attention_bias and oss.expert_bias and oss.router_bias
    assert not oss.tie_word_embeddings
    ds = load_spec("deepseek-v3")
    assert ds.attention == "mla" and ds.q_lora_rank == 1536 and ds.kv_lora_rank == 512
    assert [ds.is_moe_layer(i) for i in (0, 2, 3, 60)] == [False, False, True, True]
    assert ds.shared_expert_width == 2048
    qwen = load_spec("qwen3-30b-a3b")
    assert qwen.head_dim * qwen.num_heads != qwen.hidden_size and qwen.qk_norm
    assert all(qwen.is_moe_layer(i) for i in range(qwen.num_layers))
    assert load_spec("llama-3.3-70b").head_dim == 128


def test_layer_index_out_of_range():
    spec = load_spec("tiny")
    with pytest.raises(IndexError):
        spec.layer_attention_kind(2)
    with pytest.raises(IndexError):
        spec.is_moe_layer(-1)


# ---------------------------------------------------------------------- user files


def test_user_toml_file_loads(tmp_path):
    path = _write(tmp_path, "mine.toml", TINY_TOML)
    spec = load_spec(str(path))
    assert spec.name == "my-model" and spec.head_dim == 64
    assert spec.param_count() == load_spec("tiny").param_count()
    assert load_spec(path) == spec  # a Path works too


def test_user_json_file_loads_and_name_defaults_to_stem(tmp_path):
    data = load_spec("tiny-moe").to_dict()
    del data["name"]
    path = _write(tmp_path, "json-moe.json", json.dumps(data))
    spec = load_spec(str(path))
    assert spec.name == "json-moe"
    assert spec.param_count() == load_spec("tiny-moe").param_count()
    assert spec.attention_pattern == ("sliding", "full")


def test_json_null_means_unset(tmp_path):
    data = {**json.loads(json.dumps(load_spec("tiny-mla").to_dict())), "q_lora_rank": None}
    spec = load_spec(str(_write(tmp_path, "noq.json", json.dumps(data))))
    assert spec.q_lora_rank is None
    plain_q, lora_q = 256 * 4 * 48, 256 * 64 + 64 + 64 * 4 * 48
    assert spec.param_count() - load_spec("tiny-mla").param_count() == 3 * (plain_q - lora_q)


def test_specs_are_frozen_and_round_trip():
    spec = load_spec("gpt-oss-120b")
    with pytest.raises(AttributeError):
        spec.hidden_size = 1  # type: ignore[misc]
    assert ModelSpec(**{**spec.to_dict(), "attention_pattern": ("sliding", "full")}) == spec


# ---------------------------------------------------------------------- errors


def _toml_error(tmp_path: Path, text: str, *words: str) -> str:
    path = _write(tmp_path, "bad.toml", text)
    with pytest.raises(SpecError) as exc:
        load_spec(str(path))
    return _one_line_error(exc, "bad.toml", *words)


def test_heads_not_dividing_hidden(tmp_path):
    msg = _toml_error(
        tmp_path,
        TINY_TOML.replace("num_heads = 4", "num_heads = 6").replace(
            "num_kv_heads = 2", "num_kv_heads = 3"
        ),
        "num_heads=6",
        "hidden_size=256",
        "head_dim",
        "my-model",
    )
    assert "set head_dim explicitly" in msg
    # An explicit head_dim lifts the requirement (as Qwen3 needs).
    path = _write(
        tmp_path,
        "ok.toml",
        TINY_TOML.replace("num_heads = 4", "num_heads = 6").replace(
            "num_kv_heads = 2", "num_kv_heads = 3"
        )
        + "head_dim = 32\n",
    )
    assert load_spec(str(path)).head_dim == 32


def test_kv_heads_not_dividing_heads(tmp_path):
    _toml_error(
        tmp_path,
        TINY_TOML.replace("num_kv_heads = 2", "num_kv_heads = 3"),
        "num_kv_heads=3",
        "num_heads=4",
    )


def test_top_k_more_than_experts(tmp_path):
    text = TINY_TOML + "num_experts = 4\nexperts_per_token = 5\nmoe_intermediate_size = 64\n"
    _toml_error(tmp_path, text, "experts_per_token=5", "num_experts=4")


@pytest.mark.parametrize(
    "extra, field",
    [
        ("num_experts = 4\nmoe_intermediate_size = 64\n", "experts_per_token"),
        ("num_experts = 4\nexperts_per_token = 2\n", "moe_intermediate_size"),
        ("experts_per_token = 2\n", "experts_per_token"),
        (
            "num_experts = 4\nexperts_per_token = 2\nmoe_intermediate_size = 64\n"
            "first_dense_layers = 2\n",
            "first_dense_layers",
        ),
        ('attention_pattern = ["sliding", "full"]\n', "sliding_window"),
        ('attention_pattern = ["local"]\n', "attention_pattern"),
        ("sliding_window = 0\n", "sliding_window"),
        ("kv_lora_rank = 64\n", "kv_lora_rank"),
        ("head_dim = -1\n", "head_dim"),
        ('hidden_size = "big"\n', "hidden_size"),
        ("tie_word_embeddings = 1\n", "tie_word_embeddings"),
    ],
)
def test_invalid_fields_name_the_field(tmp_path, extra, field):
    lines = [ln for ln in TINY_TOML.splitlines() if not ln.startswith(extra.split(" ")[0] + " ")]
    _toml_error(tmp_path, "\n".join(lines) + "\n" + extra, field)


def test_mla_needs_its_fields(tmp_path):
    _toml_error(
        tmp_path, TINY_TOML + 'attention = "mla"\nkv_lora_rank = 64\n', "qk_nope_head_dim", "mla"
    )


def test_zero_size_is_an_error(tmp_path):
    _toml_error(tmp_path, TINY_TOML.replace("num_layers = 2", "num_layers = 0"), "num_layers=0")


def test_missing_field(tmp_path):
    text = "\n".join(ln for ln in TINY_TOML.splitlines() if not ln.startswith("hidden_size"))
    _toml_error(tmp_path, text, "missing", "hidden_size")


def test_unknown_field(tmp_path):
    _toml_error(tmp_path, TINY_TOML + "rope_theta = 10000.0\n", "unknown field", "rope_theta")
    # A Hugging Face key gets a hint at our name for it.
    msg = _toml_error(tmp_path, TINY_TOML + "num_hidden_layers = 2\n", "num_hidden_layers")
    assert "num_layers" in msg


def test_bad_attention_kind(tmp_path):
    _toml_error(tmp_path, TINY_TOML + 'attention = "mqa"\n', "attention='mqa'", "gqa", "mla")


def test_malformed_toml(tmp_path):
    _toml_error(tmp_path, TINY_TOML + "num_experts = = 3\n[broken\n", "cannot read")


def test_malformed_json(tmp_path):
    path = _write(tmp_path, "bad.json", '{"name": "x", "hidden_size": 256,,}')
    with pytest.raises(SpecError) as exc:
        load_spec(str(path))
    _one_line_error(exc, "bad.json", "cannot read")
    path = _write(tmp_path, "list.json", "[1, 2]")
    with pytest.raises(SpecError) as exc:
        load_spec(str(path))
    _one_line_error(exc, "list.json", "top level")


def test_unknown_name_lists_presets(tmp_path):
    with pytest.raises(SpecError) as exc:
        load_spec("no-such-model")
    _one_line_error(exc, "no-such-model", "llama-3.1-8b", "tiny")
    with pytest.raises(SpecError) as exc:
        load_spec(str(tmp_path / "absent.toml"))
    _one_line_error(exc, "absent.toml", "does not exist")


def test_direct_construction_is_validated():
    with pytest.raises(SpecError) as exc:
        ModelSpec(
            name="foo",
            hidden_size=4096,
            num_layers=2,
            num_heads=7,
            num_kv_heads=7,
            vocab_size=100,
            intermediate_size=10,
        )
    assert str(exc.value) == (
        "model 'foo': num_heads=7 does not divide hidden_size=4096; "
        "set head_dim explicitly or fix num_heads"
    )
    assert issubclass(SpecError, ValueError)
