# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Tuning
# Optuna (TPE sampler, median pruner fed with validation losses) searches the hyper-parameters of
# the best architecture from 03. The study lives in `results/04_tuning/study.db`, so re-running
# continues it; other GPUs or machines join with one command (docs/scale-out.md). Trials are
# scored on the selection half of the validation split and pruned by tokens seen; the study's name
# includes labutils' code, so trials scored by older code are left out (and counted below). The
# best trial is then confirmed: re-run with seeds no trial used, beside the untuned config and the untuned
# config at the tuned LR alone, and scored on the other half of val, which the search never saw. Only the
# confirmation is held out. Every trial trains exactly 03's tokens (03 hands its budget on), and every
# number stands beside the count models' on the same windows.
# `n_trials` and `timeout` are the study's totals: a search cut off continues where it stopped.

# %% tags=["parameters"]
profile = "auto"  # smoke | cpu | gpu | auto
tokenizer = "char"
n_trials = None  # trials in the study in all: a re-run after a cut continues up to this (None: the profile's)
timeout = None  # seconds of search in all, over re-runs (None: the profile's)
devices = None  # e.g. "cuda:0*4": four trials at once on one GPU, "0,1": one per GPU (None: the profile's)
n_seeds = None  # seeds for the re-run of the best trial (None: the profile's)
# The search space: name -> {"type": float | int | categorical, "low"/"high" (+ "log") or "choices",
# "target": the dotted config key it sets}. Pass another with papermill's -y/-f YAML options.
search_space = {
    "lr": {"type": "float", "low": 1e-3, "high": 2e-2, "log": True, "target": "train.lr"},
    "warmup_steps": {"type": "int", "low": 0, "high": 30, "target": "train.warmup_steps"},
    "weight_decay": {"type": "float", "low": 0.0, "high": 0.2, "target": "train.weight_decay"},
    "dropout": {"type": "float", "low": 0.0, "high": 0.2, "target": "model.dropout"},
    "batch_size": {"type": "categorical", "choices": [16, 32, 64], "target": "train.batch_size"},
    "beta2": {"type": "float", "low": 0.9, "high": 0.999, "target": "train.betas.1"},
    "label_smoothing": {"type": "float", "low": 0.0, "high": 0.1, "target": "train.label_smoothing"},
}
# None: sqlite in out_dir; shared: "postgresql://user@host/db" (the postgres extra) or
# "journal:/shared/disk/study.journal"
storage = None
study_name = None  # None: derived from the base config and search space, so a changed base starts a new study
lr = None  # fixes the base learning rate (the search still explores it when "lr" is in search_space)
out_dir = "results/04_tuning"
archive_reason = None  # your words on why earlier results are replaced; what changed is computed and added
tracking = None  # also log the runs to "tensorboard", "mlflow" or "tensorboard,mlflow" (csv always)

# %%
from labutils import findings, plotting, profiles, references, stage_folders, stats, tuning

# the parameters as given, before any is resolved: start_stage records them
parameters = dict(
    profile=profile,
    tokenizer=tokenizer,
    n_trials=n_trials,
    timeout=timeout,
    devices=devices,
    n_seeds=n_seeds,
    search_space=search_space,
    storage=storage,
    study_name=study_name,
    lr=lr,
)
profile = profiles.resolve(profile)
settings = profiles.tuning_settings(profile, n_trials=n_trials, timeout=timeout, n_seeds=n_seeds, devices=devices)
prepared = profiles.stage_data(out_dir, tokenizer)
base = profiles.base_config(
    out_dir, "03_ablations", profile, prepared.vocab_size
)  # 03's best; the profile's baseline if 03 has not run
ablation = profiles.ablation_study(profile, base, {}, lr=lr)  # 03's token budget (its hand-off's) and evaluation set
space = tuning.validate_search_space(search_space, ablation.base)
study_name = study_name or tuning.study_name_for(ablation.base, space)
stage = stage_folders.start_stage(
    out_dir, archive_reason, parameters=parameters, tracking=tracking
)  # archives earlier results; study.db stays
findings.show(findings.search_space_table(space))

# %%
search = tuning.TuningConfig.build(
    ablation.base, space, prepared, stage, study_name=study_name, storage=storage, budget="tokens"
)
study = tuning.tune(
    search, n_trials=settings["n_trials"], timeout=settings["timeout"], total=True, devices=settings["devices"]
)
tuning.save_trials_table(study, stage)  # also when every trial had run before (a re-run after a report change)
findings.show(
    f"{len(study.trials)} trials in study `{study.study_name}`; {tuning.trials_of_other_studies(study)} trials of "
    "earlier code or settings in the same storage are left out."
)
study.trials_dataframe()[["number", "value", "state"]].tail(10).style.format({"value": "{:.4f}"}).hide(axis="index")

