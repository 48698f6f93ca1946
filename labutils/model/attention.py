"""Positions and causal self-attention: MHA/GQA/MQA in one module, DeepSeek-style latent attention in another.

Their registries, POSITIONS and ATTENTION, are `kinds.Kind` entries (module, config checks, derived sizes).

Both go through `F.scaled_dot_product_attention` and share one masking rule (causal, optional
padding, queries offset by what the KV cache already holds), to which a position kind may add a
bias on the scores (ALiBi). RoPE uses the rotate-half layout of Hugging Face Llama, so exported
weights need no permutation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..validation import require
from .kinds import Kind

if TYPE_CHECKING:  # ModelConfig validates against ATTENTION and POSITIONS below, so this module must not import it
    from .config import ModelConfig

# ----------------------------------------------------------------------------- positions


# The position tables are computed on the CPU whatever the default device, then moved to it (_on_default_device): on
# the meta device (model_shape, which counts parameters and FLOPs in every stage and training process) any arithmetic
# runs torch's Python meta kernels, whose first use imports sympy: 1.2 s of each such process, for a table of a few kB.
def _on_default_device(table: torch.Tensor) -> torch.Tensor:
    return table.to(torch.get_default_device())


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """(length, dim) fixed sin/cos position table of "Attention Is All You Need", on the CPU."""
    pos = torch.arange(length, dtype=torch.float32, device="cpu")[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device="cpu")
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)[:, : dim // 2]
    return table


def rope_tables(
    length: int, dim: int, theta: float = 10000.0, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (length, dim), for RoPE over `dim` dims; `scaling` divides positions (linear). On the CPU."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32, device="cpu") / scaling, inv_freq)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, dim) by the angles of cos/sin (T, dim): pairs are (i, i + dim/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al. 2022): the geometric sequence 2^(-8/n), 2^(-16/n), ... for n heads.

    When n_head is not a power of two, the slopes of the nearest lower power of two are followed by
    every other slope of the next power, as in the paper's code.
    """
    closest = 2 ** math.floor(math.log2(n_head))
    slopes = [2.0 ** (-8.0 * (i + 1) / closest) for i in range(closest)]
    if closest < n_head:
        slopes += [2.0 ** (-8.0 * (i + 1) / (2 * closest)) for i in range(0, 2 * closest, 2)][: n_head - closest]
    return torch.tensor(slopes)


# Each position kind is a module the GPT keeps as `pos_emb`: `add_to(x, past)` adds positions to the token
# embeddings of a sequence that continues `past` cached tokens, and `rope` is the (cos, sin) tables the
# attention rotates queries and keys by, or None. A kind that biases attention scores also defines
# `attention_bias(q_len, past)`: a float (n_head, q_len, past + q_len) tensor added to every layer's scores
# (query i at position past + i, key j at position j); attention masks it with causality and padding, so
# the bias needs no masking of its own. Without the method, attention keeps its fused, mask-free calls.


class LearnedPositions(nn.Embedding):
    """A learned vector per position (GPT-2); an nn.Embedding, so its weight is `pos_emb.weight` as GPT-2's is."""

    rope = None

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config.block_size, config.d_model)

    def add_to(self, x: torch.Tensor, past: int) -> torch.Tensor:
        return x + self(torch.arange(past, past + x.shape[1], device=x.device))


class SinusoidalPositions(nn.Module):
    """The fixed sin/cos table, scaled to the std token embeddings start at (init_std): unscaled, its RMS of
    1/sqrt(2) would drown them; scaled, it starts as strong as learned positions do."""

    rope = None

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        table = sinusoidal_table(config.block_size, config.d_model) * (config.init_std * math.sqrt(2))
        self.register_buffer("table", _on_default_device(table), persistent=False)

    def add_to(self, x: torch.Tensor, past: int) -> torch.Tensor:
        return x + self.table[past : past + x.shape[1]].to(x.dtype)


