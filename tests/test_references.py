"""The count-model references (labutils.references): Kneser-Ney against hand-computed values, normalisation, the windows
a run is scored on, GPT-2-sized vocabularies, and the regime verdict."""

import math

import numpy as np
import pytest

from labutils import references
from labutils.batches import eval_batches
from labutils.references import KneserNey
from labutils.validation import ConfigError


def test_a_bigram_kneser_ney_matches_the_hand_computed_probabilities():
    # bigrams of 0 1 0 1 0 2: (0,1) x2, (1,0) x2, (0,2) x1 -> D = n1 / (n1 + 2 n2) = 1 / 5; every unigram's continuation
    # count is 1 (D1 = 1), so the lower order is uniform: 1/3
    model = KneserNey.fit([0, 1, 0, 1, 0, 2], order=2, vocab_size=3)
    p_1_after_0 = (2 - 0.2) / 3 + 0.2 * 2 / 3 / 3
    p_0_after_1 = (2 - 0.2) / 2 + 0.2 * 1 / 2 / 3
    p_2_after_0 = (1 - 0.2) / 3 + 0.2 * 2 / 3 / 3
    logp = model.log_probs(np.array([[0, 1, 0, 2]]))
    np.testing.assert_allclose(np.exp(logp[0]), [p_1_after_0, p_0_after_1, p_2_after_0], rtol=1e-12)
    # a context never seen in training (2 is never followed) backs off to the lower order: uniform here
    np.testing.assert_allclose(np.exp(model.log_probs(np.array([[2, 0], [2, 1]]))), [[1 / 3], [1 / 3]], rtol=1e-12)


def test_a_unigram_is_discounted_counts_interpolated_with_a_uniform_guess():
    model = KneserNey.fit([0, 0, 0, 1], order=1, vocab_size=4)  # counts 3, 1: n1 = 1, n2 = 0 -> D = 1
    expected = [(3 - 1) / 4 + 1 * 2 / 4 / 4, (1 - 1) / 4 + 2 / 4 / 4, 2 / 4 / 4]  # ids 0, 1, 2 (2 and 3 never seen)
    np.testing.assert_allclose(np.exp(model.log_probs(np.array([[0, 0], [0, 1], [0, 2]])))[:, 0], expected, rtol=1e-12)


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_every_context_gets_a_distribution_that_sums_to_one(order):
    rng = np.random.default_rng(order)
    tokens = rng.integers(0, 6, size=400)
    tokens[100:160] = 3  # a run, so some contexts have one follower only
    model = KneserNey.fit(tokens, order, vocab_size=7)  # id 6 never occurs
    for context in ([1, 2, 3, 4], [3, 3, 3, 3], [6, 6, 0, 1], [5]):
        windows = np.array([[*context, token] for token in range(7)])
        assert np.exp(model.log_probs(windows)[:, -1]).sum() == pytest.approx(1.0, abs=1e-12)


def test_longer_contexts_win_on_text_with_structure_and_the_window_start_has_only_its_own_tokens():
    pattern = np.array([0, 1, 2, 3, 0, 1, 2, 4])  # after 0 1 2 comes 3 or 4, decided by what came three tokens before
    tokens = np.tile(pattern, 200)
    windows = np.tile(pattern, 4).reshape(-1, 8)[:, :8]
    losses = {order: -KneserNey.fit(tokens, order, 5).log_probs(windows).mean() for order in (1, 2, 5)}
    assert losses[5] < losses[2] < losses[1]
    # the first target of a window is predicted from one token: the 5-gram then equals its own bigram level
    five = KneserNey.fit(tokens, 5, 5).log_probs(windows)[:, 0]
    assert np.all(five < 0) and np.all(np.isfinite(five))


def test_the_references_score_exactly_the_windows_and_tokens_a_run_scores(prepared):
    split, block, n_tokens = "selection", 16, 200
    windows = references.window_tokens(prepared, split, block, n_tokens=n_tokens)
    x, y = (
        np.concatenate([b[i].numpy() for b in eval_batches(prepared.tokens(split), block, 7, n_tokens=n_tokens)])
        for i in (0, 1)
    )
    np.testing.assert_array_equal(windows[:, :-1], x)
    np.testing.assert_array_equal(windows[:, 1:], y)
    refs = references.reference_losses(prepared, split, block, n_tokens=n_tokens)
    assert refs["eval_tokens"] == math.ceil(n_tokens / block) * block
    assert refs["5-gram"] < refs["bigram"] < refs["unigram"] < math.log(prepared.vocab_size)
    # ASCII text: one character, one byte, so bits per byte are nats / ln 2
    assert refs["bigram_bpb"] == pytest.approx(refs["bigram"] / math.log(2))
    whole = references.reference_losses(prepared, "val", block)
    assert (
        whole["eval_tokens"] == (len(prepared.tokens("val")) - 1) // block * block and whole["windows"] == "whole split"
    )


def test_a_gpt2_sized_vocabulary_counts_exactly_and_a_capped_count_says_so():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50_257, size=5_000)
    tokens[-4:] = [50_256, 50_255, 50_256, 50_255]
    model = KneserNey.fit(tokens, 5, 50_257)  # k-gram numbers stay exact: no code overflows
    pair = model.log_probs(np.array([[50_256, 50_255]]))[0, 0]
    assert pair > math.log(0.1)  # seen twice after 50_256, against a vocabulary of 50k
    capped = KneserNey.fit(tokens, 2, 50_257, max_tokens=1_000)
    assert capped.capped and capped.counted_tokens == 1_000 and not model.capped
    with pytest.raises(ConfigError, match="token ids must lie in"):
        KneserNey.fit([0, 70_000], 2, 50_257)


def test_the_regime_verdict_follows_the_gap_to_the_bigram():
    refs = {"bigram": 2.5, "5-gram": 1.6}
    assert references.regime(2.2, refs)["margin_met"] and references.regime(2.2, refs)["comparable"]
    close = references.regime(2.45, refs)
    assert close["comparable"] and not close["margin_met"] and "less than the margin" in close["verdict"]
    short = references.regime(2.6, refs)
    assert not short["comparable"] and short["verdict"].startswith("too short to compare")
    assert references.regime(1.5, refs)["beats_5gram"]
