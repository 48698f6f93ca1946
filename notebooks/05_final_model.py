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
# # 05 · Final model
# Write-up 000's final architecture (RoPE + grouped-query attention, char-level) with the
# hyper-parameters 04 found, trained for the profile's budget. Its size comes from the lab's own
# scaling fit first (unless `d_model` or `n_layer` is given). The test split is used here once, for
# the final numbers, and was never used to choose anything.

# %% tags=["parameters"]
profile = "auto"  # smoke | cpu | gpu | auto
tokenizer = None  # None: char (or init_from's own)
init_from = None  # fine-tune this checkpoint instead of training write-up 000's model from scratch (no sizing sweep;
#   a transformers GPT-2/Llama folder or a saved labutils model)
# parameter-name globs kept frozen, e.g. ["tok_emb.*", "blocks.[0-5].*"] (fine-tuning: labutils.model.utils.freeze)
freeze = None
lr = None  # None: 04's tuned value, else the default
batch_size = None  # None: 04's tuned value, else the default
max_tokens = None  # training budget in tokens (None: the profile's)
time_budget_s = None  # wall-clock budget in seconds (None: the profile's)
d_model = None  # None (with n_layer None): the shape the sizing sweep recommends
n_layer = None
block_size = None
# The sizing sweep's design (labutils.scaling.Sweep): 4 budgets over 1.5 decades, the largest 1/8 of the final run's
# FLOPs (the cpu profile: 1/30); 5 sizes a budget from a ladder of widths 1.5x apart (width = 32 x depth), and up to 3
# more where the least loss sits at an edge; 100+ steps a run; 2 seeds at the 2 smallest budgets (the noise floor); the
# LR rule fitted at 3 widths x 5 multiples of the prior's LR. The profile's sizes apply on top (smoke shrinks it to
# seconds).
sweep = {
    "n_budgets": 4,
    "decades": 1.5,
    "extrapolation": 8.0,
    "n_sizes": 5,
    "ladder_ratio": 1.5,
    "max_extensions": 3,
    "min_steps": 100,
    "replicated_budgets": 2,
    "replicate_seeds": 2,
    "lr_fit_multipliers": [0.25, 0.5, 1.0, 2.0, 4.0],
    "lr_fit_widths": 3,
}
seed = None  # the first of the final run's seeds (None: 0)
n_seeds = None  # the final run on this many seeds (None: the profile's, cpu 2, gpu 3); the headline is their mean
out_dir = "results/05_final_model"
archive_reason = None  # your words on why earlier results are replaced; what changed is computed and added
tracking = None  # also log the runs to "tensorboard", "mlflow" or "tensorboard,mlflow" (csv always)

# %%
from labutils import findings, memory, plotting, profiles, references, save_model, scaling, stage_folders

# the parameters as given, before any is resolved: start_stage records them
parameters = dict(
    profile=profile,
    tokenizer=tokenizer,
    init_from=init_from,
    freeze=freeze,
    lr=lr,
    batch_size=batch_size,
    max_tokens=max_tokens,
    time_budget_s=time_budget_s,
    d_model=d_model,
    n_layer=n_layer,
    block_size=block_size,
    sweep=sweep,
    seed=seed,
    n_seeds=n_seeds,
)
init_from = stage_folders.keep_input(init_from, out_dir)  # a model in this stage's own folder: copied out first
profile = profiles.resolve(profile)
profiles.sweep_design(profile, sweep)  # checked before anything is archived
tokenizer = profiles.stage_tokenizer(tokenizer, init_from)
prepared = profiles.stage_data(out_dir, tokenizer)
tuned = profiles.upstream(out_dir, "04_tuning")  # None: 04 has not run, use the defaults
config = profiles.final(
    profile,
    prepared.vocab_size,
    tuned,
    lr=lr,
    batch_size=batch_size,
    max_tokens=max_tokens,
    time_budget_s=time_budget_s,
    d_model=d_model,
    n_layer=n_layer,
    block_size=block_size,
    seed=seed,
    init_from=init_from,
    freeze=freeze,
)
prepared.check_block_size(config.model.block_size, ("train", "val", "test"))
memory.check_fits(config)
stage = stage_folders.start_stage(out_dir, archive_reason, parameters=parameters, tracking=tracking)

