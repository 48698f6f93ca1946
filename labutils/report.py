"""Run the numbered notebooks headlessly and render what people read.

`run_notebook` executes one notebook through papermill into `results/NN_name/` and renders it to
HTML (full, and a reader's version without code). `python -m labutils.report` runs the pipeline:
every numbered notebook in order, stopping at the first failure (whose HTML still shows the error).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_json, atomic_write_text
from .paths import NOTEBOOKS_DIR, REPO_ROOT, RESULTS_DIR, display_path, repo_path


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

    def to_dict(self) -> dict[str, Any]:
        return {k: (display_path(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def start_stage(out_dir: str | Path) -> Path:
    """The stage's results folder (relative paths from the repo root), created if missing."""
    out_dir = repo_path(out_dir)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    return out_dir


def write_handoff(path: str | Path, findings: dict[str, Any]) -> dict[str, Any]:
    """Write a stage's findings for the next stage as JSON (paths relative to the repo root)."""
    findings = {k: (display_path(v) if isinstance(v, Path) else v) for k, v in findings.items()}
    atomic_write_json(repo_path(path), findings)
    return findings


def read_handoff(path: str | Path) -> dict[str, Any] | None:
    """A previous stage's findings, or None when that stage has not run (callers fall back to defaults)."""
    path = repo_path(path)
    return json.loads(path.read_text()) if path.exists() else None


def show_summary(findings: dict[str, Any], title: str = "Findings handed to the next stage") -> None:
    """Display findings as a two-column table (Markdown in a notebook, plain text elsewhere)."""
    rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in findings.items())
    text = f"**{title}**\n\n| key | value |\n|---|---|\n{rows}"
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display

        if get_ipython() is not None:
            display(Markdown(text))
            return
    except ImportError:
        pass
    print(text)


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


def run_notebook(
    notebook: str | Path,
    out_dir: str | Path | None = None,
    parameters: dict[str, Any] | None = None,
    *,
    progress: bool = True,
    kernel_name: str | None = None,
) -> NotebookRun:
    """Execute `notebook` with papermill into `out_dir` (default results/<stem>/) and render HTML.

    The kernel runs from the repo root, as `papermill notebooks/NN.ipynb out.ipynb` does there.
    A failing notebook is still saved and rendered, so its report shows the error.
    """
    import papermill as pm

    notebook = repo_path(notebook)
    if not notebook.exists():
        raise FileNotFoundError(f"notebook {notebook} does not exist; the pipeline's notebooks are {[p.name for p in numbered_notebooks()]}")
    out_dir = repo_path(out_dir) if out_dir is not None else RESULTS_DIR / notebook.stem
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / notebook.name
    params = {"out_dir": str(out_dir), **(parameters or {})}
    start = time.perf_counter()
    error = None
    try:
        pm.execute_notebook(str(notebook), str(executed), parameters=params, progress_bar=progress, cwd=str(REPO_ROOT), kernel_name=kernel_name)
    except pm.PapermillExecutionError as exc:
        error = f"{exc.ename}: {exc.evalue} (cell {exc.exec_count})"
    seconds = time.perf_counter() - start
    html = render_html(executed) if executed.exists() else None
    reader = render_html(executed, exclude_input=True) if executed.exists() else None
    run = NotebookRun(notebook.stem, out_dir, executed, html, reader, error is None, round(seconds, 2), error)
    atomic_write_json(out_dir / "run.json", run.to_dict())
    return run


def run_pipeline(notebooks: list[Path] | None = None, parameters: dict[str, Any] | None = None, *, progress: bool = True) -> list[NotebookRun]:
    """Run the numbered notebooks in order with shared `parameters`; stop at the first failure."""
    runs = []
    for notebook in notebooks or numbered_notebooks():
        print(f"==> {notebook.stem}", flush=True)
        run = run_notebook(notebook, parameters=parameters, progress=progress)
        runs.append(run)
        status = "ok" if run.ok else f"FAILED: {run.error}"
        print(f"    {status} in {run.seconds:.1f} s -> {display_path(run.html or run.executed)}", flush=True)
        if not run.ok:
            break
    return runs


def _parse_value(text: str) -> Any:
    """`-p key value` values are read as JSON when they parse (numbers, lists, true), else as strings."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labutils.report", description="Run the numbered notebooks into results/.")
    parser.add_argument("notebooks", nargs="*", help="notebooks to run (default: every notebooks/NN_*.ipynb in order)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"), help="a parameter for every notebook")
    parser.add_argument("--no-progress", action="store_true", help="hide papermill's per-cell progress bars")
    args = parser.parse_args(argv)
    parameters = {name: _parse_value(value) for name, value in args.parameter}
    notebooks = [repo_path(n) for n in args.notebooks] or numbered_notebooks()
    if not notebooks:
        print(f"no numbered notebooks in {NOTEBOOKS_DIR}", file=sys.stderr)
        return 2
    runs = run_pipeline(notebooks, parameters, progress=not args.no_progress)
    return 0 if runs and all(r.ok for r in runs) and len(runs) == len(notebooks) else 1


if __name__ == "__main__":
    sys.exit(main())
