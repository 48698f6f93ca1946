"""The pieces the training loop builds its optimisers from: parameter groups, Muon, LR schedules, weight EMA.

`param_groups` splits a model's parameters: no weight decay on norms, biases and embeddings, a
per-group `lr_scale` (layer-wise LR decay), and with Muon the hidden matrices apart from the rest.
`Muon` orthogonalises the momentum of hidden weight matrices. `lr_factor` (schedules) is a pure
function of the step, so a resumed run recomputes exactly the same LRs; `set_lr` applies it.
`EMA` keeps an exponential moving average of the weights. The optimisers themselves (AdamW from
TrainConfig's lr, betas and weight_decay, plus Muon) are built in `labutils.training.build_optimizers`.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator

import torch
from torch import nn

# Parameters of the i-th transformer block live under one of these prefixes (h.3.attn..., blocks.3...).
_BLOCK_RE = re.compile(r"(?:^|\.)(?:h|blocks|layers)\.(\d+)\.")


# --------------------------------------------------------------------------- parameter groups


def layer_index(model: nn.Module, name: str, n_layer: int) -> int:
    """Depth of a parameter for LR decay: 0 = embeddings, 1..n_layer = blocks, n_layer + 1 = head."""
    if hasattr(model, "layer_index"):  # the model knows its own layout best
        return int(model.layer_index(name))
    match = _BLOCK_RE.search(name)
    if match:
        return int(match.group(1)) + 1
    return 0 if _is_embedding(model, name) else n_layer + 1


def _is_embedding(model: nn.Module, name: str) -> bool:
    module_name = name.rsplit(".", 1)[0] if "." in name else ""
    try:
        return isinstance(model.get_submodule(module_name), nn.Embedding)
    except AttributeError:
        return False


def _embedding_params(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}


def _tied_head_params(model: nn.Module) -> set[int]:
    """Embedding tables that are also an output projection (tied LM head): shared by an Embedding and a Linear."""
    linear = {id(p) for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    return _embedding_params(model) & linear


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    layer_lr_decay: float = 1.0,
    n_layer: int | None = None,
    muon_lr: float | None = None,
) -> tuple[list[dict], list[dict]]:
    """Split parameters into (adamw_groups, muon_groups), each group with `lr_scale` and `base_lr`.

    Weight decay only on the matrices that multiply activations (minGPT's rule): not on norm gains,
    biases or embedding tables, and so not on an LM head tied to the embedding. With `muon_lr` set,
    the 2-D+ weights inside transformer blocks go to Muon and the rest stays on AdamW; their weight decay is
    rescaled by lr / muon_lr so that both shrink a matrix by the same lr x weight_decay a step.

    Layer-wise LR decay gives depth d the rate decay ** (n_layer + 1 - d): the head keeps the full
    rate, the embedding the lowest. A tied embedding/head matrix is the head too, and takes the
    head's full rate: at the embedding's rate (decay ** (n_layer + 1)) the output layer, which gets
    the loss gradient first, would barely move.
    """
    n_layer = n_layer if n_layer is not None else getattr(getattr(model, "config", None), "n_layer", 0)
    embeddings, tied = _embedding_params(model), _tied_head_params(model)
    groups: dict[tuple[str, bool, int], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        depth = n_layer + 1 if id(p) in tied else layer_index(model, name, n_layer)
        in_block = 1 <= depth <= n_layer
        is_matrix = p.ndim >= 2 and id(p) not in embeddings
        kind = "muon" if muon_lr is not None and in_block and is_matrix else "adamw"
        decay = is_matrix
        scale = layer_lr_decay ** (n_layer + 1 - depth) if layer_lr_decay != 1.0 else 1.0
        # Both optimisers decay decoupled from the gradient, by lr x weight_decay a step. Muon's LR is ~20x AdamW's, so
        # its weight_decay is AdamW's x lr / muon_lr: one `weight_decay` value decays every matrix at AdamW's pace.
        wd = weight_decay * (lr / muon_lr if kind == "muon" else 1.0) if decay else 0.0
        group = groups.setdefault(
            (kind, decay, depth if layer_lr_decay != 1.0 else 0),
            {
                "params": [],
                "weight_decay": wd,
                "lr_scale": scale,
                "base_lr": (muon_lr if kind == "muon" else lr) * scale,
            },
        )
        group["params"].append(p)
    for g in groups.values():
        g["lr"] = g["base_lr"]
    adamw = [g for key, g in sorted(groups.items()) if key[0] == "adamw"]
    muon = [g for key, g in sorted(groups.items()) if key[0] == "muon"]
    return adamw, muon


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    """Every group's LR becomes its base LR (peak × layer scale) times the schedule factor."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor


# --------------------------------------------------------------------------- Muon


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate the nearest semi-orthogonal matrix U V^T of g = U S V^T (batched over leading dims).

    A quintic Newton–Schulz iteration whose coefficients are tuned to push every singular value
    into roughly [0.7, 1.2] in five steps: not exact, but orthogonal enough for an update direction.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(torch.bfloat16) if g.is_cuda else g.float()  # bf16 is stable here and twice as fast on GPUs
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the short side: X X^T is then the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
        x = x.mT
    return x.to(g.dtype)


class Muon(torch.optim.Optimizer):
    """SGD-momentum (Nesterov) whose update is orthogonalised before it is applied.

    For hidden 2-D weights only; embeddings, the output head, norms and biases belong to AdamW.
    The update is scaled by sqrt(max(1, rows / cols)) so tall and wide matrices move alike.
    """

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
    ):
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
            "ns_steps": ns_steps,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                update = orthogonalize(update, group["ns_steps"])
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * max(1.0, p.size(-2) / p.size(-1)) ** 0.5)
        return loss


