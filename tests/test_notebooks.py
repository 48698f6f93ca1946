"""Notebooks 01-05 under papermill on the smoke profile: the chain, and the chain cut by SIGKILL and continued
(parameters and their checks: test_notebook_parameters.py, so the two run on different test workers)."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import kill_marked, marked_environment, wait_until_ended

from labutils import pipeline
from labutils.files import NOTEBOOKS_DIR, REPO_ROOT

pytestmark = pytest.mark.slow

STAGES = ["01_data_prep", "02_baseline", "03_ablations", "04_tuning", "05_final_model"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The whole pipeline on smoke, into a temporary results folder, as `make pipeline ARGS="-p profile smoke"` runs it,
    and as it is cut: killed with SIGKILL during 03, run again and killed during 04, then run to the end. Returns the
    results folder, the runs of 03 and 04 that had finished before a kill (with when they were written) and the
    last call's runs."""
    results = tmp_path_factory.mktemp("chain") / "results"
    command = [
        sys.executable,
        "-m",
        "labutils.pipeline",
        "-p",
        "profile",
        "smoke",
        "--results-dir",
        str(results),
        "--no-progress",
    ]
    ablations = _kill_when(command, results, "runs/*/seed*/summary.json", "03_ablations", 2)
    assert not (results / "03_ablations" / "best.json").exists(), "03 finished before the kill"
    trials = _kill_when(command, results, "trials/*/summary.json", "04_tuning", 1)
    assert not (results / "04_tuning" / "best.json").exists(), "04 finished before the kill"
    last = pipeline.run_pipeline(None, {"profile": "smoke"}, progress=False, results_dir=results)
    return results, {**ablations, **trials}, last


def test_every_notebook_runs_and_the_chain_hands_off(chain):
    results, _, last = chain
    assert [r is None for r in last] == [True, True, True, False, False]  # 01-03 had finished; 04 continued, 05 ran
    runs = [json.loads((results / stage / "run.json").read_text()) for stage in STAGES]
    assert [r["name"] for r in runs] == STAGES
    assert all(r["ok"] for r in runs), [r["error"] for r in runs if not r["ok"]]
    baseline = json.loads((results / "02_baseline" / "baseline.json").read_text())
    best = json.loads((results / "03_ablations" / "best.json").read_text())
    tuned = json.loads((results / "04_tuning" / "best.json").read_text())
    final = json.loads((results / "05_final_model" / "final.json").read_text())
    # 03 ablated the baseline 02 handed on; 05 trained what its sizing recommended (the shape, the rule's LR, the
    # sweep's
    # batch, the tokens of 05's budget in FLOPs) or, when the smoke sweep's law is not identified and approach 2 did not
    # fit, the profile's own shape
    from labutils import profiles as defs

    assert best["model"]["d_model"] == baseline["model"]["d_model"]
    sizing = final["sizing"]
    sized = sizing["recommendation"]
    if sized:
        assert sizing["used"] and (final["model"]["d_model"], final["model"]["n_layer"]) == (
            sized["d_model"],
            sized["n_layer"],
        )
        assert (
            final["train"]["lr"] == pytest.approx(sized["lr"]) and final["train"]["batch_size"] == sized["batch_size"]
        )
        assert final["train"]["max_tokens"] == round(sized["tokens"]) and final["train"]["max_steps"] is None
    else:
        assert not sizing["used"] and sizing["not_identified"] and not sizing["isoflop"]
        assert final["model"]["d_model"] == defs.FINAL["smoke"]["model"]["d_model"]
    assert final["fit_check"] in ("inside", "outside")
    assert (results / "05_final_model" / "figures" / "sizing.png").exists()
    # the headline is the mean over the profile's seeds, each trained on the same tokens, with its interval
    per_seed = final["per_seed"]
    assert final["seeds"] == [0, 1] and len({r["tokens"] for r in per_seed}) == 1
    assert final["test_loss"] == pytest.approx(sum(r["test_loss"] for r in per_seed) / 2)
    low, high = final["test_loss_ci95"]
    assert low < final["test_loss"] < high
    assert (results / "05_final_model" / "sizing" / "sweep_runs.csv").exists()
    # the law against the lab's own final runs: this one at least (the chain's archive holds no earlier one)
    assert (results / "05_final_model" / "sizing" / "past_runs_check.csv").exists()
    assert final["sizing"]["past_runs"]["runs"] == 1
    # 05's headline is recomputable: the saved model on every token of the test split
    from labutils.evaluation import evaluate
    from labutils.profiles import stage_data

    prepared = stage_data(results / "05_final_model")
    held_out = evaluate(results / "05_final_model" / "model", prepared, "test", device="cpu")
    assert per_seed[0]["test_loss"] == pytest.approx(
        held_out["test_loss"], rel=1e-6
    )  # the saved model is the first seed's
    assert list(json.loads((results / "05_final_model" / "stage.json").read_text())["headline"])[0] == "test_loss"
    # 03 chose on the selection half with one token-sized evaluation set; 04 confirmed on new seeds
    assert best["eval_split"] == "selection" and best["eval_tokens"] > 0
    assert min(tuned["confirm_seeds"]) >= 1000 and tuned["metric"] == "confirm_loss"
    # every stage has its reports, the index links them with headline numbers
    for stage in STAGES:
        assert (results / stage / f"{stage}.html").exists() and (results / stage / f"{stage}.reader.html").exists()
    prep = results / "01_data_prep"  # the full report shows the code, the reader's leaves it out
    assert "prepare_data" in (prep / "01_data_prep.html").read_text()
    assert "prepare_data" not in (prep / "01_data_prep.reader.html").read_text()
    assert json.loads((prep / "run.json").read_text())["ok"] is True
    index = (results / "index.html").read_text()
    assert all(f"{s}/{s}.html" in index for s in STAGES) and "test_loss" in index
    assert (results / "03_ablations" / "results_table.md").read_text().startswith("| variant")
    assert (results / "05_final_model" / "model" / "manifest.json").exists()
    # the stages' figures reach their reports, also where a key figure redraws the dashboard's compute chart
    for stage in STAGES[2:]:
        assert '"image/png"' in (results / stage / f"{stage}.ipynb").read_text(), stage


