"""Where text comes from: corpora read as a stream of documents, never whole.

`open_corpus(source)` accepts the bundled name, a URL, a `.txt` file (its documents are its
blank-line-separated paragraphs), a folder or glob of files, `.jsonl` / `.jsonl.gz` (one JSON
object per line, the document in `text_field`) and Parquet (the document in column `text_field`).
In a folder or glob each `.txt` file is one document and every other file holds many. Reading is
chunked, so memory follows the chunk, not the corpus; every bad input stops with a message that
names the file, the place in it and the fix.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .files import DATA_DIR, atomic_write, sha256_file
from .validation import DataError

BUNDLED_CORPORA = {
    "tinyshakespeare": ("tinyshakespeare.txt", "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed")
}
DOC_SEPARATOR = "\n\n"  # documents of one .txt file are its blank-line-separated paragraphs
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
READ_BYTES = 1 << 22  # 4 MiB of a file at a time
CACHE_DIR = DATA_DIR / "cache"  # downloads


def download(
    url: str, *, sha256: str | None = None, cache_dir: str | Path | None = None, progress: bool = True
) -> Path:
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
                with progress_bar(
                    total=total, unit="B", unit_scale=True, desc=f"download {stem}", disable=not progress
                ) as bar:
                    while chunk := response.read(1 << 16):
                        out.write(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise DataError(
                f"could not download {url}: {exc}. Check the URL and your network, or pass a local file"
            ) from None
        if sha256 is not None and (actual := sha256_file(tmp)) != sha256:
            raise DataError(
                f"sha256 mismatch for {url}: expected {sha256}, got {actual}. The file changed or the hash is wrong"
            )

    return atomic_write(target, fetch)


def file_kind(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


@dataclass
class CorpusSource:
    """A corpus on disk: its files, how to read them, and a SHA-256 over names and bytes (for caching)."""

    name: str
    source: str
    files: list[Path]
    root: Path | None  # folder or glob base: files are one document each when .txt, and hashed by relative name
    sha256: str
    text_field: str = "text"

    @property
    def paragraphs(self) -> bool:
        """One .txt file, whose documents are its paragraphs (as tiny Shakespeare): one running text."""
        return self.root is None and file_kind(self.files[0]) == ".txt"

    @property
    def n_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def documents(self) -> Iterator[tuple[str, int]]:
        """(document, bytes of the input read since the last one), in a fixed order, one at a time."""
        for path in self.files:
            kind = file_kind(path)
            if kind == ".txt":
                yield from _txt_documents(path, whole=self.root is not None)
            elif kind == ".parquet":
                yield from _parquet_documents(path, self.text_field)
            else:
                yield from _jsonl_documents(path, self.text_field)


def open_corpus(
    source: str | Path = "tinyshakespeare",
    *,
    text_field: str = "text",
    sha256: str | None = None,
    cache_dir: str | Path | None = None,
) -> CorpusSource:
    """Find a corpus and hash it; nothing is decoded yet (see `CorpusSource.documents`)."""
    source_str = str(source)
    if source_str in BUNDLED_CORPORA:
        filename, expected = BUNDLED_CORPORA[source_str]
        path = DATA_DIR / filename
        if not path.exists():
            raise DataError(f"bundled corpus {path} is missing; restore it with `git checkout -- data/{filename}`")
        actual = sha256_file(path)
        if actual != expected:
            raise DataError(
                f"bundled corpus {path} has sha256 {actual}, expected {expected}; "
                f"restore it with `git checkout -- data/{filename}`"
            )
        return CorpusSource(source_str, str(path), [path], None, actual, text_field)
    if re.match(r"^https?://", source_str):
        path = download(source_str, sha256=sha256, cache_dir=cache_dir)
        return CorpusSource(
            path.name.split("-", 1)[-1].split(".")[0], source_str, [path], None, sha256_file(path), text_field
        )
    path = Path(source).expanduser()
    if path.is_file():
        if file_kind(path) is None:
            raise DataError(
                f"{path} is not a corpus file this reads; give a {', '.join(SUFFIXES)} file, or a folder of them"
            )
        actual = sha256_file(path)
        if sha256 is not None and actual != sha256:
            raise DataError(f"sha256 mismatch for {path}: expected {sha256}, got {actual}")
        return CorpusSource(path.name[: -len(file_kind(path))], str(path), [path], None, actual, text_field)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and file_kind(p))
        if not files:
            raise DataError(
                f"folder {path} contains no corpus files ({', '.join(SUFFIXES)}); point `corpus` at a folder of them"
            )
        return CorpusSource(path.name, str(path), files, path, _hash_files(files, path), text_field)
    if glob.has_magic(source_str):
        matched = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        files = [p for p in matched if file_kind(p)]
        if not files:
            what = f"only files that are not {', '.join(SUFFIXES)}" if matched else "no files"
            raise DataError(
                f"the pattern {source_str!r} matches {what}; check it (quote it so your shell does not expand it)"
            )
        root = _glob_root(path)
        return CorpusSource(root.name or "glob", source_str, files, root, _hash_files(files, root), text_field)
    raise DataError(
        f"corpus {source_str!r} not found: give a bundled name {sorted(BUNDLED_CORPORA)}, a file "
        f"({', '.join(SUFFIXES)}), a folder or glob of such files, or an http(s) URL"
    )


def _glob_root(pattern: Path) -> Path:
    """The longest folder of a glob pattern without wildcards: file names are hashed relative to it."""
    parts = []
    for part in pattern.parts:
        if glob.has_magic(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def _hash_files(files: list[Path], root: Path) -> str:
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(root)).encode() + b"\0" + bytes.fromhex(sha256_file(f)) + b"\0")
    return digest.hexdigest()


# --------------------------------------------------------------------------- readers


def _not_utf8(path: Path, offset: int, exc: UnicodeDecodeError, head: bytes) -> DataError:
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        guess = "it starts with a UTF-16 byte-order mark, so it is UTF-16"
    else:
        guess = "it may be Latin-1 or Windows-1252, or mix encodings"
    return DataError(
        f"{path} is not UTF-8: byte {exc.object[exc.start]:#04x} at byte offset {offset + exc.start} cannot be "
        f"decoded ({guess}); convert it to UTF-8 first, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`"
    )


def _decoded_chunks(path: Path, raw) -> Iterator[tuple[str, int]]:
    """(text, bytes read) from a binary stream, decoded incrementally so a character may span two reads."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset, head = 0, b""
    while True:
        block = raw.read(READ_BYTES)
        head = head or block[:4]
        buffered = len(decoder.getstate()[0])  # bytes of a character begun in the previous read
        try:
            text = decoder.decode(block, final=not block)
        except UnicodeDecodeError as exc:
            raise _not_utf8(path, offset - buffered, exc, head) from None
        offset += len(block)
        if text or block:
            yield text, len(block)
        if not block:
            return


