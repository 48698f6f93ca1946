"""Tokenizers behind one small interface: encode, decode, vocab_size, save / `load_tokenizer`.

`char` builds its vocabulary from training text, `byte` is UTF-8 bytes, `gpt2` is tiktoken's
GPT-2 BPE loaded offline from the bundled ranks file, `tiktoken:<name>` any other encoding, and
`hf:<folder>` the `tokenizer.json` of a Hugging Face checkpoint (a Llama-family model's own tokenizer),
`saved:<folder>` the tokenizer a labutils model was saved with.
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .files import DATA_DIR, atomic_write_json
from .validation import DataError

GPT2_RANKS = ("r50k_base.tiktoken", "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930")
# The GPT-2 pre-tokenisation pattern, as published with tiktoken's r50k_base/gpt2 encodings.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
ENDOFTEXT = "<|endoftext|>"


class Tokenizer:
    """The interface every tokenizer offers: encode, decode, vocab_size, save/load via `spec`."""

    kind: str = ""  # its key in TOKENIZER_KINDS and in its saved spec
    takes_name: bool = False  # named "<kind>:<name>" (a tiktoken encoding), not "<kind>"
    learns_vocabulary: bool = False  # built from the training split's text: preparation reads the corpus once for it
    vocab_size: int = 0
    eot_id: int | None = None  # end-of-text id, when the vocabulary has one

    @classmethod
    def build(cls, name: str | None, train_text: str | None) -> Tokenizer:
        """The tokenizer a name asks for (`name`: what follows "<kind>:", when `takes_name`)."""
        return cls()

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Tokenizer:
        """The tokenizer `spec()` saved."""
        return cls()

    @staticmethod
    def describe(spec: dict[str, Any]) -> str:
        """A saved spec in a few words, for error messages."""
        return " ".join(str(spec[k]) for k in ("kind", "name") if k in spec)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def token_bytes(self) -> np.ndarray:
        """The UTF-8 bytes of text each id stands for (0 for a special token, which stands for none): what turns
        a loss per token into bits per byte, one scale for every tokenizer."""
        return np.array([len(self.decode([i]).encode("utf-8")) for i in range(self.vocab_size)], dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Many documents at once, as (their ids back to back, each one's length): what streaming preparation
        calls, a chunk of documents at a time."""
        parts = [self.encode_array(t) for t in texts]
        return (np.concatenate(parts) if parts else np.zeros(0, np.int64)), np.array(
            [len(p) for p in parts], dtype=np.int64
        )

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.spec())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class CharTokenizer(Tokenizer):
    """One id per character, vocabulary built from training text (sorted, as nanoGPT does)."""

    kind = "char"
    learns_vocabulary = True

    @classmethod
    def build(cls, name: str | None, train_text: str | None) -> CharTokenizer:
        if train_text is None:
            raise DataError("the char tokenizer builds its vocabulary from training text: pass train_text")
        return cls.from_text(train_text)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> CharTokenizer:
        return cls(spec["chars"])

    @staticmethod
    def describe(spec: dict[str, Any]) -> str:
        return f"char ({len(spec.get('chars', []))} characters)"

    def __init__(self, chars: list[str]):
        if not chars:
            raise DataError("a char tokenizer needs at least one character; the training text is empty")
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)
        # A code-point lookup table makes encoding a 1 MB corpus a numpy gather instead of a Python loop.
        self._table = np.full(max(map(ord, self.chars)) + 1, -1, dtype=np.int64)
        self._table[[ord(c) for c in self.chars]] = np.arange(self.vocab_size)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    def encode_array(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.where(codes < len(self._table), self._table[np.minimum(codes, len(self._table) - 1)], -1)
        if (ids < 0).any():
            missing = sorted({text[i] for i in np.flatnonzero(ids < 0)[:1000]})
            raise DataError(
                f"characters {missing!r} are not in this char vocabulary; its {self.vocab_size} characters are "
                f"{''.join(self.chars)!r}. A trained model's vocabulary is fixed: replace or remove those characters "
                "(in a prompt, or in the text you fine-tune it on). When preparing a corpus, use tokenizer='byte' or "
                "'gpt2', or build the vocabulary from text that contains them"
            )
        return ids

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        # one gather over the joined chunk: a character is one code point, so the texts' lengths are the ids'
        return self.encode_array("".join(texts)), np.array([len(t) for t in texts], dtype=np.int64)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "chars": self.chars}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: 256 ids, never an unknown character."""

    kind = "byte"
    vocab_size = 256

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        return np.ones(self.vocab_size, dtype=np.int64)  # a lone byte of a multi-byte character decodes to U+FFFD


def _bundled_ranks() -> dict[bytes, int]:
    """The bundled GPT-2 BPE ranks, verified against their sha256.

    Read here rather than with tiktoken's loader, which copies files into a cache in the system's
    temp folder and would then trust that copy even after the bundled file changed.
    """
    path = DATA_DIR / GPT2_RANKS[0]
    if not path.exists():
        raise DataError(
            f"bundled GPT-2 ranks {path} are missing; restore them with `git checkout -- data/{GPT2_RANKS[0]}`"
        )
    raw = path.read_bytes()
    actual = hashlib.sha256(raw).hexdigest()
    if actual != GPT2_RANKS[1]:
        raise DataError(
            f"{path} has sha256 {actual}, expected {GPT2_RANKS[1]}; restore it with `git checkout -- "
            f"data/{GPT2_RANKS[0]}`"
        )
    # one "<base64 token> <rank>" pair per line: tiktoken's own file format
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in raw.splitlines() if line)}


class TiktokenTokenizer(Tokenizer):
    """A tiktoken BPE; 'gpt2' works offline from the bundled r50k_base ranks file."""

    kind = "tiktoken"
    takes_name = True

    @classmethod
    def build(cls, name: str | None, train_text: str | None) -> TiktokenTokenizer:
        return cls(name or "gpt2")

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> TiktokenTokenizer:
        return cls(spec["name"])

    def __init__(self, name: str = "gpt2"):
        import tiktoken

        self.name = name
        if name in ("gpt2", "r50k_base"):
            ranks = _bundled_ranks()
            self.encoding = tiktoken.Encoding(
                name=name,
                pat_str=GPT2_PATTERN,
                mergeable_ranks=ranks,
                special_tokens={ENDOFTEXT: 50256},
                explicit_n_vocab=50257,
            )
        else:
            try:
                self.encoding = tiktoken.get_encoding(name)
            except ValueError as exc:
                raise DataError(f"unknown tiktoken encoding {name!r} ({exc}); offline, only 'gpt2' works") from None
            except Exception as exc:  # network failures surface as requests/urllib errors
                raise DataError(
                    f"tiktoken encoding {name!r} could not be loaded ({type(exc).__name__}: {exc}); it needs the "
                    "network. "
                    "Use tokenizer='gpt2' (bundled, offline), 'char' or 'byte'"
                ) from None
        self.vocab_size = self.encoding.n_vocab
        self.eot_id = self.encoding.eot_token

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        # tiktoken's batch encoder spreads documents over threads (its Rust core releases the GIL)
        lists = self.encoding.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
        lengths = np.array([len(ids) for ids in lists], dtype=np.int64)
        # one pass over all ids into 4-byte ints: the cheapest way out of Python lists
        return np.fromiter(itertools.chain.from_iterable(lists), dtype=np.uint32, count=int(lengths.sum())), lengths

    def decode(self, ids) -> str:
        return self.encoding.decode([int(i) for i in ids])

    def token_bytes(self) -> np.ndarray:
        special = {self.encoding.encode_single_token(s) for s in self.encoding.special_tokens_set}

        def length(i: int) -> int:
            try:
                return 0 if i in special else len(self.encoding.decode_single_token_bytes(i))
            except KeyError:  # an id the encoding leaves unused
                return 0

        return np.array([length(i) for i in range(self.vocab_size)], dtype=np.int64)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name}


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table, which HF ByteLevel tokenizers share)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(shifted)}}


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (the `tokenizers` library): `hf:<checkpoint folder or the file itself>`.

    The saved spec holds the whole tokenizer.json, so prepared data and saved models do not depend on the folder.
    Text is encoded without the special tokens a chat or BOS template would add: documents are separated as
    preparation decides, as for every other kind.
    """

    kind = "hf"
    takes_name = True

    @classmethod
    def build(cls, name: str | None, train_text: str | None) -> HFTokenizer:
        path = Path(name or "").expanduser()
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise DataError(
                f"no tokenizer.json at {path}: pass a Hugging Face checkpoint folder that has one "
                "(GPT-2 folders: use tokenizer='gpt2', the same BPE, bundled)"
            )
        config = file.parent / "tokenizer_config.json"
        eos = json.loads(config.read_text()).get("eos_token") if config.is_file() else None
        return cls(
            file.read_text(), name=path.name or str(path), eos=eos.get("content") if isinstance(eos, dict) else eos
        )

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> HFTokenizer:
        return cls(spec["tokenizer"], name=spec["name"], eos=spec.get("eos"))

    def __init__(self, tokenizer_json: str, name: str, eos: str | None = None):
        try:
            from tokenizers import Tokenizer as Backend
        except ImportError:
            raise ImportError("tokenizer 'hf:...' needs the tokenizers library: pip install 'labutils[hf]'") from None
        self.tokenizer_json, self.name, self.eos = tokenizer_json, name, eos
        self.backend = Backend.from_str(tokenizer_json)
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        self.eot_id = self.backend.token_to_id(eos) if eos else None

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encodings = self.backend.encode_batch(texts, add_special_tokens=False)  # Rust threads, like tiktoken's
        lists = [e.ids for e in encodings]
        lengths = np.array([len(ids) for ids in lists], dtype=np.int64)
        return np.fromiter(itertools.chain.from_iterable(lists), dtype=np.uint32, count=int(lengths.sum())), lengths

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        """Bytes per piece, read from the vocabulary: decoding one id alone would drop a leading space (Metaspace)
        or turn a lone byte into U+FFFD."""
        spec = json.loads(self.tokenizer_json)
        special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(
            spec.get("decoder")
        )
        alphabet = _byte_level_alphabet()

        def length(i: int) -> int:
            piece = self.backend.id_to_token(i)
            if piece is None or i in special:
                return 0
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # byte fallback
                return 1
            if byte_level and all(ch in alphabet for ch in piece):
                return len(piece)
            return len(piece.replace("\u2581", " ").encode("utf-8"))  # Metaspace: the space marker is one byte

        return np.array([length(i) for i in range(self.vocab_size)], dtype=np.int64)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "eos": self.eos, "tokenizer": self.tokenizer_json}


