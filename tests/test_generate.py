"""Generation: cache == no cache, sampling filters, seeds, stop strings, streaming, CLI."""

import json
import sys
import types

import pytest
import torch

from labutils.checkpoints import save_model
from labutils.generate import generate, generate_tokens, main, sample_next, stream
from labutils.model import GPT, ModelConfig
from labutils.validation import DataError

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,!?\n"


class CharTokenizer:
    """Just enough tokenizer for the tests: one id per character of ALPHABET."""

    vocab_size = len(ALPHABET)

    def encode(self, text: str) -> list[int]:
        return [ALPHABET.index(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(ALPHABET[i] for i in ids)

    def save(self, path) -> None:
        with open(path, "w") as fh:
            json.dump({"alphabet": ALPHABET}, fh)


def build(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    # Untied, larger init: an untrained tiny model then varies its greedy output instead of repeating.
    cfg = dict(
        vocab_size=len(ALPHABET),
        block_size=16,
        d_model=32,
        n_layer=2,
        n_head=4,
        tie_weights=False,
        init_std=0.2,
        **overrides,
    )
    return GPT(ModelConfig(**cfg)).eval()


KINDS = {
    "mha": dict(),
    "gqa": dict(attention="gqa", n_kv_head=2, pos="rope"),
    "mqa": dict(attention="mqa", pos="rope"),
    "mla": dict(attention="mla", q_rank=8, kv_rank=12, pos="rope"),
    "mla-learned": dict(attention="mla"),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_greedy_with_cache_equals_without_token_for_token(kind):
    model = build(**KINDS[kind])
    prompt = CharTokenizer().encode("hello there")
    # 30 new tokens from an 11-token prompt run past block_size=16, so the context window slides.
    cached = list(generate_tokens(model, prompt, 30, temperature=0, use_cache=True))
    uncached = list(generate_tokens(model, prompt, 30, temperature=0, use_cache=False))
    assert cached == uncached
    assert len(set(cached)) > 2  # not a degenerate repetition


def test_sampling_with_cache_equals_without_for_the_same_seed():
    model = build(pos="rope")
    prompt = CharTokenizer().encode("abc")
    a = list(generate_tokens(model, prompt, 20, temperature=1.0, seed=7, use_cache=True))
    b = list(generate_tokens(model, prompt, 20, temperature=1.0, seed=7, use_cache=False))
    assert a == b


def test_seed_makes_sampling_reproducible():
    model, tok = build(), CharTokenizer()
    first = generate(model, tok, "abc", max_new_tokens=20, temperature=1.5, seed=1)
    assert generate(model, tok, "abc", max_new_tokens=20, temperature=1.5, seed=1) == first
    assert generate(model, tok, "abc", max_new_tokens=20, temperature=1.5, seed=2) != first
    assert len(first) == 20


def test_top_k_1_and_tiny_top_p_are_greedy():
    model, tok = build(), CharTokenizer()
    greedy = generate(model, tok, "abc", max_new_tokens=12, temperature=0)
    assert generate(model, tok, "abc", max_new_tokens=12, temperature=2.0, top_k=1, seed=3) == greedy
    assert generate(model, tok, "abc", max_new_tokens=12, temperature=2.0, top_p=1e-6, seed=3) == greedy


def test_sample_next_filters():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    gen = torch.Generator().manual_seed(0)
    assert sample_next(logits, temperature=0).item() == 1
    top_k = {sample_next(logits, top_k=2, generator=gen).item() for _ in range(200)}
    assert top_k == {1, 3}
    # Sorted probabilities 0.5, 0.3, 0.15, 0.05: 0.5 + 0.3 reaches top_p=0.7, so only those two remain.
    top_p = {sample_next(logits, top_p=0.7, generator=gen).item() for _ in range(200)}
    assert top_p == {1, 3}
    everything = {sample_next(logits, generator=gen).item() for _ in range(400)}
    assert everything == {0, 1, 2, 3}


def test_stop_strings_cut_the_completion_and_stream_holds_them_back():
    model, tok = build(), CharTokenizer()
    full = generate(model, tok, "the ", max_new_tokens=24, temperature=0)
    stop = full[10:12]
    cut = full[: full.find(stop)]
    assert generate(model, tok, "the ", max_new_tokens=24, temperature=0, stop=[stop, "never"]) == cut
    pieces = list(stream(model, tok, "the ", max_new_tokens=24, temperature=0, stop=stop))
    assert "".join(pieces) == cut
    assert len(pieces) > 1  # it streams
    assert all(stop not in piece for piece in pieces)
    assert "".join(stream(model, tok, "the ", max_new_tokens=24, temperature=0)) == full


def test_generation_ends_at_the_end_of_text_token():
    model, tok = build(), CharTokenizer()
    full = generate(model, tok, "the ", max_new_tokens=24, temperature=0)
    tok.eot_id = ALPHABET.index(full[6])
    assert generate(model, tok, "the ", max_new_tokens=24, temperature=0) == full[: full.index(full[6])]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="no tokens"):
        generate(build(), CharTokenizer(), "", max_new_tokens=3)
    with pytest.raises(ValueError, match="temperature >= 0"):
        generate(build(), CharTokenizer(), "ab", max_new_tokens=3, temperature=-1.0)
    with pytest.raises(ValueError, match="0 < top_p <= 1"):
        generate(build(), CharTokenizer(), "ab", max_new_tokens=3, top_p=0.0)


def test_generation_restores_training_mode():
    model = build(dropout=0.1).train()
    generate(model, CharTokenizer(), "ab", max_new_tokens=3, temperature=0)
    assert model.training


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    model = build(pos="rope")
    save_model(model, tmp_path / "ckpt", tokenizer=CharTokenizer())
    # The CLI imports labutils.tokenizers.load_tokenizer lazily; stand in for it with the test tokenizer.
    fake = types.ModuleType("labutils.tokenizers")
    fake.load_tokenizer = lambda path: CharTokenizer()
    monkeypatch.setitem(sys.modules, "labutils.tokenizers", fake)
    return model, tmp_path / "ckpt"


def test_cli_completes_a_prompt(checkpoint, capsys):
    model, path = checkpoint
    main(["--checkpoint", str(path), "--prompt", "abc", "--max-new-tokens", "10", "--temperature", "0"])
    expected = generate(model, CharTokenizer(), "abc", max_new_tokens=10, temperature=0)
    assert capsys.readouterr().out == expected + "\n"


def test_cli_without_its_weights_says_what_rebuilds_them(checkpoint, capsys):
    """As in a fresh clone where the weights were too large to commit: an error that names the fix, no traceback."""
    _, path = checkpoint
    (path / "model.pt").unlink()
    with pytest.raises(SystemExit) as exit_:
        main(["--checkpoint", str(path), "--prompt", "abc"])
    err = capsys.readouterr().err
    assert (
        exit_.value.code == 2
        and "model.pt is listed in the manifest but missing" in err
        and "FORCE=1 make pipeline" in err
    )
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "args, says",
    [
        (["--prompt", ""], "--prompt is empty"),
        (["--prompt", "a", "--temperature", "-1"], "argument --temperature: expected a temperature >= 0"),
        (["--prompt", "a", "--top-p", "2"], "argument --top-p: expected a probability in (0, 1], got 2"),
        (["--prompt", "a", "--top-k", "0"], "argument --top-k: expected a whole number >= 1"),
        (["--prompt", "a", "--max-new-tokens", "100000"], "expected a whole number from 1 to 20,000, got 100000"),
        (["--prompt", "a", "--max-new-tokens", "ten"], "expected a whole number from 1 to 20,000, got 'ten'"),
    ],
)
def test_cli_refuses_bad_values_with_what_is_allowed(checkpoint, capsys, args, says):
    _, path = checkpoint
    with pytest.raises(SystemExit) as exit_:
        main(["--checkpoint", str(path), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and says in err and "Traceback" not in err


def test_cli_on_a_folder_that_does_not_exist_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--checkpoint", str(tmp_path / "nowhere"), "--prompt", "a"])
    err = capsys.readouterr().err
    assert (
        exit_.value.code == 2
        and f"no such folder: {tmp_path / 'nowhere'}" in err
        and "manifest" not in err.split(".")[0]
    )


def test_cli_warns_before_a_long_generation(checkpoint, capsys):
    _, path = checkpoint
    main(["--checkpoint", str(path), "--prompt", "a", "--max-new-tokens", "2001", "--temperature", "0"])
    assert "warning: 2,001 new tokens take a while" in capsys.readouterr().err


def test_a_character_outside_a_checkpoints_vocabulary_names_its_characters_and_a_fix_that_applies(tmp_path, capsys):
    """A char model's vocabulary is fixed: the error lists what it holds and does not suggest another tokenizer as
    the fix (issue 48)."""
    from labutils.tokenizers import CharTokenizer as Chars

    tokenizer = Chars(list("abc \n"))
    with pytest.raises(DataError) as error:
        tokenizer.encode("abz")
    message = str(error.value)
    assert "['z'] are not in this char vocabulary; its 5 characters are 'abc \\n'" in message
    assert "A trained model's vocabulary is fixed: replace or remove those characters" in message


def test_small_weights_ship_and_large_ones_are_ignored_by_git(checkpoint):
    from labutils import stage_folders

    _, path = checkpoint
    assert stage_folders.ship_weights(path) and not (path / ".gitignore").exists()
    assert not stage_folders.ship_weights(path, limit=100)
    assert (path / ".gitignore").read_text().splitlines()[-1] == "model.pt"
    assert stage_folders.ship_weights(path) and not (path / ".gitignore").exists()  # small again: shipped again


def test_cli_interactive_loop(checkpoint, capsys, monkeypatch):
    model, path = checkpoint
    answers = iter(["abc", "xyz", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    main(["--checkpoint", str(path), "--max-new-tokens", "5", "--temperature", "0"])
    tok = CharTokenizer()
    expected = "".join(generate(model, tok, p, max_new_tokens=5, temperature=0) + "\n" for p in ("abc", "xyz"))
    assert capsys.readouterr().out == expected


def test_cli_as_a_process_with_a_real_tokenizer(tmp_path):
    """`python -m labutils.generate --checkpoint … --prompt …` on a saved model with a real char vocabulary."""
    import subprocess

    from labutils.checkpoints import load_model
    from labutils.files import REPO_ROOT
    from labutils.tokenizers import CharTokenizer as RealCharTokenizer

    tok = RealCharTokenizer(list(ALPHABET))
    save_model(build(pos="rope"), tmp_path / "ckpt", tokenizer=tok)
    cmd = [
        sys.executable,
        "-m",
        "labutils.generate",
        "--checkpoint",
        str(tmp_path / "ckpt"),
        "--prompt",
        "abc",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
    ]
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    expected = generate(load_model(tmp_path / "ckpt"), tok, "abc", max_new_tokens=12, temperature=0)
    assert out.stdout == expected + "\n" and len(expected) > 0  # the completion, decoded through tokenizer.json


def test_each_report_prompt_samples_from_its_own_stream():
    """Prompt i samples with seed + i, so each completion is reproducible alone and no two share their random draws
    (with one stream, 05's report completed "ROMEO:" and "First Citizen:" with the same text after a few words)."""
    from labutils.generate import sample_table

    model = build()
    table = sample_table(model, CharTokenizer(), ["ab", "cd"], max_new_tokens=40, temperature=1.0, top_k=None, seed=3)
    first, second = table["completion"]
    assert first == generate(model, CharTokenizer(), "ab", 40, temperature=1.0, seed=3)
    assert second == generate(model, CharTokenizer(), "cd", 40, temperature=1.0, seed=4)
    assert first[-20:] != second[-20:]
