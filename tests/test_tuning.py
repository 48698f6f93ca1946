"""labutils.tuning: search-space validation, pruning through on_eval, SQLite resume, workers, re-runs, plots."""

import json
import math
import os
import subprocess
import sys
import types

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import optuna
import pytest

from labutils import freshness, stats, tuning
from labutils.config import RunConfig
from labutils.data import prepare_data
from labutils.files import REPO_ROOT
from labutils.validation import ConfigError

matplotlib.use("Agg")
optuna.logging.set_verbosity(optuna.logging.WARNING)

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
SPACE = {
    "lr": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True, "target": "train.lr"},
    "train.warmup_steps": {"type": "int", "low": 0, "high": 3},
    "train.label_smoothing": {"type": "categorical", "choices": [0.0, 0.1]},
}


RUN_KEYS = ("n_trials", "timeout", "total", "device", "devices", "progress")


def tune(base, search_space, data, out_dir, **kwargs):
    """tuning.tune() on a TuningConfig built from the spellings tests write; the run's own keys go to tune()."""
    run = {k: kwargs.pop(k) for k in RUN_KEYS if k in kwargs}
    return tuning.tune(tuning.TuningConfig.build(base, search_space, data, out_dir, **kwargs), **run)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "small.txt").write_text(TEXT)
    return prepare_data(str(root / "small.txt"), "char", (0.8, 0.1, 0.1), root / "prepared")


@pytest.mark.parametrize(
    "space, message",
    [
        ({"lr": {"type": "floating", "low": 1, "high": 2}}, r"type: unknown option 'floating'.*Did you mean 'float'"),
        (
            {"lr": {"type": "float", "low": 1e-3, "hihg": 1e-2, "target": "train.lr"}},
            r"unknown key 'hihg'.*Did you mean 'high'",
        ),
        ({"lr": {"type": "float", "low": 1e-2, "high": 1e-3, "target": "train.lr"}}, "must be below high"),
        (
            {"lr": {"type": "float", "low": 0.0, "high": 1e-3, "log": True, "target": "train.lr"}},
            "log scale needs low > 0",
        ),
        ({"bs": {"type": "int", "low": 4.5, "high": 8, "target": "train.batch_size"}}, "expected an integer"),
        ({"lr": {"type": "float", "low": 1e-4, "high": 1e-3, "target": "train.lrr"}}, r"Did you mean 'train\.lr'"),
        (
            {"d": {"type": "float", "low": 0.0, "high": 1.0, "target": "model.dropout"}},
            r"value 1\.0: .*dropout: must be in \[0, 1\)",
        ),
        ({"x": {"type": "categorical", "choices": []}}, "non-empty list"),
    ],
)
def test_search_space_errors_are_clear(space, message):
    with pytest.raises(ConfigError, match=message):
        tuning.validate_search_space(space, RunConfig.from_dict(TINY))


def test_tuning_config_is_what_tuning_json_holds_and_tune_takes_nothing_else(data, tmp_path):
    config = tuning.TuningConfig.build(
        TINY, SPACE, data, tmp_path, study_name="s", storage="postgresql://me:secret@db.lab/optuna"
    )
    assert config.search_space["train.warmup_steps"] == {
        "type": "int",
        "target": "train.warmup_steps",
        "low": 0,
        "high": 3,
        "log": False,
    }
    saved = tuning.TuningConfig.from_json(config.save(tmp_path / "tuning.json"))
    assert saved == config.replace(
        storage="postgresql://me:***@db.lab/optuna"
    )  # everything but the password comes back
    # a quarter of the 8-step budget: the pruner waits 2 steps of 4 x 16 tokens
    assert config.warmup_tokens() == 2 * 64 and config.replace(pruner_warmup_steps=1).warmup_tokens() == 64
    assert config.trial_base().train.max_tokens == 8 * 64 and config.trial_base().train.eval_split == "selection"
    with pytest.raises(
        ConfigError, match=r"tune: expected a TuningConfig, got dict; build one with TuningConfig.build"
    ):
        tuning.tune(TINY, n_trials=1)
    with pytest.raises(ConfigError, match="TuningConfig: unknown keys 'prunner' \\(did you mean 'prune'\\?\\)"):
        tuning.TuningConfig.from_dict({**config.to_dict(), "prunner": True})
    with pytest.raises(ConfigError, match="heartbeat_s: expected whole seconds"):
        config.replace(heartbeat_s=0)


