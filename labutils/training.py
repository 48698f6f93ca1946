"""The training loop: `train(model_cfg, train_cfg, data, out_dir) -> Run`, and `evaluate` for test sets.

The loop reads like nanoGPT's: get batch -> forward under autocast -> backward (accumulated) ->
clip -> step -> schedule -> log, with evaluation on fixed batches every `eval_interval` steps.
Losses stay on the device until a log step, so nothing waits on the host between steps (except
fp16's gradient scaler, which checks for infinities each step; bf16 needs no scaler). Exact
resume from checkpoints/last, DDP under torchrun, and `python -m labutils.training --config run.json`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import hardware
from .checkpoints import find_checkpoint, load_checkpoint, save_checkpoint
from .config import RunConfig, TrainConfig, model_config
from .data import IGNORE_INDEX, DocumentBatches, StreamBatches, as_prepared, eval_batches
from .errors import ConfigError, TrainingError
from .evaluation import EVAL_COLUMNS, HISTORY_COLUMNS, Run, check_checkpoint_fits_data, evaluate, evaluate_batches
from .files import RunLock, append_csv, atomic_write_json, check_disk_space, check_writable, rewrite_csv
from .model import GPT, ModelConfig
from .optim import EMA, build_optimizers, lr_factor, set_lr
from .paths import repo_path

__all__ = ["Run", "TrainConfig", "TrainingError", "evaluate", "main", "train"]


# --------------------------------------------------------------------------- building blocks


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
    for i, ((x, y), count) in enumerate(zip(micro_batches, counts)):
        sync = contextlib.nullcontext() if not ddp or i == n - 1 else model.no_sync()
        with sync:
            with autocast:
                _, loss = model(x, y, **kwargs)
            loss = loss * (count * world / total_count)  # DDP divides the summed gradients by `world` again
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total


def make_sampler(tcfg: TrainConfig, data, block_size: int, ddp: hardware.Dist, device: torch.device):
    """The training batches: every rank draws the global batch from one seed and keeps its slice."""
    global_batch = tcfg.batch_size * ddp.world_size
    if tcfg.batch_mode == "document":
        sampler = DocumentBatches(data.tokens("train"), data.doc_starts("train"), block_size, global_batch,
                                  pad_id=data.pad_id, seed=tcfg.seed, device=device)
    else:
        sampler = StreamBatches(data.tokens("train"), block_size, global_batch, seed=tcfg.seed, device=device)
    return hardware.RankSlice(sampler, ddp.rank, ddp.world_size) if ddp.enabled else sampler


def checkpoint_bytes(mcfg: ModelConfig, tcfg: TrainConfig) -> int:
    """A generous estimate of the disk a run's checkpoints take: best + last + one being written."""
    with torch.device("meta"):  # counts parameters without allocating them
        n_params = GPT(mcfg).num_params()
    tensors_per_param = 1 + 2 + (1 if tcfg.ema else 0)  # weights, two optimiser moments, EMA weights
    return int(3 * tensors_per_param * 4 * n_params * 1.1) + 16 * 2**20  # fp32; the margin holds histories and CSVs


def _oom_message(step: int, tcfg: TrainConfig, block_size: int, device: torch.device) -> str:
    if tcfg.batch_size > 1:
        smaller = tcfg.batch_size // 2
        accum = tcfg.grad_accum_steps * tcfg.batch_size // smaller
        first = f"Keep the global batch and lower the micro-batch (batch_size={smaller}, grad_accum_steps={accum}), "
    else:  # one sequence already: only the sequence or the model can shrink
        first = f"The micro-batch is one sequence already: lower block_size (now {block_size}) or the model size, "
    return (
        f"CUDA out of memory at step {step} on {device} with a micro-batch of batch_size={tcfg.batch_size} x "
        f"block_size={block_size} tokens. {first}set grad_checkpoint=True in the model config, or use dtype='bf16'."
    )


# --------------------------------------------------------------------------- the loop


