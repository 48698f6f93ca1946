"""Corpora, tokenizers, prepared token files and batches.

`prepare_data(corpus, tokenizer, splits)` turns text (the bundled tiny Shakespeare, a local file or
folder, or a URL) into `train/val/test.bin` token files plus `meta.json`; `StreamBatches`,
`DocumentBatches` and `eval_batches` feed the trainer. Splits are contiguous character ranges in
order train → val → test, so the default 90% train matches nanoGPT's shakespeare_char split.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .errors import DataError
from .files import atomic_write, atomic_write_json, sha256_file
from .paths import DATA_DIR, repo_path
from .tokenizers import (  # noqa: F401  (re-exported: labutils.data is where notebooks look)
    TOKENIZERS,
    ByteTokenizer,
    CharTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    check_tokenizer_name,
    get_tokenizer,
    load_tokenizer,
    tokenizer_from_spec,
)

PREPARED_DIR = DATA_DIR / "prepared"
CACHE_DIR = DATA_DIR / "cache"

BUNDLED_CORPORA = {
    "tinyshakespeare": ("tinyshakespeare.txt", "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
}
DOC_SEPARATOR = "\n\n"  # documents of one file are its blank-line-separated paragraphs
IGNORE_INDEX = -100  # targets the loss skips (padding in document mode)
FORMAT_VERSION = 1


# --------------------------------------------------------------------------- corpora


@dataclass
class Corpus:
    """Text as a list of documents, with where it came from and the SHA-256 of its bytes."""

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


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc}); convert it to UTF-8 first") from None


def download(url: str, *, sha256: str | None = None, cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Download `url` once into the cache (verified against `sha256` when given) and return its path."""
    cache_dir = Path(cache_dir or CACHE_DIR)
    # The cached name is derived from the URL, never taken from it verbatim: no path escapes the cache.
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", url.rstrip("/").rsplit("/", 1)[-1])[:80] or "download"
    target = cache_dir / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{stem}"
    if target.exists():
        if sha256 is None or sha256_file(target) == sha256:
            return target
        target.unlink()  # a stale or tampered cache entry: fetch again
    from .hardware import progress_bar

    def fetch(tmp: Path) -> None:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                with progress_bar(total=total, unit="B", unit_scale=True, desc=f"download {stem}", disable=not progress) as bar:
                    while chunk := response.read(1 << 16):
                        out.write(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise DataError(f"could not download {url}: {exc}. Check the URL and your network, or pass a local file") from None
        if sha256 is not None and (actual := sha256_file(tmp)) != sha256:
            raise DataError(f"sha256 mismatch for {url}: expected {sha256}, got {actual}. The file changed or the hash is wrong")

    return atomic_write(target, fetch)


def load_corpus(source: str | Path = "tinyshakespeare", *, sha256: str | None = None, cache_dir: str | Path | None = None) -> Corpus:
    """Load the bundled corpus by name, a .txt file, a folder of .txt files (one document each), or a URL."""
    source_str = str(source)
    if source_str in BUNDLED_CORPORA:
        filename, expected = BUNDLED_CORPORA[source_str]
        path = DATA_DIR / filename
        if not path.exists():
            raise DataError(f"bundled corpus {path} is missing; restore it with `git checkout -- data/{filename}`")
        actual = sha256_file(path)
        if actual != expected:
            raise DataError(f"bundled corpus {path} has sha256 {actual}, expected {expected}; restore it with `git checkout -- data/{filename}`")
        text = _read_text(path)
        return _make_corpus(source_str, text.split(DOC_SEPARATOR), actual, str(path))
    if re.match(r"^https?://", source_str):
        path = download(source_str, sha256=sha256, cache_dir=cache_dir)
        text = _read_text(path)
        return _make_corpus(Path(path).name.split("-", 1)[-1], text.split(DOC_SEPARATOR), sha256_file(path), source_str)
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise DataError(f"folder {path} contains no .txt files; point `corpus` at a folder of UTF-8 .txt documents")
        docs = [_read_text(f) for f in files]
        digest = hashlib.sha256()
        for f, doc in zip(files, docs):
            digest.update(str(f.relative_to(path)).encode() + b"\0" + doc.encode() + b"\0")
        return _make_corpus(path.name, docs, digest.hexdigest(), str(path))
    if path.is_file():
        actual = sha256_file(path)
        if sha256 is not None and actual != sha256:
            raise DataError(f"sha256 mismatch for {path}: expected {sha256}, got {actual}")
        return _make_corpus(path.stem, _read_text(path).split(DOC_SEPARATOR), actual, str(path))
    raise DataError(
        f"corpus {source_str!r} not found: give a bundled name {sorted(BUNDLED_CORPORA)}, a .txt file, a folder of .txt files, or an http(s) URL"
    )


def _make_corpus(name: str, documents: list[str], sha256: str, source: str) -> Corpus:
    if not any(doc.strip() for doc in documents):
        raise DataError(f"corpus {source} is empty; give a file or folder with text in it")
    return Corpus(name=name, documents=documents, sha256=sha256, source=source)


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
    def pad_id(self) -> int:
        """Id used to pad short documents; its targets are IGNORE_INDEX, so any valid id works."""
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
            return val[: len(val) // 2] if split == "selection" else val[len(val) // 2:]
        _check_split(split)
        if split not in self._cache:
            path = self.dir / f"{split}.bin"
            n = self.meta["tokens"][split]
            self._cache[split] = np.memmap(path, dtype=self.meta["dtype"], mode="r", shape=(n,)) if n else np.zeros(0, self.meta["dtype"])
        return self._cache[split]

    def check_block_size(self, block_size: int, splits=("train", "val")) -> None:
        """Fail now, not mid-run, when a window of block_size + 1 tokens does not fit a split."""
        for split in splits:
            n = self.meta["tokens"][split]
            if n < block_size + 1:
                raise DataError(f"block_size={block_size} is too long: the {split} split has only {n} tokens; "
                                f"use block_size <= {n - 1}, or a corpus/split fraction with more {split} tokens")

    def doc_starts(self, split: str) -> np.ndarray:
        _check_split(split)
        return np.load(self.dir / f"{split}.docs.npy")

    def summary(self) -> dict[str, Any]:
        m = self.meta
        return {"corpus": m["corpus"]["name"], "tokenizer": m["tokenizer"]["name"], "vocab_size": m["vocab_size"], **{f"{s}_tokens": m["tokens"][s] for s in SPLITS}}


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
        raise DataError(f"split fractions must sum to 1, got {splits!r} (sum {sum(fractions):.6g}); e.g. (0.9, 0.05, 0.05)")
    return fractions  # type: ignore[return-value]


def _split_documents(documents: list[str], fractions) -> dict[str, list[str]]:
    """Cut the joined text at character fractions, keeping document boundaries inside each split."""
    lengths = [len(d) for d in documents]
    total = sum(lengths) + len(DOC_SEPARATOR) * (len(documents) - 1)
    cuts = [0, int(total * fractions[0]), int(total * (fractions[0] + fractions[1])), total]
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    pos = 0
    for doc in documents:
        start, end = pos, pos + len(doc)
        for i, split in enumerate(SPLITS):
            lo, hi = max(start, cuts[i]), min(end, cuts[i + 1])
            if hi > lo:
                out[split].append(doc[lo - start : hi - start])
        pos = end + len(DOC_SEPARATOR)
    return out


def _fingerprint(corpus: Corpus, tokenizer: str, fractions) -> str:
    key = json.dumps({"v": FORMAT_VERSION, "sha256": corpus.sha256, "tokenizer": tokenizer, "splits": list(fractions)}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def prepare_data(
    corpus: str | Path | Corpus = "tinyshakespeare",
    tokenizer: str = "char",
    splits=(0.9, 0.05, 0.05),
    out_dir: str | Path | None = None,
    *,
    sha256: str | None = None,
    force: bool = False,
) -> PreparedData:
    """Tokenize a corpus into train/val/test token files; reuse them when the inputs have not changed.

    The folder is built in a temporary sibling and swapped in at the end, so a failure leaves any
    earlier prepared data untouched. Default location: data/prepared/<corpus>-<tokenizer>.
    """
    fractions = _check_splits(splits)
    if not isinstance(corpus, Corpus):
        corpus = load_corpus(corpus, sha256=sha256)
    tok_name = tokenizer
    check_tokenizer_name(tok_name)  # fail before any work on a misspelt name
    fingerprint = _fingerprint(corpus, tok_name, fractions)
    out_dir = repo_path(out_dir) if out_dir is not None else PREPARED_DIR / f"{corpus.name}-{tok_name.replace(':', '_')}"
    meta_path = out_dir / "meta.json"
    if out_dir.is_file() or (out_dir.is_dir() and any(out_dir.iterdir()) and not meta_path.exists()):
        # the folder is replaced as a whole, so a folder of other files must never be taken for ours
        raise DataError(f"out_dir {out_dir} already exists and is not a prepared data folder (no meta.json); "
                        "prepare_data replaces its out_dir as a whole, so give it a new or empty folder")
    if not force and meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("fingerprint") == fingerprint and all((out_dir / f"{s}.bin").exists() for s in SPLITS):
                return load_prepared(out_dir)
        except (json.JSONDecodeError, DataError):
            pass  # unreadable earlier preparation: rebuild it

    parts = _split_documents(corpus.documents, fractions)
    tok = get_tokenizer(tok_name, train_text=DOC_SEPARATOR.join(parts["train"]))
    dtype = np.uint16 if tok.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    sep = tok.encode_array(DOC_SEPARATOR)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        counts, doc_counts = {}, {}
        for split in SPLITS:
            pieces, starts, pos = [], [], 0
            for i, doc in enumerate(parts[split]):
                ids = tok.encode_array(doc)
                starts.append(pos)
                pieces.append(ids)
                pos += len(ids)
                if i + 1 < len(parts[split]):
                    pieces.append(sep)
                    pos += len(sep)
            ids = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
            ids.astype(dtype).tofile(tmp_dir / f"{split}.bin")
            np.save(tmp_dir / f"{split}.docs.npy", np.asarray(starts, dtype=np.int64))
            counts[split], doc_counts[split] = int(len(ids)), len(parts[split])
        tok.save(tmp_dir / "tokenizer.json")
        meta = {
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "corpus": {"name": corpus.name, "source": corpus.source, "sha256": corpus.sha256, "characters": corpus.n_chars, "documents": len(corpus.documents)},
            "tokenizer": {**{k: v for k, v in tok.spec().items() if k != "chars"}, "name": tok_name},
            "vocab_size": tok.vocab_size,
            "dtype": np.dtype(dtype).name,
            "pad_id": tok.eot_id if tok.eot_id is not None else 0,
            "splits": dict(zip(SPLITS, fractions)),
            "tokens": counts,
            "documents": doc_counts,
            "characters": {s: sum(map(len, parts[s])) for s in SPLITS},
        }
        atomic_write_json(tmp_dir / "meta.json", meta)
        # Swap the finished folder in; the previous one is removed only after the new one is complete.
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
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return load_prepared(out_dir)


def load_prepared(directory: str | Path) -> PreparedData:
    """Open a folder written by `prepare_data`."""
    directory = repo_path(directory)
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        raise DataError(f"{directory} is not a prepared data folder (no meta.json); run prepare_data() or notebook 01 first")
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
    rows = [
        {"split": s, "fraction": m["splits"][s], "characters": m["characters"][s], "documents": m["documents"][s],
         "tokens": m["tokens"][s], "chars_per_token": m["characters"][s] / max(m["tokens"][s], 1)}
        for s in SPLITS
    ]
    return pd.DataFrame(rows).set_index("split")


def token_frequencies(prepared: PreparedData, split: str = "train"):
    """Count of every token id in a split, most frequent first, with its decoded text."""
    import pandas as pd

    counts = np.bincount(np.asarray(prepared.tokens(split), dtype=np.int64), minlength=prepared.vocab_size)
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


def load_stage_data(tokenizer: str = "char", handoff: str | Path = "results/01_data_prep/data.json") -> PreparedData:
    """The data notebook 01 prepared (its hand-off file), or the bundled corpus prepared now.

    Later stages call this so each also runs alone: without 01's hand-off, or when 01 used another
    tokenizer, they fall back to the default corpus with the tokenizer asked for.
    """
    path = repo_path(handoff)
    if path.exists():
        found = json.loads(path.read_text())
        if found.get("tokenizer") == tokenizer and repo_path(found["prepared_dir"]).exists():
            return load_prepared(found["prepared_dir"])
    return prepare_data("tinyshakespeare", tokenizer)


def as_prepared(data: PreparedData | str | Path) -> PreparedData:
    return data if isinstance(data, PreparedData) else load_prepared(data)


# --------------------------------------------------------------------------- batches


def _as_token_tensor(tokens: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(tokens, torch.Tensor):
        return tokens.to(device=device, dtype=torch.int64)
    # int64 copy once: a memmap of uint16 cannot be indexed by torch directly, and keeping the whole
    # split resident (on the GPU when asked) removes host work from every step.
    return torch.from_numpy(np.asarray(tokens, dtype=np.int64)).to(device)


def _check_block(n_tokens: int, block_size: int, what: str) -> None:
    if block_size < 1:
        raise DataError(f"block_size must be positive, got {block_size}")
    if n_tokens < block_size + 1:
        raise DataError(
            f"{what} has {n_tokens} tokens, fewer than block_size + 1 = {block_size + 1}; "
            "use a smaller block_size, a larger split fraction, or a bigger corpus"
        )


class StreamBatches:
    """Random contiguous windows of block_size + 1 tokens; deterministic under `seed`, resumable."""

    def __init__(self, tokens, block_size: int, batch_size: int, *, seed: int = 0, device: str | torch.device = "cpu"):
        if batch_size < 1:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        self.device = torch.device(device)
        self.data = _as_token_tensor(tokens, self.device)
        _check_block(len(self.data), block_size, "the token split")
        self.block_size, self.batch_size = block_size, batch_size
        # Indices are drawn by a generator on the data's device, so a GPU run never waits on the host.
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._offsets = torch.arange(block_size + 1, device=self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        high = len(self.data) - self.block_size
        starts = torch.randint(high, (self.batch_size,), generator=self.generator, device=self.device)
        windows = self.data[starts[:, None] + self._offsets]
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"].cpu() if hasattr(state["generator"], "cpu") else state["generator"])


class DocumentBatches:
    """Documents cut into chunks of at most seq_len + 1 tokens, padded; padded targets are IGNORE_INDEX.

    Chunks are visited in a shuffled order that is re-drawn each epoch from `seed`, as seed 001's
    DataLoader(shuffle=True) did, but reproducibly and resumably.
    """

    def __init__(self, tokens, doc_starts, seq_len: int, batch_size: int, *, pad_id: int = 0, seed: int = 0, device: str | torch.device = "cpu"):
        if batch_size < 1:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if seq_len < 1:
            raise DataError(f"seq_len must be positive, got {seq_len}")
        tokens = np.asarray(tokens)
        self.device = torch.device(device)
        self.seq_len, self.batch_size, self.pad_id, self.seed = seq_len, batch_size, pad_id, seed
        bounds = list(np.asarray(doc_starts, dtype=np.int64)) + [len(tokens)]
        chunks = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            # consecutive chunks overlap by one token so every token is a target exactly once
            for lo in range(int(start), int(end) - 1, seq_len):
                chunks.append((lo, min(lo + seq_len + 1, int(end))))
        if not chunks:
            raise DataError("no document has two or more tokens; document mode needs longer documents")
        rows = np.full((len(chunks), seq_len + 1), pad_id, dtype=np.int64)
        lengths = np.zeros(len(chunks), dtype=np.int64)
        for i, (lo, hi) in enumerate(chunks):
            rows[i, : hi - lo] = tokens[lo:hi]
            lengths[i] = hi - lo
        self.rows = torch.from_numpy(rows).to(self.device)
        self.lengths = torch.from_numpy(lengths).to(self.device)
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def __len__(self) -> int:
        return len(self.rows)

    def _permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(len(self.rows), generator=g).to(self.device)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        picks = []
        need = self.batch_size
        while need:
            take = self._order[self.position : self.position + need]
            picks.append(take)
            need -= len(take)
            self.position += len(take)
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
        index = torch.cat(picks)
        rows, lengths = self.rows[index], self.lengths[index]
        x, y = rows[:, :-1], rows[:, 1:]
        positions = torch.arange(1, self.seq_len + 1, device=self.device)
        # torch.where, not boolean-mask assignment: the latter syncs with the host on CUDA every step
        y = torch.where(positions[None, :] >= lengths[:, None], IGNORE_INDEX, y)
        return x, y

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation()


def eval_batches(tokens, block_size: int, batch_size: int, n_batches: int | None = None, *, n_tokens: int | None = None,
                 seed: int = 1234, device: str | torch.device = "cpu"):
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
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n_windows, batch_size)]


def tiled_batches(tokens, block_size: int, batch_size: int, *, device: str | torch.device = "cpu"):
    """Every token of a split exactly once as a target, in non-overlapping windows (for full evaluation)."""
    data = _as_token_tensor(tokens, torch.device(device))
    _check_block(len(data), block_size, "the token split")
    n_windows = (len(data) - 1) // block_size
    usable = data[: n_windows * block_size + 1]
    x = usable[:-1].view(n_windows, block_size)
    y = usable[1:].view(n_windows, block_size)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n_windows, batch_size)]
