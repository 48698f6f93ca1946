"""Shared fixtures: a GPT that misbehaves on demand, for tests that inject faults into training; a free port;
a marker to wait for every process a killed command left (its notebook kernel); train() on the loose spellings
tests write; a small text corpus and its char-level preparation; a Hugging Face tokenizer trained on it."""

import json
import os
import socket
import time
import uuid
from pathlib import Path

import pytest
import torch

from labutils import training as train_mod
from labutils.config import RunConfig
from labutils.data import as_prepared, prepare_data
from labutils.model import GPT

# The longest files first (--durations=0 on 2026-12-08, summed per file): `make test` gives each worker whole files,
# so a long file started last would run alone at the end while the other worker idles. (The Makefile passes
# --no-loadscope-reorder: otherwise pytest-xdist orders files by their number of tests, not by this.)
LONGEST_FIRST = (
    "test_notebooks.py",
    "test_scale_out.py",
    "test_gpu_kit.py",
    "test_scaling.py",
    "test_reliability.py",
    "test_tuning.py",
    "test_pipeline.py",
    "test_notebook_parameters.py",
    "test_train.py",
    "test_stop.py",
    "test_tracking.py",
    "test_studies.py",
    "test_readme.py",
    "test_reports.py",
    "test_generate.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: tests keep their order within a file


class Hooked(GPT):
    """GPT that misbehaves from its `at`-th training forward on (only that one when `once`):
    `action(loss)` returns the loss to use, or raises."""

    calls, at, action, once = 0, None, None, False

    def forward(self, idx, targets=None, **kwargs):
        logits, loss = super().forward(idx, targets, **kwargs)
        if self.training:
            Hooked.calls += 1
            if Hooked.at is not None and (Hooked.calls == Hooked.at or (not Hooked.once and Hooked.calls > Hooked.at)):
                loss = Hooked.action(loss)
        return logits, loss


@pytest.fixture
def hooked(monkeypatch):
    Hooked.calls, Hooked.at, Hooked.action, Hooked.once = 0, None, None, False
    monkeypatch.setattr(train_mod, "GPT", Hooked)
    return Hooked


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared machine oversubscribed threads are 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_blas_thread():
    """Fits of a few dozen points gain nothing from BLAS threads, and lose several-fold beside another test's
    processes."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # not installed: the test runs all the same, at the machine's threads
        yield
        return
    with threadpool_limits(1):
        yield


def marked_environment(env: dict | None = None) -> tuple[dict, str]:
    """A process environment with a marker of its own, which every process started from it inherits (a notebook
    kernel in a session of its own included), so `wait_until_ended` can find them all."""
    marker = uuid.uuid4().hex
    return {**(os.environ if env is None else env), "LABUTILS_TEST_MARKER": marker}, marker


def kill_marked(marker: str) -> None:
    """SIGKILL every process with this marker at once, in whatever session it runs (a power cut, an OOM kill of the
    job, a scheduler killing a job's cgroup): nothing it started gets to finish another step."""
    import psutil

    for process in psutil.process_iter():
        try:
            if process.environ().get("LABUTILS_TEST_MARKER") == marker:
                process.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass


def wait_until_ended(marker: str, timeout: float = 30.0) -> None:
    """Wait until no process with this marker in its environment is left (after a kill: a kernel in its own
    session ends itself once it notices its parent is gone, about a second later)."""
    import psutil

    def alive() -> list[list[str]]:
        """The command lines of the marked processes still running (read now: a process may end any moment)."""
        found = []
        for process in psutil.process_iter():
            try:
                if process.environ().get("LABUTILS_TEST_MARKER") == marker and process.status() != psutil.STATUS_ZOMBIE:
                    found.append(process.cmdline()[:3])
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return found

    deadline = time.monotonic() + timeout
    while left := alive():
        assert time.monotonic() < deadline, f"still running {timeout:.0f} s after the kill: {left}"
        time.sleep(0.1)


def free_port() -> int:
    """A TCP port nothing listens on now (for a rendezvous or a database server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_with(model, train_cfg, data, out_dir, **kwargs):
    """train() from a model preset or field mapping and a TrainConfig or mapping, the way tests write them;
    the library's own callers hand it a RunConfig and PreparedData."""
    data = as_prepared(data) if isinstance(data, (str, Path)) else data
    return train_mod.train(RunConfig.build(model, train_cfg, data.vocab_size), data, out_dir, **kwargs)


TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n" * 40


@pytest.fixture
def small_corpus(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture
def prepared(small_corpus, tmp_path):
    """small_corpus prepared char-level, 80/10/10 (test files with their own corpora define their own `prepared`)."""
    return prepare_data(small_corpus, "char", (0.8, 0.1, 0.1), tmp_path / "prep")


def save_hf_tokenizer(folder, kind: str):
    """A small BPE trained here, saved the way a Llama-family checkpoint ships it (tokenizer.json + its config)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if kind == "metaspace":  # Llama 2 / SentencePiece style: a space marker, and bytes for characters it never saw
        tok = Tokenizer(models.BPE(byte_fallback=True))
        tok.pre_tokenizer, tok.decoder = (
            pre_tokenizers.Metaspace(),
            decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(), decoders.Fuse()]),
        )
        byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
        tok.train_from_iterator(
            [TEXT], trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", *byte_pieces])
        )
        spec = json.loads(tok.to_str())  # as Llama ships it: the byte pieces in the vocabulary, not special tokens
        spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in byte_pieces]
        tok = Tokenizer.from_str(json.dumps(spec))
    else:  # Llama 3 / GPT-2 style: byte-level
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        tok.train_from_iterator(
            [TEXT],
            trainers.BpeTrainer(
                vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
            ),
        )
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token="<s>").save_pretrained(
        folder
    )
    return folder
