"""Where a run's numbers go: sinks the training loop calls, CSV always, TensorBoard and MLflow on request.

A sink sees the run start (its config, and where a resumed run stands), every logged training step, every evaluation,
and the end (the summary and the run's files). `csv` writes metrics.csv and evals.csv, which the lab's own plots and
reports read. `tensorboard` writes event files into the run's folder, so `tensorboard --logdir results/` lists runs
as stage/variant/seed. `mlflow` logs parameters, metrics with their steps, and the config and summary as artifacts,
one experiment per stage, into a local store beside the stage folders (results/mlflow/) or the server that
MLFLOW_TRACKING_URI names.

Which sinks run is chosen once per session with `use("tensorboard,mlflow")` (a notebook's `tracking` parameter, a
CLI's `--tracking`): it is an environment variable, so the worker processes of studies and tuning and the ranks of
torchrun inherit it, and it is not part of any run's config (turning a tracker on re-trains nothing). A new tracker
is a `Sink` subclass and its entry in SINKS.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

from .files import append_csv, display_path, rewrite_csv
from .validation import ConfigError

TRACKING_ENV = "LABUTILS_TRACKING"  # comma-separated sink names beside csv
CLI_HELP = '"tensorboard", "mlflow" or "tensorboard,mlflow": log the runs there too (csv always; labutils.tracking)'
STAGE_FOLDER = re.compile(r"\d\d_\w+")


class Sink:
    """One destination for a run's numbers. Rows are the dicts metrics.csv and evals.csv hold."""

    name = ""
    needs: str | None = None  # the module it imports (a missing one is named with the extra to install)

    def __init__(
        self, out_dir: Path, config: dict[str, Any], resumed_step: int, history: list[dict], evals: list[dict]
    ):
        self.out_dir, self.config, self.resumed_step = out_dir, config, resumed_step

    def log_steps(self, rows: list[dict]) -> None:
        pass

    def log_eval(self, row: dict) -> None:
        pass

    def finish(self, summary: dict[str, Any], files: list[Path]) -> None:
        pass


class CSVSink(Sink):
    """metrics.csv (one row per step) and evals.csv (one per evaluation): rewritten from the checkpoint's history
    on resume, so steps trained after the last checkpoint of a cut run appear once."""

    name = "csv"

    def __init__(self, out_dir, config, resumed_step, history, evals):
        super().__init__(out_dir, config, resumed_step, history, evals)
        from .evaluation import EVAL_COLUMNS, HISTORY_COLUMNS

        self.columns = {"metrics.csv": HISTORY_COLUMNS, "evals.csv": EVAL_COLUMNS}
        rewrite_csv(out_dir / "metrics.csv", HISTORY_COLUMNS, history)
        rewrite_csv(out_dir / "evals.csv", EVAL_COLUMNS, evals)

    def log_steps(self, rows):
        append_csv(self.out_dir / "metrics.csv", self.columns["metrics.csv"], rows)

    def log_eval(self, row):
        append_csv(self.out_dir / "evals.csv", self.columns["evals.csv"], [row])


def _finite(row: dict) -> dict[str, float]:
    """The numeric values of a row that a tracker can plot (not the step, not NaN)."""
    return {
        k: float(v)
        for k, v in row.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def flat_config(config: dict[str, Any]) -> dict[str, str]:
    """{"model": {"d_model": 128}, ...} as {"model.d_model": "128", ...}: what trackers take as parameters."""
    return {
        f"{section}.{k}": json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)
        for section, fields in config.items()
        if isinstance(fields, dict)
        for k, v in fields.items()
    }


