"""The training loop: `train(config: RunConfig, data: PreparedData, out_dir) -> Run`, read top to bottom like nanoGPT's
train.py. `run_loop` holds one whole iteration:

    lr for this step -> the global batch -> per micro-batch: forward under autocast, backward (gradients accumulated;
    under DDP only the last micro-batch all-reduces) -> unscale and clip -> step every optimiser (AdamW, or Muon plus
    AdamW), update the fp16 scaler, zero the gradients -> EMA -> count the step -> on their intervals: log (the one
    host sync), evaluate on fixed batches (keep the best), checkpoint -> stop on max_steps, max_tokens, early
    stopping or the time budget.

Around it: `build` makes the fixed `Setup` and the `Learner` (model, optimisers, scaler, EMA, batches) in an order
that fixes the RNG draws; `restore` resumes everything a step depends on from checkpoints/last, so a resumed run
repeats an uninterrupted one exactly; `train_to_the_end` writes summary.json however the run ends. Where the run
stands is one `TrainState`, saved in every checkpoint; what it records is one `Log`. The checks that stop a run with
a message naming the fix (inputs, the run folder, lost DDP ranks, out of memory, a non-finite loss, a full disk) live
in `labutils.guards`.

DDP under torchrun (collectives on every rank, only rank 0 writes), and
`python -m labutils.training --config run.json` on the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import hardware, memory
from .batches import IGNORE_INDEX, DocumentBatches, StreamBatches, eval_batches, tiled_batches
from .checkpoints import find_checkpoint, load_checkpoint, save_checkpoint
from .config import RunConfig, TrainConfig
from .data import PreparedData, as_prepared
from .evaluation import EVAL_COLUMNS, HISTORY_COLUMNS, Run, check_checkpoint_fits_data, evaluate, evaluate_batches
from .files import RunLock, atomic_write_json, display_path, repo_path
from .guards import (
    check_finite,
    check_inputs,
    check_ranks_resume_alike,
    checkpoint_write_fails,
    claim_run_folder,
    eval_oom_message,
    out_of_memory_stops,
    stop_when_a_rank_is_lost,
)
from .memory import check_memory, checkpoint_bytes, oom_message
from .model import GPT, ModelConfig
from .model.hf import pretrained_weights
from .model.utils import freeze
from .optim import EMA, Muon, lr_factor, param_groups, set_lr
from .tracking import CLI_HELP as TRACKING_HELP
from .tracking import Sinks
from .tracking import use as use_trackers
from .validation import ConfigError, TrainingError

__all__ = [
    "Run",
    "TrainConfig",
    "TrainState",
    "TrainingError",
    "build_optimizers",
    "evaluate",
    "forward_backward",
    "main",
    "train",
]

OnEval = Callable[[int, dict], None]
# the train split moves to the accelerator only when it takes at most this share of the memory free there
DATA_ON_DEVICE_SHARE = 0.25


# --------------------------------------------------------------------------- what the loop works with


@dataclass
class TrainState:
    """Where a run stands. Saved in every checkpoint as "progress" (a plain dict with these keys)."""

    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0  # training time: evaluation and checkpointing left out
    best_val: float = math.inf
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the last new best (early stopping)
    grad_spikes: list[int] = field(default_factory=list)  # steps whose gradient norm spiked
    throughput: list[list[float]] = field(default_factory=list)  # (tokens/s, MFU) per log window, kept across resumes


@dataclass
class Setup:
    """What stays fixed for the whole run: the configs, where it runs and writes, and what it is measured on."""

    mcfg: ModelConfig
    tcfg: TrainConfig
    out_dir: Path
    tokenizer_file: Path  # copied into every checkpoint
    ddp: hardware.Dist
    device: torch.device
    dtype: torch.dtype
    val_batches: list[tuple[torch.Tensor, torch.Tensor]]
    token_bytes: torch.Tensor  # UTF-8 bytes per token id, on the device: the evaluations' bits per byte
    flops_per_token: float
    peak_flops: float | None

    def __post_init__(self) -> None:
        self.autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        tcfg = self.tcfg
        # global: every rank, every micro-batch
        self.tokens_per_step = tcfg.batch_size * tcfg.grad_accum_steps * self.mcfg.block_size * self.ddp.world_size
        token_steps = tcfg.max_tokens and math.ceil(tcfg.max_tokens / self.tokens_per_step)
        horizons = [h for h in (tcfg.max_steps, token_steps) if h]
        self.total_steps: int | None = min(horizons) if horizons else None  # None: the schedule follows the time budget
        self.use_compile: bool = tcfg.compile if tcfg.compile is not None else self.device.type == "cuda"
        self.ckpt_dir = self.out_dir / "checkpoints"


@dataclass
class Learner:
    """The model and what changes it each step; a checkpoint restores all of it."""

    raw_model: GPT  # the GPT itself: what is saved, evaluated and averaged
    optimizers: list[torch.optim.Optimizer]
    scaler: torch.amp.GradScaler  # fp16 only; a no-op otherwise
    ema: EMA | None
    sampler: Any  # StreamBatches, DocumentBatches, or a rank's slice of either; its position is checkpointed
    model: nn.Module | None = None  # raw_model compiled and/or in DDP: what the training steps run

    def __post_init__(self) -> None:
        self.params = [p for p in self.raw_model.parameters() if p.requires_grad]  # the trainable ones, to clip


@dataclass
class Log:
    """What the run records (per step, per evaluation, to the sinks) and its clocks: elapsed_s and tokens/s leave out
    evaluation and saving. Losses of the steps since the last host sync wait here on the device."""

    bar: Any  # tqdm
    sinks: Sinks | None  # rank 0: metrics.csv, evals.csv and the trackers asked for
    history: list[dict]  # one row per step (metrics.csv)
    evals: list[dict]  # one row per evaluation (evals.csv)
    elapsed_before: float  # training time of earlier calls (a resumed run)
    start: float = field(default_factory=time.perf_counter)  # when this call's loop started
    opened: float = field(default_factory=time.perf_counter)  # when the log window opened: tokens/s counts from here
    paused_s: float = 0.0  # seconds spent evaluating and checkpointing since `start`
    losses: list[torch.Tensor] = field(default_factory=list)  # per step: (loss, grad_norm) on the device
    lr_mults: list[float] = field(default_factory=list)
    postfix: dict[str, str] = field(default_factory=dict)
    stop_reason: str | None = None

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, lr_mult: float) -> None:
        """A step to log at the next flush, kept on the device until then."""
        self.losses.append(torch.stack([loss.float(), grad_norm.float().to(loss.device)]))
        self.lr_mults.append(lr_mult)
        self.bar.update(1)

    def training_time(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start - self.paused_s

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - started

    def show(self, key: str, value: float) -> None:
        self.postfix[key] = f"{value:.4f}"
        self.bar.set_postfix(self.postfix, refresh=False)


# --------------------------------------------------------------------------- train()


def train(
    config: RunConfig,
    data: PreparedData,
    out_dir: str | Path,
    *,
    resume: bool = True,
    progress: bool = True,
    on_eval: OnEval | None = None,
) -> Run:
    """Train `config` on prepared data into `out_dir`; resume from out_dir/checkpoints/last if present.

    The configs arrive typed and checked (`RunConfig.build` takes the loose spellings, `as_prepared` a
    folder), so the loop checks only what depends on the data: the model's vocabulary covers it.
    Under torchrun the same call runs DDP (rank 0 writes the files). `on_eval(step, metrics)` is
    called after every evaluation (on every rank, with the same metrics); an exception it raises
    (e.g. optuna.TrialPruned) stops the run and propagates. Returns the Run with per-step history,
    evaluations and summary.
    """
    check_inputs(config, data)
    mcfg, tcfg = config.model, config.train
    out_dir = repo_path(out_dir)
    ddp, device = hardware.init_distributed(hardware.select_device(tcfg.device))
    lock = RunLock(out_dir)
    try:
        claim_run_folder(ddp, out_dir, lock, checkpoint_bytes(mcfg, tcfg))
        with hardware.deterministic(tcfg.deterministic), stop_when_a_rank_is_lost(ddp, out_dir):
            setup, learner = build(mcfg, tcfg, data, out_dir, device, ddp)
            restored = restore(setup, learner, data) if resume else None
            check_ranks_resume_alike(ddp, restored[0].step if restored else None, out_dir)
            if not restored and ddp.enabled:
                torch.manual_seed(tcfg.seed + ddp.rank)  # distinct dropout masks per rank; init already shared
            state, history, evals = restored or (TrainState(), [], [])
            sinks = prepare_run_folder(setup, data, state, history, evals, resumed=restored is not None)
            learner.model = compile_and_wrap(setup, learner.raw_model)
            bar = hardware.progress_bar(
                total=setup.total_steps,
                initial=state.step,
                disable=not (progress and ddp.is_main),
                desc=out_dir.name,
                dynamic_ncols=True,
            )
            log = Log(bar, sinks, history, evals, elapsed_before=state.elapsed_s)
            return train_to_the_end(setup, learner, state, log, on_eval)
    finally:
        lock.release()
        hardware.cleanup_distributed(ddp)


# --------------------------------------------------------------------------- the loop


def run_loop(setup: Setup, learner: Learner, state: TrainState, log: Log, on_eval: OnEval | None) -> None:
    """Train until a stop reason (left in log.stop_reason): one optimiser step per iteration, then logging,
    evaluation and checkpointing on their intervals. Losses stay on the device until a log step, so nothing waits
    on the host between steps (except fp16's gradient scaler, which checks for infinities each step)."""
    tcfg, model, scaler, optimizers = setup.tcfg, learner.model, learner.scaler, learner.optimizers
    smoothing = {"label_smoothing": tcfg.label_smoothing} if tcfg.label_smoothing else {}
    log.stop_reason = stop_reason(setup, state, log_step=True)
    while log.stop_reason is None:
        # the step: the LR for it, the global batch, forward and backward per micro-batch, clip, update the weights
        lr_mult = lr_at(setup, state)
        set_lr(optimizers, lr_mult)
        with out_of_memory_stops(lambda: oom_message(tcfg, setup.mcfg.block_size, setup.device, step=state.step + 1)):
            micro_batches = next_global_batch(learner.sampler, tcfg.grad_accum_steps, setup.device)
            loss = None  # the global batch's mean loss, on the device
            for i, ((x, y), weight) in enumerate(zip(micro_batches, loss_weights(model, micro_batches), strict=True)):
                with grad_sync(model, last=i == len(micro_batches) - 1):
                    with setup.autocast:
                        _, micro_loss = model(x, y, **smoothing)
                    micro_loss = micro_loss * weight
                    scaler.scale(micro_loss).backward()
                loss = micro_loss.detach() if loss is None else loss + micro_loss.detach()
            grad_norm = unscale_and_clip(learner, tcfg.grad_clip)
            for opt in optimizers:
                scaler.step(opt)  # fp16: skipped when the gradients overflowed
            scaler.update()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        if learner.ema is not None:
            learner.ema.update(learner.raw_model)

        # where the run stands
        state.step += 1
        state.tokens += setup.tokens_per_step
        state.elapsed_s = log.training_time()
        log.add(loss, grad_norm, lr_mult)

        # on their intervals, and when the run stops: log (the one host sync), evaluate, checkpoint
        log_step = state.step % tcfg.log_interval == 0
        log.stop_reason = stop_reason(setup, state, log_step)
        eval_step = state.step % tcfg.eval_interval == 0 or log.stop_reason is not None
        ckpt_step = state.step % (tcfg.checkpoint_interval or tcfg.eval_interval) == 0 or log.stop_reason is not None
        if log_step or eval_step or ckpt_step:
            flush(setup, state, log)  # before any eval or save, so a non-finite loss is never checkpointed
        if eval_step:
            evaluate_and_keep_best(setup, learner, state, log, on_eval)
            log.stop_reason = log.stop_reason or stop_reason(setup, state, log_step=False)
            ckpt_step = ckpt_step or log.stop_reason is not None
        if ckpt_step:
            with log.paused():
                save(setup, learner, state, log, "last", learner.raw_model.state_dict())
        if eval_step or ckpt_step:
            log.opened = time.perf_counter()  # evaluation and saving are not training throughput


def lr_at(setup: Setup, state: TrainState) -> float:
    """The LR factor: a pure function of the step (or of the time used, when the run is a time budget)."""
    tcfg = setup.tcfg
    return lr_factor(
        state.step,
        setup.total_steps,
        schedule=tcfg.schedule,
        warmup_steps=tcfg.warmup_steps,
        min_lr_ratio=tcfg.min_lr_ratio,
        decay_frac=tcfg.decay_frac,
        progress=state.elapsed_s / tcfg.time_budget_s if setup.total_steps is None else None,
    )


def next_global_batch(sampler, n_micro: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro-batches of the next global batch, on the device (copied there when the train split stays on
    the host: see `choose_data_device`)."""
    micro_batches = [next(sampler) for _ in range(n_micro)]
    if micro_batches[0][0].device.type == device.type:
        return micro_batches
    return [(x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in micro_batches]


def loss_weights(model: nn.Module, micro_batches) -> list[torch.Tensor]:
    """Each micro-batch's weight, so that the accumulated gradient is that of the mean loss over every counted target
    of the global batch: its share of the counted targets (ignored ones, -100, such as document-mode padding, count
    for nothing). Under DDP the count is summed over ranks (a collective on the device, not a host sync) and the
    weight multiplied by the world size, which DDP's averaging of the summed gradients divides out again."""
    counts = [(y != IGNORE_INDEX).sum() for _, y in micro_batches]
    total_count = torch.stack(counts).sum().float()
    world = 1
    if isinstance(model, DDP) and dist.is_initialized():
        dist.all_reduce(total_count)
        world = dist.get_world_size()
    total_count = total_count.clamp(min=1)
    return [count * world / total_count for count in counts]


def grad_sync(model: nn.Module, *, last: bool):
    """DDP all-reduces gradients on the last micro-batch's backward only; the others accumulate locally."""
    return model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext()


def unscale_and_clip(learner: Learner, grad_clip: float) -> torch.Tensor:
    """The gradient norm, measured (and clipped when grad_clip > 0) on the true gradients, not the fp16-scaled ones."""
    for opt in learner.optimizers:
        learner.scaler.unscale_(opt)
    if grad_clip > 0:
        return nn.utils.clip_grad_norm_(learner.params, grad_clip)
    return nn.utils.get_total_norm([p.grad for p in learner.params if p.grad is not None])


def forward_backward(
    model: nn.Module, micro_batches, *, autocast, scaler=None, label_smoothing: float = 0.0
) -> torch.Tensor:
    """The micro-batch part of `run_loop`'s step on its own (for benchmarks and tests): accumulate gradients over
    micro-batches weighted by `loss_weights`; return the batch's mean loss as a device tensor (no sync)."""
    kwargs = {"label_smoothing": label_smoothing} if label_smoothing else {}
    total = None
    for i, ((x, y), weight) in enumerate(zip(micro_batches, loss_weights(model, micro_batches), strict=True)):
        with grad_sync(model, last=i == len(micro_batches) - 1):
            with autocast:
                _, loss = model(x, y, **kwargs)
            loss = loss * weight
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total


def stop_reason(setup: Setup, state: TrainState, log_step: bool) -> str | None:
    tcfg = setup.tcfg
    if tcfg.max_steps is not None and state.step >= tcfg.max_steps:
        return "max_steps"
    if tcfg.max_tokens is not None and state.tokens >= tcfg.max_tokens:
        return "max_tokens"
    if tcfg.early_stopping_patience is not None and state.bad_evals >= tcfg.early_stopping_patience:
        return "early_stopping"
    # under DDP the ranks must agree on the clock, which costs a sync: only checked at log steps
    if (
        tcfg.time_budget_s is not None
        and (log_step or not setup.ddp.enabled)
        and hardware.all_ranks_agree(setup.ddp, state.elapsed_s >= tcfg.time_budget_s, setup.device)
    ):
        return "time_budget"
    return None


def flush(setup: Setup, state: TrainState, log: Log) -> None:
    """The one host sync per log window: log the steps since the last flush, and stop on a non-finite loss."""
    ddp = setup.ddp
    stats = torch.stack(log.losses)
    if ddp.enabled:
        dist.all_reduce(stats)
        stats /= ddp.world_size
    values = stats.tolist()  # the host sync: tokens/s counts the time the device took
    tokens_per_s = len(log.losses) * setup.tokens_per_step / max(time.perf_counter() - log.opened, 1e-9)
    peak = setup.peak_flops
    mfu = tokens_per_s * setup.flops_per_token / (peak * ddp.world_size) if peak else math.nan
    first, memory = state.step - len(log.losses) + 1, hardware.peak_memory_mb(setup.device)
    rows = [
        {
            "step": first + i,
            "tokens": (first + i) * setup.tokens_per_step,
            "train_loss": loss,
            "lr": mult * setup.tcfg.lr,
            "grad_norm": norm,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu,
            "peak_memory_mb": memory,
            "elapsed_s": state.elapsed_s,
        }
        for i, ((loss, norm), mult) in enumerate(zip(values, log.lr_mults, strict=True))
    ]
    log.losses.clear()
    log.lr_mults.clear()
    check_finite(rows, setup.ckpt_dir)
    log_grad_spikes(setup, state, log.history, rows)
    log.history.extend(rows)
    if ddp.is_main:
        log.sinks.log_steps(rows)
    log.show("loss", rows[-1]["train_loss"])
    state.throughput.append([tokens_per_s, mfu])
    log.opened = time.perf_counter()


def log_grad_spikes(setup: Setup, state: TrainState, history: list[dict], rows: list[dict]) -> None:
    """Warn about (and record) gradient norms far above the recent median, such as an fp16 overflow."""
    recent = [r["grad_norm"] for r in history[-100:] if math.isfinite(r["grad_norm"])]
    if len(recent) < 20:  # too few steps to know what is typical
        return
    typical = statistics.median(recent)
    for row in rows:
        if row["grad_norm"] <= setup.tcfg.grad_spike_factor * typical:  # False for inf and NaN too
            continue
        state.grad_spikes.append(row["step"])
        overflow = setup.dtype == torch.float16 and not math.isfinite(row["grad_norm"])  # fp16: the scaler is on
        cause = " (fp16 overflow: the gradient scaler skipped this step)" if overflow else ""
        if setup.ddp.is_main:
            warnings.warn(
                f"gradient norm spike at step {row['step']}: {row['grad_norm']:.3g} against a median of "
                f"{typical:.3g} over the last {len(recent)} steps{cause}",
                stacklevel=2,
            )


def evaluate_and_keep_best(setup: Setup, learner: Learner, state: TrainState, log: Log, on_eval: OnEval | None) -> None:
    """Evaluate on the fixed batches (and with EMA weights), keep the best checkpoint, then call on_eval."""
    ema, raw_model = learner.ema, learner.raw_model
    row = {"step": state.step, "tokens": state.tokens}
    with log.paused():
        # eager: eval mode and eval batch shapes would only make the compiled training graph recompile
        batch_size = setup.tcfg.eval_batch_size or setup.tcfg.batch_size
        oom = lambda: eval_oom_message(state.step, setup.device, batch_size, setup.mcfg.block_size)  # noqa: E731
        measure = dict(autocast=setup.autocast, ddp=setup.ddp, token_bytes=setup.token_bytes)
        with out_of_memory_stops(oom):
            raw = evaluate_batches(raw_model, setup.val_batches, **measure)
        row.update(val_loss=raw["loss"], val_ppl=raw["ppl"], val_accuracy=raw["accuracy"], val_bpb=raw["bpb"])
        if ema is not None:
            with ema.applied(raw_model):
                averaged = evaluate_batches(raw_model, setup.val_batches, **measure)
            row.update(
                val_loss_ema=averaged["loss"],
                val_ppl_ema=averaged["ppl"],
                val_accuracy_ema=averaged["accuracy"],
                val_bpb_ema=averaged["bpb"],
            )
        log.evals.append(row)
        if setup.ddp.is_main:
            log.sinks.log_eval(row)
        monitored = row["val_loss_ema"] if ema is not None else row["val_loss"]
        if monitored < state.best_val:
            state.best_val, state.best_step, state.bad_evals = monitored, state.step, 0
            weights = ema.model_state_dict(raw_model) if ema is not None else raw_model.state_dict()
            save(setup, learner, state, log, "best", weights)
        else:
            state.bad_evals += 1
        log.show("val", monitored)
    if on_eval is not None:
        on_eval(state.step, dict(row))


def save(setup: Setup, learner: Learner, state: TrainState, log: Log, which: str, model_state: dict) -> None:
    """Write checkpoints/<which>. Gathering RNG states is collective, so every rank calls this; only rank 0 writes."""
    if not setup.tcfg.checkpoints:
        return
    rng = hardware.gather_objects(setup.ddp, hardware.rng_state(setup.device))
    if not setup.ddp.is_main:
        return
    trainer_state = {
        "progress": dataclasses.asdict(state),
        "optimizers": [o.state_dict() for o in learner.optimizers],
        "scaler": learner.scaler.state_dict(),
        "ema": learner.ema.state_dict() if learner.ema is not None else None,
        "sampler": learner.sampler.state_dict(),
        "rng": rng,
        "history": log.history,
        "evals": log.evals,
        "world_size": setup.ddp.world_size,
        "train_config": setup.tcfg.to_dict(),
        "weights": "ema" if which == "best" and learner.ema is not None else "raw",
    }
    with checkpoint_write_fails(setup.ckpt_dir, which, state.step):
        save_checkpoint(
            setup.ckpt_dir / which,
            model_state=model_state,
            model_config=setup.mcfg.to_dict(),
            trainer_state=trainer_state,
            tokenizer_file=setup.tokenizer_file,
        )


# --------------------------------------------------------------------------- however it ends: summary.json


def train_to_the_end(setup: Setup, learner: Learner, state: TrainState, log: Log, on_eval: OnEval | None) -> Run:
    """Run the loop (after an evaluation at step 0 when fine-tuning) and write summary.json however it ends."""
    status = "completed"
    try:
        if setup.tcfg.init_from and state.step == 0:
            # where the pretrained weights start on this data: the evaluation at step 0
            evaluate_and_keep_best(setup, learner, state, log, on_eval)
        run_loop(setup, learner, state, log, on_eval)
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except BaseException as exc:
        status = f"failed: {type(exc).__name__}: {exc}"
        raise
    finally:
        log.bar.close()
        summary = summarize(setup, learner, state, log, status)
        if setup.ddp.is_main:
            atomic_write_json(setup.out_dir / "summary.json", summary)
            log.sinks.finish(summary, [setup.out_dir / "config.json", setup.out_dir / "summary.json"])
    history = pd.DataFrame(log.history, columns=HISTORY_COLUMNS)
    return Run(setup.out_dir, history, pd.DataFrame(log.evals, columns=EVAL_COLUMNS), summary)


def summarize(setup: Setup, learner: Learner, state: TrainState, log: Log, status: str) -> dict[str, Any]:
    """summary.json: how the run ended, its best and last evaluation, throughput and the machine (strict JSON)."""
    tcfg = setup.tcfg
    summary = {
        "status": status,
        "stop_reason": log.stop_reason,
        "steps": state.step,
        "tokens": state.tokens,
        "elapsed_s": state.elapsed_s,
        "best_step": state.best_step,
        "best_val_loss": state.best_val if math.isfinite(state.best_val) else None,
        "best_weights": "ema" if learner.ema is not None else "raw",
        **{k: v for k, v in (log.evals[-1] if log.evals else {}).items() if k not in ("step", "tokens")},
        "train_loss": log.history[-1]["train_loss"] if log.history else None,
        **_throughput(state.throughput),
        "peak_memory_mb": hardware.peak_memory_mb(setup.device),
        "num_params": learner.raw_model.num_params(),
        "flops_per_token": setup.flops_per_token,
        "device": str(setup.device),
        "device_name": hardware.device_name(setup.device),
        "dtype": str(setup.dtype).removeprefix("torch."),
        "compile": setup.use_compile,
        "compile_mode": tcfg.compile_mode if setup.use_compile else None,
        "world_size": setup.ddp.world_size,
        "seed": tcfg.seed,
        "grad_spikes": len(state.grad_spikes),
        "grad_spike_steps": state.grad_spikes[:50],
    }
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in summary.items()}


def _throughput(windows: list[list[float]]) -> dict[str, float]:
    """Median tokens/s and MFU over log windows, leaving out the first (compilation, warm-up)."""
    steady = windows[1:] or windows

    def median(values: list[float]) -> float:
        return statistics.median(values) if values else math.nan

    return {"tokens_per_s": median([t for t, _ in steady]), "mfu": median([m for _, m in steady if not math.isnan(m)])}


# --------------------------------------------------------------------------- setup


def build(
    mcfg: ModelConfig, tcfg: TrainConfig, data: PreparedData, out_dir: Path, device: torch.device, ddp: hardware.Dist
) -> tuple[Setup, Learner]:
    """Everything a fresh run starts from. The order is part of the result: it fixes the RNG draws."""
    dtype = hardware.resolve_dtype(tcfg.dtype, device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls autocast leaves
        torch.cuda.reset_peak_memory_stats(device)
    check_memory(mcfg, tcfg, device, dtype, ddp)  # before anything big is allocated

    pretrained = pretrained_weights(tcfg.init_from, mcfg) if tcfg.init_from else None  # before seeding: draws nothing
    hardware.seed_everything(tcfg.seed)
    raw_model = GPT(mcfg).to(device)
    if pretrained is not None:
        raw_model.load_state_dict(pretrained)
    if tcfg.freeze:
        freeze(raw_model, *tcfg.freeze)
    optimizers = build_optimizers(raw_model, tcfg, fused=device.type == "cuda")
    ema = EMA(raw_model, tcfg.ema) if tcfg.ema else None
    block = mcfg.block_size
    data_device = choose_data_device(tcfg, data, device)
    pin_memory = data_device != device and device.type == "cuda"
    sampler = make_sampler(tcfg, data, block, ddp, data_device, pin_memory=pin_memory)
    eval_size = {"n_tokens": tcfg.eval_tokens} if tcfg.eval_tokens else {"n_batches": tcfg.eval_batches}
    eval_size_batch = tcfg.eval_batch_size or tcfg.batch_size
    val_batches = (
        tiled_batches(data.tokens(tcfg.eval_split), block, eval_size_batch, device=device)
        if tcfg.eval_full
        else eval_batches(data.tokens(tcfg.eval_split), block, eval_size_batch, **eval_size, device=device)
    )
    setup = Setup(
        mcfg=mcfg,
        tcfg=tcfg,
        out_dir=out_dir,
        tokenizer_file=Path(data.dir) / "tokenizer.json",
        ddp=ddp,
        device=device,
        dtype=dtype,
        val_batches=val_batches,
        token_bytes=torch.as_tensor(data.token_bytes, device=device),
        flops_per_token=raw_model.flops_per_token(),
        peak_flops=hardware.peak_flops(device, dtype),
    )
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return setup, Learner(raw_model, optimizers, scaler, ema, sampler)


def build_optimizers(model: nn.Module, cfg: TrainConfig, *, fused: bool = False) -> list[torch.optim.Optimizer]:
    """AdamW over all parameters, or with optimizer='muon' Muon for hidden matrices plus AdamW for the rest.

    Parameter groups (no weight decay on norms, biases and embeddings; layer-wise LR decay) come
    from `labutils.optim.param_groups`; `cfg.lr` and `cfg.betas` reach AdamW here.
    """
    adamw_groups, muon_groups = param_groups(
        model,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        layer_lr_decay=cfg.layer_lr_decay,
        muon_lr=cfg.muon_lr if cfg.optimizer == "muon" else None,
    )
    optimizers: list[torch.optim.Optimizer] = []
    if adamw_groups:
        optimizers.append(torch.optim.AdamW(adamw_groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None))
    if muon_groups:
        optimizers.append(Muon(muon_groups, lr=cfg.muon_lr, momentum=cfg.muon_momentum))
    return optimizers


def choose_data_device(tcfg: TrainConfig, data: PreparedData, device: torch.device) -> torch.device:
    """Where the train split lives: on the accelerator (in its stored width) when asked and when it takes at
    most DATA_ON_DEVICE_SHARE of the memory free there; else memory-mapped on the host, sent a batch at a time."""
    if device.type == "cpu" or not tcfg.data_on_device:
        return torch.device("cpu")
    available = memory.available_memory_bytes(device)
    needed = data.tokens("train").nbytes  # its stored width: what StreamBatches uploads
    if available is not None and needed > DATA_ON_DEVICE_SHARE * available:
        warnings.warn(
            f"the train split ({needed / 2**30:.1f} GiB) is over {DATA_ON_DEVICE_SHARE:.0%} of the "
            f"{available / 2**30:.1f} GiB "
            f"free on {device}: it stays memory-mapped on the host and each batch is sent from pinned memory",
            stacklevel=2,
        )
        return torch.device("cpu")
    return device


def make_sampler(
    tcfg: TrainConfig,
    data: PreparedData,
    block_size: int,
    ddp: hardware.Dist,
    device: torch.device,
    pin_memory: bool = False,
):
    """The training batches: every rank draws the global batch from one seed and keeps its slice."""
    global_batch = tcfg.batch_size * ddp.world_size
    if tcfg.batch_mode == "document":
        sampler = DocumentBatches(
            data.tokens("train"),
            data.doc_starts("train"),
            block_size,
            global_batch,
            pad_id=data.pad_id,
            seed=tcfg.seed,
            device=device,
        )
    else:
        sampler = StreamBatches(
            data.tokens("train"), block_size, global_batch, seed=tcfg.seed, device=device, pin_memory=pin_memory
        )
    return hardware.RankSlice(sampler, ddp.rank, ddp.world_size) if ddp.enabled else sampler


def restore(setup: Setup, learner: Learner, data: PreparedData) -> tuple[TrainState, list[dict], list[dict]] | None:
    """Load checkpoints/last, if there is one, into the learner (model, optimisers, scaler, EMA, data position) and
    the RNG; return the progress, the per-step history and the evaluations it holds (None: nothing to resume)."""
    last = find_checkpoint(setup.ckpt_dir / "last")
    if last is None:
        return None
    ckpt = load_checkpoint(last, map_location="cpu")
    if ckpt["config"] != setup.mcfg.to_dict():
        raise TrainingError(
            f"{last} holds a different model config than this run's; use another out_dir or resume=False"
        )
    check_checkpoint_fits_data(last, setup.mcfg.vocab_size, data)
    saved = ckpt["trainer"]
    changed = sorted(k for k, v in setup.tcfg.to_dict().items() if saved["train_config"].get(k) != v)
    if changed and setup.ddp.is_main:
        warnings.warn(f"resuming {setup.out_dir} with changed training settings {changed}", stacklevel=2)
    learner.raw_model.load_state_dict(ckpt["model"])
    for opt, opt_state in zip(learner.optimizers, saved["optimizers"], strict=False):
        opt.load_state_dict(opt_state)
    learner.scaler.load_state_dict(saved["scaler"])
    if learner.ema is not None and saved["ema"] is not None:
        learner.ema.load_state_dict(saved["ema"])
    learner.sampler.load_state_dict(saved["sampler"])
    rng = saved["rng"]  # one entry per rank
    hardware.set_rng_state(rng[setup.ddp.rank] if len(rng) == setup.ddp.world_size else rng[0], setup.device)
    known = {f.name for f in dataclasses.fields(TrainState)}
    state = TrainState(**{k: v for k, v in saved["progress"].items() if k in known})
    return state, list(saved["history"]), list(saved["evals"])


def prepare_run_folder(
    setup: Setup, data: PreparedData, state: TrainState, history: list[dict], evals: list[dict], *, resumed: bool
) -> Sinks | None:
    """Rank 0 writes config.json, environment.json and the CSVs (a fresh run first clears an old one's files), and
    returns the sinks the run logs to (csv, and the trackers asked for); other ranks write nothing."""
    if not setup.ddp.is_main:
        return None
    if not resumed:
        for stale in ("metrics.csv", "evals.csv", "summary.json"):
            (setup.out_dir / stale).unlink(missing_ok=True)
        shutil.rmtree(setup.ckpt_dir, ignore_errors=True)
    config = {"model": setup.mcfg.to_dict(), "train": setup.tcfg.to_dict(), "data": display_path(data.dir)}
    atomic_write_json(setup.out_dir / "config.json", config)
    sinks = Sinks(setup.out_dir, config, state.step if resumed else 0, history, evals)
    env = hardware.environment(setup.device, setup.tcfg.seed, setup.ddp)
    atomic_write_json(
        setup.out_dir / "environment.json",
        {**env, "dtype": str(setup.dtype).removeprefix("torch."), "resumed_from_step": state.step or None},
    )
    return sinks


def compile_and_wrap(setup: Setup, raw_model: GPT) -> nn.Module:
    """The model the steps run: compiled (by default on CUDA) and, under torchrun, in DDP."""
    tcfg = setup.tcfg
    mode = None if tcfg.compile_mode == "default" else tcfg.compile_mode
    model = raw_model
    if setup.use_compile and tcfg.compile_blocks:
        for block in raw_model.blocks:  # in place: the blocks share one compiled graph, the state_dict keeps its names
            block.compile(mode=mode)
    elif setup.use_compile:
        model = torch.compile(raw_model, mode=mode)
    if setup.ddp.enabled:
        model = DDP(model, device_ids=[setup.device.index] if setup.device.type == "cuda" else None)
    model.train()
    return model


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> Run:
    parser = argparse.ArgumentParser(
        prog="python -m labutils.training",
        description="Train a GPT from a run.json: "
        '{"model": {...} or {"preset": name, ...}, "train": {...}, '
        '"data": "<prepared dir>", "out_dir": "..."}',
    )
    parser.add_argument("--config", required=True, help="run.json")
    parser.add_argument("--no-resume", action="store_true", help="start over even if out_dir has a checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--tracking", help=TRACKING_HELP)
    args = parser.parse_args(argv)
    use_trackers(args.tracking)
    spec = json.loads(Path(args.config).read_text())
    keys = {"model", "train", "data", "out_dir"}
    if not isinstance(spec, dict) or set(spec) - keys or {"model", "data", "out_dir"} - set(spec):
        raise ConfigError(
            f"{args.config}: expected keys {sorted(keys)} ('train' optional), "
            f"got {sorted(spec) if isinstance(spec, dict) else spec!r}"
        )
    data = spec["data"]
    if isinstance(data, dict):  # {"corpus": ..., "tokenizer": ...}: prepare (or reuse) it first
        from .data import prepare_data

        data = prepare_data(**data)
    data = as_prepared(data) if isinstance(data, (str, Path)) else data
    config = RunConfig.build(spec["model"], spec.get("train"), data.vocab_size, context=f"{args.config}: ")
    run = train(config, data, spec["out_dir"], resume=not args.no_resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in run.summary.items() if k != "model"}, indent=2, default=str))
    return run


if __name__ == "__main__":
    main()
