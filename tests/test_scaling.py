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
        parametric = scaling.recommend(fit, candidates, compute=compute)
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


def sweep_base(vocab_size: int = 65):
    from labutils.config import RunConfig

    model = {"preset": "final-char", "d_model": 64, "n_layer": 2, "n_head": 2, "n_kv_head": 1, "block_size": 16}
    train = {"device": "cpu", "batch_size": 4, "max_steps": 20, "eval_batches": 2, "log_interval": 5, "lr": 3e-3, "warmup_steps": 2}
    return RunConfig.build(model, train, vocab_size)


def test_every_sweep_run_gets_the_compute_it_claims_by_the_models_own_flop_counter():
    from labutils.model import GPT, ModelConfig

    base = ModelConfig(vocab_size=65, block_size=64, d_model=64, n_layer=2, n_head=4, attention="gqa", n_kv_head=2)
    ladder = scaling.size_ladder(base, [1, 2, 4, 6])
    assert [(m.n_layer, m.d_model, m.n_head, m.n_kv_head) for m in ladder] == [(1, 32, 2, 1), (2, 64, 4, 2), (4, 128, 8, 4),
                                                                                (6, 192, 12, 6)]
    config = sweep_base()
    sweep = scaling.Sweep(budgets=(5e8, 1.5e9), depths=(1, 2, 3, 6), head_dim=32, min_steps=4)
    studies = scaling.sweep_studies(config, sweep)
    assert list(studies) == ["c0", "c1", "lr_check"] and "L6_d192" not in studies["c0"].variants  # too few steps at 5e8
    per_step = 4 * 16
    for name, study in studies.items():
        for variant in study.variants:
            run = study.run_config(variant, 0)
            model = GPT(run.model)  # a real model, not the meta-device shape the plan counted on
            steps = run.train.max_tokens / per_step
            assert steps == int(steps) and steps >= (1 if name == "lr_check" else sweep.min_steps)
            # the whole steps nearest to the budget: within half a step, so within 5% at 10 steps or more
            assert abs(model.flops_per_token() * run.train.max_tokens - study.compute) <= 0.5 * model.flops_per_token() * per_step
            multiplier = float(variant.rsplit("_lr", 1)[1]) if name == "lr_check" else 1.0
            assert run.train.lr == pytest.approx(multiplier * 3e-3 * 64 / run.model.d_model)  # the 1 / width rule
            assert run.train.eval_tokens == 2 * 4 * 16 and run.train.eval_split == "val"  # one evaluation set for all
    assert set(studies["lr_check"].variants) == {f"{s}_lr{x:g}" for s in ("L1_d32", "L6_d192") for x in (0.5, 1, 2)}
    assert studies["lr_check"].seeds == [scaling.CHECK_FIRST_SEED] and studies["c0"].seeds == [0]  # the check's seeds held out
    # the LR fit: the smallest budget's smallest and largest size, multiples of the 1 / width rule; then the fitted exponent
    fit = scaling.lr_fit_study(config, sweep)
    assert fit.compute == 5e8 and set(fit.variants) == {f"{s}_lr{x:g}" for s in ("L1_d32", "L3_d96") for x in (0.25, 0.5, 1, 2, 4)}
    for variant in fit.variants:
        run = fit.run_config(variant, 0)
        assert run.train.lr == pytest.approx(float(variant.rsplit("_lr", 1)[1]) * 3e-3 * 64 / run.model.d_model)
    for study in scaling.sweep_studies(config, sweep, lr_exponent=0.5).values():
        for variant in study.variants:
            run = study.run_config(variant, 0)
            multiplier = float(variant.rsplit("_lr", 1)[1]) if study.name == "lr_check" else 1.0
            assert run.train.lr == pytest.approx(multiplier * 3e-3 * (64 / run.model.d_model) ** 0.5)
    with pytest.raises(ConfigError, match="not a whole number of 16-wide heads"):
        scaling.size_ladder(base, [1], aspect=24)
    kept = scaling.sweep_studies(config, scaling.Sweep(budgets=(1e3, 5e8, 1.5e9), depths=(1, 2, 3, 6), head_dim=32, min_steps=4))
    assert {k: s.compute for k, s in kept.items()} == {"c1": 5e8, "c2": 1.5e9, "lr_check": 5e8}  # 1e3 trains no size: left out
    with pytest.raises(ConfigError, match="trains 0 of the sizes 4"):
        scaling.sweep_studies(config, scaling.Sweep(budgets=(1e3, 1e9), depths=(1, 2, 3), min_steps=4))
    with pytest.raises(ConfigError, match="depths"):
        scaling.Sweep(budgets=(1e9, 2e9), depths=(1, 2))


