"""Run the numbered notebooks headlessly and render what people read (`make pipeline`).

`run_notebook` executes one notebook through papermill into `results/NN_name/` and renders it to
HTML (full, and a reader's version without code). `run_pipeline` (`make pipeline`) runs them in
order, skips stages already finished with the same inputs, archives what it replaces (never
deletes), stops at the first failure, and writes `results/index.html` + `results/README.md`.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import html
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .files import atomic_write_json, atomic_write_text
from .paths import NOTEBOOKS_DIR, REPO_ROOT, RESULTS_DIR, display_path, repo_path
from .stages import RUN_FILE, STAGE_FILE, archive_stage, fmt, markdown_table, now

# --------------------------------------------------------------------------- inside a notebook


# --------------------------------------------------------------------------- archive


# --------------------------------------------------------------------------- running notebooks


@dataclass
class NotebookRun:
    """The outcome of one executed notebook: where its files are, whether it passed, how long it took."""

    name: str
    out_dir: Path
    executed: Path
    html: Path | None
    reader_html: Path | None
    ok: bool
    seconds: float
    error: str | None = None
    fingerprint: str = ""
    finished: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: (display_path(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def numbered_notebooks(directory: str | Path = NOTEBOOKS_DIR) -> list[Path]:
    """The pipeline's notebooks (`NN_name.ipynb`), in order."""
    return sorted(p for p in Path(directory).glob("[0-9][0-9]_*.ipynb"))


def render_html(executed: str | Path, *, exclude_input: bool = False) -> Path:
    """Render an executed notebook to HTML beside it; `exclude_input` gives the reader's version."""
    from nbconvert import HTMLExporter

    executed = Path(executed)
    exporter = HTMLExporter(exclude_input=exclude_input, exclude_input_prompt=exclude_input, exclude_output_prompt=exclude_input)
    body, _ = exporter.from_filename(str(executed))
    suffix = ".reader.html" if exclude_input else ".html"
    return atomic_write_text(executed.with_suffix(suffix), body)


