"""labutils.data: corpora, tokenizers, prepared files, batches, and every bad input's error."""

import collections
import dataclasses
import functools
import http.server
import json
import threading

import pytest
from conftest import TEXT

from labutils import corpora, data
from labutils.corpora import download
from labutils.data import DataError
from labutils.files import sha256_file
from labutils.tokenizers import get_tokenizer, load_tokenizer

# --------------------------------------------------------------------------- corpora


def test_bundled_corpus_is_verified_and_split_into_paragraphs():
    corpus = data.load_corpus("tinyshakespeare")
    assert corpus.n_chars == 1_115_394
    assert corpus.sha256.startswith("86c4e6aa")
    assert corpus.text == (data.DATA_DIR / "tinyshakespeare.txt").read_text()
    assert corpus.documents[0] == "First Citizen:\nBefore we proceed any further, hear me speak."


def test_bundled_corpus_tampered_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "tinyshakespeare.txt"
    fake.write_text("not shakespeare")
    monkeypatch.setattr(corpora, "DATA_DIR", tmp_path)
    with pytest.raises(DataError, match="sha256"):
        data.load_corpus("tinyshakespeare")


def test_folder_corpus_one_document_per_file(tmp_path):
    (tmp_path / "b.txt").write_text("second doc")
    (tmp_path / "a.txt").write_text("first doc")
    (tmp_path / "ignored.md").write_text("not text corpus")
    corpus = data.load_corpus(tmp_path)
    assert corpus.documents == ["first doc", "second doc"]


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_corpus_is_refused(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(DataError, match="empty"):
        data.load_corpus(path)


def test_missing_corpus_names_the_options(tmp_path):
    with pytest.raises(DataError, match="not found.*bundled name"):
        data.load_corpus(tmp_path / "nope.txt")
    with pytest.raises(DataError, match=r"no corpus files \(.txt, .jsonl, .jsonl.gz, .parquet\)"):
        data.load_corpus(tmp_path)


def test_file_corpus_sha256_mismatch(small_corpus):
    with pytest.raises(DataError, match="sha256 mismatch"):
        data.load_corpus(small_corpus, sha256="0" * 64)


@pytest.fixture
def http_server(tmp_path):
    """A loopback HTTP server serving tmp_path/www, counting requests."""
    root = tmp_path / "www"
    root.mkdir()
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    # shutdown() waits for serve_forever's next poll: half a second of every test at the default interval
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root, hits
    server.shutdown()
    server.server_close()


def test_url_corpus_downloads_once_into_cache(http_server, tmp_path):
    base, root, hits = http_server
    (root / "corpus.txt").write_text(TEXT)
    cache = tmp_path / "cache"
    expected = sha256_file(root / "corpus.txt")
    first = download(f"{base}/corpus.txt", sha256=expected, cache_dir=cache, progress=False)
    second = download(f"{base}/corpus.txt", sha256=expected, cache_dir=cache, progress=False)
    assert first == second and first.parent == cache and first.read_text() == TEXT
    assert len(hits) == 1


def test_url_sha256_mismatch_leaves_no_file(http_server, tmp_path):
    base, root, _ = http_server
    (root / "corpus.txt").write_text(TEXT)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="sha256 mismatch"):
        download(f"{base}/corpus.txt", sha256="0" * 64, cache_dir=cache, progress=False)
    assert not [p for p in cache.iterdir() if not p.name.startswith(".")]


def test_url_failure_is_a_clear_error(http_server, tmp_path):
    base, _, _ = http_server
    with pytest.raises(DataError, match="could not download"):
        download(f"{base}/missing.txt", cache_dir=tmp_path / "cache", progress=False)


@pytest.mark.parametrize(
    "suffix", ["x.txt?name=../../evil.txt", "x.txt?/../../../evil.txt", "x.txt?a=/..", "x.txt?%2e%2e%2fevil"]
)
def test_url_cannot_write_outside_the_cache(http_server, tmp_path, suffix):
    base, root, _ = http_server
    (root / "x.txt").write_text("hello")
    cache = tmp_path / "cache"
    before = {p for p in tmp_path.rglob("*") if not p.is_relative_to(root)}
    path = download(f"{base}/{suffix}", cache_dir=cache, progress=False)
    assert path.resolve().parent == cache.resolve() and path.read_text() == "hello"
    created = {p for p in tmp_path.rglob("*") if not p.is_relative_to(root)} - before
    assert created == {cache, path}, created


def test_prepare_refuses_a_folder_that_is_not_prepared_data(small_corpus, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(data.DataError, match="not a prepared data folder"):
        data.prepare_data(small_corpus, "char", (0.8, 0.1, 0.1), precious)
    assert (precious / "notes.txt").read_text() == "keep me"


# --------------------------------------------------------------------------- tokenizers


def test_char_tokenizer_round_trip_and_save_load(tmp_path):
    tok = get_tokenizer("char", train_text=TEXT)
    assert tok.vocab_size == len(set(TEXT))
    assert tok.decode(tok.encode(TEXT)) == TEXT
    tok.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path)
    assert again.encode("Speak") == tok.encode("Speak")