def train(model_cfg: ModelConfig | dict | str, train_cfg: TrainConfig | dict, data, out_dir: str | Path, *,
          resume: bool = True, progress: bool = True, on_eval: Callable[[int, dict], None] | None = None) -> Run:
    """Train a GPT on prepared data into `out_dir`; resume from out_dir/checkpoints/last if present.

    `data` is a PreparedData or a prepared folder. Under torchrun the same call runs DDP (rank 0
    writes the files). `on_eval(step, metrics)` is called after every evaluation (on every rank,
    with the same metrics); an exception it raises (e.g. optuna.TrialPruned) stops the run and
    propagates. Returns the Run with per-step history, evaluations and summary.
    """
    tcfg = train_cfg if isinstance(train_cfg, TrainConfig) else TrainConfig.from_dict(train_cfg)
    data = as_prepared(data) if isinstance(data, (str, Path)) else data
    mcfg = model_config(model_cfg, data.vocab_size)
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
        with hardware.deterministic(tcfg.deterministic):
            return _train(mcfg, tcfg, data, out_dir, device, ddp, resume=resume, progress=progress, on_eval=on_eval)
    finally:
        lock.release()
        hardware.cleanup_distributed(ddp)


def _train(mcfg: ModelConfig, tcfg: TrainConfig, data, out_dir: Path, device: torch.device, ddp: hardware.Dist, *,
           resume: bool, progress: bool, on_eval: Callable[[int, dict], None] | None) -> Run:
    from tqdm.auto import tqdm

    main = ddp.is_main
    ckpt_dir = out_dir / "checkpoints"
    dtype = hardware.resolve_dtype(tcfg.dtype, device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls autocast leaves
        torch.cuda.reset_peak_memory_stats(device)

    hardware.seed_everything(tcfg.seed)
    raw_model = GPT(mcfg).to(device)
    optimizers = build_optimizers(raw_model, optimizer=tcfg.optimizer, lr=tcfg.lr, weight_decay=tcfg.weight_decay,
                                  betas=tcfg.betas, layer_lr_decay=tcfg.layer_lr_decay, muon_lr=tcfg.muon_lr,
                                  muon_momentum=tcfg.muon_momentum, fused=device.type == "cuda")
    ema = EMA(raw_model, tcfg.ema) if tcfg.ema else None
    block = mcfg.block_size
    data_device = device if tcfg.data_on_device else torch.device("cpu")
    sampler = make_sampler(tcfg, data, block, ddp, data_device)
    eval_size = {"n_tokens": tcfg.eval_tokens} if tcfg.eval_tokens else {"n_batches": tcfg.eval_batches}
    val_batches = eval_batches(data.tokens(tcfg.eval_split), block, tcfg.eval_batch_size or tcfg.batch_size, **eval_size, device=device)

    tokens_per_step = tcfg.batch_size * tcfg.grad_accum_steps * block * ddp.world_size
    horizons = [h for h in (tcfg.max_steps, tcfg.max_tokens and math.ceil(tcfg.max_tokens / tokens_per_step)) if h]
    total_steps = min(horizons) if horizons else None  # None: the schedule follows the time budget
    flops_per_token = raw_model.flops_per_token()
    peak = hardware.peak_flops(device, dtype)
    state = {"step": 0, "tokens": 0, "elapsed_s": 0.0, "best_val": math.inf, "best_step": None, "bad_evals": 0, "grad_spikes": [],
             "throughput": []}  # (tokens/s, MFU) per log window, kept across resumes
    history: list[dict] = []
    evals: list[dict] = []

    last = find_checkpoint(ckpt_dir / "last") if resume else None
    if last is not None:  # model, optimiser, scaler, EMA, data position, RNG: everything a step depends on
        ckpt = load_checkpoint(last, map_location="cpu")
        if ckpt["config"] != mcfg.to_dict():
            raise TrainingError(f"{last} holds a different model config than this run's; use another out_dir or resume=False")
        check_checkpoint_fits_data(last, mcfg.vocab_size, data)
        saved = ckpt["trainer"]
        changed = sorted(k for k, v in tcfg.to_dict().items() if saved["train_config"].get(k) != v)
        if changed and main:
            warnings.warn(f"resuming {out_dir} with changed training settings {changed}")
        raw_model.load_state_dict(ckpt["model"])
        for opt, opt_state in zip(optimizers, saved["optimizers"]):
            opt.load_state_dict(opt_state)
        scaler.load_state_dict(saved["scaler"])
        if ema is not None and saved["ema"] is not None:
            ema.load_state_dict(saved["ema"])
        sampler.load_state_dict(saved["sampler"])
        rng = saved["rng"]  # one entry per rank
        hardware.set_rng_state(rng[ddp.rank] if len(rng) == ddp.world_size else rng[0], device)
        state.update(saved["progress"])
        history, evals = list(saved["history"]), list(saved["evals"])
    elif ddp.enabled:
        torch.manual_seed(tcfg.seed + ddp.rank)  # distinct dropout masks per rank; init already shared
    if main:
        if last is None:
            for stale in ("metrics.csv", "evals.csv", "summary.json"):
                (out_dir / stale).unlink(missing_ok=True)
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        rewrite_csv(out_dir / "metrics.csv", HISTORY_COLUMNS, history)
        rewrite_csv(out_dir / "evals.csv", EVAL_COLUMNS, evals)
        atomic_write_json(out_dir / "config.json", {"model": mcfg.to_dict(), "train": tcfg.to_dict(), "data": str(data.dir)})
        env = hardware.environment(device, tcfg.seed, ddp)
        atomic_write_json(out_dir / "environment.json", {**env, "dtype": str(dtype).removeprefix("torch."), "resumed_from_step": state["step"] or None})

    use_compile = tcfg.compile if tcfg.compile is not None else device.type == "cuda"
    model = torch.compile(raw_model) if use_compile else raw_model
    if ddp.enabled:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()
    params = [p for p in raw_model.parameters() if p.requires_grad]
    tokenizer_file = Path(data.dir) / "tokenizer.json"

    def save(which: str, model_state: dict) -> None:
        # Gathering RNG states is collective, so every rank calls save; only rank 0 writes.
        rng = hardware.gather_objects(ddp, hardware.rng_state(device))
        if not main:
            return
        trainer = {
            "progress": dict(state), "optimizers": [o.state_dict() for o in optimizers], "scaler": scaler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "sampler": sampler.state_dict(), "rng": rng,
            "history": history, "evals": evals, "world_size": ddp.world_size, "train_config": tcfg.to_dict(),
            "weights": "ema" if which == "best" and ema is not None else "raw",
        }
        try:
            save_checkpoint(ckpt_dir / which, model_state=model_state, model_config=mcfg.to_dict(),
                            trainer_state=trainer, tokenizer_file=tokenizer_file)
        except OSError as exc:  # disk full, quota, folder removed: the previous checkpoint is untouched
            raise TrainingError(
                f"could not write the '{which}' checkpoint at step {state['step']} ({exc.strerror or exc}). "
                f"The previous one is intact: {find_checkpoint(ckpt_dir / which) or 'none yet'}. Free disk space "
                "and run the same command again: it resumes from checkpoints/last.") from exc

    window: list[torch.Tensor] = []  # per-step (loss, grad_norm) on the device, synced at log steps
    window_lrs: list[float] = []
    postfix: dict[str, str] = {}
    clock = {"start": time.perf_counter(), "window": time.perf_counter(), "paused": 0.0}
    bar = tqdm(total=total_steps, initial=state["step"], disable=not (progress and main), desc=out_dir.name, dynamic_ncols=True)

    def flush() -> None:
        """The one host sync: log the steps since the last flush, and stop on a non-finite loss."""
        stats = torch.stack(window)
        if ddp.enabled:
            dist.all_reduce(stats)
            stats /= ddp.world_size
        values = stats.tolist()
        now = time.perf_counter()
        tokens_per_s = len(window) * tokens_per_step / max(now - clock["window"], 1e-9)
        mfu = tokens_per_s * flops_per_token / (peak * ddp.world_size) if peak else math.nan
        first, memory = state["step"] - len(window) + 1, hardware.peak_memory_mb(device)
        rows = [{"step": first + i, "tokens": (first + i) * tokens_per_step, "train_loss": loss, "lr": mult * tcfg.lr,
                 "grad_norm": norm, "tokens_per_s": tokens_per_s, "mfu": mfu, "peak_memory_mb": memory,
                 "elapsed_s": state["elapsed_s"]} for i, ((loss, norm), mult) in enumerate(zip(values, window_lrs))]
        window.clear()
        window_lrs.clear()
        bad = next((r for r in rows if not math.isfinite(r["train_loss"])), None)
        if bad is not None:
            good = find_checkpoint(ckpt_dir / "last")
            raise TrainingError(
                f"loss became {bad['train_loss']} at step {bad['step']} (lr {bad['lr']:.3g}); stopped. "
                f"Last good checkpoint: {good or 'none yet'}. Lower lr, raise warmup_steps, keep grad_clip > 0, "
                "or use bf16 instead of fp16.")
        log_grad_spikes(rows)
        history.extend(rows)
        if main:
            append_csv(out_dir / "metrics.csv", HISTORY_COLUMNS, rows)
        postfix["loss"] = f"{rows[-1]['train_loss']:.4f}"
        bar.set_postfix(postfix, refresh=False)
        state["throughput"].append([tokens_per_s, mfu])
        clock["window"] = time.perf_counter()

    def log_grad_spikes(rows: list[dict]) -> None:
        recent = [r["grad_norm"] for r in history[-100:] if math.isfinite(r["grad_norm"])]
        if len(recent) < 20:  # too few steps to know what is typical
            return
        typical = statistics.median(recent)
        for row in rows:
            if row["grad_norm"] <= tcfg.grad_spike_factor * typical:  # False for inf and NaN too
                continue
            state["grad_spikes"].append(row["step"])
            cause = " (fp16 overflow: the gradient scaler skipped this step)" if scaler.is_enabled() and not math.isfinite(row["grad_norm"]) else ""
            if main:
                warnings.warn(f"gradient norm spike at step {row['step']}: {row['grad_norm']:.3g} against a median of "
                              f"{typical:.3g} over the last {len(recent)} steps{cause}", stacklevel=2)

    def run_eval() -> None:
        t0 = time.perf_counter()
        row = {"step": state["step"], "tokens": state["tokens"]}
        # eager: eval mode and eval batch shapes would only make the compiled training graph recompile
        try:
            raw = evaluate_batches(raw_model, val_batches, autocast=autocast, ddp=ddp)
        except torch.OutOfMemoryError as exc:
            raise TrainingError(f"out of memory evaluating at step {state['step']} on {device} with eval batches of "
                                f"{tcfg.eval_batch_size or tcfg.batch_size} x {block} tokens; lower eval_batch_size") from exc
        row.update(val_loss=raw["loss"], val_ppl=raw["ppl"], val_accuracy=raw["accuracy"])
        if ema is not None:
            with ema.applied(raw_model):
                averaged = evaluate_batches(raw_model, val_batches, autocast=autocast, ddp=ddp)
            row.update(val_loss_ema=averaged["loss"], val_ppl_ema=averaged["ppl"], val_accuracy_ema=averaged["accuracy"])
        evals.append(row)
        if main:
            append_csv(out_dir / "evals.csv", EVAL_COLUMNS, [row])
        monitored = row["val_loss_ema"] if ema is not None else row["val_loss"]
        if monitored < state["best_val"]:
            state.update(best_val=monitored, best_step=state["step"], bad_evals=0)
            save("best", ema.model_state_dict(raw_model) if ema is not None else raw_model.state_dict())
        else:
            state["bad_evals"] += 1
        postfix["val"] = f"{monitored:.4f}"
        bar.set_postfix(postfix, refresh=False)
        clock["paused"] += time.perf_counter() - t0
        if on_eval is not None:
            on_eval(state["step"], dict(row))

    def stop_reason(log_step: bool) -> str | None:
        if tcfg.max_steps is not None and state["step"] >= tcfg.max_steps:
            return "max_steps"
        if tcfg.max_tokens is not None and state["tokens"] >= tcfg.max_tokens:
            return "max_tokens"
        if tcfg.early_stopping_patience is not None and state["bad_evals"] >= tcfg.early_stopping_patience:
            return "early_stopping"
        # under DDP the ranks must agree on the clock, which costs a sync: only checked at log steps
        if (tcfg.time_budget_s is not None and (log_step or not ddp.enabled)
                and hardware.all_ranks_agree(ddp, state["elapsed_s"] >= tcfg.time_budget_s, device)):
            return "time_budget"
        return None

    elapsed_before = state["elapsed_s"]
    reason = stop_reason(log_step=True)
    status = "completed"
    try:
        while reason is None:
            # the LR is a pure function of the step (or of the time used when the run is a time budget)
            budget_used = state["elapsed_s"] / tcfg.time_budget_s if total_steps is None else None
            lr_mult = lr_factor(state["step"], total_steps, schedule=tcfg.schedule, warmup_steps=tcfg.warmup_steps,
                                min_lr_ratio=tcfg.min_lr_ratio, decay_frac=tcfg.decay_frac, progress=budget_used)
            set_lr(optimizers, lr_mult)
            try:  # drawing the batch allocates it on the device, so it can run out of memory too
                micro_batches = [next(sampler) for _ in range(tcfg.grad_accum_steps)]
                if data_device != device:
                    micro_batches = [(x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in micro_batches]
                loss = forward_backward(model, micro_batches, autocast=autocast, scaler=scaler, label_smoothing=tcfg.label_smoothing)
                for opt in optimizers:
                    scaler.unscale_(opt)  # clip the true gradients, not the fp16-scaled ones
                if tcfg.grad_clip > 0:
                    grad_norm = nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
                else:
                    grad_norm = nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                for opt in optimizers:
                    scaler.step(opt)
                scaler.update()
            except torch.OutOfMemoryError as exc:
                raise TrainingError(_oom_message(state["step"] + 1, tcfg, block, device)) from exc
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(raw_model)
            state["step"] += 1
            state["tokens"] += tokens_per_step
            state["elapsed_s"] = elapsed_before + time.perf_counter() - clock["start"] - clock["paused"]
            window.append(torch.stack([loss.float(), grad_norm.float().to(loss.device)]))
            window_lrs.append(lr_mult)
            bar.update(1)

            step = state["step"]
            log_step = step % tcfg.log_interval == 0
            reason = stop_reason(log_step)
            eval_step = step % tcfg.eval_interval == 0 or reason is not None
            ckpt_step = step % (tcfg.checkpoint_interval or tcfg.eval_interval) == 0 or reason is not None
            if log_step or eval_step or ckpt_step:
                flush()  # before any eval or save, so a non-finite loss is never checkpointed
            if eval_step:
                run_eval()
                reason = reason or stop_reason(log_step=False)
                ckpt_step = ckpt_step or reason is not None
            if ckpt_step:
                t0 = time.perf_counter()
                save("last", raw_model.state_dict())
                clock["paused"] += time.perf_counter() - t0
            if eval_step or ckpt_step:
                clock["window"] = time.perf_counter()  # evaluation and saving are not training throughput
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except BaseException as exc:
        status = f"failed: {type(exc).__name__}: {exc}"
        raise
    finally:
        bar.close()
        summary = {
            "status": status, "stop_reason": reason, "steps": state["step"], "tokens": state["tokens"],
            "elapsed_s": state["elapsed_s"], "best_step": state["best_step"],
            "best_val_loss": state["best_val"] if math.isfinite(state["best_val"]) else None,
            "best_weights": "ema" if ema is not None else "raw",
            **{k: v for k, v in (evals[-1] if evals else {}).items() if k not in ("step", "tokens")},
            "train_loss": history[-1]["train_loss"] if history else None,
            **_throughput(state["throughput"]), "peak_memory_mb": hardware.peak_memory_mb(device),
            "num_params": raw_model.num_params(), "flops_per_token": flops_per_token, "device": str(device),
            "device_name": hardware.device_name(device), "dtype": str(dtype).removeprefix("torch."),
            "compile": use_compile, "world_size": ddp.world_size, "seed": tcfg.seed,
            "grad_spikes": len(state["grad_spikes"]), "grad_spike_steps": state["grad_spikes"][:50],
        }
        summary = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in summary.items()}  # strict JSON
        if main:
            atomic_write_json(out_dir / "summary.json", summary)
    return Run(out_dir, pd.DataFrame(history, columns=HISTORY_COLUMNS), pd.DataFrame(evals, columns=EVAL_COLUMNS), summary)


def _throughput(windows: list[list[float]]) -> dict[str, float]:
    """Median tokens/s and MFU over log windows, leaving out the first (compilation, warm-up)."""
    steady = windows[1:] or windows
    median = lambda values: statistics.median(values) if values else math.nan
    return {"tokens_per_s": median([t for t, _ in steady]), "mfu": median([m for _, m in steady if not math.isnan(m)])}


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> Run:
    parser = argparse.ArgumentParser(prog="python -m labutils.training", description="Train a GPT from a run.json: "
                                     '{"model": {...} or {"preset": name, ...}, "train": {...}, "data": "<prepared dir>", "out_dir": "..."}')
    parser.add_argument("--config", required=True, help="run.json")
    parser.add_argument("--no-resume", action="store_true", help="start over even if out_dir has a checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    spec = json.loads(Path(args.config).read_text())
    keys = {"model", "train", "data", "out_dir"}
    if not isinstance(spec, dict) or set(spec) - keys or {"model", "data", "out_dir"} - set(spec):
        raise ConfigError(f"{args.config}: expected keys {sorted(keys)} ('train' optional), got {sorted(spec) if isinstance(spec, dict) else spec!r}")
    data = spec["data"]
    if isinstance(data, dict):  # {"corpus": ..., "tokenizer": ...}: prepare (or reuse) it first
        from .data import prepare_data
        data = prepare_data(**data)
    run = train(spec["model"], spec.get("train", {}), data, spec["out_dir"], resume=not args.no_resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in run.summary.items() if k != "model"}, indent=2, default=str))
    return run


class _CallableModule(types.ModuleType):
    """`from labutils import train` binds this module (a submodule wins over the package's lazy export
    of the same name), so the module forwards calls to `train()`: both spellings then work."""

    def __call__(self, *args, **kwargs) -> Run:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    main()
