"""What a model is made of: parameter counts, FLOPs per token (for MFU), a per-module table, and
freezing parameters by name. Works on a GPT or its torch.compile wrapper.
"""

from __future__ import annotations

import fnmatch
import re

import pandas as pd
from torch import nn

from .attention import ATTENTION
from .config import ModelConfig
from .mlp import MLP_KINDS


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wraps the module


# ----------------------------------------------------------------------------- counting


def _embedding_matrices(model: nn.Module) -> list[nn.Parameter]:
    """Vocabulary and position matrices: token embedding, learned positions, LM head (tied: once)."""
    model = unwrap(model)
    found = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    head = getattr(model, "lm_head", None)
    if head is not None:
        found.append(head.weight)
    return list({id(p): p for p in found}.values())


def count_params(model: nn.Module, non_embedding: bool = False) -> int:
    """Parameters, shared ones once. non_embedding leaves out the vocabulary and position matrices
    (token embedding, learned positions, LM head), as in Kaplan et al. 2020 and Pythia."""
    total = sum(p.numel() for p in unwrap(model).parameters())
    if non_embedding:
        total -= sum(p.numel() for p in _embedding_matrices(model))
    return total


def param_table(model: nn.Module, depth: int = 3) -> pd.DataFrame:
    """Parameters per module, names cut to `depth` parts (e.g. blocks.0.attn): one row each."""
    rows: dict[str, list[int]] = {}
    for name, p in unwrap(model).named_parameters():
        key = ".".join(name.split(".")[:-1][:depth]) or name
        counts = rows.setdefault(key, [0, 0])
        counts[0] += p.numel()
        counts[1] += p.numel() if p.requires_grad else 0
    table = pd.DataFrame([(k, n, t) for k, (n, t) in rows.items()], columns=["module", "params", "trainable"])
    table["fraction"] = table["params"] / table["params"].sum()
    return table


def flops_per_token(model: nn.Module, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward), for MFU.

        6 * (N + d_model * vocab_size) + 6 * n_layer * seq_len * n_head * (qk_head_dim + v_head_dim)

    N is the non-embedding parameter count, with only the share of routed weights a token passes
    through (MoE: top-k of the experts; the MLP kind's entry says which and how many).
    d_model * vocab_size is the LM head's matmul, which dominates small models with large
    vocabularies; the input embedding is a lookup and costs no FLOPs. The last term is the
    attention scores and weighted values (PaLM appendix B, nanochat), counted without the causal
    half; for standard attention it is 12 * n_layer * d_model * seq_len.
    seq_len defaults to block_size.
    """
    model = unwrap(model)
    cfg: ModelConfig = model.config
    n = count_params(model, non_embedding=True) + cfg.d_model * cfg.vocab_size
    mlp_kind = MLP_KINDS[cfg.mlp]
    routed = sum(mlp_kind.routed_params(block.mlp) for block in model.blocks)
    if routed:
        n -= routed * (1 - mlp_kind.active_share(cfg))
    seq_len = cfg.block_size if seq_len is None else seq_len
    qk_dim = cfg.attn_head_dim + ATTENTION[cfg.attention].extra_qk_dim(cfg)
    attention = 6 * cfg.n_layer * seq_len * cfg.n_head * (qk_dim + cfg.attn_head_dim)
    return float(6 * n + attention)


# ----------------------------------------------------------------------------- freezing


def _select(model: nn.Module, patterns: tuple[str | re.Pattern, ...]) -> list[tuple[str, nn.Parameter]]:
    named = dict(unwrap(model).named_parameters())
    chosen: dict[str, nn.Parameter] = {}
    for pattern in patterns:
        if isinstance(pattern, re.Pattern):
            hits = [n for n in named if pattern.search(n)]
        else:
            hits = fnmatch.filter(named, pattern)
        if not hits:
            raise ValueError(
                f"pattern {getattr(pattern, 'pattern', pattern)!r} matches no parameter; "
                f"names look like {list(named)[:4]}"
            )
        chosen.update((n, named[n]) for n in hits)
    return list(chosen.items())


def freeze(model: nn.Module, *patterns: str | re.Pattern) -> list[str]:
    """Stop gradients for parameters whose names match any glob (fnmatch) or compiled regex.

    e.g. freeze(model, "tok_emb.*", "blocks.[01].*") or freeze(model, re.compile(r"attn")).
    Returns the names frozen; a pattern that matches nothing is an error (likely a typo).
    """
    selected = _select(model, patterns or ("*",))
    for _, p in selected:
        p.requires_grad_(False)
    return [n for n, _ in selected]


def unfreeze(model: nn.Module, *patterns: str | re.Pattern) -> list[str]:
    """The reverse of `freeze`; with no patterns, every parameter."""
    selected = _select(model, patterns or ("*",))
    for _, p in selected:
        p.requires_grad_(True)
    return [n for n, _ in selected]
