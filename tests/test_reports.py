"""What readers get (issue #15): reader reports without stderr, reprs or machine paths; the dashboard with
thumbnails, units and references; archive rules; findings computed from hand-offs; the live plot."""

import html
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from labutils import dashboard, findings, freshness, pipeline, plotting, stage_folders
from labutils.files import REPO_ROOT, RUN_FILE, STAGE_FILE

TEXT_SUFFIXES = {".json", ".csv", ".md", ".html", ".ipynb", ".txt"}
# An absolute path of some machine: not part of a URL (no word character, dot, colon or slash before it).
MACHINE_PATH = re.compile(r"(?<![\w.:/-])/(?:home|root|Users|work|tmp|mnt|private|var/folders|scratch|opt/conda)/")


def _machine_paths(text: str) -> list[str]:
    found = [m.group(0) for m in MACHINE_PATH.finditer(text)]
    return found + [p for p in (str(REPO_ROOT), str(Path.home())) if len(p) > 1 and p in text]


def test_committed_results_and_archive_hold_no_machine_paths():
    tracked = subprocess.run(
        ["git", "ls-files", "results", "archive"], cwd=REPO_ROOT, capture_output=True, text=True
    ).stdout.split()
    files = [REPO_ROOT / f for f in tracked] or [p for d in ("results", "archive") for p in (REPO_ROOT / d).rglob("*")]
    checked, offenders = 0, []
    for path in files:
        if path.suffix in TEXT_SUFFIXES and path.is_file():
            checked += 1
            hits = _machine_paths(path.read_text(errors="replace"))
            if hits:
                offenders.append(f"{path.relative_to(REPO_ROOT)}: {hits[:2]}")
    assert checked > 0
    assert not offenders, f"{len(offenders)} files hold machine paths: {offenders[:5]}"


def test_the_scan_finds_what_it_looks_for():
    assert _machine_paths("PosixPath('/home/ann/repo/results/x.png')") and _machine_paths('"/work/main/.venv/lib"')
    assert not _machine_paths("https://cdn.example.org/tmp/x.js and results/03_ablations/figures/x.png")


def _notebook(path: Path, body: str) -> Path:
    params = nbformat.v4.new_code_cell('out_dir = "results/01_demo"\narchive_reason = "re-run"\nvalue = 1')
    params.metadata["tags"] = ["parameters"]
    cells = [nbformat.v4.new_markdown_cell("# Demo\nThe narrative."), params, nbformat.v4.new_code_cell(body)]
    kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": kernelspec}), path)
    return path


def test_reader_report_keeps_findings_tables_and_figures_but_no_stderr_reprs_or_paths(tmp_path):
    body = """import sys, pathlib, pandas as pd, matplotlib.pyplot as plt  # code-marker
from tqdm.auto import tqdm
from labutils import findings, stage_folders
stage = stage_folders.start_stage(out_dir, archive_reason, parameters={"value": value})
for _ in tqdm(range(3), desc="crunching-tokens"): pass
print("a warning on stderr", file=sys.stderr)
display(pathlib.Path.cwd() / "results")
display(pd.DataFrame({"variant": ["baseline"], "val_loss": [2.5]}))
findings.show("**Found.** val loss 2.5 nats/token")
plt.plot([1, 2]); plt.show()
print("printed on stdout")"""
    notebook = _notebook(tmp_path / "01_demo.ipynb", body)
    run = pipeline.run_notebook(notebook, tmp_path / "results" / "01_demo", {"value": 2}, progress=False)
    assert run.ok, run.error
    reader, full = run.reader_html.read_text(), run.html.read_text()
    for text in (
        reader,
        full,
        run.executed.read_text(),
    ):  # this run's folder is outside the repo, so only it may show in full
        assert str(REPO_ROOT) not in text and str(Path.home()) + "/" not in text
    assert str(tmp_path) not in reader
    assert "a warning on stderr" not in reader and "crunching-tokens" not in reader and "PosixPath" not in reader
    assert (
        "val_loss" in reader
        and "<strong>Found.</strong>" in reader
        and "data:image/png" in reader
        and "printed on stdout" in reader
    )
    assert "code-marker" in full and "code-marker" not in reader  # the full version keeps the code
    assert "overflow-x:auto" in reader  # wide tables scroll inside the page
    assert json.loads((run.out_dir / RUN_FILE).read_text())["parameters"] == {"value": 2}


def _stage(
    results: Path,
    name: str,
    *,
    run=True,
    started="2026-11-29 10:00:00",
    finished="2026-11-29 10:05:00",
    figure=True,
    handoff=True,
) -> Path:
    folder = results / name
    (folder / "figures").mkdir(parents=True)
    stage = {
        "started": started,
        **({"handoff": "out.json"} if handoff else {}),
        "headline": {"test_loss": 1.707, "tokens_per_s": 13247.2, "num_params": 735616, "test_accuracy": 0.5},
        "references": {"test_loss": "nanoGPT shakespeare_char: 1.4697"},
        "inputs": {"parameters": {"lr": 0.001, "steps": None}},
        "context": {"commit": "abc1234", "machine": "CPU x86_64 (2 cores)", "profile": "cpu", "torch": "2.13.0"},
    }
    if figure:
        (folder / "figures" / "curves.png").write_bytes(b"\x89PNG")
        stage["figure"] = "figures/curves.png"
    (folder / STAGE_FILE).write_text(json.dumps(stage))
    (folder / f"{name}.reader.html").write_text("<p>report</p>")
    if run:
        (folder / RUN_FILE).write_text(
            json.dumps(
                {"ok": True, "seconds": 42.0, "error": None, "finished": finished, "parameters": {"profile": "cpu"}}
            )
        )
    return folder


