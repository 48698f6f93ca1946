"""labutils.studies and labutils.stats: overrides, studies, resume, device dispatch, statistics, plots."""

import json
import math
import os
import time

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as scipy_stats

from labutils import stats, studies
from labutils.config import RunConfig
from labutils.data import prepare_data
from labutils.guards import completed_summary
from labutils.model import get_preset
from labutils.studies import Study, run_on_devices, run_study
from labutils.validation import CheckpointError, ConfigError

matplotlib.use("Agg")

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n" * 60
TINY = {
    "model": {
        "vocab_size": 30,
        "d_model": 16,
        "n_layer": 1,
        "n_head": 2,
        "block_size": 16,
    },  # 30: the corpus's characters
    "train": {
        "device": "cpu",
        "batch_size": 4,
        "max_steps": 8,
        "eval_interval": 4,
        "eval_batches": 2,
        "warmup_steps": 1,
        "log_interval": 2,
        "lr": 3e-3,
    },
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "small.txt").write_text(TEXT)
    return prepare_data(str(root / "small.txt"), "char", (0.8, 0.1, 0.1), root / "prepared")


# --------------------------------------------------------------------------- overrides


def test_overrides_apply_dotted_keys_without_touching_the_base():
    base = RunConfig.from_dict(TINY)
    out = base.override({"model.n_layer": 2, "train.lr": 1e-3, "train.betas.1": 0.99})
    assert out.model == base.model.replace(n_layer=2)
    assert out.train == base.train.replace(lr=1e-3, betas=(0.9, 0.99)) and out.train.betas == (0.9, 0.99)
    assert base.model.n_layer == 1 and base.train.betas == (0.9, 0.95) and base.train.lr == 3e-3
    # a preset replaces the architecture (keeping the vocabulary); the other model keys apply on top
    preset = base.override({"model.preset": "minigpt", "model.n_layer": 2})
    assert preset.model == get_preset("minigpt", vocab_size=30, n_layer=2) and preset.train == base.train


@pytest.mark.parametrize(
    "key, message",
    [
        ("train.lrr", r"train has no field 'lrr'\. Did you mean 'train\.lr'\?.*Valid train keys"),
        ("model.n_kv_heads", r"Did you mean 'model\.n_kv_head'"),
        ("lr", r"Did you mean 'train\.lr'"),
        ("optim.lr", r"'model\.<field>' or 'train\.<field>'"),
        ("train.lr.0", r"only list fields take an index"),
    ],
)
def test_unknown_override_keys_are_refused_with_a_suggestion(key, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict(TINY).override({key: 1})


def test_wrong_types_are_caught_by_the_configs():
    with pytest.raises(ConfigError, match=r"variant 'x': ModelConfig\.n_layer: expected an integer"):
        RunConfig.from_dict(TINY).override({"model.n_layer": "two"}, context="variant 'x': ")
    with pytest.raises(ConfigError, match="lr: must be positive"):
        RunConfig.from_dict(TINY).override({"train.lr": -1.0})


def test_study_refuses_bad_variants():
    with pytest.raises(ConfigError, match=r"variant 'b'.*Did you mean 'model\.d_model'"):
        Study(name="s", base=TINY, variants={"baseline": {}, "b": {"model.dmodel": 8}})
    with pytest.raises(ConfigError, match="which the study sets for every run"):
        Study(name="s", base=TINY, variants={"baseline": {}, "b": {"train.max_tokens": 8}})
    with pytest.raises(ConfigError, match="baseline"):
        Study(name="s", base=TINY, variants={"base": {}})


def test_budgets_are_matched_across_batch_sizes(data, tmp_path):
    study = Study(name="s", base=TINY, variants={"baseline": {}, "bs8": {"train.batch_size": 8}}, n_seeds=2)
    jobs = studies.plan_runs(study, data, tmp_path)
    assert [(j.variant, j.seed) for j in jobs] == [("baseline", 0), ("baseline", 1), ("bs8", 0), ("bs8", 1)]
    assert {j.config.train.max_tokens for j in jobs} == {8 * 4 * 16}  # the baseline's max_steps x tokens per step
    assert all(j.config.train.max_steps is None for j in jobs)
    assert [j.config.train.seed for j in jobs] == [0, 1, 0, 1] and [j.config.train.batch_size for j in jobs] == [
        4,
        4,
        8,
        8,
    ]
    # one evaluation set for every arm: the baseline's eval_batches x batch_size x block_size, in tokens
    base = TINY["train"]
    assert {j.config.train.eval_tokens for j in jobs} == {
        base["eval_batches"] * base["batch_size"] * TINY["model"]["block_size"]
    }
    timed = Study(name="s", base=TINY, variants={"baseline": {}}, budget="time", time_budget_s=2.5)
    job = studies.plan_runs(timed, data, tmp_path)[0]
    assert (job.config.train.time_budget_s, job.config.train.max_steps, job.config.train.max_tokens) == (
        2.5,
        None,
        None,
    )


def test_notebook_03s_arms_build_working_models():
    from labutils.files import NOTEBOOKS_DIR
    from labutils.freshness import parameter_defaults
    from labutils.model import GPT

    base = RunConfig.build("minigpt", {}, vocab_size=65)
    arms = parameter_defaults(NOTEBOOKS_DIR / "03_ablations.ipynb")["arms"]
    assert "pos_alibi" in arms and len(arms) >= 14
    for name, overrides in arms.items():
        model_cfg = base.override(overrides, context=f"{name}: ").model
        logits, _ = GPT(model_cfg)(torch.zeros(1, 8, dtype=torch.long))
        assert logits.shape == (1, 8, 65), name


# --------------------------------------------------------------------------- statistics


def test_statistics_on_hand_computed_inputs():
    n, mean, std, half = stats.mean_ci([1.0, 2.0, 3.0])
    assert (n, mean, std) == (3, 2.0, 1.0)
    assert half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)  # t(0.975, df=2) * s / sqrt(n)
    # t = 3 / sqrt(1/3 + 1/3) = 3.6742, Welch df = 4: two-sided p = 0.021312
    p, lo, hi, test = stats.welch([4.0, 5.0, 6.0], [1.0, 2.0, 3.0])
    assert test == "welch" and p == pytest.approx(0.0213116, abs=1e-6)
    assert (lo + hi) / 2 == pytest.approx(3.0) and hi - lo == pytest.approx(2 * 2.776445 * math.sqrt(2 / 3), rel=1e-5)
    # unequal variances, where Welch and Student differ: t = 5 / sqrt(1/3 + 5/3), df = 4 / (1/18 + 25/27)
    p, _, _, _ = stats.welch([4.0, 6.0, 8.0, 10.0], [1.0, 2.0, 3.0])
    t, df = 5 / math.sqrt(2.0), 4 / (1 / 18 + 25 / 27)
    assert p == pytest.approx(2 * scipy_stats.t.sf(t, df), rel=1e-9) and p != pytest.approx(0.0262, abs=1e-3)
    rng = np.random.default_rng(1)  # and scipy.stats' own test and interval, on samples of unequal sizes and spreads
    for a, b in [(rng.normal(0, 1, 5), rng.normal(0.5, 3, 9)), (rng.normal(2, 0.1, 2), rng.normal(2, 1, 3))]:
        reference = scipy_stats.ttest_ind(a, b, equal_var=False)
        ci = reference.confidence_interval(0.95)
        np.testing.assert_allclose(stats.welch(a, b)[:3], [reference.pvalue, ci.low, ci.high], rtol=1e-9)
    np.testing.assert_allclose(stats.t_quantile(np.array([1, 4, 30])), scipy_stats.t.ppf(0.975, [1, 4, 30]), rtol=1e-12)
    assert stats.welch([1.0], [1.0, 2.0])[3] == "not testable: n<2"
    assert stats.welch([1.0, 1.0], [2.0, 2.0])[3] == "not testable: zero variance"
    np.testing.assert_allclose(stats.holm([0.01, 0.04, np.nan, 0.03]), [0.03, 0.06, np.nan, 0.06])
    assert stats.efficiency(2.0, 1.5, 10.0) == pytest.approx(0.05)


