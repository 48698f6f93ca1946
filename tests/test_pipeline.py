"""labutils.report and notebook 01 under papermill: the path `make pipeline` takes."""

import json
import shutil
from pathlib import Path

import pytest

from labutils import dashboard, freshness, pipeline, stage_folders
from labutils.files import NOTEBOOKS_DIR, REPO_ROOT, RUN_FILE
from labutils.validation import ConfigError

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n" * 30


def test_notebooks_are_committed_clean_and_paired():
    notebooks = pipeline.numbered_notebooks()
    assert notebooks and notebooks[0].name == "01_data_prep.ipynb"
    for nb_path in notebooks:
        nb = json.loads(nb_path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), (
            f"{nb_path.name} has outputs"
        )
        tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{nb_path.name} needs exactly one cell tagged 'parameters'"
        assert nb_path.with_suffix(".py").exists(), f"{nb_path.name} has no jupytext pair"


def test_notebook_matches_its_jupytext_pair():
    import jupytext

    for nb_path in pipeline.numbered_notebooks():
        paired = jupytext.read(nb_path.with_suffix(".py"))
        committed = jupytext.read(nb_path)
        assert [c.source for c in paired.cells] == [c.source for c in committed.cells], (
            f"run `jupytext --sync {nb_path}`"
        )


@pytest.mark.slow
@pytest.mark.slow
def test_failed_notebook_still_renders_its_error(tmp_path):
    run = pipeline.run_notebook(
        NOTEBOOKS_DIR / "01_data_prep.ipynb", tmp_path / "out", {"tokenizer": "chars"}, progress=False
    )
    assert not run.ok and "DataError" in run.error
    assert "Did you mean" in run.html.read_text()
    assert json.loads((tmp_path / "out" / "run.json").read_text())["ok"] is False


def test_papermill_cli_from_repo_root(tmp_path):
    """The design card's command: `papermill notebooks/01_data_prep.ipynb out.ipynb -p tokenizer gpt2`, which prepares
    the corpus and writes 01's hand-off and figures."""
    import subprocess
    import sys

    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    out = tmp_path / "out.ipynb"
    cmd = [
        sys.executable,
        "-m",
        "papermill",
        "notebooks/01_data_prep.ipynb",
        str(out),
        "-p",
        "tokenizer",
        "gpt2",
        "-p",
        "corpus",
        str(corpus),
        "-p",
        "prepared_dir",
        str(tmp_path / "prep"),
        "-p",
        "out_dir",
        str(tmp_path / "res"),
    ]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    # 01's hand-off and figure (the chain in test_notebooks checks its reports)
    res = tmp_path / "res"
    handoff = json.loads((res / "data.json").read_text())
    assert handoff["tokenizer"] == "gpt2" and handoff["vocab_size"] == 50257
    assert handoff["train_tokens"] > handoff["val_tokens"] > 0
    assert (res / "figures" / "token_frequencies.png").stat().st_size > 10_000


def test_a_misspelt_parameter_under_papermill_stops_the_notebook_with_the_nearest_names(tmp_path):
    """Papermill only warns about a name the parameters cell does not declare, and the run went on with the default
    (`-p learning_rate 1e-3` for `lr`); now the stage stops before it writes anything, naming the nearest ones."""
    import subprocess
    import sys

    out = tmp_path / "out.ipynb"
    cmd = [sys.executable, "-m", "papermill", "notebooks/01_data_prep.ipynb", str(out)]
    cmd += ["-p", "tokenizr", "gpt2", "-p", "out_dir", str(tmp_path / "res")]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "unknown parameter 'tokenizr' (did you mean 'tokenizer'?)" in result.stderr + result.stdout
    assert not (tmp_path / "res" / "data.json").exists() and not (tmp_path / "res" / "stage.json").exists()