def test_dashboard_shows_thumbnails_units_references_context_and_runs_outside_the_pipeline(tmp_path):
    results, notebooks = tmp_path / "results", [tmp_path / f"{n}.ipynb" for n in ("05_final", "06_extra", "07_cut")]
    _stage(results, "05_final")
    _stage(
        results, "06_extra", started="2026-11-29 11:00:00", figure=False
    )  # started after its run.json: papermill by hand
    _stage(results, "07_cut", run=False, handoff=False)  # killed before its hand-off
    dashboard.write_index(results, notebooks)
    assert [r["status"] for r in dashboard.stage_table(results, notebooks)] == [
        "ok",
        "outside the pipeline",
        "unfinished",
    ]
    assert (
        "the same command (`make pipeline`, or the same papermill call) continues it"
        in (results / "README.md").read_text()
    )
    page, readme = (results / "index.html").read_text(), (results / "README.md").read_text()
    assert '<img src="05_final/figures/curves.png"' in page and '<a href="05_final/05_final.reader.html">' in page
    assert (
        "1.707 nats/token" in page
        and "nanoGPT shakespeare_char: 1.4697" in page
        and "13,247 tokens/s" in page
        and "50.0%" in page
    )
    assert (
        "735,616 parameters" in page
        and "abc1234" in page
        and "CPU x86_64 (2 cores)" in page
        and "42 s over 1 stages" in page
    )
    assert "outside the pipeline" in page and "python -m labutils.pipeline --render" in page and "lr=0.001" in page
    assert (
        "[![05_final](05_final/figures/curves.png)](05_final/05_final.reader.html)" in readme
        and "1.707 nats/token" in readme
    )


def test_archive_keeps_what_a_reader_needs_under_the_cap_with_a_computed_reason(tmp_path, monkeypatch):
    results = tmp_path / "results"
    stage_dir = _stage(results, "03_ablations")
    (stage_dir / "03_ablations.ipynb").write_text("{}" * 1000)
    (stage_dir / "03_ablations.html").write_text("full")
    (stage_dir / "best.json").write_text("{}")
    (stage_dir / "runs" / "baseline" / "seed0").mkdir(parents=True)
    (stage_dir / "runs" / "baseline" / "seed0" / "metrics.csv").write_text("step\n1\n")
    (stage_dir / "huge.csv").write_text("x" * (stage_folders.ARCHIVE_CAP_BYTES + 1))
    (stage_dir / "study.db").write_text("optuna")
    before = {"parameters": {"lr": 0.001}, "notebook": "n1", "labutils": "l1", "commit": "aaa"}
    run = json.loads((stage_dir / RUN_FILE).read_text())
    (stage_dir / RUN_FILE).write_text(json.dumps({**run, "inputs": before}))
    after = {"parameters": {"lr": 0.002}, "notebook": "n1", "labutils": "l2", "commit": "bbb"}
    target = stage_folders.archive_stage(stage_dir, "trying a higher lr", inputs=after)
    kept = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert kept == [
        "03_ablations.reader.html",
        "REASON.txt",
        "best.json",
        "figures/curves.png",
        "run.json",
        "stage.json",
    ]
    assert sum(p.stat().st_size for p in target.rglob("*") if p.is_file()) <= stage_folders.ARCHIVE_CAP_BYTES
    assert (target / "REASON.txt").read_text().strip() == (
        "trying a higher lr; parameters lr: 0.001 -> 0.002; labutils changed (commit aaa -> bbb)"
    )
    assert [p.name for p in stage_dir.iterdir()] == ["study.db"]  # the stage folder is clear but for Optuna's study

    # a run with the same inputs as the archived run before it replaces that copy: one archived run per set of inputs
    def rerun():
        (stage_dir / "03_ablations.reader.html").write_text("<p>again</p>")
        (stage_dir / RUN_FILE).write_text(json.dumps({**run, "inputs": after}))

    rerun()
    second = stage_folders.archive_stage(stage_dir, None, inputs=after)
    assert (
        second / "REASON.txt"
    ).read_text().strip() == "re-run with the same inputs (notebook, parameters and labutils)"
    rerun()
    third = stage_folders.archive_stage(stage_dir, None, inputs=after)
    assert not second.exists() and third.exists() and target.exists()
    index = (tmp_path / "archive" / "README.md").read_text()
    assert "trying a higher lr" in index and "03_ablations.reader.html" in index


def test_a_rerun_that_reproduces_the_archived_numbers_is_a_line_not_a_copy(tmp_path):
    results, archive = tmp_path / "results", tmp_path / "archive"

    def run_again(headline_changes=None, commit="bbb", finished="2026-11-30 10:05:00"):
        shutil.rmtree(results / "03_ablations", ignore_errors=True)
        folder = _stage(results, "03_ablations", finished=finished)
        stage = json.loads((folder / STAGE_FILE).read_text())
        stage["headline"].update(headline_changes or {})
        (folder / STAGE_FILE).write_text(json.dumps(stage))
        run = json.loads((folder / RUN_FILE).read_text())
        (folder / RUN_FILE).write_text(json.dumps({**run, "inputs": {"commit": commit, "labutils": commit}}))
        return folder

    first = stage_folders.archive_stage(run_again(commit="aaa"), None, inputs={"commit": "bbb", "labutils": "bbb"})
    # same numbers at 2 decimals, another throughput (the machine's): a line in the entry it reproduced
    again = stage_folders.archive_stage(
        run_again({"test_loss": 1.7071, "tokens_per_s": 9000.0}, commit="bbb"), None, inputs={}
    )
    assert again == first and [p.name for p in (archive / "03_ablations").iterdir()] == [first.name]
    assert (first / "REPRODUCED.txt").read_text() == "reproduced at commit bbb (2026-11-30 10:05:00)\n"
    assert not any((results / "03_ablations").iterdir())  # the stage folder is cleared all the same
    assert "reproduced at commit bbb" in (archive / "README.md").read_text()
    # a number that changed, or a person's reason, keeps a copy
    changed = stage_folders.archive_stage(run_again({"test_loss": 1.69}, commit="ccc"), None, inputs={})
    said = stage_folders.archive_stage(run_again({"test_loss": 1.69}, commit="ddd"), "new tokenizer cache", inputs={})
    assert len({first, changed, said}) == 3 and all(p.exists() for p in (first, changed, said))
    assert not (changed / "REPRODUCED.txt").exists()


