"""Where things live: the repo root (and its git commit), bundled data, results and archive, and the
files that mark a stage folder.

Notebooks run from JupyterLab (cwd = notebooks/) and from papermill at the repo root; resolving
relative paths against the repo root makes both write to the same place.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
RESULTS_DIR = REPO_ROOT / "results"
ARCHIVE_DIR = REPO_ROOT / "archive"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
STAGE_FILE = "stage.json"  # written by the notebook (labutils.stages): parameters, context, headline numbers, key figure
RUN_FILE = "run.json"  # written by the pipeline runner: status, time, the inputs that make the stage current


def repo_path(path: str | Path) -> Path:
    """An absolute path: relative ones are taken from the repo root, not the current directory."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def display_path(path: str | Path) -> str:
    """A path relative to the repo root when inside it (portable in reports and hand-off files)."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def scrub_paths(text: str) -> str:
    """Machine paths out of what is committed: the repo root becomes relative, the home folder `~`."""
    root = str(REPO_ROOT)
    text = text.replace(root + "/", "").replace(root, ".")
    home = str(Path.home())
    return text.replace(home + "/", "~/") if len(home) > 1 else text


def mask_passwords(text: str) -> str:
    """URL passwords out of what is recorded (`postgresql://user:secret@host/db` -> `user:***@host`)."""
    return re.sub(r"(://[^:/@\s\"']+:)[^@/\s\"']+@", r"\1***@", text)


def git_commit() -> str | None:
    """The commit the repo is at, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
