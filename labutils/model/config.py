"""`ModelConfig`: every architecture choice of the decoder in one validated dataclass, plus presets.

Fields that only matter for one option (MLA ranks, MoE sizes) are ignored by the others, so an
ablation can switch `attention` or `mlp` on a preset without resetting them. `None` means "derived
from other fields"; the `attn_*`/`ffn_hidden` properties give the values the model actually uses.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Literal

from ..validation import ConfigBase, ConfigError, choice, require
from .attention import ATTENTION, POSITIONS, divisors
from .kinds import NORMS
from .mlp import MLP_KINDS

__all__ = ["PRESETS", "ConfigError", "ModelConfig", "get_preset"]


@dataclass
class ModelConfig(ConfigBase):
    """Architecture of a decoder-only transformer; see the module docstring for `None` fields."""

    vocab_size: int = 50257
    block_size: int = 256
    d_model: int = 256
    n_layer: int = 4
    n_head: int = 4
    # Attention kind (a key of model.attention.ATTENTION: mha, gqa, mqa, mla); n_kv_head only says how
    # many key/value heads GQA uses (None: n_head for 'mha', 1 for 'mqa'; required for 'gqa'; unused by 'mla').
    attention: str = "mha"
    n_kv_head: int | None = None
    head_dim: int | None = None  # None: d_model // n_head
    qk_norm: bool = False
    # Multi-head latent attention (DeepSeek-V2): queries and keys/values pass through low ranks.
    q_rank: int = 0  # 0: queries are projected directly, without a low-rank bottleneck
    kv_rank: int | None = None  # None: d_model // 2
    rope_head_dim: int | None = None  # per-head RoPE part of q/k; None: head_dim // 2 with pos='rope', else 0
    pos: str = "learned"  # a key of model.attention.POSITIONS: learned, sinusoidal, rope, none, alibi
    rope_theta: float = 10000.0
    rope_scaling: float = 1.0  # linear position interpolation: RoPE sees position / rope_scaling
    norm: str = "layernorm"  # a key of model.kinds.NORMS: layernorm, rmsnorm
    norm_position: Literal["pre", "post"] = "pre"
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # a key of model.mlp.MLP_KINDS: gelu, gelu_tanh, relu, relu2, swiglu, moe
    ffn_mult: float | None = None  # hidden size = ffn_mult * d_model (None: 4); give this or d_ff
    d_ff: int | None = None  # explicit hidden size of the MLP (of each expert with 'moe')
    n_experts: int = 8
    moe_top_k: int = 2
    moe_shared_expert: bool = False
    moe_aux_loss_weight: float = 0.01
    bias: bool = True
    tie_weights: bool = True
    dropout: float = 0.0
    emb_dropout: float | None = None  # each None: `dropout`
    attn_dropout: float | None = None
    resid_dropout: float | None = None
    drop_path: float = 0.0  # stochastic depth rate of the last block; block i uses drop_path * i / (n_layer - 1)
    grad_checkpoint: bool = False
    # Under autocast, the residual stream in autocast's dtype (bf16) instead of fp32: half the bytes its adds,
    # dropouts and norms read and write, at some precision of the sum. No effect without autocast (eval, generation).
    low_precision_residual: bool = False
    init_std: float = 0.02

    def validate(self) -> None:
        for field_name, registry in (("attention", ATTENTION), ("pos", POSITIONS), ("norm", NORMS), ("mlp", MLP_KINDS)):
            choice(getattr(self, field_name), f"ModelConfig.{field_name}", registry)
        for name in ("vocab_size", "block_size", "d_model", "n_layer", "n_head"):
            require(getattr(self, name) >= 1, name, f"must be a positive integer, got {getattr(self, name)}")
        if self.head_dim is None:
            require(
                self.d_model % self.n_head == 0,
                "n_head",
                f"n_head={self.n_head} must divide d_model={self.d_model}; "
                f"use one of {divisors(self.d_model)} or set head_dim explicitly",
            )
        else:
            require(
                self.head_dim >= 1, "head_dim", f"must be positive (or None for d_model // n_head), got {self.head_dim}"
            )
        for kind in (
            ATTENTION[self.attention],
            POSITIONS[self.pos],
            NORMS[self.norm],
        ):  # attention first: the others read its sizes
            kind.check(self)
        require(self.norm_eps > 0, "norm_eps", f"must be positive, got {self.norm_eps}")
        require(self.init_std > 0, "init_std", f"must be positive, got {self.init_std}")
        require(
            self.ffn_mult is None or self.d_ff is None,
            "d_ff",
            f"give either ffn_mult ({self.ffn_mult}) or d_ff ({self.d_ff}), not both; set the other to None",
        )
        if self.ffn_mult is not None:
            require(self.ffn_mult > 0, "ffn_mult", f"must be positive, got {self.ffn_mult}")
        if self.d_ff is not None:
            require(self.d_ff >= 1, "d_ff", f"must be a positive integer, got {self.d_ff}")
        MLP_KINDS[self.mlp].check(self)
        for name in ("dropout", "emb_dropout", "attn_dropout", "resid_dropout", "drop_path"):
            value = getattr(self, name)
            if value is not None:
                require(0.0 <= value < 1.0, name, f"must be in [0, 1), got {value}")

    # Derived sizes: the values the model builds with.
    @property
    def attn_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_head

    @property
    def attn_kv_heads(self) -> int:
        return ATTENTION[self.attention].kv_heads(self)

    @property
    def attn_rope_dim(self) -> int:
        """Dimensions per head that RoPE rotates (the whole head, except MLA's decoupled part)."""
        return ATTENTION[self.attention].rope_dim(self) if POSITIONS[self.pos].rotary else 0

    @property
    def attn_kv_rank(self) -> int:
        return self.kv_rank if self.kv_rank is not None else self.d_model // 2

    @property
    def ffn_hidden(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        return round((self.ffn_mult if self.ffn_mult is not None else 4.0) * self.d_model)

    def dropout_for(self, site: str) -> float:
        """Dropout at `site` ('emb', 'attn' or 'resid'): its own field, else `dropout`."""
        value = getattr(self, f"{site}_dropout")
        return self.dropout if value is None else value


# Field overrides on top of ModelConfig's defaults. vocab_size None means "depends on the data":
# character vocabularies are known only once the corpus is prepared.
PRESETS: dict[str, dict[str, Any]] = {
    # write-up 001 MiniGPT baseline: GPT-2 BPE, learned positions, pre-LN, GELU, untied LM head.
    "minigpt": dict(
        vocab_size=50257,
        block_size=64,
        d_model=128,
        n_layer=2,
        n_head=4,
        pos="learned",
        norm="layernorm",
        mlp="gelu",
        ffn_mult=4.0,
        dropout=0.1,
        tie_weights=False,
    ),
    # write-up 000 final character model: RoPE + GQA (the write-up does not say how many KV heads; 2 of 4).
    "final-char": dict(
        vocab_size=None, block_size=256, d_model=256, n_layer=6, n_head=4, pos="rope", attention="gqa", n_kv_head=2
    ),
    # write-up 002: GPT-2-small shape (86M non-embedding parameters) with RoPE, stochastic depth 0.1,
    # gradient checkpointing; block_size is not given in the seed, 1024 as in GPT-2.
    "amt-86m": dict(
        vocab_size=50257,
        block_size=1024,
        d_model=768,
        n_layer=12,
        n_head=12,
        d_ff=3072,
        pos="rope",
        dropout=0.1,
        drop_path=0.1,
        grad_checkpoint=True,
    ),
    # write-up 003 experiment 7: low-rank (MLA) attention of rank 128, SwiGLU 1024, RMSNorm.
    "exp7": dict(
        vocab_size=32000,
        block_size=256,
        d_model=256,
        n_layer=3,
        n_head=4,
        attention="mla",
        q_rank=128,
        kv_rank=128,
        pos="rope",
        rope_scaling=1.0,
        mlp="swiglu",
        d_ff=1024,
        norm="rmsnorm",
        bias=False,
    ),
    # nanoGPT's shakespeare_char run, for comparisons.
    "nanogpt-char": dict(
        vocab_size=None,
        block_size=256,
        d_model=384,
        n_layer=6,
        n_head=6,
        pos="learned",
        norm="layernorm",
        mlp="gelu",
        bias=True,
        dropout=0.2,
    ),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The preset `name` with `overrides` applied, e.g. get_preset("final-char", vocab_size=65)."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"preset: unknown preset {name!r}; choose one of {list(PRESETS)}.{hint}")
    fields = {**PRESETS[name], **overrides}
    if fields.get("vocab_size") is None:
        raise ConfigError(
            f"vocab_size: preset {name!r} uses a character vocabulary whose size is known only after the "
            f"data is prepared; pass it, e.g. get_preset({name!r}, vocab_size=tokenizer.vocab_size)"
        )
    return ModelConfig.from_dict(fields)