def test_findings_are_computed_from_the_hand_off():
    final = {
        "profile": "cpu",
        "num_params": 735616,
        "tokens": 3213312,
        "test_loss": 1.7073,
        "test_ppl": 5.51,
        "test_accuracy": 0.4999,
        "last10pct_val_loss": 1.6478,
        "target_val_loss": 1.85,
        "meets_target": True,
        "tokens_per_s": 13247.2,
        "device": "cpu",
        "elapsed_s": 240.0,
    }
    text = findings.final(final)
    assert (
        "**1.707 nats/token**" in text
        and "50.0%" in text
        and "target of 1.85 is met" in text
        and "0.1781 nats/token above it" in text
    )
    assert findings.final({**final, "last10pct_val_loss": 1.9, "meets_target": False}).count("not met") == 1
    seeded = {
        **final,
        "n_seeds": 2,
        "test_loss_ci95": [1.6, 1.8],
        "last10pct_val_loss_ci95": [1.6, 2.0],
        "per_seed": [{"seed": 0}, {"seed": 1}],
        "meets_target_per_seed": [True, False],
        "target_verdict": "not established",
        "model_vs_04": {"attention": ["mha", "gqa"], "tie_weights": [False, True]},
    }
    text = findings.final(seeded)
    assert "is met by the mean (seed 1 misses it); the mean's 95% interval against the target: **not established**" in (
        text
    )
    assert "differs from the config 03 and 04 compared and tuned in 2 fields: `attention` mha → gqa; `tie_weights`" in (
        text
    )
    refs = findings.references(
        {
            "metric": "confirm_loss",
            "confirm_loss_mean": 2.09,
            "delta_vs_baseline": -0.318,
            "n": 2,
            "p_value": 0.0117,
            "significant": True,
        }
    )
    assert refs == {
        "confirm_loss_mean": "untuned, same seeds (held out): 2.4080",
        "delta_vs_baseline": "Welch p = 0.0117; significant after Holm's correction",
    }


def test_live_plot_only_in_jupyterlab_and_redraws_in_place(tmp_path, monkeypatch):
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    assert plotting.live_training_plot(tmp_path) is None  # papermill, scripts: the final curves are plotted once
    monkeypatch.setenv("JPY_SESSION_NAME", "notebooks/02_baseline.ipynb")
    monkeypatch.setenv("LABUTILS_HEADLESS", "1")
    assert plotting.live_training_plot(tmp_path) is None  # make pipeline
    monkeypatch.delenv("LABUTILS_HEADLESS")
    calls = []

    class Handle:
        def update(self, fig):
            calls.append(("update", fig))

    import IPython.display

    monkeypatch.setattr(
        IPython.display, "display", lambda fig, display_id=False: calls.append(("display", fig)) or Handle()
    )
    (tmp_path / "metrics.csv").write_text("step,train_loss\n1,4.0\n2,3.5\n")
    (tmp_path / "evals.csv").write_text("step,val_loss\n2,3.6\n")
    redraw = plotting.live_training_plot(tmp_path)
    redraw(2, {"val_loss": 3.6})
    redraw(4, {"val_loss": 3.2})
    assert [kind for kind, _ in calls] == ["display", "update"]
    assert "val loss 3.2000" in calls[1][1].axes[0].get_title()


def test_a_stage_run_by_bare_papermill_shows_as_such_and_renders_into_its_folder(tmp_path):
    results = tmp_path / "results"
    notebook = _notebook(
        tmp_path / "01_demo.ipynb",
        "from labutils import stage_folders\n"
        "stage = stage_folders.start_stage(out_dir, archive_reason, parameters={'value': value})\n"
        "stage_folders.write_handoff(stage / 'out.json', {'value': value}, headline=['value'])",
    )
    first = pipeline.run_notebook(notebook, results / "01_demo", {}, progress=False)
    dashboard.write_index(results, [notebook])  # what make pipeline leaves: a dashboard listing the stage as ok
    assert first.ok and dashboard.stage_table(results, [notebook])[0]["status"] == "ok"
    executed = tmp_path / "out.ipynb"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "papermill",
            str(notebook),
            str(executed),
            "-p",
            "value",
            "7",
            "-p",
            "out_dir",
            str(results / "01_demo"),
            "--cwd",
            str(REPO_ROOT),
            "--no-progress-bar",
        ],
        check=True,
        capture_output=True,
    )
    rows = dashboard.stage_table(results, [notebook])
    assert rows[0]["status"] == "outside the pipeline" and rows[0]["parameters"] == {"value": 7}
    recorded = json.loads((results / "01_demo" / "stage.json").read_text())[
        "inputs"
    ]  # by the kernel, from what it was handed
    assert freshness.same_inputs(recorded, freshness.current_inputs(notebook, {"value": 7}, results / "01_demo"))
    assert "outside the pipeline" in (results / "index.html").read_text()  # the notebook itself refreshed the dashboard
    rendered = pipeline.render_stage(executed)
    assert rendered.ok and rendered.reader_html.exists() and rendered.reader_html.parent == results / "01_demo"
    assert dashboard.stage_table(results, [notebook])[0]["status"] == "ok"


def test_tidy_archive_brings_old_archived_runs_under_the_rules(tmp_path):
    archive = tmp_path / "archive"
    old, older, other = (archive / "02_baseline" / s for s in ("20260101-000002", "20260101-000001", "20250101-000000"))
    for folder, inputs in ((old, "same"), (older, "same"), (other, "different")):
        (folder / "figures").mkdir(parents=True)
        (folder / RUN_FILE).write_text(json.dumps({"inputs": {"parameters": {"value": inputs}}}))
        (folder / "REASON.txt").write_text("re-run\n")
        (folder / "02_baseline.reader.html").write_text(f"<p>{REPO_ROOT}/results/02_baseline/figures/x.png</p>")
        (folder / "02_baseline.ipynb").write_text("{}")
        (folder / "run").mkdir()
        (folder / "run" / "metrics.csv").write_text("step\n1\n")
    removed = stage_folders.tidy_archive(archive)
    assert removed == [older]  # the same inputs twice: the newer copy stays
    for folder in (old, other):
        kept = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
        assert kept == [
            "02_baseline.reader.html",
            "REASON.txt",
            "run.json",
        ]  # no notebook, no per-run folder, no empty figures/
        assert (folder / "02_baseline.reader.html").read_text() == "<p>results/02_baseline/figures/x.png</p>"
    assert "02_baseline/20260101-000002/02_baseline.reader.html" in (archive / "README.md").read_text()


