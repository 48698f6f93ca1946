"""Atomic files, manifests and training checkpoint folders (labutils.files, labutils.checkpoints)."""

import random

import numpy as np
import pytest
import torch

from labutils import hardware
from labutils.checkpoints import find_checkpoint, load_checkpoint, save_checkpoint, verify_manifest, write_manifest
from labutils.files import atomic_write_text
from labutils.validation import CheckpointError


def make_checkpoint(directory, value: float = 1.0, **trainer):
    return save_checkpoint(
        directory,
        model_state={"w": torch.full((3, 3), value)},
        model_config={"d_model": 3},
        trainer_state={"step": 7, "history": [{"step": 1, "train_loss": 2.5}], **trainer},
    )


def test_round_trip_with_weights_only(tmp_path):
    path = make_checkpoint(tmp_path / "last", np_value=np.float64(1.5), np_array=np.arange(4))
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "manifest.json", "model.pt", "trainer_state.pt"]
    ckpt = load_checkpoint(path)
    assert torch.equal(ckpt["model"]["w"], torch.ones(3, 3))
    assert ckpt["config"] == {"d_model": 3}
    trainer = ckpt["trainer"]
    assert trainer["step"] == 7 and trainer["history"][0]["train_loss"] == 2.5
    assert trainer["np_value"] == 1.5 and torch.equal(trainer["np_array"], torch.arange(4))


def test_tokenizer_is_copied(tmp_path):
    tok = tmp_path / "tokenizer.json"
    tok.write_text('{"kind": "byte"}')
    path = save_checkpoint(tmp_path / "best", model_state={}, model_config={}, tokenizer_file=tok)
    assert (path / "tokenizer.json").read_text() == '{"kind": "byte"}'
    verify_manifest(path)


def test_flipped_byte_is_refused_with_hash_error(tmp_path):
    path = make_checkpoint(tmp_path / "last")
    data = bytearray((path / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "model.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="hash mismatch.*model.pt"):
        load_checkpoint(path)


def test_missing_manifest_is_not_a_checkpoint(tmp_path):
    path = make_checkpoint(tmp_path / "last")
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(path)


def test_overwrite_swaps_folder_and_cleans_up(tmp_path):
    make_checkpoint(tmp_path / "last", 1.0)
    make_checkpoint(tmp_path / "last", 2.0)
    assert torch.equal(load_checkpoint(tmp_path / "last")["model"]["w"], torch.full((3, 3), 2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    make_checkpoint(tmp_path / "last", 1.0)

    def dies(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(OSError, match="disk full"):
        make_checkpoint(tmp_path / "last", 2.0)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(tmp_path / "last")["model"]["w"], torch.ones(3, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_kill_between_renames_is_recovered(tmp_path):
    make_checkpoint(tmp_path / "last", 1.0)
    (tmp_path / "last").rename(tmp_path / ".last.old")  # what a kill mid-swap leaves behind
    assert find_checkpoint(tmp_path / "last") == tmp_path / ".last.old"
    assert torch.equal(load_checkpoint(tmp_path / "last")["model"]["w"], torch.ones(3, 3))
    make_checkpoint(tmp_path / "last", 3.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_stale_temp_folders_are_removed(tmp_path):
    (tmp_path / ".last.abc123.tmp").mkdir()
    make_checkpoint(tmp_path / "last")
    assert not (tmp_path / ".last.abc123.tmp").exists()


def test_atomic_write_and_manifest_detect_changes(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "hello")
    write_manifest(tmp_path)
    verify_manifest(tmp_path)
    (tmp_path / "a.txt").write_text("hellO")
    with pytest.raises(CheckpointError, match="a.txt"):
        verify_manifest(tmp_path)


def test_rng_states_survive_weights_only_load(tmp_path):
    hardware.seed_everything(3)
    make_checkpoint(tmp_path / "last", rng=hardware.rng_state())
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    hardware.seed_everything(99)
    hardware.set_rng_state(load_checkpoint(tmp_path / "last")["trainer"]["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
