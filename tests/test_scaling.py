"""Scaling-law fits on losses drawn from a known law: the fitters recover it, approach 2 and approach 3 agree,
the bootstrap intervals cover at about their nominal rate; bits per byte put tokenizers on one axis."""
import math

import numpy as np
import pandas as pd
import pytest

from labutils import scaling
from labutils.errors import ConfigError
from labutils.evaluation import bits_per_byte
from labutils.tokenizers import get_tokenizer

# Hoffmann et al.'s fitted law, in nats per token
LAW = scaling.ParametricFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
BUDGETS = (1e15, 4e15, 1.6e16, 6.4e16)


def true_optimum(compute: float) -> float:
    """N_opt of LAW at `compute` when a token costs 6N FLOPs: G (C/6)^(beta/(alpha+beta))."""
    g = (LAW.alpha * LAW.A / (LAW.beta * LAW.B)) ** (1 / (LAW.alpha + LAW.beta))
    return g * (compute / 6) ** (LAW.beta / (LAW.alpha + LAW.beta))


def sweep(rng, noise: float = 0.005, sizes: int = 9) -> pd.DataFrame:
    """Each budget's sizes from 1/8 to 8 times its optimum, each on C / 6N tokens, the loss off the law by `noise`."""
    rows = []
    for compute in BUDGETS:
        for n in true_optimum(compute) * np.geomspace(1 / 8, 8, sizes):
            tokens = compute / (6 * n)
            rows.append({"compute": compute, "params": n, "tokens": tokens,
                         "loss": float(LAW.loss(n, tokens)) * math.exp(rng.normal(0, noise))})
    return pd.DataFrame(rows)


def test_the_parametric_fit_recovers_the_law_it_was_drawn_from():
    fit = scaling.parametric_fit(sweep(np.random.default_rng(0)))
    assert fit.alpha == pytest.approx(LAW.alpha, abs=0.03) and fit.beta == pytest.approx(LAW.beta, abs=0.03)
    assert fit.E == pytest.approx(LAW.E, rel=0.05)
    # and predicts past the budgets it saw: 16x the largest, at that budget's optimum
    n = true_optimum(16 * BUDGETS[-1])
    assert fit.loss(n, 16 * BUDGETS[-1] / (6 * n)) == pytest.approx(LAW.loss(n, 16 * BUDGETS[-1] / (6 * n)), rel=0.01)


def test_isoflop_and_parametric_fits_agree_on_the_compute_optimal_size():
    runs = sweep(np.random.default_rng(1))
    iso, fit = scaling.isoflop_fit(runs), scaling.parametric_fit(runs)
    assert iso.curves["bracketed"].all()
    assert iso.a == pytest.approx(LAW.beta / (LAW.alpha + LAW.beta), abs=0.03)
    assert iso.a + iso.b == pytest.approx(1.0, abs=1e-9)  # D = C / 6N at every size, so N_opt * D_opt is C / 6
    candidates = pd.DataFrame({"params": np.geomspace(1e5, 1e9, 600)}).assign(flops_per_token=lambda f: 6 * f["params"])
    for compute in (BUDGETS[0], BUDGETS[-1], 4 * BUDGETS[-1]):
        parametric = scaling.compute_optimal(fit, compute, candidates)
        assert parametric["tokens"] == pytest.approx(compute / (6 * parametric["params"]))
        for n_opt in (parametric["params"], float(iso.n_opt(compute))):
            assert n_opt == pytest.approx(true_optimum(compute), rel=0.15), compute


def test_bootstrap_intervals_cover_the_true_exponent_at_about_their_nominal_rate():
    """24 independent sweeps, each with its own 95% interval for the IsoFLOP exponent a: about 23 should hold the
    true value. Intervals far too narrow (resamples that leave out the noise, say) cover almost none."""
    truth, covered, widths = LAW.beta / (LAW.alpha + LAW.beta), 0, []
    for draw in range(24):
        runs = sweep(np.random.default_rng(100 + draw), noise=0.01, sizes=7)
        samples = scaling.bootstrap(runs, lambda r: {"a": scaling.isoflop_fit(r).a}, n_boot=50, seed=draw)
        low, high = scaling.intervals(samples).loc["a", ["low", "high"]]
        covered += scaling.inside(truth, low, high) == "inside"
        widths.append(high - low)
    assert 0.75 <= covered / 24 <= 1.0, covered
    assert 0.005 < np.median(widths) < 0.3


def test_the_parametric_bootstrap_starts_from_the_fit_and_brackets_it():
    runs = sweep(np.random.default_rng(2))
    fit = scaling.parametric_fit(runs)
    samples = scaling.bootstrap(runs, lambda r: vars(scaling.parametric_fit(r, starts=0, init=fit)), n_boot=30)
    table = scaling.intervals(samples)
    assert list(table.index) == ["E", "A", "B", "alpha", "beta"] and (table["resamples"] == 30).all()
    assert (table["low"] < table["high"]).all()
    for name in ("E", "alpha", "beta"):
        assert table.loc[name, "low"] <= getattr(fit, name) <= table.loc[name, "high"], name


