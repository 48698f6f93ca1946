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
freeze = None  # parameter-name globs kept frozen, e.g. ["tok_emb.*", "blocks.[0-5].*"] (fine-tuning: labutils.model.utils.freeze)
lr = None  # None: 04's tuned value, else the default
batch_size = None  # None: 04's tuned value, else the default
max_tokens = None  # training budget in tokens (None: the profile's)
time_budget_s = None  # wall-clock budget in seconds (None: the profile's)
d_model = None  # None (with n_layer None): the shape the sizing sweep recommends
n_layer = None
block_size = None
seed = None
out_dir = "results/05_final_model"
archive_reason = None  # your words on why earlier results are replaced; what changed is computed and added
tracking = None  # also log the runs to "tensorboard", "mlflow" or "tensorboard,mlflow" (csv always)

# %%
from labutils import evaluate, findings, memory, plotting, references, save_model, stagedefs, stages, train
from labutils.generate import sample_table

# the parameters as given, before any is resolved: start_stage records them
parameters = dict(profile=profile, tokenizer=tokenizer, init_from=init_from, freeze=freeze, lr=lr, batch_size=batch_size,
                  max_tokens=max_tokens, time_budget_s=time_budget_s, d_model=d_model, n_layer=n_layer, block_size=block_size,
                  seed=seed)
profile = stagedefs.resolve(profile)
tokenizer = stagedefs.stage_tokenizer(tokenizer, init_from)
prepared = stagedefs.stage_data(out_dir, tokenizer)
tuned = stagedefs.upstream(out_dir, "04_tuning")  # None: 04 has not run, use the defaults
config = stagedefs.final(profile, prepared.vocab_size, tuned, lr=lr, batch_size=batch_size, max_tokens=max_tokens,
                        time_budget_s=time_budget_s, d_model=d_model, n_layer=n_layer, block_size=block_size, seed=seed,
                        init_from=init_from, freeze=freeze)
prepared.check_block_size(config.model.block_size, ("train", "val", "test"))
memory.check_fits(config)
stage = stages.start_stage(out_dir, archive_reason, parameters=parameters, tracking=tracking)

# %% [markdown]
# ## Sizing: how big a model for this budget?
# First a short LR sweep (multiples of the 1 / width rule's LR at two widths, at the sweep's smallest
# budget) fits the exponent k of the per-size rule LR ∝ width^-k. Then a compute-budget sweep around
# the config above (depths along width = 32 x depth, each trained on C / its FLOPs per token at the
# fitted rule's LR) is fitted with L(N, D) = E + A / N^α + B / D^β, with bootstrap intervals, and an
# LR sweep on held-out seeds checks the rule at the smallest and largest width. The shape of least
# predicted loss for the final run's budget (in seconds on this machine, at rates timed alone in this
# loop) is what 05 trains. Every run is scored in bits per byte on the same validation windows the
# final run is scored on. Skipped when `d_model` or `n_layer` is given.

# %%
sizing = None
if d_model is None and n_layer is None and init_from is None:
    sizing = stagedefs.size_final(profile, config, prepared, stage / "sizing")
    config = stagedefs.final(profile, prepared.vocab_size, tuned, lr=lr, batch_size=batch_size, time_budget_s=time_budget_s,
                            block_size=block_size, seed=seed, sized=sizing.recommendation)  # max_tokens: the sizing's budget
    memory.check_fits(config)
stagedefs.tuned_table(tuned, config).style.format(precision=4, na_rep="—")

# %%
run = train(config, prepared, stage / "run", on_eval=plotting.live_training_plot(stage / "run"))

# %%
fig = plotting.plot_training_curves(run, title=f"Final model ({profile} profile)")
plotting.save_figure(fig, stage / "figures" / "training_curves.png", key=True)

