"""The decoder-only transformer, in seven files: `config` (ModelConfig and presets), `kinds` (the one
shape of every component registry, and the norms), `attention` (every attention kind and positional
encoding), `mlp` (GELU, ReLU², SwiGLU and mixture-of-experts MLPs), `gpt` (blocks and the GPT),
`utils` (counts, FLOPs, freezing) and `hf` (Hugging Face export and import, and starting from trained weights).
Write-up 004's model package.
"""

from .config import PRESETS, ModelConfig, get_preset
from .gpt import GPT, model_shape

__all__ = ["GPT", "PRESETS", "ModelConfig", "get_preset", "model_shape"]
