"""What training leaves behind: the `Run` (history, evaluations, summary, checkpoints) and evaluation.

A run folder holds config.json, metrics.csv (one row per step), evals.csv (one row per evaluation),
summary.json, environment.json and checkpoints/{best,last}; `Run.load` reads it back, also while the
run is still going or after it crashed. `evaluate` scores a run or model on a split (test by default).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import hardware
from .batches import IGNORE_INDEX, eval_batches, tiled_batches
from .checkpoints import TOKENIZER_FILE, find_checkpoint, load_model
from .data import as_prepared
from .files import display_path, repo_path
from .tokenizers import describe_tokenizer
from .validation import CheckpointError, ConfigError

# lr is the schedule's value for the base parameter group (lr x schedule factor); Muon's matrices and
# layer-decayed groups scale it by their own factors.
HISTORY_COLUMNS = [
    "step",
    "tokens",
    "train_loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "mfu",
    "peak_memory_mb",
    "elapsed_s",
]
EVAL_COLUMNS = [
    "step",
    "tokens",
    "val_loss",
    "val_ppl",
    "val_accuracy",
    "val_bpb",
    "val_loss_ema",
    "val_ppl_ema",
    "val_accuracy_ema",
    "val_bpb_ema",
]


@dataclass
class Run:
    """A finished (or stopped) run: per-step `history`, per-evaluation `evals`, `summary`, checkpoints."""

    out_dir: Path
    history: pd.DataFrame
    evals: pd.DataFrame
    summary: dict[str, Any]

    @property
    def best_checkpoint(self) -> Path | None:
        return find_checkpoint(self.out_dir / "checkpoints" / "best")

    @property
    def last_checkpoint(self) -> Path | None:
        return find_checkpoint(self.out_dir / "checkpoints" / "last")

    @classmethod
    def load(cls, out_dir: str | Path) -> Run:
        """Read a run folder written by `train`."""
        out_dir = repo_path(out_dir)

        def table(name: str, columns: list[str]) -> pd.DataFrame:
            path = out_dir / name
            return pd.read_csv(path) if path.exists() else pd.DataFrame(columns=columns)

        summary_path = out_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        return cls(out_dir, table("metrics.csv", HISTORY_COLUMNS), table("evals.csv", EVAL_COLUMNS), summary)

    def load_model(self, which: str = "best", device: str | torch.device = "cpu") -> nn.Module:
        """The model of checkpoint `which` ('best' or 'last'), verified and in eval mode."""
        path = find_checkpoint(self.out_dir / "checkpoints" / which)
        if path is None:
            raise CheckpointError(f"{self.out_dir} has no complete '{which}' checkpoint")
        return load_model(path, device)

    def __repr__(self) -> str:
        keys = ("steps", "stop_reason", "best_val_loss", "tokens_per_s")
        return f"Run({display_path(self.out_dir)!r}, " + ", ".join(f"{k}={self.summary.get(k)!r}" for k in keys) + ")"


def check_checkpoint_fits_data(checkpoint_dir: Path | None, vocab_size: int, data) -> None:
    """Refuse a model whose token ids would mean other text on `data` (smaller vocabulary, other tokenizer)."""
    where = checkpoint_dir or "the model"
    if vocab_size < data.vocab_size:
        raise CheckpointError(
            f"{where} has a vocabulary of {vocab_size} ids but the data {data.dir} uses {data.vocab_size}; "
            "use data prepared with the tokenizer the model was trained on"
        )
    saved = Path(checkpoint_dir) / TOKENIZER_FILE if checkpoint_dir is not None else None
    if saved is not None and saved.exists():
        theirs, ours = json.loads(saved.read_text()), data.tokenizer.spec()
        if theirs != ours:
            raise CheckpointError(
                f"{checkpoint_dir} was trained with tokenizer {describe_tokenizer(theirs)}, but the data {data.dir} "
                "uses "
                f"{describe_tokenizer(ours)}: the same ids would mean other text. Prepare the data with the "
                "checkpoint's "
                "tokenizer, or use a checkpoint trained on this data"
            )


def bits_per_byte(loss_nats_per_token: float, tokens: int, text_bytes: int) -> float:
    """Nats per token as bits per UTF-8 byte of the text those tokens encode: one axis for char, byte and BPE."""
    if tokens <= 0 or text_bytes <= 0:
        raise ConfigError(f"bits per byte needs tokens and bytes above 0, got {tokens} tokens of {text_bytes} bytes")
    return loss_nats_per_token / math.log(2) * tokens / text_bytes


@torch.no_grad()
def evaluate_batches(
    model: nn.Module,
    batches,
    *,
    autocast=None,
    ddp: hardware.Dist | None = None,
    token_bytes: torch.Tensor | None = None,
) -> dict[str, float]:
    """Mean next-token loss, perplexity and accuracy over `batches` (IGNORE_INDEX targets skipped), and with
    `token_bytes` (UTF-8 bytes per id, on the model's device) bits per byte: the summed loss in bits over the
    bytes of text the counted targets stand for, one scale for char, byte and BPE runs.

    The loss is plain cross-entropy (no label smoothing, no MoE auxiliary term), so runs trained
    with different losses compare on the same scale. Under DDP the ranks split the batches.
    """
    autocast = autocast if autocast is not None else contextlib.nullcontext()
    ddp = ddp if ddp is not None else hardware.Dist()
    was_training = model.training
    model.eval()
    sums = torch.zeros(
        4, device=next(model.parameters()).device, dtype=torch.float64
    )  # loss sum, correct, counted, bytes
    for x, y in _rank_share(batches, ddp):
        with autocast:
            logits, _ = model(x)
        logits, y = logits.float().flatten(0, 1), y.flatten()
        counted = y != IGNORE_INDEX
        sums[0] += F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum").double()
        sums[1] += ((logits.argmax(-1) == y) & counted).sum()
        sums[2] += counted.sum()
        if token_bytes is not None:
            sums[3] += token_bytes[y.clamp(min=0)][counted].sum()
    if ddp.enabled:
        dist.all_reduce(sums)
    loss_sum, correct, count, n_bytes = sums.tolist()
    model.train(was_training)
    loss = loss_sum / max(count, 1)
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 700.0)),
        "accuracy": correct / max(count, 1),
        "tokens": int(count),
        "bpb": bits_per_byte(loss, int(count), int(n_bytes)) if n_bytes else math.nan,
    }


def _rank_share(batches, ddp: hardware.Dist):
    """This rank's batches: every world_size-th one. A sequence (a whole split's TiledBatches) is indexed,
    so a rank reads only its own batches from the split; other iterables are walked and the rest skipped."""
    if isinstance(batches, Sequence):
        return (batches[i] for i in range(ddp.rank, len(batches), ddp.world_size))
    return (batch for i, batch in enumerate(batches) if i % ddp.world_size == ddp.rank)


def evaluate(
    run_or_model: Run | nn.Module | str | Path,
    data,
    split: str = "test",
    *,
    batch_size: int = 32,
    n_batches: int | None = None,
    device: str = "auto",
    dtype: str = "fp32",
) -> dict[str, float]:
    """Score a run's best checkpoint (or a model, a run folder, a checkpoint folder) on a split.

    Every token of the split is a target once, in non-overlapping windows of block_size; with
    `n_batches`, that many fixed random batches instead. Returns {split}_loss, _ppl, _accuracy, _bpb (bits per
    byte), tokens.
    """
    data = as_prepared(data) if isinstance(data, (str, Path)) else data
    dev = hardware.select_device(device)
    checkpoint_dir = None
    if isinstance(run_or_model, (str, Path)):
        path = repo_path(run_or_model)
        if (path / "checkpoints").exists():
            run_or_model = Run.load(path)
        else:
            checkpoint_dir, run_or_model = path, load_model(path, dev)
    if isinstance(run_or_model, Run):
        which = "best" if run_or_model.best_checkpoint else "last"
        checkpoint_dir = find_checkpoint(run_or_model.out_dir / "checkpoints" / which)
        model = run_or_model.load_model(which, dev)
    else:
        model = run_or_model.to(dev)
    check_checkpoint_fits_data(checkpoint_dir, model.config.vocab_size, data)
    block = model.config.block_size
    tokens = data.tokens(split)
    batches = (
        eval_batches(tokens, block, batch_size, n_batches, device=dev)
        if n_batches
        else tiled_batches(tokens, block, batch_size, device=dev)
    )
    torch_dtype = hardware.resolve_dtype(dtype, dev)
    autocast = torch.autocast(dev.type, dtype=torch_dtype, enabled=torch_dtype != torch.float32)
    out = evaluate_batches(model, batches, autocast=autocast, token_bytes=torch.as_tensor(data.token_bytes, device=dev))
    return {f"{split}_{k}": out[k] for k in ("loss", "ppl", "accuracy", "bpb")} | {"tokens": out["tokens"]}
