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
# # 03 · Ablations
# Write-up 001's five hyper-parameter experiments and the architecture choices of write-ups 000–004, each
# against the baseline from 02 (at 02's best LR), at 02's token budget, over **paired seeds**: seed s of
# every arm draws the same batches and, where the shapes allow, the same initialisation. Each arm's
# difference to the baseline is tested seed by seed, with the variance of the differences pooled over
# the arms, and Holm's correction over the arms; the report gives each effect's 95% interval and the
# smallest effect the study could detect (80% power). Every run is scored on one evaluation set fixed
# in tokens, drawn from the *selection* half of val, beside unigram, bigram and 5-gram count models on
# the same windows: a baseline that does not beat the bigram makes the study "too short to compare",
# and it then chooses nothing. Each arm that is not itself an LR experiment also trains at 0.5x and 2x
# its LR (one seed), and an arm whose ranking flips with the LR is flagged. The other half of val is
# kept for 04's confirmation, the test split for 05 alone.

# %% tags=["parameters"]
profile = "auto"  # smoke | cpu | gpu | auto
tokenizer = "char"
lr = None  # overrides the learning rate of every run except the LR arms (lr_1e-3 stays at 1e-3) (None: the baseline's)
n_seeds = None  # seeds per variant (None: the profile's)
steps = None  # baseline-equivalent steps: the shared token budget is steps x batch x block (None: the profile's)
variants = None  # list of variant names (None: the profile's); see labutils.stagedefs
lr_check = None  # multiples of each arm's LR it is also trained at, one seed, e.g. [0.5, 2.0] ([]: none; None: the profile's)
devices = None  # "0,1,2": one run per GPU at once (write-up 001's --devices); "cuda:0*4": four on one GPU (None: the profile's)
out_dir = "results/03_ablations"
archive_reason = None  # your words on why earlier results are replaced; what changed is computed and added
tracking = None  # also log the runs to "tensorboard", "mlflow" or "tensorboard,mlflow" (csv always)

# %%
from labutils import findings, plotting, references, stagedefs, stages, studies

# the parameters as given, before any is resolved: start_stage records them
parameters = dict(profile=profile, tokenizer=tokenizer, lr=lr, n_seeds=n_seeds, steps=steps, variants=variants,
                  lr_check=lr_check, devices=devices)
profile = stagedefs.resolve(profile)
prepared = stagedefs.stage_data(out_dir, tokenizer)
base = stagedefs.base_config(out_dir, "02_baseline", profile, prepared.vocab_size)  # 02's run; the profile's baseline if 02 has not run
# every variant's config is validated here
study = stagedefs.ablation_study(profile, base, n_seeds=n_seeds, steps=steps, variants=variants, lr=lr)
multipliers = stagedefs.lr_check_multipliers(profile, lr_check)
checks = stagedefs.lr_check_study(study, multipliers)  # None when no multiples are asked for
stage = stages.start_stage(out_dir, archive_reason, parameters=parameters, tracking=tracking)
findings.show(findings.variants_table(study.variants))

# %%
result = studies.run_study(study, prepared, stage, devices=stagedefs.study_devices(profile, devices))  # a re-run keeps finished runs
checked = studies.run_study(checks, prepared, stage / "lr_check", devices=stagedefs.study_devices(profile, devices)) if checks else None
refs = references.run_references(prepared, study.run_config(study.baseline, study.first_seed))  # the same windows
regime = references.regime(float(result.summary.set_index("variant").loc[study.baseline, f"{study.metric}_mean"]), refs)
findings.show(findings.references_line(refs) + " " + findings.regime_line(regime))
result.styled_table()

# %% [markdown]
# ## Comparison
# Left: mean validation loss per arm with its 95% interval; the dashed line is the baseline, the dotted
# ones the bigram and 5-gram count models on the same windows. Right: each arm's paired difference to
# the baseline with its 95% interval; inside the grey band a difference could not be detected with 80% power.

# %%
fig = plotting.plot_ablation(result.summary, refs=refs)
plotting.save_figure(fig, stage / "figures" / "ablation.png", key=True)

# %% [markdown]
# ## Is a verdict an LR artefact?
# Each arm at 0.5x, 1x and 2x its LR on seed 0. An arm "flips" when its difference to the baseline at
# the shared LR and the difference between the two at their own best LRs have opposite signs.

# %%
lr_table = stagedefs.lr_check_table(study, result.runs, checked.runs if checked else result.runs.iloc[:0], multipliers)
if len(lr_table):
    fig = plotting.plot_lr_check(lr_table, multipliers)
    plotting.save_figure(fig, stage / "figures" / "lr_check.png")
lr_table.style.format(precision=4).hide(axis="index")

# %%
fig = plotting.plot_loss_curves(result.histories())
plotting.save_figure(fig, stage / "figures" / "loss_curves.png")

# %% [markdown]
# ## Cost
# Loss against parameters and against training time; the Pareto front is what a compute-limited
# lab should choose from.

# %%
fig = plotting.plot_pareto(result.summary)
plotting.save_figure(fig, stage / "figures" / "pareto.png")

# %% [markdown]
# ## Conclusion (computed from the table above)

# %%
# too short to compare: the baseline is handed on; otherwise the best arm that is significantly better, else the baseline
best = result.best_config(require_significant=True, baseline_only=not regime["comparable"])
evaluation = study.budget_fields()
numbers = {**best, "tokens": study.max_tokens, "eval_split": evaluation["eval_split"], "eval_tokens": evaluation["eval_tokens"],
           "seeds": study.seeds, "references": refs, "regime": regime, "mde": studies.stats.study_mde(result.summary),
           "baseline_arm": result.summary.set_index("variant").loc[study.baseline, [f"{study.metric}_mean", f"{study.metric}_ci95", "n"]]
           .to_dict(),
           "baseline_tokens": stagedefs.budget_tokens(base), "lr_given": lr,
           "arms": list(study.variants), "arms_left_out": stagedefs.arms_left_out(study),
           "lr_check": {"multipliers": list(multipliers), "table": lr_table.to_dict("records"),
                        "flips": lr_table.loc[lr_table["flips"], "variant"].tolist() if len(lr_table) else []}}
handoff = stages.write_handoff(stage / "best.json", numbers,
                               headline=["variant", "val_loss_mean", "val_bpb_mean", "delta_vs_baseline", "significant", "mde",
                                         "tokens"],
                               references=findings.references(numbers))
findings.show(findings.ablations(handoff, result.summary))
findings.show(stages.change_since_previous(stages.previous_handoff(stage, "best.json"), handoff,
                                   ["variant", "val_loss_mean", "delta_vs_baseline", "significant", "eval_split", "eval_tokens"]))