def test_prune_archive_keeps_only_runs_whose_numbers_changed(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("prune_archive", REPO_ROOT / "scripts" / "prune_archive.py")
    prune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prune)
    results, archive = tmp_path / "results", tmp_path / "archive"

    def stage(folder: Path, headline: dict) -> Path:
        (folder / "figures").mkdir(parents=True)
        (folder / "figures" / "f.png").write_bytes(b"png")
        (folder / "05_x.reader.html").write_text("<p>report</p>")
        (folder / STAGE_FILE).write_text(json.dumps({"headline": headline}))
        (folder / "REASON.txt").write_text("labutils changed\n")
        return folder

    stage(results / "05_x", {"test_loss": 1.7012, "tokens_per_s": 9000.0})
    same = stage(
        archive / "05_x" / "20261203-000000-000000", {"test_loss": 1.6991, "tokens_per_s": 13000.0}
    )  # 1.70 both: machine noise
    cut = stage(archive / "05_x" / "20261202-000000-000000", {})  # archived before it had numbers
    changed = stage(archive / "05_x" / "20261201-000000-000000", {"test_loss": 1.88, "tokens_per_s": 7000.0})
    older_same = stage(archive / "05_x" / "20261130-000000-000000", {"test_loss": 1.881, "tokens_per_s": 7100.0})
    cited = stage(archive / "05_x" / "20261129-000000-000000", {"test_loss": 1.881, "tokens_per_s": 7100.0})
    (results / "05_x" / "05_x.reader.html").write_text(
        "<p>Against the previous run (archive/05_x/20261129-000000-000000; ...)</p>"
    )
    assert sorted(prune.prune(archive, results)) == sorted([same, cut, older_same])
    assert cited.exists()  # the current report compares with it
    # with the numbers of the run that replaced it, only its hand-off and tables: not a second copy of that report
    assert (
        (cited / STAGE_FILE).exists() and not (cited / "05_x.reader.html").exists() and not (cited / "figures").exists()
    )
    assert changed.exists() and not (changed / "figures").exists() and (changed / "05_x.reader.html").exists()
    assert "20261201-000000-000000" in (archive / "README.md").read_text()


def test_archived_reports_share_one_copy_of_the_theme_stylesheet(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("prune_archive", REPO_ROOT / "scripts" / "prune_archive.py")
    prune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prune)
    theme = "body{margin:0}" * 1000  # nbconvert's theme: long, the same in every report
    pages = []
    for run in ("20261201-000000-000000", "20261202-000000-000000"):
        page = tmp_path / "05_x" / run / "05_x.reader.html"
        page.parent.mkdir(parents=True)
        page.write_text(f"<html><style>{theme}</style><style>td{{color:red}}</style><p>{run}</p></html>")
        pages.append(page)
    (tmp_path / "styles").mkdir()
    (tmp_path / "styles" / "0123456789abcdef.css").write_text("stale")  # linked by no report
    prune.share_stylesheets(tmp_path)
    sheets = list((tmp_path / "styles").glob("*.css"))
    assert len(sheets) == 1 and sheets[0].read_text() == theme
    for page in pages:
        html = page.read_text()
        assert f'<link rel="stylesheet" href="../../styles/{sheets[0].name}">' in html and theme not in html
        assert "<style>td{color:red}</style>" in html and page.parent.name in html  # short rules and content stay
    linked = [p.read_text() for p in pages]
    prune.share_stylesheets(tmp_path)  # idempotent: the links stay, the sheet stays
    assert [p.read_text() for p in pages] == linked and list((tmp_path / "styles").glob("*.css")) == sheets


def test_one_number_formatter_and_one_table_builder_serve_every_report():
    import numpy as np

    from labutils.tables import fmt, markdown_table

    assert [
        fmt(2.66666),
        fmt(123456.7),
        fmt(np.int64(1000)),
        fmt(0.4521, "%"),
        fmt(None),
        fmt(float("nan")),
        fmt(True),
    ] == ["2.667", "123,457", "1,000", "45.2%", "—", "—", "yes"]
    assert [fmt(2.294028, decimals=4), fmt(-0.0896, decimals=4, sign=True), fmt(0.0312, digits=3, sign=True)] == [
        "2.2940",
        "-0.0896",
        "+0.0312",
    ]
    assert [fmt(1.8823, "nats/token"), fmt((0.9, 0.99)), fmt({"lr": 0.001})] == [
        "1.882 nats/token",
        "(0.9, 0.99)",
        "lr=0.001",
    ]
    assert markdown_table(["a", "b"], [["x|y", "1\n2"]]) == "| a | b |\n|---|---|\n| x\\|y | 1 2 |"
    sources = {p.name: p.read_text() for p in (REPO_ROOT / "labutils").rglob("*.py") if p.name != "tables.py"}
    hand_built = [name for name, text in sources.items() if "---|" in text]
    assert not hand_built, f"{hand_built} build Markdown tables by hand; call labutils.tables.markdown_table"


def test_the_training_curve_says_when_it_shows_the_label_smoothed_loss(tmp_path):
    """Issue 41: a label-smoothed training loss sits ~0.2 above validation by design; the legend must say which it
    is."""
    import pandas as pd

    from labutils.evaluation import Run

    history = pd.DataFrame({"step": [1, 2], "train_loss": [2.5, 2.4], "lr": [1e-3, 1e-3]})
    evals = pd.DataFrame({"step": [2], "val_loss": [2.2], "val_ppl": [9.0], "val_accuracy": [0.3]})
    for smoothing, expected in ((0.1, "train (label-smoothed cross-entropy, ε = 0.1)"), (0.0, "train (cross-entropy)")):
        folder = tmp_path / str(smoothing)
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model": {}, "train": {"label_smoothing": smoothing}}))
        fig = plotting.plot_training_curves(Run(folder, history, evals, {}))
        labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        assert labels[:2] == [expected, "validation (plain cross-entropy)"]


