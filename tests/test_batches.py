"""labutils.batches: stream windows, document chunks and evaluation sets, read from the memory map a batch at a time."""

import tracemalloc

import numpy as np
import pytest
import torch

from labutils.batches import (
    IGNORE_INDEX,
    DocumentBatches,
    StreamBatches,
    TiledBatches,
    document_chunks,
    eval_batches,
    tiled_batches,
)
from labutils.validation import DataError


def test_stream_batches_are_shifted_windows_and_deterministic(prepared):
    tokens = prepared.tokens("train")
    a = StreamBatches(tokens, 16, 4, seed=3)
    b = StreamBatches(tokens, 16, 4, seed=3)
    for _ in range(3):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == (4, 16) and xa.dtype == torch.int64
        assert torch.equal(xa[:, 1:], ya[:, :-1])
    c = StreamBatches(tokens, 16, 4, seed=4)
    assert not torch.equal(next(c)[0], next(StreamBatches(tokens, 16, 4, seed=3))[0])


def test_stream_batches_resume_from_state(prepared):
    tokens = prepared.tokens("train")
    straight = StreamBatches(tokens, 8, 2, seed=0)
    for _ in range(5):
        next(straight)
    state = straight.state_dict()
    expected = next(straight)
    resumed = StreamBatches(tokens, 8, 2, seed=99)
    resumed.load_state_dict(state)
    assert torch.equal(next(resumed)[0], expected[0])


def test_block_longer_than_data_is_refused(prepared):
    n = prepared.meta["tokens"]["val"]
    with pytest.raises(DataError, match="fewer than block_size"):
        StreamBatches(prepared.tokens("val"), n, 2)


def test_document_batches_pad_and_ignore():
    tokens = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], dtype=np.uint16)
    starts = np.array([0, 3])  # documents [1,2,3] and [4..10]
    batches = DocumentBatches(tokens, starts, seq_len=4, batch_size=3, pad_id=0, seed=0)
    lo, hi = document_chunks(starts, len(tokens), 4)
    assert list(zip(lo.tolist(), hi.tolist(), strict=True)) == [
        (0, 3),
        (3, 8),
        (7, 10),
    ]  # 8 overlaps: every token a target once
    assert len(batches) == 3
    x, y = next(batches)
    for xi, yi in zip(x.tolist(), y.tolist(), strict=True):
        if xi[:3] == [1, 2, 3]:
            assert yi == [2, 3, -100, -100]  # the target after the last real token is ignored
        if xi[:3] == [8, 9, 10]:
            assert yi == [9, 10, -100, -100]
        if xi == [4, 5, 6, 7]:
            assert yi == [5, 6, 7, 8]
    loss = torch.nn.functional.cross_entropy(torch.zeros(3 * 4, 11), y.reshape(-1), ignore_index=IGNORE_INDEX)
    assert torch.isclose(loss, torch.log(torch.tensor(11.0)))