class SavedTokenizer(Tokenizer):
    """The tokenizer a labutils model was saved with: `saved:<model folder>` gives back that very vocabulary (a char
    vocabulary included, which a new corpus would otherwise rebuild with other ids). Its spec is the saved kind's."""

    kind = "saved"
    takes_name = True

    @classmethod
    def build(cls, name: str | None, train_text: str | None) -> Tokenizer:
        return load_tokenizer(Path(name or "").expanduser())


# The tokenizer registry: a new kind is a Tokenizer subclass (kind, build, from_spec) and its entry here.
TOKENIZER_KINDS: dict[str, type[Tokenizer]] = {
    cls.kind: cls for cls in (CharTokenizer, ByteTokenizer, TiktokenTokenizer, HFTokenizer, SavedTokenizer)
}
ALIASES = {"gpt2": "tiktoken:gpt2", "r50k_base": "tiktoken:r50k_base"}  # bundled, so offline
# what error messages offer
TOKENIZERS = ("char", "byte", "gpt2", "tiktoken:<encoding name>", "hf:<checkpoint folder>", "saved:<model folder>")


def tokenizer_kind(name: str) -> tuple[type[Tokenizer], str | None]:
    """The registry entry a tokenizer name picks, and the name after "<kind>:" for kinds that take one."""
    if not isinstance(name, str) or not name:
        raise DataError(f"tokenizer must be a non-empty string, one of {TOKENIZERS}; got {name!r}")
    kind, _, rest = ALIASES.get(name, name).partition(":")
    cls = TOKENIZER_KINDS.get(kind)
    if cls is not None and cls.takes_name == bool(rest):
        return cls, rest or None
    choices = [k for k, c in TOKENIZER_KINDS.items() if not c.takes_name] + list(ALIASES)
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise DataError(f"unknown tokenizer {name!r}; choose one of {TOKENIZERS}.{hint}")


def get_tokenizer(name: str, train_text: str | None = None) -> Tokenizer:
    """Build a tokenizer by name: 'char' (needs `train_text`), 'byte', 'gpt2', or 'tiktoken:<encoding name>'."""
    cls, rest = tokenizer_kind(name)
    return cls.build(rest, train_text)


def tokenizer_from_spec(spec: dict[str, Any]) -> Tokenizer:
    cls = TOKENIZER_KINDS.get(spec.get("kind"))
    if cls is None:
        raise DataError(
            f"unknown tokenizer kind {spec.get('kind')!r} in tokenizer spec; expected one of "
            f"{', '.join(TOKENIZER_KINDS)}"
        )
    return cls.from_spec(spec)


def describe_tokenizer(spec: dict[str, Any]) -> str:
    cls = TOKENIZER_KINDS.get(spec.get("kind"), Tokenizer)
    return cls.describe(spec)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer saved with `Tokenizer.save` (a `tokenizer.json`, or a folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.exists():
        raise DataError(
            f"no tokenizer at {path}; prepare the data first (prepare_data) or pass the folder that holds "
            "tokenizer.json"
        )
    return tokenizer_from_spec(json.loads(path.read_text()))