def test_char_tokenizer_refuses_unknown_characters():
    tok = get_tokenizer("char", train_text="abc")
    with pytest.raises(DataError, match=r"\['z'\].*not in this char vocabulary; its 3 characters are 'abc'"):
        tok.encode("abz")


def test_byte_tokenizer_round_trip_unicode():
    tok = get_tokenizer("byte")
    text = "naïve — ✓"
    assert tok.vocab_size == 256 and tok.decode(tok.encode(text)) == text


def test_gpt2_tokenizer_offline():
    tok = get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eot_id == 50256 and tok.vocab_size == 50257
    assert tok.decode(tok.encode(TEXT)) == TEXT


def test_unknown_tokenizer_suggests_a_name():
    with pytest.raises(DataError, match="Did you mean 'char'"):
        get_tokenizer("chars")


def test_a_new_tokenizer_kind_is_one_registry_entry(monkeypatch, tmp_path, small_corpus):
    """A Tokenizer subclass in TOKENIZER_KINDS is all a new kind needs: by name, prepared data, saved and loaded."""
    from labutils import tokenizers
    from labutils.evaluation import describe_tokenizer

    class Shifted(tokenizers.ByteTokenizer):  # a toy kind: bytes, ids shifted by a named offset
        kind, takes_name, vocab_size = "shifted", True, 256 + 8

        def __init__(self, offset: int):
            self.offset = offset

        @classmethod
        def build(cls, name, train_text):
            return cls(int(name))

        @classmethod
        def from_spec(cls, spec):
            return cls(spec["offset"])

        def encode_array(self, text):
            return super().encode_array(text) + self.offset

        def encode(self, text):
            return self.encode_array(text).tolist()

        def decode(self, ids):
            return super().decode([int(i) - self.offset for i in ids])

        def spec(self):
            return {"kind": self.kind, "offset": self.offset}

    with pytest.raises(DataError, match="unknown tokenizer 'shifted:3'"):
        get_tokenizer("shifted:3")
    monkeypatch.setitem(tokenizers.TOKENIZER_KINDS, "shifted", Shifted)
    with pytest.raises(DataError, match="unknown tokenizer 'shifted'"):  # this kind needs its offset
        get_tokenizer("shifted")
    assert get_tokenizer("shifted:3").encode("a") == [ord("a") + 3]
    prepared = data.prepare_data(small_corpus, "shifted:3", out_dir=tmp_path / "prepared", progress=False)
    assert isinstance(prepared.tokenizer, Shifted) and prepared.tokenizer.offset == 3
    assert int(prepared.tokens("train").min()) >= 3
    assert describe_tokenizer(prepared.tokenizer.spec()) == "shifted"


