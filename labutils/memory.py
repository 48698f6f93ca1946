"""What a run needs before it starts: the memory one training step takes on a device, the disk its
checkpoints take, and the out-of-memory advice a run gets, before it starts or when a step runs out.

`check_memory` refuses a step whose estimate is far above what the device has, before anything
big is allocated, with the same advice a CUDA out-of-memory error gets during training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from collections.abc import Callable

import torch

from . import hardware
from .config import TrainConfig
from .model import ModelConfig, model_shape
from .validation import TrainingError

# Refuse a run only when the estimate is over twice the memory available: the estimate is close on the CPU and
# high where fused attention stores no attention scores; a step that still runs out gets the same advice.
MEMORY_MARGIN = 2.0


def step_memory_bytes(
    mcfg: ModelConfig,
    tcfg: TrainConfig,
    dtype: torch.dtype = torch.float32,
    *,
    world_size: int = 1,
    n_params: int | None = None,
) -> int:
    """A generous estimate of the memory one training step takes on one device (one rank), in bytes.

    - fp32 weights, gradients and AdamW's two moments, plus the EMA's copy: 16 (20) bytes a parameter;
    - activations kept for the backward of one micro-batch of batch_size x block_size tokens, after
      Korthikanti et al. 2022: (34 d_model + 5 n_head block_size) bytes per token and layer in 16-bit
      (twice that in fp32; counting the attention scores that fused kernels never store). With
      grad_checkpoint a layer keeps only its input (2 d_model) and one layer at a time is recomputed;
    - the logits, batch x block x vocab in fp32, about three times (logits, log-softmax, gradient);
    - the token batches (int64 indices and windows): the global batch drawn on every rank for each
      accumulation step, and the fixed evaluation set, which stays on the device. An evaluation's
      logits take the place of the step's activations, so the larger of the two counts.

    `n_params` saves counting the model's parameters again.
    """
    batch = tcfg.batch_size
    block, d_model, eval_batch = mcfg.block_size, mcfg.d_model, tcfg.eval_batch_size or batch
    weights = (4 + 4 + 8 + (4 if tcfg.ema else 0)) * (_num_params(mcfg) if n_params is None else n_params)
    per_layer = 34 * d_model + 5 * mcfg.n_head * block  # bytes per token, 16-bit activations
    per_token = mcfg.n_layer * 2 * d_model + per_layer if mcfg.grad_checkpoint else mcfg.n_layer * per_layer
    activations = batch * block * per_token * max(dtype.itemsize, 2) // 2
    logits = batch * block * mcfg.vocab_size * 4 * 3
    train_batches = tcfg.grad_accum_steps * world_size * batch * (block + 1) * 16
    n_eval_windows = -(-tcfg.eval_tokens // block) if tcfg.eval_tokens else tcfg.eval_batches * eval_batch
    eval_set = n_eval_windows * (block + 1) * 16
    eval_logits = min(eval_batch, n_eval_windows) * block * mcfg.vocab_size * 4 * 3
    return weights + eval_set + max(activations + logits + train_batches, eval_logits)


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory a run can still take: free CUDA memory (plus what PyTorch's cache holds unused), the
    CPU's MemAvailable; None where unknown (MPS, other devices), which skips the check."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def check_memory(
    mcfg: ModelConfig, tcfg: TrainConfig, device: torch.device, dtype: torch.dtype, ddp: hardware.Dist
) -> None:
    """Refuse, before anything big is allocated, a run whose step clearly cannot fit on the device.

    Every rank checks its own device, and all of them stop if one would run out (a collective)."""
    n_params = _num_params(mcfg)
    needed = step_memory_bytes(mcfg, tcfg, dtype, world_size=ddp.world_size, n_params=n_params)
    available = available_memory_bytes(device)
    error = None
    if available is not None and needed > MEMORY_MARGIN * available:
        fits = functools.partial(_step_fits, mcfg, tcfg, dtype, ddp.world_size, n_params, available)
        error = oom_message(tcfg, mcfg.block_size, device, needed=needed, available=available, fits=fits)
    error = next((e for e in hardware.gather_objects(ddp, error) if e), None)
    if error:
        raise TrainingError(error)


def _step_fits(
    mcfg: ModelConfig,
    tcfg: TrainConfig,
    dtype: torch.dtype,
    world_size: int,
    n_params: int,
    available: int,
    batch_size: int,
    grad_accum_steps: int,
) -> bool:
    """Whether a step with this micro-batch and accumulation fits in `available` bytes, by the estimate."""
    shape = dataclasses.replace(tcfg, batch_size=batch_size, grad_accum_steps=grad_accum_steps)
    return step_memory_bytes(mcfg, shape, dtype, world_size=world_size, n_params=n_params) <= available


def oom_message(
    tcfg: TrainConfig,
    block_size: int,
    device: torch.device,
    *,
    step: int | None = None,
    needed: int | None = None,
    available: int | None = None,
    fits: Callable[[int, int], bool] | None = None,
) -> str:
    """What to change when a step does not fit: the same advice in a step that ran out (`step`) and
    before a run whose estimate (`needed`) is far above what is `available`.

    The smaller micro-batch is half the micro-batch or less; before a run, also one that `fits`
    (batch_size, grad_accum_steps) by the estimate. A step holds every micro-batch's tokens at once,
    so when even those of the global batch do not fit, the advice gives the largest global batch that does.
    """
    micro_batch = f"a micro-batch of batch_size={tcfg.batch_size} x block_size={block_size} tokens"
    if step is not None:
        head = f"Out of memory at step {step} on {device} with {micro_batch}."
    else:
        head = (
            f"Out of memory on {device}: one training step with {micro_batch} needs about {_gib(needed)} "
            f"(an estimate) but {_gib(available)} is available."
        )
    global_batch, limit = tcfg.batch_size * tcfg.grad_accum_steps, tcfg.batch_size // 2
    if fits is not None:
        limit = min(limit, _largest(lambda b: fits(b, tcfg.grad_accum_steps), tcfg.batch_size))
    smaller, accum = _smaller_micro_batch(global_batch, limit)
    if smaller and fits is not None and not fits(smaller, accum):
        most = _largest(lambda a: fits(smaller, a), accum)
        first = (
            f"The global batch (batch_size x grad_accum_steps = {global_batch} sequences) cannot fit either: a step "
            f"holds the tokens of all its micro-batches at once. Lower the micro-batch to batch_size={smaller} with "
            f"grad_accum_steps={most} or fewer (a global batch of up to {smaller * most} sequences), "
        )
    elif smaller:
        first = f"Keep the global batch and lower the micro-batch (batch_size={smaller}, grad_accum_steps={accum}), "
    elif tcfg.batch_size == 1:  # one sequence already: only the sequence or the model can shrink
        first = f"The micro-batch is one sequence already: lower block_size (now {block_size}) or the model size, "
    else:
        first = f"Not even one sequence fits: lower block_size (now {block_size}) or the model size, "
    return f"{head} {first}set grad_checkpoint=True in the model config, or use dtype='bf16'."


def _smaller_micro_batch(global_batch: int, limit: int) -> tuple[int, int]:
    """(micro-batch, grad_accum_steps) with a micro-batch of at most `limit` that keeps the global
    batch: its largest divisor from limit / 2 up, else `limit` with the global batch rounded up."""
    if limit < 1:
        return 0, 0
    small = range(1, min(math.isqrt(global_batch), 10**6) + 1)
    divisors = {d for i in small if global_batch % i == 0 for d in (i, global_batch // i)}
    best = max(d for d in divisors if d <= limit)  # 1 always qualifies
    if 2 * best >= limit:
        return best, global_batch // best
    return limit, -(-global_batch // limit)


def _largest(ok: Callable[[int], bool], upper: int) -> int:
    """The largest n in [1, upper) with ok(n), 0 if none; ok must hold up to some n and fail above it."""
    lo, hi = 0, upper
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _num_params(mcfg: ModelConfig) -> int:
    return model_shape(mcfg).num_params()


def checkpoint_bytes(mcfg: ModelConfig, tcfg: TrainConfig) -> int:
    """A generous estimate of the disk a run's checkpoints take: best + last + one being written."""
    tensors_per_param = 1 + 2 + (1 if tcfg.ema else 0)  # weights, two optimiser moments, EMA weights
    return (
        int(3 * tensors_per_param * 4 * _num_params(mcfg) * 1.1) + 16 * 2**20
    )  # fp32; the margin holds histories and CSVs


def check_fits(config) -> None:
    """`check_memory` for a RunConfig on the device its TrainConfig names: what a notebook's parameter
    cell calls, so `-p batch_size 1e9` fails there, before the stage archives its previous results."""
    device = hardware.select_device(config.train.device)
    check_memory(
        config.model, config.train, device, hardware.resolve_dtype(config.train.dtype, device), hardware.Dist()
    )
