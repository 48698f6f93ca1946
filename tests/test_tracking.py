"""Trackers: TensorBoard and MLflow see every step and evaluation metrics.csv and evals.csv hold, read back with
their own readers; a cut run resumes into the same records; a broken tracker costs the run nothing."""

import csv
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import free_port, train_with

from labutils import freshness, tracking
from labutils.validation import ConfigError

MODEL = dict(block_size=16, d_model=32, n_layer=1, n_head=2)
TRAIN = dict(device="cpu", batch_size=4, max_steps=20, warmup_steps=2, eval_interval=10, eval_batches=1, log_interval=5)


@pytest.fixture
def trackers(monkeypatch):
    """Turn sinks on for this test only (tracking.use sets the environment, which monkeypatch restores)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def turn_on(names):
        monkeypatch.setenv(tracking.TRACKING_ENV, ",".join(tracking.parse(names)))

    return turn_on


def _csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _same_series(logged, rows, column, rel=1e-6):
    """(step, value) pairs a tracker holds against the CSV's rows: the same steps, the same values (trackers store
    float32)."""
    assert [step for step, _ in logged] == [int(r["step"]) for r in rows], column
    assert [value for _, value in logged] == pytest.approx([float(r[column]) for r in rows], rel=rel), column


def _run_dir(tmp_path):
    return tmp_path / "results" / "03_ablations" / "runs" / "gqa" / "seed0"


def test_tensorboard_events_hold_every_step_and_evaluation_of_the_csv_files(tmp_path, prepared, trackers, one_thread):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trackers("tensorboard")
    out = _run_dir(tmp_path)
    train_with(MODEL, TRAIN, prepared, out, progress=False)
    events = EventAccumulator(str(out))
    events.Reload()
    steps, evals = _csv(out / "metrics.csv"), _csv(out / "evals.csv")
    for column in ("train_loss", "lr", "grad_norm", "tokens_per_s"):
        _same_series([(e.step, e.value) for e in events.Scalars(f"train/{column}")], steps, column)
    _same_series([(e.step, e.value) for e in events.Scalars("val/loss")], evals, "val_loss")
    _same_series([(e.step, e.value) for e in events.Scalars("val/bpb")], evals, "val_bpb")
    assert events.Tags()["tensors"] == ["config/text_summary"]  # the config, as text


def test_a_cut_run_resumes_into_the_same_tensorboard_and_mlflow_records(
    tmp_path, prepared, trackers, hooked, one_thread
):
    """Killed after its step-10 checkpoint, at step 15: the same command continues both records, and each step appears
    once, with the values of the finished CSV (the steps 11-15 the cut run had logged are replaced)."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trackers("tensorboard,mlflow")
    out = _run_dir(tmp_path)
    hooked.at, hooked.once = 15, True

    def interrupt(loss):
        raise KeyboardInterrupt

    hooked.action = interrupt
    with pytest.raises(KeyboardInterrupt):
        train_with(MODEL, TRAIN, prepared, out, progress=False)
    first_id = (out / "mlflow_run.json").read_text()
    hooked.at = None
    train_with(MODEL, TRAIN, prepared, out, progress=False)
    assert (out / "mlflow_run.json").read_text() == first_id  # the same MLflow run continued
    steps = _csv(out / "metrics.csv")
    events = EventAccumulator(str(out))
    events.Reload()
    assert [e.step for e in events.Scalars("train/train_loss")] == [int(r["step"]) for r in steps] == list(range(1, 21))
    uri, _ = tracking.mlflow_uri(out)
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("03_ablations").experiment_id])[0]
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/train_loss")}
    assert sorted(history) == list(range(1, 21)) and run.info.status == "FINISHED"
    assert history[20] == pytest.approx(float(steps[-1]["train_loss"]))


def _assert_mlflow_holds_the_run(client, out, config_lr: float):
    experiment = client.get_experiment_by_name("03_ablations")
    assert experiment is not None, "runs of a stage go to the experiment named after it"
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "runs/gqa/seed0" and run.info.status == "FINISHED"
    assert run.data.params["model.d_model"] == "32" and float(run.data.params["train.lr"]) == config_lr
    steps, evals = _csv(out / "metrics.csv"), _csv(out / "evals.csv")
    for name, rows, column in (("train/train_loss", steps, "train_loss"), ("val/val_loss", evals, "val_loss")):
        _same_series(
            [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)], rows, column, rel=1e-12
        )
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.json", "summary.json"}


