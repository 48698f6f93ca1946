"""Batches from a prepared split: random windows (stream mode), padded document chunks (document mode),
a fixed evaluation set, and every window of a split (whole-split evaluation).

Memory follows the batch, not the corpus, in every mode. A split arrives as the prepared memory map
(numpy, 2 or 4 bytes a token); on the CPU each batch is read from it, on an accelerator the split
is uploaded once in its stored width and batches are gathered there. Only a batch is widened to
int64. Document mode keeps two integers per chunk (where it starts and ends), not a padded row.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .validation import DataError

IGNORE_INDEX = -100  # targets the loss skips (padding in document mode)
Batch = tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------- where a split lives


def _stored_tensor(tokens: np.ndarray, device: torch.device) -> torch.Tensor:
    """A split on an accelerator in its stored width: uint16 ids travel as int16 bits (2 bytes a token, not 8).

    torch indexes signed integers only, so the bits are reinterpreted, and `_widen` undoes it per batch."""
    array = np.ascontiguousarray(tokens)
    signed = {np.dtype(np.uint16): np.int16, np.dtype(np.uint32): np.int32}.get(array.dtype)
    return torch.from_numpy(array.view(signed) if signed else array.astype(np.int64)).to(device)


def _widen(windows: torch.Tensor) -> torch.Tensor:
    if windows.dtype == torch.int16:
        return windows.to(torch.int64) & 0xFFFF
    return windows.to(torch.int64)


class _Split:
    """A split where batches are drawn from: the memory map itself on the CPU (read per batch), the stored-width
    tensor on an accelerator, or a tensor the caller gave. `take(index)` returns int64 tokens at an index array."""

    def __init__(self, tokens, device: torch.device):
        self.device = device
        if isinstance(tokens, torch.Tensor):
            self.data = tokens.to(device=device, dtype=torch.int64)
        elif device.type == "cpu":
            self.data = tokens  # the memory map: never copied whole
        else:
            self.data = _stored_tensor(tokens, device)

    def __len__(self) -> int:
        return len(self.data)

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """int64 tokens at the positions in `index` (any shape)."""
        if isinstance(self.data, torch.Tensor):
            return _widen(self.data[index])
        return torch.from_numpy(np.asarray(self.data[index.numpy()], dtype=np.int64))

    def span(self, start: int, stop: int) -> torch.Tensor:
        """int64 tokens start..stop-1: a slice, read from the file without an index array."""
        if isinstance(self.data, torch.Tensor):
            return _widen(self.data[start:stop])
        return torch.from_numpy(np.asarray(self.data[start:stop], dtype=np.int64))


def _check_block(n_tokens: int, block_size: int, what: str) -> None:
    if block_size < 1:
        raise DataError(f"block_size must be positive, got {block_size}")
    if n_tokens < block_size + 1:
        raise DataError(
            f"{what} has {n_tokens} tokens, fewer than block_size + 1 = {block_size + 1}; "
            "use a smaller block_size, a larger split fraction, or a bigger corpus"
        )


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise DataError(f"batch_size must be positive, got {batch_size}")


# --------------------------------------------------------------------------- training batches


class StreamBatches:
    """Random contiguous windows of block_size + 1 tokens; deterministic under `seed`, resumable.

    The start positions come from one torch generator on the host, whatever the data's device (a few
    integers a step, as nanoGPT draws them), so a seed gives the same windows on a CPU and a GPU (a CPU
    and a GPU run of one config train and are scored on the same tokens), and resuming restores the
    generator even where the data's device changed between the cut and the resume.
    `pin_memory` (host data for an accelerator) returns batches in pinned memory, so that
    `.to(device, non_blocking=True)` overlaps with compute, as nanoGPT does.
    """

    def __init__(
        self,
        tokens,
        block_size: int,
        batch_size: int,
        *,
        seed: int = 0,
        device: str | torch.device = "cpu",
        pin_memory: bool = False,
    ):
        _check_batch_size(batch_size)
        self.device = torch.device(device)
        self.split = _Split(tokens, self.device)
        _check_block(len(self.split), block_size, "the token split")
        self.block_size, self.batch_size, self.pin_memory = block_size, batch_size, pin_memory
        self.generator = torch.Generator().manual_seed(seed)  # on the host: see the class docstring
        self._offsets = torch.arange(block_size + 1, device=self.device)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        high = len(self.split) - self.block_size
        starts = torch.randint(high, (self.batch_size,), generator=self.generator).to(self.device, non_blocking=True)
        windows = self.split.take(starts[:, None] + self._offsets)
        if self.pin_memory:
            windows = windows.pin_memory()
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"].cpu() if hasattr(state["generator"], "cpu") else state["generator"])


def document_chunks(doc_starts, n_tokens: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) of every chunk: documents cut into pieces of at most seq_len + 1 tokens. Consecutive
    chunks of a document overlap by one token, so every token but a document's first is a target once."""
    starts = np.asarray(doc_starts, dtype=np.int64)
    ends = np.append(starts[1:], n_tokens).astype(np.int64)
    counts = np.maximum(ends - 1 - starts, 0)  # targets per document
    per_doc = -(-counts // seq_len)
    first = np.repeat(starts, per_doc)
    within = np.arange(per_doc.sum()) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
    lo = first + within * seq_len
    return lo, np.minimum(lo + seq_len + 1, np.repeat(ends, per_doc))


class DocumentBatches:
    """Documents cut into chunks of at most seq_len + 1 tokens, padded; padded targets are IGNORE_INDEX.

    Chunks are visited in a shuffled order that is re-drawn each epoch from `seed`, as write-up 001's
    DataLoader(shuffle=True) did, but reproducibly and resumably. Only each chunk's bounds are kept
    (16 bytes a chunk); a batch's rows are gathered from the split when it is drawn.
    """

    def __init__(
        self,
        tokens,
        doc_starts,
        seq_len: int,
        batch_size: int,
        *,
        pad_id: int = 0,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ):
        _check_batch_size(batch_size)
        if seq_len < 1:
            raise DataError(f"seq_len must be positive, got {seq_len}")
        self.device = torch.device(device)
        self.split = _Split(tokens, self.device)
        self.seq_len, self.batch_size, self.pad_id, self.seed = seq_len, batch_size, pad_id, seed
        lo, hi = document_chunks(doc_starts, len(self.split), seq_len)
        if len(lo) == 0:
            raise DataError("no document has two or more tokens; document mode needs longer documents")
        self.starts = torch.from_numpy(lo).to(self.device)
        self.lengths = torch.from_numpy(hi - lo).to(self.device)
        self._offsets = torch.arange(seq_len + 1, device=self.device)
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def __len__(self) -> int:
        return len(self.starts)

    def _permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(len(self), generator=g).to(self.device)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def _next_chunks(self) -> torch.Tensor:
        picks, need = [], self.batch_size
        while need:
            take = self._order[self.position : self.position + need]
            picks.append(take)
            need -= len(take)
            self.position += len(take)
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
        return torch.cat(picks)

    def __next__(self) -> Batch:
        chunks = self._next_chunks()
        lengths = self.lengths[chunks]
        inside = self._offsets[None, :] < lengths[:, None]
        # a padded position reads the chunk's own first token and is then overwritten: the index never leaves the split
        index = self.starts[chunks][:, None] + torch.where(inside, self._offsets[None, :], 0)
        rows = torch.where(inside, self.split.take(index), self.pad_id)
        x, y = rows[:, :-1], rows[:, 1:]
        # torch.where, not boolean-mask assignment: the latter syncs with the host on CUDA every step
        return x, torch.where(inside[:, 1:], y, IGNORE_INDEX)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation()


# --------------------------------------------------------------------------- evaluation batches


def eval_batches(
    tokens,
    block_size: int,
    batch_size: int,
    n_batches: int | None = None,
    *,
    n_tokens: int | None = None,
    seed: int = 1234,
    device: str | torch.device = "cpu",
) -> list[Batch]:
    """A fixed list of (x, y) batches: the same windows at every evaluation, so val curves are low-noise.

    With `n_tokens` the set is defined in tokens: ceil(n_tokens / block_size) windows drawn at once
    from `seed`, then cut into batches of `batch_size`, so every batch size scores the same windows
    (and every block size the same number of targets). With `n_batches` alone it is n_batches x
    batch_size windows, which depends on the batch size.
    """
    if (n_batches is None) == (n_tokens is None):
        raise DataError("give the evaluation set's size as n_batches or as n_tokens (one of them)")
    if (n_batches if n_batches is not None else n_tokens) < 1:
        raise DataError(f"the evaluation set must be positive, got n_batches={n_batches}, n_tokens={n_tokens}")
    n_windows = n_batches * batch_size if n_batches is not None else -(-n_tokens // block_size)
    x, y = next(StreamBatches(tokens, block_size, n_windows, seed=seed, device=device))
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n_windows, batch_size)]


