"""Starting from trained weights: a transformers GPT-2 or Llama-family checkpoint, or a model labutils saved.

`pretrained_config(source)` is the ModelConfig to train (its shape fixed by the checkpoint, dropouts and a shorter
block_size free), `pretrained_tokenizer(source)` the tokenizer name that prepares a corpus with the checkpoint's own
vocabulary, and `TrainConfig.init_from = source` makes `train` start from the weights instead of a random init.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .checkpoints import load_model
from .errors import CheckpointError, ConfigError
from .model import GPT, ModelConfig
from .model.hf import config_from_hf, crop_learned_positions, import_hf, read_hf_config

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
        raise ConfigError(f"{fixed[0]}: a model started from {source} keeps the checkpoint's {', '.join(fixed)}; "
                          f"only {list(FREE_FIELDS)} may be set for fine-tuning")
    if is_labutils_model(source):
        saved = json.loads((Path(source).expanduser() / "config.json").read_text())
        return ModelConfig.from_dict({**saved, **overrides})
    return config_from_hf(read_hf_config(source), **overrides)


def pretrained_tokenizer(source: str | Path) -> str:
    """The tokenizer name `prepare_data` needs so a corpus gets the checkpoint's own token ids."""
    folder = Path(source).expanduser()
    if is_labutils_model(source):
        if not (folder / "tokenizer.json").is_file():
            raise CheckpointError(f"{folder} was saved without its tokenizer (save_model(..., tokenizer=)); it cannot prepare a corpus")
        return f"saved:{folder}"
    hf_config = read_hf_config(source)
    if hf_config.model_type == "gpt2" and hf_config.vocab_size == 50257:
        return "gpt2"  # GPT-2's BPE is tiktoken's r50k ranks, bundled: offline and the same ids
    if (folder / "tokenizer.json").is_file():
        return f"hf:{folder}"
    raise CheckpointError(f"{folder} has no tokenizer.json; save the checkpoint's tokenizer beside it "
                          "(tokenizer.save_pretrained(folder)) so a corpus can be prepared with its vocabulary")


def pretrained_weights(source: str | Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The checkpoint's weights as the state dict of a GPT of `config`, which must be the checkpoint's own config but for
    FREE_FIELDS (learned positions are cropped to a shorter block_size)."""
    own = pretrained_config(source)
    changed = [f for f in ModelConfig.field_names() if f not in FREE_FIELDS and getattr(own, f) != getattr(config, f)]
    if changed:
        raise ConfigError(f"init_from: the model config differs from {source}'s in {', '.join(changed)} "
                          f"({', '.join(f'{f}={getattr(config, f)!r} vs {getattr(own, f)!r}' for f in changed[:3])}); "
                          "build it with labutils.pretrained_config(init_from, ...)")
    if is_labutils_model(source):
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