def test_rerun_skips_finished_stages(chain):
    results, _, _ = chain
    again = pipeline.run_pipeline(None, {"profile": "smoke"}, progress=False, results_dir=results)
    assert again == [None] * len(STAGES)


def _run_files(results) -> dict:
    """Every file of every run folder (one holding a summary.json) under `results`, by path, with its hash."""
    folders = {s.parent for s in results.rglob("summary.json")}  # a saved model (05's model/) is no run
    return {
        str(f.relative_to(results)): hashlib.sha256(f.read_bytes()).hexdigest()
        for folder in folders
        for f in folder.rglob("*")
        if f.is_file()
    }


def test_a_plotting_edit_in_a_copy_of_the_repo_reruns_every_stage_and_retrains_no_run(chain, tmp_path):
    """Issue 43: runs are keyed by their config, data and training code, not by all of labutils. In a copy of the
    repo holding the chain's results as a clone has them (no checkpoints), a plotting function is edited; `make
    pipeline` then re-executes the stages (their reports come from the new code) and every run folder is reused: not
    one file in one is written again. 04 and 05 are the stages executed: between them they reuse every kind of run
    (Optuna trials and the confirmation study in 04; the sweep's study and the final's runs in 05; 02's and 03's
    runs are the same two kinds), and every stage's staleness is decided by the one rule (test_pipeline.py)."""
    results, _, _ = chain
    copy = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "labutils", copy / "labutils", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(NOTEBOOKS_DIR, copy / "notebooks", ignore=shutil.ignore_patterns("*.py", ".ipynb_checkpoints"))
    (copy / "data").mkdir()
    shutil.copy(REPO_ROOT / "data" / "tinyshakespeare.txt", copy / "data")
    shutil.copytree(results, copy / "results")
    for checkpoints in (copy / "results").rglob("checkpoints"):  # as a clone has them: git keeps no checkpoint
        shutil.rmtree(checkpoints)
    plotting = copy / "labutils" / "plotting.py"
    source = plotting.read_text()
    assert '    """Two panels, mean `metric`' in source
    plotting.write_text(
        source.replace('    """Two panels, mean `metric`', '    """Edited. Two panels, mean `metric`', 1)
    )
    executed = STAGES[3:]
    before = _run_files(copy / "results")
    assert len({p.split("/")[0] for p in before}) == 4  # 02-05 train runs: each has run folders to reuse
    notebooks = [f"notebooks/{stage}.ipynb" for stage in executed]
    command = [sys.executable, "-m", "labutils.pipeline", *notebooks, "-p", "profile", "smoke", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(copy)}  # the copy's labutils, not the checkout's
    done = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.count("ok in") == len(executed)  # each stage re-executed: its report code changed
    assert _run_files(copy / "results") == before  # and no run trained again
    for stage in executed:
        reason = next((copy / "archive" / stage).glob("*/REASON.txt")).read_text()
        assert "report code changed (plotting.py): finished runs are reused" in reason, stage
    # each stage records that it trained nothing, and the time of the execution that trained its runs
    for stage in executed:
        trained = json.loads((results / stage / "run.json").read_text())
        reused = json.loads((copy / "results" / stage / "run.json").read_text())["reused_runs_from"]
        assert reused["runs_trained"] == 0 and reused["runs_reused"] > 0, stage
        assert (reused["seconds"], reused["finished"]) == (trained["seconds"], trained["finished"]), stage


# --------------------------------------------------------------------------- a pipeline killed anywhere


def _finished(pattern: str, folder) -> dict:
    """The runs under `folder` matching `pattern` that completed, with when their summary was written."""
    found = {}
    for summary in folder.glob(pattern):
        try:
            if json.loads(summary.read_text()).get("status") == "completed":
                found[summary.parent] = summary.stat().st_mtime_ns
        except (json.JSONDecodeError, FileNotFoundError):  # being written right now
            pass
    return found


