"""What a notebook calls to be a pipeline stage: its results folder, the hand-off file the next stage
reads, the previous run's hand-off to compare with, and findings shown as a table.
"""
from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .files import atomic_write_json, atomic_write_text
from .paths import ARCHIVE_DIR, display_path, repo_path

STAGE_FILE = "stage.json"  # written by the notebook: its parameters, hand-off file and headline numbers
RUN_FILE = "run.json"  # written by the pipeline runner: status, duration, inputs' fingerprint


def start_stage(out_dir: str | Path, archive_reason: str = "re-run") -> Path:
    """The stage's results folder, ready to write into.

    A folder holding an earlier run (a notebook run by hand, or papermill to another output) is
    first moved to archive/, so results of two runs never mix and nothing is deleted.
    """
    out_dir = repo_path(out_dir)
    if (out_dir / STAGE_FILE).exists() or (out_dir / RUN_FILE).exists():
        archive_stage(out_dir, archive_reason, keep=_running_notebooks(out_dir))
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / STAGE_FILE, {"started": now(), "headline": {}})
    return out_dir


def _running_notebooks(out_dir: Path) -> set[str]:
    """Executed notebooks being written right now by papermill must stay where papermill writes them."""
    marker = out_dir / ".running"
    return set(json.loads(marker.read_text())) if marker.exists() else set()


def write_handoff(path: str | Path, findings: dict[str, Any], headline: list[str] | None = None) -> dict[str, Any]:
    """Write a stage's findings for the next stage as JSON (paths relative to the repo root).

    `headline` names the findings shown in results/index.html for this stage.
    """
    path = repo_path(path)
    findings = {k: (display_path(v) if isinstance(v, Path) else v) for k, v in findings.items()}
    atomic_write_json(path, findings)
    stage_file = path.parent / STAGE_FILE
    stage = json.loads(stage_file.read_text()) if stage_file.exists() else {"headline": {}}
    stage["handoff"] = path.name
    stage["headline"].update({k: findings[k] for k in (headline or []) if k in findings})
    atomic_write_json(stage_file, stage)
    return findings


def sibling(out_dir: str | Path, relative: str) -> Path:
    """A path in another stage's folder beside this one: sibling("results/03_x", "02_baseline/baseline.json")."""
    return repo_path(out_dir).parent / relative


def read_handoff(path: str | Path) -> dict[str, Any] | None:
    """A previous stage's findings, or None when that stage has not run (callers fall back to defaults)."""
    path = repo_path(path)
    return json.loads(path.read_text()) if path.exists() else None


def previous_handoff(out_dir: str | Path, name: str) -> dict[str, Any] | None:
    """This stage's hand-off `name` from its previous run (the newest archived one), with the archive's
    reason under "archive_reason"; None when the stage has not run before."""
    stage_dir = repo_path(out_dir)
    folder = archive_root(stage_dir) / stage_dir.name
    for run in sorted(folder.iterdir(), reverse=True) if folder.exists() else []:
        if (run / name).exists():
            reason = (run / "REASON.txt").read_text().strip() if (run / "REASON.txt").exists() else ""
            return {**json.loads((run / name).read_text()), "archive_reason": reason, "archived": display_path(run)}
    return None


def change_since_previous(previous: dict[str, Any] | None, current: dict[str, Any], keys: list[str]) -> str:
    """What this run concludes against the previous run of the stage: computed from both hand-offs."""
    if previous is None:
        return "No earlier run of this stage to compare with."
    lines = [f"Against the previous run ({previous['archived']}; archived because: {previous['archive_reason'] or 'not recorded'}):"]
    for key in keys:
        before, now = previous.get(key), current.get(key)
        lines.append(f"- {key}: {fmt(before) if before is not None else 'not reported'} -> {fmt(now) if now is not None else 'not reported'}")
    if previous.get("conclusion") or current.get("conclusion"):
        lines += [f"- then: {previous.get('conclusion', 'not reported')}", f"- now: {current.get('conclusion', 'not reported')}"]
    return "\n".join(lines)


def show_summary(findings: dict[str, Any], title: str = "Findings handed to the next stage") -> None:
    """Display findings as a two-column table (Markdown in a notebook, plain text elsewhere)."""
    text = f"**{title}**\n\n" + markdown_table(["key", "value"], [[k, fmt(v)] for k, v in findings.items()])
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display

        if get_ipython() is not None:
            display(Markdown(text))
            return
    except ImportError:
        pass
    print(text)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={fmt(v)}" for k, v in value.items())
    return str(value)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- archive

PERSISTENT = {"study.db"}  # state a re-run continues (Optuna's study): copied to the archive, kept in place


def archive_stage(stage_dir: str | Path, reason: str = "re-run", keep: set[str] | None = None) -> Path | None:
    """Move a stage's results into archive/<stage>/<timestamp>/ with a one-line reason; never delete."""
    stage_dir = repo_path(stage_dir)
    keep = keep or set()
    items = [p for p in stage_dir.iterdir() if p.name not in keep and p.name != ".running"] if stage_dir.exists() else []
    if not [p for p in items if p.name not in PERSISTENT]:
        return None
    archive_dir = archive_root(stage_dir)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    target = archive_dir / stage_dir.name / stamp
    target.mkdir(parents=True)
    for item in items:
        if item.name in PERSISTENT:
            shutil.copy2(item, target / item.name)  # snapshot; the live file stays so the next run continues it
        else:
            shutil.move(str(item), target / item.name)
    reason = " ".join(str(reason).split()) or "re-run"
    atomic_write_text(target / "REASON.txt", reason + "\n")
    write_archive_index(archive_dir)
    return target


def archive_root(stage_dir: Path) -> Path:
    """The `archive` folder beside the results folder: results/NN_x -> archive/NN_x/<timestamp>."""
    return stage_dir.resolve().parent.parent / "archive"


def write_archive_index(archive_dir: Path = ARCHIVE_DIR) -> Path:
    rows = []
    for reason_file in sorted(archive_dir.glob("*/*/REASON.txt"), reverse=True):
        folder = reason_file.parent
        rows.append([folder.parent.name, folder.name, f"[{folder.relative_to(archive_dir)}]({folder.relative_to(archive_dir)})", reason_file.read_text().strip()])
    text = "# Archive\n\nSuperseded results, moved here (never deleted) when a stage was re-run.\n\n"
    return atomic_write_text(archive_dir / "README.md", text + markdown_table(["stage", "archived", "folder", "reason"], rows) + "\n")


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")

