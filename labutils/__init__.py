"""labutils: train compact decoder-only language models under strict compute limits.

The notebooks import from here: data preparation, model configs, training, studies, plots and
reports. Heavy submodules load lazily so `import labutils` stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> submodule that defines it: the short, stable API the notebooks use
_EXPORTS = {
    "prepare_data": "data",
    "load_prepared": "data",
    "load_corpus": "data",
    "open_corpus": "corpora",
    "get_tokenizer": "tokenizers",
    "load_tokenizer": "tokenizers",
    "StreamBatches": "batches",
    "DocumentBatches": "batches",
    "eval_batches": "batches",
    "ModelConfig": "model",
    "get_preset": "model",
    "PRESETS": "model",
    "GPT": "model",
    "TrainConfig": "config",
    "RunConfig": "config",
    "train": "training",
    "evaluate": "evaluation",
    "Run": "evaluation",
    "generate": "generate",
    "stream": "generate",
    "save_model": "checkpoints",
    "load_model": "checkpoints",
    "pretrained_config": "model.hf",
    "pretrained_tokenizer": "model.hf",
    "load_pretrained": "model.hf",
    "import_hf": "model.hf",
    "export_hf": "model.hf",
    "run_notebook": "pipeline",
    "run_pipeline": "pipeline",
    "ConfigError": "validation",
    "DataError": "validation",
    "CheckpointError": "validation",
    "TrainingError": "validation",
    "StudyError": "validation",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'labutils' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
