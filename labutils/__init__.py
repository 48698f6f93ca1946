"""labutils: train compact decoder-only language models under strict compute limits.

The notebooks import from here: data preparation, model configs, training, studies, plots and
reports. Heavy submodules load lazily so `import labutils` stays fast.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "prepare_data": "data", "load_prepared": "data", "load_corpus": "data", "get_tokenizer": "data",
    "load_tokenizer": "data", "StreamBatches": "data", "DocumentBatches": "data", "eval_batches": "data",
    "DataError": "data", "ConfigError": "configbase", "CheckpointError": "checkpoint",
    "ModelConfig": "config", "get_preset": "config", "PRESETS": "config", "GPT": "model",
    "TrainConfig": "train", "train": "train", "evaluate": "train",
    "generate": "generate", "stream": "generate", "save_model": "model_utils", "load_model": "model_utils",
    "run_notebook": "report",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'labutils' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
