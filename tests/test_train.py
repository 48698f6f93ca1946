"""The training loop on CPU with a tiny GPT (d_model 32, 2 layers, block 32) on the bundled corpus."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import free_port, train_with

from labutils import memory
from labutils import training as train_mod
from labutils.checkpoints import find_checkpoint, load_checkpoint
from labutils.config import RunConfig, TrainConfig, model_config
from labutils.data import prepare_data
from labutils.evaluation import EVAL_COLUMNS, Run, evaluate
from labutils.files import REPO_ROOT
from labutils.model import GPT, ModelConfig
from labutils.optim import lr_factor
from labutils.training import forward_backward, train
from labutils.validation import CheckpointError, ConfigError, TrainingError

pytestmark = pytest.mark.usefixtures("one_thread")


MODEL = dict(block_size=32, d_model=32, n_layer=2, n_head=2)
BASE = dict(device="cpu", dtype="fp32", lr=3e-3, warmup_steps=2, batch_size=8, eval_batches=2, log_interval=5)


def cfg(**overrides) -> TrainConfig:
    return TrainConfig(**{**BASE, **overrides})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_data("tinyshakespeare", "char", out_dir=tmp_path_factory.mktemp("data") / "shakespeare-char")


class Killed(Exception):
    pass


def kill(loss):
    raise Killed


# --------------------------------------------------------------------------- learning and the run folder


def test_loss_falls_and_run_folder_is_complete(data, tmp_path):
    run = train_with(MODEL, cfg(max_steps=40, eval_interval=20), data, tmp_path / "run", progress=False)
    assert list(run.history.step) == list(range(1, 41))
    assert run.evals.val_loss.iloc[-1] < math.log(data.vocab_size) - 0.5
    assert run.history.train_loss.tail(5).mean() < run.history.train_loss.head(5).mean() - 0.5
    assert run.summary["stop_reason"] == "max_steps" and run.summary["steps"] == 40
    for name in ("config.json", "metrics.csv", "evals.csv", "summary.json", "environment.json"):
        assert (run.out_dir / name).exists(), name
    assert not (run.out_dir / ".lock").exists()
    env = json.loads((run.out_dir / "environment.json").read_text())
    assert {"torch", "device_name", "git_commit", "seed", "python", "hostname"} <= set(env)
    config = json.loads((run.out_dir / "config.json").read_text())
    assert config["train"]["max_steps"] == 40 and config["model"]["vocab_size"] == data.vocab_size
    for ckpt in (run.best_checkpoint, run.last_checkpoint):
        assert sorted(p.name for p in ckpt.iterdir()) == [
            "config.json",
            "manifest.json",
            "model.pt",
            "tokenizer.json",
            "trainer_state.pt",
        ]
    from labutils.checkpoints import load_model

    assert isinstance(load_model(run.best_checkpoint), GPT)
    loaded = Run.load(run.out_dir)
    pd.testing.assert_frame_equal(loaded.history, run.history, check_dtype=False)
    assert loaded.summary["best_val_loss"] == run.summary["best_val_loss"]
    result = evaluate(run, data, split="test")
    assert set(result) == {"test_loss", "test_ppl", "test_accuracy", "test_bpb", "tokens"}
    assert result["test_loss"] < math.log(data.vocab_size) and result["tokens"] > 10_000
    # char-level on ASCII text: a token is a byte, so bits per byte are the loss in bits
    assert result["test_bpb"] == pytest.approx(result["test_loss"] / math.log(2), rel=1e-9)
    assert run.summary["val_bpb"] == pytest.approx(run.summary["val_loss"] / math.log(2), rel=1e-9)
    assert list(pd.read_csv(run.out_dir / "evals.csv").columns) == EVAL_COLUMNS
    # a finished run is not trained again
    again = train_with(MODEL, cfg(max_steps=40, eval_interval=20), data, tmp_path / "run", progress=False)
    assert again.summary["steps"] == 40 and len(again.history) == 40


def test_compile_blocks_compiles_each_block_in_place_and_not_the_model(data, tmp_path, monkeypatch):
    """The wiring only (a real compile is in test_gpu.py): every Block is compiled once, the GPT itself is not,
    and the checkpoint's keys are the eager model's."""
    from torch import nn

    compiled, whole = [], []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: compiled.append((type(self).__name__, kw.get("mode"))))
    monkeypatch.setattr(torch, "compile", lambda model, **kw: whole.append(model) or model)
    run = train_with(
        MODEL,
        dict(
            device="cpu",
            compile=True,
            compile_blocks=True,
            compile_mode="reduce-overhead",
            max_steps=2,
            eval_interval=2,
            eval_batches=1,
            batch_size=4,
            warmup_steps=0,
        ),
        data,
        tmp_path,
        progress=False,
    )
    assert compiled == [("Block", "reduce-overhead")] * MODEL["n_layer"] and whole == []
    assert run.summary["compile"] is True
    assert set(run.load_model().state_dict()) == set(GPT(ModelConfig(**MODEL, vocab_size=data.vocab_size)).state_dict())


def test_resume_is_bit_exact(data, tmp_path, hooked):
    # dropout, EMA and accumulation make every piece of state (RNG, EMA, optimiser, sampler) matter
    model = {**MODEL, "dropout": 0.1}
    tc = cfg(
        max_steps=20, batch_size=4, grad_accum_steps=2, ema=0.9, eval_interval=5, checkpoint_interval=10, log_interval=3
    )
    straight = train_with(model, tc, data, tmp_path / "straight", progress=False)

    hooked.calls, hooked.at, hooked.action = 0, 27, kill  # dies in step 14, after the step-12 log
    with pytest.raises(Killed):
        train_with(model, tc, data, tmp_path / "resumed", progress=False)
    assert load_checkpoint(tmp_path / "resumed/checkpoints/last")["trainer"]["progress"]["step"] == 10
    assert pd.read_csv(tmp_path / "resumed/metrics.csv").step.max() == 12
    hooked.at = None
    resumed = train_with(model, tc, data, tmp_path / "resumed", progress=False)

    for which in ("last", "best"):
        a = load_checkpoint(tmp_path / f"straight/checkpoints/{which}")["model"]
        b = load_checkpoint(tmp_path / f"resumed/checkpoints/{which}")["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), which
    for col in ("train_loss", "grad_norm", "lr", "tokens"):
        assert straight.history[col].tolist() == resumed.history[col].tolist(), col
    for col in ("val_loss", "val_accuracy", "val_loss_ema"):
        assert straight.evals[col].tolist() == resumed.evals[col].tolist(), col
    assert pd.read_csv(tmp_path / "resumed/metrics.csv").step.tolist() == list(range(1, 21))
    assert resumed.summary["best_weights"] == "ema" and not straight.evals.val_loss_ema.isna().any()


@pytest.mark.parametrize("padded", [False, True])
def test_accumulation_2x8_gives_the_gradient_of_the_batch_of_16(padded):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=65, **MODEL))
    x = torch.randint(0, 65, (16, 32))
    y = torch.randint(0, 65, (16, 32))
    if padded:  # document mode pads with ignored targets: the first micro-batch counts 8 x 4 targets, the second 8 x 32
        y[:8, 4:] = -100
    _, loss = model(x, y)
    loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    mean_loss = forward_backward(model, [(x[:8], y[:8]), (x[8:], y[8:])], autocast=torch.autocast("cpu", enabled=False))
    torch.testing.assert_close(mean_loss, loss.detach())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    if padded:  # the old rule (each micro-batch's mean counted equally) is measurably different here
        model.zero_grad()
        for xs, ys in [(x[:8], y[:8]), (x[8:], y[8:])]:
            (model(xs, ys)[1] / 2).backward()
        assert (model.tok_emb.weight.grad - expected["tok_emb.weight"]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def fp32_reference(data, tmp_path_factory):
    return train_with(
        MODEL,
        cfg(dtype="fp32", max_steps=30, eval_interval=30, lr=3e-3),
        data,
        tmp_path_factory.mktemp("fp32") / "run",
        progress=False,
    )


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_follows_fp32(data, tmp_path, dtype, fp32_reference):
    run = train_with(
        MODEL, cfg(dtype=dtype, max_steps=30, eval_interval=30, lr=3e-3), data, tmp_path / dtype, progress=False
    )
    assert run.summary["dtype"] == {"bf16": "bfloat16", "fp16": "float16"}[dtype]
    ours, ref = run.history.train_loss.to_numpy(), fp32_reference.history.train_loss.to_numpy()
    assert abs(ours[0] - ref[0]) < 0.02  # the same first batch and weights: only rounding differs
    assert abs(ours - ref).max() < 0.1 and abs(run.summary["val_loss"] - fp32_reference.summary["val_loss"]) < 0.05
    assert ref[-1] < ref[0] - 0.3  # fp32 learned, so following it means something


@pytest.mark.parametrize(
    "overrides",
    [
        dict(optimizer="muon", layer_lr_decay=0.8, label_smoothing=0.1),
        dict(batch_mode="document", schedule="wsd", grad_clip=0.0),
        dict(deterministic=True, data_on_device=False, schedule="linear"),
    ],
)
def test_options_run_with_the_schedule_they_ask_for(data, tmp_path, overrides):
    deterministic = torch.are_deterministic_algorithms_enabled()
    run = train_with(
        MODEL, cfg(max_steps=6, eval_interval=3, log_interval=1, **overrides), data, tmp_path / "run", progress=True
    )
    assert run.history.train_loss.notna().all() and len(run.evals) == 2
    assert torch.are_deterministic_algorithms_enabled() == deterministic  # global flag restored
    tcfg = cfg(max_steps=6, **overrides)
    expected = [
        tcfg.lr
        * lr_factor(
            step - 1,
            6,
            schedule=tcfg.schedule,
            warmup_steps=tcfg.warmup_steps,
            min_lr_ratio=tcfg.min_lr_ratio,
            decay_frac=tcfg.decay_frac,
        )
        for step in run.history.step
    ]
    assert run.history.lr.tolist() == pytest.approx(expected)  # the logged LR is the schedule's, step by step


def test_label_smoothing_raises_the_optimised_loss_but_not_the_scored_one(data, tmp_path):
    config = dict(max_steps=40, eval_interval=40, log_interval=1, warmup_steps=0, lr=1e-2)
    plain = train_with(MODEL, cfg(**config), data, tmp_path / "plain", progress=False)
    smooth = train_with(MODEL, cfg(**config, label_smoothing=0.1), data, tmp_path / "smooth", progress=False)
    # once predictions are peaked, the smoothed target costs more than the one-hot one
    assert smooth.history.train_loss.iloc[-5:].mean() > plain.history.train_loss.iloc[-5:].mean() + 0.05
    # what is scored stays plain cross-entropy: below the smoothed loss it was trained on, close to the plain run's
    assert smooth.summary["val_loss"] < smooth.history.train_loss.iloc[-5:].mean()
    rescored = evaluate(smooth, data, "val", batch_size=8, n_batches=2, device="cpu")[
        "val_loss"
    ]  # plain CE, same batches
    assert smooth.summary["val_loss"] == pytest.approx(rescored, rel=1e-5)


# --------------------------------------------------------------------------- stopping


def test_early_stopping_after_patience(data, tmp_path, monkeypatch):
    val = iter([3.0, 2.5, 2.6, 2.7, 2.4, 2.3])
    monkeypatch.setattr(
        train_mod,
        "evaluate_batches",
        lambda *a, **k: {"loss": next(val), "ppl": 1.0, "accuracy": 0.0, "tokens": 1, "bpb": 1.0},
    )
    run = train_with(
        MODEL, cfg(max_steps=100, eval_interval=2, early_stopping_patience=2), data, tmp_path / "run", progress=False
    )
    assert run.summary["stop_reason"] == "early_stopping"
    assert run.summary["steps"] == 8 and run.summary["best_step"] == 4 and run.summary["best_val_loss"] == 2.5
    assert load_checkpoint(run.best_checkpoint)["trainer"]["progress"]["step"] == 4


def test_on_eval_hook_sees_every_evaluation_and_can_stop_the_run(data, tmp_path):
    seen = []

    def hook(step, metrics):
        seen.append((step, metrics["val_loss"]))
        if step == 4:
            raise Killed

    with pytest.raises(Killed):
        train_with(MODEL, cfg(max_steps=10, eval_interval=2), data, tmp_path / "run", progress=False, on_eval=hook)
    assert [step for step, _ in seen] == [2, 4] and all(math.isfinite(v) for _, v in seen)
    assert not (tmp_path / "run/.lock").exists()


def test_time_budget_stops(data, tmp_path):
    run = train_with(
        MODEL, cfg(max_steps=None, time_budget_s=0.5, eval_interval=10_000), data, tmp_path / "run", progress=False
    )
    assert run.summary["stop_reason"] == "time_budget"
    assert 0.5 <= run.summary["elapsed_s"] < 3.0 and run.summary["steps"] > 1
    assert len(run.evals) == 1  # a final evaluation at the stop


def test_max_tokens_stops(data, tmp_path):
    run = train_with(
        MODEL, cfg(max_steps=None, max_tokens=5 * 8 * 32 + 1, eval_interval=100), data, tmp_path / "run", progress=False
    )
    assert run.summary["stop_reason"] == "max_tokens" and run.summary["steps"] == 6


# --------------------------------------------------------------------------- failures


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(data, tmp_path, hooked):
    hooked.at, hooked.action = 7, lambda loss: loss * float("nan")
    with pytest.raises(TrainingError, match=r"loss became nan at step 7") as info:
        train_with(
            MODEL,
            cfg(max_steps=20, eval_interval=100, checkpoint_interval=5, log_interval=4),
            data,
            tmp_path / "run",
            progress=False,
        )
    assert "checkpoints/last" in str(info.value)
    ckpt = load_checkpoint(tmp_path / "run/checkpoints/last")
    assert ckpt["trainer"]["progress"]["step"] == 5
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["status"].startswith("failed: TrainingError")
    assert not (tmp_path / "run/.lock").exists()


def test_out_of_memory_names_micro_batch_and_fix(data, tmp_path, hooked):
    def oom(loss):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    hooked.at, hooked.action = 1, oom
    with pytest.raises(
        TrainingError, match=r"batch_size=8 x block_size=32.*batch_size=4, grad_accum_steps=2.*grad_checkpoint"
    ):
        train_with(MODEL, cfg(max_steps=5), data, tmp_path / "run", progress=False)
    hooked.calls = 0
    with pytest.raises(TrainingError, match=r"one sequence already: lower block_size \(now 32\)"):
        train_with(MODEL, cfg(max_steps=5, batch_size=1), data, tmp_path / "run1", progress=False)


@pytest.mark.parametrize("batch_size, available_gib, keeps_global_batch", [(10**9, 4, False), (2**16, 1, True)])
def test_a_batch_far_too_big_is_refused_before_anything_big_is_allocated(
    data, tmp_path, monkeypatch, batch_size, available_gib, keeps_global_batch
):
    # 10**9 is what `papermill ... -p batch_size 1e9` gives: it used to die in the allocator ("can't allocate
    # 520000000000 bytes")
    allocated = []
    monkeypatch.setattr(train_mod, "eval_batches", lambda *a, **k: allocated.append("eval batches"))
    monkeypatch.setattr(train_mod, "make_sampler", lambda *a, **k: allocated.append("sampler"))
    monkeypatch.setattr(
        memory, "available_memory_bytes", lambda device: available_gib * 2**30
    )  # the same on every machine
    out = tmp_path / "run"
    with pytest.raises(TrainingError) as info:
        train_with(MODEL, cfg(batch_size=batch_size, max_steps=5), data, out, progress=False)
    message = str(info.value)
    assert re.match(
        rf"Out of memory on cpu: one training step with a micro-batch of batch_size={batch_size} x block_size=32 "
        rf"tokens needs about [\d,.]+ GiB \(an estimate\) but {available_gib}\.0 GiB is available\. ",
        message,
    ), message
    assert "set grad_checkpoint=True in the model config, or use dtype='bf16'" in message
    smaller, accum = map(
        int,
        re.search(
            r"batch_size=(\d+),? with grad_accum_steps=(\d+)|\(batch_size=(\d+), grad_accum_steps=(\d+)\)", message
        ).group(*((1, 2) if not keeps_global_batch else (3, 4))),
    )
    assert ("Keep the global batch" in message) == keeps_global_batch
    if keeps_global_batch:
        assert smaller * accum == batch_size
    # a step holds the tokens of every micro-batch: 10**9 sequences cannot be kept; the largest global batch that fits
    # is named
    else:
        assert "The global batch (batch_size x grad_accum_steps = 1000000000 sequences) cannot fit either" in message
        assert smaller * accum < batch_size and f"a global batch of up to {smaller * accum} sequences" in message

    def estimate(b, a):
        return memory.step_memory_bytes(model_config(MODEL, data.vocab_size), cfg(batch_size=b, grad_accum_steps=a))

    # what it suggests fits by the same estimate (and, when the global batch cannot be kept, is the most that does)
    assert smaller <= batch_size // 2 and estimate(smaller, accum) <= available_gib * 2**30
    assert keeps_global_batch or estimate(smaller, accum + 1) > available_gib * 2**30
    assert allocated == []
    assert find_checkpoint(out / "checkpoints/last") is None and not (out / "checkpoints").exists()
    assert not (out / "summary.json").exists() and not (out / ".lock").exists()


def test_step_memory_estimate_grows_with_the_batch_and_is_sane_for_a_small_model():
    mcfg = ModelConfig(vocab_size=65, **MODEL)
    n_params = GPT(mcfg).num_params()

    def estimate(**overrides):
        return memory.step_memory_bytes(mcfg, cfg(**overrides))

    sizes = [estimate(batch_size=b) for b in (1, 2, 8, 64, 1024, 10**9)]
    assert sizes == sorted(set(sizes))  # strictly increasing
    # weights, gradients and AdamW's two moments in fp32, plus a few MiB of activations, logits and batches
    assert 16 * n_params < estimate(batch_size=8) < 16 * n_params + 8 * 2**20
    assert estimate(batch_size=8, ema=0.99) == estimate(batch_size=8) + 4 * n_params
    assert memory.step_memory_bytes(mcfg, cfg(batch_size=64), torch.bfloat16) < estimate(batch_size=64)
    checkpointed = ModelConfig(vocab_size=65, grad_checkpoint=True, **{**MODEL, "n_layer": 8})
    assert memory.step_memory_bytes(checkpointed, cfg(batch_size=64)) < memory.step_memory_bytes(
        ModelConfig(vocab_size=65, **{**MODEL, "n_layer": 8}), cfg(batch_size=64)
    )
    # the largest shapes the bundled pipeline trains (batch 64, block 256, d_model 768) pass with 16 GiB
    big = ModelConfig(vocab_size=65, block_size=256, d_model=768, n_layer=12, n_head=12)
    assert memory.step_memory_bytes(big, cfg(batch_size=64)) < memory.MEMORY_MARGIN * 16 * 2**30
    assert memory.available_memory_bytes(torch.device("cpu")) > 0
    assert memory.available_memory_bytes(torch.device("meta")) is None  # unknown devices skip the check


def test_second_run_on_same_out_dir_refuses(data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(f"{os.getpid()} {os.uname().nodename} now\n")  # a live process holds it
    with pytest.raises(TrainingError, match="in use by another run"):
        train_with(MODEL, cfg(max_steps=2, warmup_steps=1), data, out, progress=False)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / ".lock").write_text(f"{dead.pid} {os.uname().nodename} earlier\n")  # a crashed run's lock
    assert (
        train_with(MODEL, cfg(max_steps=2, warmup_steps=1, eval_interval=2), data, out, progress=False).summary["steps"]
        == 2
    )


def test_unwritable_out_dir_fails_before_training(data, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(TrainingError, match="not writable"):
        train_with(MODEL, cfg(max_steps=2, warmup_steps=1), data, tmp_path / "file" / "run", progress=False)


def test_corrupted_checkpoint_is_refused_on_resume(data, tmp_path):
    train_with(MODEL, cfg(max_steps=2, warmup_steps=1, eval_interval=2), data, tmp_path / "run", progress=False)
    weights = tmp_path / "run/checkpoints/last/model.pt"
    raw = bytearray(weights.read_bytes())
    raw[-10] ^= 0x01
    weights.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="hash mismatch"):
        train_with(MODEL, cfg(max_steps=4, eval_interval=2), data, tmp_path / "run", progress=False)


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "field, value",
    [
        ("lr", 0.0),
        ("lr", -1e-3),
        ("batch_size", 0),
        ("max_steps", 0),
        ("grad_accum_steps", 0),
        ("device", "gpu"),
        ("schedule", "cosnie"),
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


def test_unknown_keys_refused_with_suggestion():
    with pytest.raises(ConfigError, match="unknown keys 'learning_rate'"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ConfigError, match="did you mean 'max_steps'"):
        TrainConfig.from_dict({"max_step": 10})
    with pytest.raises(ConfigError, match="never stop"):
        TrainConfig(max_steps=None)
    assert TrainConfig.from_dict(TrainConfig(ema=0.99).to_dict()) == TrainConfig(ema=0.99)


def test_train_takes_a_run_config_and_prepared_data_and_names_the_builders(data, tmp_path):
    """Loose spellings are taken at the edges (RunConfig.build, as_prepared); train() says which to call."""
    config = RunConfig.build(MODEL, cfg(max_steps=2, warmup_steps=1), data.vocab_size)
    with pytest.raises(
        ConfigError, match=r"expected a RunConfig, got dict; build one with RunConfig.build\(model, train"
    ):
        train(config.to_dict(), data, tmp_path / "run")
    with pytest.raises(
        ConfigError, match=r"expected PreparedData, got PosixPath; open a prepared folder with .*as_prepared"
    ):
        train(config, data.dir, tmp_path / "run")
    small = RunConfig.build({**MODEL, "vocab_size": 10}, config.train)
    with pytest.raises(
        ConfigError, match=rf"model.vocab_size: the model has 10 token ids but the data uses {data.vocab_size}"
    ):
        train(small, data, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_package_exports_the_train_function():
    import labutils
    from labutils import train as exported  # the lazy export: there is no labutils.train submodule to shadow it

    assert exported is labutils.training.train is train
    assert labutils.TrainConfig is TrainConfig and labutils.TrainingError is TrainingError


def test_model_config_forms(data):
    resolve = model_config
    assert resolve({"preset": "final-char", "n_layer": 2}, 65).n_layer == 2
    assert resolve("final-char", 65).vocab_size == 65
    assert resolve(MODEL, 65).vocab_size == 65
    with pytest.raises(ConfigError, match="vocab_size"):
        resolve({**MODEL, "vocab_size": 10}, 65)


# --------------------------------------------------------------------------- DDP and the command line


def test_ddp_two_gloo_processes_match_one_process(data, tmp_path):
    def spec(name, batch_size):
        path = tmp_path / f"{name}.json"
        train_cfg = {
            **BASE,
            "max_steps": 6,
            "eval_interval": 3,
            "log_interval": 2,
            "batch_size": batch_size,
            "eval_batch_size": 8,
        }
        path.write_text(
            json.dumps({"model": MODEL, "train": train_cfg, "data": str(data.dir), "out_dir": str(tmp_path / name)})
        )
        return path

    single = train_mod.main(["--config", str(spec("single", 8)), "--no-progress"])
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "labutils.training",
        "--config",
        str(spec("ddp", 4)),
        "--no-progress",
    ]
    done = subprocess.run(
        cmd, env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = Run.load(tmp_path / "ddp")
    assert ddp.summary["world_size"] == 2 and ddp.summary["tokens"] == single.summary["tokens"]
    torch.testing.assert_close(
        torch.tensor(ddp.history.train_loss.values),
        torch.tensor(single.history.train_loss.values),
        rtol=1e-4,
        atol=1e-5,
    )
    torch.testing.assert_close(
        torch.tensor(ddp.evals.val_loss.values), torch.tensor(single.evals.val_loss.values), rtol=1e-4, atol=1e-5
    )
    a = load_checkpoint(tmp_path / "single/checkpoints/last")["model"]
    b = load_checkpoint(tmp_path / "ddp/checkpoints/last")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert find_checkpoint(tmp_path / "ddp/checkpoints/best") is not None


RANK_CHECKS = """
import json, pathlib, torch
from labutils import guards, hardware
from labutils.validation import TrainingError
ddp, _ = hardware.init_distributed(torch.device("cpu"))
found = {"lost": hardware.lost_ranks(ddp, timeout_s=60)}
try:  # as when rank 1 cannot see the checkpoint rank 0 resumes from (out_dir not on a shared disk)
    guards.check_ranks_resume_alike(ddp, 20 if ddp.rank == 0 else None, pathlib.Path("runs/x"))
