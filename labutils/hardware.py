"""Where and how a run executes: device choice, seeding and RNG snapshots, determinism, DDP,
environment capture, device peak FLOPs (for MFU), and progress bars (none in headless runs).

Kept separate from the training loop so that `training.py` reads as the loop and nothing else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import platform
import random
import re
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .files import git_commit
from .validation import ConfigError

# Dense (no 2:4 sparsity) peak FLOP/s per matmul precision, by device-name fragment; first match
# wins, so more specific names come first. Source: vendor datasheets. "fp32" is what fp32 matmuls
# reach: TF32 tensor cores where the GPU has them (we turn TF32 on), plain fp32 where it does not.
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("B200", {"bf16": 2250e12, "fp16": 2250e12, "fp32": 1100e12}),
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 494.5e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12}),
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 417.5e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 494.5e12}),  # SXM
    ("H800", {"bf16": 989e12, "fp16": 989e12, "fp32": 494.5e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}),
    ("A800", {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 181e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 60e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),  # no bf16 and no TF32: fp32 matmuls run on plain CUDA cores
]
_PRECISION = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def select_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA, then MPS, then CPU; explicit names are checked for availability."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} requested but CUDA is not available here; use device='auto' or 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device 'mps' requested but MPS is not available here; use device='auto' or 'cpu'")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' = bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU and MPS."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("dtype: this GPU has no bf16 support; use dtype='fp16' (with loss scaling) or 'fp32'")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def seed_everything(seed: int) -> None:
    """One seed for Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic(enabled: bool) -> Iterator[None]:
    """Deterministic kernels while the block runs (global torch state, restored afterwards).

    Ops without a deterministic implementation warn instead of failing, so a long GPU run is not
    killed by one kernel; cuBLAS needs its workspace setting before its first use.
    """
    if not enabled:
        yield
        return
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2], previous[3]


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors/ints/lists, so `torch.load(weights_only=True)` reads them.

    On CUDA only `device`'s generator is saved: asking for all of them would open a context on
    every GPU from every DDP rank.
    """
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, np_gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


# --------------------------------------------------------------------------- distributed


@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    monitor: Any = dataclasses.field(default=None, compare=False, repr=False)  # a gloo group that can name dead ranks

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes in the environment (NCCL on GPUs, gloo on CPU).

    Without torchrun (no WORLD_SIZE > 1) this is a single process and nothing happens. Each rank
    takes the GPU matching its LOCAL_RANK.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
        )
    # a gloo side group, also under NCCL: its point-to-point probes name the ranks that died (lost_ranks)
    return Dist(rank, local_rank, world_size, monitor=dist.new_group(backend="gloo")), device


LOST_RANK_TIMEOUT_S = 10.0
LOST_RANK_TAG = 7301  # the probes' own tag, so they never match a training message
DIST_FAILURES = (
    dist.DistError,
    RuntimeError,
)  # what a collective raises when a peer has gone (gloo: "Connection closed by peer")


def is_peer_failure(exc: BaseException) -> bool:
    """A failure of communication, not of this rank's own work (an out-of-memory error is a RuntimeError too)."""
    return isinstance(exc, dist.DistError) or bool(
        re.search(r"gloo|NCCL|Connection (closed|reset)|Broken pipe", str(exc))
    )


def lost_ranks(ddp: Dist, timeout_s: float = LOST_RANK_TIMEOUT_S) -> list[int]:
    """After a collective failed: the ranks that do not answer. Every rank left sends a probe to every
    other on the gloo side group and waits `timeout_s` for theirs; a dead rank's connection is closed,
    so it fails at once. [] when all answer: the failure was something else. (monitored_barrier
    cannot do this: it raises on the first closed connection without saying whose it was.)"""
    lost, pending = set(), []
    for peer in range(ddp.world_size):
        if peer == ddp.rank:
            continue
        try:  # a send and a receive each way; the buffers live until the works are done
            pending += [
                (peer, dist.isend(torch.zeros(1), dst=peer, group=ddp.monitor, tag=LOST_RANK_TAG)),
                (peer, dist.irecv(torch.zeros(1), src=peer, group=ddp.monitor, tag=LOST_RANK_TAG)),
            ]
        except DIST_FAILURES:
            lost.add(peer)
    deadline = time.monotonic() + timeout_s
    for peer, work in pending:
        if peer in lost:
            continue
        try:
            work.wait(datetime.timedelta(seconds=max(0.1, deadline - time.monotonic())))
        except DIST_FAILURES:
            lost.add(peer)
    return sorted(lost)


def cleanup_distributed(ddp: Dist) -> None:
    if ddp.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_ranks_agree(ddp: Dist, flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on any rank (stopping decisions must be collective)."""
    if not ddp.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(ddp: Dist, obj: Any) -> Any:
    if not ddp.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(ddp: Dist, obj: Any) -> list[Any]:
    if not ddp.enabled:
        return [obj]
    out: list[Any] = [None] * ddp.world_size
    dist.all_gather_object(out, obj)
    return out


class RankSlice:
    """Every rank draws the same global batch from `sampler` and keeps its own slice of it.

    The sequence of global batches is then independent of the number of processes: DDP on N
    devices sees exactly the data of one process with an N times larger batch, and can resume on
    any N. (Drawing the indices of the whole batch costs nothing next to a forward pass.)
    """

    def __init__(self, sampler, rank: int, world_size: int):
        self.sampler, self.rank, self.world_size = sampler, rank, world_size

    def __next__(self):
        x, y = next(self.sampler)
        b = x.size(0) // self.world_size
        return x[self.rank * b : (self.rank + 1) * b], y[self.rank * b : (self.rank + 1) * b]

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


# --------------------------------------------------------------------------- run folder


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return platform.processor() or platform.machine() or "cpu"


def environment(device: torch.device, seed: int, ddp: Dist) -> dict[str, Any]:
    """What a run ran on, for environment.json."""
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "device": str(device),
        "device_name": device_name(device),
        "device_count": torch.cuda.device_count() if device.type == "cuda" else 1,
        "cpu_threads": torch.get_num_threads(),
        "world_size": ddp.world_size,
        "git_commit": git_commit(),
        "seed": seed,
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Dense peak FLOP/s of one device for matmuls in `dtype`, or None where unknown (CPU, MPS, unlisted
    GPUs, or a precision the GPU lacks, such as bf16 on a V100)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    table = next((peaks for fragment, peaks in PEAK_FLOPS if fragment in name), None)
    return None if table is None else table.get(_PRECISION.get(dtype, ""))


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated accelerator memory since the last reset, in MiB (NaN on CPU/MPS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return float("nan")


def pin_worker(device: str, sharing: int = 1) -> None:
    """Set up a worker process that trains on `device` for its whole life, beside `sharing - 1` others on it:
    a CUDA device becomes the current one (so stray allocations stay off cuda:0); on the CPU each worker takes
    its share of the threads (workers that each take them all run several times slower than one alone)."""
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    elif device == "cpu" and sharing > 1:
        torch.set_num_threads(max(1, torch.get_num_threads() // sharing))


def headless() -> bool:
    """True in runs nobody watches: `make pipeline` sets LABUTILS_HEADLESS=1 for its notebooks."""
    return os.environ.get("LABUTILS_HEADLESS") == "1"


def progress_bar(*args, **kwargs):
    """tqdm.auto's bar (a widget in JupyterLab, text in a terminal), switched off in headless runs so
    saved notebooks and reports hold no progress bars."""
    from tqdm.auto import tqdm

    if headless():
        kwargs["disable"] = True
    return tqdm(*args, **kwargs)
