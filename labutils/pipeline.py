"""Run the numbered notebooks headlessly and render what people read (`make pipeline`).

`run_notebook` executes one notebook through papermill into `results/NN_name/` and renders it to
HTML: the full version with the code, and the reader's version with narrative, tables, figures and
findings only (no code, no stderr or progress bars, no bare object reprs). `run_pipeline` runs them
in order, skips stages already finished with the same inputs, archives what it replaces, stops at
the first failure, and writes the dashboard (`results/index.html`, `results/README.md`). Nothing
it writes holds a path of the machine that ran it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import processes
from .dashboard import RESULTS_BEGIN, write_index, write_results_blocks
from .files import (
    NOTEBOOKS_DIR,
    REPO_ROOT,
    RESULTS_DIR,
    RUN_FILE,
    STAGE_FILE,
    atomic_write_json,
    atomic_write_text,
    display_path,
    repo_path,
    scrub_paths,
)
from .freshness import (
    LABELS,
    current_inputs,
    parameter_defaults,
    read_json,
    recorded_parameters,
    runs_reusable,
    same_inputs,
    stage_inputs,
)
from .stage_folders import keep_input, now, open_stage, unknown_parameter_error
from .tracking import CLI_HELP as TRACKING_HELP
from .tracking import parse as parse_tracking
from .validation import ConfigError, FolderInUseError, Stopped

# nbformat validates notebooks with jsonschema, which compiles 38 Lark grammars for IRI formats at import when
# rfc3987_syntax is installed (JupyterLab's dependencies bring it): two seconds of every process that runs or
# renders a notebook, for a format no notebook schema uses. Marked absent, jsonschema skips that format.
if "jsonschema" not in sys.modules:
    sys.modules.setdefault("rfc3987_syntax", None)

# Readable tables in the rendered reports: wide ones scroll inside the page, long cells wrap between words (never
# inside a number or a name: `anywhere` broke 'baseline' and '1.36e-12' in two).
_REPORT_CSS = """<style>
.jp-RenderedHTMLCommon table{display:block;max-width:100%;overflow-x:auto;font-size:12.5px}
.jp-RenderedHTMLCommon td{white-space:normal;overflow-wrap:break-word;max-width:28em}.jp-RenderedHTMLCommon
th{white-space:nowrap}
.jp-RenderedImage img,.jp-OutputArea-output img{max-width:100%;height:auto}
</style>
"""


@dataclass
class NotebookRun:
    """The outcome of one executed notebook: where its files are, whether it passed, how long it took, the
    parameters it was given and its inputs (`freshness.stage_inputs`: the given parameters over the notebook's
    defaults, and the code), from which `stage_is_current` decides."""

    name: str
    out_dir: Path
    executed: Path
    html: Path | None
    reader_html: Path | None
    ok: bool
    seconds: float
    error: str | None = None
    finished: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    # when it reused the runs of an earlier execution (only report code or the notebook had changed): that
    # execution's seconds and when it finished, so the dashboard's times stay those of the training
    reused_runs_from: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: (display_path(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def numbered_notebooks(directory: str | Path = NOTEBOOKS_DIR) -> list[Path]:
    """The pipeline's notebooks (`NN_name.ipynb`), in order."""
    return sorted(p for p in Path(directory).glob("[0-9][0-9]_*.ipynb"))


# --------------------------------------------------------------------------- rendering


def _for_reader(output: dict[str, Any]) -> bool:
    """An output a reader wants: printed text, errors, and rich displays (tables, figures, Markdown);
    not stderr (warnings, progress bars), widgets, or results with only a plain-text repr."""
    if output["output_type"] == "stream":
        return output.get("name") == "stdout"
    if output["output_type"] == "error":
        return True
    kinds = [
        k for k in output.get("data", {}) if k != "text/plain" and not k.startswith("application/vnd.jupyter.widget")
    ]
    return bool(kinds)


def render_html(executed: str | Path, *, exclude_input: bool = False) -> Path:
    """Render an executed notebook to HTML beside it; `exclude_input` gives the reader's version."""
    import nbformat
    from nbconvert import HTMLExporter

    executed = Path(executed)
    nb = nbformat.read(executed, as_version=4)
    if exclude_input:
        nb.metadata.pop("widgets", None)  # saved widget state (progress bars of a run in JupyterLab or bare papermill)
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.outputs = [o for o in cell.outputs if _for_reader(o)]
    exporter = HTMLExporter(
        exclude_input=exclude_input, exclude_input_prompt=exclude_input, exclude_output_prompt=exclude_input
    )
    body, _ = exporter.from_notebook_node(nb)
    body = scrub_paths(body).replace("</head>", _REPORT_CSS + "</head>", 1)
    suffix = ".reader.html" if exclude_input else ".html"
    return atomic_write_text(executed.with_suffix(suffix), body)


