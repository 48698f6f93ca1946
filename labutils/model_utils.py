"""Model utilities: parameter counts and FLOPs for MFU, freezing by name, save/load, Hugging Face export.

A saved model is a folder: `model.pt` (state dict), `config.json`, optional `tokenizer.json`, and
`manifest.json` with SHA-256 hashes (the layout of the trainer's checkpoints, so both load here). Loading verifies
the hashes and uses `torch.load(weights_only=True)`. `transformers` is imported only by `export_hf`.
"""
from __future__ import annotations

import fnmatch
import pickle
import re
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from labutils.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    CheckpointError,
    atomic_write,
    verify_manifest,
    write_manifest,
)
from labutils.config import ModelConfig
from labutils.configbase import ConfigError
from labutils.model import GPT


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wraps the module


# ----------------------------------------------------------------------------- counting

def _embedding_matrices(model: nn.Module) -> list[nn.Parameter]:
    """Vocabulary and position matrices: token embedding, learned positions, LM head (tied: once)."""
    model = _unwrap(model)
    found = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    head = getattr(model, "lm_head", None)
    if head is not None:
        found.append(head.weight)
    return list({id(p): p for p in found}.values())


def count_params(model: nn.Module, non_embedding: bool = False) -> int:
    """Parameters, shared ones once. non_embedding leaves out the vocabulary and position matrices
    (token embedding, learned positions, LM head), as in Kaplan et al. 2020 and Pythia."""
    total = sum(p.numel() for p in _unwrap(model).parameters())
    if non_embedding:
        total -= sum(p.numel() for p in _embedding_matrices(model))
    return total


