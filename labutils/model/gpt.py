"""The decoder: one `Block` (attention + MLP, each a residual branch) and `GPT`.

`Block` is the same class for every architecture; the config picks its attention, norm and MLP, and
GPT its positions, each from its registry (`kinds.Kind` entries).
`GPT` is nanoGPT's model with those choices: pre-norm by default, GPT-2 initialisation with
residual projections scaled by 1/sqrt(2 * n_layer), weight tying, dropouts, stochastic depth,
per-block gradient checkpointing, and a KV cache for generation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import KVCache, LayerCache, attention_bias, make_attention, make_positions
from .config import ModelConfig
from .kinds import make_norm
from .mlp import make_mlp
from .utils import count_params, flops_per_token

# Parameters that write into the residual stream; GPT-2 scales their init by depth.
RESIDUAL_PROJECTIONS = ("out_proj.weight", "down_proj.weight")


class Block(nn.Module):
    """Attention then MLP, each a residual branch with dropout and drop path; norms pre or post."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.norm1 = make_norm(config, config.d_model)
        self.attn = make_attention(config)
        self.norm2 = make_norm(config, config.d_model)
        self.mlp = make_mlp(config)
        self.pre_norm = config.norm_position == "pre"
        self.resid_dropout = nn.Dropout(config.dropout_for("resid"))
        # Stochastic depth grows linearly with depth (Huang et al. 2016): 0 at the first block.
        self.drop_path = config.drop_path * layer_idx / max(config.n_layer - 1, 1)

    def branch(self, y: torch.Tensor) -> torch.Tensor:
        y = self.resid_dropout(y)
        if self.training and self.drop_path > 0:
            keep = torch.rand(y.shape[0], 1, 1, device=y.device) >= self.drop_path
            y = y * keep.to(y.dtype) / (1.0 - self.drop_path)
        return y

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        padding_mask: torch.Tensor | None = None,
        cache: LayerCache | None = None,
        attn_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.norm1(x) if self.pre_norm else x
        x = x + self.branch(self.attn(h, rope, padding_mask, cache, attn_bias))
        if not self.pre_norm:
            x = self.norm1(x)
        h = self.norm2(x) if self.pre_norm else x
        h, aux = self.mlp(h), None
        if isinstance(h, tuple):  # an MLP with an auxiliary loss (MoE's load balancing)
            h, aux = h
        x = x + self.branch(h)
        if not self.pre_norm:
            x = self.norm2(x)
        return x, aux


class GPT(nn.Module):
    """Decoder-only language model. `forward(idx, targets)` returns (logits, loss)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        # Adds positions to the embeddings, or hands attention its RoPE tables or a bias on its scores.
        self.pos_emb = make_positions(config)
        self.emb_dropout = nn.Dropout(config.dropout_for("emb"))
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        # Post-norm blocks already end in a norm; pre-norm needs one before the head.
        self.norm_f = make_norm(config, config.d_model) if config.norm_position == "pre" else nn.Identity()
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(RESIDUAL_PROJECTIONS):
                nn.init.normal_(p, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))
        self.aux_loss = torch.zeros(())

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def new_cache(self) -> KVCache:
        return KVCache(self.config.n_layer)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        padding_mask: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab_size) and, with targets (-100 = ignore), the loss.

        padding_mask (B, T), True/1 for real tokens, hides padded keys (with a cache it spans the
        cached tokens too). With `cache`, idx continues the cached sequence.
        """
        T = idx.shape[1]
        past = 0 if cache is None else cache.seq_len
        if past + T > self.config.block_size:
            raise ValueError(
                f"sequence of {past + T} tokens exceeds block_size={self.config.block_size}; "
                "crop the input to the last block_size tokens"
            )
        x = self.emb_dropout(self.pos_emb.add_to(self.tok_emb(idx), past))
        if self.config.low_precision_residual and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))  # every block adds its bf16 branch to it in bf16
        rope = self.pos_emb.rope
        attn_bias = attention_bias(self.pos_emb, T, past)  # built once, shared by every layer
        aux_losses = []
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache.layers[i]
            if self.config.grad_checkpoint and self.training and torch.is_grad_enabled():
                x, aux = checkpoint(block, x, rope, padding_mask, layer_cache, attn_bias, use_reentrant=False)
            else:
                x, aux = block(x, rope, padding_mask, layer_cache, attn_bias)
            if aux is not None:
                aux_losses.append(aux)
        logits = self.lm_head(self.norm_f(x))
        # Mean over MoE layers, so moe_aux_loss_weight does not need retuning with depth.
        self.aux_loss = torch.stack(aux_losses).mean() if aux_losses else torch.zeros((), device=x.device)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, label_smoothing=label_smoothing
        )
        if aux_losses:
            loss = loss + self.config.moe_aux_loss_weight * self.aux_loss
        return logits, loss

    def num_params(self, non_embedding: bool = False) -> int:
        return count_params(self, non_embedding=non_embedding)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        return flops_per_token(self, seq_len=seq_len)


class _SkipRandomInit(torch.overrides.TorchFunctionMode):
    """Random initialisation as a no-op. On the meta device torch runs it through its Python reference kernels:
    slow for a large model, and their first use imports torch._dynamo (seconds of every process that only counts)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("normal_", "uniform_", "trunc_normal_"):
            return args[0] if args else kwargs["tensor"]  # the tensor as it is (torch.nn.init passes it by name)
        return func(*args, **(kwargs or {}))


def model_shape(config: ModelConfig) -> GPT:
    """The model on the meta device, its weights neither allocated nor initialised: parameter counts, FLOPs and
    memory estimates of a model of any size, in milliseconds."""
    with torch.device("meta"), _SkipRandomInit():
        return GPT(config)