# --------------------------------------------------------------------------- schedules

SCHEDULES = ("cosine", "linear", "constant", "wsd")


def lr_factor(
    step: int,
    total_steps: int | None = None,
    *,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.1,
    decay_frac: float = 0.2,
    progress: float | None = None,
) -> float:
    """Multiplier of the peak LR at `step` (0-based): linear warm-up, then the schedule's decay.

    cosine: half a cosine from 1 to `min_lr_ratio` over the steps after warm-up; linear: a straight
    line to the floor; constant: 1; wsd (warm-up, stable, decay): 1 until the last `decay_frac` of
    all steps, then linear to the floor. When the run's length is a time budget rather than a step
    count, pass `progress` (fraction of the budget used) instead of `total_steps`.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if progress is None:
        if total_steps is None:
            raise ValueError("lr_factor needs total_steps or progress for a decaying schedule")
        progress = (
            (step - warmup_steps) / max(1, total_steps - warmup_steps)
            if schedule != "wsd"
            else step / max(1, total_steps)
        )
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        shape = 1.0 - progress
    else:  # wsd
        decay_start = 1.0 - decay_frac
        shape = 1.0 if progress <= decay_start else 1.0 - (progress - decay_start) / decay_frac
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


# --------------------------------------------------------------------------- EMA


class EMA:
    """Exponential moving average of a model's parameters: shadow <- tau_t * shadow + (1 - tau_t) * param, with the
    warm-up tau_t = min(tau, (1 + t) / (10 + t)) at update t, so the average is not mostly the initialisation when
    the run is short against 1 / (1 - tau) (at tau 0.999 the first 1,000 steps would otherwise weigh the init in).

    Evaluate with `with ema.applied(model): ...`, which swaps the averaged weights in and back.
    Buffers are not averaged (they are copied from the live model when weights are exported).
    """

    def __init__(self, model: nn.Module, tau: float = 0.999):
        if not 0.0 < tau < 1.0:
            raise ValueError(f"EMA tau must be in (0, 1), got {tau}")
        self.tau = tau
        self.updates = 0
        self.shadow = {name: p.detach().clone() for name, p in model.named_parameters()}

    def decay(self) -> float:
        """The decay of the next update: the warm-up's (1 + t) / (10 + t) until it reaches tau."""
        return min(self.tau, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        names, params = zip(*model.named_parameters(), strict=True)
        # lerp(s, p, 1 - tau) = s + (1 - tau) (p - s) = tau s + (1 - tau) p, one fused kernel per list
        torch._foreach_lerp_([self.shadow[n] for n in names], [p.detach() for p in params], 1.0 - self.decay())
        self.updates += 1

    def state_dict(self) -> dict:
        return {"tau": self.tau, "updates": self.updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        self.tau = float(state["tau"])
        self.updates = int(state.get("updates", 10**9))  # a checkpoint from before the warm-up: past it
        for name, tensor in state["shadow"].items():
            self.shadow[name].copy_(tensor)

    def model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state_dict with averaged parameters (what the EMA model would save)."""
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for name, tensor in self.shadow.items():
            if name in state:
                state[name] = tensor.detach().clone()
        return state

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the averaged weights into `model`."""
        params = dict(model.named_parameters())
        backup = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self.shadow[name])
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(backup[name])