def _scrub_notebook(executed: Path) -> None:
    """The executed notebook as committed: paths relative to the repo, the home folder as `~`."""
    atomic_write_text(executed, scrub_paths(executed.read_text()))


# --------------------------------------------------------------------------- running notebooks


def _local_kernel_manager():
    """Kernels the pipeline starts talk to it over Unix sockets in Jupyter's runtime folder: no TCP port to
    collide with another run's, and no ipykernel warning about unencrypted TCP in every stage's output."""
    import tempfile
    import uuid

    from jupyter_client.manager import AsyncKernelManager
    from traitlets import CaselessStrEnum

    class LocalKernelManager(AsyncKernelManager):
        transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc" if os.name == "posix" else "tcp", config=True)

        def _ip_default(self) -> str:
            # jupyter_client's default for IPC can be "kernel-ipc" in the working folder, which two kernels
            # started at once would share: each gets sockets of its own
            if self.transport != "ipc":
                return super()._ip_default()
            return os.path.join(tempfile.gettempdir(), f"labutils-kernel-{uuid.uuid4().hex[:16]}")

        async def _async_launch_kernel(self, kernel_cmd: list[str], **kw: Any) -> None:
            await super()._async_launch_kernel(kernel_cmd, **kw)
            # jupyter_client starts the kernel in a session of its own, whose process group the workers it starts
            # join: a stop (_stopping_kernels) ends that group, not only the kernel
            if getattr(self.provisioner, "pgid", None):
                _KERNEL_GROUPS.add(self.provisioner.pgid)

    return LocalKernelManager


_KERNEL_GROUPS: set[int] = set()  # the process groups of the kernels the running run_notebook has started


def _end_kernels() -> None:
    for pgid in sorted(_KERNEL_GROUPS):
        processes.end_process_group(pgid)


@contextlib.contextmanager
def _stopping_kernels():
    """Within: SIGTERM or SIGINT to this process (`timeout`, `kill`, a scheduler, Ctrl-C) ends the kernel's whole
    process group, its study and tuning workers included, then raises Stopped. Without it the kernel ended itself
    (its parent gone) but the workers it had started trained on as orphans."""
    try:
        with processes.on_stop_signals(_end_kernels) as received:
            yield received
    finally:
        _KERNEL_GROUPS.clear()


def _checked_parameters(notebook: Path, parameters: dict[str, Any] | None, out_dir: Path) -> dict[str, Any]:
    """The parameters as the notebook gets them: a name it does not declare is refused (papermill would only warn),
    and a path given inside the stage's own folder (05 fine-tuned from the model it shipped) is copied out before
    open_stage archives and clears that folder; the notebook reads the copy."""
    parameters = dict(parameters or {})
    unknown = sorted(set(parameters) - declared_parameters(notebook))
    if unknown:
        raise unknown_parameter_error(unknown, sorted(declared_parameters(notebook)), f"notebook {notebook.stem}")
    for name, value in parameters.items():
        if isinstance(value, str) and name not in LABELS:
            parameters[name] = keep_input(value, out_dir, what=name)
    return parameters