def test_a_study_at_a_compute_budget_gives_each_size_its_own_tokens():
    from labutils.studies import Study

    base = sweep_base()
    study = Study(name="c", base=base, variants={"small": {"model.d_model": 32, "model.n_head": 1}, "big": {}}, baseline="big",
                  budget="compute", compute=1e9)
    small, big = (study.run_config(v, 0).train.max_tokens for v in ("small", "big"))
    assert small > 2 * big  # a smaller model sees more tokens for the same FLOPs
    with pytest.raises(ConfigError, match="budget 'compute' and compute"):
        Study(name="c", base=base, variants={"baseline": {}}, budget="compute")


def test_a_budget_in_seconds_is_spent_at_timed_rates_and_the_pick_and_its_neighbours_are_timed():
    """The sweep's rates are equal for every size, the timer says a shape alone runs as many times faster as it has
    layers (a big model uses a machine better): the pick moves deeper than the sweep's rates put it, and stops where it
    and its neighbours are timed; untimed shapes carry the nearest timed shape's ratio."""
    depths = np.arange(1, 13)
    shapes = pd.DataFrame({"n_layer": depths, "d_model": 32 * depths, "n_head": depths, "n_kv_head": depths,
                           "params": 12.0 * (32 * depths) ** 2 * depths, "flops_per_s": 1e9})
    shapes["flops_per_token"] = 6 * shapes["params"]
    calls = []

    def timer(shape):
        calls.append(int(shape["n_layer"]))
        return 1e9 * shape["n_layer"]
    law = scaling.ParametricFit(E=1.0, A=400.0, B=400.0, alpha=0.34, beta=0.28)
    plain = scaling.recommend(law, shapes, seconds=1e4)
    pick, used = scaling.recommend_timed(law, shapes, 1e4, timer)
    assert pick["n_layer"] > plain["n_layer"] and len(calls) == len(set(calls))  # deeper, no shape timed twice
    assert {pick["n_layer"] - 1, pick["n_layer"], min(12, pick["n_layer"] + 1)} <= set(calls)
    again = scaling.recommend(law, used, seconds=1e4)
    assert {k: pick[k] for k in again} == again and pick["flops_per_s"] == 1e9 * pick["n_layer"]
    assert pick["sweep_flops_per_s"] == 1e9 and pick["shapes_timed"] == len(calls)
    untimed = used[~used["timed"]]
    nearest = [min(calls, key=lambda d: abs(d - n)) for n in untimed["n_layer"]]
    assert untimed["flops_per_s"].tolist() == [1e9 * d for d in nearest]
    assert (used["sweep_flops_per_s"] == 1e9).all()


