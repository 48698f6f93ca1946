"""What stops a training run with a message that names the fix, kept out of `training.py` so the loop reads as the
loop. Each guard is one call (or one `with`) there:

- before the run: `check_inputs` (the typed configs and data), `claim_run_folder` (writable, disk space, the lock;
  every rank stops if rank 0 cannot), `completed_summary` (a finished run in the folder, and no mixing of configs);
- under DDP: `stop_when_a_rank_is_lost` (the ranks left stop with the lost rank's number and how to resume, instead
  of a bare 'Connection closed by peer' or a hang), `check_ranks_resume_alike` (every rank resumes the same step);
- in the loop: `out_of_memory_stops` (an OOM becomes a TrainingError with advice), `check_finite` (a non-finite
  loss stops the run before it is checkpointed), `checkpoint_write_fails` (disk full while saving).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from . import hardware
from .checkpoints import find_checkpoint
from .config import RunConfig
from .data import PreparedData
from .files import RunLock, check_disk_space, check_writable, display_path, repo_path
from .validation import CheckpointError, ConfigError, TrainingError, require

# --------------------------------------------------------------------------- before the run


def check_inputs(config: RunConfig, data: PreparedData) -> None:
    """The two things train() takes typed, named with the call that builds them; the vocabulary against the data."""
    if not isinstance(config, RunConfig):
        raise ConfigError(
            f"train: expected a RunConfig, got {type(config).__name__}; build one with "
            "RunConfig.build(model, train, data.vocab_size) (a preset name or field mappings are fine there)"
        )
    if not isinstance(data, PreparedData):
        raise ConfigError(
            f"train: expected PreparedData, got {type(data).__name__}; open a prepared folder with "
            "labutils.data.as_prepared(path), or make one with prepare_data(...)"
        )
    require(
        config.model.vocab_size >= data.vocab_size,
        "model.vocab_size",
        f"the model has {config.model.vocab_size} token ids but the data uses {data.vocab_size}; set "
        f"vocab_size={data.vocab_size}",
    )


def claim_run_folder(ddp: hardware.Dist, out_dir: Path, lock: RunLock, needed_bytes: int) -> None:
    """Rank 0 checks out_dir is writable with room for the checkpoints and takes its lock; when it cannot, every rank
    stops with its reason (not only rank 0, which would leave the others waiting in a collective)."""
    error = None
    if ddp.is_main:
        try:
            check_writable(out_dir)
            check_disk_space(out_dir, needed_bytes)
            lock.acquire()
        except RuntimeError as exc:
            error = str(exc)
    error = hardware.broadcast_object(ddp, error)
    if error:
        raise TrainingError(error)


def config_changes(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """What differs between two configs as config.json holds them ("train.lr: 0.003 -> 0.01"), the device aside:
    a run is the same run on another device."""
    return [
        f"{section}.{k}: {saved.get(section, {}).get(k)!r} -> {v!r}"
        for section in ("model", "train")
        for k, v in wanted[section].items()
        if k != "device" and saved.get(section, {}).get(k) != v
    ]


def completed_summary(out_dir: str | Path, config: RunConfig) -> dict[str, Any] | None:
    """The summary of the run that completed in out_dir with this config (the device aside), or None when none did.
    A run completed there with another config is an error: one folder would report two configurations."""
    out_dir = repo_path(out_dir)
    summary_path, config_path = out_dir / "summary.json", out_dir / "config.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if summary.get("status") != "completed" or not config_path.exists():
        return None
    changed = config_changes(json.loads(config_path.read_text()), config.to_dict())
    if changed:
        raise ConfigError(
            f"{display_path(out_dir)} finished with another configuration ({'; '.join(changed)}). "
            "Use a new out_dir (or archive the old results) instead of mixing configurations."
        )
    return summary


# --------------------------------------------------------------------------- DDP


@contextlib.contextmanager
def stop_when_a_rank_is_lost(ddp: hardware.Dist, out_dir: Path) -> Iterator[None]:
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
        raise TrainingError(
            f"rank {ddp.rank}: {who} of {ddp.world_size} stopped answering (its process ended, or its node is "
            f"unreachable), so this rank stops too. Rerun the same command on every node: it resumes from "
            f"{display_path(out_dir / 'checkpoints' / 'last')}. "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from exc


def check_ranks_resume_alike(ddp: hardware.Dist, step: int | None, out_dir: Path) -> None:
    """Every rank must resume from the same checkpoint; on several nodes, a rank that does not see
    out_dir's checkpoint would start over while the others resume, and train on a mix."""
    steps = hardware.gather_objects(ddp, step)
    if len(set(steps)) > 1:
        found = ", ".join(
            f"rank {r}: {'step ' + str(s) if s is not None else 'no checkpoint'}" for r, s in enumerate(steps)
        )
        raise TrainingError(
            f"the ranks do not resume alike ({found}). Put out_dir ({display_path(out_dir)}) on a disk every node "
            "shares, so all read the checkpoint rank 0 writes"
        )


# --------------------------------------------------------------------------- in the loop


@contextlib.contextmanager
def out_of_memory_stops(message: Callable[[], str]) -> Iterator[None]:
    """A CUDA out-of-memory error becomes a TrainingError with `message()` (written only when it happens)."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        raise TrainingError(message()) from exc


def eval_oom_message(step: int, device: torch.device, batch_size: int, block_size: int) -> str:
    return (
        f"out of memory evaluating at step {step} on {device} with eval batches of "
        f"{batch_size} x {block_size} tokens; lower eval_batch_size"
    )


def check_finite(rows: list[dict], ckpt_dir: Path) -> None:
    """Stop at the first non-finite training loss, naming the last good checkpoint and the usual fixes."""
    bad = next((r for r in rows if not math.isfinite(r["train_loss"])), None)
    if bad is not None:
        good = find_checkpoint(ckpt_dir / "last")
        raise TrainingError(
            f"loss became {bad['train_loss']} at step {bad['step']} (lr {bad['lr']:.3g}); stopped. "
            f"Last good checkpoint: {good or 'none yet'}. Lower lr, raise warmup_steps, keep grad_clip > 0, "
            "or use bf16 instead of fp16."
        )


@contextlib.contextmanager
def checkpoint_write_fails(ckpt_dir: Path, which: str, step: int) -> Iterator[None]:
    """Disk full, quota, folder removed while saving: the previous checkpoint is untouched, and the run can resume."""
    try:
        yield
    except OSError as exc:
        raise TrainingError(
            f"could not write the '{which}' checkpoint at step {step} ({exc.strerror or exc}). "
            f"The previous one is intact: {find_checkpoint(ckpt_dir / which) or 'none yet'}. Free disk space "
            "and run the same command again: it resumes from checkpoints/last."
        ) from exc