def run_notebook(
    notebook: str | Path,
    out_dir: str | Path | None = None,
    parameters: dict[str, Any] | None = None,
    *,
    progress: bool = True,
    kernel_name: str | None = None,
    results_dir: Path = RESULTS_DIR,
    retrain: bool = False,
) -> NotebookRun:
    """Execute `notebook` with papermill into `out_dir` (default results/<stem>/) and render HTML.

    Earlier finished results in `out_dir` are archived first, with the `archive_reason` parameter and
    what changed; an unfinished run with the same inputs is continued instead (`stage_folders.open_stage`).
    Finished runs stay to be reused when only report code, the notebook or parameters changed, unless `retrain`.
    The kernel runs from the repo root, as `papermill notebooks/NN.ipynb out.ipynb` does
    there, without progress bars. A failing notebook is still saved and rendered, so its report
    shows the error.
    """
    import papermill as pm

    notebook = repo_path(notebook)
    if not notebook.exists():
        raise FileNotFoundError(
            f"notebook {notebook} does not exist; the pipeline's notebooks are {[p.name for p in numbered_notebooks()]}"
        )
    out_dir = repo_path(out_dir) if out_dir is not None else Path(results_dir) / notebook.stem
    processes.refuse_if_in_use(out_dir)  # before open_stage, which may archive the folder under them
    parameters = _checked_parameters(notebook, parameters, out_dir)
    inputs = current_inputs(notebook, parameters, out_dir)
    earlier = None if retrain else _execution_that_trained(out_dir, inputs)
    if open_stage(out_dir, inputs, parameters.get("archive_reason"), reuse_runs=not retrain):
        print("    continuing its unfinished run (same inputs): finished runs and trials are kept", flush=True)
    executed = out_dir / notebook.name
    atomic_write_json(out_dir / ".running", [notebook.name])  # (it creates out_dir)
    start, started_at = time.perf_counter(), time.time()
    error = stopped = None
    received: list[int] = []
    try:
        with _headless(), _stopping_kernels() as received:
            pm.execute_notebook(
                str(notebook),
                str(executed),
                parameters={"out_dir": display_path(out_dir), **parameters},
                progress_bar=progress,
                cwd=str(REPO_ROOT),
                kernel_name=kernel_name,
                kernel_manager_class=_local_kernel_manager(),
            )
    except Stopped as exc:
        stopped = exc
    except pm.PapermillExecutionError as exc:
        error = f"{exc.ename}: {scrub_paths(str(exc.evalue))} (cell {exc.exec_count})"
    except Exception as exc:  # a dead kernel, a timeout: the stage still gets its run.json, marked failed
        error = f"{type(exc).__name__}: {scrub_paths(str(exc))}"
    finally:
        (out_dir / ".running").unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    if received:  # stopped, whether papermill raised Stopped or, its kernel ended under it, another error
        stopped = stopped or Stopped(received[0])
        error = f"{stopped} after {seconds:.0f} s: {_STOPPED}"
    html_path = reader = None
    if executed.exists() and not stopped:  # a stop ends the process within seconds: no rendering
        try:
            _scrub_notebook(executed)
            html_path, reader = render_html(executed), render_html(executed, exclude_input=True)
        except Exception as exc:  # a half-written notebook must not hide the stage's own error
            error = error or f"rendering failed: {type(exc).__name__}: {exc}"
    run = NotebookRun(
        notebook.stem,
        out_dir,
        executed,
        html_path,
        reader,
        error is None,
        round(seconds, 2),
        error,
        now(),
        recorded_parameters(parameters),
        inputs,
        _reused_runs(earlier, out_dir, started_at),
    )
    # run.json is written last: its presence with ok=true is what marks the stage finished.
    atomic_write_json(out_dir / RUN_FILE, run.to_dict())
    if stopped:
        raise stopped
    return run


