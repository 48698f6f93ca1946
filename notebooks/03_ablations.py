# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Ablations
# Write-up 001's five hyper-parameter experiments and the architecture choices of write-ups 000–004, each
# against the baseline from 02, over several seeds at the same token budget. A difference counts
# only when a Welch t-test says so; intervals are 95% t-intervals over seeds. Every run is scored
# on one evaluation set fixed in tokens (the same windows for every batch size) drawn from the
# *selection* half of the validation split: these numbers choose, so they are selection numbers.
# The other half of val is kept for 04's confirmation, the test split for 05 alone.

# %% tags=["parameters"]
profile = "auto"  # smoke | cpu | gpu | auto
tokenizer = "char"
lr = None  # overrides the learning rate of EVERY run of the study (None: the baseline's)
n_seeds = None  # seeds per variant (None: the profile's)
steps = None  # baseline-equivalent steps: the shared token budget is steps x batch x block (None: the profile's)
variants = None  # list of variant names (None: the profile's); see labutils.stagedefs
devices = None  # "0,1,2": one run per GPU at once (write-up 001's --devices); "cuda:0*4": four on one GPU (None: the profile's)
out_dir = "results/03_ablations"
archive_reason = None  # your words on why earlier results are replaced; what changed is computed and added
tracking = None  # also log the runs to "tensorboard", "mlflow" or "tensorboard,mlflow" (csv always)

# %%
from labutils import findings, plotting, stagedefs, stages, studies

# the parameters as given, before any is resolved: start_stage records them
parameters = dict(profile=profile, tokenizer=tokenizer, lr=lr, n_seeds=n_seeds, steps=steps, variants=variants,
                  devices=devices)
profile = stagedefs.resolve(profile)
prepared = stagedefs.stage_data(out_dir, tokenizer)
base = stagedefs.base_config(out_dir, "02_baseline", profile, prepared.vocab_size)  # 02's run; the profile's baseline if 02 has not run
# every variant's config is validated here
study = stagedefs.ablation_study(profile, base, n_seeds=n_seeds, steps=steps, variants=variants, lr=lr)
stage = stages.start_stage(out_dir, archive_reason, parameters=parameters, tracking=tracking)
findings.show(findings.variants_table(study.variants))

# %%
result = studies.run_study(study, prepared, stage, devices=stagedefs.study_devices(profile, devices))  # a re-run keeps finished runs
result.styled_table()

# %% [markdown]
# ## Comparison
# Mean validation loss per variant with its 95% interval; the dashed line is the baseline.

# %%
fig = plotting.plot_ablation(result.summary)
plotting.save_figure(fig, stage / "figures" / "ablation.png", key=True)

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
best = result.best_config()
evaluation = study.budget_fields()
numbers = {**best, "tokens": study.max_tokens, "eval_split": evaluation["eval_split"], "eval_tokens": evaluation["eval_tokens"],
           "seeds": study.seeds}
handoff = stages.write_handoff(stage / "best.json", numbers,
                               headline=["variant", "val_loss_mean", "val_bpb_mean", "delta_vs_baseline", "significant", "tokens"],
                               references=findings.references(numbers))
findings.show(findings.ablations(handoff, result.summary))
findings.show(stages.change_since_previous(stages.previous_handoff(stage, "best.json"), handoff,
                                   ["variant", "val_loss_mean", "delta_vs_baseline", "significant", "eval_split", "eval_tokens"]))
