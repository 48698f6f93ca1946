"""Faults injected for real: kill -9 of training and pipeline processes, a lock held by a live run,
disk full, fp16 overflow, gradient spikes, mismatched and malicious checkpoints. See RELIABILITY.md.

The CLI runs are tiny (d_model 32, block 32) and deterministic, so an interrupted-and-resumed run
must reproduce an uninterrupted one exactly.
"""

import ast
import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import marked_environment, train_with, wait_until_ended

from labutils.checkpoints import load_checkpoint, load_model, save_model, verify_manifest
from labutils.config import TrainConfig
from labutils.data import prepare_data
from labutils.evaluation import evaluate
from labutils.files import REPO_ROOT
from labutils.model import GPT, ModelConfig
from labutils.validation import CheckpointError, TrainingError

MODEL = dict(block_size=32, d_model=32, n_layer=2, n_head=2)
TRAIN = dict(
    device="cpu",
    dtype="fp32",
    deterministic=True,
    lr=3e-3,
    warmup_steps=5,
    batch_size=8,
    eval_batches=2,
    max_steps=300,
    eval_interval=20,
    checkpoint_interval=10,
    log_interval=5,
)
# Columns that measure the machine, not the optimisation: they differ between any two runs.
TIMING = ["tokens_per_s", "mfu", "peak_memory_mb", "elapsed_s"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_data("tinyshakespeare", "char", out_dir=tmp_path_factory.mktemp("data") / "char")


def run_json(folder: Path, data, out_dir: Path, **train_overrides) -> Path:
    path = folder / f"{out_dir.name}.json"
    path.write_text(
        json.dumps(
            {"model": MODEL, "train": {**TRAIN, **train_overrides}, "data": str(data.dir), "out_dir": str(out_dir)}
        )
    )
    return path


def cli(config: Path) -> list[str]:
    return [sys.executable, "-m", "labutils.training", "--config", str(config), "--no-progress"]


def optimisation_record(out_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return pd.read_csv(out_dir / "metrics.csv").drop(columns=TIMING), pd.read_csv(out_dir / "evals.csv")


def wait_for(condition, what: str, proc=None, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(
                f"the process ended (exit {proc.returncode}) before {what}: "
                f"{proc.stderr.read()[-2000:] if proc.stderr else ''}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def logged_steps(out_dir: Path) -> int:
    try:
        return max(0, len((out_dir / "metrics.csv").read_text().splitlines()) - 1)
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce."""
    folder = tmp_path_factory.mktemp("reference")
    out = folder / "run"
    result = subprocess.run(
        cli(run_json(folder, data, out)), cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == TRAIN["max_steps"]
    return optimisation_record(out)


def assert_same_run(out_dir: Path, reference) -> None:
    metrics, evals = optimisation_record(out_dir)
    pd.testing.assert_frame_equal(metrics, reference[0])
    pd.testing.assert_frame_equal(evals, reference[1])


# --------------------------------------------------------------------------- kill -9


@pytest.mark.slow
def test_kill_9_mid_run_then_the_same_command_resumes_to_the_same_metrics(data, tmp_path, reference):
    out = tmp_path / "run"
    command = cli(run_json(tmp_path, data, out))
    victim = subprocess.Popen(command, cwd=REPO_ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    wait_for(
        lambda: logged_steps(out) >= 20 and (out / "checkpoints/last/manifest.json").exists(), "100 steps", victim
    )  # of 300
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL
    assert not (out / "summary.json").exists(), "the run ended before the kill: the test proved nothing"
    assert (out / ".lock").exists()  # left behind by the dead process; the next run takes it over
    killed_at = load_checkpoint(out / "checkpoints/last")["trainer"]["progress"]["step"]
    assert 0 < killed_at < TRAIN["max_steps"]

    again = subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((out / "environment.json").read_text())["resumed_from_step"] == killed_at
    assert_same_run(out, reference)
    assert not (out / ".lock").exists()


# torch.save that dies (SIGKILL) half-way through the third write of checkpoints/last's weights.
DIE_WHILE_SAVING = """
import os, signal, sys, torch
real_save, seen = torch.save, []
def save(obj, f, *args, **kwargs):
    if "/.last." in str(f) and str(f).endswith("model.pt"):
        seen.append(f)
        if len(seen) == 3:
            real_save(obj, f, *args, **kwargs)
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
from labutils.training import main
main(["--config", sys.argv[1], "--no-progress"])
"""


@pytest.mark.slow
def test_kill_9_while_a_checkpoint_is_written_keeps_the_previous_one(data, tmp_path, reference):
    out = tmp_path / "run"
    config = run_json(tmp_path, data, out)
    dying = subprocess.run(
        [sys.executable, "-c", DIE_WHILE_SAVING, str(config)],
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert dying.returncode == -signal.SIGKILL, dying.stderr[-2000:]
    assert list((out / "checkpoints").glob(".last.*.tmp")), (
        "no half-written checkpoint: the kill came at the wrong time"
    )
    verify_manifest(out / "checkpoints/last")  # the previous checkpoint and its manifest are intact
    assert load_checkpoint(out / "checkpoints/last")["trainer"]["progress"]["step"] == 2 * TRAIN["checkpoint_interval"]

    again = subprocess.run(cli(config), cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((out / "environment.json").read_text())["resumed_from_step"] == 2 * TRAIN["checkpoint_interval"]
    assert_same_run(out, reference)
    assert not list((out / "checkpoints").glob(".*.tmp"))  # the debris was cleaned up


# A second training process that imports first and waits for the signal to start, so it reaches
# the lock while the first process is surely still running.
WAIT_THEN_TRAIN = """
import sys, time, pathlib
from labutils.training import main
while not pathlib.Path(sys.argv[2]).exists():
    time.sleep(0.01)
main(["--config", sys.argv[1], "--no-progress"])
"""


@pytest.mark.slow
def test_second_process_on_the_same_out_dir_is_refused_and_the_first_is_unharmed(data, tmp_path, reference):
    out, go = tmp_path / "run", tmp_path / "go"
    config = run_json(tmp_path, data, out)
    second = subprocess.Popen(
        [sys.executable, "-c", WAIT_THEN_TRAIN, str(config), str(go)],
        cwd=REPO_ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = subprocess.Popen(cli(config), cwd=REPO_ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: logged_steps(out) >= 20, "the first run to start", first)
    go.touch()
    _, err = second.communicate(timeout=60)
    assert second.returncode != 0 and "in use by another run" in err, err[-2000:]
    assert first.poll() is None, "the first run ended before the second one tried: the test proved nothing"
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    assert_same_run(out, reference)


def _stage_notebook(path: Path, body: str) -> Path:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell('out_dir = "x"\narchive_reason = "re-run"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [
        params,
        nbformat.v4.new_code_cell(
            "import pathlib, time\nfrom labutils import stage_folders\n"
            "stage = stage_folders.start_stage(out_dir, archive_reason, parameters={})\n" + body
        ),
    ]
    nbformat.write(nb, path)
    return path


PIPELINE = """
import sys
from pathlib import Path
from labutils import pipeline
pipeline.run_pipeline(sorted(Path(sys.argv[1]).glob("*.ipynb")), {}, progress=False, results_dir=Path(sys.argv[2]))
"""


def _tree(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_killed_pipeline_continues_from_the_first_unfinished_stage(tmp_path):
    nbs, results, gate = tmp_path / "nbs", tmp_path / "results", tmp_path / "slow"
    nbs.mkdir()
    _stage_notebook(
        nbs / "01_first.ipynb", 'stage_folders.write_handoff(stage / "out.json", {"value": 2}, headline=["value"])'
    )
    _stage_notebook(
        nbs / "02_second.ipynb",
        f'(stage / "started").touch()\nwhile pathlib.Path({str(gate)!r}).exists():\n'
        '    time.sleep(0.05)\nstage_folders.write_handoff(stage / "out.json", {"value": 3})',
    )
    _stage_notebook(
        nbs / "03_third.ipynb",
        'a = stage_folders.read_handoff(stage.parent / "01_first/out.json")["value"]\n'
        'b = stage_folders.read_handoff(stage.parent / "02_second/out.json")["value"]\n'
        'stage_folders.write_handoff(stage / "out.json", {"product": a * b})',
    )
    gate.touch()
    command = [sys.executable, "-c", PIPELINE, str(nbs), str(results)]
    # its own session, so the kill reaches the notebook kernel too, as a killed terminal would
    env, marker = marked_environment(ENV)
    runner = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE, text=True
    )
    wait_for(lambda: (results / "02_second/started").exists(), "stage 2 to start", runner)
    finished_stage = _tree(results / "01_first")
    os.killpg(runner.pid, signal.SIGKILL)
    runner.wait(timeout=60)
    assert not (results / "02_second/run.json").exists()
    wait_until_ended(
        marker
    )  # the kernel has its own session: it ends itself once it sees its parent gone (ipykernel's parent poller)
    gate.unlink()

    again = subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "01_first: finished earlier with the same inputs, skipped" in again.stdout
    assert _tree(results / "01_first") == finished_stage  # not recomputed, not touched
    assert json.loads((results / "03_third/out.json").read_text()) == {"product": 6}
    assert all(json.loads((results / s / "run.json").read_text())["ok"] for s in ("02_second", "03_third"))
    # the killed stage was continued in its own folder (same inputs), not archived and started over
    assert (
        not (tmp_path / "archive").exists()
        and len(json.loads((results / "02_second/stage.json").read_text())["resumed"]) == 1
    )


# --------------------------------------------------------------------------- disk


def test_too_little_disk_fails_before_training(data, tmp_path, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=5 * 2**20))
    with pytest.raises(TrainingError, match=r"has 5 MiB free, but this run's checkpoints need about \d+ MiB"):
        train_with(MODEL, TrainConfig(**{**TRAIN, "max_steps": 20}), data, tmp_path / "run", progress=False)
    assert not (tmp_path / "run/metrics.csv").exists() and not (tmp_path / "run/.lock").exists()


def test_disk_full_while_checkpointing_stops_cleanly_and_resumes(data, tmp_path, monkeypatch):
    cfg = TrainConfig(**{**TRAIN, "max_steps": 60})
    uninterrupted = train_with(MODEL, cfg, data, tmp_path / "reference", progress=False)
    real_save, saves = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        if str(f).endswith("model.pt") and "/.last." in str(f):
            saves.append(f)
            if len(saves) == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(
        TrainingError, match=r"'last' checkpoint at step 30 \(No space left on device\).*previous one is intact"
    ):
        train_with(MODEL, cfg, data, tmp_path / "run", progress=False)
    assert load_checkpoint(tmp_path / "run/checkpoints/last")["trainer"]["progress"]["step"] == 20
    monkeypatch.setattr(torch, "save", real_save)  # space freed: the same call resumes
    resumed = train_with(MODEL, cfg, data, tmp_path / "run", progress=False)
    pd.testing.assert_frame_equal(resumed.evals, uninterrupted.evals)


# --------------------------------------------------------------------------- numerical faults


class _InfiniteGradient(torch.autograd.Function):
    """Identity forward, infinite backward: the overflow fp16 training meets, on demand."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_fp16_overflow_is_absorbed_by_the_gradient_scaler(data, tmp_path, hooked):
    hooked.at, hooked.action, hooked.once = 30, _InfiniteGradient.apply, True
    cfg = TrainConfig(**{**TRAIN, "dtype": "fp16", "deterministic": False, "max_steps": 40, "eval_interval": 40})
    with pytest.warns(
        UserWarning, match=r"spike at step 30: (inf|nan) .*fp16 overflow: the gradient scaler skipped this step"
    ):
        run = train_with(MODEL, cfg, data, tmp_path / "run", progress=False)
    assert run.summary["status"] == "completed" and run.summary["steps"] == 40
    assert run.history["train_loss"].map(math.isfinite).all()
    assert not math.isfinite(run.history.set_index("step").loc[30, "grad_norm"])
    assert 30 in run.summary["grad_spike_steps"]
    scale = load_checkpoint(tmp_path / "run/checkpoints/last")["trainer"]["scaler"]["scale"]
    assert scale < 2.0**16  # the scaler backed off instead of applying an infinite update
    model = run.load_model("last")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_gradient_norm_spikes_are_logged(data, tmp_path, hooked):
    hooked.at, hooked.action, hooked.once = 35, lambda loss: loss * 1000.0, True
    cfg = TrainConfig(**{**TRAIN, "max_steps": 40, "eval_interval": 40})
    with pytest.warns(UserWarning, match=r"gradient norm spike at step 35"):
        run = train_with(MODEL, cfg, data, tmp_path / "run", progress=False)
    assert run.summary["grad_spike_steps"] == [35] and run.summary["grad_spikes"] == 1
    assert json.loads((tmp_path / "run/summary.json").read_text())["grad_spike_steps"] == [35]


# --------------------------------------------------------------------------- checkpoints that do not fit, or attack


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    train_with(MODEL, TrainConfig(**{**TRAIN, "max_steps": 10, "eval_interval": 10}), data, out, progress=False)
    return out


def test_checkpoint_with_another_vocabulary_is_refused(trained, tmp_path):
    byte_data = prepare_data("tinyshakespeare", "byte", out_dir=tmp_path / "bytes")
    with pytest.raises(CheckpointError, match=r"vocabulary of 65 ids but the data .* uses 256"):
        evaluate(trained, byte_data)


def test_checkpoint_with_another_tokenizer_is_refused(trained, tmp_path):
    corpus = tmp_path / "other.txt"
    corpus.write_text(("".join(chr(c) for c in range(0x400, 0x400 + 59)) + "\n") * 200)  # 60 other characters
    other = prepare_data(corpus, "char", out_dir=tmp_path / "other")
    assert other.vocab_size <= 65
    with pytest.raises(
        CheckpointError, match=r"trained with tokenizer char \(65 characters\).*uses char \(60 characters\)"
    ):
        evaluate(trained, other)
    with pytest.raises(CheckpointError, match="trained with tokenizer char"):
        # resuming on other data: the same model config (vocab 65 fits 60 ids), but the ids mean other characters
        train_with(
            {**MODEL, "vocab_size": 65}, TrainConfig(**{**TRAIN, "max_steps": 20}), other, trained, progress=False
        )


class _Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint from the internet would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_checkpoint_does_not_run_code(tmp_path):
    from labutils.checkpoints import write_manifest

    folder = save_model(GPT(ModelConfig(vocab_size=65, **MODEL)), tmp_path / "model")
    marker = tmp_path / "pwned"
    torch.save({"weights": _Payload(marker)}, folder / "model.pt")
    write_manifest(folder)  # an attacker can publish matching hashes: the manifest is no defence here
    with pytest.raises(CheckpointError, match="could not be loaded safely"):
        load_model(folder)
    assert not marker.exists()


def test_library_never_evals_and_always_loads_weights_only():
    """Static guarantees: no eval/exec anywhere, and every torch.load passes weights_only=True."""
    offenders = []
    for path in sorted((REPO_ROOT / "labutils").rglob("*.py")) + sorted(
        (REPO_ROOT / "benchmarks").glob("*.py")
    ):  # model/ too
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            if isinstance(node.func, ast.Name) and name in ("eval", "exec"):
                offenders.append(f"{path.name}:{node.lineno} calls {name}")
            if name == "load" and getattr(node.func.value, "id", "") == "torch":
                safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords)
                if not safe:
                    offenders.append(f"{path.name}:{node.lineno} torch.load without weights_only=True")
    assert not offenders, offenders


def test_resuming_with_another_model_config_is_refused(data, trained):
    with pytest.raises(
        TrainingError, match="holds a different model config than this run's; use another out_dir or resume=False"
    ):
        train_with({**MODEL, "d_model": 64}, TrainConfig(**{**TRAIN, "max_steps": 20}), data, trained, progress=False)


def test_out_of_memory_in_evaluation_names_the_fix(data, tmp_path, monkeypatch):
    from labutils import training as train_mod

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(train_mod, "evaluate_batches", oom)
    with pytest.raises(
        TrainingError,
        match=r"out of memory evaluating at step 10 .* eval batches of 8 x 32 tokens; lower eval_batch_size",
    ):
        train_with(
            MODEL,
            TrainConfig(**{**TRAIN, "max_steps": 20, "eval_interval": 10}),
            data,
            tmp_path / "run",
            progress=False,
        )