def test_document_batches_deterministic_epochs_and_resume(prepared):
    args = (prepared.tokens("train"), prepared.doc_starts("train"), 32, 5)
    a = DocumentBatches(*args, seed=1)
    seen = [next(a)[0] for _ in range(len(a) // 5 + 2)]  # crosses an epoch boundary
    state = a.state_dict()
    expected = next(a)[0]
    b = DocumentBatches(*args, seed=1)
    assert all(torch.equal(next(b)[0], s) for s in seen)
    c = DocumentBatches(*args, seed=1)
    c.load_state_dict(state)
    assert torch.equal(next(c)[0], expected)


def test_eval_batches_are_fixed(prepared):
    first = eval_batches(prepared.tokens("val"), 16, 4, 3)
    second = eval_batches(prepared.tokens("val"), 16, 4, 3)
    assert len(first) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(first, second, strict=True))


def test_tiled_batches_cover_every_target_once(prepared):
    tokens = prepared.tokens("val")
    batches = tiled_batches(tokens, 16, 4)
    targets = torch.cat([y.reshape(-1) for _, y in batches])
    n = (len(tokens) - 1) // 16 * 16
    assert torch.equal(targets, torch.from_numpy(np.asarray(tokens[1 : n + 1], dtype=np.int64)))


def test_evaluation_set_in_tokens_is_the_same_windows_for_every_batch_size():
    tokens = torch.arange(5000) % 97
    by_16 = eval_batches(tokens, 32, 16, n_tokens=32 * 64)
    by_32 = eval_batches(tokens, 32, 32, n_tokens=32 * 64)
    by_7 = eval_batches(tokens, 32, 7, n_tokens=32 * 64)  # a batch size that does not divide the set
    for batches in (by_16, by_7):
        torch.testing.assert_close(torch.cat([x for x, _ in batches]), torch.cat([x for x, _ in by_32]))
    assert sum(y.numel() for _, y in by_7) == 32 * 64
    # the old rule, n_batches x batch_size windows, scores a batch-16 run on half the windows of a batch-32 run
    assert (
        sum(y.numel() for _, y in eval_batches(tokens, 32, 16, 2))
        == sum(y.numel() for _, y in eval_batches(tokens, 32, 32, 2)) // 2
    )
    with pytest.raises(DataError, match="one of them"):
        eval_batches(tokens, 32, 16, 2, n_tokens=64)


def padded_rows(tokens, doc_starts, seq_len, pad_id):
    """The padded (chunk, seq_len + 1) rows document mode is defined by, built the slow, obvious way."""
    bounds = [*doc_starts, len(tokens)]
    rows = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        for lo in range(start, end - 1, seq_len):
            piece = list(tokens[lo : min(lo + seq_len + 1, end)])
            rows.append((piece + [pad_id] * (seq_len + 1 - len(piece)), len(piece)))
    return rows


@pytest.mark.parametrize("seq_len", [1, 5, 32])
def test_document_batches_are_the_padded_rows_gathered_from_the_file(tmp_path, seq_len):
    """Only chunk bounds are kept; each batch is the padded rows of its chunks, in the seeded order."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 80, size=40)  # documents of one token have no target and no chunk
    path = tmp_path / "train.bin"
    rng.integers(0, 65535, size=int(lengths.sum()), dtype=np.uint16).tofile(path)
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    reference = padded_rows(tokens.tolist(), starts.tolist(), seq_len, pad_id=7)
    sampler = DocumentBatches(tokens, starts, seq_len, batch_size=6, pad_id=7, seed=3)
    assert isinstance(sampler.split.data, np.memmap) and len(sampler) == len(reference)
    assert sampler.starts.numel() + sampler.lengths.numel() == 2 * len(
        reference
    )  # two integers a chunk, no padded rows
    order = [
        i
        for epoch in range(3)
        for i in torch.randperm(len(reference), generator=torch.Generator().manual_seed(3 * 100_003 + epoch))
    ]
    for step in range(2 * len(reference) // 6):
        x, y = next(sampler)
        picks = order[6 * step : 6 * step + 6]
        rows = torch.tensor([reference[i][0] for i in picks])
        n = torch.tensor([reference[i][1] for i in picks])
        assert torch.equal(x, rows[:, :-1])
        positions = torch.arange(1, seq_len + 1)
        assert torch.equal(y, torch.where(positions[None, :] >= n[:, None], IGNORE_INDEX, rows[:, 1:]))


def test_whole_split_batches_are_a_sequence_read_a_batch_at_a_time(tmp_path):
    """Whole-split evaluation reads each batch from the memory map when asked, so memory follows the batch;
    it can be walked again at every evaluation, and its last batch holds what is left."""
    path = tmp_path / "val.bin"
    n_tokens = 4_000_000 + 37 * 64 + 5  # 62,537 windows: the last batch holds 37
    np.arange(n_tokens, dtype=np.uint32).astype(np.uint16).tofile(path)  # ids wrap at 65536: uint16 stays exact
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    tiles = tiled_batches(tokens, 64, 100)
    assert isinstance(tiles, TiledBatches) and isinstance(tiles.split.data, np.memmap)
    x, y = tiles[3]
    assert (
        x.shape == (100, 64)
        and x.dtype == torch.int64
        and x[0, 0] == 3 * 100 * 64 % 65536
        and torch.equal(x[:, 1:], y[:, :-1])
    )
    assert len(tiles) == 626 and tiles[-1][0].shape == (37, 64) and tiles[-1][1][-1, -1] == (62_537 * 64) % 65536
    tracemalloc.start()
    count = sum(int((y != IGNORE_INDEX).sum()) for _, y in tiles)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == (n_tokens - 1) // 64 * 64 and count == sum(y.numel() for _, y in tiles)  # and walked a second time
    assert peak < 8 * n_tokens / 20, (
        f"peak {peak / 1e6:.1f} MB for a split of {n_tokens / 1e6:.0f}M tokens"
    )  # an int64 copy: 32 MB
    with pytest.raises(IndexError):
        tiles[len(tiles)]


def test_under_ddp_each_rank_reads_only_its_own_batches_and_the_shares_cover_the_split(prepared, monkeypatch):
    from labutils import evaluation
    from labutils.evaluation import evaluate_batches
    from labutils.hardware import Dist
    from labutils.model import GPT, ModelConfig

    class Counted(TiledBatches):
        read: list[int] = []

        def __getitem__(self, i):
            self.read.append(i)
            return super().__getitem__(i)

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=prepared.vocab_size, block_size=16, n_layer=1, n_head=2, d_model=16))
    whole = evaluate_batches(model, tiled_batches(prepared.tokens("val"), 16, 4))
    monkeypatch.setattr(
        evaluation.dist, "all_reduce", lambda sums: None
    )  # no process group: each rank's share stays its own
    shares = []
    for rank in range(3):
        batches = Counted(prepared.tokens("val"), 16, 4)
        batches.read = []
        shares.append(evaluate_batches(model, batches, ddp=Dist(rank=rank, world_size=3)))
        assert batches.read == list(range(rank, len(batches), 3)), "a rank read batches that belong to another"
    assert sum(s["tokens"] for s in shares) == whole["tokens"]
    mean = sum(s["loss"] * s["tokens"] for s in shares) / whole["tokens"]
    assert mean == pytest.approx(whole["loss"], rel=1e-9)
