"""Hugging Face in both directions: a GPT whose config maps onto Llama or GPT-2 becomes a transformers folder
(`export_hf`), and a transformers GPT-2 or Llama-family checkpoint becomes a GPT (`import_hf`) with the same logits.

One weight map per architecture (`_weight_map`) serves both directions, so what export writes import reads back.
`transformers` is imported only here, when converting.

Starting from trained weights: `pretrained_config(source)` is the ModelConfig to train (its shape fixed by the
checkpoint, dropouts and a shorter block_size free), `pretrained_tokenizer(source)` the tokenizer name that prepares a
corpus with the checkpoint's own vocabulary, and `TrainConfig.init_from = source` makes `train` start from the weights
instead of a random init.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..validation import CheckpointError, ConfigError
from .config import ModelConfig
from .gpt import GPT
from .utils import unwrap

_HF_TARGETS = {
    "LlamaForCausalLM": dict(
        pos="rope",
        norm="rmsnorm",
        mlp="swiglu",
        attention=("mha", "gqa", "mqa"),
        bias=False,
        qk_norm=False,
        norm_position="pre",
    ),
    "GPT2LMHeadModel": dict(
        pos="learned",
        norm="layernorm",
        mlp=("gelu", "gelu_tanh", "relu"),
        attention="mha",
        bias=True,
        qk_norm=False,
        norm_position="pre",
        head_dim=None,
    ),
}
# GPT-2's activation names in transformers and ours: the released checkpoints use the tanh approximation
_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
_ROPE_TYPES = (
    "default",
    "linear",
)  # RoPE variants our positions compute; others (llama3, yarn, dynamic, ...) are refused


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


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("converting to or from Hugging Face needs transformers: pip install 'labutils[hf]'") from None
    return transformers


# ----------------------------------------------------------------------------- one weight map, both directions


def _weight_map(target: str, cfg: ModelConfig) -> list[tuple[str, list[tuple[str, int | None]], bool]]:
    """(our parameter, [(its transformers parameter, rows of ours it holds)], stored transposed) for every weight.

    Ours is the row-wise concatenation of its parts (Llama's q, k and v make our fused qkv); GPT-2's Conv1D
    layers store (in, out), the transpose of nn.Linear's. `None` rows: the whole tensor.
    """
    if target == "LlamaForCausalLM":
        q, kv = cfg.n_head * cfg.attn_head_dim, cfg.attn_kv_heads * cfg.attn_head_dim
        pairs = [
            ("tok_emb.weight", "model.embed_tokens.weight"),
            ("norm_f.weight", "model.norm.weight"),
            ("lm_head.weight", "lm_head.weight"),
        ]
        mapping = [(ours, [(theirs, None)], False) for ours, theirs in pairs]
        for i in range(cfg.n_layer):
            src, dst = f"blocks.{i}.", f"model.layers.{i}."
            mapping.append(
                (
                    src + "attn.qkv.weight",
                    [(dst + f"self_attn.{p}_proj.weight", rows) for p, rows in (("q", q), ("k", kv), ("v", kv))],
                    False,
                )
            )
            mapping += [
                (src + ours, [(dst + theirs, None)], False)
                for ours, theirs in (
                    ("attn.out_proj.weight", "self_attn.o_proj.weight"),
                    ("norm1.weight", "input_layernorm.weight"),
                    ("norm2.weight", "post_attention_layernorm.weight"),
                    *((f"mlp.{p}.weight", f"mlp.{p}.weight") for p in ("gate_proj", "up_proj", "down_proj")),
                )
            ]
        return mapping
    pairs = [
        ("tok_emb.weight", "transformer.wte.weight"),
        ("pos_emb.weight", "transformer.wpe.weight"),
        ("norm_f.weight", "transformer.ln_f.weight"),
        ("norm_f.bias", "transformer.ln_f.bias"),
        ("lm_head.weight", "lm_head.weight"),
    ]
    mapping = [(ours, [(theirs, None)], False) for ours, theirs in pairs]
    names = {
        "attn.c_attn": "attn.qkv",
        "attn.c_proj": "attn.out_proj",
        "mlp.c_fc": "mlp.up_proj",
        "mlp.c_proj": "mlp.down_proj",
        "ln_1": "norm1",
        "ln_2": "norm2",
    }
    for i in range(cfg.n_layer):
        for theirs, ours in names.items():
            for kind in ("weight", "bias"):
                transposed = kind == "weight" and not theirs.startswith("ln")
                mapping.append(
                    (f"blocks.{i}.{ours}.{kind}", [(f"transformer.h.{i}.{theirs}.{kind}", None)], transposed)
                )
    return mapping


def _theirs(mapping, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in transformers' names."""
    out = {}
    for ours, parts, transposed in mapping:
        pieces = state[ours].split([rows for _, rows in parts]) if len(parts) > 1 else [state[ours]]
        for (theirs, _), piece in zip(parts, pieces, strict=True):
            out[theirs] = piece.t().contiguous() if transposed else piece
    return out


def _ours(mapping, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' state dict in our names."""
    return {
        ours: torch.cat([state[theirs].t() if transposed else state[theirs] for theirs, _ in parts]).contiguous()
        for ours, parts, transposed in mapping
    }


# ----------------------------------------------------------------------------- export


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
    transformers = _transformers()
    hf_config = _llama_config(transformers, cfg) if target == "LlamaForCausalLM" else _gpt2_config(transformers, cfg)
    hf_model = getattr(transformers, target)(hf_config)
    state = {k: v.detach().cpu().float() for k, v in model.state_dict().items()}
    result = hf_model.load_state_dict(_theirs(_weight_map(target, cfg), state), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"export_hf: weight mapping incomplete: missing {result.missing_keys}, unexpected {result.unexpected_keys}"
        )
    if cfg.tie_weights:
        hf_model.tie_weights()
    directory = Path(directory)
    hf_model.save_pretrained(directory)
    return directory


def _llama_config(transformers, cfg: ModelConfig):
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling != 1.0:
        rope.update(rope_type="linear", factor=cfg.rope_scaling)
    kwargs = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.attn_kv_heads,
        head_dim=cfg.attn_head_dim,
        max_position_embeddings=cfg.block_size,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_weights,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=cfg.dropout_for("attn"),
        bos_token_id=None,
        eos_token_id=None,
    )
    if int(transformers.__version__.split(".")[0]) >= 5:
        kwargs["rope_parameters"] = rope
    else:  # transformers 4.x spelled RoPE settings as two fields
        kwargs["rope_theta"] = cfg.rope_theta
        kwargs["rope_scaling"] = {"type": "linear", "factor": cfg.rope_scaling} if cfg.rope_scaling != 1.0 else None
    return transformers.LlamaConfig(**kwargs)


def _gpt2_config(transformers, cfg: ModelConfig):
    activation = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new"}[cfg.mlp]
    return transformers.GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=cfg.ffn_hidden,
        activation_function=activation,
        layer_norm_epsilon=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_weights,
        resid_pdrop=cfg.dropout_for("resid"),
        embd_pdrop=cfg.dropout_for("emb"),
        attn_pdrop=cfg.dropout_for("attn"),
        bos_token_id=None,
        eos_token_id=None,
    )


