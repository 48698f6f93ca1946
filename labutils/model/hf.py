"""Hugging Face export: a GPT whose config maps onto Llama or GPT-2 becomes a transformers folder.

`transformers` is imported only when exporting.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from .config import ModelConfig
from .utils import unwrap

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
    model = unwrap(model)
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