class RotaryPositions(nn.Module):
    """RoPE: nothing is added to the embeddings; attention rotates q and k by these tables."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        cos, sin = rope_tables(config.block_size, config.attn_rope_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("cos", _on_default_device(cos), persistent=False)
        self.register_buffer("sin", _on_default_device(sin), persistent=False)

    @property
    def rope(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos, self.sin

    def add_to(self, x: torch.Tensor, past: int) -> torch.Tensor:
        return x


class NoPositions(nn.Module):
    """No positional signal (NoPE): causal masking alone tells positions apart."""

    rope = None

    def add_to(self, x: torch.Tensor, past: int) -> torch.Tensor:
        return x


class ALiBiPositions(nn.Module):
    """ALiBi: nothing is added to the embeddings; each head's scores fall linearly with the query-key distance."""

    rope = None

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(config.n_head), persistent=False)

    def add_to(self, x: torch.Tensor, past: int) -> torch.Tensor:
        return x

    def attention_bias(self, q_len: int, past: int) -> torch.Tensor:
        queries = torch.arange(past, past + q_len, device=self.slopes.device)
        keys = torch.arange(past + q_len, device=self.slopes.device)
        distance = queries[:, None] - keys[None, :]  # negative for future keys, which the causal mask hides
        return -self.slopes[:, None, None] * distance


def attention_bias(positions: nn.Module, q_len: int, past: int) -> torch.Tensor | None:
    """The bias `positions` adds to attention scores for q_len queries after `past` cached tokens, or None."""
    build = getattr(positions, "attention_bias", None)  # optional: most kinds bias nothing
    return None if build is None else build(q_len, past)


def _check_rope(c: ModelConfig) -> None:
    require(c.rope_theta > 0, "rope_theta", f"must be positive, got {c.rope_theta}")
    require(c.rope_scaling > 0, "rope_scaling", f"must be positive (1.0 = no scaling), got {c.rope_scaling}")
    if c.attn_rope_dim == c.attn_head_dim:  # RoPE over whole heads (every kind but MLA)
        require(
            c.attn_head_dim % 2 == 0,
            "head_dim",
            f"RoPE rotates pairs of dimensions, so the head dim must be even, got {c.attn_head_dim}",
        )


@dataclass(frozen=True, kw_only=True)
class PositionKind(Kind):
    """A position kind; `rotary`: attention rotates q/k (so the attention kind's rope_dim applies)."""

    rotary: bool = False


# Adding a position kind: its module above (add_to, rope, optionally attention_bias), its entry here, a test
# in test_model.py.
POSITIONS: dict[str, PositionKind] = {
    "learned": PositionKind(build=LearnedPositions),  # a learned vector per position, added (GPT-2)
    "sinusoidal": PositionKind(build=SinusoidalPositions),  # the fixed sin/cos table, added
    "rope": PositionKind(build=RotaryPositions, check=_check_rope, rotary=True),  # q/k rotated by position
    "none": PositionKind(build=lambda config: NoPositions()),  # NoPE: causal masking only
    "alibi": PositionKind(build=ALiBiPositions),  # a per-head linear distance penalty on the scores
}


# ----------------------------------------------------------------------------- KV cache


