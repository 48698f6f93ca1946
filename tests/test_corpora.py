"""Streaming corpora (issue 16): every input kind, hash splits, bounded memory, memmap batches, bad input."""

import gzip
import json
import tracemalloc
import warnings

import numpy as np
import pytest
import torch

from labutils import batches, data, training
from labutils.config import TrainConfig
from labutils.corpora import DOC_SEPARATOR, open_corpus
from labutils.data import DataError

DOCS = [
    f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (1 + i % 5) + f"End {i}." for i in range(60)
]


def write_jsonl(path, docs, field="text", gz=False):
    lines = "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()
    path.write_bytes(gzip.compress(lines) if gz else lines)
    return path


def write_parquet(path, docs, field="text"):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({field: docs, "id": list(range(len(docs)))}), path, row_group_size=7)
    return path


def split_documents(prepared):
    """Every split's documents, decoded back from its token file (documents are separated by the separator)."""
    out = {}
    for split in data.SPLITS:
        tokens, starts = np.asarray(prepared.tokens(split)), prepared.doc_starts(split)
        sep = len(prepared.tokenizer.encode(DOC_SEPARATOR))
        ends = list(starts[1:] - sep) + [len(tokens)]
        out[split] = [prepared.tokenizer.decode(tokens[s:e]) for s, e in zip(starts, ends, strict=True)]
    return out


# --------------------------------------------------------------------------- input kinds


@pytest.fixture
def kinds(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, doc in enumerate(DOCS):
        (folder / f"{i:03d}.txt").write_text(doc)
    return {
        "folder": folder,
        "glob": str(folder / "*.txt"),
        "jsonl": write_jsonl(tmp_path / "docs.jsonl", DOCS),
        "jsonl.gz": write_jsonl(tmp_path / "docs.jsonl.gz", DOCS, gz=True),
        "parquet": write_parquet(tmp_path / "docs.parquet", DOCS),
    }


@pytest.mark.parametrize("kind", ["folder", "glob", "jsonl", "jsonl.gz", "parquet"])
def test_each_input_kind_keeps_every_document_whole(kinds, kind, tmp_path):
    source = open_corpus(kinds[kind])
    assert [doc for doc, _ in source.documents()] == DOCS
    assert sum(n for _, n in source.documents()) == source.n_bytes  # the progress bar ends at 100%
    prepared = data.prepare_data(kinds[kind], "gpt2", (0.6, 0.2, 0.2), tmp_path / f"prep-{kind}", progress=False)
    assert prepared.meta["split_by"] == "hash"  # collections of documents default to the document-hash split
    found = split_documents(prepared)
    assert sorted(found["train"] + found["val"] + found["test"]) == sorted(DOCS)  # each document once, uncut
    assert all(found[s] for s in data.SPLITS)


def test_txt_paragraphs_stream_exactly_as_str_split(tmp_path, monkeypatch):
    text = "a\n\n\nb\n\nc\u00e9\u4e2d\n\n\n\nd" * 50  # runs of newlines and multi-byte characters across reads
    path = tmp_path / "t.txt"
    path.write_text(text)
    monkeypatch.setattr("labutils.corpora.READ_BYTES", 5)  # every read boundary lands somewhere awkward
    assert [doc for doc, _ in open_corpus(path).documents()] == text.split(DOC_SEPARATOR)


def reference_contiguous_split(documents, fractions):
    """The whole-text algorithm the streaming one replaced: cut the joined text at character fractions."""
    total = sum(map(len, documents)) + 2 * (len(documents) - 1)
    cuts = [0, int(total * fractions[0]), int(total * (fractions[0] + fractions[1])), total]
    out, pos = {s: [] for s in data.SPLITS}, 0
    for doc in documents:
        for i, split in enumerate(data.SPLITS):
            lo, hi = max(pos, cuts[i]), min(pos + len(doc), cuts[i + 1])
            if hi > lo:
                out[split].append(doc[lo - pos : hi - pos])
        pos += len(doc) + 2
    return out


@pytest.mark.parametrize("tokenizer", ["gpt2", "char"])
def test_contiguous_split_is_todays_split(tmp_path, tokenizer):
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(DOCS))
    prepared = data.prepare_data(path, tokenizer, (0.7, 0.2, 0.1), tmp_path / "p", chunk_chars=500, progress=False)
    tok, expected = prepared.tokenizer, reference_contiguous_split(DOCS, (0.7, 0.2, 0.1))
    for split in data.SPLITS:
        ids = [t for i, d in enumerate(expected[split]) for t in (tok.encode("\n\n") if i else []) + tok.encode(d)]
        assert np.asarray(prepared.tokens(split)).tolist() == ids
        assert prepared.meta["documents"][split] == len(expected[split])
    assert prepared.meta["split_by"] == "contiguous"


