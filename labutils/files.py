"""Where the lab's files live and how they are written: the repo root (and its git commit), bundled data,
results and archive, the files that mark a stage folder; atomic writes, hashes, appendable CSV logs, and the
run-folder lock and checks that stop a run before it starts when its folder cannot take it.

Notebooks run from JupyterLab (cwd = notebooks/) and from papermill at the repo root; resolving
relative paths against the repo root makes both write to the same place.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
RESULTS_DIR = REPO_ROOT / "results"
ARCHIVE_DIR = REPO_ROOT / "archive"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
STAGE_FILE = (
    "stage.json"  # written by the notebook (labutils.stage_folders): parameters, context, headline numbers, key figure
)
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
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp_path)` then rename into `path`, so readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes owner-only files; results are shared
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def append_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    """Append rows (header first if the file is new): a crash loses at most the rows not yet logged."""
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def rewrite_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    path.unlink(missing_ok=True)
    append_csv(path, columns, rows)


class RunLock:
    """An exclusive lock file in a run folder: a second run on the same folder refuses to start.

    A lock left by a crashed process on this host (its pid no longer exists) is taken over.
    """

    def __init__(self, directory: Path):
        self.path = Path(directory) / ".lock"
        self.held = False

    def acquire(self) -> None:
        text = f"{os.getpid()} {socket.gethostname()} {datetime.datetime.now().isoformat(timespec='seconds')}\n"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self._stale():
                    self.path.unlink(missing_ok=True)
                    continue
                owner = self.path.read_text().strip() if self.path.exists() else "?"
                raise RuntimeError(
                    f"{self.path.parent} is in use by another run (lock: pid host started = {owner}). "
                    f"Wait for it to finish, choose another out_dir, or delete {self.path} if that run is dead."
                ) from None
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            self.held = True
            return

    @staticmethod
    def owner(path: Path) -> tuple[int, str, str] | None:
        """Who holds the lock file at `path`: (pid, host, started), or None when it is gone or not a lock."""
        try:
            pid, host, started = path.read_text().split()[:3]
            return int(pid), host, started
        except (OSError, ValueError):
            return None

    def _stale(self) -> bool:
        owner = self.owner(self.path)
        if owner is None:
            return False
        pid, host, _ = owner
        if host != socket.gethostname():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            return False
        return False

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def check_writable(directory: Path) -> None:
    """Fail before training if the run folder cannot be created or written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise RuntimeError(
            f"out_dir {directory} is not writable ({exc.strerror or exc}); choose a folder you can write to"
        ) from None


def check_disk_space(directory: Path, needed_bytes: int) -> None:
    """Fail before training when the run folder's disk cannot hold the run's checkpoints."""
    free = shutil.disk_usage(directory).free
    if free < needed_bytes:
        raise RuntimeError(
            f"out_dir {directory} has {free / 2**20:.0f} MiB free, but this run's checkpoints need about "
            f"{needed_bytes / 2**20:.0f} MiB (best + last + one being written); free disk space or choose an out_dir "
            "on another disk"
        )