def test_the_pipeline_passes_each_notebook_only_its_own_parameters_and_refuses_a_name_none_declares(tmp_path, capsys):
    notebooks = pipeline.numbered_notebooks()
    routed = pipeline.route_parameters(notebooks, {"steps": 20, "corpus": "c.txt", "profile": "smoke"})
    by_stem = {n.stem: p for n, p in routed.items()}
    assert by_stem["01_data_prep"] == {"corpus": "c.txt", "profile": "smoke"}
    assert "steps" in by_stem["02_baseline"] and "corpus" not in by_stem["02_baseline"]
    assert by_stem["05_final_model"] == {"profile": "smoke"}  # 05 has neither `steps` nor `corpus`
    with pytest.raises(ConfigError, match=r"unknown parameter 'learning_rate' \(did you mean 'lr'"):
        pipeline.route_parameters(notebooks, {"learning_rate": 1e-3})
    # the command line says so and runs nothing
    assert pipeline.main(["-p", "learning_rate", "1e-3", "--results-dir", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "unknown parameter 'learning_rate'" in capsys.readouterr().err and not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="unknown parameter 'corpus'"):  # one notebook, a name it lacks
        pipeline.run_notebook(NOTEBOOKS_DIR / "05_final_model.ipynb", tmp_path / "o", {"corpus": "x"}, progress=False)


def test_a_notebook_run_on_its_own_does_not_replace_the_committed_stage_unless_asked(tmp_path, monkeypatch):
    results = tmp_path / "results"
    monkeypatch.setattr(stage_folders, "RESULTS_DIR", results)
    stage = results / "01_x"
    stage.mkdir(parents=True)
    shipped = {"parameters": {"corpus": "tinyshakespeare"}, "notebook": "n1", "training_code": "t", "other_code": "o"}
    (stage / "stage.json").write_text(json.dumps({"inputs": shipped, "handoff": "data.json"}))
    other = {**shipped, "parameters": {"corpus": "mine.txt"}}
    with pytest.raises(
        ConfigError, match=r"holds the finished run that ships with the repo.*-p out_dir results-mine/01_x"
    ):
        stage_folders.refuse_replacing_committed(stage, other, None)
    stage_folders.refuse_replacing_committed(stage, other, "my corpus")  # asked for, with a reason
    stage_folders.refuse_replacing_committed(stage, shipped, None)  # the same inputs: a re-execution
    stage_folders.refuse_replacing_committed(tmp_path / "mine" / "01_x", other, None)  # the user's own folder
    (stage / ".running").write_text('["01_x.ipynb"]')  # make pipeline runs it: it replaces stale stages itself
    stage_folders.refuse_replacing_committed(stage, other, None)


def test_a_checkpoint_inside_the_stage_folder_is_copied_out_before_the_stage_clears_it(tmp_path, capsys):
    """05 fine-tuned from the model it shipped: its folder is archived and cleared before training, so the model
    is copied out first, named by its contents (the same model twice: one copy), and the run reads the copy."""
    stage = tmp_path / "results" / "05_final_model"
    (stage / "model").mkdir(parents=True)
    (stage / "model" / "model.pt").write_bytes(b"weights")
    (stage / "model" / "manifest.json").write_text("{}")
    kept = stage_folders.keep_input(str(stage / "model"), stage)
    assert "lies in this stage's folder" in capsys.readouterr().out
    copy = Path(kept) if Path(kept).is_absolute() else REPO_ROOT / kept
    assert copy.parent == tmp_path / "results" / ".inputs" and (copy / "model.pt").read_bytes() == b"weights"
    shutil.rmtree(stage)  # what archiving the stage does to it
    assert (copy / "model.pt").read_bytes() == b"weights"
    outside = tmp_path / "models" / "gpt2"
    outside.mkdir(parents=True)
    assert (
        stage_folders.keep_input(str(outside), stage) == str(outside) and stage_folders.keep_input(None, stage) is None
    )
    assert stage_folders.keep_input("openai-community/gpt2", stage) == "openai-community/gpt2"  # a hub name


def _tiny_notebook(path, body):
    """A two-cell notebook: a parameters cell and `body`, using report like the real stages do."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell('out_dir = "x"\nvalue = 1\narchive_reason = "re-run"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [
        params,
        nbformat.v4.new_code_cell(
            "from labutils import stage_folders\n"
            "stage = stage_folders.start_stage(out_dir, archive_reason, parameters=dict(value=value))\n" + body
        ),
    ]
    nbformat.write(nb, path)
    return path


@pytest.fixture
def tiny_pipeline(tmp_path):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    first = _tiny_notebook(
        nbs / "01_first.ipynb",
        'stage_folders.write_handoff(stage / "out.json", {"value": value * 2}, headline=["value"])',
    )
    second = _tiny_notebook(
        nbs / "02_second.ipynb",
        'prev = stage_folders.read_handoff(stage.parent / "01_first" / "out.json")\n'
        'assert prev["value"] > 0, "needs a positive value"\n'
        'stage_folders.write_handoff(stage / "out.json", {"total": prev["value"] + value}, headline=["total"])',
    )
    return [first, second], tmp_path / "results"


@pytest.mark.slow
def test_pipeline_skips_finished_stages_and_force_archives(tiny_pipeline, monkeypatch):
    notebooks, results = tiny_pipeline
    runs = pipeline.run_pipeline(notebooks, {"value": 3}, progress=False, results_dir=results)
    assert [r.ok for r in runs] == [True, True]
    assert json.loads((results / "02_second" / "out.json").read_text()) == {"total": 9}
    first_report = (results / "01_first" / "01_first.reader.html").read_text()

    again = pipeline.run_pipeline(notebooks, {"value": 3}, progress=False, results_dir=results)
    assert again == [None, None]  # finished with the same inputs: nothing recomputed
    assert (results / "01_first" / "01_first.reader.html").read_text() == first_report

    # a run the second stage trained; a report-code edit re-executes the stages, the run stays to be reused, and
    # the record and the dashboard keep the time of the execution that trained it
    run_folder = results / "02_second" / "runs" / "a"
    run_folder.mkdir(parents=True)
    (run_folder / "summary.json").write_text("{}")
    edited = {**freshness.module_hashes(), "plotting.py": "edited"}
    monkeypatch.setattr(freshness, "module_hashes", lambda: edited)
    other = pipeline.run_pipeline(notebooks, {"value": 3}, progress=False, results_dir=results)
    assert run_folder.exists()
    trained = {"seconds": runs[1].seconds, "finished": runs[1].finished, "runs_reused": 1, "runs_trained": 0}
    assert other[1].reused_runs_from == trained
    assert json.loads((results / "02_second" / RUN_FILE).read_text())["reused_runs_from"] == trained
    assert other[0].reused_runs_from is None  # it had no run to reuse
    index = (results / "index.html").read_text()
    assert f"(reusing 1 run; they trained in an execution of {runs[1].seconds:,.0f} s, {runs[1].finished})" in index
    # one total everywhere: the stages' training executions (01: this one; 02: the one that trained its run)
    total = other[0].seconds + runs[1].seconds
    assert f"{total:,.0f} s over 2 stages" in index
    executed = other[0].seconds + other[1].seconds
    assert f"the latest execution, reusing finished runs, took {executed:,.0f} s" in index

    # FORCE=1 trains again: the stage is archived with its runs, none is reused, and an Optuna study.db does not
    # stay to hand the new search its old trials as finished (a plain re-run keeps it: the search continues)
    study_db = results / "02_second" / "study.db"
    study_db.write_text("an Optuna study")
    changed = pipeline.run_pipeline(
        notebooks, {"value": 3, "archive_reason": "try force"}, force=True, progress=False, results_dir=results
    )
    assert all(r.ok for r in changed) and not run_folder.exists() and not study_db.exists()
    assert [r.reused_runs_from for r in changed] == [None, None]
    archived = sorted((results.parent / "archive" / "01_first").iterdir())
    assert len(archived) == 2 and (archived[0] / "01_first.reader.html").read_text() == first_report
    assert not (
        archived[0] / "01_first.ipynb"
    ).exists()  # the archive keeps what a reader needs, not the executed notebook
    assert (
        archived[-1] / "REASON.txt"
    ).read_text().strip() == "try force; re-run with the same inputs (notebook, parameters and labutils)"
    assert "try force" in (results.parent / "archive" / "README.md").read_text()


@pytest.mark.slow
def test_pipeline_changed_parameter_reruns_and_failure_is_marked(tiny_pipeline):
    notebooks, results = tiny_pipeline
    pipeline.run_pipeline(notebooks, {"value": 1}, progress=False, results_dir=results)
    runs = pipeline.run_pipeline(notebooks, {"value": -5}, progress=False, results_dir=results)
    assert runs[0].ok and not runs[1].ok and "needs a positive value" in runs[1].error
    index = (results / "index.html").read_text()
    assert "FAILED" in index and "needs a positive value" in index
    assert "01_first/01_first.html" in index and "<td>value</td><td><b>-10</b></td>" in index
    readme = (results / "README.md").read_text()
    assert "| 02_second | FAILED" in readme
    assert "needs a positive value" in (results / "02_second" / "02_second.html").read_text()
    # the failed stage is not current: the next pipeline run retries it (and only it)
    fixed = pipeline.run_pipeline(notebooks, {"value": -5}, progress=False, results_dir=results)
    assert fixed[0] is None and fixed[1] is not None


@pytest.mark.slow
def test_a_stage_cut_off_continues_with_the_same_inputs_and_starts_over_with_others(tmp_path, monkeypatch):
    """A stage that made 3 pieces of work and was cut after 2 (here it raises; SIGKILL in test_notebooks) keeps
    them when re-run with the same inputs and makes only the third; other inputs archive the stage as before."""
    body = """import os
work = stage / "work"
work.mkdir(exist_ok=True)
for i in range(3):
    if not (work / f"{i}.txt").exists():
        (work / f"{i}.txt").write_text(str(value))
        with open(stage / "made.log", "a") as log:
            log.write(f"{i}\\n")
        if os.environ.get("CUT_AFTER") == str(i):
            raise RuntimeError("cut off")
stage_folders.write_handoff(stage / "out.json", {"pieces": sorted(p.read_text() for p in work.iterdir())},
headline=["pieces"])"""
    (tmp_path / "nbs").mkdir()
    notebook = _tiny_notebook(tmp_path / "nbs" / "01_work.ipynb", body)
    results = tmp_path / "results"
    stage = results / "01_work"
    monkeypatch.setenv("CUT_AFTER", "1")
    cut = pipeline.run_pipeline([notebook], {"value": 3}, progress=False, results_dir=results)
    assert not cut[0].ok and "cut off" in cut[0].error
    assert [r["status"] for r in dashboard.stage_table(results, [notebook])] == ["FAILED"]
    first_piece = (stage / "work" / "0.txt").stat().st_mtime_ns

    monkeypatch.delenv("CUT_AFTER")
    resumed = pipeline.run_pipeline([notebook], {"value": 3}, progress=False, results_dir=results)
    assert resumed[0].ok, resumed[0].error
    assert (stage / "made.log").read_text().split() == ["0", "1", "2"]  # nothing made twice
    assert (stage / "work" / "0.txt").stat().st_mtime_ns == first_piece
    assert json.loads((stage / "out.json").read_text()) == {"pieces": ["3", "3", "3"]}
    assert not (results.parent / "archive").exists()  # continued, not archived
    assert len(json.loads((stage / stage_folders.STAGE_FILE).read_text())["resumed"]) == 1
    assert pipeline.run_pipeline([notebook], {"value": 3}, progress=False, results_dir=results) == [
        None
    ]  # finished: current

    monkeypatch.setenv("CUT_AFTER", "0")
    pipeline.run_pipeline([notebook], {"value": 4}, progress=False, results_dir=results)  # other inputs, cut again
    monkeypatch.delenv("CUT_AFTER")
    redone = pipeline.run_pipeline([notebook], {"value": 5}, progress=False, results_dir=results)  # and others again
    assert redone[0].ok and json.loads((stage / "out.json").read_text()) == {"pieces": ["5", "5", "5"]}
    reasons = sorted(p.read_text() for p in (results.parent / "archive" / "01_work").glob("*/REASON.txt"))
    assert len(reasons) == 2 and all(
        "parameters value:" in r for r in reasons
    )  # the finished run and the cut one, each archived


def test_archive_keeps_tables_and_figures_and_clears_the_stage(tmp_path):
    stage = tmp_path / "results" / "03_x"
    (stage / "figures").mkdir(parents=True)
    (stage / "a.csv").write_text("1")
    (stage / "figures" / "f.png").write_bytes(b"png")
    target = stage_folders.archive_stage(stage, "new lr")
    assert (target / "a.csv").read_text() == "1" and (target / "figures" / "f.png").read_bytes() == b"png"
    assert not list(stage.iterdir())
    assert stage_folders.archive_stage(stage, "empty") is None  # nothing to archive, nothing created
    assert len(list((tmp_path / "archive" / "03_x").iterdir())) == 1


def test_stage_after_a_failure_is_marked_stale(tmp_path):
    results = tmp_path / "results"
    notebooks = [tmp_path / f"0{i}_s{i}.ipynb" for i in (1, 2, 3)]
    for nb, ok in zip(notebooks, (True, False, True), strict=True):
        (results / nb.stem).mkdir(parents=True)
        (results / nb.stem / stage_folders.RUN_FILE).write_text(
            json.dumps({"ok": ok, "seconds": 1.0, "error": None if ok else "boom"})
        )
    assert [r["status"] for r in dashboard.stage_table(results, notebooks)] == ["ok", "FAILED", "stale"]


def test_a_finished_stage_is_current_only_while_its_recorded_inputs_hold(tmp_path, monkeypatch):
    results = tmp_path / "results"
    notebook = _tiny_notebook(tmp_path / "01_x.ipynb", "pass")
    monkeypatch.setattr(dashboard, "NOTEBOOKS_DIR", tmp_path)  # as if it were one of the pipeline's own notebooks
    monkeypatch.setattr(freshness, "NOTEBOOKS_DIR", tmp_path)
    (results / "01_x").mkdir(parents=True)
    inputs = freshness.current_inputs(notebook, {"value": 1}, results / "01_x")
    assert inputs["parameters"] == {"value": 1}  # the notebook's declared parameters, labels left out
    (results / "01_x" / RUN_FILE).write_text(json.dumps({"ok": True, "seconds": 1.0, "inputs": inputs}))
    assert pipeline.stage_is_current(notebook, {"value": 1}, results)
    assert pipeline.stage_is_current(notebook, {}, results)  # the default is 1: the same run
    assert pipeline.stage_is_current(notebook, {"value": 1, "archive_reason": "why"}, results)  # a label, not an input
    assert pipeline.stage_is_current(notebook, {"value": 1, "lr": 3}, results)  # a name the notebook does not declare
    assert not pipeline.stage_is_current(notebook, {"value": 2}, results)
    hashes = freshness.module_hashes()
    assert dashboard.stage_table(results, [notebook])[0]["status"] == "ok"
    for module, words in (("plotting.py", "report code"), ("model/gpt.py", "training code")):  # either: stale
        monkeypatch.setattr(freshness, "module_hashes", lambda m=module: {**hashes, m: "edited"})
        assert not pipeline.stage_is_current(notebook, {"value": 1}, results)
        row = dashboard.stage_table(results, [notebook])[0]  # and the dashboard says why
        assert row["status"] == "stale" and f"{words} changed ({module}" in row["stale_because"]


def test_a_report_change_keeps_the_finished_runs_and_a_training_change_does_not(tmp_path, monkeypatch):
    """Run folders are kept in place for the re-run when only report code changed (each is then reused when its
    config is the same); a change to the training code or the data archives the stage and clears its runs."""
    results = tmp_path / "results"
    (results / "01_data").mkdir(parents=True)
    stage_folders.write_handoff(results / "01_data" / "data.json", {"tokens": 10})
    hashes = freshness.module_hashes()

    def start(module=None):
        patched = {**hashes, module: "edited"} if module else hashes
        monkeypatch.setattr(freshness, "module_hashes", lambda: patched)
        stage = stage_folders.start_stage(results / "02_train", parameters={"lr": 1})
        if not (stage / "runs" / "seed0").exists():  # a run trains only where none is kept
            (stage / "runs" / "seed0").mkdir(parents=True)
            (stage / "runs" / "seed0" / "summary.json").write_text("{}")
        stage_folders.write_handoff(stage / "out.json", {"loss": 1.0})
        return stage

    stage = start()
    first = (stage / "runs" / "seed0" / "summary.json").stat().st_mtime_ns
    stage = start("plotting.py")  # report code: the run folder stays, untouched
    assert (stage / "runs" / "seed0" / "summary.json").stat().st_mtime_ns == first
    reason = next((tmp_path / "archive" / "02_train").glob("*/REASON.txt")).read_text()
    assert "report code changed (plotting.py): finished runs are reused" in reason
    (results / "02_train" / "runs" / "seed0" / "marker").write_text("old")
    start("model/gpt.py")  # training code: archived and cleared
    assert not (results / "02_train" / "runs" / "seed0" / "marker").exists()
    stage_folders.write_handoff(results / "01_data" / "data.json", {"tokens": 11})  # other data: cleared too
    (results / "02_train" / "runs" / "seed0" / "marker").write_text("old")
    start("model/gpt.py")
    assert not (results / "02_train" / "runs" / "seed0" / "marker").exists()


def test_every_stage_hands_start_stage_exactly_its_declared_parameters_before_rebinding_any():
    """The parameters each notebook records are the names of its parameters cell, as given (a drift test)."""
    import ast

    for notebook in pipeline.numbered_notebooks():
        declared = set(freshness.parameter_defaults(notebook)) - set(freshness.LABELS)
        cells = [c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]
        tagged = next(i for i, c in enumerate(cells) if "parameters" in c["metadata"].get("tags", []))
        after = ast.parse("".join(cells[tagged + 1]["source"]))
        handed = [
            n for n in after.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "parameters"
        ]
        assert handed, f"{notebook.name}: the cell after the parameters does not build `parameters`"
        keywords = {k.arg: k.value for k in handed[0].value.keywords}
        assert set(keywords) == declared, f"{notebook.name}: hands {sorted(keywords)}, declares {sorted(declared)}"
        assert all(isinstance(v, ast.Name) and v.id == k for k, v in keywords.items()), notebook.name
        first_rebinding = min(
            (
                i
                for i, n in enumerate(after.body)
                if isinstance(n, ast.Assign) and {getattr(t, "id", None) for t in n.targets} & declared
            ),
            default=len(after.body),
        )
        assert after.body.index(handed[0]) < first_rebinding, (
            f"{notebook.name} rebinds a parameter before handing it over"
        )


def test_a_parameter_default_that_is_not_a_literal_is_refused_by_name(tmp_path):
    import nbformat

    notebook = _tiny_notebook(tmp_path / "01_x.ipynb", "pass")
    nb = nbformat.read(notebook, as_version=4)
    nb.cells[0].source += "\nsteps = 2 * 60"
    nbformat.write(nb, notebook)
    with pytest.raises(ConfigError, match=r"'steps' \(2 \* 60\) is not a literal"):
        freshness.parameter_defaults(notebook)


def test_change_since_previous_compares_with_the_newest_archived_run(tmp_path):
    stage = tmp_path / "results" / "03_x"
    assert stage_folders.change_since_previous(
        stage_folders.previous_handoff(stage, "best.json"), {}, ["variant"]
    ).startswith("No earlier run")
    for stamp, variant in (("20260101-000000-000000", "old"), ("20260102-000000-000000", "pos_rope")):
        run = tmp_path / "archive" / "03_x" / stamp
        run.mkdir(parents=True)
        (run / "best.json").write_text(
            json.dumps({"variant": variant, "val_loss_mean": 2.5, "conclusion": "then this"})
        )
        (run / "REASON.txt").write_text(f"reason {stamp[:8]}\n")
    previous = stage_folders.previous_handoff(stage, "best.json")
    assert previous["variant"] == "pos_rope" and previous["archive_reason"] == "reason 20260102"
    text = stage_folders.change_since_previous(
        previous,
        {"variant": "pos_rope", "val_loss_mean": 2.25, "conclusion": "now that"},
        ["variant", "val_loss_mean", "significant"],
    )
    assert "archived because: reason 20260102" in text and "- val_loss_mean: 2.5 -> 2.25" in text
    assert (
        "- significant: not reported -> not reported" in text
        and "- then: then this" in text
        and "- now: now that" in text
    )


def test_a_report_names_the_earlier_executions_that_reached_another_verdict(tmp_path):
    """The previous run may be an identical re-execution; an older one on other inputs that handed on another
    variant, or called it significant when today's does not, is named with why it was replaced."""
    stage = tmp_path / "results" / "04_x"
    verdicts = [("20260101", "tuned", True), ("20260102", "baseline", False), ("20260103", "tuned", True)]
    for stamp, variant, significant in verdicts:
        run = tmp_path / "archive" / "04_x" / f"{stamp}-000000-000000"
        run.mkdir(parents=True)
        (run / "best.json").write_text(json.dumps({"variant": variant, "significant": significant}))
        (run / "REASON.txt").write_text(f"training code changed (training.py) {stamp}\n")
    now = {"variant": "tuned", "significant": True}
    text = stage_folders.other_verdicts(stage, "best.json", now, ["variant", "significant"])
    assert text.startswith("**Another verdict in 1 earlier execution of this stage** (now: variant tuned")
    assert "20260102-000000-000000: variant baseline, significant no (replaced because: training code " in text
    assert "20260101" not in text and "20260103" not in text  # the ones that agree are not listed
    assert stage_folders.other_verdicts(stage, "best.json", {"variant": "baseline", "significant": False}, ["variant"])
    assert stage_folders.other_verdicts(tmp_path / "results" / "04_none", "best.json", now, ["variant"]) == ""


def test_every_module_that_training_imports_counts_as_training_code():
    """Which modules retrain a run is read from the imports (issue 48): import the entry points in a fresh process
    and every labutils module loaded there must count as training code; a module only the reports use must not."""
    import subprocess
    import sys

    entry_points = [f"labutils.{m.removesuffix('.py')}" for m in freshness.TRAINING_ENTRY_POINTS]
    loaded = subprocess.run(
        [sys.executable, "-c", f"import sys, {', '.join(entry_points)}; print(*sorted(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    files = {
        name: name.removeprefix("labutils").lstrip(".").replace(".", "/")
        for name in loaded
        if name.split(".")[0] == "labutils"
    }
    package = freshness._package_dir()

    def as_file(path: str) -> str:
        """A module's file inside the package: a package's __init__.py, or the module's .py."""
        return (
            "/".join(filter(None, [path, "__init__.py"])) if (package / path / "__init__.py").exists() else path + ".py"
        )

    as_files = {name: as_file(path) for name, path in files.items()}
    assert "tracking.py" in as_files.values() and "studies.py" in as_files.values()  # the two the old list forgot
    not_counted = sorted(f for f in as_files.values() if not freshness.is_training_code(f))
    assert not_counted == [], f"imported by training but counted as report code: {not_counted}"
    for report_module in ("plotting.py", "findings.py", "dashboard.py"):
        assert not freshness.is_training_code(report_module)


def test_the_import_closure_follows_every_kind_of_import(tmp_path, monkeypatch):
    """Relative, absolute, from a package, and inside a function: each brings its module into the closure."""
    package = tmp_path / "labutils"
    (package / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "training.py": "from . import a\nfrom .sub import b\nimport labutils.c\n\ndef f():\n    from .d import x\n",
        "studies.py": "from labutils.sub.e import y\n",
        "tuning.py": "",
        "a.py": "from .sub.g import z\n",
        "sub/__init__.py": "",
        "sub/b.py": "from ..h import w\n",
        "c.py": "",
        "d.py": "",
        "sub/e.py": "",
        "sub/g.py": "",
        "h.py": "",
        "report.py": "from . import training\n",  # imports training, but training does not import it
    }
    for name, text in files.items():
        (package / name).write_text(text)
    monkeypatch.setattr(freshness, "_package_dir", lambda: package)
    freshness.training_modules.cache_clear()
    try:
        assert sorted(freshness.training_modules()) == sorted(set(files) - {"report.py"})
    finally:
        freshness.training_modules.cache_clear()