def synthetic_runs(groups: dict[str, list[float]], elapsed: float = 10.0) -> pd.DataFrame:
    rows = [
        {"variant": v, "seed": i, "val_loss": x, "elapsed_s": elapsed, "num_params": 1000, "flops_per_token": 6000.0}
        for v, xs in groups.items()
        for i, x in enumerate(xs)
    ]
    return pd.DataFrame(rows)


def test_summary_marks_a_large_effect_significant_and_noise_not():
    rng = np.random.default_rng(0)
    runs = synthetic_runs(
        {
            "baseline": 2.0 + 0.01 * rng.standard_normal(5),
            "big": 1.8 + 0.01 * rng.standard_normal(5),
            "noise": 2.0 + 0.01 * rng.standard_normal(5),
            "single": [1.5],
        }
    )
    summary = stats.summarize(runs, "baseline").set_index("variant")
    assert summary.loc["big", "significant"] and summary.loc["big", "p_value"] < 1e-6
    assert summary.loc["big", "delta_vs_baseline"] == pytest.approx(-0.2, abs=0.02)
    assert not summary.loc["noise", "significant"] and summary.loc["noise", "p_value"] > 0.05
    assert pd.isna(summary.loc["single", "significant"]) and summary.loc["single", "test"] == "not testable: n<2"
    assert summary.loc["baseline", "test"] == "baseline" and summary.loc["baseline", "efficiency"] == 0
    base_mean = runs[runs.variant == "baseline"].val_loss.mean()
    assert summary.loc["big", "efficiency"] == pytest.approx((base_mean - summary.loc["big", "val_loss_mean"]) / 10.0)
    text = stats.conclusion(summary.reset_index())
    assert text.startswith("Best variant: `single`") and "not testable" in text
    text = stats.conclusion(summary.drop(index="single").reset_index())
    assert text.startswith("Best variant: `big`") and "significant at α = 0.05" in text and "Holm-adjusted" in text
    worse = synthetic_runs({"baseline": [1.0, 1.1], "worse": [2.0, 2.1]})
    assert stats.conclusion(stats.summarize(worse, "baseline")).startswith("No variant beat the baseline")


