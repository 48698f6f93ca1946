"""The training loop: `train(config: RunConfig, data: PreparedData, out_dir) -> Run`, read top to bottom like nanoGPT's train.py.

1. setup: device and dtype, a check that one step fits in memory (before anything big is allocated),
   the model, the optimisers (`build_optimizers`: AdamW, or Muon plus AdamW, built from the
   TrainConfig), EMA, the batch sampler and the fixed evaluation batches. What the loop works with
   is one `Trainer`; where the run stands is one `TrainState`, saved in every checkpoint.
2. resume: everything a step depends on (weights, optimisers, scaler, EMA, data position, RNG,
   progress, history) from checkpoints/last, so a resumed run repeats an uninterrupted one exactly.
3. the loop: batch -> forward under autocast -> backward (accumulated) -> clip -> step -> schedule,
   then log / evaluate on fixed batches every `eval_interval` steps / checkpoint. Losses stay on the
   device until a log step, so nothing waits on the host between steps (except fp16's gradient
   scaler, which checks for infinities each step; bf16 needs no scaler).
4. summary: summary.json, also when the run fails or is interrupted.

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
from collections.abc import Callable
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
from .errors import CheckpointError, ConfigError, TrainingError
from .evaluation import EVAL_COLUMNS, HISTORY_COLUMNS, Run, check_checkpoint_fits_data, evaluate, evaluate_batches
from .files import RunLock, atomic_write_json, check_disk_space, check_writable
from .memory import check_memory, checkpoint_bytes, oom_message
from .model import GPT, ModelConfig
from .model.utils import freeze
from .optim import EMA, Muon, lr_factor, param_groups, set_lr
from .paths import display_path, repo_path
from .pretrained import pretrained_weights
from .tracking import CLI_HELP as TRACKING_HELP
from .tracking import Sinks
from .tracking import use as use_trackers
from .validation import require

__all__ = ["Run", "TrainConfig", "TrainState", "TrainingError", "build_optimizers", "evaluate", "main", "train"]

OnEval = Callable[[int, dict], None]
# the train split moves to the accelerator only when it takes at most this share of the memory free there
DATA_ON_DEVICE_SHARE = 0.25


# --------------------------------------------------------------------------- state


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
class Trainer:
    """What the loop works with: built by `setup`, restored by `restore`, wrapped by `compile_and_wrap`."""

    mcfg: ModelConfig
    tcfg: TrainConfig
    out_dir: Path
    tokenizer_file: Path
    device: torch.device
    ddp: hardware.Dist
    dtype: torch.dtype
    autocast: torch.autocast
    scaler: torch.amp.GradScaler
    raw_model: nn.Module  # the GPT itself: what is saved, evaluated and averaged
    params: list[nn.Parameter]  # the trainable ones, for clipping
    optimizers: list[torch.optim.Optimizer]
    ema: EMA | None
    sampler: Any  # StreamBatches, DocumentBatches, or a rank's slice of either
    data_device: torch.device
    val_batches: list[tuple[torch.Tensor, torch.Tensor]]
    token_bytes: torch.Tensor  # UTF-8 bytes per token id, on the device: the evaluations' bits per byte
    tokens_per_step: int  # global: every rank, every micro-batch
    total_steps: int | None  # None: the schedule follows the time budget
    flops_per_token: float
    peak_flops: float | None
    state: TrainState = field(default_factory=TrainState)
    history: list[dict] = field(default_factory=list)  # one row per step (metrics.csv)
    evals: list[dict] = field(default_factory=list)  # one row per evaluation (evals.csv)
    model: nn.Module | None = None  # raw_model compiled and/or in DDP: what the training steps run
    sinks: Sinks | None = None  # where rank 0 logs steps and evaluations (tracking: metrics.csv, evals.csv, trackers)
    use_compile: bool = False

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"


@dataclass
class LogWindow:
    """The steps since the last host sync, and the clocks: elapsed_s and tokens/s leave out evaluation and saving."""

    bar: Any  # tqdm
    start: float  # when this call's loop started
    elapsed_before: float  # training time of earlier calls (a resumed run)
    opened: float  # when the window opened: tokens/s counts from here
    paused: float = 0.0  # seconds spent evaluating and checkpointing since `start`
    losses: list[torch.Tensor] = field(default_factory=list)  # per step: (loss, grad_norm) on the device
    lr_mults: list[float] = field(default_factory=list)
    postfix: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- train()


def train(config: RunConfig, data: PreparedData, out_dir: str | Path, *,
          resume: bool = True, progress: bool = True, on_eval: OnEval | None = None) -> Run:
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
        error = None
        if ddp.is_main:
            try:
                check_writable(out_dir)
                check_disk_space(out_dir, checkpoint_bytes(mcfg, tcfg))
                lock.acquire()
            except RuntimeError as exc:
                error = str(exc)
        error = hardware.broadcast_object(ddp, error)  # every rank stops, not only rank 0
        if error:
            raise TrainingError(error)
        with hardware.deterministic(tcfg.deterministic), stop_when_a_rank_is_lost(ddp, out_dir):
            trainer = setup(mcfg, tcfg, data, out_dir, device, ddp)
            resumed = resume and restore(trainer, data)
            check_ranks_resume_alike(ddp, trainer.state.step if resumed else None, out_dir)
            if not resumed and ddp.enabled:
                torch.manual_seed(tcfg.seed + ddp.rank)  # distinct dropout masks per rank; init already shared
            prepare_run_folder(trainer, data, resumed)
            compile_and_wrap(trainer)
            return run_loop(trainer, progress=progress, on_eval=on_eval)
    finally:
        lock.release()
        hardware.cleanup_distributed(ddp)


def completed_summary(out_dir: str | Path, config: RunConfig) -> dict[str, Any] | None:
    """The summary of the run that completed in out_dir with this config (the device aside), or None when none did.
    A run completed there with another config is an error: one folder would report two configurations."""
    out_dir = repo_path(out_dir)
    summary_path, config_path = out_dir / "summary.json", out_dir / "config.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if summary.get("status") != "completed" or not config_path.exists():
        return None
    saved, wanted = json.loads(config_path.read_text()), config.to_dict()
    changed = [f"{section}.{k}: {saved[section].get(k)!r} -> {v!r}" for section in ("model", "train")
               for k, v in wanted[section].items() if k != "device" and saved[section].get(k) != v]
    if changed:
        raise ConfigError(f"{display_path(out_dir)} finished with another configuration ({'; '.join(changed)}). "
                          "Use a new out_dir (or archive the old results) instead of mixing configurations.")
    return summary


def check_inputs(config: RunConfig, data: PreparedData) -> None:
    """The two things train() takes typed, named with the call that builds them; the vocabulary against the data."""
    if not isinstance(config, RunConfig):
        raise ConfigError(f"train: expected a RunConfig, got {type(config).__name__}; build one with "
                          "RunConfig.build(model, train, data.vocab_size) (a preset name or field mappings are fine there)")
    if not isinstance(data, PreparedData):
        raise ConfigError(f"train: expected PreparedData, got {type(data).__name__}; open a prepared folder with "
                          "labutils.data.as_prepared(path), or make one with prepare_data(...)")
    require(config.model.vocab_size >= data.vocab_size, "model.vocab_size",
            f"the model has {config.model.vocab_size} token ids but the data uses {data.vocab_size}; set vocab_size={data.vocab_size}")


@contextlib.contextmanager
def stop_when_a_rank_is_lost(ddp: hardware.Dist, out_dir: Path):
    """Under DDP, a collective whose peer died raises on the ranks left (gloo at once; NCCL when its
    watchdog times out): they stop with the dead rank's number and how to resume, instead of a bare
    'Connection closed by peer' or a hang."""
    try:
        yield
    except (TrainingError, ConfigError, CheckpointError):
        raise
    except hardware.DIST_FAILURES as exc:
        if not ddp.enabled or not hardware.is_peer_failure(exc):
            raise
        lost = hardware.lost_ranks(ddp)
        if lost == []:
            raise  # every rank answers: the failure is not a lost rank
        who = f"rank{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))}"
        raise TrainingError(f"rank {ddp.rank}: {who} of {ddp.world_size} stopped answering (its process ended, or its node is "
                            f"unreachable), so this rank stops too. Rerun the same command on every node: it resumes from "
                            f"{display_path(out_dir / 'checkpoints' / 'last')}. "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc


def check_ranks_resume_alike(ddp: hardware.Dist, step: int | None, out_dir: Path) -> None:
    """Every rank must resume from the same checkpoint; on several nodes, a rank that does not see
    out_dir's checkpoint would start over while the others resume, and train on a mix."""
    steps = hardware.gather_objects(ddp, step)
    if len(set(steps)) > 1:
        found = ", ".join(f"rank {r}: {'step ' + str(s) if s is not None else 'no checkpoint'}" for r, s in enumerate(steps))
        raise TrainingError(f"the ranks do not resume alike ({found}). Put out_dir ({display_path(out_dir)}) on a disk every node "
                            "shares, so all read the checkpoint rank 0 writes")