class LayerCache:
    """One layer's cached tensors, each (..., T, ·); `update` appends along T and returns the whole."""

    def __init__(self) -> None:
        self.tensors: tuple[torch.Tensor, ...] | None = None

    @property
    def seq_len(self) -> int:
        return 0 if self.tensors is None else self.tensors[0].shape[-2]

    def update(self, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.tensors is None:
            self.tensors = new
        else:
            self.tensors = tuple(torch.cat([old, x], dim=-2) for old, x in zip(self.tensors, new, strict=True))
        return self.tensors


class KVCache:
    """Cache for a whole model: MHA/GQA/MQA layers keep (k, v); MLA layers keep the latent."""

    def __init__(self, n_layer: int) -> None:
        self.layers = [LayerCache() for _ in range(n_layer)]

    @property
    def seq_len(self) -> int:
        return self.layers[0].seq_len

    def reset(self) -> None:
        for layer in self.layers:
            layer.tensors = None


# ----------------------------------------------------------------------------- attention


def visible_keys(T: int, L: int, padding_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Which of L keys each of the last T queries sees: (T, L), or (B, 1, T, L) with a padding mask."""
    rows = torch.arange(L - T, L, device=device)[:, None]
    cols = torch.arange(L, device=device)[None, :]
    mask = cols <= rows  # query at absolute position L-T+i sees keys up to itself
    if padding_mask is not None:
        if padding_mask.shape[-1] != L:
            raise ValueError(
                f"padding_mask covers {padding_mask.shape[-1]} positions but attention spans {L} "
                "(with a KV cache, the mask must include the cached tokens)"
            )
        mask = mask & (padding_mask[:, None, None, :].bool() | (cols == rows))
    return mask


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    padding_mask: torch.Tensor | None,
    dropout_p: float,
    enable_gqa: bool = False,
    attn_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """SDPA over q (B,H,T,·) and k, v (B,Hkv,L,·); the T queries are the last T of L positions.

    padding_mask (B, L), True for real tokens, hides padded keys. Every query may still see itself,
    so a padded query's row is never fully masked (which would give NaN); its output is unused.
    attn_bias (H, T, L), a position kind's bias, is added to the scores of the keys a query sees.
    The calls are shaped for CUDA's fused kernels: no mask where causality alone (or a single
    decoding query) suffices and nothing is added, so flash attention can run; and with a mask,
    key/value heads are expanded by hand, since the memory-efficient kernel (the only fused one
    taking a mask) does not take grouped heads and would otherwise fall back to the slow math kernel.
    """
    T, L = q.shape[-2], k.shape[-2]
    if attn_bias is None and padding_mask is None and (T == L or T == 1):  # one new query sees every cached key
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=T == L and T > 1, enable_gqa=enable_gqa
        )
    mask = visible_keys(T, L, padding_mask, q.device)
    if attn_bias is not None:  # one float mask: the bias where a key is visible, -inf where it is not
        mask = torch.where(mask, attn_bias.to(q.dtype), float("-inf"))
    if enable_gqa:
        group = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class CausalSelfAttention(nn.Module):
    """Multi-head attention with n_kv_head key/value heads: MHA (= n_head), GQA (divides it), MQA (1)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.attn_kv_heads, config.attn_head_dim
        self.qkv = nn.Linear(config.d_model, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=config.bias)
        self.out_proj = nn.Linear(self.n_head * self.head_dim, config.d_model, bias=config.bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps) if config.qk_norm else nn.Identity()
        self.dropout = config.dropout_for("attn")

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        padding_mask: torch.Tensor | None = None,
        cache: LayerCache | None = None,
        attn_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        hd = self.head_dim
        q, k, v = self.qkv(x).split([self.n_head * hd, self.n_kv_head * hd, self.n_kv_head * hd], dim=-1)
        q = self.q_norm(q.view(B, T, self.n_head, hd)).transpose(1, 2)
        k = self.k_norm(k.view(B, T, self.n_kv_head, hd)).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, hd).transpose(1, 2)
        past = 0 if cache is None else cache.seq_len
        if rope is not None:
            cos, sin = rope[0][past : past + T], rope[1][past : past + T]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)
        dropout = self.dropout if self.training else 0.0
        y = attend(q, k, v, padding_mask, dropout, enable_gqa=self.n_kv_head != self.n_head, attn_bias=attn_bias)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, self.n_head * hd))


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2): keys/values are rebuilt from a kv_rank latent.

    Each head's q/k is [head_dim "content" part, rope_head_dim "position" part]; the position part of
    the key is one vector shared by all heads. The cache holds only the latent and that shared
    vector (kv_rank + rope_head_dim numbers per token instead of 2 * n_head * head_dim).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim, self.rope_dim = config.n_head, config.attn_head_dim, config.attn_rope_dim
        self.kv_rank = config.attn_kv_rank
        d, H, hd, rd, bias = config.d_model, self.n_head, self.head_dim, self.rope_dim, config.bias
        if config.q_rank > 0:
            self.q_proj = nn.Sequential(
                nn.Linear(d, config.q_rank, bias=bias),
                nn.RMSNorm(config.q_rank, eps=config.norm_eps),
                nn.Linear(config.q_rank, H * (hd + rd), bias=bias),
            )
        else:
            self.q_proj = nn.Linear(d, H * (hd + rd), bias=bias)
        self.kv_down = nn.Linear(d, self.kv_rank + rd, bias=bias)
        self.kv_norm = nn.RMSNorm(self.kv_rank, eps=config.norm_eps)
        self.kv_up = nn.Linear(self.kv_rank, H * 2 * hd, bias=bias)
        self.out_proj = nn.Linear(H * hd, d, bias=bias)
        self.q_norm = nn.RMSNorm(hd + rd, eps=config.norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(hd + rd, eps=config.norm_eps) if config.qk_norm else nn.Identity()
        self.dropout = config.dropout_for("attn")

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        padding_mask: torch.Tensor | None = None,
        cache: LayerCache | None = None,
        attn_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, hd, rd = self.n_head, self.head_dim, self.rope_dim
        latent, k_pos = self.kv_down(x).split([self.kv_rank, rd], dim=-1)
        latent = self.kv_norm(latent)
        past = 0 if cache is None else cache.seq_len
        if cache is not None:
            latent, k_pos = cache.update(latent, k_pos)
        L = latent.shape[1]
        k_content, v = self.kv_up(latent).view(B, L, H, 2 * hd).split([hd, hd], dim=-1)
        k = torch.cat([k_content, k_pos[:, :, None, :].expand(B, L, H, rd)], dim=-1)
        q = self.q_proj(x).view(B, T, H, hd + rd)
        # QK-norm acts on whole heads before rotation, so the cached key part stays unrotated.
        q, k, v = self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2), v.transpose(1, 2)
        if rope is not None:
            q = torch.cat(
                [q[..., :hd], apply_rope(q[..., hd:], rope[0][past : past + T], rope[1][past : past + T])], dim=-1
            )
            k = torch.cat([k[..., :hd], apply_rope(k[..., hd:], rope[0][:L], rope[1][:L])], dim=-1)
        y = attend(q, k, v, padding_mask, self.dropout if self.training else 0.0, attn_bias=attn_bias)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, H * hd))