# %% [markdown]
# ## Held-out numbers, and the fit's extrapolation checked
# The headline is `test_loss`: every token of the test split scored once by the best checkpoint,
# the only number here that nothing was chosen on. `last10pct_val_loss` is the loss on the last 10%
# of the corpus (validation + test splits), the split on which nanoGPT's shakespeare_char reports
# its validation loss: kept for that comparison, but it includes the validation split that chose
# this config in 03 and 04. `target_val_loss` is the profile's goal on that split and
# `meets_target` says whether this run reached it. Beside each: unigram, bigram and 5-gram count models
# fitted on the training split and scored on the same windows. The final run, far past the sweep's largest
# budget, is also the check of the fit: its last validation loss against the predicted interval.

# %%
test = evaluate(run, prepared, "test")
last10 = evaluate(run, prepared, "val+test")
final = {"best_val_loss": run.summary["best_val_loss"], "test_loss": test["test_loss"], "test_ppl": test["test_ppl"],
         "test_bpb": test["test_bpb"], "test_accuracy": test["test_accuracy"], "last10pct_val_loss": last10["val+test_loss"],
         "num_params": run.summary["num_params"],
         "tokens": run.summary["tokens"], "elapsed_s": run.summary["elapsed_s"], "tokens_per_s": run.summary["tokens_per_s"],
         "device": run.summary.get("device"), **stagedefs.initial_loss(config, run)}
final.update(stagedefs.target_check(profile, final["last10pct_val_loss"]))
# count models fitted on the training split, scored on the same whole-split windows as the model
final["references"] = references.reference_losses(prepared, "test", config.model.block_size)
final["last10pct_references"] = references.reference_losses(prepared, "val+test", config.model.block_size)
final["beats_5gram_on_test"] = bool(final["test_loss"] < final["references"]["5-gram"])
if sizing is not None:  # the final run against the fit's prediction for its own N and D, at its last evaluation
    check = sizing.check(run.summary["num_params"], run.summary["tokens"], run.summary["flops_per_token"] * run.summary["tokens"],
                         measured=float(run.evals["val_bpb"].iloc[-1]))
    final["sizing"] = {**sizing.to_dict(), "check": check, "used": True}
    final["fit_check"] = check["verdict"]
    sizing.runs.to_csv(stage / "sizing" / "sweep_runs.csv", index=False)
    plotting.save_figure(plotting.plot_sizing(sizing, check), stage / "figures" / "sizing.png")

# %% [markdown]
# ## Samples

# %%
model = run.load_model()
samples = sample_table(model, prepared.tokenizer, ["ROMEO:", "JULIET:\n", "First Citizen:\n"], max_new_tokens=300)
samples.to_csv(stage / "samples.csv", index=False)
samples.style.set_properties(**{"white-space": "pre-wrap", "text-align": "left"}).hide(axis="index")

# %% [markdown]
# ## The saved model
# Weights, config, tokenizer and a SHA-256 manifest; load with `labutils.load_model(path)` or chat
# with `python -m labutils.generate --checkpoint results/05_final_model/model`. Weights up to 10 MB
# are committed with the results, so a fresh clone can chat at once; larger ones are rebuilt.

# %%
save_model(model, stage / "model", tokenizer=prepared.tokenizer)
final["weights_committed"] = stages.ship_weights(stage / "model")
# the headline against the best archived run of this profile: worse is a regression until the report explains it
final["regression"] = stages.regression({**final, **config.to_dict()}, stages.best_archived(stage, "final.json", "test_loss",
                                                                                             profile=profile), "test_loss")
handoff = stages.write_handoff(stage / "final.json", {"profile": profile, **final, "model_dir": stage / "model",
                                                       **config.to_dict()},
                               headline=["test_loss", "test_bpb", "beats_5gram_on_test", "last10pct_val_loss", "meets_target",
                                         "num_params", "fit_check", "tokens_per_s"],
                               references=findings.references(final))
findings.show(findings.final(handoff))
findings.show(findings.sizing(handoff))