# --------------------------------------------------------------------------- 1. setup


def setup(mcfg: ModelConfig, tcfg: TrainConfig, data: PreparedData, out_dir: Path, device: torch.device, ddp: hardware.Dist) -> Trainer:
    """Everything a fresh run starts from. The order is part of the result: it fixes the RNG draws."""
    dtype = hardware.resolve_dtype(tcfg.dtype, device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls autocast leaves
        torch.cuda.reset_peak_memory_stats(device)
    check_memory(mcfg, tcfg, device, dtype, ddp)

    pretrained = pretrained_weights(tcfg.init_from, mcfg) if tcfg.init_from else None  # before seeding: its reading draws nothing
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
    sampler = make_sampler(tcfg, data, block, ddp, data_device, pin_memory=data_device != device and device.type == "cuda")
    eval_size = {"n_tokens": tcfg.eval_tokens} if tcfg.eval_tokens else {"n_batches": tcfg.eval_batches}
    eval_size_batch = tcfg.eval_batch_size or tcfg.batch_size
    val_batches = (tiled_batches(data.tokens(tcfg.eval_split), block, eval_size_batch, device=device) if tcfg.eval_full
                   else eval_batches(data.tokens(tcfg.eval_split), block, eval_size_batch, **eval_size, device=device))

    tokens_per_step = tcfg.batch_size * tcfg.grad_accum_steps * block * ddp.world_size
    horizons = [h for h in (tcfg.max_steps, tcfg.max_tokens and math.ceil(tcfg.max_tokens / tokens_per_step)) if h]
    return Trainer(
        mcfg=mcfg, tcfg=tcfg, out_dir=out_dir, tokenizer_file=Path(data.dir) / "tokenizer.json", device=device, ddp=ddp,
        dtype=dtype, autocast=torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        raw_model=raw_model, params=[p for p in raw_model.parameters() if p.requires_grad], optimizers=optimizers,
        ema=ema, sampler=sampler, data_device=data_device, val_batches=val_batches,
        token_bytes=torch.as_tensor(data.token_bytes, device=device), tokens_per_step=tokens_per_step,
        total_steps=min(horizons) if horizons else None, flops_per_token=raw_model.flops_per_token(),
        peak_flops=hardware.peak_flops(device, dtype),
    )


def build_optimizers(model: nn.Module, cfg: TrainConfig, *, fused: bool = False) -> list[torch.optim.Optimizer]:
    """AdamW over all parameters, or with optimizer='muon' Muon for hidden matrices plus AdamW for the rest.

    Parameter groups (no weight decay on norms, biases and embeddings; layer-wise LR decay) come
    from `labutils.optim.param_groups`; `cfg.lr` and `cfg.betas` reach AdamW here.
    """
    adamw_groups, muon_groups = param_groups(
        model, lr=cfg.lr, weight_decay=cfg.weight_decay, layer_lr_decay=cfg.layer_lr_decay,
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
        warnings.warn(f"the train split ({needed / 2**30:.1f} GiB) is over {DATA_ON_DEVICE_SHARE:.0%} of the {available / 2**30:.1f} GiB "
                      f"free on {device}: it stays memory-mapped on the host and each batch is sent from pinned memory", stacklevel=2)
        return torch.device("cpu")
    return device


def make_sampler(tcfg: TrainConfig, data: PreparedData, block_size: int, ddp: hardware.Dist, device: torch.device,
                 pin_memory: bool = False):
    """The training batches: every rank draws the global batch from one seed and keeps its slice."""
    global_batch = tcfg.batch_size * ddp.world_size
    if tcfg.batch_mode == "document":
        sampler = DocumentBatches(data.tokens("train"), data.doc_starts("train"), block_size, global_batch,
                                  pad_id=data.pad_id, seed=tcfg.seed, device=device)
    else:
        sampler = StreamBatches(data.tokens("train"), block_size, global_batch, seed=tcfg.seed, device=device, pin_memory=pin_memory)
    return hardware.RankSlice(sampler, ddp.rank, ddp.world_size) if ddp.enabled else sampler


# --------------------------------------------------------------------------- 2. resume


def restore(t: Trainer, data: PreparedData) -> bool:
    """Load checkpoints/last, if there is one: model, optimisers, scaler, EMA, data position, RNG, progress."""
    last = find_checkpoint(t.ckpt_dir / "last")
    if last is None:
        return False
    ckpt = load_checkpoint(last, map_location="cpu")
    if ckpt["config"] != t.mcfg.to_dict():
        raise TrainingError(f"{last} holds a different model config than this run's; use another out_dir or resume=False")
    check_checkpoint_fits_data(last, t.mcfg.vocab_size, data)
    saved = ckpt["trainer"]
    changed = sorted(k for k, v in t.tcfg.to_dict().items() if saved["train_config"].get(k) != v)
    if changed and t.ddp.is_main:
        warnings.warn(f"resuming {t.out_dir} with changed training settings {changed}", stacklevel=2)
    t.raw_model.load_state_dict(ckpt["model"])
    for opt, opt_state in zip(t.optimizers, saved["optimizers"], strict=False):
        opt.load_state_dict(opt_state)
    t.scaler.load_state_dict(saved["scaler"])
    if t.ema is not None and saved["ema"] is not None:
        t.ema.load_state_dict(saved["ema"])
    t.sampler.load_state_dict(saved["sampler"])
    rng = saved["rng"]  # one entry per rank
    hardware.set_rng_state(rng[t.ddp.rank] if len(rng) == t.ddp.world_size else rng[0], t.device)
    known = {f.name for f in dataclasses.fields(TrainState)}
    t.state = TrainState(**{k: v for k, v in saved["progress"].items() if k in known})
    t.history, t.evals = list(saved["history"]), list(saved["evals"])
    return True


def prepare_run_folder(t: Trainer, data: PreparedData, resumed: bool) -> None:
    """Rank 0 writes config.json, environment.json and the CSVs (a fresh run first clears an old one's files)."""
    if not t.ddp.is_main:
        return
    if not resumed:
        for stale in ("metrics.csv", "evals.csv", "summary.json"):
            (t.out_dir / stale).unlink(missing_ok=True)
        shutil.rmtree(t.ckpt_dir, ignore_errors=True)
    config = {"model": t.mcfg.to_dict(), "train": t.tcfg.to_dict(), "data": display_path(data.dir)}
    atomic_write_json(t.out_dir / "config.json", config)
    t.sinks = Sinks(t.out_dir, config, t.state.step if resumed else 0, t.history, t.evals)  # csv, and the trackers asked for
    env = hardware.environment(t.device, t.tcfg.seed, t.ddp)
    atomic_write_json(t.out_dir / "environment.json", {**env, "dtype": str(t.dtype).removeprefix("torch."),
                                                        "resumed_from_step": t.state.step or None})


def compile_and_wrap(t: Trainer) -> None:
    """The model the steps run: compiled (by default on CUDA) and, under torchrun, in DDP."""
    t.use_compile = t.tcfg.compile if t.tcfg.compile is not None else t.device.type == "cuda"
    mode = None if t.tcfg.compile_mode == "default" else t.tcfg.compile_mode
    model = t.raw_model
    if t.use_compile and t.tcfg.compile_blocks:
        for block in t.raw_model.blocks:  # in place: the blocks share one compiled graph, the state_dict keeps its names
            block.compile(mode=mode)
    elif t.use_compile:
        model = torch.compile(t.raw_model, mode=mode)
    if t.ddp.enabled:
        model = DDP(model, device_ids=[t.device.index] if t.device.type == "cuda" else None)
    model.train()
    t.model = model


# --------------------------------------------------------------------------- 3. the loop


def run_loop(t: Trainer, *, progress: bool, on_eval: OnEval | None) -> Run:
    """Train until a stop reason; log, evaluate and checkpoint on their intervals; write summary.json however it ends."""
    tcfg, state = t.tcfg, t.state
    now = time.perf_counter()
    bar = hardware.progress_bar(total=t.total_steps, initial=state.step, disable=not (progress and t.ddp.is_main),
                                desc=t.out_dir.name, dynamic_ncols=True)
    log = LogWindow(bar, start=now, elapsed_before=state.elapsed_s, opened=now)
    reason = stop_reason(t, log_step=True)
    status = "completed"
    if tcfg.init_from and state.step == 0:
        run_eval(t, log, on_eval)  # where the pretrained weights start on this data: the evaluation at step 0
    try:
        while reason is None:
            # the LR is a pure function of the step (or of the time used when the run is a time budget)
            budget_used = state.elapsed_s / tcfg.time_budget_s if t.total_steps is None else None
            lr_mult = lr_factor(state.step, t.total_steps, schedule=tcfg.schedule, warmup_steps=tcfg.warmup_steps,
                                min_lr_ratio=tcfg.min_lr_ratio, decay_frac=tcfg.decay_frac, progress=budget_used)
            set_lr(t.optimizers, lr_mult)
            loss, grad_norm = train_step(t)
            state.step += 1
            state.tokens += t.tokens_per_step
            state.elapsed_s = log.elapsed_before + time.perf_counter() - log.start - log.paused
            log.losses.append(torch.stack([loss.float(), grad_norm.float().to(loss.device)]))
            log.lr_mults.append(lr_mult)
            bar.update(1)

            log_step = state.step % tcfg.log_interval == 0
            reason = stop_reason(t, log_step)
            eval_step = state.step % tcfg.eval_interval == 0 or reason is not None
            ckpt_step = state.step % (tcfg.checkpoint_interval or tcfg.eval_interval) == 0 or reason is not None
            if log_step or eval_step or ckpt_step:
                flush(t, log)  # before any eval or save, so a non-finite loss is never checkpointed
            if eval_step:
                run_eval(t, log, on_eval)
                reason = reason or stop_reason(t, log_step=False)
                ckpt_step = ckpt_step or reason is not None
            if ckpt_step:
                started = time.perf_counter()
                save(t, "last", t.raw_model.state_dict())
                log.paused += time.perf_counter() - started
            if eval_step or ckpt_step:
                log.opened = time.perf_counter()  # evaluation and saving are not training throughput
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except BaseException as exc:
        status = f"failed: {type(exc).__name__}: {exc}"
        raise
    finally:
        bar.close()
        summary = summarize(t, status, reason)
        if t.ddp.is_main:
            atomic_write_json(t.out_dir / "summary.json", summary)
            t.sinks.finish(summary, [t.out_dir / "config.json", t.out_dir / "summary.json"])
    return Run(t.out_dir, pd.DataFrame(t.history, columns=HISTORY_COLUMNS), pd.DataFrame(t.evals, columns=EVAL_COLUMNS), summary)


def train_step(t: Trainer) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on the next global batch; returns (loss, grad_norm) as device tensors."""
    tcfg, scaler = t.tcfg, t.scaler
    try:  # drawing the batch allocates it on the device, so it can run out of memory too
        micro_batches = [next(t.sampler) for _ in range(tcfg.grad_accum_steps)]
        if t.data_device != t.device:
            micro_batches = [(x.to(t.device, non_blocking=True), y.to(t.device, non_blocking=True)) for x, y in micro_batches]
        loss = forward_backward(t.model, micro_batches, autocast=t.autocast, scaler=scaler, label_smoothing=tcfg.label_smoothing)
        for opt in t.optimizers:
            scaler.unscale_(opt)  # clip the true gradients, not the fp16-scaled ones
        if tcfg.grad_clip > 0:
            grad_norm = nn.utils.clip_grad_norm_(t.params, tcfg.grad_clip)
        else:
            grad_norm = nn.utils.get_total_norm([p.grad for p in t.params if p.grad is not None])
        for opt in t.optimizers:
            scaler.step(opt)
        scaler.update()
    except torch.OutOfMemoryError as exc:
        raise TrainingError(oom_message(tcfg, t.mcfg.block_size, t.device, step=t.state.step + 1)) from exc
    for opt in t.optimizers:
        opt.zero_grad(set_to_none=True)
    if t.ema is not None:
        t.ema.update(t.raw_model)
    return loss, grad_norm


def forward_backward(model: nn.Module, micro_batches, *, autocast, scaler=None, label_smoothing: float = 0.0) -> torch.Tensor:
    """Accumulate gradients over micro-batches; return the batch's mean loss as a device tensor (no sync).

    The gradient is that of the mean loss over every counted target of the global batch: each
    micro-batch's mean is weighted by its share of the counted targets (ignored ones, -100, such as
    document-mode padding, count for nothing), and under DDP the count is summed over ranks, so
    DDP's averaging of gradients gives the same mean as one process on the whole batch. Only the
    last backward all-reduces gradients.
    """
    n = len(micro_batches)
    ddp = isinstance(model, DDP)
    kwargs = {"label_smoothing": label_smoothing} if label_smoothing else {}
    counts = [(y != IGNORE_INDEX).sum() for _, y in micro_batches]
    total_count = torch.stack(counts).sum().float()
    world = 1
    if ddp and dist.is_initialized():  # a collective on the device, not a host sync
        dist.all_reduce(total_count)
        world = dist.get_world_size()
    total_count = total_count.clamp(min=1)
    total = None
    for i, ((x, y), count) in enumerate(zip(micro_batches, counts, strict=True)):
        sync = contextlib.nullcontext() if not ddp or i == n - 1 else model.no_sync()
        with sync:
            with autocast:
                _, loss = model(x, y, **kwargs)
            loss = loss * (count * world / total_count)  # DDP divides the summed gradients by `world` again
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total


def stop_reason(t: Trainer, log_step: bool) -> str | None:
    tcfg, state = t.tcfg, t.state
    if tcfg.max_steps is not None and state.step >= tcfg.max_steps:
        return "max_steps"
    if tcfg.max_tokens is not None and state.tokens >= tcfg.max_tokens:
        return "max_tokens"
    if tcfg.early_stopping_patience is not None and state.bad_evals >= tcfg.early_stopping_patience:
        return "early_stopping"
    # under DDP the ranks must agree on the clock, which costs a sync: only checked at log steps
    if (tcfg.time_budget_s is not None and (log_step or not t.ddp.enabled)
            and hardware.all_ranks_agree(t.ddp, state.elapsed_s >= tcfg.time_budget_s, t.device)):
        return "time_budget"
    return None


def flush(t: Trainer, log: LogWindow) -> None:
    """The one host sync per log window: log the steps since the last flush, and stop on a non-finite loss."""
    stats = torch.stack(log.losses)
    if t.ddp.enabled:
        dist.all_reduce(stats)
        stats /= t.ddp.world_size
    values = stats.tolist()
    tokens_per_s = len(log.losses) * t.tokens_per_step / max(time.perf_counter() - log.opened, 1e-9)
    mfu = tokens_per_s * t.flops_per_token / (t.peak_flops * t.ddp.world_size) if t.peak_flops else math.nan
    first, memory = t.state.step - len(log.losses) + 1, hardware.peak_memory_mb(t.device)
    rows = [{"step": first + i, "tokens": (first + i) * t.tokens_per_step, "train_loss": loss, "lr": mult * t.tcfg.lr,
             "grad_norm": norm, "tokens_per_s": tokens_per_s, "mfu": mfu, "peak_memory_mb": memory,
             "elapsed_s": t.state.elapsed_s} for i, ((loss, norm), mult) in enumerate(zip(values, log.lr_mults, strict=True))]
    log.losses.clear()
    log.lr_mults.clear()
    bad = next((r for r in rows if not math.isfinite(r["train_loss"])), None)
    if bad is not None:
        good = find_checkpoint(t.ckpt_dir / "last")
        raise TrainingError(
            f"loss became {bad['train_loss']} at step {bad['step']} (lr {bad['lr']:.3g}); stopped. "
            f"Last good checkpoint: {good or 'none yet'}. Lower lr, raise warmup_steps, keep grad_clip > 0, "
            "or use bf16 instead of fp16.")
    log_grad_spikes(t, rows)
    t.history.extend(rows)
    if t.ddp.is_main:
        t.sinks.log_steps(rows)
    log.postfix["loss"] = f"{rows[-1]['train_loss']:.4f}"
    log.bar.set_postfix(log.postfix, refresh=False)
    t.state.throughput.append([tokens_per_s, mfu])
    log.opened = time.perf_counter()


def log_grad_spikes(t: Trainer, rows: list[dict]) -> None:
    """Warn about (and record) gradient norms far above the recent median, such as an fp16 overflow."""
    recent = [r["grad_norm"] for r in t.history[-100:] if math.isfinite(r["grad_norm"])]
    if len(recent) < 20:  # too few steps to know what is typical
        return
    typical = statistics.median(recent)
    for row in rows:
        if row["grad_norm"] <= t.tcfg.grad_spike_factor * typical:  # False for inf and NaN too
            continue
        t.state.grad_spikes.append(row["step"])
        overflow = t.scaler.is_enabled() and not math.isfinite(row["grad_norm"])
        cause = " (fp16 overflow: the gradient scaler skipped this step)" if overflow else ""
        if t.ddp.is_main:
            warnings.warn(f"gradient norm spike at step {row['step']}: {row['grad_norm']:.3g} against a median of "
                          f"{typical:.3g} over the last {len(recent)} steps{cause}", stacklevel=2)


def run_eval(t: Trainer, log: LogWindow, on_eval: OnEval | None) -> None:
    """Evaluate on the fixed batches (and with EMA weights), keep the best checkpoint, then call on_eval."""
    started, state, ema, raw_model = time.perf_counter(), t.state, t.ema, t.raw_model
    row = {"step": state.step, "tokens": state.tokens}
    # eager: eval mode and eval batch shapes would only make the compiled training graph recompile
    try:
        raw = evaluate_batches(raw_model, t.val_batches, autocast=t.autocast, ddp=t.ddp, token_bytes=t.token_bytes)
    except torch.OutOfMemoryError as exc:
        raise TrainingError(f"out of memory evaluating at step {state.step} on {t.device} with eval batches of "
                            f"{t.tcfg.eval_batch_size or t.tcfg.batch_size} x {t.mcfg.block_size} tokens; lower eval_batch_size") from exc
    row.update(val_loss=raw["loss"], val_ppl=raw["ppl"], val_accuracy=raw["accuracy"], val_bpb=raw["bpb"])
    if ema is not None:
        with ema.applied(raw_model):
            averaged = evaluate_batches(raw_model, t.val_batches, autocast=t.autocast, ddp=t.ddp, token_bytes=t.token_bytes)
        row.update(val_loss_ema=averaged["loss"], val_ppl_ema=averaged["ppl"], val_accuracy_ema=averaged["accuracy"],
                   val_bpb_ema=averaged["bpb"])
    t.evals.append(row)
    if t.ddp.is_main:
        t.sinks.log_eval(row)
    monitored = row["val_loss_ema"] if ema is not None else row["val_loss"]
    if monitored < state.best_val:
        state.best_val, state.best_step, state.bad_evals = monitored, state.step, 0
        save(t, "best", ema.model_state_dict(raw_model) if ema is not None else raw_model.state_dict())
    else:
        state.bad_evals += 1
    log.postfix["val"] = f"{monitored:.4f}"
    log.bar.set_postfix(log.postfix, refresh=False)
    log.paused += time.perf_counter() - started
    if on_eval is not None:
        on_eval(state.step, dict(row))


def save(t: Trainer, which: str, model_state: dict) -> None:
    """Write checkpoints/<which>. Gathering RNG states is collective, so every rank calls this; only rank 0 writes."""
    if not t.tcfg.checkpoints:
        return
    rng = hardware.gather_objects(t.ddp, hardware.rng_state(t.device))
    if not t.ddp.is_main:
        return
    trainer_state = {
        "progress": dataclasses.asdict(t.state), "optimizers": [o.state_dict() for o in t.optimizers],
        "scaler": t.scaler.state_dict(), "ema": t.ema.state_dict() if t.ema is not None else None,
        "sampler": t.sampler.state_dict(), "rng": rng, "history": t.history, "evals": t.evals,
        "world_size": t.ddp.world_size, "train_config": t.tcfg.to_dict(),
        "weights": "ema" if which == "best" and t.ema is not None else "raw",
    }
    try:
        save_checkpoint(t.ckpt_dir / which, model_state=model_state, model_config=t.mcfg.to_dict(),
                        trainer_state=trainer_state, tokenizer_file=t.tokenizer_file)
    except OSError as exc:  # disk full, quota, folder removed: the previous checkpoint is untouched
        raise TrainingError(
            f"could not write the '{which}' checkpoint at step {t.state.step} ({exc.strerror or exc}). "
            f"The previous one is intact: {find_checkpoint(t.ckpt_dir / which) or 'none yet'}. Free disk space "
            "and run the same command again: it resumes from checkpoints/last.") from exc


# --------------------------------------------------------------------------- 4. summary


def summarize(t: Trainer, status: str, reason: str | None) -> dict[str, Any]:
    """summary.json: how the run ended, its best and last evaluation, throughput and the machine (strict JSON)."""
    state = t.state
    summary = {
        "status": status, "stop_reason": reason, "steps": state.step, "tokens": state.tokens,
        "elapsed_s": state.elapsed_s, "best_step": state.best_step,
        "best_val_loss": state.best_val if math.isfinite(state.best_val) else None,
        "best_weights": "ema" if t.ema is not None else "raw",
        **{k: v for k, v in (t.evals[-1] if t.evals else {}).items() if k not in ("step", "tokens")},
        "train_loss": t.history[-1]["train_loss"] if t.history else None,
        **_throughput(state.throughput), "peak_memory_mb": hardware.peak_memory_mb(t.device),
        "num_params": t.raw_model.num_params(), "flops_per_token": t.flops_per_token, "device": str(t.device),
        "device_name": hardware.device_name(t.device), "dtype": str(t.dtype).removeprefix("torch."),
        "compile": t.use_compile, "compile_mode": t.tcfg.compile_mode if t.use_compile else None,
        "world_size": t.ddp.world_size, "seed": t.tcfg.seed,
        "grad_spikes": len(state.grad_spikes), "grad_spike_steps": state.grad_spikes[:50],
    }
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in summary.items()}


def _throughput(windows: list[list[float]]) -> dict[str, float]:
    """Median tokens/s and MFU over log windows, leaving out the first (compilation, warm-up)."""
    steady = windows[1:] or windows

    def median(values: list[float]) -> float:
        return statistics.median(values) if values else math.nan

    return {"tokens_per_s": median([t for t, _ in steady]), "mfu": median([m for _, m in steady if not math.isnan(m)])}


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> Run:
    parser = argparse.ArgumentParser(prog="python -m labutils.training",
                                     description="Train a GPT from a run.json: "
                                     '{"model": {...} or {"preset": name, ...}, "train": {...}, '
                                     '"data": "<prepared dir>", "out_dir": "..."}')
    parser.add_argument("--config", required=True, help="run.json")
    parser.add_argument("--no-resume", action="store_true", help="start over even if out_dir has a checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--tracking", help=TRACKING_HELP)
    args = parser.parse_args(argv)
    use_trackers(args.tracking)
    spec = json.loads(Path(args.config).read_text())
    keys = {"model", "train", "data", "out_dir"}
    if not isinstance(spec, dict) or set(spec) - keys or {"model", "data", "out_dir"} - set(spec):
        raise ConfigError(f"{args.config}: expected keys {sorted(keys)} ('train' optional), "
                          f"got {sorted(spec) if isinstance(spec, dict) else spec!r}")
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