def test_significance_is_corrected_for_multiple_comparisons():
    """p = 0.027 alone would pass at 0.05, but not as one of five comparisons (Holm: 0.137). The arms ran other seeds
    than the baseline, so the test is Welch's."""
    groups = {"baseline": [2.0, 2.1, 2.2, 2.05, 2.15], "mild": [1.95, 2.0, 2.05, 1.9, 2.0]}
    groups.update({f"null{i}": [2.0, 2.1, 2.2, 2.05, 2.15 + 0.01 * i] for i in range(4)})
    runs = synthetic_runs(groups)
    runs.loc[runs.variant != "baseline", "seed"] += 100
    summary = stats.summarize(runs, "baseline").set_index("variant")
    assert set(summary["test"]) == {"baseline", "welch"}
    assert summary.loc["mild", "p_value"] == pytest.approx(0.0273, abs=1e-3)
    assert summary.loc["mild", "p_holm"] == pytest.approx(5 * summary.loc["mild", "p_value"])
    assert not summary.loc["mild", "significant"]
    assert "not significant" in stats.conclusion(summary.reset_index())


def test_results_table_and_markdown():
    runs = synthetic_runs({"baseline": [2.0, 2.1, 2.2], "lr": [1.0, 1.15, 1.2]})  # differences -1, -0.95, -1
    summary = stats.summarize(runs, "baseline")
    table = stats.results_table(summary, {"baseline": {}, "lr": {"train.lr": 0.001}})
    assert table["overrides"].tolist() == ["—", "train.lr=0.001"]
    assert table["significant"].tolist() == ["baseline", "yes"]
    md = stats.results_markdown(table)
    # the paired interval: -0.9833 ± t(0.975, 2) x 0.02887 / sqrt(3)
    assert "| `lr` | train.lr=0.001 | 1,000 | 3 | 1.1167 ± 0.2586 | -0.9833 (-1.055 to -0.912) | paired |" in md
    constant = stats.summarize(synthetic_runs({"baseline": [2.0, 2.1, 2.2], "lr": [1.0, 1.1, 1.2]}), "baseline")
    assert constant.set_index("variant").loc["lr", "test"] == "not testable: zero variance"


# --------------------------------------------------------------------------- running studies


def test_run_study_writes_tables_and_resumes(data, tmp_path, monkeypatch):
    study = Study(name="tiny", base=TINY, variants={"baseline": {}, "bs8": {"train.batch_size": 8}}, n_seeds=2)
    result = run_study(study, data, tmp_path, progress=False)
    runs = pd.read_csv(tmp_path / "runs.csv")
    assert list(runs.columns) == studies.RUN_COLUMNS and len(runs) == 4
    assert set(runs["tokens"]) == {512} and set(runs[runs.variant == "bs8"]["steps"]) == {4}
    for name in ("summary.csv", "results_table.csv", "results_table.md", "study.json"):
        assert (tmp_path / name).exists()
    assert (tmp_path / "runs" / "bs8" / "seed1" / "summary.json").exists()
    reloaded = studies.summarize_study(Study.from_json(tmp_path / "study.json"), tmp_path)
    pd.testing.assert_frame_equal(reloaded.summary, result.summary)
    assert result.summary["n"].tolist() == [2, 2] and "`" in result.conclusion()
    handoff = result.best_config()
    assert handoff["model"]["d_model"] == 16 and handoff["train"]["max_tokens"] == 512
    # bits per byte beside the loss, from each run's evaluation (ASCII characters: one token, one byte)
    assert (
        runs["val_bpb"].tolist() == pytest.approx((runs["val_loss"] / math.log(2)).tolist())
        and runs["confirm_bpb"].isna().all()
    )
    bpb = result.summary.set_index("variant")["val_bpb_mean"]
    assert (
        handoff["val_bpb_mean"] == pytest.approx(bpb[handoff["variant"]]) and "confirm_bpb_mean" not in result.summary
    )
    assert "| bits/byte |" in (tmp_path / "results_table.md").read_text() and "val_bpb_mean" in result.table
    histories = result.histories()
    # evals at steps 4, 8 and 4
    assert set(histories["variant"]) == {"baseline", "bs8"} and histories["val_loss"].notna().sum() == 2 * 2 + 2 * 1

    calls = []
    real_train = studies.train
    monkeypatch.setattr(studies, "train", lambda *a, **k: calls.append(a[2]) or real_train(*a, **k))
    run_study(study, data, tmp_path, progress=False)
    assert calls == []  # everything finished: nothing re-trained
    (tmp_path / "runs" / "bs8" / "seed0" / "summary.json").unlink()
    again = run_study(study, data, tmp_path, progress=False)
    assert calls == [tmp_path / "runs" / "bs8" / "seed0"] and len(again.runs) == 4

    changed = Study(
        name="tiny", base=RunConfig.from_dict(TINY).override({"train.lr": 1e-2}), variants=study.variants, n_seeds=2
    )
    calls.clear()  # a study owns its run folders: another config's runs are replaced, not mixed with the new ones
    run_study(changed, data, tmp_path, progress=False)
    assert len(calls) == 4 and {json.loads(c.joinpath("config.json").read_text())["train"]["lr"] for c in calls} == {
        1e-2
    }
    with pytest.raises(ConfigError, match=r"another configuration \(train\.lr: 0\.01 -> 0\.003"):
        completed_summary(tmp_path / "runs" / "bs8" / "seed0", study.run_config("bs8", 0))  # train() itself refuses


