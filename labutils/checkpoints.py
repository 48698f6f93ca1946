"""Checkpoints and saved models, verified by SHA-256 manifests: nothing half-written is ever loaded.

A checkpoint is a folder. Every file in it is written to a temporary name and renamed into place,
and `manifest.json` (written last) lists each file's SHA-256. Loading verifies the manifest first,
so a truncated or tampered file is refused with the name of the file that changed.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .files import atomic_write, atomic_write_json, sha256_file, umask
from .model import GPT, ModelConfig
from .model.utils import unwrap
from .validation import CheckpointError, ConfigError

MANIFEST = "manifest.json"


def write_manifest(directory: str | Path, files: list[str] | None = None) -> Path:
    """Hash `files` (default: every file in `directory` but the manifest) into manifest.json."""
    directory = Path(directory)
    if files is None:
        files = sorted(
            p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
        )
    entries = {
        name: {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size} for name in files
    }
    return atomic_write_json(directory / MANIFEST, {"files": entries})


def verify_manifest(directory: str | Path) -> dict[str, Any]:
    """Check every file listed in manifest.json; raise CheckpointError naming the first mismatch."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.exists():
        raise CheckpointError(
            f"{directory} has no {MANIFEST}: it is not a complete checkpoint (was its write interrupted?)"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{manifest_path} is not valid JSON ({exc}); the checkpoint cannot be trusted") from None
    for name, entry in manifest.get("files", {}).items():
        path = directory / name
        if not path.exists():
            hint = (
                (
                    " Weights larger than stage_folders.SHIP_LIMIT_BYTES are not committed to git: rebuild them by "
                    "running again what "
                    "wrote this folder (for the pipeline's stages `FORCE=1 make pipeline`, or that stage's notebook)"
                )
                if name.endswith(".pt")
                else ""
            )
            raise CheckpointError(f"{path} is listed in the manifest but missing.{hint}")
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise CheckpointError(
                f"hash mismatch for {path}: manifest says {entry['sha256'][:12]}…, file is {actual[:12]}…; "
                "the file is truncated or was modified. Use another checkpoint (e.g. 'last' instead of 'best')."
            )
    return manifest


# --------------------------------------------------------------------------- training checkpoints
# A training checkpoint is a folder (checkpoints/best, checkpoints/last) holding model.pt,
# config.json, tokenizer.json, trainer_state.pt and manifest.json. The folder is built under a
# temporary name and swapped in by rename, so a kill at any moment leaves a complete checkpoint.

MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE, TRAINER_FILE = "model.pt", "config.json", "tokenizer.json", "trainer_state.pt"


def to_safe(obj: Any) -> Any:
    """Replace NumPy values by Python numbers and tensors, which `torch.load(weights_only=True)` accepts."""
    if isinstance(obj, dict):
        return {k: to_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_safe(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _backup_path(directory: Path) -> Path:
    return directory.with_name(f".{directory.name}.old")


def find_checkpoint(directory: str | Path) -> Path | None:
    """The complete checkpoint at `directory`, or its backup when a swap was interrupted; else None."""
    directory = Path(directory)
    for candidate in (directory, _backup_path(directory)):
        if (candidate / MANIFEST).exists():
            return candidate
    return None


def save_checkpoint(
    directory: str | Path,
    *,
    model_state: dict,
    model_config: dict,
    trainer_state: dict | None = None,
    tokenizer_file: str | Path | None = None,
) -> Path:
    """Write a checkpoint folder atomically: build it beside `directory`, then swap it in."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    for stale in directory.parent.glob(f".{directory.name}.*.tmp"):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    os.chmod(tmp, 0o777 & ~umask())
    try:
        torch.save(model_state, tmp / MODEL_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(model_config, indent=2, default=str) + "\n")
        if tokenizer_file is not None and Path(tokenizer_file).exists():
            shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
        if trainer_state is not None:
            torch.save(to_safe(trainer_state), tmp / TRAINER_FILE)
        for path in tmp.iterdir():
            _fsync(path)
        write_manifest(tmp)
        backup = _backup_path(directory)
        if not directory.exists() and backup.exists():  # a previous swap was cut short: restore first
            backup.rename(directory)
        shutil.rmtree(backup, ignore_errors=True)
        if directory.exists():
            directory.rename(backup)
        tmp.rename(directory)
        shutil.rmtree(backup, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def load_checkpoint(directory: str | Path, *, map_location: Any = "cpu", trainer: bool = True) -> dict[str, Any]:
    """Verify the manifest, then load {'model', 'config', 'trainer', 'path'} with weights_only=True."""
    directory = Path(directory)
    path = find_checkpoint(directory)
    if path is None:
        raise CheckpointError(
            f"no complete checkpoint at {directory} (no {MANIFEST}); was the run stopped before its first save?"
        )
    verify_manifest(path)
    try:
        out = {
            "path": path,
            "model": torch.load(path / MODEL_FILE, map_location=map_location, weights_only=True),
            "config": json.loads((path / CONFIG_FILE).read_text()),
            "trainer": None,
        }
        if trainer and (path / TRAINER_FILE).exists():
            out["trainer"] = torch.load(path / TRAINER_FILE, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} passed its manifest but could not be loaded safely ({exc})") from None
    return out


# --------------------------------------------------------------------------- saved models


def save_model(model: nn.Module, directory: str | Path, tokenizer: Any = None) -> Path:
    """Write model.pt, config.json, tokenizer.json (if given, via tokenizer.save) and the manifest."""
    model = unwrap(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(directory / MODEL_FILE, lambda tmp: torch.save(state, tmp))
    atomic_write(directory / CONFIG_FILE, model.config.to_json)
    files = [MODEL_FILE, CONFIG_FILE]
    if tokenizer is not None:
        atomic_write(directory / TOKENIZER_FILE, lambda tmp: tokenizer.save(tmp))
        files.append(TOKENIZER_FILE)
    write_manifest(directory, files)
    return directory


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> GPT:
    """Verify the manifest, rebuild GPT from config.json, load model.pt; returns it in eval mode."""
    directory = Path(directory)
    verify_manifest(directory)
    try:
        config = ModelConfig.from_json(directory / CONFIG_FILE)
    except ConfigError as exc:
        raise CheckpointError(f"{directory / CONFIG_FILE} is not a valid model config: {exc}") from None
    model = GPT(config)
    try:
        state = torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as exc:  # weights_only refuses anything but tensors and plain data
        raise CheckpointError(
            f"{directory / MODEL_FILE} passed its manifest but could not be loaded safely ({exc})"
        ) from None
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        problems = [
            f"{label}: {items[:5]}{' …' if len(items) > 5 else ''}"
            for label, items in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("checkpoint vs config shape", wrong_shape),
            )
            if items
        ]
        raise CheckpointError(
            f"{directory / MODEL_FILE} does not fit {directory / CONFIG_FILE}: " + "; ".join(problems)
        )
    model.load_state_dict(state)
    return model.to(device).eval()