class TensorBoardSink(Sink):
    """Event files in the run's folder: scalars train/<metric> per step and val/<metric> per evaluation, the config as
    text. A resumed run purges the events past its checkpoint, which the cut run had logged and will log again."""

    name = "tensorboard"
    needs = "tensorboard"

    def __init__(self, out_dir, config, resumed_step, history, evals):
        super().__init__(out_dir, config, resumed_step, history, evals)
        from torch.utils.tensorboard import SummaryWriter

        if not resumed_step:  # a fresh run replaces an old run's events, as it replaces its CSVs
            for old in out_dir.glob("events.out.tfevents.*"):
                old.unlink()
        self.writer = SummaryWriter(log_dir=str(out_dir), purge_step=resumed_step + 1 if resumed_step else None)
        if not resumed_step:
            self.writer.add_text("config", "\n".join(f"    {k} = {v}" for k, v in flat_config(config).items()))

    def log_steps(self, rows):
        for row in rows:
            for key, value in _finite(row).items():
                self.writer.add_scalar(f"train/{key}", value, row["step"])

    def log_eval(self, row):
        for key, value in _finite(row).items():
            self.writer.add_scalar(f"val/{key.removeprefix('val_')}", value, row["step"])
        self.writer.flush()  # evaluations are rare: show them at once

    def finish(self, summary, files):
        self.writer.close()


def results_root(out_dir: Path) -> tuple[Path, str, str]:
    """The results folder above a run, its stage (the NN_name folder the run lies in) and the run's path below it;
    a run outside any stage is its own: (its parent, 'labutils', its folder name)."""
    parts = out_dir.resolve().parts
    stage_at = next((i for i in range(len(parts) - 1, -1, -1) if STAGE_FOLDER.fullmatch(parts[i])), None)
    if stage_at is None:
        return out_dir.resolve().parent, "labutils", out_dir.name
    root = Path(*parts[:stage_at])
    return root, parts[stage_at], "/".join(parts[stage_at + 1 :]) or parts[stage_at]