# %%
figures = plotting.save_tuning_figures(study, stage / "figures")  # the optimisation history is the key figure
edges = tuning.edge_flags(study, space)
findings.show(findings.tuning_search(study, edges, plotting.MIN_TRIALS_FOR_IMPORTANCE))

# %% [markdown]
# ## Confirmation: the best trial on seeds and tokens the search never saw
# The best trial's value chose it, on its own seed and the selection tokens, so it is optimistic.
# The confirmation trains three arms with other seeds (1000 on): the untuned config, the untuned config
# at the tuned LR only, and the tuned config; it scores each run's best checkpoint on every token of the
# confirmation half of val (held-out numbers), so the gain splits into what the LR alone buys and the rest.

# %%
rerun = tuning.rerun_best(
    study, prepared, stage / "rerun", n_seeds=settings["n_seeds"], base=ablation.base, devices=settings["devices"]
)
base_variant = (profiles.upstream(out_dir, "03_ablations") or {}).get("variant")  # the untuned arm is 03's choice
arms = stats.arm_records(rerun.summary, metric=rerun.study.metric)
rerun.styled_table(
    labels={"baseline": findings.untuned_label(base_variant)}, caption=findings.confirmation_caption(arms, base_variant)
)

# %%
# 05 takes the tuned values only when they beat the untuned config significantly on the held-out confirmation (else
# 03's choice as it was, or the LR-only arm when that alone is significantly better): a gain nobody could detect is no
# reason to change the final model's recipe
tuned = rerun.best_config(require_significant=True)
tuned_runs = rerun.summary.set_index("variant").loc["tuned"]
selection_refs = references.run_references(prepared, ablation.run_config(ablation.baseline, 0))  # the trials' windows
confirm_refs = references.reference_losses(
    prepared, "confirmation", ablation.base.model.block_size
)  # whole half, as scored
trials_table = tuning.trials_table(study)
finished = trials_table["finished_budget"]
gains = tuning.confirmation_gains(rerun.runs)  # tuned - untuned, LR only - untuned, tuned - LR only: paired over seeds
numbers = {
    **tuned,
    "best_trial": study.best_trial.number,
    "trials": len(study.trials),
    "best_trial_selection_loss": tuning.exact_loss(study.best_trial),
    "tuned_confirm_loss_mean": tuned_runs["confirm_loss_mean"],
    "confirm_seeds": sorted(int(s) for s in rerun.runs["seed"].unique()),
    "overrides_tuned": tuning.best_overrides(study),
    "tokens": ablation.max_tokens,
    "ablation_tokens": (profiles.upstream(out_dir, "03_ablations") or {}).get("tokens"),
    "trial_tokens": sorted({int(t) for t in trials_table["tokens"].dropna()}),
    "finished_trials": int(finished.sum()),
    "finished_trials_below_bigram": int((finished & (trials_table["value"] < selection_refs["bigram"])).sum()),
    "selection_references": selection_refs,
    "references": confirm_refs,
    "regime": references.regime(
        float(rerun.summary.set_index("variant").loc["baseline", "confirm_loss_mean"]), confirm_refs
    ),
    "gains": gains,
    "tuning_gain": gains["total"]["mean"],
    "base_variant": base_variant,
    "confirmation_arms": arms,  # each arm's mean and the table's test against the untuned arm
    "optimism": tuning.optimism(study, rerun.runs),
    "edges": edges,
}
gain, handoff_arm = gains["total"], numbers["variant"]
handoff = stage_folders.write_handoff(
    stage / "best.json",
    numbers,
    headline=[
        "variant",
        "confirm_loss_mean",
        "confirm_bpb_mean",
        "tuning_gain",
        "best_trial_selection_loss",
        "trials",
        "tokens",
    ],
    references={
        **findings.references(numbers),
        "variant": "handed on to 05 (tuned only when significant)",
        "confirm_loss_mean": f"{handoff_arm} arm; bigram {confirm_refs['bigram']:.3f}, "
        f"5-gram {confirm_refs['5-gram']:.3f} on the same windows",
        "tuning_gain": f"tuned - untuned, paired over {gain['n']} seeds: 95% CI "
        f"{gain['ci_low']:+.3f} to {gain['ci_high']:+.3f}",
    },
)
findings.show(findings.tuning(handoff, tuning.trials_of_other_studies(study)))
findings.show(
    stage_folders.change_since_previous(
        stage_folders.previous_handoff(stage, "best.json"),
        handoff,
        ["variant", "metric", "val_loss_mean", "confirm_loss_mean", "delta_vs_baseline", "significant", "trials"],
    )
)
findings.show(stage_folders.other_verdicts(stage, "best.json", handoff, ["variant", "significant"]))