def record_device(job, device):
    if job == 3:
        raise ValueError("job 3 fails")
    time.sleep(0.2)  # long enough that both workers take jobs
    return job, device, os.getpid()


def test_dispatch_pins_one_device_per_worker_process():
    results = run_on_devices(record_device, list(range(6)), ["fake:0", "fake:1"], progress=False)
    assert isinstance(results[3], ValueError)
    done = [r for r in results if not isinstance(r, Exception)]
    assert sorted(job for job, _, _ in done) == [0, 1, 2, 4, 5]  # every job exactly once
    assert {device for _, device, _ in done} <= {"fake:0", "fake:1"}
    device_of = {}
    for _, device, pid in done:
        assert pid != os.getpid() and device_of.setdefault(pid, device) == device  # a worker keeps its device
    assert len(device_of) <= 2
    assert studies.parse_devices("1,2") == ["cuda:1", "cuda:2"] and studies.parse_devices(None) is None
    assert studies.parse_devices("cuda:0*4") == ["cuda:0"] * 4 and studies.parse_devices("0*2,1") == [
        "cuda:0",
        "cuda:0",
        "cuda:1",
    ]
    with pytest.raises(ConfigError, match=r"devices: 'cuda:0\*four': write a device and how many workers share it"):
        studies.parse_devices("cuda:0*four")


