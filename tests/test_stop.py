"""A stopped pipeline stops its workers (issue 43): SIGTERM to `python -m labutils.pipeline` during a study on two
worker processes leaves no process of it behind; SIGKILL or SIGINT to a study's own process ends its workers too;
a new run refuses a folder whose workers are still alive. See RELIABILITY.md.

The studies here never finish (a budget of a million steps of a tiny model): every test ends them itself.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import kill_marked, marked_environment, wait_until_ended

from labutils import pipeline, processes
from labutils.checkpoints import verify_manifest
from labutils.config import RunConfig
from labutils.data import prepare_data
from labutils.files import REPO_ROOT
from labutils.studies import Study, run_study
from labutils.validation import FolderInUseError

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n" * 60
ENDLESS = {
    "model": {"vocab_size": 30, "d_model": 16, "n_layer": 1, "n_head": 2, "block_size": 16},
    "train": {
        "device": "cpu",
        "batch_size": 4,
        "max_steps": 1_000_000,
        "eval_interval": 100,
        "eval_batches": 1,
        "checkpoint_interval": 5,
        "warmup_steps": 1,
        "log_interval": 5,
    },
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# The first lines of a child that is sent SIGINT: Ctrl-C's handler, as in a terminal or a kernel. A suite started in
# the background (`make test &`, nohup, some CI runners) passes SIGINT on as ignored, and a process that inherits it
# ignored keeps ignoring it (Python installs its handler only where SIGINT is not ignored): the study process then
# never ended, which was taken for a hang of the code under test.
INTERACTIVE = "import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
# What the study's process runs, in a script and in a notebook cell alike: two runs at once on two CPU workers.
STUDY = """import json
from labutils import studies
from labutils.config import RunConfig
variants = {{"baseline": {{}}, "low": {{"train.lr": 1e-4}}}}
study = studies.Study("stop", RunConfig.from_dict(json.loads({config!r})), variants)
studies.run_study(study, {data!r}, {out!r}, devices="cpu*2", progress=False)
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "small.txt").write_text(TEXT)
    return prepare_data(str(root / "small.txt"), "char", (0.8, 0.1, 0.1), root / "prepared")


def study_code(data, out: Path) -> str:
    return STUDY.format(config=json.dumps(ENDLESS), data=str(data.dir), out=str(out))


def start(command: list[str]) -> tuple[subprocess.Popen, str]:
    """`command` in a session of its own (so a failing test can still end all of it), its processes marked."""
    env, marker = marked_environment(ENV)
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, start_new_session=True, stderr=subprocess.PIPE, text=True
    )
    return process, marker


