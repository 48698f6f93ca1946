"""The decoder-only transformer: `config` (ModelConfig and presets), `attention` (every attention kind
and positional encoding), `gpt` (norms, MLPs, blocks and the GPT), `utils` (counts, FLOPs, freezing)
and `hf` (Hugging Face export). Seed 004's model package, in four files.
"""
from .config import PRESETS, ModelConfig, get_preset
from .gpt import GPT

__all__ = ["GPT", "PRESETS", "ModelConfig", "get_preset"]
