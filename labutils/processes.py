"""The processes the lab starts, and how they end: worker pools whose workers end with the process that started
them, a stop on SIGTERM or SIGINT that ends a notebook kernel's whole process group (the kernel and every worker it
started), and the records by which a new run refuses a folder that live processes of an earlier one still write into.

Why (issue 43): a SIGTERM to the pipeline (from `timeout`, `kill` or a cluster scheduler) ended the pipeline and its
kernel, but 03's study workers lived on as orphans, starting new runs in the stage folder. A stopped worker ends at
once: its run resumes from its last checkpoint, which is always complete (`labutils.checkpoints` swaps checkpoints in
by rename), and the lock it leaves names a dead pid, which the next run takes over (`files.RunLock`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures as cf
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

from .files import RunLock, atomic_write_json, display_path
from .validation import FolderInUseError, Stopped

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
WORKERS_DIR = ".workers"  # <folder>/.workers/<pid>.json: one record per live pool worker
WATCH_INTERVAL_S = 0.25  # how often a worker checks that its parent is still there
GRACE_S = 5.0  # how long a stopped process group gets before SIGKILL


# --------------------------------------------------------------------------- is a process alive


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields from the state on (Linux), or None where there is no /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _started(stat: list[str]) -> float | None:
    """When the process started, in seconds since the epoch: its start time in clock ticks after boot (field 22)."""
    try:
        boot = next(
            int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line[:6] == "btime "
        )
        return boot + int(stat[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def is_alive(pid: int, since: float | None = None) -> bool:
    """True when process `pid` runs on this host, is not a zombie and, where its start time can be read, started
    before `since` (a process that started later got a dead process's pid again)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    stat = _proc_stat(pid)
    if stat is None:
        return True
    if stat[0] in ("Z", "X"):
        return False
    started = _started(stat) if since is not None else None
    return started is None or started <= since + 2.0  # 2 s: clock ticks and the boot time are rounded


# --------------------------------------------------------------------------- who still works in a folder


def _walk(folder: Path) -> Iterator[tuple[Path, list[str]]]:
    """Every folder under `folder` with its file names, read while training writes there: a folder that vanishes
    mid-walk (a checkpoint's temporary folder, renamed into place or removed) is skipped, not an error, and the
    writers' temporary folders (`.<name>.<random>.tmp`, `.<name>.old`) are not entered: nothing is recorded there.
    (`Path.glob("**/…")` raised FileNotFoundError when a temporary folder vanished between listing and entering.)"""
    for root, dirs, files in os.walk(folder, onerror=lambda error: None):
        dirs[:] = [d for d in dirs if not (d.startswith(".") and (d.endswith(".tmp") or d.endswith(".old")))]
        yield Path(root), files


def _worker_records(folder: Path) -> Iterator[dict[str, Any]]:
    paths = [root / name for root, files in _walk(folder) if root.name == WORKERS_DIR for name in files]
    for path in sorted(p for p in paths if p.suffix == ".json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # being written or removed right now
        yield {**record, "path": path, "what": f"worker of {display_path(path.parent.parent)}"}


def _run_locks(folder: Path) -> Iterator[dict[str, Any]]:
    """The run folders' locks (`files.RunLock`: "pid host started"): a training process, in a pool or not."""
    for path in sorted(root / ".lock" for root, files in _walk(folder) if ".lock" in files):
        owner = RunLock.owner(path)
        try:
            pid, host, started = owner
            since = datetime.datetime.fromisoformat(started).timestamp()
        except (TypeError, ValueError):  # gone, or not a lock
            continue
        yield {
            "pid": pid,
            "host": host,
            "time": since,
            "started": started,
            "what": f"training {display_path(path.parent)}",
        }


def live_processes(folder: str | Path) -> list[dict[str, Any]]:
    """The processes of this host that still work in `folder` or below it: pool workers (their `.workers` records)
    and training runs (their run folders' locks); this process aside. The records of dead workers are removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    here, found = socket.gethostname(), []
    for record in [*_worker_records(folder), *_run_locks(folder)]:
        if record.get("host") != here or record.get("pid") == os.getpid():
            continue  # another host's processes cannot be checked from here
        if is_alive(int(record["pid"]), record.get("time")):
            found.append(record)
        elif "path" in record:
            record["path"].unlink(missing_ok=True)
    return found


def refuse_if_in_use(folder: str | Path) -> None:
    """Raise FolderInUseError when live processes of an earlier run still work in `folder` (see `live_processes`):
    a new run beside them would train the same runs twice, and archiving the folder would move it under them."""
    live = live_processes(folder)
    if not live:
        return
    doing: dict[int, list[str]] = {}  # a worker holds its run's lock too: one entry per pid
    for p in live:
        doing.setdefault(int(p["pid"]), []).append(f"{p['what']}, since {p.get('started', '?')}")
    pids = sorted(doing)
    seen = ", ".join(f"pid {pid} ({'; '.join(doing[pid])})" for pid in pids[:6])
    raise FolderInUseError(
        f"{display_path(folder)} is in use by {len(pids)} process{'es' if len(pids) > 1 else ''} of an earlier run "
        f"that {'are' if len(pids) > 1 else 'is'} still alive: {seen}. A new run beside them would train the same runs "
        f"twice. Stop them with `kill {' '.join(map(str, pids))}` (they end within seconds, and each run resumes "
        "from its last checkpoint), or wait until they end; then start again."
    )


# --------------------------------------------------------------------------- in a worker

_record: Path | None = None


def _exit_now(signum: int, _frame=None) -> None:
    """End this worker at once (its run resumes from its last checkpoint; its run lock, whose pid is then dead, is
    taken over by the next run). No clean-up in Python: a stop must not wait for a training step or start a run."""
    try:
        if _record is not None:
            _record.unlink(missing_ok=True)
    finally:
        os._exit(128 + signum)


def _watch_parent(parent: int) -> None:
    """A worker whose parent is gone (killed with SIGKILL, which nothing can catch) is orphaned: it ends too. It says
    nothing: its stderr may be a pipe into the dead parent (a kernel captures its children's output), and a write
    there would raise instead of ending the worker."""
    while os.getppid() == parent:
        time.sleep(WATCH_INTERVAL_S)
    _exit_now(signal.SIGTERM)


def _die_with_parent() -> None:
    """On Linux the kernel sends this worker SIGTERM the moment its parent dies; the watch thread is the portable
    way, a few tenths of a second later. (Linux means the thread that started the worker: `worker_pool`'s workers are
    started by the thread that submits the jobs and waits for them.)"""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1: PR_SET_PDEATHSIG


def record_worker(folder: str | Path, pid: int, parent: int) -> Path:
    """Write `folder`/.workers/<pid>.json: this host, the pid, its parent and the time (a later process given the
    same pid is told apart by its start time, `is_alive`)."""
    now = datetime.datetime.now().isoformat(timespec="seconds")
    record = {"pid": pid, "host": socket.gethostname(), "parent": parent, "started": now, "time": time.time()}
    return atomic_write_json(Path(folder) / WORKERS_DIR / f"{pid}.json", record)


def start_worker(folder: Path | None, parent: int) -> None:
    """Make this process a worker that ends with `parent` and on SIGTERM/SIGINT, recorded in `folder`/.workers."""
    global _record
    for signum in STOP_SIGNALS:
        signal.signal(signum, _exit_now)
    _die_with_parent()
    if folder is not None:
        _record = record_worker(folder, os.getpid(), parent)
    threading.Thread(target=_watch_parent, args=(parent,), name="labutils-parent-watch", daemon=True).start()


def _init_worker(folder: Path | None, parent: int, initializer: Callable | None, initargs: tuple) -> None:
    start_worker(folder, parent)
    if initializer is not None:
        initializer(*initargs)


# --------------------------------------------------------------------------- the pool, in its parent


@contextlib.contextmanager
def worker_pool(
    n: int, folder: str | Path | None = None, initializer: Callable | None = None, initargs: tuple = ()
) -> Iterator[ProcessPoolExecutor]:
    """A ProcessPoolExecutor of `n` spawned workers (CUDA cannot be forked; spawn also works from notebooks) that
    end with this process: each ends on SIGTERM/SIGINT or when this process is gone, and records itself in
    `folder`/.workers/ while it lives. An exception here (a KeyboardInterrupt: Ctrl-C, a kernel's interrupt) ends
    the workers at once and cancels the jobs not started, where the executor alone would wait for all of them."""
    folder = Path(folder) if folder is not None else None
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(
        n, mp_context=context, initializer=_init_worker, initargs=(folder, os.getpid(), initializer, initargs)
    )
    pids: list[int] = []
    try:
        yield pool
        pids = list(pool._processes or {})
        pool.shutdown(wait=True)
    except BaseException:
        pids = list(pool._processes or {})
        end_workers(pool)
        raise
    finally:
        if folder is not None:
            for pid in pids:  # ended with the pool (a worker stopped by a signal removes its own)
                (folder / WORKERS_DIR / f"{pid}.json").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                (folder / WORKERS_DIR).rmdir()  # when empty: no other pool works there


def as_completed_waking(futures: Iterable[Future], wake_s: float = 0.5) -> Iterator[Future]:
    """`concurrent.futures.as_completed(futures)`, waking every `wake_s` seconds. A signal (Ctrl-C, the kernel's
    interrupt) may reach one of the pool's helper threads; Python runs its handler, which ends the pool, only when
    the main thread wakes, and `as_completed` without a timeout may not wake it until a job finishes. (The study
    process that once seemed to hang after a SIGINT had inherited SIGINT as ignored: tests/test_stop.py.)"""
    pending = set(futures)
    while pending:
        done, pending = cf.wait(pending, timeout=wake_s, return_when=cf.FIRST_COMPLETED)
        yield from done


def end_workers(pool: ProcessPoolExecutor, grace: float = GRACE_S) -> None:
    """SIGTERM every worker of `pool` (each ends at once), cancel the jobs not started, SIGKILL any left after
    `grace` seconds. (ProcessPoolExecutor keeps its processes in `_processes`: it has no public way to end them.)"""
    processes = list((pool._processes or {}).copy().values())
    for process in processes:
        with contextlib.suppress(OSError, ValueError):
            process.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + grace
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join(1.0)


# --------------------------------------------------------------------------- a process group, and stop signals


def _group_alive(pgid: int) -> bool:
    """True while a process of group `pgid` other than a zombie is left."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, os.WNOHANG)  # the leader (a kernel) may be our child: reaped, it is not counted as alive
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not Path("/proc/self/stat").exists():
        return True
    pids = (int(p) for p in os.listdir("/proc") if p.isdigit())
    return any((stat := _proc_stat(pid)) and stat[2] == str(pgid) and stat[0] not in ("Z", "X") for pid in pids)


def end_process_group(pgid: int, grace: float = GRACE_S) -> None:
    """SIGTERM to every process of group `pgid` (a notebook kernel leads its own, and the workers it starts join it),
    then SIGKILL to those left after `grace` seconds; returns once none is left (or a second after the SIGKILL)."""
    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 1.0)):
        try:
            os.killpg(pgid, signum)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait
        while _group_alive(pgid):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        else:
            return


@contextlib.contextmanager
def on_stop_signals(end: Callable[[], None]) -> Iterator[list[int]]:
    """Within: SIGTERM or SIGINT calls `end()` (which ends what this process started), then raises Stopped here;
    a second signal while `end()` runs raises at once. Yields the signals received (code that may see the stop as
    another error, or not at all, can ask). Only the main thread receives signals: elsewhere this changes nothing."""
    ending: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield ending
        return

    def handler(signum: int, _frame) -> None:
        if not ending:
            ending.append(signum)
            end()
        raise Stopped(signum)

    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield ending
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)