def test_mlflow_local_store_holds_params_metrics_and_files_of_the_run(tmp_path, prepared, trackers, one_thread):
    from mlflow.tracking import MlflowClient

    trackers("mlflow")
    out = _run_dir(tmp_path)
    train_with(MODEL, TRAIN, prepared, out, progress=False)
    assert (tmp_path / "results" / "mlflow" / "mlflow.db").exists()  # beside the stage folders
    _assert_mlflow_holds_the_run(MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow' / 'mlflow.db'}"), out, 1e-3)


def test_mlflow_server_receives_the_run(tmp_path, prepared, trackers, monkeypatch, one_thread):
    from mlflow.tracking import MlflowClient

    port, store = free_port(), tmp_path / "server"
    store.mkdir()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job workers to outlive the test
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{store / 'db.sqlite'}",
            "--default-artifact-root",
            (store / "artifacts").as_uri(),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.2)
        uri = f"http://127.0.0.1:{port}"
        trackers("mlflow")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        out = _run_dir(tmp_path)
        train_with(MODEL, TRAIN, prepared, out, progress=False)
        assert not (tmp_path / "results" / "mlflow").exists()  # the server's store, not a local one
        _assert_mlflow_holds_the_run(MlflowClient(uri), out, 1e-3)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_a_failing_tracker_is_dropped_with_a_warning_and_the_run_and_its_csv_files_go_on(
    tmp_path, prepared, trackers, monkeypatch, one_thread
):
    class Broken(tracking.Sink):
        name = "broken"

        def log_eval(self, row):
            raise ConnectionError("server went away")

    monkeypatch.setitem(tracking.SINKS, "broken", Broken)
    trackers("broken")
    with pytest.warns(UserWarning, match="tracker broken failed and is off for the rest of this run: ConnectionError"):
        run = train_with(MODEL, TRAIN, prepared, tmp_path / "run", progress=False)
    assert run.summary["status"] == "completed" and len(_csv(tmp_path / "run" / "evals.csv")) == 2


def test_tracking_names_are_checked_with_the_fix():
    assert tracking.parse(None) == ["csv"] and tracking.parse("mlflow, tensorboard") == ["csv", "mlflow", "tensorboard"]
    with pytest.raises(ConfigError, match=r"unknown tracker 'tensorbord'.*Did you mean 'tensorboard'"):
        tracking.parse("tensorbord")
    with pytest.raises(ConfigError, match="expected names such as"):
        tracking.parse(3)


def test_a_tracker_whose_package_is_missing_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"mlflow needs the mlflow package: pip install 'labutils\[tracking\]'"):
        tracking.parse("mlflow")


def test_runs_are_named_by_stage_and_path_and_a_stage_hand_off_is_an_mlflow_run(tmp_path, trackers):
    from mlflow.tracking import MlflowClient

    from labutils import stage_folders

    assert tracking.results_root(tmp_path / "results" / "03_ablations" / "runs" / "gqa" / "seed1")[1:] == (
        "03_ablations",
        "runs/gqa/seed1",
    )
    assert tracking.results_root(tmp_path / "scratch")[1:] == ("labutils", "scratch")
    trackers("mlflow")
    stage = tmp_path / "results" / "02_baseline"
    (stage / "figures").mkdir(parents=True)
    (stage / "figures" / "training_curves.png").write_bytes(b"\x89PNG")
    stage_folders.write_handoff(
        stage / "baseline.json", {"best_val_loss": 2.5, "profile": "smoke"}, headline=["best_val_loss"]
    )
    client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("02_baseline").experiment_id])
    assert run.info.run_name == "02_baseline" and run.data.metrics == {"best_val_loss": 2.5}
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"baseline.json", "figures"}


def test_turning_a_tracker_on_is_not_a_new_input_of_a_stage():

    assert freshness.recorded_parameters({"tracking": "mlflow", "lr": 1e-3}) == {"lr": 1e-3}