def test_hash_split_keeps_assignments_when_documents_are_appended(tmp_path):
    first = data.prepare_data(
        write_jsonl(tmp_path / "a.jsonl", DOCS), "byte", (0.6, 0.2, 0.2), tmp_path / "p1", progress=False
    )
    more = DOCS + [f"A later document {i}, written after the first preparation." for i in range(40)]
    second = data.prepare_data(
        write_jsonl(tmp_path / "b.jsonl", more), "byte", (0.6, 0.2, 0.2), tmp_path / "p2", progress=False
    )
    before, after = split_documents(first), split_documents(second)
    for split in data.SPLITS:
        assert set(before[split]) <= set(after[split]), split
    reseeded = data.prepare_data(
        tmp_path / "a.jsonl", "byte", (0.6, 0.2, 0.2), tmp_path / "p3", split_seed=7, progress=False
    )
    assert split_documents(reseeded) != before  # the seed is what places them


def test_char_vocabulary_comes_from_train_and_unseen_characters_fail_clearly(tmp_path):
    base = [f"plain text number {i}" for i in range(40)]

    def split_of(doc):
        return next(data._Splitter("hash", (0.5, 0.25, 0.25)).pieces(doc))[0]

    assert set("".join(d for d in base if split_of(d) == "train")) >= set(
        "".join(base)
    )  # train sees every base character
    in_train = next(d for d in (f"\u00fcber {k}" for k in range(200)) if split_of(d) == "train")
    in_val = next(d for d in (f"\u00fcber {k}" for k in range(200)) if split_of(d) == "val")
    prepared = data.prepare_data(
        write_jsonl(tmp_path / "a.jsonl", base + [in_train]), "char", (0.5, 0.25, 0.25), tmp_path / "a", progress=False
    )
    assert (
        "\u00fc" in prepared.tokenizer.chars and "\n" in prepared.tokenizer.chars
    )  # and the separator between train documents
    with pytest.raises(DataError, match=r"characters \['\u00fc'\] are not in this char vocabulary"):
        data.prepare_data(
            write_jsonl(tmp_path / "b.jsonl", base + [in_val]),
            "char",
            (0.5, 0.25, 0.25),
            tmp_path / "b",
            progress=False,
        )


# --------------------------------------------------------------------------- bounded memory


def test_preparation_memory_follows_the_chunk_not_the_corpus(tmp_path, monkeypatch):
    monkeypatch.setattr("labutils.corpora.READ_BYTES", 1 << 16)  # reads far smaller than the corpus, as on a real one

    def peak(paragraphs, chunk_chars):
        path = tmp_path / f"c{paragraphs}.txt"
        path.write_text("\n\n".join("word " * 200 + str(i) for i in range(paragraphs)))  # 1 kB a paragraph
        tracemalloc.start()
        data.prepare_data(
            path,
            "byte",
            (0.9, 0.05, 0.05),
            tmp_path / f"p{paragraphs}-{chunk_chars}",
            chunk_chars=chunk_chars,
            progress=False,
        )
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top, path.stat().st_size

    (small, size), (double, _) = peak(6000, 1 << 16), peak(12000, 1 << 16)
    assert small < size / 2 and double < 1.25 * small, (
        f"peaks {small / 1e6:.1f} and {double / 1e6:.1f} MB for 6 and 12 MB corpora"
    )
    whole, _ = peak(6000, 1 << 30)
    assert whole > size  # one chunk holding everything: the measurement tells the two apart


# --------------------------------------------------------------------------- training from the memory map


@pytest.fixture
def prepared(tmp_path):
    return data.prepare_data(
        write_jsonl(tmp_path / "d.jsonl", DOCS * 5), "gpt2", (0.8, 0.1, 0.1), tmp_path / "p", progress=False
    )


def test_memmap_batches_equal_the_int64_copys_batches(prepared):
    tokens = prepared.tokens("train")
    mapped = batches.StreamBatches(tokens, 16, 4, seed=3)
    copied = batches.StreamBatches(
        torch.from_numpy(np.asarray(tokens, dtype=np.int64)), 16, 4, seed=3
    )  # what training did before
    assert isinstance(mapped.split.data, np.memmap)  # no whole-split copy
    for _ in range(5):
        (x1, y1), (x2, y2) = next(mapped), next(copied)
        assert x1.dtype == torch.int64 and torch.equal(x1, x2) and torch.equal(y1, y2)
    state = mapped.state_dict()
    expected = [next(mapped) for _ in range(3)]
    resumed = batches.StreamBatches(tokens, 16, 4, seed=99)
    resumed.load_state_dict(state)
    for x, y in expected:
        x2, y2 = next(resumed)
        assert torch.equal(x, x2) and torch.equal(y, y2)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_stored_width_tensor_round_trips_every_id(dtype):
    ids = np.array([0, 1, 32767, 32768, 50256, 65535] + ([70000, 2**31 - 1] if dtype == np.uint32 else []), dtype=dtype)
    stored = batches._stored_tensor(ids, torch.device("cpu"))
    assert stored.element_size() == np.dtype(dtype).itemsize  # kept in its width, not widened to 8 bytes
    assert batches._widen(stored).tolist() == ids.astype(np.int64).tolist()