def test_a_headline_worse_than_the_best_archived_run_of_its_profile_is_called_a_regression(tmp_path):
    """The test loss went from 1.663 to 1.821 over ten days unnoticed: 05 now compares with the best archived run."""
    stage = tmp_path / "results" / "05_final_model"
    stage.mkdir(parents=True)
    for name, loss, profile, dropout in (
        ("20261124-1", 1.663, "cpu", 0.0),
        ("20261201-1", 1.80, "cpu", 0.1),
        ("20261202-1", 1.40, "gpu", 0.2),
    ):
        folder = tmp_path / "archive" / "05_final_model" / name
        folder.mkdir(parents=True)
        (folder / "final.json").write_text(
            json.dumps(
                {
                    "profile": profile,
                    "test_loss": loss,
                    "tokens": 3_500_000,
                    "model": {"dropout": dropout},
                    "train": {"batch_size": 16},
                }
            )
        )
    best = stage_folders.best_archived(stage, "final.json", "test_loss", profile="cpu")
    assert best["value"] == 1.663 and best["archived"].endswith("20261124-1")  # not the gpu run's 1.40
    today = {"test_loss": 1.821, "tokens": 2_500_000, "model": {"dropout": 0.2}, "train": {"batch_size": 16}}
    r = stage_folders.regression(today, best, "test_loss")
    assert r["worse_by"] == pytest.approx(0.158) and r["differs"] == {
        "tokens": (3_500_000, 2_500_000),
        "model.dropout": (0.0, 0.2),
    }
    line = findings._regression_line(r, "cpu")[0]
    assert line.startswith("**Regression:** the test loss is 0.158") and "`tokens` 3,500,000 → 2,500,000" in line
    assert "Likely why: each seed trained on 1.4x fewer tokens" in line and "(`model.dropout`: 04's" in line
    assert "Likely why" not in findings._regression_line({**r, "differs": {"commit": ("a", "b")}}, "cpu")[0]
    assert r["paired"] is None and "share fewer than 2 seeds" in line  # the archived run kept no per-seed losses
    # per-seed losses of the same seeds: the difference's interval says whether seed noise alone could give it
    then = {**best["handoff"], "per_seed": [{"seed": 0, "test_loss": 1.609}, {"seed": 1, "test_loss": 1.630}]}
    now = {
        "per_seed": [{"seed": 0, "test_loss": 1.641}, {"seed": 1, "test_loss": 1.634}, {"seed": 2, "test_loss": 1.7}]
    }
    noisy = stage_folders.paired_seeds(then, now, "test_loss")
    assert noisy["seeds"] == [0, 1] and noisy["differences"] == pytest.approx([0.032, 0.004])
    assert noisy["ci95"][0] < 0 < noisy["ci95"][1]  # t(1): 0.018 +- 12.7 x 0.014
    assert "includes 0, so seed noise alone could give it" in findings._regression_noise(noisy)
    shifted = {
        "per_seed": [
            {"seed": s["seed"], "test_loss": s["test_loss"] + 0.1 + 0.001 * s["seed"]} for s in then["per_seed"]
        ]
    }
    clear = stage_folders.paired_seeds(then, shifted, "test_loss")
    assert clear["ci95"][0] > 0 and "lies above 0, so it is more than seed noise" in findings._regression_noise(clear)
    assert (
        stage_folders.regression({**today, "test_loss": 1.6}, best, "test_loss") is None
    )  # better than every archived run
    assert stage_folders.best_archived(stage, "final.json", "test_loss", profile="smoke") is None


def test_prune_archive_keeps_reports_only_for_the_newest_kept_runs(tmp_path):
    """archive/ stays small: every kept run keeps its numbers, only the newest REPORTS_KEPT keep their reader's
    report."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("prune_archive", REPO_ROOT / "scripts" / "prune_archive.py")
    prune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prune)
    results, archive = tmp_path / "results", tmp_path / "archive"
    for folder, loss in [(results / "05_x", 1.5)] + [
        (archive / "05_x" / f"2026120{i}-000000-000000", 1.6 + 0.1 * i) for i in range(1, 7)
    ]:
        folder.mkdir(parents=True)
        (folder / "05_x.reader.html").write_text("<p>report</p>")
        (folder / STAGE_FILE).write_text(json.dumps({"headline": {"test_loss": loss}}))
        (folder / "final.json").write_text(json.dumps({"test_loss": loss}))
    assert prune.prune(archive, results) == []  # every run's numbers differ from the next one's: all kept
    runs = sorted((archive / "05_x").iterdir(), reverse=True)
    assert [r.name[:8] for r in runs if (r / "05_x.reader.html").exists()] == ["20261206", "20261205", "20261204"]
    assert all((r / "final.json").exists() and (r / STAGE_FILE).exists() for r in runs)


def test_sizing_findings_say_what_the_fit_cannot_decide():
    """05's sizing sentences, from the record's numbers: E's interval spanning the 5-gram leaves "beats it at some
    size" undecided; a cap that leaves out the law's optimum sets the pick; the fit check is given seed by seed."""
    record = {
        "five_gram_bpb": 2.223,
        "compute_to_beat_5gram": None,
        "parametric": {"E": 2.346},
        "parametric_ci95": {"E": {"low": 1.94, "high": 2.55}},
        "largest_fitted_params": 270000,
    }
    assert "**cannot be decided**" in findings._to_beat_5gram(record)[0]
    certain = {**record, "parametric_ci95": {"E": {"low": 2.3, "high": 2.4}}}
    assert "no size gets there" in findings._to_beat_5gram(certain)[0]
    law = {"n_layer": 2, "d_model": 64, "params": 95936, "tokens": 1.08e7, "loss": 2.638}
    capped = {"n_layer": 4, "d_model": 112, "params": 564816, "tokens": 2.04e6, "loss": 2.743}
    sizing = {"final_compute": 8.3e12, "repeated_epochs": 4, "max_tokens": 4015416, "recommendation": None}
    lines = findings._recommendation(
        {**sizing, "law_pick": law, "capped_pick": {**capped, "left_out_for_repetition": 9}}
    )
    assert any(line.startswith("The cap binds: it leaves out the 9 shapes") for line in lines)
    same = findings._recommendation({**sizing, "law_pick": law, "capped_pick": {**law, "left_out_for_repetition": 0}})
    assert not any("The cap binds" in line for line in same)
    check = {"times_largest_budget": 6.5, "measured": 2.635, "predicted": 2.743, "low": 2.640, "high": 2.836}
    check.update(residual=-0.108, verdict="outside")
    text = findings._extrapolation(check, [{"seed": 0, "val_bpb": 2.618}, {"seed": 1, "val_bpb": 2.652}])
    assert "Seed by seed: 2.618 (seed 0, outside), 2.652 (seed 1, inside)" in text
    assert "Seed by seed" not in findings._extrapolation(check, [{"seed": 0, "val_bpb": 2.618}])


