"""Prepared token files: `prepare_data(corpus, tokenizer, splits)` turns text (the bundled tiny
Shakespeare, a local file or folder, a URL, .jsonl, Parquet) into `train/val/test.bin` token files
plus `meta.json`, and `PreparedData` opens them as memory maps; `labutils.batches` draws batches
from them. A single text is split into contiguous
character ranges in order train → val → test, so the default 90% train matches nanoGPT's
shakespeare_char split; a corpus of many documents is split by document (`split_by`, see `_Splitter`).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .corpora import DOC_SEPARATOR, CorpusSource, open_corpus
from .files import DATA_DIR, atomic_write_json, repo_path
from .tokenizers import CharTokenizer, Tokenizer, get_tokenizer, load_tokenizer, tokenizer_kind
from .validation import DataError

PREPARED_DIR = DATA_DIR / "prepared"

FORMAT_VERSION = 1
CHUNK_CHARS = 1 << 23  # characters encoded at a time: what bounds preparation's memory
SPLIT_BY = ("auto", "contiguous", "hash")


# --------------------------------------------------------------------------- corpora


@dataclass
class Corpus:
    """A corpus held in memory as a list of documents (small corpora, notebooks); `prepare_data` streams instead."""

    name: str
    documents: list[str]
    sha256: str
    source: str

    @property
    def text(self) -> str:
        return DOC_SEPARATOR.join(self.documents)

    @property
    def n_chars(self) -> int:
        return len(self.text)


def load_corpus(
    source: str | Path = "tinyshakespeare",
    *,
    sha256: str | None = None,
    cache_dir: str | Path | None = None,
    text_field: str = "text",
) -> Corpus:
    """A corpus read whole into memory (see `corpora.open_corpus` for what `source` may be)."""
    found = open_corpus(source, text_field=text_field, sha256=sha256, cache_dir=cache_dir)
    return Corpus(found.name, [doc for doc, _ in found.documents()], found.sha256, found.source)


# --------------------------------------------------------------------------- prepared token files

SPLITS = ("train", "val", "test")
VAL_HALVES = ("selection", "confirmation")  # the first and second half of val (see PreparedData.tokens)


@dataclass
class PreparedData:
    """A prepared folder: `{split}.bin` token ids, `{split}.docs.npy` document starts, meta and tokenizer."""

    dir: Path
    meta: dict[str, Any]
    tokenizer: Tokenizer
    _cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes per token id (Tokenizer.token_bytes), computed once per folder."""
        if "token_bytes" not in self._cache:
            self._cache["token_bytes"] = self.tokenizer.token_bytes()
        return self._cache["token_bytes"]

    @property
    def pad_id(self) -> int:
        """Id used to pad short documents; its targets are ignored (batches.IGNORE_INDEX), so any valid id works."""
        return int(self.meta["pad_id"])

    def tokens(self, split: str) -> np.ndarray:
        """Token ids of a split; 'val+test' joins splits (with the defaults: the corpus' last 10%).

        'selection' and 'confirmation' are the first and second half of val: studies and tuning
        choose on the first, and a confirmation scores the chosen config on the second, which the
        choice never saw (the test split stays for the final model alone).
        """
        if "+" in split:
            return np.concatenate([np.asarray(self.tokens(s)) for s in split.split("+")])
        if split in VAL_HALVES:
            val = self.tokens("val")
            return val[: len(val) // 2] if split == "selection" else val[len(val) // 2 :]
        _check_split(split)
        if split not in self._cache:
            path = self.dir / f"{split}.bin"
            n = self.meta["tokens"][split]
            self._cache[split] = (
                _random_access_map(path, self.meta["dtype"], n) if n else np.zeros(0, self.meta["dtype"])
            )
        return self._cache[split]

    def check_block_size(self, block_size: int, splits=("train", "val")) -> None:
        """Fail now, not mid-run, when a window of block_size + 1 tokens does not fit a split."""
        for split in splits:
            n = self.meta["tokens"][split]
            if n < block_size + 1:
                raise DataError(
                    f"block_size={block_size} is too long: the {split} split has only {n} tokens; "
                    f"use block_size <= {n - 1}, or a corpus/split fraction with more {split} tokens"
                )

    def doc_starts(self, split: str) -> np.ndarray:
        _check_split(split)
        return np.load(self.dir / f"{split}.docs.npy")

    def summary(self) -> dict[str, Any]:
        m = self.meta
        return {
            "corpus": m["corpus"]["name"],
            "tokenizer": m["tokenizer"]["name"],
            "vocab_size": m["vocab_size"],
            "split_by": m.get("split_by", "contiguous"),
            **{f"{s}_tokens": m["tokens"][s] for s in SPLITS},
        }


def _random_access_map(path: Path, dtype: str, n: int) -> np.memmap:
    """The split memory-mapped for random windows: the kernel's read-ahead (about 1 MB a page fault,
    measured) is turned off, so drawing a batch reads the windows' pages, not megabytes around each."""
    array = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
    mapping = getattr(array, "_mmap", None)
    if mapping is not None and hasattr(mmap, "MADV_RANDOM"):  # Linux and macOS; elsewhere reads stay as they were
        mapping.madvise(mmap.MADV_RANDOM)
    return array


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {SPLITS}")


def _check_splits(splits) -> tuple[float, float, float]:
    try:
        fractions = tuple(float(s) for s in splits)
    except (TypeError, ValueError):
        raise DataError(f"splits must be three numbers (train, val, test), got {splits!r}") from None
    if len(fractions) != 3:
        raise DataError(f"splits must be three fractions (train, val, test), got {len(fractions)}: {splits!r}")
    if any(f < 0 for f in fractions) or fractions[0] <= 0:
        raise DataError(f"split fractions must be non-negative with a positive train fraction, got {splits!r}")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise DataError(
            f"split fractions must sum to 1, got {splits!r} (sum {sum(fractions):.6g}); e.g. (0.9, 0.05, 0.05)"
        )
    return fractions  # type: ignore[return-value]


class _Splitter:
    """Which split each document goes to.

    contiguous: the joined text is cut at character fractions in order train, val, test (nanoGPT's
    split of tiny Shakespeare); a document across a cut is cut too. hash: each whole document by a
    seeded hash of its text, so appending documents never moves the ones already assigned, and a
    duplicated document always lands in the same split as its copy.
    """

    def __init__(self, mode: str, fractions, *, total_chars: int = 0, seed: int = 0):
        self.mode, self.fractions, self.seed, self.pos = mode, fractions, seed, 0
        self.cuts = [0, int(total_chars * fractions[0]), int(total_chars * (fractions[0] + fractions[1])), total_chars]
        self.train_below, self.val_below = fractions[0], fractions[0] + fractions[1]

    def pieces(self, doc: str) -> Iterator[tuple[str, str]]:
        if self.mode == "hash":
            if doc:
                digest = hashlib.blake2b(doc.encode(), digest_size=8, key=str(self.seed).encode()).digest()
                u = int.from_bytes(digest, "little") / 2**64  # uniform in [0, 1), fixed by the text and the seed
                yield ("train" if u < self.train_below else "val" if u < self.val_below else "test"), doc
            return
        start, end = self.pos, self.pos + len(doc)
        for i, split in enumerate(SPLITS):
            lo, hi = max(start, self.cuts[i]), min(end, self.cuts[i + 1])
            if hi > lo:
                yield split, doc[lo - start : hi - start]
        self.pos = end + len(DOC_SEPARATOR)


class _SplitWriter:
    """Appends one split's documents to its .bin as they are encoded, with the separator between them."""

    def __init__(self, path: Path, dtype, separator: np.ndarray):
        self.file, self.dtype, self.separator = open(path, "wb"), dtype, separator.astype(dtype)
        self.tokens, self.characters, self.starts = 0, 0, []

    def add(self, texts: list[str], ids: np.ndarray, lengths: np.ndarray) -> None:
        """`ids`: the chunk's documents encoded back to back; `lengths`: how many ids each has."""
        if not len(lengths):
            return
        first_of_split, k = not self.starts, len(self.separator)
        before = np.cumsum(lengths) - lengths  # where each document begins in `ids`
        gaps = before[1:] if first_of_split else before  # a separator precedes every document but a split's first
        if len(gaps) and k:  # one np.insert places all of the chunk's separators
            ids = np.insert(ids, np.repeat(gaps, k), np.tile(self.separator, len(gaps)))
        separators = np.arange(len(lengths)) + (0 if first_of_split else 1)
        self.starts.extend((self.tokens + before + k * separators).tolist())
        ids.astype(self.dtype, copy=False).tofile(self.file)  # ids fit: the dtype follows the vocabulary
        self.tokens += len(ids)
        # the separators are text too (DOC_SEPARATOR, encoded): a char tokenizer's characters per token is then 1
        self.characters += sum(map(len, texts)) + len(DOC_SEPARATOR) * len(gaps)


def _read(corpus: CorpusSource | Corpus, what: str, progress: bool) -> Iterator[str]:
    """The corpus' documents, one reading pass, with a progress bar in bytes."""
    from .hardware import progress_bar

    if isinstance(corpus, Corpus):
        yield from corpus.documents
        return
    with progress_bar(total=corpus.n_bytes, unit="B", unit_scale=True, desc=what, disable=not progress) as bar:
        for doc, n_bytes in corpus.documents():
            yield doc
            bar.update(n_bytes)


def _total_characters(corpus, progress: bool) -> int:
    """Characters of the documents joined by the separator: where the contiguous cuts go."""
    characters = documents = 0
    for doc in _read(corpus, "count characters", progress):
        characters, documents = characters + len(doc), documents + 1
    return characters + len(DOC_SEPARATOR) * max(documents - 1, 0)


def _char_vocabulary(corpus, splitter: _Splitter, progress: bool) -> CharTokenizer:
    """The characters of the train split (its documents joined by the separator), read in one streaming pass."""
    chars, documents = set(), 0
    for doc in _read(corpus, "char vocabulary", progress):
        for split, piece in splitter.pieces(doc):
            if split == "train":
                chars.update(piece)
                documents += 1
    if documents > 1:
        chars.update(DOC_SEPARATOR)
    return CharTokenizer(sorted(chars))


def _encode_splits(
    corpus, tok: Tokenizer, splitter: _Splitter, folder: Path, dtype, *, chunk_chars: int, progress: bool
):
    """Stream documents into the splits' .bin files, encoding `chunk_chars` characters at a time.

    Encoding a chunk while the next is read on another thread was tried: on 2 cores it measured no
    faster at 200 MB and slower at 2 GB (tiktoken's threads and the reader's compete for the GIL)."""
    writers = {s: _SplitWriter(folder / f"{s}.bin", dtype, tok.encode_array(DOC_SEPARATOR)) for s in SPLITS}
    buffers: dict[str, list[str]] = {s: [] for s in SPLITS}
    buffered = n_documents = 0

    def flush() -> None:
        for split, texts in buffers.items():
            if texts:
                writers[split].add(texts, *tok.encode_batch(texts))
                texts.clear()

    try:
        for doc in _read(corpus, f"encode ({tok.kind})", progress):
            n_documents += 1
            for split, piece in splitter.pieces(doc):
                buffers[split].append(piece)
                buffered += len(piece)
            if buffered >= chunk_chars:
                flush()
                buffered = 0
        flush()
    finally:
        for writer in writers.values():
            writer.file.close()
    for split, writer in writers.items():
        np.save(folder / f"{split}.docs.npy", np.asarray(writer.starts, dtype=np.int64))
    return writers, n_documents


def _fingerprint(sha256: str, tokenizer: str, fractions, split_by: str, split_seed: int, text_field: str) -> str:
    key: dict[str, Any] = {"v": FORMAT_VERSION, "sha256": sha256, "tokenizer": tokenizer, "splits": list(fractions)}
    if split_by == "hash":  # contiguous keeps the key it always had, so earlier prepared folders stay valid
        key.update(split_by=split_by, split_seed=split_seed)
    if text_field != "text":
        key["text_field"] = text_field
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _replace_folder(tmp_dir: Path, out_dir: Path) -> None:
    """Swap the finished folder in; the previous one is removed only after the new one is in place."""
    old = out_dir.with_name(f".{out_dir.name}.old")
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
    try:
        tmp_dir.rename(out_dir)
    except OSError:
        if old.exists() and not out_dir.exists():
            old.rename(out_dir)  # put the previous data back before reporting the failure
        raise
    shutil.rmtree(old, ignore_errors=True)


def _resolve_out_dir(out_dir, name: str, tokenizer: str) -> Path:
    # a tokenizer named by a folder (hf:<folder>) is named by the folder's last part: one folder level, not a path
    kind, _, rest = tokenizer.partition(":")
    slug = f"{kind}_{Path(rest).name}" if rest else kind
    out_dir = repo_path(out_dir) if out_dir is not None else PREPARED_DIR / f"{name}-{slug}"
    if out_dir.is_file() or (out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "meta.json").exists()):
        # the folder is replaced as a whole, so a folder of other files must never be taken for ours
        raise DataError(
            f"out_dir {out_dir} already exists and is not a prepared data folder (no meta.json); "
            "prepare_data replaces its out_dir as a whole, so give it a new or empty folder"
        )
    return out_dir