def _execution_that_trained(out_dir: Path, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """The seconds and finishing time of the execution that trained the runs this one may reuse: the stage's last
    passing execution (or the one that one reused from) when only report code, the notebook or parameters changed;
    None when it trains from scratch or continues a cut run."""
    run, stage = read_json(out_dir / RUN_FILE), read_json(out_dir / STAGE_FILE)
    if not run or not run.get("ok") or not stage or not runs_reusable(stage.get("inputs"), inputs):
        return None
    earlier = run.get("reused_runs_from") or {"seconds": run["seconds"], "finished": run.get("finished", "")}
    return {"seconds": earlier["seconds"], "finished": earlier["finished"]}


def _reused_runs(earlier: dict[str, Any] | None, out_dir: Path, started_at: float) -> dict[str, Any] | None:
    """`earlier` with how many runs this execution read back (their summary.json older than its start: a reused run
    writes nothing) and how many it trained; None when it reused none (a run's config changed, or nothing was kept)."""
    if earlier is None:
        return None
    summaries = list(out_dir.rglob("summary.json"))
    reused = sum(s.stat().st_mtime < started_at for s in summaries)
    return {**earlier, "runs_reused": reused, "runs_trained": len(summaries) - reused} if reused else None


_STOPPED = (
    "the kernel and every worker process it had started were ended. Run the same command again to continue: finished "
    "runs and trials are kept, and a cut one resumes from its last checkpoint"
)


COMPILE_CACHE = REPO_ROOT / ".cache" / "torch-compile"


def compile_cache_environment() -> dict[str, str]:
    """One torch.compile cache for every stage, run and worker process of the pipeline, kept between runs: a shape
    compiled once (inductor's FX graphs, AOTAutograd's graphs, Triton's kernels) is loaded, not compiled, by the
    next run of it, including a stage continued after a cut. Ignored by git; delete the folder for a cold start."""
    return {
        "TORCHINDUCTOR_CACHE_DIR": str(COMPILE_CACHE / "inductor"),
        "TRITON_CACHE_DIR": str(COMPILE_CACHE / "triton"),
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
        "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
    }


@contextlib.contextmanager
def _headless():
    """What the kernel inherits: labutils draws no progress bars and no live plots (LABUTILS_HEADLESS), and
    other text-mode tqdm bars stay quiet too (TQDM_DISABLE, read when tqdm is imported in the kernel;
    papermill's own bar here was imported before); the shared compile cache (compile_cache_environment)."""
    added = {
        k: v
        for k, v in {"TQDM_DISABLE": "1", "LABUTILS_HEADLESS": "1", **compile_cache_environment()}.items()
        if k not in os.environ
    }
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            del os.environ[key]


def render_stage(executed: str | Path, stage_dir: str | Path | None = None) -> NotebookRun:
    """Bring a notebook run outside the pipeline (`papermill notebooks/03_ablations.ipynb out.ipynb`)
    into its stage folder: the executed notebook, both HTML versions, run.json and the dashboard.

    The stage folder is the one the notebook wrote (default results/<notebook name>/, from the
    notebook's `papermill` metadata or the file name). Its inputs are recorded, but `make pipeline`
    still re-runs it when they differ from the pipeline's parameters.
    """
    import nbformat

    executed = repo_path(executed)
    nb = nbformat.read(executed, as_version=4)
    meta = nb.metadata.get("papermill", {})
    stem = Path(meta.get("input_path") or executed).stem
    stage_dir = (
        repo_path(stage_dir)
        if stage_dir is not None
        else repo_path(meta.get("parameters", {}).get("out_dir") or RESULTS_DIR / stem)
    )
    target = stage_dir / f"{stem}.ipynb"
    if target != executed:
        atomic_write_text(target, executed.read_text())
    _scrub_notebook(target)
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"
    ]
    error = f"{errors[0]['ename']}: {scrub_paths(str(errors[0]['evalue']))}" if errors else None
    parameters = recorded_parameters(meta.get("parameters", {}))
    notebook = NOTEBOOKS_DIR / f"{stem}.ipynb"
    inputs = current_inputs(notebook, parameters, stage_dir) if notebook.exists() else stage_inputs(stem, parameters)
    run = NotebookRun(
        stem,
        stage_dir,
        target,
        render_html(target),
        render_html(target, exclude_input=True),
        error is None,
        round(float(meta.get("duration") or 0.0), 2),
        error,
        now(),
        parameters,
        inputs,
    )
    atomic_write_json(stage_dir / RUN_FILE, run.to_dict())
    write_index(stage_dir.parent)
    return run


def stage_is_current(notebook: Path, parameters: dict[str, Any], results_dir: Path = RESULTS_DIR) -> bool:
    """True when the stage finished successfully with the inputs a run with these parameters would have now:
    the same parameters, notebook, labutils and earlier stages' hand-offs."""
    run_file = results_dir / notebook.stem / RUN_FILE
    if not run_file.exists():
        return False
    run = json.loads(run_file.read_text())
    return bool(run.get("ok")) and same_inputs(
        run.get("inputs"), current_inputs(notebook, parameters, results_dir / notebook.stem)
    )


def declared_parameters(notebook: Path) -> set[str]:
    """The names a notebook takes: its parameters cell's, and the labels every stage takes (out_dir, ...)."""
    return set(parameter_defaults(notebook)) | set(LABELS)