def library_fingerprint() -> str:
    """A hash of labutils' source: a stage run with older library code is not current."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def fingerprint(notebook: Path, parameters: dict[str, Any]) -> str:
    """What makes a stage's results current: its notebook's code, its parameters and the library's code.

    `archive_reason` only labels what a run replaces; it changes no result, so it is left out.
    """
    cells = [c["source"] for c in json.loads(notebook.read_text())["cells"]]
    inputs = {k: v for k, v in parameters.items() if k != "archive_reason"}
    key = json.dumps({"cells": cells, "parameters": inputs, "labutils": library_fingerprint()}, sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def run_notebook(
    notebook: str | Path,
    out_dir: str | Path | None = None,
    parameters: dict[str, Any] | None = None,
    *,
    progress: bool = True,
    kernel_name: str | None = None,
    results_dir: Path = RESULTS_DIR,
) -> NotebookRun:
    """Execute `notebook` with papermill into `out_dir` (default results/<stem>/) and render HTML.

    Earlier results in `out_dir` are archived first (reason: the `archive_reason` parameter). The
    kernel runs from the repo root, as `papermill notebooks/NN.ipynb out.ipynb` does there. A failing
    notebook is still saved and rendered, so its report shows the error.
    """
    import papermill as pm

    notebook = repo_path(notebook)
    if not notebook.exists():
        raise FileNotFoundError(f"notebook {notebook} does not exist; the pipeline's notebooks are {[p.name for p in numbered_notebooks()]}")
    parameters = dict(parameters or {})
    out_dir = repo_path(out_dir) if out_dir is not None else Path(results_dir) / notebook.stem
    archive_stage(out_dir, parameters.get("archive_reason", "re-run"))
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / notebook.name
    atomic_write_json(out_dir / ".running", [notebook.name])
    start = time.perf_counter()
    error = None
    try:
        with _headless_progress_bars():
            pm.execute_notebook(
                str(notebook), str(executed), parameters={"out_dir": str(out_dir), **parameters},
                progress_bar=progress, cwd=str(REPO_ROOT), kernel_name=kernel_name,
            )
    except pm.PapermillExecutionError as exc:
        error = f"{exc.ename}: {exc.evalue} (cell {exc.exec_count})"
    except Exception as exc:  # a dead kernel, a timeout: the stage still gets its run.json, marked failed
        error = f"{type(exc).__name__}: {exc}"
    finally:
        (out_dir / ".running").unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    html_path = reader = None
    if executed.exists():
        try:
            html_path, reader = render_html(executed), render_html(executed, exclude_input=True)
        except Exception as exc:  # a half-written notebook must not hide the stage's own error
            error = error or f"rendering failed: {type(exc).__name__}: {exc}"
    run = NotebookRun(notebook.stem, out_dir, executed, html_path, reader, error is None, round(seconds, 2), error,
                      fingerprint(notebook, parameters), now())
    # run.json is written last: its presence with ok=true is what marks the stage finished.
    atomic_write_json(out_dir / RUN_FILE, run.to_dict())
    return run


@contextlib.contextmanager
def _headless_progress_bars():
    """The kernel inherits this environment: tqdm bars in a saved notebook redraw every 10 s, not 10 times a second."""
    if "TQDM_MININTERVAL" in os.environ:  # the user's own setting wins
        yield
        return
    os.environ["TQDM_MININTERVAL"] = "10"
    try:
        yield
    finally:
        del os.environ["TQDM_MININTERVAL"]


def stage_is_current(notebook: Path, parameters: dict[str, Any], results_dir: Path = RESULTS_DIR) -> bool:
    """True when the stage finished successfully with this notebook code and these parameters."""
    run_file = results_dir / notebook.stem / RUN_FILE
    if not run_file.exists():
        return False
    run = json.loads(run_file.read_text())
    return bool(run.get("ok")) and run.get("fingerprint") == fingerprint(notebook, parameters)


def run_pipeline(
    notebooks: list[Path] | None = None,
    parameters: dict[str, Any] | None = None,
    *,
    force: bool = False,
    progress: bool = True,
    results_dir: Path = RESULTS_DIR,
) -> list[NotebookRun | None]:
    """Run the numbered notebooks in order with shared `parameters`; stop at the first failure.

    Finished stages whose notebook and parameters are unchanged are skipped (None in the result),
    unless `force`; once one stage re-runs, every later stage re-runs too, since it reads the
    earlier stage's hand-off.
    """
    parameters = dict(parameters or {})
    runs: list[NotebookRun | None] = []
    rerun_rest = force
    for notebook in notebooks or numbered_notebooks():
        if not rerun_rest and stage_is_current(notebook, parameters, results_dir):
            print(f"==> {notebook.stem}: finished earlier with the same inputs, skipped (FORCE=1 re-runs it)", flush=True)
            runs.append(None)
            continue
        rerun_rest = True
        print(f"==> {notebook.stem}", flush=True)
        run = run_notebook(notebook, parameters=parameters, progress=progress, results_dir=results_dir)
        runs.append(run)
        status = "ok" if run.ok else f"FAILED: {run.error}"
        print(f"    {status} in {run.seconds:.1f} s -> {display_path(run.html or run.executed)}", flush=True)
        write_index(results_dir, notebooks)
        if not run.ok:
            break
    write_index(results_dir, notebooks)
    return runs


# --------------------------------------------------------------------------- index


def stage_table(results_dir: Path = RESULTS_DIR, notebooks: list[Path] | None = None) -> list[dict[str, Any]]:
    """One row per stage folder: status, duration, report links and headline numbers."""
    rows = []
    earlier_ok = True
    for notebook in notebooks or numbered_notebooks():
        folder = results_dir / notebook.stem
        run = json.loads((folder / RUN_FILE).read_text()) if (folder / RUN_FILE).exists() else None
        stage = json.loads((folder / STAGE_FILE).read_text()) if (folder / STAGE_FILE).exists() else {}
        status = "not run" if run is None else ("ok" if run["ok"] else "FAILED")
        if status == "ok" and not earlier_ok:
            status = "stale"  # finished once, but an earlier stage has failed or not run since: its inputs are gone
        earlier_ok = earlier_ok and status == "ok"
        rows.append({
            "stage": notebook.stem, "status": status, "seconds": run["seconds"] if run else None,
            "finished": run.get("finished", "") if run else "", "error": run.get("error") if run else None,
            "html": f"{notebook.stem}/{notebook.stem}.html" if (folder / f"{notebook.stem}.html").exists() else None,
            "reader": f"{notebook.stem}/{notebook.stem}.reader.html" if (folder / f"{notebook.stem}.reader.html").exists() else None,
            "headline": stage.get("headline", {}),
        })
    return rows


def write_index(results_dir: Path = RESULTS_DIR, notebooks: list[Path] | None = None) -> Path:
    """results/index.html and results/README.md: every stage's report with its headline numbers."""
    rows = stage_table(results_dir, notebooks)
    md_rows = [[r["stage"], r["status"] + (f" ({r['error']})" if r["error"] else ""), f"{r['seconds']:.0f} s" if r["seconds"] is not None else "",
                " · ".join(f"[{k}]({r[k]})" for k in ("html", "reader") if r[k]), fmt(r["headline"])] for r in rows]
    atomic_write_text(results_dir / "README.md", "# Results\n\nWritten by `make pipeline`; each stage links its report "
                      "(`html`: with code, `reader`: without).\n\n" + markdown_table(["stage", "status", "time", "reports", "headline"], md_rows) + "\n")
    cells = []
    for r in rows:
        links = " ".join(f'<a href="{html.escape(r[k])}">{k}</a>' for k in ("html", "reader") if r[k])
        color = {"ok": "#2e7d32", "FAILED": "#c62828"}.get(r["status"], "#777")
        detail = html.escape(r["error"] or "")
        headline = "<br>".join(f"{html.escape(str(k))}: <b>{html.escape(fmt(v))}</b>" for k, v in r["headline"].items())
        seconds = f"{r['seconds']:.0f} s" if r["seconds"] is not None else ""
        cells.append(f'<tr><td>{r["stage"]}</td><td style="color:{color}"><b>{r["status"]}</b> {detail}</td><td>{seconds}</td>'
                     f'<td>{links}</td><td>{headline}</td><td>{r["finished"]}</td></tr>')
    page = ("<!doctype html><meta charset='utf-8'><title>labutils results</title>"
            "<style>body{font-family:sans-serif;margin:2em}td,th{border-bottom:1px solid #ddd;padding:.4em .8em;text-align:left;vertical-align:top}</style>"
            "<h1>Results</h1><p>Written by <code>make pipeline</code>.</p><table><tr><th>stage</th><th>status</th><th>time</th>"
            "<th>reports</th><th>headline</th><th>finished (UTC)</th></tr>" + "".join(cells) + "</table>")
    return atomic_write_text(results_dir / "index.html", page)