def _reusable(out_dir: Path, fingerprint: str) -> PreparedData | None:
    try:
        meta = json.loads((out_dir / "meta.json").read_text())
        if meta.get("fingerprint") == fingerprint and all((out_dir / f"{s}.bin").exists() for s in SPLITS):
            return load_prepared(out_dir)
    except (OSError, json.JSONDecodeError, DataError):
        pass  # no folder yet, or an unreadable earlier preparation: rebuild it
    return None


def _check_options(split_by: str, chunk_chars: int) -> None:
    if split_by not in SPLIT_BY:
        raise DataError(f"split_by must be one of {SPLIT_BY}, got {split_by!r}")
    if chunk_chars < 1:
        raise DataError(f"chunk_chars must be positive, got {chunk_chars}")


def _metadata(
    corpus: Corpus | CorpusSource,
    tok: Tokenizer,
    name: str,
    *,
    fingerprint: str,
    fractions,
    split_by: str,
    writers: dict,
    n_documents: int,
    total_chars: int,
    dtype,
) -> dict[str, Any]:
    """meta.json: what was prepared from what, and how many tokens, documents and characters each split holds."""
    characters = {s: w.characters for s, w in writers.items()}
    return {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "corpus": {
            "name": corpus.name,
            "source": corpus.source,
            "sha256": corpus.sha256,
            "characters": total_chars or sum(characters.values()),
            "documents": n_documents,
        },
        "tokenizer": {**{k: v for k, v in tok.spec().items() if k != "chars"}, "name": name},
        "vocab_size": tok.vocab_size,
        "dtype": np.dtype(dtype).name,
        "pad_id": tok.eot_id if tok.eot_id is not None else 0,
        "splits": dict(zip(SPLITS, fractions, strict=True)),
        "split_by": split_by,
        "tokens": {s: w.tokens for s, w in writers.items()},
        "documents": {s: len(w.starts) for s, w in writers.items()},
        "characters": characters,
        "characters_include_separators": True,
    }