def mlflow_uri(out_dir: Path) -> tuple[str, Path | None]:
    """MLFLOW_TRACKING_URI when set (a server, a database), else a SQLite store in results/mlflow/ (and its
    artifacts)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], None
    store = results_root(out_dir)[0] / "mlflow"
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}", store / "artifacts"


def open_mlflow_run(folder: Path, resume: bool) -> tuple[Any, str, bool]:
    """(client, run id, whether it is new) of the MLflow run that stands for `folder`, in its stage's experiment:
    the one mlflow_run.json names when resuming into the same store, else a new one."""
    from mlflow.tracking import MlflowClient

    uri, artifacts = mlflow_uri(folder)
    client = MlflowClient(tracking_uri=uri)
    _, stage, run_name = results_root(folder)
    record = folder / "mlflow_run.json"
    known = json.loads(record.read_text()) if record.exists() else {}
    if resume and known.get("tracking_uri") == uri:
        client.update_run(known["run_id"], status="RUNNING")
        return client, known["run_id"], False
    experiment = client.get_experiment_by_name(stage)
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment(stage, artifact_location=(artifacts / stage).as_uri() if artifacts else None)
    )
    tags = {"labutils.out_dir": display_path(folder), "labutils.stage": stage}
    run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    record.write_text(json.dumps({"tracking_uri": uri, "run_id": run_id}) + "\n")
    return client, run_id, True


class MLflowSink(Sink):
    """One MLflow run per labutils run, in the experiment of its stage; a resumed run continues its MLflow run (its
    id is kept in mlflow_run.json), and metrics are sent once per log window, in one batch."""

    name = "mlflow"
    needs = "mlflow"

    def __init__(self, out_dir, config, resumed_step, history, evals):
        super().__init__(out_dir, config, resumed_step, history, evals)
        from mlflow.entities import Param

        self.client, self.run_id, created = open_mlflow_run(out_dir, resume=bool(resumed_step))
        if created:
            params = [Param(k, v[:6000]) for k, v in flat_config(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
                self.client.log_batch(self.run_id, params=params[i : i + 100])

    def _log(self, rows: list[dict], prefix: str) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"{prefix}{k}", v, now, int(row["step"])) for row in rows for k, v in _finite(row).items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a call
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def log_steps(self, rows):
        self._log(rows, "train/")

    def log_eval(self, row):
        self._log([row], "val/")

    def finish(self, summary, files):
        for file in files:
            if file.exists():
                self.client.log_artifact(self.run_id, str(file))
        status = summary.get("status", "")
        self.client.set_terminated(
            self.run_id,
            status="FINISHED" if status == "completed" else "KILLED" if status == "interrupted" else "FAILED",
        )


def log_stage(stage_dir: Path, findings: dict[str, Any], handoff: Path) -> None:
    """A stage's hand-off in MLflow, when it is on: one run named after the stage in its experiment, with the
    hand-off's numbers as metrics and the hand-off and the stage's figures as artifacts (what the report shows)."""
    if "mlflow" not in parse(os.environ.get(TRACKING_ENV)):
        return
    try:
        from mlflow.entities import Metric

        client, run_id, _ = open_mlflow_run(stage_dir, resume=False)
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in _finite(findings).items()][:1000])
        for file in [handoff, *sorted((stage_dir / "figures").glob("*.png"))]:
            client.log_artifact(run_id, str(file), artifact_path="figures" if file.suffix == ".png" else None)
        client.set_terminated(run_id)
    except Exception as exc:  # as for a run's trackers: the stage's own files are written, the tracker is optional
        warnings.warn(
            f"tracker mlflow could not log the hand-off of {stage_dir.name}: {type(exc).__name__}: {exc}", stacklevel=2
        )


SINKS: dict[str, type[Sink]] = {cls.name: cls for cls in (CSVSink, TensorBoardSink, MLflowSink)}


def parse(tracking: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """The sink names a `tracking` setting asks for, checked; csv always comes first (the reports read it)."""
    if tracking is None or tracking == "" or tracking == "csv":
        return ["csv"]
    if isinstance(tracking, str):
        names = [n.strip() for n in tracking.split(",") if n.strip()]
    elif isinstance(tracking, (list, tuple)) and all(isinstance(n, str) for n in tracking):
        names = list(tracking)
    else:
        raise ConfigError(f"tracking: expected names such as 'tensorboard,mlflow', got {tracking!r}")
    for name in names:
        if name not in SINKS:
            import difflib

            close = difflib.get_close_matches(name, list(SINKS), n=1)
            raise ConfigError(
                f"tracking: unknown tracker {name!r}; choose from {list(SINKS)}"
                + (f". Did you mean {close[0]!r}?" if close else "")
            )
        needs = SINKS[name].needs
        if needs and importlib.util.find_spec(needs) is None:
            raise ConfigError(
                f"tracking: {name} needs the {needs} package: pip install 'labutils[tracking]' (or {needs})"
            )
    return ["csv", *dict.fromkeys(n for n in names if n != "csv")]


def use(tracking: str | list[str] | None) -> list[str]:
    """Turn sinks on for every run this process and its children start (a notebook's `tracking` parameter);
    None leaves the setting as it is (csv alone unless LABUTILS_TRACKING says more)."""
    if tracking is None:
        return parse(os.environ.get(TRACKING_ENV))
    names = parse(tracking)
    os.environ[TRACKING_ENV] = ",".join(names)
    return names


class Sinks:
    """The sinks of one run. A tracker that fails (its server went away) is warned about and dropped: training and the
    CSV files, which the reports read, go on. CSV's own failures (the disk) stop the run as before."""

    def __init__(
        self, out_dir: Path, config: dict[str, Any], resumed_step: int, history: list[dict], evals: list[dict]
    ):
        self.sinks: list[Sink] = []
        for name in parse(os.environ.get(TRACKING_ENV)):
            sink = self._guard(name, lambda name=name: SINKS[name](out_dir, config, resumed_step, history, evals))
            if sink is not None:
                self.sinks.append(sink)

    def _guard(self, name: str, call):
        if name == "csv":
            return call()
        try:
            return call()
        except Exception as exc:  # a tracker must never cost the run
            warnings.warn(
                f"tracker {name} failed and is off for the rest of this run: {type(exc).__name__}: {exc}", stacklevel=3
            )
            self.sinks = [s for s in self.sinks if s.name != name]
            return None

    def _each(self, method: str, *args) -> None:
        for sink in list(self.sinks):
            self._guard(sink.name, lambda sink=sink: getattr(sink, method)(*args))

    def log_steps(self, rows: list[dict]) -> None:
        self._each("log_steps", rows)

    def log_eval(self, row: dict) -> None:
        self._each("log_eval", row)

    def finish(self, summary: dict[str, Any], files: list[Path]) -> None:
        self._each("finish", summary, files)