def _kill_when(command, results, pattern: str, folder: str, at_least: int) -> dict:
    """Run `command` (the README's `make pipeline`, in its own process group) and SIGKILL all of it at once, kernel
    and study workers included, once `at_least` runs under results/folder have finished; returns those runs. (Killing
    only the pipeline would leave the kernel and workers a second or so to notice, in which a fast machine finishes
    the smoke study: tests/test_stop.py checks that they do notice.)"""
    env, marker = marked_environment()
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 240
    while len(done := _finished(pattern, results / folder)) < at_least:
        assert process.poll() is None and time.monotonic() < deadline, (
            f"the pipeline ended before {at_least} runs of {folder} finished"
        )
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    kill_marked(marker)  # the kernel runs in a session of its own, the workers in a process group of their own
    process.wait()
    wait_until_ended(marker)
    return done


def _seeded(handoff: dict) -> dict:
    """A hand-off without what the machine's speed decides (times, throughput) or where the files went."""
    noisy = ("elapsed", "tokens_per_s", "seconds", "mfu", "archive", "_dir")
    kept = {k: v for k, v in handoff.items() if not any(n in k for n in noisy)}
    if isinstance(kept.get("conclusion"), str):  # its "most efficient" arm is per second of training: the machine's
        # (only that sentence: what follows it, such as 03's LR-check clause, is compared)
        kept["conclusion"] = re.sub(r" Most efficient: `[^`]+` \(.*? s of training\)\.", "", kept["conclusion"])
    return kept


def test_a_pipeline_killed_during_03_and_during_04_continues_to_the_uninterrupted_hand_offs(chain, tmp_path):
    """The cut chain's 03 and 04 (05 follows from 04's hand-off and was not cut) hand on what they hand on when run
    without a cut from the same 01 and 02; no run or trial that had finished before a kill was trained again."""
    import shutil

    results, finished, _ = chain
    reference = tmp_path / "results"
    for stage in STAGES[:2]:
        shutil.copytree(results / stage, reference / stage)
    whole = pipeline.run_pipeline(
        [NOTEBOOKS_DIR / f"{s}.ipynb" for s in STAGES[2:4]], {"profile": "smoke"}, progress=False, results_dir=reference
    )
    assert all(r.ok for r in whole), [r.error for r in whole if not r.ok]
    for stage in STAGES[2:4]:
        cut, uncut = (json.loads((root / stage / "best.json").read_text()) for root in (results, reference))
        assert _seeded(cut) == _seeded(uncut), stage
    # issue 48: 04 executed twice on the same inputs (once cut and continued) trains the same trials to the same
    # losses, prunes the same ones and hands on the same verdict
    trials = [_decisions(root / "04_tuning" / "trials.csv") for root in (results, reference)]
    assert len(trials[0]) >= 3 and trials[0] == trials[1]
    assert len(finished) >= 3
    for run, written in finished.items():  # finished before a kill: not trained again
        assert (run / "summary.json").stat().st_mtime_ns == written, run
    assert "resumed" in json.loads((results / "03_ablations" / "stage.json").read_text())
    assert not (results.parent / "archive").exists()  # continued, never archived


def _decisions(trials_csv) -> list[dict]:
    """trials.csv without what the clock decides (start, end, duration, seconds, throughput) or where it wrote."""
    import pandas as pd

    table = pd.read_csv(trials_csv)
    timed = [
        c
        for c in table.columns
        if c.startswith(("datetime", "duration")) or "elapsed" in c or "per_s" in c or "run_dir" in c
    ]
    return table.drop(columns=timed).to_dict("records")


def test_fine_tuning_05_from_the_model_it_shipped_keeps_that_model_and_trains_from_it(chain, tmp_path):
    """Issue 48: `make pipeline ARGS="notebooks/05_final_model.ipynb -p init_from results/05_final_model/model"`
    cleared 05's folder, model included, then failed to find it. The model is copied out first, and the run starts
    from the copy."""
    results, _, _ = chain
    copy = tmp_path / "results"
    for stage in STAGES:
        shutil.copytree(results / stage, copy / stage)
    shipped = copy / "05_final_model" / "model"
    weights = (shipped / "model.pt").read_bytes()
    parameters = {"profile": "smoke", "init_from": str(shipped), "max_tokens": 2048}
    (run,) = pipeline.run_pipeline(
        [NOTEBOOKS_DIR / "05_final_model.ipynb"], parameters, progress=False, results_dir=copy
    )
    assert run.ok, run.error
    kept = next((copy / ".inputs").glob("05_final_model-model-*"))
    assert (kept / "model.pt").read_bytes() == weights  # the shipped model, untouched
    final = json.loads((copy / "05_final_model" / "final.json").read_text())
    assert final["train"]["init_from"].endswith(kept.name)