except TrainingError as exc:
    found["error"] = str(exc)
hardware.cleanup_distributed(ddp)
print(json.dumps(found))
"""


def test_ranks_that_all_answer_are_not_lost_and_must_resume_alike():
    env = {
        **os.environ,
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_CHECKS],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    for rank in ranks:
        out, err = rank.communicate(timeout=120)
        assert rank.returncode == 0, err[-3000:]
        found = json.loads(out.strip().splitlines()[-1])
        assert found["lost"] == []  # both answered the probes: a failure then would not be blamed on a lost rank
        assert "rank 0: step 20, rank 1: no checkpoint" in found["error"] and "disk every node shares" in found["error"]


def test_throughput_leaves_out_evaluation_time_and_survives_a_resume(data, tmp_path, monkeypatch):
    import time as time_mod

    config = cfg(max_steps=40, eval_interval=10, log_interval=5)
    fast = train_with(MODEL, config, data, tmp_path / "fast", progress=False).summary["tokens_per_s"]
    real_eval = train_mod.evaluate_batches

    def slow_eval(*args, **kwargs):
        time_mod.sleep(0.5)  # far longer than the training steps of a log window
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(train_mod, "evaluate_batches", slow_eval)
    slow = train_with(MODEL, config, data, tmp_path / "slow", progress=False).summary["tokens_per_s"]
    assert slow > 0.3 * fast, (slow, fast)
    again = train_with(MODEL, config, data, tmp_path / "slow", progress=False).summary  # finished: nothing to do
    assert again["steps"] == 40 and again["tokens_per_s"] == slow


def test_peak_flops_follow_the_device_and_the_matmul_precision(monkeypatch):
    from labutils import hardware

    assert hardware.peak_flops(torch.device("cpu")) is None  # MFU is not reported on CPU
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert hardware.peak_flops(torch.device("cuda")) == 989e12
    assert hardware.peak_flops(torch.device("cuda"), torch.float32) == 989e12 / 2  # TF32
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert hardware.peak_flops(torch.device("cuda"), torch.bfloat16) == 756e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    assert hardware.peak_flops(torch.device("cuda"), torch.float16) == 125e12
    assert (
        hardware.peak_flops(torch.device("cuda"), torch.float32) == 15.7e12
    )  # no TF32 on Volta: 8x below fp16, not 2x
    assert hardware.peak_flops(torch.device("cuda"), torch.bfloat16) is None  # emulated: no meaningful peak
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Radeon Mystery 9000")
    assert hardware.peak_flops(torch.device("cuda")) is None