def _txt_documents(path: Path, *, whole: bool) -> Iterator[tuple[str, int]]:
    """A .txt file's paragraphs (split exactly as str.split(DOC_SEPARATOR) would), or the file as one document."""
    produced = False
    with open(path, "rb") as raw:
        if whole:
            parts, size = [], 0
            for text, n in _decoded_chunks(path, raw):
                parts.append(text)
                size += n
            document = "".join(parts)
            if not document.strip():
                raise DataError(f"{path} is empty; remove it from the corpus or put text in it")
            yield document, size
            return
        carry, pending = "", 0
        for text, n in _decoded_chunks(path, raw):
            pieces = (carry + text).split(DOC_SEPARATOR)
            carry, pending = pieces.pop(), pending + n
            for piece in pieces:
                produced = produced or bool(piece.strip())
                yield piece, pending
                pending = 0
        produced = produced or bool(carry.strip())
        if not produced:
            raise DataError(f"{path} is empty; give a file with text in it")
        yield carry, pending


def _document_field(record, field: str, where: str) -> str:
    if not isinstance(record, dict) or field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(
            f"{where} has no {field!r} field (it has {keys}); pass text_field= the field that holds the text"
        )
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is {type(value).__name__}, not text; pass text_field= a text field")
    return value


def _jsonl_documents(path: Path, field: str) -> Iterator[tuple[str, int]]:
    gzipped, produced = path.name.lower().endswith(".gz"), False
    try:
        with open(path, "rb") as file, gzip.open(file, "rb") if gzipped else file as raw:
            position, carry, line_no, pending = 0, b"", 0, 0
            while block := raw.read(READ_BYTES):
                lines = (carry + block).split(b"\n")
                carry = lines.pop()
                pending, position = (
                    pending + file.tell() - position,
                    file.tell(),
                )  # bytes of the file itself: the progress bar's unit
                for line in lines:
                    line_no += 1
                    if line.strip():
                        produced = True
                        yield _json_line(path, line, line_no, field), pending
                        pending = 0
            if carry.strip():
                produced = True
                yield _json_line(path, carry, line_no + 1, field), pending
    except (OSError, EOFError) as exc:  # a truncated or non-gzip .gz
        raise DataError(f"{path} could not be read ({exc}); is it a complete gzip file?") from None
    if not produced:
        raise DataError(f"{path} is empty; remove it from the corpus or put records in it")


def _json_line(path: Path, line: bytes, line_no: int, field: str) -> str:
    try:
        record = json.loads(line)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"line {line_no} of {path} is not UTF-8 (byte {line[exc.start]:#04x}); convert the file to UTF-8 first"
        ) from None
    except json.JSONDecodeError as exc:
        raise DataError(
            f"line {line_no} of {path} is not JSON ({exc.msg}); each line of a .jsonl file must be one JSON object"
        ) from None
    return _document_field(record, field, f"line {line_no} of {path}")


def _parquet_documents(path: Path, field: str) -> Iterator[tuple[str, int]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path} is Parquet, which needs pyarrow: `pip install pyarrow` (or labutils[parquet])"
        ) from None
    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid for a file that is not Parquet
        raise DataError(f"{path} is not a readable Parquet file ({exc})") from None
    columns = table.schema_arrow.names
    if field not in columns:
        raise DataError(
            f"{path} has no {field!r} column (it has {columns}); pass text_field= the column that holds the text"
        )
    rows, size, produced = max(table.metadata.num_rows, 1), path.stat().st_size, False
    for batch in table.iter_batches(batch_size=4096, columns=[field]):
        texts = batch.column(0).to_pylist()
        share = size * len(texts) // rows
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise DataError(
                    f"{path}: column {field!r} holds {type(text).__name__} values, not text; pass text_field= a text "
                    "column"
                )
            produced = True
            yield text, share if i == 0 else 0
    if not produced:
        raise DataError(f"{path} is empty; remove it from the corpus or put rows in it")