def test_the_sweep_trains_resumes_fits_and_recommends_a_shape_for_a_budget_in_seconds(tmp_path, one_thread):
    from labutils.data import prepare_data

    words = "the king and the queen of the land went to war with the men of the north and came back home\n" * 300
    (tmp_path / "corpus.txt").write_text(words)
    data = prepare_data(tmp_path / "corpus.txt", "char", (0.8, 0.1, 0.1), tmp_path / "prep", progress=False)
    config = sweep_base(data.vocab_size)
    sweep = scaling.Sweep(budgets=(5e8, 1.5e9), depths=(1, 2, 3), head_dim=32, min_steps=2, lr_fit_multipliers=(0.5, 1, 2))
    sizing = scaling.size_model(config, sweep, data, tmp_path / "sweep", seconds=5, n_boot=8, progress=False)
    law = sizing.law
    assert len(law) == 6 and set(law["compute"]) == {5e8, 1.5e9} and (sizing.runs["loss"] > 0).all()
    assert {"epochs", "repeated"} <= set(sizing.runs) and sizing.runs["epochs"].gt(0).all()
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "sweep").rglob("summary.json")}
    timed = sorted(p.parent.name for p in (tmp_path / "sweep" / "timed").glob("*/summary.json"))
    assert timed == sorted(f"L{n}_d{w}" for n, w in sizing.shapes.loc[sizing.shapes["timed"], ["n_layer", "d_model"]].to_numpy())
    # 6 sweep runs, 6 of the LR fit, 6 of the LR check, the timed shapes
    assert 2 <= len(timed) <= len(sizing.shapes) and len(written) == 18 + len(timed)
    again = scaling.size_model(config, sweep, data, tmp_path / "sweep", seconds=5, n_boot=8, progress=False)
    assert {p: p.stat().st_mtime_ns for p in written} == written  # nothing trained twice
    pd.testing.assert_frame_equal(again.runs, sizing.runs)
    pick = sizing.recommendation
    assert (pick["n_layer"], pick["d_model"]) in set(zip(sizing.shapes["n_layer"], sizing.shapes["d_model"], strict=True))
    assert pick["shapes_timed"] == len(timed) and pick["flops_per_s"] > 0 and pick["sweep_flops_per_s"] > 0
    shape = sizing.shapes.set_index("d_model").loc[pick["d_model"]]
    assert pick["tokens"] == pytest.approx(5 * shape["flops_per_s"] / shape["flops_per_token"])  # seconds x this machine's rate
    assert pick["loss"] == pytest.approx(sizing.fit.loss(pick["params"], pick["tokens"]))
    rule = sizing.lr_rule  # the sweep trained every size at the rule fitted from the LR fit's runs, and so does the pick
    assert rule == {**scaling.fit_lr_rule(sizing.runs, 3e-3, 64), "curves": rule["curves"]} and set(rule["best_multiplier"]) == {32, 96}
    assert law["lr"].to_numpy() == pytest.approx(3e-3 * (64 / law["d_model"].to_numpy()) ** rule["exponent"])
    assert pick["lr"] == pytest.approx(3e-3 * (64 / pick["d_model"]) ** rule["exponent"])
    assert set(sizing.lr["best_multiplier"]) == {32, 96} and isinstance(sizing.lr["holds"], bool)
    check = sizing.check(pick["params"], pick["tokens"], compute=1.2e10, measured=pick["loss"])
    assert check["times_largest_budget"] == pytest.approx(1.2e10 / law["train_flops"].max())
    assert check["low"] <= check["predicted"] <= check["high"] or check["verdict"] == "outside"
    record = sizing.to_dict()
    assert record["budgets"] == [5e8, 1.5e9] and record["budgets_left_out"] == []
    assert record["lr_rule"]["exponent"] == rule["exponent"] and "curves" not in record["lr_rule"]
    assert record["recommendation"] == pick and record["runs"] == 18 and set(record["parametric"]) == {"E", "A", "B", "alpha", "beta"}
    with pytest.raises(ConfigError, match="one of them"):
        scaling.recommend(sizing.fit, sizing.shapes, compute=1e9, seconds=5)
    with pytest.raises(ConfigError, match="every shape would train past"):
        scaling.recommend(sizing.fit, sizing.shapes, seconds=5, max_tokens=1)
    frontier = sizing.frontier([1e9, 1e10])
    assert (frontier["low"] <= frontier["loss"]).all() or frontier["low"].isna().any()
    # what 05 shows: the figure (IsoFLOP curves, frontier with the final run, LR fit, LR check) and findings computed from the record
    from labutils import findings, plotting

    fig = plotting.plot_sizing(sizing, check)
    assert len(fig.axes) == 4 and "final run" in " ".join(t.get_text() for t in fig.axes[1].get_legend().get_texts())
    text = findings.sizing({"sizing": {**record, "check": check, "used": True}})
    assert f"width {pick['d_model']}" in text and check["verdict"] in text and "short LR sweep" in text and "held-out seeds" in text
    assert "no sizing sweep ran" in findings.sizing({})


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


