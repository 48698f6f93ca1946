"""Scale-out as docs/scale-out.md documents it, on the real engines: Optuna studies shared through a PostgreSQL
server these tests start themselves (the pgserver wheel, else Debian's postgresql package), and DDP
across two torchrun "nodes" on this machine, including a rank that dies mid-run."""

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import torch
from conftest import free_port

from labutils import pipeline, tuning
from labutils.checkpoints import find_checkpoint, load_checkpoint
from labutils.evaluation import Run
from labutils.files import NOTEBOOKS_DIR, REPO_ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR is not set"),
]  # pgserver: its socket goes to /tmp
TrialState = optuna.trial.TrialState
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"}


# --------------------------------------------------------------------------- a real PostgreSQL server


class Postgres:
    """A server in a temporary folder; `database(name)` creates a database and returns its URL."""

    def __init__(self, url: str, stop, engine: str):
        self.url, self._stop, self.engine = url, stop, engine

    def database(self, name: str) -> str:
        admin = sqlalchemy.create_engine(self.url, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}"'))
            connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        return sqlalchemy.engine.make_url(self.url).set(database=name).render_as_string(hide_password=False)

    def stop(self) -> None:
        self._stop()


def start_pgserver() -> Postgres:
    import pgserver  # the dev extra's self-contained PostgreSQL build

    folder = Path(tempfile.mkdtemp(prefix="labutils-pg-"))
    server = pgserver.get_server(folder, cleanup_mode="delete")
    return Postgres(server.get_uri(), server.cleanup, "pgserver")


