"""ModelConfig: validation errors name the field and the fix; JSON round trip; presets."""

import json

import pytest

from labutils.model import PRESETS, ModelConfig, get_preset
from labutils.validation import ConfigError

TINY = dict(vocab_size=50, block_size=16, d_model=32, n_layer=2, n_head=4)


def make(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


def test_defaults_and_derived_sizes():
    cfg = make()
    assert (cfg.attn_head_dim, cfg.attn_kv_heads, cfg.attn_rope_dim, cfg.ffn_hidden) == (8, 4, 0, 128)
    assert make(attention="mqa").attn_kv_heads == 1
    assert make(attention="gqa", n_kv_head=2).attn_kv_heads == 2
    assert make(pos="rope").attn_rope_dim == 8
    mla = make(attention="mla", pos="rope")
    assert (mla.attn_rope_dim, mla.attn_kv_rank) == (4, 16)
    assert make(attention="mla", pos="rope", rope_head_dim=6, kv_rank=8).attn_rope_dim == 6
    assert make(attention="mla", pos="none").attn_rope_dim == 0
    assert make(d_ff=100).ffn_hidden == 100
    assert make(ffn_mult=2.5).ffn_hidden == 80
    assert make(head_dim=16, n_head=3).attn_head_dim == 16  # explicit head_dim lifts the divisibility rule


def test_dropout_sites_fall_back_to_dropout():
    cfg = make(dropout=0.1, attn_dropout=0.0)
    assert (cfg.dropout_for("emb"), cfg.dropout_for("attn"), cfg.dropout_for("resid")) == (0.1, 0.0, 0.1)


def test_json_round_trip(tmp_path):
    cfg = make(
        attention="mla",
        q_rank=8,
        kv_rank=12,
        pos="rope",
        mlp="moe",
        n_experts=4,
        d_ff=48,
        norm="rmsnorm",
        dropout=0.1,
        drop_path=0.05,
        rope_scaling=2.0,
    )
    path = cfg.to_json(tmp_path / "config.json")
    assert ModelConfig.from_json(path) == cfg
    assert json.loads(path.read_text())["attention"] == "mla"


def test_unknown_json_key_is_an_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TINY, "n_heads": 4}))
    with pytest.raises(ConfigError, match=r"unknown keys 'n_heads' \(did you mean 'n_head'\?\)"):
        ModelConfig.from_json(path)


def test_replace_revalidates():
    with pytest.raises(ConfigError, match="n_head"):
        make().replace(n_head=5)


CONFIG_ERRORS = [
    (dict(n_head=5), r"n_head: n_head=5 must divide d_model=32; use one of \[1, 2, 4, 8, 16, 32\]"),
    (dict(attention="gqa"), r"n_kv_head: attention='gqa' needs n_kv_head, one of \[1, 2, 4\]"),
    (dict(attention="gqa", n_kv_head=3), r"n_kv_head=3 must divide n_head=4"),
    (dict(attention="gqa", n_kv_head=0), r"n_kv_head=0 must divide n_head=4"),
    (dict(n_kv_head=2), r"n_kv_head=2 differs from n_head=4; set attention='gqa'"),
    (dict(attention="mqa", n_kv_head=2), r"multi-query attention has one key/value head"),
    (dict(attention="mla", n_kv_head=2), r"attention='mla' builds keys/values .* remove n_kv_head"),
    (dict(attention="mla", q_rank=-1), r"q_rank: must be >= 0"),
    (dict(attention="mla", kv_rank=0), r"kv_rank: must be positive"),
    (dict(attention="mla", pos="rope", rope_head_dim=3), r"rope_head_dim: MLA with pos='rope' needs an even"),
    (dict(attention="mla", pos="learned", rope_head_dim=4), r"rope_head_dim=4 only applies with pos='rope'"),
    (dict(pos="rop"), r"ModelConfig.pos: unknown option 'rop'.*Did you mean 'rope'\?"),
    (dict(norm="rmsnrom"), r"ModelConfig.norm: unknown option 'rmsnrom'.*Did you mean 'rmsnorm'\?"),
    (dict(mlp="swiglo"), r"ModelConfig.mlp: unknown option 'swiglo'.*Did you mean 'swiglu'\?"),
    (dict(attention="gqq"), r"ModelConfig.attention: unknown option 'gqq'.*Did you mean 'gqa'\?"),
    (dict(norm_position="pr"), r"ModelConfig.norm_position: unknown option 'pr'"),
    (dict(vocab_size=0), r"vocab_size: must be a positive integer, got 0"),
    (dict(block_size=-1), r"block_size: must be a positive integer"),
    (dict(d_model=0), r"d_model: must be a positive integer"),
    (dict(n_layer=0), r"n_layer: must be a positive integer"),
    (dict(n_head=0), r"n_head: must be a positive integer"),
    (dict(head_dim=0), r"head_dim: must be positive"),
    (dict(d_model=36, pos="rope"), r"head_dim: RoPE rotates pairs of dimensions, so the head dim must be even, got 9"),
    (dict(pos="rope", rope_theta=0.0), r"rope_theta: must be positive"),
    (dict(pos="rope", rope_scaling=0.0), r"rope_scaling: must be positive"),
    (dict(dropout=1.0), r"dropout: must be in \[0, 1\), got 1.0"),
    (dict(attn_dropout=-0.1), r"attn_dropout: must be in \[0, 1\)"),
    (dict(emb_dropout=1.5), r"emb_dropout: must be in \[0, 1\)"),
    (dict(resid_dropout=1.0), r"resid_dropout: must be in \[0, 1\)"),
    (dict(drop_path=1.0), r"drop_path: must be in \[0, 1\)"),
    (dict(ffn_mult=2.0, d_ff=64), r"d_ff: give either ffn_mult \(2.0\) or d_ff \(64\), not both"),
    (dict(ffn_mult=0.0), r"ffn_mult: must be positive"),
    (dict(d_ff=0), r"d_ff: must be a positive integer"),
    (dict(mlp="moe", n_experts=1), r"n_experts: a mixture needs at least 2 experts"),
    (dict(mlp="moe", n_experts=4, moe_top_k=5), r"moe_top_k: must be between 1 and n_experts=4, got 5"),
    (dict(mlp="moe", moe_top_k=0), r"moe_top_k: must be between 1"),
    (dict(mlp="moe", moe_aux_loss_weight=-0.1), r"moe_aux_loss_weight: must be >= 0"),
    (dict(norm_eps=0.0), r"norm_eps: must be positive"),
    (dict(init_std=0.0), r"init_std: must be positive"),
    (dict(n_layer="2"), r"ModelConfig.n_layer: expected an integer, got '2'"),
    (dict(bias="yes"), r"ModelConfig.bias: expected true/false"),
    (dict(dropout="0.1"), r"ModelConfig.dropout: expected a number"),
]