# --------------------------------------------------------------------------- command line


def _parse_value(text: str) -> Any:
    """`-p key value` values are read as JSON when they parse (numbers, lists, true), else as strings."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labutils.pipeline", description="Run the numbered notebooks into results/.")
    parser.add_argument("notebooks", nargs="*", help="notebooks to run (default: every notebooks/NN_*.ipynb in order)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"), help="a parameter for every notebook")
    parser.add_argument("--force", action="store_true", help="re-run finished stages too (their results are archived)")
    parser.add_argument("--no-progress", action="store_true", help="hide papermill's per-cell progress bars")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR), help="where the stages' folders go (default: results/; the GPU kit uses its own)")
    args = parser.parse_args(argv)
    results_dir = repo_path(args.results_dir)
    parameters = {name: _parse_value(value) for name, value in args.parameter}
    notebooks = [repo_path(n) for n in args.notebooks] or numbered_notebooks()
    if not notebooks:
        print(f"no numbered notebooks in {NOTEBOOKS_DIR}", file=sys.stderr)
        return 2
    runs = run_pipeline(notebooks, parameters, force=args.force, progress=not args.no_progress, results_dir=results_dir)
    done = [r for r in runs if r is not None]
    print(f"index: {display_path(results_dir / 'index.html')}")
    return 0 if len(runs) == len(notebooks) and all(r.ok for r in done) else 1


if __name__ == "__main__":
    sys.exit(main())
