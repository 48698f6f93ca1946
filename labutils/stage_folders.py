"""What a notebook calls to be a pipeline stage: its results folder, the hand-off file the next stage
reads, the previous run's hand-off to compare with, and the archive of superseded runs.

A stage's folder holds `stage.json` (written here: when it started, its parameters, the machine,
its headline numbers, references and key figure) and, when `make pipeline` ran it, `run.json`
(written by the runner: status, time and the inputs that make it current). Re-running a stage
that finished archives the previous run's reader files with a reason computed from what changed;
re-running one that was cut off, with the same inputs, continues it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import dashboard
from .files import (
    ARCHIVE_DIR,
    RESULTS_DIR,
    RUN_FILE,
    STAGE_FILE,
    atomic_write_json,
    atomic_write_text,
    display_path,
    git_commit,
    repo_path,
    scrub_paths,
)
from .freshness import (
    LABELS,
    data_fingerprint,
    describe_change,
    read_json,
    runs_reusable,
    same_inputs,
    stage_inputs,
    upstream_fingerprint,
)
from .tables import fmt, markdown_table
from .tracking import log_stage
from .tracking import use as use_trackers
from .validation import ConfigError

ARCHIVE_CAP_BYTES = 1_000_000  # what one archived stage may add to git
MACHINE_BOUND = ("tokens_per_s", "elapsed", "seconds")  # headline numbers that follow the machine, not the code
REPRODUCED_FILE = "REPRODUCED.txt"  # an archived run's later re-runs that gave its numbers again
PERSISTENT = {"study.db"}  # state a re-run continues (Optuna's study): stays in place, not archived
SHIP_LIMIT_BYTES = (
    10_000_000  # saved weights up to this size are committed with the results (a fresh clone can use them)
)


def start_stage(
    out_dir: str | Path, archive_reason: str | None = None, *, parameters: dict[str, Any], tracking: str | None = None
) -> Path:
    """The stage's results folder, ready to write into.

    `parameters` are the notebook's parameters as the run got them (its parameters cell, then what
    papermill injected), handed over before the notebook rebinds any: they are recorded, and they
    decide with the code whether a run is the same as the one in the folder.

    A folder holding a run that did not finish (killed, cut at a time limit, failed) with the same
    inputs is continued: its finished runs, trials and checkpoints stay, so the stage picks up where
    it stopped. A folder holding a finished run, or one with other inputs, is first archived, so
    results of two runs never mix. When the folder is a stage of results/, the dashboard is
    rewritten at once: a stage run outside `make pipeline` shows as such there. `tracking` turns trackers on
    for the stage's runs (labutils.tracking.use), checked before anything is archived.
    """
    use_trackers(tracking)
    out_dir = repo_path(out_dir)
    refuse_unknown_parameters(parameters, out_dir.name)
    upstream, data = upstream_fingerprint(out_dir), data_fingerprint(out_dir)
    inputs = stage_inputs(out_dir.name, parameters, upstream=upstream, data=data)
    refuse_replacing_committed(out_dir, inputs, archive_reason)
    resumed = open_stage(out_dir, inputs, archive_reason, keep=_running_notebooks(out_dir))
    earlier = read_json(out_dir / STAGE_FILE) if resumed else {}
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    record = {"started": earlier.get("started", now()), "inputs": inputs, "context": machine_context(), "headline": {}}
    if resumed:
        record["resumed"] = [*earlier.get("resumed", []), now()]
    atomic_write_json(out_dir / STAGE_FILE, record)
    _refresh_dashboard(out_dir)
    return out_dir


def injected_parameters() -> list[str]:
    """The names papermill injected into this kernel (its cell that starts with "# Parameters"), in order; [] outside
    a notebook kernel or when nothing was injected."""
    import ast

    try:
        from IPython import get_ipython
    except ImportError:
        return []
    shell = get_ipython()
    names: list[str] = []
    for cell in (shell.user_ns.get("In") or []) if shell is not None else []:
        if cell.lstrip().startswith("# Parameters"):
            try:
                body = ast.parse(cell).body
            except SyntaxError:
                continue
            names += [
                t.id for node in body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)
            ]
    return names


def unknown_parameter_error(unknown: list[str], known: list[str], where: str) -> ConfigError:
    """The error for parameters no cell declares: each with the nearest valid names (by spelling, by containing one
    another, or by initials: `learning_rate` -> `lr`), and all of them."""
    import difflib

    def nearest(name: str) -> list[str]:
        initials = "".join(word[:1] for word in name.split("_"))
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        close += [k for k in known if k not in close and (k == initials or (len(k) > 2 and (k in name or name in k)))]
        return close[:3]

    hints = [
        f"{name!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else "")
        for name, close in ((name, nearest(name)) for name in unknown)
    ]
    return ConfigError(
        f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(hints)}: the parameters cell of {where} does "
        "not declare it, and papermill would only warn and run on the default. Valid names: " + ", ".join(sorted(known))
    )


def refuse_unknown_parameters(parameters: dict[str, Any], stage: str) -> None:
    """Stop before anything is written when papermill injected a name the notebook's parameters cell does not declare
    (`-p learning_rate 1e-3` for `lr`): papermill only warns, and the run went on with the default."""
    known = sorted({*parameters, *LABELS})
    unknown = [name for name in injected_parameters() if name not in known]
    if unknown:
        raise unknown_parameter_error(unknown, known, f"notebook {stage}")


def committed_results_folder(out_dir: Path) -> bool:
    """Whether `out_dir` is a stage folder of the repo's own results/ (what a clone ships), not one of the user's."""
    return out_dir.resolve().parent == RESULTS_DIR.resolve()


def refuse_replacing_committed(out_dir: Path, inputs: dict[str, Any], reason: str | None) -> None:
    """A notebook run on its own (papermill, JupyterLab) with other inputs than the finished run in results/ would
    archive that run and leave the later stages stale: it stops and says how to write elsewhere or replace it on
    purpose. `make pipeline` (which marks the folder `.running` before its kernel starts) and a run with an
    `archive_reason` replace it, as asked; a re-execution with the same inputs, or a cut run, continues as before."""
    if not committed_results_folder(out_dir) or _running_notebooks(out_dir) or reason:
        return
    stage, run = read_json(out_dir / STAGE_FILE), read_json(out_dir / RUN_FILE)
    finished = bool(stage and "handoff" in stage) or bool(run and run.get("ok"))
    if not finished or same_inputs((stage or {}).get("inputs"), inputs):
        return
    change = describe_change((stage or {}).get("inputs"), inputs)
    raise ConfigError(
        f"{display_path(out_dir)} holds the finished run that ships with the repo, and this run's inputs differ "
        f"({change}): running it there would archive that run and leave the later stages stale. Write elsewhere "
        f"with -p out_dir {out_dir.parent.name}-mine/{out_dir.name} (the later stages read their inputs beside "
        f"it, so give them the same folder), or replace it on purpose with -p archive_reason '<why>' "
        "(`make pipeline` replaces stale stages by itself)"
    )


def keep_input(path: str | None, out_dir: str | Path, what: str = "init_from") -> str | None:
    """`path` as the stage should read it: a path inside the stage's own folder, which the stage archives and clears
    before it trains (05 fine-tuned from the model it shipped), is first copied out, named by its
    contents, in `.inputs/` beside the stage folders (results/.inputs/, ignored by git), and that copy is returned, with
    a line saying so. Any other path (or None) comes back as it was."""
    if path is None or "://" in str(path):
        return path
    source, stage_dir = repo_path(path), repo_path(out_dir).resolve()
    if not source.exists() or not source.resolve().is_relative_to(stage_dir):
        return path
    import hashlib

    files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(source if source.is_dir() else source.parent)).encode())
        digest.update(file.read_bytes())
    copy = stage_dir.parent / ".inputs" / f"{stage_dir.name}-{source.name}-{digest.hexdigest()[:12]}"
    if not copy.exists():
        copy.parent.mkdir(parents=True, exist_ok=True)
        tmp = copy.with_name(copy.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if source.is_dir():
            shutil.copytree(source, tmp)
        else:
            tmp.mkdir()
            shutil.copy2(source, tmp)
        tmp.rename(copy)
    kept = copy if source.is_dir() else copy / source.name
    print(
        f"{what} {display_path(source)} lies in this stage's folder, which a new run archives and clears before it "
        f"trains: copied to {display_path(kept)}, and the run starts from that copy"
    )
    return display_path(kept)


def open_stage(
    stage_dir: Path,
    inputs: dict[str, Any],
    reason: str | None = None,
    keep: set[str] | None = None,
    reuse_runs: bool = True,
) -> bool:
    """Continue the stage's unfinished run when its inputs are these (True), else archive what is there (False),
    leaving its run folders in place to be reused when the training code and data are unchanged and `reuse_runs`
    (False: `FORCE=1`, every run trains again)."""
    if unfinished_with(stage_dir, inputs):
        run = read_json(stage_dir / RUN_FILE)
        if run and not run.get("ok"):
            (stage_dir / RUN_FILE).unlink()  # the failed attempt this run continues: its status no longer holds
        return True
    if (stage_dir / STAGE_FILE).exists() or (stage_dir / RUN_FILE).exists():
        before = (read_json(stage_dir / STAGE_FILE) or {}).get("inputs")
        runs = {p.name for p in stage_dir.iterdir() if p.is_dir() and p.name != "figures"}
        # run folders stay where they are: each is reused if its config is too (FORCE=1: none is)
        kept = runs if reuse_runs and runs_reusable(before, inputs) else set()
        # FORCE=1 starts the stage's state over too: an Optuna study.db left in place would hand the new search the
        # old trials as finished, and 04 would train none of them again
        archive_stage(stage_dir, reason, keep=(keep or set()) | kept, inputs=inputs, persistent=reuse_runs)
    return False


def unfinished_with(stage_dir: Path, inputs: dict[str, Any]) -> bool:
    """True when stage_dir holds a run that started with these inputs and did not finish: no hand-off
    written, and no run.json that says it passed."""
    stage, run = read_json(stage_dir / STAGE_FILE), read_json(stage_dir / RUN_FILE)
    if not stage or "handoff" in stage or (run or {}).get("ok"):
        return False
    return same_inputs(stage.get("inputs"), inputs)


def _running_notebooks(out_dir: Path) -> set[str]:
    """Executed notebooks being written right now by papermill must stay where papermill writes them."""
    marker = out_dir / ".running"
    return set(json.loads(marker.read_text())) if marker.exists() else set()


def _refresh_dashboard(stage_dir: Path) -> None:
    """Rewrite results/index.html when the stage lives in a results folder (not in a folder of the user's)."""
    results = stage_dir.parent
    if results == RESULTS_DIR or (results / "index.html").exists():
        dashboard.write_index(results)


def machine_context() -> dict[str, Any]:
    """What the stage ran with: the commit, the machine (its GPU when the stage uses torch and has one, else its
    CPU) and torch's version. torch is not imported for this: a stage that does not use it (a test's) pays nothing."""
    context: dict[str, Any] = {"commit": (git_commit() or "")[:10] or None, "python": platform.python_version()}
    try:
        context["torch"] = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        pass
    torch = sys.modules.get("torch")
    gpu = torch.cuda.get_device_name(0) if torch is not None and torch.cuda.is_available() else None
    context["machine"] = gpu or f"CPU {platform.machine()} ({_cpu_count()} cores)"
    return context


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def write_handoff(
    path: str | Path,
    findings: dict[str, Any],
    headline: list[str] | None = None,
    references: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write a stage's findings for the next stage as JSON (paths relative to the repo root).

    `headline` names the findings shown in results/index.html for this stage, `references` what
    some of them compare with (shown beside them). The profile and seeds in the findings go to the
    dashboard's run context.
    """
    path = repo_path(path)
    findings = {k: (display_path(v) if isinstance(v, Path) else v) for k, v in findings.items()}
    atomic_write_json(path, findings)
    stage_file = path.parent / STAGE_FILE
    stage = json.loads(stage_file.read_text()) if stage_file.exists() else {"headline": {}}
    stage["handoff"] = path.name
    stage["headline"].update({k: findings[k] for k in (headline or []) if k in findings})
    stage["references"] = {**stage.get("references", {}), **(references or {})}
    context = stage.setdefault("context", {})
    context.update({k: findings[k] for k in ("profile", "seeds") if findings.get(k) is not None})
    atomic_write_json(stage_file, stage)
    _refresh_dashboard(path.parent)
    log_stage(path.parent, findings, path)
    return findings


def record_figure(path: str | Path) -> None:
    """Name `path` (a figure in a stage's figures/) as the stage's key figure: the dashboard's thumbnail."""
    path = repo_path(path)
    stage_file = path.parent.parent / STAGE_FILE
    if stage_file.exists():
        stage = json.loads(stage_file.read_text())
        stage["figure"] = str(path.relative_to(stage_file.parent))
        atomic_write_json(stage_file, stage)


def ship_weights(model_dir: str | Path, limit: int = SHIP_LIMIT_BYTES) -> bool:
    """Whether a saved model's weights go into git with its manifest: yes up to `limit` bytes (the cpu
    profile's final model is about 3 MB); a larger model.pt gets a .gitignore beside it, and loading it
    from a clone without it says what rebuilds it. Returns True when the weights are shipped."""
    model_dir = repo_path(model_dir)
    weights, ignore = model_dir / "model.pt", model_dir / ".gitignore"
    if weights.stat().st_size <= limit:
        ignore.unlink(missing_ok=True)
        return True
    atomic_write_text(
        ignore,
        f"# {weights.stat().st_size / 1e6:.0f} MB of weights, over the {limit / 1e6:.0f} MB committed; "
        "FORCE=1 make pipeline rebuilds them\nmodel.pt\n",
    )
    return False


def sibling(out_dir: str | Path, relative: str) -> Path:
    """A path in another stage's folder beside this one: sibling("results/03_x", "02_baseline/baseline.json")."""
    return repo_path(out_dir).parent / relative


def read_handoff(path: str | Path) -> dict[str, Any] | None:
    """A previous stage's findings, or None when that stage has not run (callers fall back to defaults)."""
    path = repo_path(path)
    return json.loads(path.read_text()) if path.exists() else None


def archived_handoffs(out_dir: str | Path, name: str) -> Iterator[tuple[Path, dict[str, Any], str]]:
    """This stage's archived runs that hold the hand-off `name`, newest first: (folder, hand-off, why it was
    replaced: its REASON.txt, '' when not recorded)."""
    stage_dir = repo_path(out_dir)
    folder = archive_root(stage_dir) / stage_dir.name
    for run in sorted(folder.iterdir(), reverse=True) if folder.exists() else []:
        found = read_json(run / name)
        if found is not None:
            reason = (run / "REASON.txt").read_text().strip() if (run / "REASON.txt").exists() else ""
            yield run, found, reason


def previous_handoff(out_dir: str | Path, name: str) -> dict[str, Any] | None:
    """This stage's hand-off `name` from its previous run (the newest archived one), with the archive's
    reason under "archive_reason"; None when the stage has not run before."""
    for run, found, reason in archived_handoffs(out_dir, name):
        return {**found, "archive_reason": reason, "archived": display_path(run)}
    return None


# What a regression check names as the differences between a headline and the best archived one
REGRESSION_FIELDS = (
    "num_params",
    "tokens",
    "model.d_model",
    "model.n_layer",
    "model.block_size",
    "model.n_head",
    "model.n_kv_head",
    "model.tie_weights",
    "model.dropout",
    "train.batch_size",
    "train.lr",
    "train.warmup_steps",
    "train.schedule",
    "train.min_lr_ratio",
    "train.betas",
    "train.label_smoothing",
    "train.weight_decay",
)


def best_archived(out_dir: str | Path, name: str, key: str, **same: Any) -> dict[str, Any] | None:
    """The archived hand-off `name` of this stage with the lowest `key` among those whose fields equal `same` (e.g.
    profile="cpu"), as {"value", "archived" (its folder), "handoff"}; None when no archived run matches."""
    stage_dir = repo_path(out_dir)
    folder = archive_root(stage_dir) / stage_dir.name
    best = None
    for run in sorted(folder.iterdir()) if folder.exists() else []:
        found = read_json(run / name)
        if found is None or found.get(key) is None or any(found.get(k) != v for k, v in same.items()):
            continue
        if best is None or found[key] < best[1][key]:
            best = (run, found)
    return None if best is None else {"value": best[1][key], "archived": display_path(best[0]), "handoff": best[1]}


def regression(current: dict[str, Any], best: dict[str, Any] | None, key: str) -> dict[str, Any] | None:
    """Today's `key` against the best archived one (lower is better): how much worse, and which REGRESSION_FIELDS
    differ, as (then, now); None when there is no archived run or today's is not worse."""
    if best is None or current.get(key) is None or current[key] <= best["value"]:
        return None

    def field(h: dict[str, Any], dotted: str) -> Any:
        section, _, name = dotted.rpartition(".")
        return (h.get(section) or {}).get(name) if section else h.get(name)

    differs = {
        f: (field(best["handoff"], f), field(current, f))
        for f in REGRESSION_FIELDS
        if field(best["handoff"], f) != field(current, f)
    }
    return {
        "best": best["value"],
        "archived": best["archived"],
        "worse_by": current[key] - best["value"],
        "differs": differs,
        "paired": paired_seeds(best["handoff"], current, key),
    }


def paired_seeds(then: dict[str, Any], now: dict[str, Any], key: str) -> dict[str, Any] | None:
    """`key` of the seeds both hand-offs trained (their `per_seed`), now minus then, with the mean difference's 95%
    t interval (`stats.mean_ci`): whether seed noise alone could give the difference. None with fewer than 2 shared
    seeds."""
    from .stats import mean_ci

    def by_seed(h: dict[str, Any]) -> dict[Any, float]:
        return {s.get("seed"): s[key] for s in h.get("per_seed") or [] if s.get(key) is not None}

    before, after = by_seed(then), by_seed(now)
    seeds = sorted(set(before) & set(after), key=str)
    if len(seeds) < 2:
        return None
    diffs = [after[s] - before[s] for s in seeds]
    _, mean, _, half = mean_ci(diffs)
    return {"seeds": seeds, "differences": diffs, "mean": mean, "ci95": [mean - half, mean + half]}


def change_since_previous(previous: dict[str, Any] | None, current: dict[str, Any], keys: list[str]) -> str:
    """What this run concludes against the previous run of the stage: computed from both hand-offs."""
    if previous is None:
        return "No earlier run of this stage to compare with."
    lines = [
        f"Against the previous run ({previous['archived']}; archived because: "
        f"{previous['archive_reason'] or 'not recorded'}):"
    ]
    for key in keys:
        before, now = previous.get(key), current.get(key)
        lines.append(
            f"- {key}: {fmt(before) if before is not None else 'not reported'} -> "
            f"{fmt(now) if now is not None else 'not reported'}"
        )
    if previous.get("conclusion") or current.get("conclusion"):
        lines += [
            f"- then: {previous.get('conclusion', 'not reported')}",
            f"- now: {current.get('conclusion', 'not reported')}",
        ]
    return "\n".join(lines)


def other_verdicts(out_dir: str | Path, name: str, current: dict[str, Any], keys: list[str], most: int = 5) -> str:
    """The archived executions of this stage whose hand-off `name` reached another verdict (`keys`, e.g. the variant
    handed on and whether it was significant) than `current`, newest first, each with why it was replaced (its inputs
    differed: the archive's REASON.txt); '' when every kept one agrees. A verdict that flips between executions whose
    inputs barely differ is not one a reader should trust, and a comparison with the previous run alone hides it
    when that run was an identical re-execution (issue 48)."""
    differing = [
        (run, found, reason or "not recorded")
        for run, found, reason in archived_handoffs(out_dir, name)
        if any(k in found for k in keys) and any(found.get(k) != current.get(k) for k in keys)
    ]
    if not differing:
        return ""
    now = ", ".join(f"{k} {fmt(current.get(k))}" for k in keys)
    lines = [
        f"**Another verdict in {len(differing)} earlier execution{'s' if len(differing) > 1 else ''} of this stage** "
        f"(now: {now}), each on other inputs, named with it. Where only code that should not move the numbers "
        "differed, the verdict is not robust to it; where the design changed, the verdict is that design's:"
    ]
    for run, found, reason in differing[:most]:
        then = ", ".join(f"{k} {fmt(found.get(k))}" for k in keys)
        lines.append(f"- {display_path(run)}: {then} (replaced because: {reason.splitlines()[0]})")
    if len(differing) > most:
        lines.append(f"- and {len(differing) - most} older ones")
    return "\n".join(lines)


# --------------------------------------------------------------------------- archive


def _reader_files(stage_dir: Path) -> list[Path]:
    """What a reader of an archived run needs, most needed first: reason, run records and hand-offs,
    the reader's report, tables, then figures (the reader's report embeds them too)."""
    top = sorted(p for p in stage_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    figures = sorted((stage_dir / "figures").glob("*.png")) if (stage_dir / "figures").is_dir() else []
    return (
        [p for p in top if p.suffix in (".json", ".txt", ".md")]
        + [p for p in top if p.name.endswith(".reader.html")]
        + [p for p in top if p.suffix == ".csv"]
        + figures
    )


def headline_numbers(stage_file: Path) -> dict[str, Any] | None:
    """A stage's headline numbers as runs are compared: floats at 2 decimals, throughput and times left out
    (they follow the machine); None when the run has none (it was cut off before its hand-off)."""
    headline = (read_json(stage_file) or {}).get("headline")
    if not headline:
        return None
    return {
        k: round(v, 2) if isinstance(v, float) else v
        for k, v in headline.items()
        if not any(m in k for m in MACHINE_BOUND)
    }


def _note_reproduced(entry: Path, run: dict[str, Any]) -> None:
    line = (
        f"reproduced at commit {str(run.get('inputs', {}).get('commit') or '?')[:10]} ({run.get('finished') or now()})"
    )
    previous = (entry / REPRODUCED_FILE).read_text() if (entry / REPRODUCED_FILE).exists() else ""
    atomic_write_text(entry / REPRODUCED_FILE, previous + line + "\n")


def archive_stage(
    stage_dir: str | Path,
    reason: str | None = None,
    keep: set[str] | None = None,
    inputs: dict[str, Any] | None = None,
    *,
    persistent: bool = True,
) -> Path | None:
    """Archive a stage's results into archive/<stage>/<timestamp>/ and clear the stage folder.

    The archive keeps what a reader needs (`_reader_files`), at most ARCHIVE_CAP_BYTES of it;
    executed notebooks, per-run folders and weights are left out (`make pipeline` rebuilds them).
    REASON.txt says what changed: `reason` (a person's words, if given) and the difference between
    the archived run's inputs and `inputs`, the new run's. A run whose headline numbers are those of
    the newest archived run (`headline_numbers`), archived without a person's reason, is not copied:
    that entry's REPRODUCED.txt gains a line "reproduced at commit ..." and is returned. When the
    run before it in the archive had the same inputs, that older copy is dropped: the archive holds
    one run per set of inputs. `keep` (and, when `persistent`, Optuna's study.db) stay in the stage folder.
    """
    stage_dir = repo_path(stage_dir)
    keep = (keep or set()) | (PERSISTENT if persistent else set()) | {".running"}
    items = [p for p in stage_dir.iterdir() if p.name not in keep] if stage_dir.exists() else []
    if not items:
        return None
    old_run = json.loads((stage_dir / RUN_FILE).read_text()) if (stage_dir / RUN_FILE).exists() else {}
    old_inputs = old_run.get("inputs") or (read_json(stage_dir / STAGE_FILE) or {}).get("inputs")
    folder = archive_root(stage_dir) / stage_dir.name
    previous = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.exists() else []
    said = " ".join(str(reason or "").split())
    numbers = headline_numbers(stage_dir / STAGE_FILE)
    if (
        previous
        and said in ("", "re-run")
        and numbers is not None
        and numbers == headline_numbers(previous[-1] / STAGE_FILE)
    ):
        _note_reproduced(previous[-1], old_run)
        for item in items:
            shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
        write_archive_index(archive_root(stage_dir))
        return previous[-1]
    target = folder / datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    copied = 0
    for path in _reader_files(stage_dir):
        size = path.stat().st_size
        if path.name in keep or copied + size > ARCHIVE_CAP_BYTES:
            continue
        destination = target / path.relative_to(stage_dir)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, destination)
        copied += size
    for item in items:
        shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
    computed = describe_change(old_inputs, inputs) if inputs is not None else ""
    text = "; ".join(t for t in (said if said != "re-run" else "", computed) if t) or "re-run"
    atomic_write_text(target / "REASON.txt", text + "\n")
    if previous and old_run.get("inputs") and _archived_inputs(previous[-1]) == old_run["inputs"]:
        shutil.rmtree(previous[-1])  # the same inputs twice: keep the newer run only
    write_archive_index(archive_root(stage_dir))
    return target


def tidy_archive(archive_dir: Path = ARCHIVE_DIR) -> list[Path]:
    """Bring runs archived by older versions under today's rules: reader files only, under the cap,
    no machine paths, and one run per set of inputs (the newest). Returns the folders removed."""
    removed, seen = [], set()
    for folder in sorted(archive_dir.glob("*/*/"), reverse=True):  # newest first within each stage
        run = json.loads((folder / RUN_FILE).read_text()) if (folder / RUN_FILE).exists() else {}
        key = json.dumps([folder.parent.name, run.get("inputs") or folder.name], sort_keys=True)
        if key in seen:
            shutil.rmtree(folder)
            removed.append(folder)
            continue
        seen.add(key)
        keep, size = set(), 0
        for path in _reader_files(folder):
            if size + path.stat().st_size <= ARCHIVE_CAP_BYTES:
                keep.add(path)
                size += path.stat().st_size
        for path in sorted(folder.rglob("*"), reverse=True):  # files before their folders
            if path.is_file() and path not in keep:
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
            elif path.is_file() and path.suffix in (".json", ".csv", ".md", ".html", ".txt"):
                text = path.read_text(errors="replace")
                if scrub_paths(text) != text:
                    atomic_write_text(path, scrub_paths(text))
    write_archive_index(archive_dir)
    return removed


def _archived_inputs(folder: Path) -> dict[str, Any] | None:
    run = folder / RUN_FILE
    return json.loads(run.read_text()).get("inputs") if run.exists() else None


def archive_root(stage_dir: Path) -> Path:
    """The `archive` folder beside the results folder: results/NN_x -> archive/NN_x/<timestamp>."""
    return stage_dir.resolve().parent.parent / "archive"


def write_archive_index(archive_dir: Path = ARCHIVE_DIR) -> Path:
    rows = []
    for reason_file in sorted(archive_dir.glob("*/*/REASON.txt"), reverse=True):
        folder = reason_file.parent
        reader = next(folder.glob("*.reader.html"), None)
        link = f"[{folder.relative_to(archive_dir)}]({(reader or folder).relative_to(archive_dir)})"
        reproduced = (folder / REPRODUCED_FILE).read_text().split("\n") if (folder / REPRODUCED_FILE).exists() else []
        said = "; ".join([reason_file.read_text().strip(), *(line for line in reproduced if line)])
        rows.append([folder.parent.name, folder.name, link, said])
    text = (
        "# Archive\n\nSuperseded results: what a reader needs of each earlier run of a stage (its reader's report, "
        f"tables, figures and hand-off, at most {ARCHIVE_CAP_BYTES // 1000} kB), with what changed since. A later run "
        "that gave the same headline numbers (at 2 decimals, throughput and times left out) is a line "
        '"reproduced at commit ..." of the entry it reproduced, not a copy.\n\n'
    )
    return atomic_write_text(
        archive_dir / "README.md", text + markdown_table(["stage", "archived", "report", "reason"], rows) + "\n"
    )


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