def route_parameters(notebooks: list[Path], parameters: dict[str, Any]) -> dict[Path, dict[str, Any]]:
    """Each notebook's share of the parameters given to the whole pipeline: the names it declares (`-p steps 20` goes
    to the stages that have `steps`, not to 05, which would only warn). A name no notebook declares stops the pipeline
    before any stage runs, with the nearest valid names: it would otherwise run on defaults silently."""
    declared = {notebook: declared_parameters(notebook) for notebook in notebooks}
    known = set().union(*declared.values()) if declared else set()
    unknown = [name for name in parameters if name not in known]
    if unknown:
        raise unknown_parameter_error(unknown, sorted(known), "any of " + ", ".join(n.stem for n in notebooks))
    return {n: {k: v for k, v in parameters.items() if k in declared[n]} for n in notebooks}


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
    unless `force` (which also trains every run again); once one stage re-runs, every later stage re-runs too,
    since it reads the earlier stage's hand-off.
    """
    notebooks = list(notebooks or numbered_notebooks())
    # each notebook's share of the parameters (none given: nothing to route, no notebook is read yet)
    routed = route_parameters(notebooks, dict(parameters)) if parameters else {n: {} for n in notebooks}
    runs: list[NotebookRun | None] = []
    rerun_rest = force
    for notebook in notebooks:
        parameters = routed[notebook]
        if not rerun_rest and stage_is_current(notebook, parameters, results_dir):
            print(
                f"==> {notebook.stem}: finished earlier with the same inputs, skipped (FORCE=1 re-runs it)", flush=True
            )
            runs.append(None)
            continue
        rerun_rest = True
        print(f"==> {notebook.stem}", flush=True)
        run = run_notebook(notebook, parameters=parameters, progress=progress, results_dir=results_dir, retrain=force)
        runs.append(run)
        status = "ok" if run.ok else f"FAILED: {run.error}"
        print(f"    {status} in {run.seconds:.1f} s -> {display_path(run.html or run.executed)}", flush=True)
        write_index(results_dir, notebooks)
        if not run.ok:
            break
    write_index(results_dir, notebooks)
    if results_dir.resolve() == RESULTS_DIR.resolve():  # the README's and docs' results: computed, never typed
        documents = [REPO_ROOT / "README.md", REPO_ROOT / "docs" / "results.md"]
        write_results_blocks([d for d in documents if d.exists() and RESULTS_BEGIN in d.read_text()], results_dir)
    return runs


# --------------------------------------------------------------------------- command line


def _parse_value(text: str) -> Any:
    """`-p key value` values are read as JSON when they parse (numbers, lists, true), else as strings."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m labutils.pipeline", description="Run the numbered notebooks into results/."
    )
    parser.add_argument("notebooks", nargs="*", help="notebooks to run (default: every notebooks/NN_*.ipynb in order)")
    parser.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="a parameter for every notebook",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="re-run finished stages too, training every run again (their results are archived)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide papermill's per-cell progress bars")
    parser.add_argument(
        "--results-dir",
        default=str(RESULTS_DIR),
        help="where the stages' folders go (default: results/; the GPU kit uses its own)",
    )
    parser.add_argument("--tracking", help=TRACKING_HELP)
    parser.add_argument(
        "--render",
        metavar="EXECUTED",
        help="render a notebook executed outside the pipeline (by papermill) into its stage folder",
    )
    args = parser.parse_args(argv)
    if args.render:
        run = render_stage(args.render)
        print(f"{display_path(run.reader_html)}; index: {display_path(run.out_dir.parent / 'index.html')}")
        return 0 if run.ok else 1
    results_dir = repo_path(args.results_dir)
    parameters = {name: _parse_value(value) for name, value in args.parameter}
    if args.tracking is not None:  # a parameter of every notebook; checked here, before any stage runs
        parameters["tracking"] = ",".join(parse_tracking(args.tracking))
    notebooks = [repo_path(n) for n in args.notebooks] or numbered_notebooks()
    if not notebooks:
        print(f"no numbered notebooks in {NOTEBOOKS_DIR}", file=sys.stderr)
        return 2
    try:
        runs = run_pipeline(
            notebooks, parameters, force=args.force, progress=not args.no_progress, results_dir=results_dir
        )
    except FolderInUseError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:  # a parameter no notebook declares: nothing ran
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Stopped as exc:  # its stage's run.json says so (run_notebook); the shell's convention: 128 + the signal
        print(f"{exc}: {_STOPPED}", file=sys.stderr)
        return 128 + exc.signum
    done = [r for r in runs if r is not None]
    print(f"index: {display_path(results_dir / 'index.html')}")
    return 0 if len(runs) == len(notebooks) and all(r.ok for r in done) else 1


if __name__ == "__main__":
    sys.exit(main())