# ----------------------------------------------------------------------------- import


def config_from_hf(hf_config: Any, **overrides: Any) -> ModelConfig:
    """Our ModelConfig for a transformers GPT-2 or Llama config, field by field; `overrides` on top (a shorter
    block_size, dropout for fine-tuning). What we cannot compute the same way raises a ConfigError naming the field."""
    kind = getattr(hf_config, "model_type", None)
    if kind == "gpt2":
        fields = _gpt2_fields(hf_config)
    elif kind == "llama":
        fields = _llama_fields(hf_config)
    else:
        raise ConfigError(
            f"model_type: {kind!r} cannot be imported; labutils maps 'gpt2' and 'llama' "
            "(GPT2LMHeadModel, LlamaForCausalLM and models saved in their shape)"
        )
    return ModelConfig.from_dict({**fields, **overrides})


def _refuse_unless(hf_config: Any, field: str, allowed: tuple, why: str) -> None:
    value = getattr(hf_config, field, allowed[0])
    if value not in allowed:
        raise ConfigError(f"{field}: {value!r} cannot be imported ({why}); supported: {list(allowed)}")


def _gpt2_fields(c: Any) -> dict[str, Any]:
    _refuse_unless(c, "activation_function", tuple(_GPT2_ACTIVATIONS), "no MLP kind of ours computes it")
    _refuse_unless(c, "scale_attn_weights", (True,), "our attention always scales scores by 1/sqrt(head_dim)")
    _refuse_unless(c, "scale_attn_by_inverse_layer_idx", (False,), "our attention does not scale scores by depth")
    _refuse_unless(c, "add_cross_attention", (False,), "a decoder-only model has no cross-attention")
    return dict(
        vocab_size=c.vocab_size,
        block_size=c.n_positions,
        d_model=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        attention="mha",
        pos="learned",
        norm="layernorm",
        norm_eps=c.layer_norm_epsilon,
        mlp=_GPT2_ACTIVATIONS[c.activation_function],
        d_ff=c.n_inner or 4 * c.n_embd,
        bias=True,
        tie_weights=bool(c.tie_word_embeddings),
        dropout=0.0,
        emb_dropout=c.embd_pdrop,
        attn_dropout=c.attn_pdrop,
        resid_dropout=c.resid_pdrop,
    )