class TiledBatches(Sequence):
    """Every token of a split once as a target, in non-overlapping windows of block_size, batch_size windows
    a batch (whole-split evaluation). A sequence that reads each batch from the split when asked, so a
    gigabyte split is scored with one batch in memory; it can be iterated again at every evaluation."""

    def __init__(self, tokens, block_size: int, batch_size: int, *, device: str | torch.device = "cpu"):
        _check_batch_size(batch_size)
        self.device = torch.device(device)
        self.split = _Split(tokens, self.device)
        _check_block(len(self.split), block_size, "the token split")
        self.block_size, self.batch_size = block_size, batch_size
        self.n_windows = (len(self.split) - 1) // block_size

    def __len__(self) -> int:
        return -(-self.n_windows // self.batch_size)

    def __getitem__(self, i: int) -> Batch:
        if not -len(self) <= i < len(self):
            raise IndexError(f"batch {i} of {len(self)}")
        first = (i % len(self)) * self.batch_size
        n = min(self.batch_size, self.n_windows - first)
        start = first * self.block_size
        tokens = self.split.span(start, start + n * self.block_size + 1)
        return tokens[:-1].view(n, self.block_size), tokens[1:].view(n, self.block_size)


def tiled_batches(tokens, block_size: int, batch_size: int, *, device: str | torch.device = "cpu") -> TiledBatches:
    """Every token of a split exactly once as a target, in non-overlapping windows (for full evaluation)."""
    return TiledBatches(tokens, block_size, batch_size, device=device)