def fake_train(calls, steps=(2, 4, 6, 8)):
    """A train() stand-in: val_loss falls with the step and is lowest at lr = 1e-3, reported through on_eval."""

    def train(config, data, out_dir, *, resume=True, progress=True, on_eval=None):
        final = 1 + abs(math.log10(config.train.lr) + 3)
        for step in steps:
            calls.append((out_dir.name, step))
            if on_eval is not None:
                on_eval(step, {"step": step, "tokens": step * 64, "val_loss": final + 1 / step})
        summary = {
            "val_loss": final + 1 / 8,
            "best_val_loss": final + 1 / 8,
            "num_params": 100,
            "elapsed_s": 0.1,
            "steps": 8,
            "tokens": 512,
            "status": "completed",
        }
        return types.SimpleNamespace(summary=summary)

    return train


def test_pruned_study_resumes_from_sqlite_and_workers_join(data, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(tuning, "train", fake_train(calls))
    study = tune(
        TINY, SPACE, data, tmp_path, n_trials=10, study_name="s", seed=0, pruner_startup_trials=2, progress=False
    )
    assert (tmp_path / "study.db").exists() and (tmp_path / "trials.csv").exists()
    states = [t.state for t in study.trials]
    assert len(states) == 10 and optuna.trial.TrialState.PRUNED in states
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert all(len([c for c in calls if c[0] == str(t.number)]) < 4 for t in pruned)  # stopped before the last eval
    assert study.best_trial.user_attrs["overrides"]["train.lr"] == study.best_params["lr"]

    again = tune(
        TINY, SPACE, data, tmp_path, n_trials=3, study_name="s", seed=0, pruner_startup_trials=2, progress=False
    )
    assert [t.number for t in again.trials] == list(range(13))  # continued, not restarted

    # random start-up trials of a resumed study must not replay the first call's draws
    tune(TINY, SPACE, data, tmp_path, n_trials=2, study_name="r", sampler_startup_trials=10, progress=False)
    resumed = tune(TINY, SPACE, data, tmp_path, n_trials=2, study_name="r", sampler_startup_trials=10, progress=False)
    assert len(resumed.trials) == 4 and len({t.params["lr"] for t in resumed.trials}) == 4

    config = tmp_path / "tuning.json"
    assert json.loads(config.read_text())["study_name"] == "r"
    joined = tuning.main(
        ["--config", str(config), "--study-name", "s", "--n-trials", "2", "--device", "cpu", "--seed", "7"]
    )
    assert len(joined.trials) == 15

    with pytest.raises(ConfigError, match="started with another base"):
        tune(
            RunConfig.from_dict(TINY).override({"model.d_model": 32}), SPACE, data, tmp_path, n_trials=1, study_name="s"
        )

    from labutils import plotting

    for fig in (
        plotting.plot_tuning_history(joined),
        plotting.plot_param_importances(joined),
        plotting.plot_parallel_coordinates(joined),
    ):
        assert isinstance(fig, plt.Figure) and fig.axes[0].get_title()
        plt.close(fig)
    # the title says how the colour map draws a low loss, and the best trial's line is drawn that way
    fig = plotting.plot_parallel_coordinates(joined)
    lines = fig.axes[0].get_lines()[: len([t for t in joined.trials if t.state == optuna.trial.TrialState.COMPLETE])]
    best, worst = lines[-1].get_color(), lines[0].get_color()  # drawn worst first, best last

    def luminance(rgba):
        return 0.2126 * rgba[0] + 0.7152 * rgba[1] + 0.0722 * rgba[2]

    shade = "darker" if luminance(best) < luminance(worst) else "lighter"
    assert f"{shade} = lower" in fig.axes[0].get_title()
    plt.close(fig)
    assert plotting.shade_of_low(plt.get_cmap("viridis")) == "darker"
    assert plotting.shade_of_low(plt.get_cmap("viridis_r")) == "lighter"

    paths = plotting.save_tuning_figures(joined, tmp_path / "figures")
    finished = sum(t.state == optuna.trial.TrialState.COMPLETE for t in joined.trials)
    assert finished < plotting.MIN_TRIALS_FOR_IMPORTANCE  # too few for an importance plot: it is left out
    assert sorted(paths) == ["history", "parallel"] and all(p.stat().st_size > 10_000 for p in paths.values())


def test_real_trials_then_best_rerun_over_seeds(data, tmp_path):
    space = {"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}
    study = tune(TINY, space, data, tmp_path, n_trials=2, study_name="real", seed=0, progress=False)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert json.loads((tmp_path / "trials" / "1" / "summary.json").read_text())["tokens"] == 8 * 4 * 16
    trial_config = json.loads((tmp_path / "trials" / "1" / "config.json").read_text())["train"]
    assert trial_config["eval_split"] == "selection"  # the search chooses on the first half of val only
    result = tuning.rerun_best(study, data, tmp_path / "rerun", n_seeds=2)
    # three arms: untuned, the untuned config at the tuned LR alone, tuned
    assert result.summary["variant"].tolist() == ["baseline", "lr_only", "tuned"] and result.summary["n"].tolist() == [
        2,
        2,
        2,
    ]
    assert result.study.variants["lr_only"] == {"train.lr": study.best_params["train.lr"]}
    assert result.study.metric == "confirm_loss" and sorted(result.runs["seed"].unique()) == [1000, 1001]
    assert {t.user_attrs["seed"] for t in study.trials}.isdisjoint({1000, 1001})
    # every confirmation number is the run's best checkpoint on the half of val the search never saw
    from labutils.evaluation import evaluate

    for row in result.runs.itertuples():
        run_dir = tmp_path / "rerun" / "runs" / row.variant / f"seed{row.seed}"
        assert row.confirm_loss == pytest.approx(
            evaluate(run_dir, data, "confirmation", device="cpu")["confirmation_loss"]
        )
        assert row.confirm_loss != pytest.approx(row.val_loss)  # not the selection number under another name
        assert row.confirm_bpb == pytest.approx(row.confirm_loss / math.log(2))  # ASCII characters: one token, one byte
    best = result.best_config()
    assert best["metric"] == "confirm_loss"
    means = result.summary.set_index("variant")[["confirm_loss_mean", "confirm_bpb_mean"]]
    assert best["variant"] == means["confirm_loss_mean"].idxmin()
    assert best["confirm_loss_mean"] == pytest.approx(means["confirm_loss_mean"].min())
    assert best["confirm_bpb_mean"] == pytest.approx(means.loc[best["variant"], "confirm_bpb_mean"])
    assert "bits/byte" in result.markdown() and "confirm_bpb_mean" in result.table
    with pytest.raises(ConfigError, match="overlap the seeds trials trained with"):
        tuning.rerun_best(study, data, tmp_path / "clash", n_seeds=1, first_seed=trial_config["seed"])


def test_pruning_compares_trials_by_tokens_and_never_at_the_end_of_the_budget(data, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(tuning, "train", fake_train(calls))
    # a pruner that prunes every report it sees: only the end-of-budget evaluation may escape it
    monkeypatch.setattr(tuning.optuna.pruners, "MedianPruner", lambda **kw: optuna.pruners.ThresholdPruner(upper=0.0))
    study = tune(TINY, SPACE, data, tmp_path, n_trials=2, study_name="t", seed=0, progress=False)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED] * 2
    assert all(list(t.intermediate_values) == [128] for t in study.trials)  # reported in tokens: step 2 x 4 x 16

    final_only = RunConfig.from_dict(TINY).override(
        {"train.eval_interval": 8}
    )  # one evaluation, at the end of the budget
    calls.clear()
    monkeypatch.setattr(tuning, "train", fake_train(calls, steps=(8,)))
    finished = tune(final_only, SPACE, data, tmp_path / "f", n_trials=2, study_name="f", seed=0, progress=False)
    assert [t.state for t in finished.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert all(list(t.intermediate_values) == [512] for t in finished.trials)
    assert finished.best_trial.number in (0, 1)


def test_study_name_changes_with_the_library_code_and_other_studies_are_counted(data, tmp_path, monkeypatch):

    base = RunConfig.from_dict(TINY)
    name = tuning.study_name_for(base, SPACE)
    assert tuning.study_name_for(base, SPACE) == name and tuning.study_name_for(base, {}) != name
    monkeypatch.setattr(freshness, "training_fingerprint", lambda: "other code")
    assert tuning.study_name_for(base, SPACE) != name
    monkeypatch.setattr(tuning, "train", fake_train([]))
    old = tune(TINY, SPACE, data, tmp_path, n_trials=2, study_name="old", progress=False)
    new = tune(TINY, SPACE, data, tmp_path, n_trials=1, study_name="new", progress=False)
    assert tuning.trials_of_other_studies(new) == 2 and tuning.trials_of_other_studies(old) == 1


def test_storage_errors_name_the_fix(data, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="database URL"):
        tune(TINY, SPACE, data, tmp_path, n_trials=1, storage="study.db")
    with pytest.raises(ConfigError, match="journal storage needs a file"):
        tuning.open_storage("journal:", tmp_path)
    with pytest.raises(ConfigError, match="heartbeat_s: expected whole seconds"):
        tuning.open_storage(None, tmp_path, heartbeat_s=0)
    # nothing listens on port 1: the message says what to check, and hides the password
    with pytest.raises(
        ConfigError,
        match=r"postgresql://u:\*\*\*@127.0.0.1:1/db: cannot open the database \(.*refused.*Check that the server runs",
    ):
        tuning.open_storage("postgresql://u:secret@127.0.0.1:1/db", tmp_path)
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as on a fresh install without the extra: the import fails
    with pytest.raises(ConfigError, match=r"psycopg is not installed.*pip install 'labutils\[postgres\]'"):
        tuning.open_storage("postgresql://u@127.0.0.1:1/db", tmp_path)


def test_tuning_json_keeps_no_password_and_a_worker_must_bring_it(data, tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "train", fake_train([]))
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    assert tuning.public_url("postgresql://me:secret@db.lab:5432/optuna") == "postgresql://me:***@db.lab:5432/optuna"
    assert (
        tuning.public_url(url) == url
        and tuning.public_url("postgresql://me@db.lab/optuna") == "postgresql://me@db.lab/optuna"
    )
    tune(TINY, SPACE, data, tmp_path, n_trials=1, storage=url, study_name="p", progress=False)
    config = tmp_path / "tuning.json"
    spec = json.loads(config.read_text())
    assert spec["storage"] == url and spec["heartbeat_s"] == 60
    config.write_text(
        json.dumps({**spec, "storage": "postgresql://me:***@db.lab/optuna"})
    )  # as tune() writes a URL with a password
    with pytest.raises(ConfigError, match="without its password.*--storage.*PGPASSWORD"):
        tuning.main(["--config", str(config), "--n-trials", "1"])
    joined = tuning.main(["--config", str(config), "--storage", url, "--n-trials", "1", "--heartbeat-s", "5"])
    assert len(joined.trials) == 2 and json.loads(config.read_text())["heartbeat_s"] == 5


def test_journal_storage_takes_two_workers_in_separate_processes(data, tmp_path):
    """The no-database path for clusters with a shared disk: Optuna's journal file, locked for concurrent writers."""
    space = {"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}
    journal = tmp_path / "shared" / "study.journal"
    study = tune(
        TINY,
        space,
        data,
        tmp_path / "out",
        n_trials=1,
        storage=f"journal:{journal}",
        study_name="j",
        prune=False,
        progress=False,
    )
    assert journal.exists() and isinstance(study._storage, optuna.storages.JournalStorage)
    config = tmp_path / "out" / "tuning.json"
    assert json.loads(config.read_text())["storage"] == f"journal:{journal}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "labutils.tuning", "--config", str(config), "--n-trials", "2"],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    for worker in workers:
        out, _ = worker.communicate(timeout=240)
        assert worker.returncode == 0, out[-3000:]
    trials = optuna.load_study(study_name="j", storage=tuning.open_storage(f"journal:///{journal}", tmp_path)).trials
    assert len(trials) == 5 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sorted(t.number for t in trials) == list(range(5)) and len({t.user_attrs["run_dir"] for t in trials}) == 5
    assert len({t.params["train.lr"] for t in trials}) == 5  # trials draw apart: each is seeded by its number
    with pytest.raises(ConfigError, match="n_trials or timeout"):
        tune(TINY, SPACE, data, tmp_path)


def test_a_search_cut_mid_trial_continues_that_trial_and_ends_as_an_uninterrupted_one(
    data, tmp_path, hooked, one_thread
):
    """notebook 04's totals: a search killed during trial 1 (SystemExit leaves it RUNNING, as SIGKILL does) is
    continued by the same call: trial 1 from its checkpoint under its own number, then trial 2, and the study
    equals one that was never cut. Once the totals are reached, the same call trains nothing."""
    space = {
        "train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
        "train.warmup_steps": {"type": "int", "low": 0, "high": 3},
    }
    search = dict(n_trials=3, total=True, study_name="s", progress=False)
    whole = tune(TINY, space, data, tmp_path / "whole", **search)

    def kill(loss):
        raise SystemExit("killed")

    hooked.calls, hooked.at, hooked.action, hooked.once = (
        0,
        8 + 6,
        kill,
        True,
    )  # trial 1, step 6 of 8: past its checkpoint at 4
    with pytest.raises(SystemExit):
        tune(TINY, space, data, tmp_path / "cut", **search)
    storage = tuning.open_storage(None, tmp_path / "cut")
    states = [t.state for t in optuna.load_study(study_name="s", storage=storage).trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING]

    hooked.at, before = None, hooked.calls
    cut = tune(TINY, space, data, tmp_path / "cut", **search)
    assert hooked.calls - before == (8 - 4) + 8  # trial 1 from step 4, then all of trial 2
    assert [(t.number, t.state, t.params, t.value) for t in cut.trials] == [
        (t.number, t.state, t.params, t.value) for t in whole.trials
    ]
    assert json.loads((tmp_path / "cut" / "trials" / "1" / "environment.json").read_text())["resumed_from_step"] == 4

    before = hooked.calls
    assert len(tune(TINY, space, data, tmp_path / "cut", **search).trials) == 3 and hooked.calls == before
    more = tune(TINY, space, data, tmp_path / "cut", **{**search, "n_trials": 4})
    assert len(more.trials) == 4 and (
        more.trials[3].params
        == tune(TINY, space, data, tmp_path / "whole", **{**search, "n_trials": 4}).trials[3].params
    )
    spent = more.user_attrs["search_s"]
    assert (
        spent > 0
        and len(tune(TINY, space, data, tmp_path / "cut", **{**search, "n_trials": 9, "timeout": spent}).trials) == 4
    )


@pytest.mark.parametrize("startup", [10, 2], ids=["random start-up", "TPE model"])
def test_a_trial_cut_between_two_of_its_parameters_draws_the_rest_as_an_uncut_one(tmp_path, startup):
    """The kill CI once caught: trial 3 stored 2 of its 5 parameters, then died. Continued in a fresh process (a
    new sampler, the same storage), it samples the other 3 as the uncut trial 3 did."""
    names = [f"p{i}" for i in range(5)]

    def draw(trial, only=None):
        return sum(trial.suggest_float(n, 1e-4, 1.0, log=True) for n in names[:only])

    def study(folder):
        folder.mkdir(exist_ok=True)
        return optuna.create_study(
            study_name="s",
            storage=f"sqlite:///{folder}/study.db",
            load_if_exists=True,
            sampler=tuning.TrialSeededSampler(0, n_startup_trials=startup),
        )

    whole = study(tmp_path / "whole")
    whole.optimize(draw, n_trials=5)
    cut = study(tmp_path / "cut")
    cut.optimize(draw, n_trials=3)
    draw(cut.ask(), only=2)  # ... and the process dies here: trial 3 RUNNING with p0 and p1 stored
    continued = study(tmp_path / "cut")
    [frozen] = continued.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    continued.tell(frozen.number, draw(optuna.trial.Trial(continued, frozen._trial_id)))
    continued.optimize(draw, n_trials=1)
    assert [t.params for t in continued.trials] == [t.params for t in whole.trials]


def test_a_search_cut_after_a_trial_completed_but_before_it_was_told_does_not_train_it_again(
    data, tmp_path, hooked, one_thread, monkeypatch
):
    """The kill lands between trial 1's last write and the storage hearing of it (RUNNING, summary completed):
    continuing tells trial 1 what its run found, trains only trial 2, and the study equals one never cut."""
    search = dict(n_trials=3, total=True, study_name="s", progress=False)
    whole = tune(TINY, SPACE, data, tmp_path / "whole", **search)
    real_train = tuning.train

    def train_then_die(config, data, run_dir, **kwargs):
        run = real_train(config, data, run_dir, **kwargs)
        if run_dir.name == "1":
            raise SystemExit("killed")
        return run

    monkeypatch.setattr(tuning, "train", train_then_die)
    with pytest.raises(SystemExit):
        tune(TINY, SPACE, data, tmp_path / "cut", **search)
    written = (tmp_path / "cut" / "trials" / "1" / "summary.json").stat().st_mtime_ns
    monkeypatch.setattr(tuning, "train", real_train)
    before = hooked.calls
    cut = tune(TINY, SPACE, data, tmp_path / "cut", **search)
    assert hooked.calls - before == 8  # trial 2 only
    assert (tmp_path / "cut" / "trials" / "1" / "summary.json").stat().st_mtime_ns == written
    assert [(t.number, t.state, t.params, t.value) for t in cut.trials] == [
        (t.number, t.state, t.params, t.value) for t in whole.trials
    ]


def test_trials_in_parallel_worker_processes_share_one_total(data, tmp_path):
    """`devices='cpu*2'` (as 'cuda:0*4' on a GPU): two worker processes fill the study to its total, no trial twice."""
    space = {"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}
    study = tune(
        TINY,
        space,
        data,
        tmp_path,
        n_trials=4,
        total=True,
        devices="cpu*2",
        study_name="p",
        prune=False,
        progress=False,
    )
    # two workers can race for the last slot: the loser's trial is failed as surplus before it trains (see the test
    # below)
    trained = [t for t in study.trials if not t.user_attrs.get("surplus")]
    assert [t.state for t in trained] == [optuna.trial.TrialState.COMPLETE] * 4 and tuning.counted_trials(study) == 4
    assert len({t.params["train.lr"] for t in trained}) == 4
    assert all((tmp_path / "trials" / str(t.number) / "summary.json").exists() for t in trained)
    assert not any((tmp_path / "trials" / str(t.number)).exists() for t in study.trials if t.user_attrs.get("surplus"))
    again = tune(
        TINY,
        space,
        data,
        tmp_path,
        n_trials=4,
        total=True,
        devices="cpu*2",
        study_name="p",
        prune=False,
        progress=False,
    )
    assert len(again.trials) == len(study.trials)


def test_two_workers_racing_for_the_last_slot_train_it_once(data, tmp_path, monkeypatch):
    """Checking the total and creating a trial are two steps: a worker that passed the check while another created
    the last counted trial gets a surplus trial, which is failed at once, untrained, and not counted."""
    calls = []
    monkeypatch.setattr(tuning, "train", fake_train(calls))
    config = tuning.TuningConfig.build(TINY, SPACE, data, tmp_path, study_name="race", prune=False)
    study = tuning.open_study(config)
    search = tuning.Search(config.trial_base(), config.search_space, config.data, config.out_path, config.metric)
    ask = study.ask

    def the_other_worker_asks_first(*args, **kwargs):
        monkeypatch.setattr(study, "ask", ask)
        ask()  # the other worker's trial 0, still running: the last of a total of one
        return ask(*args, **kwargs)

    monkeypatch.setattr(study, "ask", the_other_worker_asks_first)
    tuning._optimize(study, search, n_trials=1, timeout=None, stop_at=1, spent_before=0.0)
    other, ours = study.trials
    assert other.state == optuna.trial.TrialState.RUNNING and ours.state == optuna.trial.TrialState.FAIL
    assert ours.user_attrs["surplus"] is True and ours.params == {} and calls == []  # nothing sampled, nothing trained
    assert tuning.counted_trials(study) == 1 and not (tmp_path / "trials" / "1").exists()


def test_a_worker_that_starts_late_adds_no_trial_past_the_total(data, tmp_path, monkeypatch):
    """A spawned worker can start after the others have filled the study: it must run only what is left."""
    monkeypatch.setattr(tuning, "train", fake_train([]))
    config = tuning.TuningConfig.build(TINY, SPACE, data, tmp_path, study_name="late", prune=False)
    assert len(tuning.tune(config, n_trials=3, total=True, progress=False).trials) == 3
    search = tuning.Search(config.trial_base(), config.search_space, config.data, config.out_path, config.metric)
    tuning._optimize(tuning.open_study(config), search, n_trials=3, timeout=None, stop_at=3, spent_before=0.0)
    assert len(tuning.open_study(config).trials) == 3  # its n_trials came from before the others finished
    tuning._optimize(tuning.open_study(config), search, n_trials=3, timeout=None, stop_at=4, spent_before=0.0)
    assert len(tuning.open_study(config).trials) == 4  # one more total: one trial, not its n_trials of 3


# --------------------------------------------------------------------------- reading a search (issue: 04 read
# correctly)


def _finished_study(best: dict, others: list[dict], space: dict):
    import optuna

    from labutils.tuning import validate_search_space

    space = validate_search_space(
        space, RunConfig.build("minigpt", {"max_steps": 10, "warmup_steps": 1}, vocab_size=65)
    )
    dists = {
        name: (
            optuna.distributions.FloatDistribution(p["low"], p["high"], log=p["log"])
            if p["type"] == "float"
            else optuna.distributions.CategoricalDistribution(p["choices"])
        )
        for name, p in space.items()
    }
    study = optuna.create_study()
    for value, params in [(1.0, best), *[(2.0 + i, p) for i, p in enumerate(others)]]:
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=value))
    return study, space


def test_a_best_value_at_the_edge_of_its_range_is_flagged_with_a_wider_range():
    space = {
        "lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True, "target": "train.lr"},
        "dropout": {"type": "float", "low": 0.0, "high": 0.2, "target": "model.dropout"},
        "batch_size": {"type": "categorical", "choices": [16, 32], "target": "train.batch_size"},
    }
    # lr at 97.6% of its log range (the committed run's case), dropout in the middle
    study, space = _finished_study(
        {"lr": 1e-3 * 10**0.976, "dropout": 0.1, "batch_size": 16},
        [{"lr": 2e-3, "dropout": 0.05, "batch_size": 32}],
        space,
    )
    flags = {f["name"]: f for f in tuning.edge_flags(study, space)}
    assert set(flags) == {"lr"} and flags["lr"]["side"] == "high"
    assert flags["lr"]["next_low"] == 1e-3 and flags["lr"]["next_high"] == pytest.approx(1e-2 * math.sqrt(10))
    study, space = _finished_study({"lr": 3e-3, "dropout": 0.005, "batch_size": 16}, [], space)
    flags = tuning.edge_flags(study, space)
    assert [(f["name"], f["side"], f["next_low"]) for f in flags] == [("dropout", "low", pytest.approx(-0.1))]


def test_the_confirmation_splits_the_gain_into_the_lr_and_the_rest_and_measures_optimism_on_the_choosing_windows():
    import pandas as pd

    rows = []
    for seed, (untuned, lr_only, tuned) in enumerate([(2.0, 1.9, 1.85), (2.1, 1.98, 1.96), (2.05, 1.96, 1.9)]):
        rows += [
            {"variant": v, "seed": 1000 + seed, "confirm_loss": x, "val_loss": x + 0.1}
            for v, x in (("baseline", untuned), ("lr_only", lr_only), ("tuned", tuned))
        ]
    runs = pd.DataFrame(rows)
    gains = tuning.confirmation_gains(runs)
    assert gains["total"]["mean"] == pytest.approx(-0.1467, abs=1e-4) and gains["total"]["n"] == 3
    assert gains["lr"]["mean"] + gains["rest"]["mean"] == pytest.approx(gains["total"]["mean"])
    d = np.array([-0.1, -0.12, -0.09])  # lr_only - untuned, seed by seed
    half = stats.t_quantile(2) * d.std(ddof=1) / math.sqrt(3)
    assert (gains["lr"]["ci_low"], gains["lr"]["ci_high"]) == pytest.approx((d.mean() - half, d.mean() + half))

    class Best:  # the tuner saw 1.9 (rounded); the run scored 1.9004: optimism is measured from the run's score
        best_value = 1.9
        best_trial = types.SimpleNamespace(value=1.9, user_attrs={"loss": 1.9004})

    assert tuning.optimism(Best(), runs) == {
        "best_trial_value": 1.9004,
        "same_config_new_seeds": pytest.approx(2.0033, abs=1e-4),
        "n": 3,
        "optimism": pytest.approx(0.1029, abs=1e-4),
    }


def test_the_tuner_decides_on_losses_rounded_far_below_the_seed_noise():
    """Two executions whose losses differ in the 8th digit give TPE and the pruner the same values (issue 48: such
    a difference sampled another trial 13, and 04 reached another verdict); the exact loss is kept for reports."""
    assert tuning.decision_value(2.02134567, 1e-3) == tuning.decision_value(2.02134567 + 1e-8, 1e-3) == 2.021
    assert tuning.decision_value(2.0213, 0) == 2.0213 and math.isnan(tuning.decision_value(float("nan"), 1e-3))
    with pytest.raises(ConfigError, match="decision_resolution"):
        tuning.TuningConfig.build(TINY, SPACE, "data", "out", decision_resolution=0.1)

    def search(shift: float) -> list:
        """20 seeded trials of a smooth loss, each value moved by `shift`: the parameters each trial drew."""
        study = optuna.create_study(sampler=tuning.TrialSeededSampler(0, 5), pruner=optuna.pruners.NopPruner())

        def objective(trial):
            x, y = trial.suggest_float("x", 1e-4, 1e-1, log=True), trial.suggest_float("y", 0.0, 1.0)
            loss = 2.0 + (math.log10(x) + 2.5) ** 2 / 10 + (y - 0.3) ** 2 / 10 + shift * (-1) ** trial.number
            trial.set_user_attr("loss", loss)
            return tuning.decision_value(loss, 1e-3)

        study.optimize(objective, n_trials=20)
        return study

    first, second = search(+1e-8), search(-1e-8)
    assert [t.params for t in first.trials] == [t.params for t in second.trials]
    assert tuning.exact_loss(first.best_trial) != first.best_value  # the exact value is the run's, not the rounded
    assert abs(tuning.exact_loss(first.best_trial) - first.best_value) <= 5e-4


def _study_with(values: list[float | None], intermediate: list[float] | None = None) -> optuna.Study:
    """An in-memory study whose trial i finished with values[i] (None: still running), each with one intermediate
    value at step 10 (intermediate[i], else its value)."""
    study = optuna.create_study(direction="minimize")
    lr = optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True)
    for i, value in enumerate(values):
        running = value is None
        study.add_trial(
            optuna.trial.create_trial(
                state=optuna.trial.TrialState.RUNNING if running else optuna.trial.TrialState.COMPLETE,
                value=None if running else value,
                params={"lr": 10 ** (-5 + 4 * ((i * 0.37) % 1))},
                distributions={"lr": lr},
                intermediate_values={} if running else {10: (intermediate or values)[i]},
            )
        )
    return study


def test_a_draw_sees_only_the_trials_below_n_minus_lag_whatever_finished_meanwhile():
    """Issue 48: with workers in parallel, trial n's draw saw whichever trials had finished, so two executions of 04
    on the same inputs drew different trials. With a lag, trial 6 draws the same value whether trials 4 and 5 are
    still running or have finished (with any result); without one, their results move the draw."""
    lr = optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True)

    def draw(study, lag):
        trial = study.ask()
        assert trial.number == 6
        return tuning.TrialSeededSampler(0, 2, lag).sample_independent(study, study.trials[6], "lr", lr)

    early = [3.0, 1.0, 2.5, 1.2]
    running, finished_well = _study_with([*early, None, None]), _study_with([*early, 0.1, 0.1])
    assert draw(running, lag=2) == draw(finished_well, lag=2) == draw(_study_with([*early, 9.0, 9.0]), lag=2)
    assert draw(_study_with([*early, 0.1, 0.1]), lag=0) != draw(_study_with([*early, 9.0, 9.0]), lag=0)


def test_a_pruning_decision_sees_only_the_trials_below_n_minus_lag():
    """The pruner reads the same history as the draw: trial 6 at 1.0 against trials 0-1 (at 2.0) goes on; against
    all six (four at 0.1) it would be pruned."""
    study = _study_with([2.0, 2.0, 0.1, 0.1, 0.1, 0.1])
    study.ask()  # trial 6, running, as in a worker
    trial = study.trials[6]
    storage, trial_id = study._storage, trial._trial_id
    storage.set_trial_intermediate_value(trial_id, 10, 1.0)
    trial = storage.get_trial(trial_id)
    median = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    assert not tuning.PrunerBefore(median, lag=4).prune(study, trial)
    assert tuning.PrunerBefore(median, lag=0).prune(study, trial)


def test_a_trial_waits_until_the_trials_it_draws_from_have_finished(monkeypatch):
    """Trial 2 with lag 1 draws from trial 0, which another worker still trains: it waits until that one is told
    (here: during its first wait) and says which it waited for; one whose history has finished waits for nothing."""
    study = optuna.create_study(direction="minimize")
    first = study.ask()
    study.ask(), study.ask()
    waits = []

    def other_worker_finishes(seconds):
        waits.append(seconds)
        study.tell(first, 1.0)

    monkeypatch.setattr(tuning.time, "sleep", other_worker_finishes)
    assert tuning.wait_for_history(study, 2, lag=1) == [0] and len(waits) == 1
    assert tuning.wait_for_history(study, 2, lag=1) == [] and len(waits) == 1
    # trial 1 still runs; an hour on, past the patience (its worker presumed dead), trial 3 draws without it
    import datetime

    later = datetime.datetime.now() + datetime.timedelta(hours=1)
    monkeypatch.setattr(tuning, "datetime", types.SimpleNamespace(datetime=types.SimpleNamespace(now=lambda: later)))
    with pytest.warns(UserWarning, match="trial 3 draws without trial 1.*seems to have died"):
        assert tuning.wait_for_history(study, 3, lag=1) == []
    assert len(waits) == 1


def test_two_workers_draw_and_prune_what_one_worker_does_at_the_same_lag(data, tmp_path):
    """Issue 48: which worker finishes first decides nothing. Six trials on two worker processes (lag 2 by default)
    draw the same parameters and reach the same states as one worker given lag 2 in this process."""
    space = {"train.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}}
    settings = {"n_trials": 6, "total": True, "sampler_startup_trials": 2, "pruner_startup_trials": 1}
    two = tune(TINY, space, data, tmp_path / "two", devices="cpu*2", progress=False, **settings)
    one = tune(TINY, space, data, tmp_path / "one", history_lag=2, progress=False, **settings)
    assert two.user_attrs["history_lag"] == one.user_attrs["history_lag"] == 2

    def decisions(study):
        trained = sorted((t for t in study.trials if not t.user_attrs.get("surplus")), key=lambda t: t.number)
        return [(t.params["train.lr"], t.state) for t in trained]

    assert decisions(two) == decisions(one) and len(decisions(one)) == 6
    assert len({lr for lr, _ in decisions(one)}) == 6


def test_04s_report_says_what_each_draw_could_see_when_trials_ran_in_parallel():
    """findings.tuning_search: a lag is named with the trials a draw reads; a sequential search says nothing of it."""
    from labutils import findings

    study = _study_with([2.0, 1.0, 1.5])
    assert "drawn and judged" not in findings.tuning_search(study, [], 10)
    study.set_user_attr("history_lag", 2)
    assert "Trial n was drawn and judged on trials 0 to n-3 only" in findings.tuning_search(study, [], 10)