def test_tiktoken_by_name_without_network_is_a_clear_error(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(DataError, match="needs the network"):
        get_tokenizer("tiktoken:cl100k_base")


# --------------------------------------------------------------------------- preparation


def test_prepare_splits_sizes_contiguous_no_overlap(small_corpus, tmp_path):
    prepared = data.prepare_data(small_corpus, "char", (0.8, 0.1, 0.1), tmp_path / "prep")
    meta, n = prepared.meta, len(TEXT)
    cuts = [0, int(n * 0.8), int(n * 0.9), n]
    for i, split in enumerate(data.SPLITS):
        decoded = prepared.tokenizer.decode(prepared.tokens(split))
        assert meta["tokens"][split] == len(decoded)  # char level: one token per character
        # each split is exactly its contiguous slice of the corpus (separators at the cuts dropped)
        assert decoded.strip("\n") == TEXT[cuts[i] : cuts[i + 1]].strip("\n")
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == len(set(TEXT[: cuts[1]]))
    assert json.loads((prepared.dir / "meta.json").read_text())["corpus"]["sha256"] == sha256_file(small_corpus)


def test_bundled_split_matches_nanogpt_train_boundary():
    prepared = data.prepare_data("tinyshakespeare", "char", (0.9, 0.05, 0.05))
    text = (data.DATA_DIR / "tinyshakespeare.txt").read_text()
    assert prepared.meta["tokens"]["train"] == int(len(text) * 0.9)
    val_start = prepared.tokenizer.decode(prepared.tokens("val")[:100])
    assert text[int(len(text) * 0.9) :].startswith(val_start)


def test_gpt2_uses_uint16_and_large_vocab_uses_uint32(small_corpus, tmp_path):
    prepared = data.prepare_data(small_corpus, "gpt2", (0.8, 0.1, 0.1), tmp_path / "g")
    assert prepared.meta["dtype"] == "uint16" and prepared.vocab_size == 50257
    assert prepared.tokenizer.decode(prepared.tokens("train")).startswith("First Citizen:")
    wide = tmp_path / "wide.txt"  # 70,000 distinct characters: ids past uint16
    wide.write_text(("".join(chr(i) for i in range(0x100, 0x100 + 72_100) if not 0xD800 <= i < 0xE000) + "\n") * 2)
    big = data.prepare_data(wide, "char", (0.9, 0.05, 0.05), tmp_path / "w")
    assert big.meta["dtype"] == "uint32" and big.vocab_size > 65_536
    assert big.tokens("train").max() > 65_535  # the large ids survive the round trip through the file


def test_prepare_reuses_and_rebuilds(small_corpus, tmp_path):
    out = tmp_path / "prep"
    first = data.prepare_data(small_corpus, "char", (0.8, 0.1, 0.1), out)
    mtime = (out / "train.bin").stat().st_mtime_ns
    data.prepare_data(small_corpus, "char", (0.8, 0.1, 0.1), out)
    assert (out / "train.bin").stat().st_mtime_ns == mtime  # same inputs: reused
    again = data.prepare_data(small_corpus, "char", (0.7, 0.2, 0.1), out)
    assert again.meta["tokens"]["train"] < first.meta["tokens"]["train"]  # changed inputs: rebuilt


@pytest.mark.parametrize(
    "splits, match",
    [
        ((0.9, 0.05), "three fractions"),
        ((0.9, 0.2, 0.1), "sum to 1"),
        ((-0.1, 0.6, 0.5), "non-negative"),
        ("abc", "three"),
    ],
)
def test_bad_split_fractions(small_corpus, tmp_path, splits, match):
    with pytest.raises(DataError, match=match):
        data.prepare_data(small_corpus, "char", splits, tmp_path / "p")


def test_failed_prepare_keeps_previous_files(small_corpus, tmp_path):
    out = tmp_path / "prep"
    data.prepare_data(small_corpus, "char", (0.8, 0.1, 0.1), out)
    before = (out / "train.bin").read_bytes()
    weird = tmp_path / "weird.txt"
    weird.write_text("abc\n\nxyz")  # val/test contain characters the train split lacks
    with pytest.raises(DataError, match="not in this char vocabulary"):
        data.prepare_data(weird, "char", (0.34, 0.33, 0.33), out)
    assert (out / "train.bin").read_bytes() == before
    assert data.load_prepared(out).meta["corpus"]["sha256"] == sha256_file(small_corpus)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prep")]


def test_truncated_token_file_is_detected(small_corpus, tmp_path):
    out = tmp_path / "prep"
    data.prepare_data(small_corpus, "char", (0.8, 0.1, 0.1), out)
    with open(out / "val.bin", "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(DataError, match="truncated"):
        data.load_prepared(out)


def test_split_stats_and_frequencies(prepared):
    stats = data.split_stats(prepared)
    assert list(stats.index) == ["train", "val", "test"]
    assert stats["tokens"].sum() == sum(prepared.meta["tokens"].values())
    if prepared.meta["tokenizer"]["kind"] == "char":  # a character a token, the separators between documents too
        assert (stats["chars_per_token"] == 1.0).all() and (stats["characters"] == stats["tokens"]).all()
    older = {**prepared.meta, "characters_include_separators": None}  # a meta.json written before the fix
    older["characters"] = {
        s: n - 2 * max(prepared.meta["documents"][s] - 1, 0) for s, n in prepared.meta["characters"].items()
    }
    assert (
        data.split_stats(dataclasses.replace(prepared, meta=older))["characters"].tolist()
        == stats["characters"].tolist()
    )
    freqs = data.token_frequencies(prepared)
    assert freqs["count"].sum() == prepared.meta["tokens"]["train"]
    assert freqs["count"].is_monotonic_decreasing
    train_text = prepared.tokenizer.decode(prepared.tokens("train"))
    char, count = collections.Counter(train_text).most_common(1)[0]
    assert (freqs.iloc[0]["token"], freqs.iloc[0]["count"]) == (char, count)


def test_gpt2_ranks_are_read_offline_without_a_global_cache(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where tiktoken's own loader would cache a copy
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    assert get_tokenizer("gpt2").encode("Hello world") == [15496, 995]
    assert not list(tmp_path.iterdir())  # nothing written outside the repo


def test_tampered_gpt2_ranks_are_refused(tmp_path, monkeypatch):
    from labutils import tokenizers

    copy = tmp_path / "r50k_base.tiktoken"
    copy.write_bytes((tokenizers.DATA_DIR / "r50k_base.tiktoken").read_bytes().replace(b" 995\n", b" 996\n", 1))
    monkeypatch.setattr(tokenizers, "DATA_DIR", tmp_path)
    with pytest.raises(data.DataError, match="has sha256 .* expected 306cd27f"):
        get_tokenizer("gpt2")