# ----------------------------------------------------------------------------- the kinds


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_mha(c: ModelConfig) -> None:
    require(
        c.n_kv_head in (None, c.n_head),
        "n_kv_head",
        f"n_kv_head={c.n_kv_head} differs from n_head={c.n_head}; set attention='gqa' for grouped-query attention",
    )


def _check_mqa(c: ModelConfig) -> None:
    require(
        c.n_kv_head in (None, 1),
        "n_kv_head",
        f"multi-query attention has one key/value head; remove n_kv_head={c.n_kv_head}",
    )


def _check_gqa(c: ModelConfig) -> None:
    require(c.n_kv_head is not None, "n_kv_head", f"attention='gqa' needs n_kv_head, one of {divisors(c.n_head)}")
    require(
        c.n_kv_head >= 1 and c.n_head % c.n_kv_head == 0,
        "n_kv_head",
        f"n_kv_head={c.n_kv_head} must divide n_head={c.n_head}; use one of {divisors(c.n_head)}",
    )


def _check_mla(c: ModelConfig) -> None:
    require(
        c.n_kv_head is None,
        "n_kv_head",
        "attention='mla' builds keys/values for every head from a latent; remove n_kv_head",
    )
    require(c.q_rank >= 0, "q_rank", f"must be >= 0 (0 = no query compression), got {c.q_rank}")
    require(c.kv_rank is None or c.kv_rank >= 1, "kv_rank", f"must be positive (or None), got {c.kv_rank}")
    if POSITIONS[c.pos].rotary:
        require(
            c.attn_rope_dim >= 2 and c.attn_rope_dim % 2 == 0,
            "rope_head_dim",
            f"MLA with pos='rope' needs an even rope_head_dim >= 2, got {c.attn_rope_dim}",
        )
    else:
        require(
            c.rope_head_dim in (None, 0),
            "rope_head_dim",
            f"rope_head_dim={c.rope_head_dim} only applies with pos='rope' (pos is {c.pos!r}); set it to None",
        )


@dataclass(frozen=True, kw_only=True)
class AttentionKind(Kind):
    """An attention kind: `build(config)`, its checks, and what the config derives from it."""

    kv_heads: Callable[[ModelConfig], int]  # key/value heads it builds
    rope_dim: Callable[[ModelConfig], int] = lambda c: c.attn_head_dim  # per-head dims RoPE rotates (with a rotary pos)
    extra_qk_dim: Callable[[ModelConfig], int] = lambda c: 0  # q/k dims per head beyond head_dim (FLOPs)


# Adding an attention kind: write its module above, add its entry here (and a test in test_model.py).
# ModelConfig.attention accepts every key; each Block builds ATTENTION[kind].build(config).
ATTENTION: dict[str, AttentionKind] = {
    "mha": AttentionKind(build=CausalSelfAttention, kv_heads=lambda c: c.n_head, check=_check_mha),
    "gqa": AttentionKind(build=CausalSelfAttention, kv_heads=lambda c: c.n_kv_head, check=_check_gqa),
    "mqa": AttentionKind(build=CausalSelfAttention, kv_heads=lambda c: 1, check=_check_mqa),
    "mla": AttentionKind(
        build=LatentAttention,
        kv_heads=lambda c: c.n_head,
        check=_check_mla,
        rope_dim=lambda c: c.rope_head_dim if c.rope_head_dim is not None else c.attn_head_dim // 2,
        extra_qk_dim=lambda c: c.attn_rope_dim,
    ),
}


def make_attention(config: ModelConfig) -> nn.Module:
    return ATTENTION[config.attention].build(config)


def make_positions(config: ModelConfig) -> nn.Module:
    return POSITIONS[config.pos].build(config)