def prepare_data(
    corpus: str | Path | Corpus | CorpusSource = "tinyshakespeare",
    tokenizer: str = "char",
    splits=(0.9, 0.05, 0.05),
    out_dir: str | Path | None = None,
    *,
    sha256: str | None = None,
    force: bool = False,
    split_by: str = "auto",
    split_seed: int = 0,
    text_field: str = "text",
    chunk_chars: int = CHUNK_CHARS,
    progress: bool = True,
) -> PreparedData:
    """Tokenize a corpus into train/val/test token files, streaming; reuse them when the inputs have not changed.

    `corpus`: see `corpora.open_corpus` (bundled name, URL, .txt, folder, glob, .jsonl[.gz], .parquet).
    Documents are read, split and encoded `chunk_chars` characters at a time and appended to the
    splits' files, so memory follows the chunk, not the corpus. `split_by`: 'contiguous' (character
    fractions in order), 'hash' (whole documents by a seeded hash of their text), or 'auto':
    contiguous for one .txt file (tiny Shakespeare: nanoGPT's split), hash for collections of
    documents (folders, globs, .jsonl, Parquet). The folder is built in a temporary sibling and swapped in at the end,
    so a failure
    leaves any earlier prepared data untouched. Default location: data/prepared/<corpus>-<tokenizer>.
    """
    fractions = _check_splits(splits)
    kind, _ = tokenizer_kind(tokenizer)  # a misspelt name fails before any work
    _check_options(split_by, chunk_chars)
    if not isinstance(corpus, (Corpus, CorpusSource)):
        corpus = open_corpus(corpus, text_field=text_field, sha256=sha256)
    if split_by == "auto":
        split_by = "contiguous" if isinstance(corpus, Corpus) or corpus.paragraphs else "hash"
    fingerprint = _fingerprint(corpus.sha256, tokenizer, fractions, split_by, split_seed, text_field)
    out_dir = _resolve_out_dir(out_dir, corpus.name, tokenizer)
    if not force and (ready := _reusable(out_dir, fingerprint)) is not None:
        return ready

    total_chars = _total_characters(corpus, progress) if split_by == "contiguous" else 0

    def new_splitter() -> _Splitter:  # a fresh one per pass: a contiguous one walks the text once
        return _Splitter(split_by, fractions, total_chars=total_chars, seed=split_seed)

    # a learned vocabulary (char) is read from the train split first
    tok = _char_vocabulary(corpus, new_splitter(), progress) if kind.learns_vocabulary else get_tokenizer(tokenizer)
    dtype = np.uint16 if tok.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        writers, n_documents = _encode_splits(
            corpus, tok, new_splitter(), tmp_dir, dtype, chunk_chars=chunk_chars, progress=progress
        )
        if not any(w.tokens for w in writers.values()):
            raise DataError(f"corpus {corpus.source} is empty; give a file or folder with text in it")
        tok.save(tmp_dir / "tokenizer.json")
        atomic_write_json(
            tmp_dir / "meta.json",
            _metadata(
                corpus,
                tok,
                tokenizer,
                fingerprint=fingerprint,
                fractions=fractions,
                split_by=split_by,
                writers=writers,
                n_documents=n_documents,
                total_chars=total_chars,
                dtype=dtype,
            ),
        )
        _replace_folder(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return load_prepared(out_dir)


def load_prepared(directory: str | Path) -> PreparedData:
    """Open a folder written by `prepare_data`."""
    directory = repo_path(directory)
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        raise DataError(
            f"{directory} is not a prepared data folder (no meta.json); run prepare_data() or notebook 01 first"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{directory} was prepared by another labutils version; re-run prepare_data(..., force=True)")
    for split in SPLITS:
        path = directory / f"{split}.bin"
        expected = meta["tokens"][split] * np.dtype(meta["dtype"]).itemsize
        if not path.exists() or path.stat().st_size != expected:
            raise DataError(f"{path} is missing or truncated; re-run prepare_data(..., force=True)")
    return PreparedData(dir=directory, meta=meta, tokenizer=load_tokenizer(directory / "tokenizer.json"))


def split_stats(prepared: PreparedData):
    """One row per split: characters, documents, tokens and characters per token."""
    import pandas as pd

    m = prepared.meta

    def characters(split: str) -> int:
        """The split's characters with the separators between its documents (an older meta.json counted only the
        documents', so a char tokenizer showed 0.987 characters per token)."""
        separators = 0 if m.get("characters_include_separators") else max(m["documents"][split] - 1, 0)
        return m["characters"][split] + len(DOC_SEPARATOR) * separators

    rows = [
        {
            "split": s,
            "fraction": m["splits"][s],
            "characters": characters(s),
            "documents": m["documents"][s],
            "tokens": m["tokens"][s],
            "chars_per_token": characters(s) / max(m["tokens"][s], 1),
        }
        for s in SPLITS
    ]
    return pd.DataFrame(rows).set_index("split")


def token_frequencies(prepared: PreparedData, split: str = "train"):
    """Count of every token id in a split, most frequent first, with its decoded text."""
    import pandas as pd

    tokens, counts = prepared.tokens(split), np.zeros(prepared.vocab_size, dtype=np.int64)
    for start in range(0, len(tokens), 1 << 24):  # a chunk at a time: a large split is never copied whole
        counts += np.bincount(tokens[start : start + (1 << 24)], minlength=prepared.vocab_size)
    order = np.argsort(-counts, kind="stable")
    order = order[counts[order] > 0]
    frame = pd.DataFrame({"token_id": order, "count": counts[order]})
    frame["token"] = [repr(prepared.tokenizer.decode([int(i)]))[1:-1] for i in order]
    frame["share"] = frame["count"] / counts.sum()
    return frame


def document_lengths(prepared: PreparedData, split: str = "train") -> np.ndarray:
    """Length in tokens of every document in a split (documents = paragraphs or files)."""
    starts = prepared.doc_starts(split)
    ends = np.append(starts[1:], prepared.meta["tokens"][split])
    return ends - starts


def document_length_stats(lengths: np.ndarray, block_size: int) -> dict[str, float]:
    """Summary of document lengths, and the share of a padded batch that would be padding at `block_size`."""
    lengths = np.asarray(lengths)
    chunks = np.maximum(np.ceil(np.maximum(lengths - 1, 0) / block_size), 1)
    return {
        "documents": int(len(lengths)),
        "median_document_tokens": float(np.median(lengths)),
        "max_document_tokens": int(lengths.max()),
        f"padding_share_at_block_{block_size}": float(1 - lengths.sum() / (chunks.sum() * (block_size + 1))),
    }


def as_prepared(data: PreparedData | str | Path) -> PreparedData:
    return data if isinstance(data, PreparedData) else load_prepared(data)