def wait_for_two_training_workers(out: Path, process: subprocess.Popen, timeout: float = 300.0) -> list[int]:
    """The pids of the two workers once both train (each recorded, each run with a checkpoint)."""
    deadline = time.monotonic() + timeout
    while True:
        workers = [p for p in processes.live_processes(out) if "worker" in p["what"]]
        checkpoints = list(out.glob("runs/*/seed*/checkpoints/last/manifest.json"))
        if len(workers) == 2 and len(checkpoints) == 2:
            return [int(p["pid"]) for p in workers]
        if process.poll() is not None:
            pytest.fail(
                f"it ended (exit {process.returncode}) before its workers trained: {process.stderr.read()[-3000:]}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"no two training workers after {timeout:.0f} s: {workers}, {checkpoints}")
        time.sleep(0.1)


def end_everything(process: subprocess.Popen, marker: str) -> None:
    """A test's own clean-up, whatever it asserted: every process it started (a kernel runs in a session of its own),
    and then the wait until none is left, so that nothing writes into the folders the test reads next."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    kill_marked(marker)
    process.wait(timeout=120)
    wait_until_ended(marker, timeout=120)


def assert_left_resumable(out: Path) -> None:
    """Every run's last checkpoint is complete (it resumes from there), and nothing in the folder is alive."""
    runs = list(out.glob("runs/*/seed*"))
    assert len(runs) == 2  # the two the workers had started; no other run was started after the stop
    for run in runs:
        verify_manifest(run / "checkpoints" / "last")
        assert not (run / "summary.json").exists() or json.loads((run / "summary.json").read_text())["status"] != (
            "completed"
        )
    assert processes.live_processes(out) == []


@pytest.mark.slow
def test_sigterm_to_the_pipeline_during_a_study_ends_the_kernel_and_every_worker(data, tmp_path):
    """The issue's check: SIGTERM to the pipeline during a study on two workers, and then no process of it is left;
    it exits 143 and the stage's run.json says it was stopped."""
    import nbformat

    nbs, results = tmp_path / "nbs", tmp_path / "results"
    nbs.mkdir()
    params = nbformat.v4.new_code_cell('out_dir = "x"')
    params.metadata["tags"] = ["parameters"]
    notebook = nbs / "03_stop.ipynb"
    nb = nbformat.v4.new_notebook(cells=[params, nbformat.v4.new_code_cell(study_code(data, results / "03_stop"))])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, notebook)
    runner, marker = start(
        [sys.executable, "-m", "labutils.pipeline", str(notebook), "--results-dir", str(results), "--no-progress"]
    )
    try:
        wait_for_two_training_workers(results / "03_stop", runner)
        os.kill(runner.pid, signal.SIGTERM)  # to the pipeline alone, as `timeout` or `kill <pid>` sends it
        assert runner.wait(timeout=120) == 128 + signal.SIGTERM
        # the kernel and both workers: none is left. The runs never finish by themselves (a million steps), so
        # their end is the stop's doing; how fast it comes is the machine's business, not the test's (a busy
        # machine takes longer), so the wait is generous and nothing is timed.
        wait_until_ended(marker, timeout=120)
    finally:
        end_everything(runner, marker)
    assert "stopped by SIGTERM" in runner.stderr.read()
    run = json.loads((results / "03_stop" / "run.json").read_text())
    assert not run["ok"] and run["error"].startswith("stopped by SIGTERM after")
    assert_left_resumable(results / "03_stop")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_a_killed_or_interrupted_study_process_ends_its_workers(data, tmp_path, signum):
    """SIGKILL cannot be caught: the workers see their parent gone. SIGINT (Ctrl-C, a kernel's interrupt) ends them
    from the parent, at once, instead of waiting for the runs to finish."""
    out = tmp_path / "study"
    # SIGUSR1 prints every thread's stack: a parent that does not end says where it is stuck
    stacks = "import faulthandler, signal\nfaulthandler.register(signal.SIGUSR1, all_threads=True)\n"
    parent, marker = start([sys.executable, "-c", INTERACTIVE + stacks + study_code(data, out)])
    try:
        wait_for_two_training_workers(out, parent)
        os.kill(parent.pid, signum)
        try:
            parent.wait(timeout=120)  # it ends within seconds; a busy machine is given far more
        except subprocess.TimeoutExpired:  # the hang above: fail with the parent's stacks
            os.kill(parent.pid, signal.SIGUSR1)
            with contextlib.suppress(subprocess.TimeoutExpired):
                parent.wait(timeout=5)
            end_everything(parent, marker)
            pytest.fail(f"the study process did not end after {signum!r}; its threads:\n{parent.stderr.read()[-8000:]}")
        wait_until_ended(marker, timeout=120)  # untimed: the runs never end by themselves, so this is the stop's doing
    finally:
        end_everything(parent, marker)
    assert_left_resumable(out)