def _rope_settings(c: Any) -> dict[str, Any]:
    """RoPE's theta and linear scaling, from transformers 5's rope_parameters or 4.x's rope_theta + rope_scaling."""
    params = dict(getattr(c, "rope_parameters", None) or {})
    if not params:
        params = {**(getattr(c, "rope_scaling", None) or {}), "rope_theta": getattr(c, "rope_theta", 10000.0)}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ConfigError(
            f"rope_scaling: rope_type {rope_type!r} cannot be imported (labutils computes RoPE with "
            f"linear position scaling only); supported: {list(_ROPE_TYPES)}"
        )
    return dict(
        rope_theta=float(params["rope_theta"]),
        rope_scaling=float(params.get("factor", 1.0)) if rope_type == "linear" else 1.0,
    )


def _llama_fields(c: Any) -> dict[str, Any]:
    _refuse_unless(c, "hidden_act", ("silu",), "our SwiGLU gates with SiLU")
    _refuse_unless(c, "attention_bias", (False,), "our Llama-shaped attention has no biases")
    _refuse_unless(c, "mlp_bias", (False,), "our SwiGLU has no biases")
    heads, kv_heads = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    attention = "mha" if kv_heads == heads else "mqa" if kv_heads == 1 else "gqa"
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return dict(
        vocab_size=c.vocab_size,
        block_size=c.max_position_embeddings,
        d_model=c.hidden_size,
        n_layer=c.num_hidden_layers,
        n_head=heads,
        attention=attention,
        n_kv_head=kv_heads if attention == "gqa" else None,
        head_dim=None if head_dim * heads == c.hidden_size else head_dim,
        pos="rope",
        **_rope_settings(c),
        norm="rmsnorm",
        norm_eps=c.rms_norm_eps,
        mlp="swiglu",
        d_ff=c.intermediate_size,
        bias=False,
        tie_weights=bool(c.tie_word_embeddings),
        dropout=0.0,
        attn_dropout=float(getattr(c, "attention_dropout", 0.0)),
    )


def crop_learned_positions(state: dict[str, torch.Tensor], block_size: int, source: Any) -> dict[str, torch.Tensor]:
    """Learned positions for a block_size other than the checkpoint's: a shorter block uses the first rows; a longer
    one would need rows nobody trained, and is refused."""
    if "pos_emb.weight" in state:
        learned = state["pos_emb.weight"].shape[0]
        if block_size > learned:
            raise ConfigError(
                f"block_size: {block_size} is longer than the {learned} positions {source} learned; "
                f"use block_size <= {learned}"
            )
        state["pos_emb.weight"] = state["pos_emb.weight"][:block_size]
    return state


def _where(source: str | Path) -> str:
    """A local folder as its path, anything else as a hub name."""
    local = Path(source).expanduser()
    return str(local) if local.exists() else str(source)


def read_hf_config(source: str | Path) -> Any:
    """The transformers config of a checkpoint folder (or hub name), with an error that says what to pass instead."""
    local = Path(source).expanduser()
    if local.exists() and not (local / "config.json").exists():
        raise CheckpointError(f"{local} holds no config.json: pass a folder written by transformers' save_pretrained")
    if not local.exists() and (local.is_absolute() or str(source).startswith((".", "~")) or str(source).count("/") > 1):
        raise CheckpointError(
            f"no checkpoint folder at {source} (and it is not a hub name such as 'openai-community/gpt2'); "
            "pass a folder saved with save_pretrained or save_model"
        )
    try:
        return _transformers().AutoConfig.from_pretrained(_where(source))
    except OSError as exc:
        raise CheckpointError(
            f"could not read a transformers config from {source!r} ({exc}). A hub name needs the "
            "network; offline, pass a local folder saved with save_pretrained"
        ) from None