def start_system_postgres() -> Postgres:
    """Debian's postgresql package: initdb and pg_ctl from /usr/lib/postgresql/<version>/bin, as the
    postgres user when we are root (the server refuses to run as root)."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not bins:
        raise RuntimeError("no /usr/lib/postgresql/*/bin/pg_ctl (apt-get install postgresql)")
    bin_dir = bins[-1].parent
    folder = Path(tempfile.mkdtemp(prefix="labutils-pg-"))
    prefix = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", free_port()
    subprocess.run(
        [*prefix, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
        check=True,
        capture_output=True,
    )
    options = f"-h 127.0.0.1 -p {port} -k {folder}"
    subprocess.run(
        [*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start"],
        check=True,
        capture_output=True,
        timeout=60,
    )

    def stop():
        subprocess.run(
            [*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(folder, ignore_errors=True)

    return Postgres(f"postgresql://postgres@127.0.0.1:{port}/postgres", stop, "system")


ENGINES = {"pgserver": start_pgserver, "system": start_system_postgres}


def start_postgres(engines=ENGINES) -> Postgres:
    reasons = []
    for name, start in engines.items():
        try:
            return start()
        except Exception as exc:  # any engine will do; the skip names why each failed
            reasons.append(f"{name}: {type(exc).__name__}: {exc}")
    pytest.skip("no PostgreSQL server could start here: " + "; ".join(reasons))


@pytest.fixture(scope="module")
def postgres():
    server = start_postgres()
    yield server
    server.stop()


@pytest.mark.parametrize("engine", list(ENGINES))
def test_each_postgres_engine_serves_an_optuna_study(engine):
    server = start_postgres({engine: ENGINES[engine]})
    try:
        url = server.database("engine_check")
        study = optuna.create_study(storage=tuning.open_storage(url, Path("unused")), study_name="s")
        study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
        assert len(optuna.load_study(study_name="s", storage=url).trials) == 2
    finally:
        server.stop()


# --------------------------------------------------------------------------- notebook 04 and its workers on PostgreSQL


def run_04(results: Path, url: str, **params):
    run = pipeline.run_notebook(
        NOTEBOOKS_DIR / "04_tuning.ipynb",
        results / "04_tuning",
        {"profile": "smoke", "storage": url, "n_trials": 1, **params},
        progress=False,
    )
    assert run.ok, run.error
    return json.loads((results / "04_tuning" / "best.json").read_text())


def worker(config: Path, url: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "labutils.tuning",
            "--config",
            str(config),
            "--storage",
            url,
            "--n-trials",
            "1",
            "--device",
            "cpu",
            *args,
        ],
        cwd=REPO_ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def study_04(postgres, tmp_path_factory):
    """Notebook 04 (smoke, one trial) run as docs/scale-out.md says, with its study on the PostgreSQL server."""
    url = postgres.database("tuning")
    results = tmp_path_factory.mktemp("pg") / "results"
    handoff = run_04(results, url)
    config = results / "04_tuning" / "tuning.json"
    name = json.loads(config.read_text())["study_name"]
    return url, results, config, name, handoff


def test_notebook_04_creates_its_study_on_postgresql(study_04):
    url, results, config, name, handoff = study_04
    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == [name]
    study = optuna.load_study(study_name=name, storage=url)
    assert study.trials[0].state == TrialState.COMPLETE and handoff["best_trial"] == 0
    assert not (results / "04_tuning" / "study.db").exists()  # nothing went to the SQLite default
    assert json.loads(config.read_text())["storage"] == url  # no password to mask here: the URL joins workers as is


def test_two_workers_in_separate_processes_add_trials_without_duplicates(study_04):
    url, results, config, name, _ = study_04
    before = len(optuna.load_study(study_name=name, storage=url).trials)
    for process in [worker(config, url), worker(config, url)]:  # concurrently, each with its own random sampler seed
        finish(process)
    trials = optuna.load_study(study_name=name, storage=url).trials[before:]
    assert len(trials) == 2 and all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.number for t in trials}) == 2 and len({t.user_attrs["run_dir"] for t in trials}) == 2
    assert trials[0].params != trials[1].params
    for t in trials:  # each trained into its own folder, to the end of the shared budget
        assert (results / "04_tuning" / "trials" / str(t.number) / "summary.json").exists()


def test_a_worker_killed_mid_trial_is_failed_by_its_heartbeat_and_retried(study_04):
    url, results, config, name, _ = study_04
    study = optuna.load_study(study_name=name, storage=url)
    before = {t.number for t in study.trials}
    doomed = worker(config, url, "--heartbeat-s", "1")
    deadline = time.monotonic() + 120
    # mid-trial: training has begun (the objective has set run_dir), so its heartbeat thread has beaten
    while not (
        running := [
            t
            for t in study.get_trials(states=(TrialState.RUNNING,))
            if t.number not in before and "run_dir" in t.user_attrs
        ]
    ):
        assert doomed.poll() is None and time.monotonic() < deadline, "the worker never started training a trial"
        time.sleep(0.05)
    time.sleep(0.3)
    assert doomed.poll() is None, "the trial ended before it could be killed"
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.wait()
    killed = running[0].number
    assert study.trials[killed].state == TrialState.RUNNING  # nothing else will ever finish it
    time.sleep(3.5)  # 3 heartbeats of 1 s without a beat: stale for the next worker to start a trial
    finish(worker(config, url, "--heartbeat-s", "1"))

    trials = {t.number: t for t in optuna.load_study(study_name=name, storage=url).trials}
    assert trials[killed].state == TrialState.FAIL
    retried = [t for t in trials.values() if t.system_attrs.get("failed_trial") == killed]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE and retried[0].params == trials[killed].params

    handoff = run_04(results, url)  # 04 continues the study (one more trial) and hands on its best
    study = optuna.load_study(study_name=name, storage=url)
    best = study.best_trial
    assert handoff["best_trial"] == best.number != killed and handoff["trials"] == len(study.trials)
    assert handoff["best_trial_selection_loss"] == tuning.exact_loss(best)  # the run's loss, not the tuner's rounding
    assert best.value == pytest.approx(handoff["best_trial_selection_loss"], abs=5e-4)
    assert handoff["overrides_tuned"] == best.user_attrs["overrides"] == tuning.best_overrides(study)


# --------------------------------------------------------------------------- DDP across two nodes on this machine

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n" * 200
MODEL = {"d_model": 32, "n_layer": 2, "n_head": 2, "block_size": 32}
TRAIN = {
    "device": "cpu",
    "compile": False,
    "max_steps": 120,
    "eval_interval": 40,
    "eval_batches": 2,
    "eval_batch_size": 8,
    "log_interval": 10,
    "checkpoint_interval": 20,
    "lr": 3e-3,
    "warmup_steps": 5,
}
GLOBAL_BATCH = 8


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from labutils.data import prepare_data

    root = tmp_path_factory.mktemp("ddp")
    (root / "small.txt").write_text(TEXT)
    return prepare_data(str(root / "small.txt"), "char", (0.8, 0.1, 0.1), root / "prepared", progress=False)


def run_spec(prepared, out_dir: Path, batch_size: int) -> Path:
    spec = out_dir.with_suffix(".json")
    spec.write_text(
        json.dumps(
            {
                "model": MODEL,
                "train": {**TRAIN, "batch_size": batch_size},
                "data": str(prepared.dir),
                "out_dir": str(out_dir),
            }
        )
    )
    return spec


@pytest.fixture(scope="module")
def one_process(prepared, tmp_path_factory):
    """The reference: one process on the whole global batch."""
    from labutils import training

    return training.main(
        ["--config", str(run_spec(prepared, tmp_path_factory.mktemp("one") / "run", GLOBAL_BATCH)), "--no-progress"]
    )


def two_nodes(spec: Path, port: int) -> list[subprocess.Popen]:
    """The multi-node command of docs/scale-out.md, once per node: two torchrun agents meeting at a c10d rendezvous
    on 127.0.0.1."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        f"--rdzv-id=labutils-{port}",
        "-m",
        "labutils.training",
        "--config",
        str(spec),
        "--no-progress",
    ]
    return [
        subprocess.Popen(command, cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]


def assert_same_training(run: Run, reference: Run) -> None:
    assert run.summary["tokens"] == reference.summary["tokens"]
    # per-rank slices of one global batch: the same losses up to float summation order (relative 1e-4)
    torch.testing.assert_close(
        torch.tensor(run.history.train_loss.values),
        torch.tensor(reference.history.train_loss.values),
        rtol=1e-4,
        atol=1e-5,
    )
    torch.testing.assert_close(
        torch.tensor(run.evals.val_loss.values), torch.tensor(reference.evals.val_loss.values), rtol=1e-4, atol=1e-5
    )
    a, b = load_checkpoint(reference.last_checkpoint)["model"], load_checkpoint(run.last_checkpoint)["model"]

    # Adam's normalised steps let summation-order differences grow in small tensors (a bias near zero)
    # without moving the loss: the tolerance is on the whole model
    def flat(state):
        return torch.cat([state[key].flatten().float() for key in sorted(state)])

    drift = ((flat(a) - flat(b)).norm() / flat(a).norm()).item()
    assert drift < 1e-3, f"the weights differ by {drift:.2e} of their norm"


def test_two_nodes_train_like_one_process_and_a_rank_killed_mid_run_stops_the_other_and_the_same_command_resumes(
    prepared, one_process, tmp_path
):
    """Two torchrun nodes on half the global batch each; one rank is killed mid-run and the same command finishes the
    run: every step of it, before the kill and after the resume, is the one-process run's (one pair of runs serves
    both claims: torchrun's agents and their workers cost seconds of start-up each)."""
    import psutil

    spec, port = run_spec(prepared, tmp_path / "run", GLOBAL_BATCH // 2), free_port()
    nodes = two_nodes(spec, port)
    deadline = time.monotonic() + 120
    while find_checkpoint(tmp_path / "run" / "checkpoints" / "last") is None:  # a checkpoint to resume from, mid-run
        assert all(n.poll() is None for n in nodes) and time.monotonic() < deadline, [
            n.communicate()[0][-2000:] for n in nodes
        ]
        time.sleep(0.05)
    workers = {int(p.environ()["RANK"]): p for node in nodes for p in psutil.Process(node.pid).children()}
    assert sorted(workers) == [0, 1]
    workers[1].kill()  # SIGKILL: no chance to say goodbye
    killed_at = time.monotonic()
    outputs = [node.communicate(timeout=60)[0] for node in nodes]  # no hang: both nodes' torchrun end
    assert time.monotonic() - killed_at < 60 and all(n.returncode != 0 for n in nodes)
    survivor = next(out for out in outputs if "[rank0]" in out)
    assert "rank 0: rank 1 of 2 stopped answering" in survivor and "it resumes from" in survivor, survivor[-3000:]
    assert "Signal 9 (SIGKILL)" in "".join(outputs)  # torchrun's own report on the dead rank's node

    for node in two_nodes(spec, port):  # the same command again
        finish(node, timeout=180)
    run = Run.load(tmp_path / "run")
    assert run.summary["world_size"] == 2 and run.summary["status"] == "completed"
    resumed_from = json.loads((tmp_path / "run" / "environment.json").read_text())["resumed_from_step"]
    assert (
        resumed_from is not None
        and resumed_from % TRAIN["checkpoint_interval"] == 0
        and resumed_from < TRAIN["max_steps"]
    )
    assert_same_training(run, one_process)  # resumed exactly: as if it had never stopped