def test_dashboard_flags_a_regression_and_gives_each_stages_seeds(tmp_path):
    results = tmp_path / "results"
    folder = _stage(results, "05_final")
    regression = {"best": 1.663, "archived": "20261201-0000", "worse_by": 0.2, "differs": {}}
    (folder / "out.json").write_text(json.dumps({"test_loss": 1.863, "regression": regression}))
    stage = json.loads((folder / STAGE_FILE).read_text())
    stage["context"]["seeds"] = [0, 1]
    (folder / STAGE_FILE).write_text(json.dumps(stage))
    other = _stage(results, "03_ablate")
    stage = json.loads((other / STAGE_FILE).read_text())
    stage["context"]["seeds"] = [0, 1, 2]
    (other / STAGE_FILE).write_text(json.dumps(stage))
    notebooks = [tmp_path / "03_ablate.ipynb", tmp_path / "05_final.ipynb"]
    dashboard.write_index(results, notebooks)
    page, readme = (results / "index.html").read_text(), (results / "README.md").read_text()
    flag = "Regression: 0.200 worse than the best archived run (1.6630, 20261201-0000)"
    assert flag in page and flag in readme
    assert "seeds: <b>03: (0, 1, 2); 05: (0, 1)</b>" in page
    paired = {"seeds": [0, 1], "differences": [0.19, 0.21], "mean": 0.2, "ci95": [0.073, 0.327]}
    (folder / "out.json").write_text(json.dumps({"test_loss": 1.863, "regression": {**regression, "paired": paired}}))
    dashboard.write_index(results, notebooks)
    assert f"{flag}; seed for seed +0.200 (95% CI +0.073 to +0.327)" in (results / "index.html").read_text()
    (folder / "out.json").write_text(json.dumps({"test_loss": 1.6}))
    dashboard.write_index(results, notebooks)
    assert "Regression" not in (results / "index.html").read_text()


def test_a_next_search_range_stays_legal():
    def edge(name, low, high, side, next_low, next_high):
        return {"name": name, "low": low, "high": high, "side": side, "next_low": next_low, "next_high": next_high}

    # beta2 at the top of 0.9-0.999: half the width out would pass 1, so the range widens on the scale of 1 - beta2
    text = findings.next_search(edge("beta2", 0.9, 0.999, "high", 0.9, 1.0485), "not bracketed")
    assert "search 0.9-0.9999 next" in text and "1 - (1 - 0.999)/10" in text and "1.048" not in text
    # a range starting at 0 is at its bound on the low side: nothing below it to search
    text = findings.next_search(edge("dropout", 0.0, 0.2, "low", -0.1, 0.2), "not bracketed")
    assert "0 is its bound" in text and "search" not in text and "-0.1" not in text
    # starting above 0, it widens down to 0 and no further
    assert "search 0-0.2 next (not below 0" in findings.next_search(edge("d", 0.05, 0.2, "low", -0.025, 0.2), "x")
    # unbounded ranges and log ranges keep edge_flags' range as it is
    assert findings.next_search(edge("lr", 1e-3, 1e-2, "high", 1e-3, 0.03162), "x") == "x; search 0.001-0.03162 next"
    assert findings.next_search(edge("s", -1.0, 1.0, "low", -2.0, 1.0), "x") == "x; search -2-1 next"


def test_the_tuning_findings_label_both_tests_and_say_where_they_disagree():
    arms = [
        {"variant": "baseline", "confirm_loss_mean": 1.99, "confirm_loss_ci95": 0.02, "n": 3, "significant": None},
        *[
            {
                "variant": v,
                "confirm_loss_mean": m,
                "confirm_loss_ci95": 0.01,
                "n": 3,
                "delta_vs_baseline": d,
                "delta_ci_low": lo,
                "delta_ci_high": hi,
                "test": "paired",
                "df": 4,
                "p_value": p,
                "p_holm": p,
                "significant": True,
            }
            for v, m, d, lo, hi, p in (
                ("lr_only", 2.01, 0.022, 0.009, 0.035, 0.0089),
                ("tuned", 1.96, -0.03, -0.04, -0.02, 0.006),
            )
        ],
    ]
    gains = {
        "total": {"mean": -0.029, "ci_low": -0.044, "ci_high": -0.015, "n": 3, "p_value": 0.0135},
        "lr": {"mean": 0.022, "ci_low": -0.002, "ci_high": 0.046, "n": 3, "p_value": 0.0577},
        "rest": {"mean": -0.051, "ci_low": -0.061, "ci_high": -0.041, "n": 3, "p_value": 0.002},
    }
    h = {"gains": gains, "confirmation_arms": arms}
    lr_line, tuned_line = findings._two_tests(h)
    assert lr_line.startswith("The two tests disagree on `lr_only`") and "significantly worse" in lr_line
    assert "does not: +0.022, 95% CI -0.002 to +0.046" in lr_line and "follows the table's test" in lr_line
    assert tuned_line.startswith("The two tests agree on `tuned`") and "significantly better" in tuned_line
    # an older hand-off, without the table's test per arm, says nothing rather than guessing
    assert findings._two_tests({"gains": gains, "confirmation_arms": [{"variant": "tuned", "n": 3}]}) == []
    caption = findings.confirmation_caption(arms, "pos_rope")
    assert "untuned config (03's pos_rope)" in caption and "pooled over the 2 arms' seeds (4 degrees" in caption
    assert "Holm's correction over 2 comparisons" in caption
    assert findings.untuned_label("pos_rope") == "untuned (03's pos_rope)"


def test_arm_records_are_json_safe_and_carry_the_tables_test():
    import pandas as pd

    from labutils import stats

    runs = pd.DataFrame(
        [
            {"variant": v, "seed": s, "confirm_loss": x + 0.01 * s * (v != "baseline"), "elapsed_s": 1.0}
            | {"num_params": 10, "flops_per_token": 1.0}
            for v, x in (("baseline", 2.0), ("lr_only", 2.02), ("tuned", 1.95))
            for s in range(3)
        ]
    )
    records = stats.arm_records(stats.summarize(runs, "baseline", metric="confirm_loss"), metric="confirm_loss")
    json.dumps(records, allow_nan=False)
    assert records[0]["variant"] == "baseline" and records[0]["significant"] is None and records[0]["p_value"] is None
    assert records[2]["test"] == "paired" and records[2]["df"] == 4 and isinstance(records[2]["significant"], bool)