def test_train_split_stays_on_the_host_when_it_would_crowd_the_gpu(prepared, monkeypatch):
    needed = prepared.tokens("train").nbytes
    assert needed == prepared.meta["tokens"]["train"] * 2  # uint16: two bytes a token
    cuda = torch.device("cuda")
    monkeypatch.setattr(training.memory, "available_memory_bytes", lambda device: needed * 100)
    assert training.choose_data_device(TrainConfig(), prepared, cuda) == cuda
    monkeypatch.setattr(training.memory, "available_memory_bytes", lambda device: needed * 2)
    with pytest.warns(UserWarning, match="stays memory-mapped on the host"):
        assert training.choose_data_device(TrainConfig(), prepared, cuda).type == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert training.choose_data_device(TrainConfig(data_on_device=False), prepared, cuda).type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_host_batches_for_a_gpu_are_pinned(prepared):
    x, y = next(batches.StreamBatches(prepared.tokens("train"), 16, 4, pin_memory=True))
    assert x.is_pinned() and y.is_pinned()


# --------------------------------------------------------------------------- bad input


def test_missing_text_field_names_the_fields_there(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", DOCS, field="content")
    with pytest.raises(
        DataError, match=r"line 1 of .*d.jsonl has no 'text' field \(it has \['content', 'id'\]\); pass text_field="
    ):
        data.prepare_data(path, "char", progress=False, out_dir=tmp_path / "p")
    assert (
        data.prepare_data(path, "char", out_dir=tmp_path / "p", text_field="content", progress=False).meta["documents"][
            "train"
        ]
        > 0
    )
    parquet = write_parquet(tmp_path / "d.parquet", DOCS, field="body")
    with pytest.raises(DataError, match=r"has no 'text' column \(it has \['body', 'id'\]\)"):
        data.prepare_data(parquet, "char", progress=False, out_dir=tmp_path / "q")


# mtime=0: every xdist worker must build the same bytes, or the test ids differ between workers and collection fails
@pytest.mark.parametrize(
    "name, content",
    [("e.jsonl", b""), ("e.jsonl", b"\n\n"), ("e.txt", b"  \n"), ("e.jsonl.gz", gzip.compress(b"", mtime=0))],
)
def test_empty_files_are_named(tmp_path, name, content):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.txt").write_text("fine document")
    (folder / name).write_bytes(content)
    with pytest.raises(DataError, match=rf"{name} is empty"):
        data.prepare_data(folder, "char", progress=False, out_dir=tmp_path / "p")


def test_undecodable_bytes_name_the_file_and_offset(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\u00e9 au lait\n\nna\u00efve".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.txt is not UTF-8: byte 0xe9 at byte offset 3 .*Latin-1.*iconv"):
        data.prepare_data(path, "char", progress=False, out_dir=tmp_path / "p")
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"line 2 of .*bad.jsonl is not UTF-8"):
        data.prepare_data(jsonl, "char", progress=False, out_dir=tmp_path / "q")


def test_mixed_encodings_in_a_folder_name_the_odd_file(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.txt").write_text("utf-8 text, caf\u00e9")
    (folder / "b.txt").write_bytes("utf-16 text".encode("utf-16"))  # with its byte-order mark
    with pytest.raises(DataError, match=r"b.txt is not UTF-8: .*UTF-16 byte-order mark"):
        data.prepare_data(folder, "char", progress=False, out_dir=tmp_path / "p")


def test_other_bad_inputs(tmp_path):
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(DataError, match=r"matches only files that are not"):
        open_corpus(str(tmp_path / "*.md"))
    with pytest.raises(DataError, match=r"matches no files"):
        open_corpus(str(tmp_path / "nothing-*.jsonl"))
    with pytest.raises(DataError, match=r"is not a corpus file this reads"):
        open_corpus(tmp_path / "notes.md")
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"line 2 of .*b.jsonl is not JSON"):
        data.prepare_data(broken, "char", progress=False, out_dir=tmp_path / "p")
    numbers = write_jsonl(tmp_path / "n.jsonl", [1, 2, 3])
    with pytest.raises(DataError, match=r"field 'text' is int, not text"):
        data.prepare_data(numbers, "char", progress=False, out_dir=tmp_path / "q")
    with pytest.raises(DataError, match=r"split_by must be one of"):
        data.prepare_data(broken, "char", split_by="random", out_dir=tmp_path / "r")


def test_interrupted_preparation_keeps_the_previous_folder(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", DOCS)
    out = tmp_path / "p"
    data.prepare_data(good, "char", out_dir=out, progress=False)
    before = (out / "train.bin").read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        "".join(json.dumps({"text": d}) + "\n" for d in DOCS) + "not json\n"
    )  # fails after most of the encoding
    with pytest.raises(DataError, match="is not JSON"):
        data.prepare_data(bad, "char", out_dir=out, progress=False, chunk_chars=100)
    assert (out / "train.bin").read_bytes() == before and data.load_prepared(out).meta["corpus"]["name"] == "good"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".p")]


def test_findings_name_the_split_that_was_made(prepared):
    from labutils import findings

    handoff = {**prepared.summary(), **data.document_length_stats(data.document_lengths(prepared), block_size=256)}
    assert prepared.summary()["split_by"] == "hash"
    assert "Splits by document (a seeded hash" in findings.data_prep(handoff)
    assert "Contiguous splits" in findings.data_prep({**handoff, "split_by": "contiguous"})