def test_a_budget_whose_minimum_the_sizes_miss_is_not_used_and_two_are_needed():
    runs = sweep(np.random.default_rng(3))
    too_small = runs[(runs["compute"] != BUDGETS[0]) | (runs["params"] < true_optimum(BUDGETS[0]) / 2)]  # the loss still falls
    iso = scaling.isoflop_fit(too_small)
    assert iso.curves.set_index("compute")["bracketed"].to_dict() == {BUDGETS[0]: False, **{c: True for c in BUDGETS[1:]}}
    with pytest.raises(ConfigError, match="1 of 2 budgets have their loss minimum within the sizes tried"):
        scaling.isoflop_fit(too_small[too_small["compute"] <= BUDGETS[1]])
    with pytest.raises(ConfigError, match="a parabola needs 3"):
        scaling.isoflop_fit(runs.groupby("compute").head(2))
    with pytest.raises(ConfigError, match="missing tokens"):
        scaling.isoflop_fit(runs.drop(columns="tokens"))


def test_a_model_as_good_per_byte_has_the_same_bits_per_byte_under_every_tokenizer():
    """A model that gives every byte probability 1/4: per token it loses ln 4 per byte the token holds, so its
    nats per token differ by tokenizer on text with multi-byte characters, but its bits per byte are 2 for all."""
    text = "Ô Roméo, Roméo! wherefore art thou Roméo? — 你好 " * 20
    n_bytes = len(text.encode("utf-8"))
    per_token = {}
    for name in ("char", "byte", "gpt2"):
        tokens = len(get_tokenizer(name, train_text=text).encode(text))
        per_token[name] = math.log(4) * n_bytes / tokens
        assert bits_per_byte(per_token[name], tokens, n_bytes) == pytest.approx(2.0)
    assert len(set(np.round(list(per_token.values()), 6))) == 3  # three scales of nats per token, one of bits per byte
    with pytest.raises(ConfigError, match="above 0"):
        bits_per_byte(1.0, 0, n_bytes)


def test_runs_past_four_epochs_are_marked_as_repeated_data():
    runs = pd.DataFrame({"compute": [1.0] * 3, "params": [1.0] * 3, "tokens": [1e6, 4e6, 5e6], "loss": [1.0] * 3})
    marked = scaling.mark_repetition(runs, train_tokens=1_000_000)
    assert marked["epochs"].tolist() == [1.0, 4.0, 5.0] and marked["repeated"].tolist() == [False, False, True]


def test_every_sweep_run_gets_the_compute_it_claims_by_the_models_own_flop_counter():
    from labutils.model import GPT, ModelConfig

    base = ModelConfig(vocab_size=65, block_size=64, d_model=64, n_layer=2, n_head=4, attention="gqa", n_kv_head=2)
    ladder = scaling.size_ladder(base, [1, 2, 4])
    assert [(m.n_layer, m.d_model, m.n_head, m.n_kv_head) for m in ladder] == [(1, 32, 2, 1), (2, 64, 4, 2), (4, 128, 8, 4)]
    plan = scaling.sweep_plan([2e10, 2e11], ladder, tokens_per_step=8 * 64)
    assert set(plan["budget"]) == {2e10, 2e11} and len(plan) < 6  # the largest model has too few steps at 2e10
    for row in plan.itertuples():
        model = GPT(ladder[row.model])  # a real model, not the meta-device shape the plan counted on
        assert row.params == model.num_params() and row.compute == pytest.approx(model.flops_per_token() * row.tokens, rel=1e-12)
        assert row.compute == pytest.approx(row.budget, rel=0.05) and row.tokens == row.steps * 8 * 64
    with pytest.raises(ConfigError, match="not a whole number of 16-wide heads"):
        scaling.size_ladder(base, [1], aspect=24)
    with pytest.raises(ConfigError, match="no model trains 10 steps"):
        scaling.sweep_plan([1e6], ladder, tokens_per_step=512)


@pytest.mark.parametrize("name", ["char", "byte", "gpt2"])
def test_evaluation_reports_bits_per_byte_of_the_text_its_counted_targets_stand_for(name):
    import torch

    from labutils.batches import IGNORE_INDEX
    from labutils.evaluation import evaluate_batches
    from labutils.model import GPT, ModelConfig

    text = "Ô Roméo, Roméo! wherefore art thou Roméo? — 你好, ça va. " * 6
    tok = get_tokenizer(name, train_text=text)
    ids = torch.tensor(tok.encode(text))
    block = 16
    windows = len(ids[:-1]) // block
    x = ids[: windows * block].view(windows, block)
    y = ids[1: windows * block + 1].view(windows, block).clone()
    y[0, :5] = IGNORE_INDEX  # padding, as document batches have: neither its loss nor its bytes count
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=block, d_model=32, n_layer=1, n_head=2))
    out = evaluate_batches(model, [(x[:2], y[:2]), (x[2:], y[2:])], token_bytes=torch.as_tensor(tok.token_bytes()))
    counted = y[y != IGNORE_INDEX].tolist()
    # the raw bytes the targets stand for (a window may cut a character: decoding to str would replace its part)
    raw = {"char": lambda ids: tok.decode(ids).encode("utf-8"), "byte": bytes, "gpt2": lambda ids: tok.encoding.decode_bytes(ids)}
    text_bytes = len(raw[name](counted))
    assert out["tokens"] == len(counted)
    assert out["bpb"] == pytest.approx(out["loss"] / math.log(2) * len(counted) / text_bytes, rel=1e-9)
    assert out["bpb"] == pytest.approx(bits_per_byte(out["loss"], len(counted), text_bytes), rel=1e-9)
    if name != "byte":  # multi-byte characters: fewer tokens than bytes
        assert len(counted) < text_bytes