@pytest.mark.parametrize("overrides, message", CONFIG_ERRORS, ids=[str(o) for o, _ in CONFIG_ERRORS])
def test_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make(**overrides)


def test_fields_of_unchosen_options_are_ignored():
    # An ablation can switch MLA -> GQA on a preset without resetting MLA fields.
    cfg = get_preset("exp7", attention="gqa", n_kv_head=2)
    assert cfg.attention == "gqa" and cfg.q_rank == 128
    assert make(mlp="gelu", n_experts=1).mlp == "gelu"


def test_presets():
    assert set(PRESETS) == {"minigpt", "final-char", "amt-86m", "exp7", "nanogpt-char"}
    minigpt = get_preset("minigpt")
    assert (
        minigpt.vocab_size,
        minigpt.block_size,
        minigpt.d_model,
        minigpt.n_layer,
        minigpt.n_head,
        minigpt.ffn_hidden,
        minigpt.dropout,
        minigpt.pos,
    ) == (50257, 64, 128, 2, 4, 512, 0.1, "learned")
    final = get_preset("final-char", vocab_size=65)
    assert (final.pos, final.attention, final.d_model, final.n_layer, final.n_head, final.block_size) == (
        "rope",
        "gqa",
        256,
        6,
        4,
        256,
    )
    amt = get_preset("amt-86m")
    assert (amt.n_layer, amt.d_model, amt.n_head, amt.ffn_hidden, amt.pos, amt.dropout) == (
        12,
        768,
        12,
        3072,
        "rope",
        0.1,
    )
    exp7 = get_preset("exp7")
    assert (exp7.attention, exp7.kv_rank, exp7.mlp, exp7.ffn_hidden, exp7.norm, exp7.vocab_size, exp7.n_layer) == (
        "mla",
        128,
        "swiglu",
        1024,
        "rmsnorm",
        32000,
        3,
    )
    nano = get_preset("nanogpt-char", vocab_size=65)
    assert (nano.n_layer, nano.n_head, nano.d_model, nano.block_size, nano.dropout, nano.bias) == (
        6,
        6,
        384,
        256,
        0.2,
        True,
    )


def test_preset_overrides_and_errors():
    assert get_preset("minigpt", n_layer=1).n_layer == 1
    with pytest.raises(ConfigError, match=r"unknown preset 'final_char'.*Did you mean 'final-char'\?"):
        get_preset("final_char")
    with pytest.raises(ConfigError, match=r"vocab_size: preset 'final-char' uses a character vocabulary"):
        get_preset("final-char")
    with pytest.raises(ConfigError, match=r"unknown keys 'n_layers' \(did you mean 'n_layer'\?\)"):
        get_preset("minigpt", n_layers=1)
    with pytest.raises(ConfigError, match="n_head"):
        get_preset("minigpt", n_head=3)
