"""The decoder-only transformer, in six files: `config` (ModelConfig and presets), `attention` (every
attention kind and positional encoding), `mlp` (GELU, ReLU², SwiGLU and mixture-of-experts MLPs),
`gpt` (norms, blocks and the GPT), `utils` (counts, FLOPs, freezing) and `hf` (Hugging Face export).
Write-up 004's model package.
"""
from .config import PRESETS, ModelConfig, get_preset
from .gpt import GPT

__all__ = ["GPT", "PRESETS", "ModelConfig", "get_preset"]