def param_table(model: nn.Module, depth: int = 3) -> pd.DataFrame:
    """Parameters per module, names cut to `depth` parts (e.g. blocks.0.attn): one row each."""
    rows: dict[str, list[int]] = {}
    for name, p in _unwrap(model).named_parameters():
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

    N is the non-embedding parameter count, with only the top-k share of MoE expert weights (those a
    token passes through). d_model * vocab_size is the LM head's matmul, which dominates small
    models with large vocabularies; the input embedding is a lookup and costs no FLOPs. The last
    term is the attention scores and weighted values (PaLM appendix B, nanochat), counted without
    the causal half; for standard attention it is 12 * n_layer * d_model * seq_len.
    seq_len defaults to block_size.
    """
    model = _unwrap(model)
    cfg: ModelConfig = model.config
    n = count_params(model, non_embedding=True) + cfg.d_model * cfg.vocab_size
    if cfg.mlp == "moe":
        expert_params = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
        n -= expert_params * (cfg.n_experts - cfg.moe_top_k) / cfg.n_experts
    seq_len = cfg.block_size if seq_len is None else seq_len
    qk_dim = cfg.attn_head_dim + (cfg.attn_rope_dim if cfg.attention == "mla" else 0)
    attention = 6 * cfg.n_layer * seq_len * cfg.n_head * (qk_dim + cfg.attn_head_dim)
    return float(6 * n + attention)


# ----------------------------------------------------------------------------- freezing

def _select(model: nn.Module, patterns: tuple[str | re.Pattern, ...]) -> list[tuple[str, nn.Parameter]]:
    named = dict(_unwrap(model).named_parameters())
    chosen: dict[str, nn.Parameter] = {}
    for pattern in patterns:
        if isinstance(pattern, re.Pattern):
            hits = [n for n in named if pattern.search(n)]
        else:
            hits = fnmatch.filter(named, pattern)
        if not hits:
            raise ValueError(f"pattern {getattr(pattern, 'pattern', pattern)!r} matches no parameter; "
                             f"names look like {list(named)[:4]}")
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


# ----------------------------------------------------------------------------- save / load

def save_model(model: nn.Module, directory: str | Path, tokenizer: Any = None) -> Path:
    """Write model.pt, config.json, tokenizer.json (if given, via tokenizer.save) and the manifest."""
    model = _unwrap(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(directory / MODEL_FILE, lambda tmp: torch.save(state, tmp))
    atomic_write(directory / CONFIG_FILE, model.config.to_json)
    files = [MODEL_FILE, CONFIG_FILE]
    if tokenizer is not None:
        atomic_write(directory / TOKENIZER_FILE, lambda tmp: tokenizer.save(tmp))
        files.append(TOKENIZER_FILE)
    write_manifest(directory, files)
    return directory


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> GPT:
    """Verify the manifest, rebuild GPT from config.json, load model.pt; returns it in eval mode."""
    directory = Path(directory)
    verify_manifest(directory)
    try:
        config = ModelConfig.from_json(directory / CONFIG_FILE)
    except ConfigError as exc:
        raise CheckpointError(f"{directory / CONFIG_FILE} is not a valid model config: {exc}") from None
    model = GPT(config)
    try:
        state = torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as exc:  # weights_only refuses anything but tensors and plain data
        raise CheckpointError(f"{directory / MODEL_FILE} passed its manifest but could not be loaded safely ({exc})") from None
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                   if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        problems = [f"{label}: {items[:5]}{' …' if len(items) > 5 else ''}"
                    for label, items in (("missing", missing), ("unexpected", unexpected),
                                         ("checkpoint vs config shape", wrong_shape)) if items]
        raise CheckpointError(f"{directory / MODEL_FILE} does not fit {directory / CONFIG_FILE}: "
                              + "; ".join(problems))
    model.load_state_dict(state)
    return model.to(device).eval()


# ----------------------------------------------------------------------------- Hugging Face export

# What each transformers architecture needs from our config: field -> required value(s).
_HF_TARGETS = {
    "LlamaForCausalLM": dict(pos="rope", norm="rmsnorm", mlp="swiglu", attention=("mha", "gqa", "mqa"),
                             bias=False, qk_norm=False, norm_position="pre"),
    "GPT2LMHeadModel": dict(pos="learned", norm="layernorm", mlp=("gelu", "relu"), attention="mha", bias=True,
                            qk_norm=False, norm_position="pre", head_dim=None),
}


def hf_blockers(config: ModelConfig) -> dict[str, list[str]]:
    """For each exportable architecture, the fields that stop `config` from mapping onto it."""
    blockers: dict[str, list[str]] = {}
    for target, needs in _HF_TARGETS.items():
        blockers[target] = []
        for field, want in needs.items():
            allowed = want if isinstance(want, tuple) else (want,)
            if getattr(config, field) not in allowed:
                wanted = repr(want) if len(allowed) == 1 else f"one of {list(allowed)}"
                blockers[target].append(f"{field}={getattr(config, field)!r} (needs {wanted})")
    return blockers


def export_hf(model: nn.Module, directory: str | Path) -> Path:
    """Save `model` as a transformers LlamaForCausalLM or GPT2LMHeadModel (whichever fits) folder.

    The folder loads with AutoModelForCausalLM.from_pretrained and gives the same logits. Configs
    that fit neither (MLA, MoE, QK-norm, sinusoidal positions, ...) raise a ConfigError naming them.
    """
    model = _unwrap(model)
    cfg: ModelConfig = model.config
    blockers = hf_blockers(cfg)
    target = next((name for name, found in blockers.items() if not found), None)
    if target is None:
        reasons = "; ".join(f"{name} needs " + ", ".join(found) for name, found in blockers.items())
        raise ConfigError(f"export_hf: this config maps onto no transformers architecture. {reasons}")
    try:
        import transformers
    except ImportError:
        raise ImportError("export_hf needs transformers: pip install 'labutils[hf]'") from None
    state = {k: v.detach().cpu().float() for k, v in model.state_dict().items()}
    if target == "LlamaForCausalLM":
        hf_model, hf_state = _to_llama(transformers, cfg, state)
    else:
        hf_model, hf_state = _to_gpt2(transformers, cfg, state)
    result = hf_model.load_state_dict(hf_state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"export_hf: weight mapping incomplete: missing {result.missing_keys}, "
                           f"unexpected {result.unexpected_keys}")
    if cfg.tie_weights:
        hf_model.tie_weights()
    directory = Path(directory)
    hf_model.save_pretrained(directory)
    return directory


def _to_llama(transformers, cfg: ModelConfig, state: dict[str, torch.Tensor]):
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling != 1.0:
        rope.update(rope_type="linear", factor=cfg.rope_scaling)
    kwargs = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
                  num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                  num_key_value_heads=cfg.attn_kv_heads, head_dim=cfg.attn_head_dim,
                  max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
                  tie_word_embeddings=cfg.tie_weights, attention_bias=False, mlp_bias=False,
                  bos_token_id=None, eos_token_id=None)
    if int(transformers.__version__.split(".")[0]) >= 5:
        kwargs["rope_parameters"] = rope
    else:  # transformers 4.x spelled RoPE settings as two fields
        kwargs["rope_theta"] = cfg.rope_theta
        kwargs["rope_scaling"] = {"type": "linear", "factor": cfg.rope_scaling} if cfg.rope_scaling != 1.0 else None
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs))
    q, kv = cfg.n_head * cfg.attn_head_dim, cfg.attn_kv_heads * cfg.attn_head_dim
    out = {"model.embed_tokens.weight": state["tok_emb.weight"], "model.norm.weight": state["norm_f.weight"],
           "lm_head.weight": state["lm_head.weight"]}
    for i in range(cfg.n_layer):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        wq, wk, wv = state[src + "attn.qkv.weight"].split([q, kv, kv])
        out.update({
            dst + "self_attn.q_proj.weight": wq, dst + "self_attn.k_proj.weight": wk,
            dst + "self_attn.v_proj.weight": wv, dst + "self_attn.o_proj.weight": state[src + "attn.out_proj.weight"],
            dst + "input_layernorm.weight": state[src + "norm1.weight"],
            dst + "post_attention_layernorm.weight": state[src + "norm2.weight"],
            **{dst + f"mlp.{p}.weight": state[src + f"mlp.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj")},
        })
    return hf_model, out


def _to_gpt2(transformers, cfg: ModelConfig, state: dict[str, torch.Tensor]):
    hf_config = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.d_model, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=cfg.ffn_hidden, activation_function="relu" if cfg.mlp == "relu" else "gelu",
        layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tie_weights,
        resid_pdrop=cfg.dropout_for("resid"), embd_pdrop=cfg.dropout_for("emb"), attn_pdrop=cfg.dropout_for("attn"),
        bos_token_id=None, eos_token_id=None)
    hf_model = transformers.GPT2LMHeadModel(hf_config)
    # GPT-2's Conv1D stores weights as (in, out): the transpose of nn.Linear's.
    out = {"transformer.wte.weight": state["tok_emb.weight"], "transformer.wpe.weight": state["pos_emb.weight"],
           "transformer.ln_f.weight": state["norm_f.weight"], "transformer.ln_f.bias": state["norm_f.bias"],
           "lm_head.weight": state["lm_head.weight"]}
    names = {"attn.c_attn": "attn.qkv", "attn.c_proj": "attn.out_proj", "mlp.c_fc": "mlp.up_proj",
             "mlp.c_proj": "mlp.down_proj", "ln_1": "norm1", "ln_2": "norm2"}
    for i in range(cfg.n_layer):
        for hf_name, ours in names.items():
            weight = state[f"blocks.{i}.{ours}.weight"]
            out[f"transformer.h.{i}.{hf_name}.weight"] = weight if hf_name.startswith("ln") else weight.t().contiguous()
            out[f"transformer.h.{i}.{hf_name}.bias"] = state[f"blocks.{i}.{ours}.bias"]
    return hf_model, out
