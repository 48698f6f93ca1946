"""Where things live: the repo root, bundled data, results and archive.

Notebooks run from JupyterLab (cwd = notebooks/) and from papermill at the repo root; resolving
relative paths against the repo root makes both write to the same place.
"""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
RESULTS_DIR = REPO_ROOT / "results"
ARCHIVE_DIR = REPO_ROOT / "archive"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"


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