@pytest.mark.parametrize("best, holds, edge", [((1.0, 1.0), True, False), ((2.0, 2.0), True, True), ((0.5, 2.0), False, True),
                                               ((1.0, 2.0), True, True)])
def test_lr_check_says_whether_the_optima_line_up_and_whether_one_sits_at_the_grid_edge(best, holds, edge):
    rows = []
    for width, optimum in zip((32, 128), best, strict=True):
        for multiplier in (0.5, 1.0, 2.0):  # a loss that is least at the optimum multiplier, on a log scale
            rows.append({"study": "lr_check", "d_model": width, "lr": scaling.lr_for_width(1e-3, 64, width) * multiplier,
                         "loss": 2.0 + abs(math.log2(multiplier / optimum))})
    check = scaling.lr_check(pd.DataFrame(rows), base_lr=1e-3, base_width=64)
    assert check["best_multiplier"] == {32: best[0], 128: best[1]}
    assert check["holds"] is holds and check["at_grid_edge"] is edge


@pytest.mark.parametrize("best, exponent, fitted", [((2 ** -0.5, 2 ** 0.5), 0.5, True),  # LR ~ width^-0.5: the fit finds 0.5
                                                    ((1.0, 1.0), 1.0, True),  # the prior rule holds
                                                    ((2.8, 0.4), 2.0, True),  # steeper than the bounds allow: kept at 2
                                                    ((1.0, 8.0), 1.0, False)])  # the large width's best beyond the grid: prior kept
def test_the_lr_rule_exponent_is_fitted_from_the_best_lr_at_two_widths(best, exponent, fitted):
    rows = []
    for width, optimum in zip((32, 128), best, strict=True):
        for multiplier in (0.25, 0.5, 1.0, 2.0, 4.0):  # a loss quadratic in log LR, least at the optimum multiplier
            rows.append({"study": "lr_fit", "d_model": width, "lr": scaling.lr_for_width(1e-3, 64, width) * multiplier,
                         "loss": 2.0 + math.log2(multiplier / optimum) ** 2, "compute": 1e9})
    rule = scaling.fit_lr_rule(pd.DataFrame(rows), base_lr=1e-3, base_width=64)
    assert rule["exponent"] == pytest.approx(exponent) and rule["fitted"] is fitted and rule["compute"] == 1e9
    assert rule["bounded"] is (best == (2.8, 0.4)) and rule["censored_widths"] == ([] if fitted else [128])
    if fitted:  # the vertex between grid points, not the grid's best
        assert rule["best_multiplier"] == pytest.approx({32: best[0], 128: best[1]})
        optimum = scaling.lr_for_width(1e-3, 64, 128, rule["exponent"])
        assert rule["bounded"] or optimum == pytest.approx(scaling.lr_for_width(1e-3, 64, 128) * best[1])
    with pytest.raises(ConfigError, match="two widths"):
        scaling.fit_lr_rule(pd.DataFrame(rows[:5]), base_lr=1e-3, base_width=64)


def test_the_gpu_profiles_sized_run_trains_what_the_sizing_chose():
    """Issue 41: FINAL["gpu"] keeps max_steps=2500 for its unsized run; a sized run must drop it (it trained 10x the
    tokens the sizing chose when only max_tokens was cleared)."""
    from labutils import stagedefs

    sized = {"d_model": 256, "n_layer": 4, "n_head": 4, "n_kv_head": 2, "lr": 1e-3, "tokens": 3e6}
    config = stagedefs.final("gpu", 65, sized=sized)
    assert config.train.max_steps is None and config.train.time_budget_s == 240 and config.model.d_model == 256
    unsized = stagedefs.final("gpu", 65)
    assert unsized.train.max_steps == 2500
    flops = stagedefs.final("gpu", 65, sized=sized, time_budget_s=None)
    assert flops.train.max_steps is None