def import_hf(source: str | Path, **overrides: Any) -> GPT:
    """A transformers GPT-2 or Llama-family checkpoint as our GPT, in eval mode, with the same logits (fp32).

    `source` is a local folder saved by `save_pretrained` (config.json and its safetensors), or a hub name where the
    machine has network. `overrides` change config fields that leave the weights' shapes alone (a shorter
    block_size keeps the first rows of learned positions; dropouts for fine-tuning).
    """
    hf_config = read_hf_config(source)
    config = config_from_hf(hf_config, **overrides)
    hf_model = _transformers().AutoModelForCausalLM.from_pretrained(_where(source), dtype=torch.float32)
    target = "LlamaForCausalLM" if hf_config.model_type == "llama" else "GPT2LMHeadModel"
    state = {k: v.detach() for k, v in hf_model.state_dict().items()}
    if config.tie_weights:
        state.setdefault("lm_head.weight", state[_weight_map(target, config)[0][1][0][0]])
    ours = crop_learned_positions(_ours(_weight_map(target, config), state), config.block_size, source)
    model = GPT(config)
    model.load_state_dict(ours, strict=True)
    return model.eval()


# --------------------------------------------------------------------------- starting from trained weights
# Fields a fine-tuning run may set differently from the checkpoint: none of them changes a weight's shape (block_size
# only crops learned positions), so the pretrained weights load into the model they give.
FREE_FIELDS = ("block_size", "dropout", "emb_dropout", "attn_dropout", "resid_dropout", "drop_path", "grad_checkpoint")


def is_labutils_model(source: str | Path) -> bool:
    """A folder written by labutils' save_model (model.pt beside our config.json), as opposed to a transformers one."""
    return (Path(source).expanduser() / "model.pt").is_file()


def pretrained_config(source: str | Path, **overrides: Any) -> ModelConfig:
    """The checkpoint's ModelConfig with `overrides` of FREE_FIELDS (anything else would change its weights)."""
    fixed = sorted(set(overrides) - set(FREE_FIELDS))
    if fixed:
        raise ConfigError(
            f"{fixed[0]}: a model started from {source} keeps the checkpoint's {', '.join(fixed)}; "
            f"only {list(FREE_FIELDS)} may be set for fine-tuning"
        )
    if is_labutils_model(source):
        saved = json.loads((Path(source).expanduser() / "config.json").read_text())
        return ModelConfig.from_dict({**saved, **overrides})
    return config_from_hf(read_hf_config(source), **overrides)


def pretrained_tokenizer(source: str | Path) -> str:
    """The tokenizer name `prepare_data` needs so a corpus gets the checkpoint's own token ids."""
    folder = Path(source).expanduser()
    if is_labutils_model(source):
        if not (folder / "tokenizer.json").is_file():
            raise CheckpointError(
                f"{folder} was saved without its tokenizer (save_model(..., tokenizer=)); it cannot prepare a corpus"
            )
        return f"saved:{folder}"
    hf_config = read_hf_config(source)
    if hf_config.model_type == "gpt2" and hf_config.vocab_size == 50257:
        return "gpt2"  # GPT-2's BPE is tiktoken's r50k ranks, bundled: offline and the same ids
    if (folder / "tokenizer.json").is_file():
        return f"hf:{folder}"
    raise CheckpointError(
        f"{folder} has no tokenizer.json; save the checkpoint's tokenizer beside it "
        "(tokenizer.save_pretrained(folder)) so a corpus can be prepared with its vocabulary"
    )


def pretrained_weights(source: str | Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The checkpoint's weights as the state dict of a GPT of `config`, which must be the checkpoint's own config but
    for
    FREE_FIELDS (learned positions are cropped to a shorter block_size)."""
    own = pretrained_config(source)
    changed = [f for f in ModelConfig.field_names() if f not in FREE_FIELDS and getattr(own, f) != getattr(config, f)]
    if changed:
        raise ConfigError(
            f"init_from: the model config differs from {source}'s in {', '.join(changed)} "
            f"({', '.join(f'{f}={getattr(config, f)!r} vs {getattr(own, f)!r}' for f in changed[:3])}); "
            "build it with labutils.pretrained_config(init_from, ...)"
        )
    if is_labutils_model(source):
        from ..checkpoints import load_model  # checkpoints imports the model package: loaded here, not at import

        state = load_model(source).state_dict()
    else:
        state = import_hf(source).state_dict()
    return crop_learned_positions(state, config.block_size, source)


def load_pretrained(source: str | Path, config: ModelConfig | None = None) -> GPT:
    """The checkpoint as a GPT of `config` (default: the checkpoint's own), in eval mode."""
    config = config or pretrained_config(source)
    model = GPT(config)
    model.load_state_dict(pretrained_weights(source, config))
    return model.eval()