def test_the_readme_and_docs_results_tables_are_the_committed_results_computed():
    """No typed number (issue 48): the README's and docs/results.md's results tables are `results_summary` of the
    committed results. After `make pipeline` they are rewritten; a hand edit or a forgotten commit fails here."""
    from labutils.files import REPO_ROOT, RESULTS_DIR

    expected = dashboard.results_summary(RESULTS_DIR)
    assert "| 05 final model (test) |" in expected and "s over 5 stages" in expected
    for document in (REPO_ROOT / "README.md", REPO_ROOT / "docs" / "results.md"):
        block = document.read_text().split(dashboard.RESULTS_BEGIN)[1].split(dashboard.RESULTS_END)[0].strip()
        assert block == expected, f"{document.name}: run `make pipeline` (or dashboard.write_results_blocks) again"


def test_the_results_summary_reads_every_number_from_the_hand_offs(tmp_path):
    """A changed hand-off changes the table: nothing in it is a constant."""
    from labutils.files import RESULTS_DIR

    results = tmp_path / "results"
    heavy = ("*.pt", "runs", "trials", "rerun", "run", "run_seed*", "lr_sweep", "lr_check", "sizing", "*.html", "*.db")
    shutil.copytree(RESULTS_DIR, results, ignore=shutil.ignore_patterns(*heavy))
    final = json.loads((results / "05_final_model" / "final.json").read_text())
    final["test_loss"], final["test_loss_ci95"] = 1.2345, [1.2, 1.3]
    (results / "05_final_model" / "final.json").write_text(json.dumps(final))
    assert "**1.234** (95% CI 1.200–1.300)" in dashboard.results_summary(results)
    document = tmp_path / "doc.md"
    document.write_text(f"intro\n{dashboard.RESULTS_BEGIN}\nold\n{dashboard.RESULTS_END}\nafter\n")
    assert dashboard.write_results_blocks([document], results) == [document]
    text = document.read_text()
    assert text.startswith("intro\n") and text.endswith("after\n") and "**1.234**" in text and "old" not in text
    (tmp_path / "other.md").write_text("no markers")
    with pytest.raises(ValueError, match="no <!-- results:begin -->"):
        dashboard.write_results_blocks([tmp_path / "other.md"], results)


def _summary(folder: Path, tokens: int, flops_per_token: float | None, seconds: float) -> None:
    folder.mkdir(parents=True)
    run = {"status": "completed", "tokens": tokens, "elapsed_s": seconds}
    run.update({"flops_per_token": flops_per_token} if flops_per_token else {})
    (folder / "summary.json").write_text(json.dumps(run))


def test_the_dashboard_shows_first_where_the_training_compute_went(tmp_path):
    """Issue 50: every run's tokens x FLOPs per token and its seconds, summed by part of the pipeline (05's sweep
    apart from the final model), each part's share, the final model's share in a sentence and a bar chart above the
    stages; nothing trained, no chart."""
    results = tmp_path / "results"
    _summary(results / "02_baseline" / "lr_sweep" / "2e-3", 100, 10.0, 5.0)
    _summary(results / "03_ablations" / "runs" / "baseline" / "seed0", 300, 10.0, 20.0)
    _summary(results / "03_ablations" / "lr_check" / "baseline-x2" / "seed0", 100, 10.0, 5.0)
    _summary(results / "05_final_model" / "sizing" / "c0" / "w32" / "seed0", 200, 5.0, 10.0)
    _summary(results / "05_final_model" / "run", 400, 10.0, 30.0)
    _summary(results / "05_final_model" / "run_seed1", 400, 10.0, 30.0)
    table = dashboard.compute_spent(results)
    assert list(table.index) == ["02 LR sweep", "03 ablations", "05 sizing sweep", "05 final model"]
    assert table["runs"].tolist() == [1, 2, 1, 2]
    assert table["flops"].tolist() == [1000, 4000, 1000, 8000] and table["seconds"].tolist() == [5, 25, 10, 60]
    assert table.loc["05 final model", "flops_share"] == pytest.approx(8000 / 14000)
    assert table.loc["05 final model", "seconds_share"] == pytest.approx(60 / 100)
    sentence = dashboard.compute_sentence(table)
    assert sentence.startswith("The final model's training took 57% of the pipeline's training FLOPs")
    assert "and 60% of its training process-seconds (60 of 100 s)" in sentence
    notebooks = [tmp_path / f"{s}.ipynb" for s in ("02_baseline", "03_ablations", "05_final_model")]
    dashboard.write_index(results, notebooks)
    page, readme = (results / "index.html").read_text(), (results / "README.md").read_text()
    assert (results / "compute.png").exists() and html.escape(sentence) in page and sentence in readme
    assert page.index("Where the training compute went") < page.index('<div class="stage">')
    # drawn again only when its numbers change (it is refreshed several times a stage)
    drawn = (results / "compute.png").stat().st_mtime_ns
    dashboard.write_index(results, notebooks)
    assert (results / "compute.png").stat().st_mtime_ns == drawn
    before = (results / "compute.png").read_bytes()
    _summary(results / "03_ablations" / "runs" / "baseline" / "seed1", 300, 10.0, 20.0)
    dashboard.write_index(results, notebooks)
    assert (results / "compute.png").read_bytes() != before
    # no final model yet: the studies' bars and no share of a final; nothing trained: no chart at all
    for run in ("run", "run_seed1"):
        shutil.rmtree(results / "05_final_model" / run)
    assert dashboard.compute_sentence(dashboard.compute_spent(results)) is None
    dashboard.write_index(results, notebooks)
    assert "No final model has trained yet" in (results / "index.html").read_text()
    for stage in ("02_baseline", "03_ablations", "05_final_model"):
        shutil.rmtree(results / stage)
    dashboard.write_index(results, notebooks)
    assert not (results / "compute.png").exists() and "compute went" not in (results / "index.html").read_text()


