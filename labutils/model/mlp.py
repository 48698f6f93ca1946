"""The feed-forward half of a block: GELU/ReLU MLP (GELU exact or GPT-2's tanh approximation), SwiGLU, and a mixture
of SwiGLU experts; their registry MLP_KINDS."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..validation import require
from .kinds import Kind

if TYPE_CHECKING:  # ModelConfig validates against MLP_KINDS below, so this module must not import it
    from .config import ModelConfig


class ReLUSquared(nn.Module):
    """relu(x)^2 (Primer, So et al. 2021; modded-nanoGPT): cheaper than GELU and fuses into the matmul's epilogue."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class MLP(nn.Module):
    """Two-layer feed-forward: up, GELU (exact or tanh-approximated, as GPT-2 uses), ReLU or ReLU², down."""

    def __init__(self, config: ModelConfig, activation: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.d_model, config.ffn_hidden, bias=config.bias)
        self.act = activation()
        self.down_proj = nn.Linear(config.ffn_hidden, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class SwiGLU(nn.Module):
    """Gated feed-forward (Llama): down(silu(gate(x)) * up(x)); three matrices, so 1.5x MLP's params."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.ffn_hidden, bias=config.bias)
        self.up_proj = nn.Linear(config.d_model, config.ffn_hidden, bias=config.bias)
        self.down_proj = nn.Linear(config.ffn_hidden, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Mixture of SwiGLU experts: each token goes to its top-k experts, weighted by renormalised
    router probabilities, plus an optional always-on shared expert.

    `forward` returns (output, aux): aux is the Switch Transformer load-balancing loss
    n_experts * sum_e(fraction of routed slots to e * mean router probability of e), which is 1 when
    routing is balanced and grows to n_experts when every token picks the same expert.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.moe_top_k
        self.router = nn.Linear(config.d_model, config.n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(config) for _ in range(config.n_experts))
        self.shared_expert = SwiGLU(config) if config.moe_shared_expert else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.router(x).float().softmax(dim=-1)  # (N, E)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        # A loop over experts with gathered tokens: simple, and costs only the routed tokens' FLOPs.
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        n_experts = probs.shape[-1]
        routed_fraction = F.one_hot(chosen, n_experts).float().mean(dim=(0, 1))  # (E,), sums to 1
        aux = n_experts * (routed_fraction * probs.mean(dim=0)).sum()
        return out.view(shape), aux


def _check_moe(c: ModelConfig) -> None:
    require(c.n_experts >= 2, "n_experts", f"a mixture needs at least 2 experts, got {c.n_experts}")
    require(
        1 <= c.moe_top_k <= c.n_experts,
        "moe_top_k",
        f"must be between 1 and n_experts={c.n_experts}, got {c.moe_top_k}",
    )
    require(c.moe_aux_loss_weight >= 0, "moe_aux_loss_weight", f"must be >= 0, got {c.moe_aux_loss_weight}")


def _no_routed_params(mlp: nn.Module) -> int:
    return 0


def _expert_params(mlp: nn.Module) -> int:
    return sum(p.numel() for p in mlp.experts.parameters())


@dataclass(frozen=True, kw_only=True)
class MLPKind(Kind):
    """An MLP kind. FLOP counting charges a token for the parameters it passes through: all of a dense MLP's,
    and of the `routed_params(mlp)` behind a router only `active_share(config)` (MoE: top_k of n_experts)."""

    routed_params: Callable[[nn.Module], int] = _no_routed_params
    active_share: Callable[[ModelConfig], float] = lambda c: 1.0


# Adding an MLP kind: write its module above, add its entry here (and a test in test_model.py). ModelConfig.mlp
# accepts every key. An MLP returns its output, or (output, auxiliary loss) as MoE does.
MLP_KINDS: dict[str, MLPKind] = {
    "gelu": MLPKind(build=functools.partial(MLP, activation=nn.GELU)),
    # GPT-2's own activation (transformers' gelu_new): the tanh approximation its released weights were trained with
    "gelu_tanh": MLPKind(build=functools.partial(MLP, activation=functools.partial(nn.GELU, approximate="tanh"))),
    "relu": MLPKind(build=functools.partial(MLP, activation=nn.ReLU)),
    "relu2": MLPKind(build=functools.partial(MLP, activation=ReLUSquared)),
    "swiglu": MLPKind(build=SwiGLU),
    "moe": MLPKind(
        build=MoE, check=_check_moe, routed_params=_expert_params, active_share=lambda c: c.moe_top_k / c.n_experts
    ),
}


def make_mlp(config: ModelConfig) -> nn.Module:
    return MLP_KINDS[config.mlp].build(config)