# %% [markdown]
# ## Sizing: how big a model for this budget?
# The budget is fixed in tokens of the config above, so in FLOPs (C_f). A compute-budget sweep
# (`labutils.scaling`): 4 budgets over 1.5 decades, the largest C_f / 8 (cpu: C_f / 30), each with 5 sizes of a ladder
# that grows about 1.5x in parameters, centred on 20 tokens a parameter and extended where a budget's
# least loss sits at an edge; every run 100+ steps, 2 seeds at the two smallest budgets. Before it, a
# short LR sweep at 3 widths fits LR(width) = intercept x width^-k, and every size trains at that
# rule. L(N, D) = E + A / N^α + B / D^β is fitted to the runs that beat the unigram, with a
# 1,000-draw parametric bootstrap; a parameter at a bound of the fit is "not identified", and then
# the IsoFLOP fit recommends, or nothing does (05 then trains the config above). The pick is made
# under the repetition cap (8 epochs); the law's own pick is reported beside it. Every run is scored
# in bits per byte on the validation windows the final run is scored on. Skipped when `d_model` or
# `n_layer` is given.

# %%
sizing = None
if d_model is None and n_layer is None and init_from is None:
    sizing = profiles.size_final(profile, config, prepared, stage / "sizing", sweep)
    if sizing.recommendation is not None:  # else the report says why, and the config above is trained
        config = profiles.final(
            profile,
            prepared.vocab_size,
            tuned,
            lr=lr,
            batch_size=batch_size,
            block_size=block_size,
            seed=seed,
            sized=sizing.recommendation,
        )
        memory.check_fits(config)
sized = sizing is not None and sizing.recommendation is not None
profiles.tuned_table(tuned, config, profile, sized=sized).style.format(precision=4, na_rep="—")

# %% [markdown]
# The model fields the final design and the sizing changed from the config 03 and 04 compared and tuned, each with the
# lab's evidence for it: 03's arms that changed that field (at 03's size and budget), the sizing law's pick, or none.

# %%
evidence = profiles.change_evidence(profiles.model_changes(tuned, config), stage, sized=sized)
profiles.model_changes_table(tuned, config, evidence)

# %% [markdown]
# ## The final run, on several seeds
# The same config and the same tokens on each seed; the headline is the mean over seeds, with its 95%
# interval. Each run keeps its best checkpoint on the selection half of validation (never on test). Its
# regularisers are checked against its own curves: train loss ending above validation loss means dropout or
# label smoothing cost more than they save.

# %%
seeds = profiles.final_seeds(profile, seed, n_seeds)
# the seeds train at once on the profile's devices (cpu: two runs, one thread each); a finished run is read back
runs = profiles.final_runs(config, prepared, stage, seeds, devices=profiles.study_devices(profile))
run = next(iter(runs.values()))  # the first seed's: its curves, samples and saved model

# %%
fig = plotting.plot_training_curves(run, title=f"Final model ({profile} profile, seed {next(iter(runs))})")
plotting.save_figure(fig, stage / "figures" / "training_curves.png", key=True)
regularisation = profiles.regularisation_check(runs, config)
findings.show(f"**Regularisation**: {regularisation['verdict']}.")

# %% [markdown]
# ## Held-out numbers, and the fit's extrapolation checked
# The headline is `test_loss`: every token of the test split scored once by each seed's best
# checkpoint, averaged over seeds, the only number here that nothing was chosen on.
# `last10pct_val_loss` is the loss on the last 10% of the corpus (validation + test splits), the
# split on which nanoGPT's shakespeare_char reports its validation loss: kept for that comparison,
# but it includes the validation split that chose this config in 03 and 04. `target_val_loss` is
# the profile's goal on that split and `meets_target` says whether the mean reached it. Beside each:
# unigram, bigram and 5-gram count models fitted on the training split and scored on the same
# tokens. The final runs, past the sweep's largest budget, are also the check of the fit: their
# mean last validation loss against the predicted interval.

# %%
# two seeds give a t(1) interval 12.7 standard errors wide: the seed noise of 03's replicate runs is pooled in
final = profiles.seed_headline(profiles.final_scores(runs, prepared), profiles.ablation_seed_noise(stage))
final.update(
    {
        "best_val_loss": run.summary["best_val_loss"],
        "num_params": run.summary["num_params"],
        "device": run.summary.get("device"),
        **profiles.initial_loss(config, run),
    }
)
final.update(
    profiles.target_check(
        profile,
        final["last10pct_val_loss"],
        [r["last10pct_val_loss"] for r in final["per_seed"]],
        final.get("last10pct_val_loss_ci95"),
        shakespeare=profiles.shakespeare_char(prepared.meta),  # the target and nanoGPT's figure are tiny Shakespeare's
    )
)
final["model_vs_04"] = profiles.model_changes(tuned, config)  # what 03 and 04 never compared in this combination
final["model_vs_04_evidence"] = evidence
final["regularisation"] = regularisation
# count models fitted on the training split, scored on the same whole-split windows as the model
final["references"] = references.reference_losses(prepared, "test", config.model.block_size)
final["last10pct_references"] = references.reference_losses(prepared, "val+test", config.model.block_size)
final["beats_5gram_on_test"] = bool(final["test_loss"] < final["references"]["5-gram"])
if sizing is not None:  # the final runs against the fit's prediction for their own N and D, at their last evaluation
    check = sizing.check(
        run.summary["num_params"],
        run.summary["tokens"],
        run.summary["flops_per_token"] * run.summary["tokens"],
        measured=final["val_bpb"],
    )
    # the lab's own earlier final runs of this profile are check points the law must predict, as this one is
    past = profiles.past_finals_check(
        sizing, stage, profile, prepared, {**final, **run.summary, "model": config.model.to_dict()}
    )
    past.to_csv(stage / "sizing" / "past_runs_check.csv", index=False)
    final["sizing"] = {
        **sizing.to_dict(),
        "check": check,
        "past_runs": scaling.past_runs_summary(past),
        "used": sizing.recommendation is not None,
    }
    final["fit_check"] = check["verdict"]
    sizing.runs.to_csv(stage / "sizing" / "sweep_runs.csv", index=False)
    plotting.save_figure(plotting.plot_sizing(sizing, check), stage / "figures" / "sizing.png")