def test_the_target_verdict_says_what_it_rests_on_and_stands_alone_in_the_headline():
    """Issue 50: no `meets_target: yes` beside a verdict 'not established': 05's headline gives the verdict, its
    reference the target, the mean's side of it, each seed's and the interval's."""
    record = {
        "target_val_loss": 1.85,
        "meets_target": True,
        "target_verdict": "not established",
        "meets_target_per_seed": [True, False],
        "per_seed": [{"seed": 0}, {"seed": 1}],
    }
    assert findings.references(record)["target_verdict"] == (
        "last-10% target 1.85: the mean meets it, seed 1 misses it; the seeds' 95% interval spans it"
    )
    met = {**record, "target_verdict": "met", "meets_target_per_seed": [True, True]}
    assert findings.references(met)["target_verdict"].endswith(
        "every seed meets it; the seeds' 95% interval lies at or below it"
    )
    one = {"target_val_loss": 1.85, "meets_target": False, "target_verdict": "missed"}
    assert findings.references(one)["target_verdict"] == "last-10% target 1.85: the mean misses it"
    notebook = (REPO_ROOT / "notebooks" / "05_final_model.py").read_text()
    headline = notebook[notebook.index("headline=[") : notebook.index("]", notebook.index("headline=["))]
    assert '"target_verdict"' in headline and '"meets_target"' not in headline


def test_the_headline_interval_pools_the_seed_noise_of_03s_replicate_runs(tmp_path):
    """Issue 50: two seeds give a t(1) interval 12.7 standard errors wide. 05 pools its seeds' spread with the seed
    noise of 03's replicate runs (within each arm, over its seeds), says so, and keeps the seeds' own interval."""
    from labutils import profiles
    from labutils.stats import t_quantile

    results = tmp_path / "results"
    (results / "03_ablations").mkdir(parents=True)
    rows = ["variant,seed,val_loss"]  # 03's runs.csv, as its study writes it
    for arm, losses in {"baseline": (2.0, 2.02, 2.04), "pos_rope": (1.9, 1.91, 1.93), "one_seed": (1.5,)}.items():
        rows += [f"{arm},{seed},{loss}" for seed, loss in enumerate(losses)]
    (results / "03_ablations" / "runs.csv").write_text("\n".join(rows) + "\n")
    noise = profiles.ablation_seed_noise(results / "05_final_model")
    within = (
        (0.02**2 + 0 + 0.02**2) + ((1.9 - 1.9133333) ** 2 + (1.91 - 1.9133333) ** 2 + (1.93 - 1.9133333) ** 2)
    ) / 4
    assert noise["dof"] == 4 and noise["sd"] == pytest.approx(within**0.5, rel=1e-4)
    assert noise["source"] == "03's replicate runs: 2 arms x 3 seeds, validation loss"
    assert profiles.ablation_seed_noise(tmp_path / "elsewhere" / "05_final_model") is None
    scores = [
        {
            "seed": s,
            "test_loss": t,
            "last10pct_val_loss": t - 0.02,
            "test_bpb": 2.0,
            "test_ppl": 6.0,
            "test_accuracy": 0.5,
            "val_bpb": 2.6,
            "tokens": 100,
            "elapsed_s": 1.0,
            "tokens_per_s": 100.0,
        }
        for s, t in ((0, 1.857), (1, 1.867))
    ]
    pooled = profiles.seed_headline(scores, noise)
    sd = ((0.005**2 * 2 + 4 * noise["sd"] ** 2) / 5) ** 0.5
    half = t_quantile(5) * sd / 2**0.5
    assert pooled["test_loss_ci95"] == pytest.approx([1.862 - half, 1.862 + half])
    own = profiles.seed_headline(scores)
    assert own["test_ppl"] == pytest.approx(math.exp(1.862))  # of the mean loss, not the mean of perplexities
    assert pooled["test_loss_ci95_own_seeds"] == own["test_loss_ci95"] and "test_loss_ci95_own_seeds" not in own
    assert pooled["interval"].startswith("t with the seed noise pooled from the final's 2 seeds and 03's replicate")
    assert own["interval"] == "t over the 2 seeds' own spread (1 degree of freedom)"
    text = findings._over_seeds(pooled, "test_loss")
    assert text.startswith(", the mean of 2 seeds (95% interval ") and "; the seeds alone: " in text


def test_each_field_05_changes_comes_with_the_labs_evidence_for_it(tmp_path):
    """Issue 50: every model field 05 changes from what 03 and 04 compared is listed with the evidence for it: 03's
    arms that changed it, the sizing law's pick, or that no run compared it."""
    from labutils import profiles

    stage = tmp_path / "results" / "05_final_model"
    (tmp_path / "results" / "03_ablations").mkdir(parents=True)
    (tmp_path / "results" / "03_ablations" / "results_table.csv").write_text(
        "variant,overrides,delta_vs_baseline,delta_ci_low,delta_ci_high,significant\n"
        "baseline,—,0.0,,,baseline\n"
        'gqa,"model.attention=gqa, model.n_kv_head=2",0.002,-0.015,0.02,no\n'
        "d_model_64,model.d_model=64,0.159,0.142,0.177,yes\n"
    )
    changes = {"d_model": (128, 112), "attention": ("mha", "gqa"), "tie_weights": (False, True)}
    evidence = profiles.change_evidence(changes, stage, sized=True)
    assert evidence["d_model"].startswith("the sizing law's pick (05's sweep) and 03's `d_model_64`")
    assert "+0.159 nats/token against the baseline (95% CI +0.142 to +0.177, significant)" in evidence["d_model"]
    assert evidence["attention"].startswith("03's `gqa` (model.attention=gqa, model.n_kv_head=2): +0.002")
    assert evidence["attention"].endswith("not significant), at 03's size")
    assert evidence["tie_weights"] == "the profile's final design only: no run of the lab compared it"
    unsized = profiles.change_evidence(changes, stage, sized=False)
    assert unsized["d_model"].startswith("03's `d_model_64`")
    line = findings._model_changes(changes, evidence)[0]
    assert "`tie_weights` no → yes — the profile's final design only" in line
    assert "1 of them (`tie_weights`) no run of the lab compared." in line
    nothing = profiles.change_evidence(changes, tmp_path / "elsewhere" / "05_final_model", sized=False)
    assert set(nothing.values()) == {"the profile's final design only: no run of the lab compared it"}