def test_the_search_for_live_processes_takes_a_folder_that_vanishes_under_it(tmp_path, monkeypatch):
    """Training renames and removes checkpoint folders while `live_processes` reads the tree (a refusing run, the
    pipeline, a test after a kill): a folder gone between its listing and its reading is skipped, and a checkpoint's
    temporary folder is never entered (a recursive glob raised FileNotFoundError on `.last.<random>.tmp`)."""
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = tmp_path / "runs" / "baseline" / "seed0"
        (run / "checkpoints" / ".last.x1y2.tmp").mkdir(parents=True)
        (run / "checkpoints" / ".last.x1y2.tmp" / "model.pt").write_text("half-written")
        (tmp_path / "runs" / "low" / "seed0").mkdir(parents=True)
        processes.record_worker(run, worker.pid, parent=1)
        real_scandir, entered = os.scandir, []

        def vanishing_scandir(path="."):
            """Each temporary folder and the `low` run's folder are removed just before they are read."""
            if isinstance(path, (str, Path)) and (Path(path).name.endswith(".tmp") or Path(path).name == "low"):
                entered.append(Path(path).name)
                shutil.rmtree(path, ignore_errors=True)
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", vanishing_scandir)
        live = processes.live_processes(tmp_path)
        assert [int(p["pid"]) for p in live] == [worker.pid]
        assert entered == ["low"]  # it vanished, and was skipped; the temporary folder was not entered at all
    finally:
        worker.kill()
        worker.wait()


def test_a_new_run_refuses_a_folder_whose_workers_are_alive_and_ignores_dead_ones(data, tmp_path, capsys):
    study = Study("stop", RunConfig.from_dict(ENDLESS), {"baseline": {}})
    out = tmp_path / "results" / "03_stop"
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        processes.record_worker(out, worker.pid, parent=1)
        with pytest.raises(FolderInUseError, match=rf"still alive: pid {worker.pid} \(worker of .*`kill {worker.pid}`"):
            run_study(study, data, out, devices="cpu*2")
        assert not (out / "study.json").exists()  # refused before anything was written
        # the pipeline refuses too, before it archives or continues the stage folder
        notebook = tmp_path / "03_stop.ipynb"
        notebook.write_text("{}")
        assert pipeline.main([str(notebook), "--results-dir", str(out.parent), "--no-progress"]) == 1
        assert "is in use by 1 process of an earlier run" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == [".workers"]
    finally:
        worker.kill()
        worker.wait()
    assert processes.live_processes(out) == []  # a dead worker's record is ignored, and removed
    assert not list(out.glob(".workers/*"))


def test_a_pid_given_again_to_a_later_process_is_not_taken_for_the_recorded_worker(tmp_path):
    if not Path("/proc/self/stat").exists():
        pytest.skip("process start times are read from /proc")
    import psutil

    record = processes.record_worker(tmp_path, os.getpid(), parent=1)
    assert processes.is_alive(os.getpid(), json.loads(record.read_text())["time"])
    recorded_before_it_started = psutil.Process().create_time() - 60  # so that record was another process's
    assert not processes.is_alive(os.getpid(), recorded_before_it_started)


def test_a_sigint_that_reaches_a_helper_thread_still_stops_a_process_waiting_on_its_workers(tmp_path):
    """A SIGINT that a helper thread takes still stops a process waiting on its workers: the main thread blocks
    SIGINT at the OS level, so the kernel can only deliver it to a helper thread, while the main thread waits on a
    future that never completes. Python runs the handler only when the main thread wakes:
    `processes.as_completed_waking` wakes it, so KeyboardInterrupt ends the process; a bare `as_completed` waits
    forever (checked: the wait below then fails the test)."""
    code = INTERACTIVE + (
        "import signal, sys, threading\n"
        "from concurrent.futures import Future\n"
        "from labutils import processes\n"
        "helper = threading.Thread(target=threading.Event().wait, daemon=True)\n"
        "helper.start()  # started before the mask: it takes the signal\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})\n"
        "print('waiting', flush=True)\n"
        "for done in processes.as_completed_waking([Future()]):\n"
        "    pass\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        assert process.stdout.readline().strip() == "waiting"  # the main thread is (about to be) in the wait
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)  # within a second; the hang it guards against never ends
    finally:
        process.kill()
    assert "KeyboardInterrupt" in process.stderr.read()