# %% [markdown]
# ## The law against the lab's own final runs
# Each final run of this profile (this one, and every archived one on the same vocabulary): its loss on the last 10%
# of the corpus against the law's prediction for its parameters and tokens, with the 95% interval for one run. A law
# that predicts worse than a run already measured, by more than its interval's half-width, calls a result the lab has
# reached out of reach (`sizing/past_runs_check.csv`).

# %%
if sizing is not None and not past.empty:
    plotting.save_figure(plotting.plot_past_runs(past), stage / "figures" / "law_vs_past_runs.png")

# %% [markdown]
# ## Does the law know the data repeats?
# The corpus is small, and a long final run repeats it many times; the law above takes every token as fresh. The
# data-constrained law of Muennighoff et al. (2023) counts D tokens over U distinct ones as
# D' = U + U R* (1 - exp(-R / R*)) fresh ones, R = D / U - 1 the repetitions: it is fitted here to the same sweep
# runs, with R* profiled over a grid. R* is read off the runs only when they reach 16 epochs, R* is inside its grid,
# and the law without it fits measurably worse (a likelihood-ratio test at 5%); until then it is "not identified" and
# sizes nothing. The curve: the loss it predicts against epochs for the final's size, beside the same law taking every
# token as fresh; the dot is the final run.

# %%
if sizing is not None:
    repetition = scaling.data_constrained_fit(sizing.law, sizing.train_tokens, noise=sizing.run_noise)
    final["sizing"]["data_constrained"] = repetition.to_dict()
    findings.show(f"**Data-constrained law**: {repetition.sentence}.")
    epochs = run.summary["tokens"] / sizing.train_tokens
    fig = plotting.plot_repetition(repetition, run.summary["num_params"], measured=(epochs, final["val_bpb"]))
    plotting.save_figure(fig, stage / "figures" / "repetition.png")

# %% [markdown]
# ## Samples

# %%
model = profiles.final_model(run, stage / "model")  # its checkpoint, or the shipped model in a clone without it
prompts = ["ROMEO:", "JULIET:\n", "First Citizen:\n"]
samples = profiles.run_samples(run, prepared.tokenizer, prompts, max_new_tokens=300, model=model)
samples.to_csv(stage / "samples.csv", index=False)
samples.style.set_properties(**{"white-space": "pre-wrap", "text-align": "left"}).hide(axis="index")

# %% [markdown]
# ## The saved model
# Weights, config, tokenizer and a SHA-256 manifest; load with `labutils.load_model(path)` or chat
# with `python -m labutils.generate --checkpoint results/05_final_model/model`. Weights up to 10 MB
# are committed with the results, so a fresh clone can chat at once; larger ones are rebuilt.

# %%
save_model(model, stage / "model", tokenizer=prepared.tokenizer)
final["weights_committed"] = stage_folders.ship_weights(stage / "model")
# the headline against the best archived run of this profile: worse is a regression until the report explains it
final["regression"] = stage_folders.regression(
    {**final, **config.to_dict()},
    stage_folders.best_archived(stage, "final.json", "test_loss", profile=profile),
    "test_loss",
)
handoff = stage_folders.write_handoff(
    stage / "final.json",
    {"profile": profile, **final, "model_dir": stage / "model", **config.to_dict()},
    headline=[
        "test_loss",
        "test_loss_ci95",
        "n_seeds",
        "test_bpb",
        "beats_5gram_on_test",
        "last10pct_val_loss",
        "target_verdict",
        "num_params",
        "fit_check",
        "tokens_per_s",
    ],
    references=findings.references(final),
)
findings.show(findings.final(handoff))
findings.show(findings.sizing(handoff))