def test_run_study_in_parallel_worker_processes(data, tmp_path):
    """Several workers on one device ('cpu*2', as 'cuda:0*4' on a GPU) train the same runs as one process."""
    study = Study(name="par", base=TINY, variants={"baseline": {}, "wide": {"model.d_model": 32}}, n_seeds=1)
    result = run_study(study, data, tmp_path / "par", devices="cpu*2", progress=False)
    assert len(result.runs) == 2
    for variant in ("baseline", "wide"):
        summary = json.loads((tmp_path / "par" / "runs" / variant / "seed0" / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["device"] == "cpu"
    alone = run_study(study, data, tmp_path / "alone", progress=False)
    columns = ["variant", "seed", "val_loss", "best_val_loss", "train_loss", "steps", "tokens"]
    pd.testing.assert_frame_equal(result.runs[columns], alone.runs[columns])
    statistics = ["variant", "n", "val_loss_mean", "val_loss_ci95", "delta_vs_baseline", "p_value"]
    pd.testing.assert_frame_equal(result.summary[statistics], alone.summary[statistics])
    # the two workers split the CPU's threads between them instead of each taking them all
    threads = {
        folder: json.loads((tmp_path / folder / "runs" / "baseline" / "seed0" / "environment.json").read_text())[
            "cpu_threads"
        ]
        for folder in ("par", "alone")
    }
    assert threads["par"] == max(1, threads["alone"] // 2), threads


def test_a_study_cut_mid_run_resumes_that_run_and_keeps_the_finished_ones(data, tmp_path, hooked, one_thread):
    """A kill during run 2 of 2 (here a KeyboardInterrupt at its 6th of 8 steps, past its checkpoint at step 4):
    the re-run leaves run 1 alone, continues run 2 from step 4, and ends where an uninterrupted study does."""
    study = Study(name="cut", base=TINY, variants={"baseline": {}}, n_seeds=2)
    uninterrupted = run_study(study, data, tmp_path / "whole", progress=False)

    def interrupt(loss):
        raise KeyboardInterrupt

    hooked.calls, hooked.at, hooked.action, hooked.once = 0, 8 + 6, interrupt, True
    with pytest.raises(KeyboardInterrupt):
        run_study(study, data, tmp_path / "cut", progress=False)
    first = tmp_path / "cut" / "runs" / "baseline" / "seed0"
    finished_at = (first / "summary.json").stat().st_mtime_ns
    assert (
        json.loads((tmp_path / "cut" / "runs" / "baseline" / "seed1" / "summary.json").read_text())["status"]
        == "interrupted"
    )

    hooked.at, calls_before = None, hooked.calls
    resumed = run_study(study, data, tmp_path / "cut", progress=False)
    assert (first / "summary.json").stat().st_mtime_ns == finished_at  # not trained again
    assert hooked.calls - calls_before == 8 - 4  # only the steps after run 2's checkpoint
    assert (
        json.loads((tmp_path / "cut" / "runs" / "baseline" / "seed1" / "environment.json").read_text())[
            "resumed_from_step"
        ]
        == 4
    )
    columns = ["variant", "seed", "val_loss", "best_val_loss", "train_loss", "steps", "tokens"]
    pd.testing.assert_frame_equal(resumed.runs[columns], uninterrupted.runs[columns])


# --------------------------------------------------------------------------- plots


def test_study_plots_return_figures():
    from labutils import plotting

    rng = np.random.default_rng(1)
    runs = synthetic_runs(
        {
            "baseline": 2 + 0.01 * rng.standard_normal(3),
            "big": 1.8 + 0.01 * rng.standard_normal(3),
            "noise": 2 + 0.01 * rng.standard_normal(3),
            "single": [2.1],
        }
    )
    summary = stats.summarize(runs, "baseline")
    summary.loc[1, "num_params"] = 4000
    assert plotting.pareto_front([1, 2, 3], [3.0, 1.0, 2.0]).tolist() == [True, True, False]
    histories = pd.DataFrame(
        [
            {"variant": v, "seed": s, "tokens": t, "val_loss": 3 - t / 100 + s * 0.01}
            for v in ("baseline", "big")
            for s in range(3)
            for t in (64, 128)
        ]
    )
    shuffled = summary.iloc[::-1].set_axis([10 + i for i in range(len(summary))])  # labels that are not positions
    pareto = plotting.plot_pareto(shuffled)
    front = plotting.pareto_front(shuffled["num_params"], shuffled["val_loss_mean"])
    markers = [c.lines[0].get_marker() for c in pareto.axes[0].containers]  # one errorbar per variant, in row order
    assert markers == ["D" if f else "o" for f in front]
    plt.close(pareto)
    for fig in (plotting.plot_ablation(summary), plotting.plot_pareto(summary), plotting.plot_loss_curves(histories)):
        assert isinstance(fig, plt.Figure)
        assert fig.axes[0].get_title() or (fig._suptitle is not None and fig._suptitle.get_text())
        assert fig.axes[0].get_xlabel() and fig.axes[0].get_ylabel()
        plt.close(fig)


def test_overrides_read_well_in_tables():
    assert (
        stats.format_overrides({"model.ffn_mult": 8 / 3, "model.d_ff": None, "train.lr": 1e-3})
        == "model.ffn_mult=2.667, model.d_ff=None, train.lr=0.001"
    )
    assert stats.format_overrides({}) == "—"


# --------------------------------------------------------------------------- paired seeds, pooled variance, power


def test_the_paired_test_of_one_arm_is_scipys_paired_t_test_and_more_arms_pool_the_variance():
    rng = np.random.default_rng(3)
    base = 2.0 + 0.05 * rng.standard_normal(4)
    one = base - 0.03 + 0.01 * rng.standard_normal(4)  # seed s of the arm moves with seed s of the baseline
    summary = stats.summarize(synthetic_runs({"baseline": base, "one": one}), "baseline").set_index("variant")
    reference = scipy_stats.ttest_rel(one, base)
    ci = reference.confidence_interval(0.95)
    assert summary.loc["one", "test"] == "paired" and summary.loc["one", "df"] == 3
    np.testing.assert_allclose(
        summary.loc["one", ["p_value", "delta_ci_low", "delta_ci_high"]].astype(float),
        [reference.pvalue, ci.low, ci.high],
        rtol=1e-9,
    )
    # Welch on the same numbers ignores the pairing: the shared seed noise (sd 0.05) swamps a 0.03 effect
    assert stats.welch(one, base)[0] > 0.2 > 0.01 > reference.pvalue
    # two arms at four seeds: the variance of the differences pooled over both, 6 degrees of freedom
    two = base + 0.02 * rng.standard_normal(4)
    summary = stats.summarize(synthetic_runs({"baseline": base, "one": one, "two": two}), "baseline").set_index(
        "variant"
    )
    d1, d2 = one - base, two - base
    pooled = (((d1 - d1.mean()) ** 2).sum() + ((d2 - d2.mean()) ** 2).sum()) / 6
    t = d1.mean() / math.sqrt(pooled / 4)
    assert summary.loc["one", "df"] == 6
    assert summary.loc["one", "p_value"] == pytest.approx(2 * scipy_stats.t.sf(abs(t), 6), rel=1e-9)
    # arms without the baseline's seeds fall back to Welch's test
    unpaired = synthetic_runs({"baseline": base, "one": one})
    unpaired.loc[unpaired.variant == "one", "seed"] += 100
    assert stats.summarize(unpaired, "baseline").set_index("variant").loc["one", "test"] == "welch"


def test_the_minimum_detectable_effect_is_detected_four_times_in_five():
    sd, n, alpha = 0.05, 5, 0.05
    mde = stats.minimum_detectable_effect(sd, n, n - 1, alpha)
    assert stats.power(mde, sd, n, n - 1, alpha) == pytest.approx(0.8, abs=1e-9)
    # a simulation of the paired test: differences with a true mean of the MDE are found significant 80% of the time
    rng = np.random.default_rng(0)
    d = mde + sd * rng.standard_normal((20_000, n))
    t = d.mean(axis=1) / (d.std(axis=1, ddof=1) / math.sqrt(n))
    assert np.mean(np.abs(t) > scipy_stats.t.ppf(1 - alpha / 2, n - 1)) == pytest.approx(0.8, abs=0.015)
    # more seeds or more pooled degrees of freedom detect less; a stricter level more
    assert (
        stats.minimum_detectable_effect(sd, 10, 9, alpha)
        < mde
        < stats.minimum_detectable_effect(sd, n, n - 1, alpha / 5)
    )


def test_the_conclusion_of_an_undetected_arm_states_what_could_have_been_detected():
    rng = np.random.default_rng(5)
    base = 2.0 + 0.05 * rng.standard_normal(3)
    runs = synthetic_runs(
        {
            "baseline": base,
            "same": base + 0.01 * rng.standard_normal(3),
            "big": base - 0.3 + 0.01 * rng.standard_normal(3),
        }
    )
    summary = stats.summarize(runs, "baseline")
    rows = summary.set_index("variant")
    assert rows.loc["same", "mde"] == pytest.approx(
        stats.minimum_detectable_effect(
            math.sqrt(
                stats.paired_pooled(
                    {
                        "s": (runs[runs.variant == "same"].val_loss.values - base),
                        "b": (runs[runs.variant == "big"].val_loss.values - base),
                    }
                )[0]
            ),
            3,
            4,
            0.05 / 2,
        )
    )
    worse = summary[summary.variant != "big"]
    text = stats.conclusion(worse)
    assert "would have been detected with 80% power, and none was" in text and "within seed-to-seed noise" not in text
    assert "no difference larger than" not in text  # the backwards reading of power (issue 48)
    assert stats.study_mde(summary) == pytest.approx(rows["mde"].max())


def test_the_lr_check_flags_an_arm_whose_ranking_flips_at_its_own_best_lr():
    from labutils import profiles

    base = RunConfig.build("minigpt", {"lr": 1e-3, "max_steps": 10, "warmup_steps": 1}, vocab_size=65)
    study = Study(
        name="s",
        base=base,
        variants={
            "baseline": {},
            "lr_1e-3": {"train.lr": 1e-3},
            "wide": {"model.d_model": 256},
            "rope": {"model.pos": "rope"},
        },
        n_seeds=2,
    )
    runs = synthetic_runs({"baseline": [2.0, 2.0], "lr_1e-3": [2.1, 2.1], "wide": [2.1, 2.1], "rope": [1.9, 1.9]})
    check = pd.DataFrame(
        [
            {"variant": profiles.lr_check_name(v, m), "seed": 0, "val_loss": x}
            for v, m, x in [
                ("baseline", 0.5, 2.05),
                ("baseline", 2.0, 2.02),
                ("wide", 0.5, 1.8),
                ("wide", 2.0, 2.3),
                ("rope", 0.5, 1.95),
                ("rope", 2.0, 1.92),
            ]
        ]
    )
    table = profiles.lr_check_table(study, runs, check, (0.5, 2.0)).set_index("variant")
    assert "lr_1e-3" not in table.index  # an LR experiment is not checked at other LRs
    assert table.loc["wide", "best_multiplier"] == 0.5 and table.loc["wide", "flips"]  # worse at 1x, better at its best
    assert not table.loc["rope", "flips"] and not table.loc["baseline", "flips"]
    checks = profiles.lr_check_study(study, (0.5, 2.0))
    assert set(checks.variants) == {
        profiles.lr_check_name(v, m) for v in ("baseline", "wide", "rope") for m in (0.5, 2.0)
    }
    assert checks.config(profiles.lr_check_name("wide", 2.0)).train.lr == pytest.approx(2e-3) and checks.seeds == [0]


def test_the_lr_check_compares_each_arm_with_the_baseline_on_the_same_seed_at_each_multiple():
    """The flip compares like for like: the arm's seed-0 difference at 1x (not the all-seed mean) against best vs
    best on seed 0. Here seed 0 has the arm worse (+0.02) while its mean over seeds is better (-0.09): the mean would
    have made it 'flip' against its seed-0 best against best (+0.02)."""
    from labutils import findings, profiles

    base = RunConfig.build("minigpt", {"lr": 1e-3, "max_steps": 10, "warmup_steps": 1}, vocab_size=65)
    study = Study(name="s", base=base, variants={"baseline": {}, "rope": {"model.pos": "rope"}}, n_seeds=2)
    runs = synthetic_runs({"baseline": [2.0, 2.0], "rope": [2.02, 1.8]})
    check = pd.DataFrame(
        [
            {"variant": profiles.lr_check_name(v, m), "seed": 0, "val_loss": x}
            for v, m, x in [("baseline", 0.5, 2.1), ("baseline", 2.0, 1.95), ("rope", 0.5, 2.1), ("rope", 2.0, 2.0)]
        ]
    )
    table = profiles.lr_check_table(study, runs, check, (0.5, 2.0))
    rope = table.set_index("variant").loc["rope"]
    assert rope["delta_x1"] == pytest.approx(0.02) and rope["delta_x0.5"] == pytest.approx(0.0)
    assert rope["delta_x2"] == pytest.approx(0.05) and rope["delta_best_vs_best"] == pytest.approx(0.05)
    assert rope["delta_at_1x"] == pytest.approx(-0.09) and not rope["flips"]
    shown = profiles.lr_check_labelled(table, 0, 2)
    assert "Δ vs baseline at 1x (seed 0)" in shown and "Δ at 1x, mean of 2 seeds (the comparison)" in shown
    assert shown["best multiple (seed 0)"].tolist() == ["2x", "2x"]
    # the baseline is best at 2x, the check's edge: its LR (02's) is below its optimum, and the report says so
    check = {"multipliers": [0.5, 2.0], "table": table.to_dict("records"), "flips": [], "seed": 0}
    line = findings._lr_check_lines({"lr_check": check})[0]
    assert "At 2x its LR, the baseline scored 0.0500 nats lower than at 1x (seed 0): 02's LR is below" in line
    assert "and 1 of the 1 other checked arms (`rope`) were also best at 2x, the check's edge." in line
    assert "scored 0.0500 lower at 2x its LR than at 1x, so 02's LR is below" in findings.lr_check_clause(check)
    at_1x = [{**r, "best_multiplier": 1.0} if r["variant"] == "baseline" else r for r in check["table"]]
    assert findings.lr_check_clause({**check, "table": at_1x}) == "" and findings.lr_check_clause(None) == ""


def test_the_lr_check_flags_an_arm_whose_advantage_shrinks_by_more_than_the_detectable_effect():
    """The referee's case (issue 48): `batch_size_16` leads by 0.073 at 1x and by 0.022 best against best; the sign
    holds, but 0.051 of its advantage is gone, more than the study's detectable 0.033: LR-dependent. An arm that loses
    less than that (`rope`: 0.10 -> 0.09) keeps its verdict."""
    from labutils import findings, profiles

    base = RunConfig.build("minigpt", {"lr": 1e-3, "max_steps": 10, "warmup_steps": 1}, vocab_size=65)
    variants = {"baseline": {}, "batch_size_16": {"train.batch_size": 16}, "rope": {"model.pos": "rope"}}
    study = Study(name="s", base=base, variants=variants, n_seeds=2)
    runs = synthetic_runs({"baseline": [2.2, 2.2], "batch_size_16": [2.127, 2.13], "rope": [2.1, 2.1]})
    check = pd.DataFrame(
        [
            {"variant": profiles.lr_check_name(v, m), "seed": 0, "val_loss": x}
            for v, m, x in [
                ("baseline", 0.5, 2.3),
                ("baseline", 2.0, 2.149),
                ("batch_size_16", 0.5, 2.2),
                ("batch_size_16", 2.0, 2.147),
                ("rope", 0.5, 2.2),
                ("rope", 2.0, 2.059),
            ]
        ]
    )
    table = profiles.lr_check_table(study, runs, check, (0.5, 2.0), mde=0.033).set_index("variant")
    bs = table.loc["batch_size_16"]
    assert bs["delta_x1"] == pytest.approx(-0.073) and bs["delta_best_vs_best"] == pytest.approx(-0.022)
    assert not bs["flips"] and bs["shrink"] == pytest.approx(0.051) and bs["lr_dependent"]
    assert not table.loc["rope", "lr_dependent"] and table.loc["rope", "shrink"] == pytest.approx(0.01)
    assert (
        not profiles.lr_check_table(study, runs, check, (0.5, 2.0))
        .set_index("variant")
        .loc["batch_size_16"]["lr_dependent"]
    )  # without a detectable effect to judge by, only a flip counts
    record = {
        "multipliers": [0.5, 2.0],
        "table": table.reset_index().to_dict("records"),
        "flips": [],
        "lr_dependent": ["batch_size_16"],
        "mde": 0.033,
        "seed": 0,
    }
    line = findings._lr_check_lines({"lr_check": record})[0]
    assert "shrinks by more than the study's detectable 0.033 nats once each runs at its best LR for " in line
    assert "`batch_size_16` (-0.073 at 1x, -0.022 best against best)" in line and "`rope` (" not in line


def test_each_arm_is_also_tested_on_its_own_seeds_and_the_report_names_verdicts_that_need_the_pooling():
    """The pooled test borrows the other arms' small variance; `x` is significant only with it: on its own 2 degrees
    of freedom (scipy's paired t-test) it is not, after Holm over the same arms."""
    from scipy.stats import ttest_rel

    from labutils import findings

    base = [2.0, 2.1, 2.2]
    x = [b + d for b, d in zip(base, [-0.05, -0.10, -0.02], strict=True)]
    nulls = {f"null{i}": [b + d * (i + 1) for b, d in zip(base, [0.001, -0.001, 0.0], strict=True)] for i in range(3)}
    summary = stats.summarize(synthetic_runs({"baseline": base, "x": x, **nulls}), "baseline")
    rows = summary.set_index("variant")
    assert rows.loc["x", "p_arm"] == pytest.approx(ttest_rel(x, base).pvalue)
    assert rows.loc["null0", "p_arm"] == pytest.approx(ttest_rel(nulls["null0"], base).pvalue)
    assert math.isnan(rows.loc["baseline", "p_arm"])
    assert rows["p_arm_holm"].tolist()[1:] == pytest.approx(list(stats.holm(rows["p_arm"].to_numpy()[1:])))
    assert rows.loc["x", "significant"] and rows.loc["x", "p_arm_holm"] > 0.05
    assert stats.pooling_dependent(summary) == ["x"]
    md = stats.results_markdown(stats.results_table(summary, {}))
    assert "| p (own seeds) | p (own seeds, Holm) |" in md
    line = findings._pooling_line(summary)[0]
    assert "on its own 2 degrees of freedom" in line and "the verdict changes for `x` (p = " in line
    assert "significant only with the pooled variance; on its own seeds a true difference of " in line
    assert "Its significance depends on the pooling." in line
    # the arm's own detectable effect (its own sd, 2 df) is the one its own verdict rests on, far above the pooled
    d = np.array(x) - np.array(base)
    own = stats.minimum_detectable_effect(d.std(ddof=1), 3, 2, 0.05 / 4)
    assert rows.loc["x", "mde_arm"] == pytest.approx(own) and own > 3 * rows.loc["x", "mde"]
    assert (
        f"{own:.3f} nats or more would have been detected with 80% power (pooled: {rows.loc['x', 'mde']:.3f})" in line
    )
    welch = synthetic_runs({"baseline": base, "x": x})
    welch.loc[welch.variant != "baseline", "seed"] += 100
    welch_summary = stats.summarize(welch, "baseline")  # Welch pools nothing: no own-seed columns, no sentence
    assert "p_arm" not in stats.results_table(welch_summary, {}) and findings._pooling_line(welch_summary) == []


def test_a_finished_run_is_read_back_untouched_and_a_run_of_another_config_is_replaced(data, tmp_path, one_thread):
    """What a stage re-run after a report change relies on: `reuse_or_train` writes nothing into a folder whose run
    finished with the same config, and a folder holding another config's run trains the new config afresh."""
    from labutils.studies import reuse_or_train

    config = RunConfig.from_dict(TINY)
    first = reuse_or_train(config, data, tmp_path / "run", progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()}
    again = reuse_or_train(config.override({"train.device": "cpu"}), data, tmp_path / "run", progress=False)
    assert again.summary == first.summary
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()} == stamps  # nothing written
    other = reuse_or_train(config.override({"train.lr": 1e-3}), data, tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["lr"] == 1e-3 and other.summary["status"] == "completed"


def test_scores_and_samples_of_a_finished_run_are_kept_in_its_folder_and_read_back_without_weights(
    data, tmp_path, monkeypatch, one_thread
):
    """What 02 and 05 read from a run's weights is kept in its folder, so a re-run, or a clone (git keeps no
    checkpoint), reads it back; 05's model falls back on the shipped one."""
    import shutil

    from labutils import checkpoints, profiles
    from labutils.studies import reuse_or_train

    run = reuse_or_train(RunConfig.from_dict(TINY), data, tmp_path / "run", progress=False)
    scores = profiles.held_out_scores(run, data, "test")
    samples = profiles.run_samples(run, data.tokenizer, ["Fi"], max_new_tokens=8)
    checkpoints.save_model(run.load_model(), tmp_path / "shipped", tokenizer=data.tokenizer)
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    monkeypatch.setattr(profiles, "evaluate", lambda *a, **k: pytest.fail("evaluated again"))
    assert profiles.held_out_scores(run, data, "test") == scores
    pd.testing.assert_frame_equal(profiles.run_samples(run, data.tokenizer, ["Fi"], max_new_tokens=8), samples)
    with pytest.raises(CheckpointError):  # other prompts need the weights
        profiles.run_samples(run, data.tokenizer, ["Sp"], max_new_tokens=8)
    shipped = profiles.final_model(run, tmp_path / "shipped")
    assert sum(p.numel() for p in shipped.parameters()) == run.summary["num_params"]


def test_the_final_seeds_train_into_their_folders_are_read_back_and_their_regularisers_checked(data, tmp_path):
    """05's final runs (profiles.final_runs): one folder per seed (the first `run`, then `run_seed<s>`), each trained
    at its own seed; a second call reads them back and trains nothing. The regularisation check reads each seed's
    last train and validation losses and says which regulariser costs more than it saves."""
    from labutils import profiles

    config = RunConfig.from_dict(TINY)
    runs = profiles.final_runs(config, data, tmp_path, [3, 4])
    assert list(runs) == [3, 4] and [r.summary["seed"] for r in runs.values()] == [3, 4]
    assert (tmp_path / "run" / "summary.json").exists() and (tmp_path / "run_seed4" / "summary.json").exists()
    written = (tmp_path / "run_seed4" / "summary.json").stat().st_mtime_ns
    again = profiles.final_runs(config, data, tmp_path, [3, 4])
    assert (tmp_path / "run_seed4" / "summary.json").stat().st_mtime_ns == written
    assert again[4].summary == runs[4].summary

    class Fake:
        def __init__(self, train_loss, val_loss):
            self.summary = {"train_loss": train_loss, "val_loss": val_loss}

    dropped = config.override({"model.dropout": 0.1})
    above = profiles.regularisation_check({0: Fake(2.0, 1.9), 1: Fake(2.1, 1.9)}, dropped)
    assert above["gap"] == pytest.approx(-0.15) and above["dropout"] == 0.1
    assert "0.150 nats above validation loss: dropout costs more than it saves" in above["verdict"]
    below = profiles.regularisation_check({0: Fake(1.2, 1.4)}, config.override({"model.dropout": 0.0}))
    assert below["gap"] == pytest.approx(0.2) and "the next lever" in below["verdict"]
    plain = profiles.regularisation_check({0: Fake(1.5, 1.4)}, config.override({"model.dropout": 0.0}))
    assert "no overfitting" in plain["verdict"]
