"""The one shape of every model registry: a `Kind` per choice of ModelConfig.attention, .mlp, .norm and .pos.

An entry builds its module from the config, checks the config fields only that kind reads (raising
ConfigError through `validation.require`, like every config check), and derives what the rest of
the code needs to know about it: head counts and RoPE dims for attention, the share of parameters
a token passes through for FLOP counting. ModelConfig accepts a registry's keys and nothing else,
and no module asks for a kind by name, so adding one is its module, its entry and a test.
The registries sit beside their modules: attention.ATTENTION, attention.POSITIONS, mlp.MLP_KINDS,
and NORMS here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:  # ModelConfig validates against these registries, so they must not import it
    from .config import ModelConfig


def no_check(config: ModelConfig) -> None:
    """For kinds that read no config field of their own."""


@dataclass(frozen=True, kw_only=True)
class Kind:
    """One registry entry: `build(config, ...)` makes the module; `check(config)` raises ConfigError naming the field
    and the fix."""

    build: Callable[..., nn.Module]
    check: Callable[[ModelConfig], None] = no_check


def _layernorm(config: ModelConfig, dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


def _rmsnorm(config: ModelConfig, dim: int) -> nn.Module:
    return nn.RMSNorm(dim, eps=config.norm_eps)


# A norm is built for a width: the residual stream's (d_model) in blocks and before the head.
NORMS: dict[str, Kind] = {"layernorm": Kind(build=_layernorm), "rmsnorm": Kind(build=_rmsnorm)}


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    return NORMS[config.norm].build(config, dim)
