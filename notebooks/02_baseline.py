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
# # 02 · Baseline
# Write-up 001's MiniGPT by default (preset `minigpt`; the model config is shown below), trained on the
# prepared corpus at its own best learning rate: a short sweep (one seed, the profile's budget, four or
# more LRs a factor 2 apart) picks it, and a best LR at the grid's edge extends the grid. Every later
# comparison is against this run, at this budget, so it records its full config, metrics and
# environment in its run folder. It is scored on the *selection* half of val (the windows 03 scores
# on), beside count models fitted on the training split: a unigram, a bigram and a 5-gram.

# %% tags=["parameters"]
profile = "auto"  # smoke | cpu | gpu | auto (gpu when CUDA is available)
preset = None  # model preset (None: minigpt); see labutils.model.PRESETS
tokenizer = None  # must match a prepared corpus (01's hand-off) or the bundled corpus is prepared with it (None: char)
init_from = None  # fine-tune this checkpoint instead (a transformers GPT-2/Llama folder, or a saved labutils model):
#   its own model and tokenizer, a constant low LR after a short warm-up (profiles.FINETUNE)
# parameter-name globs kept frozen, e.g. ["tok_emb.*", "blocks.[0-5].*"] (fine-tuning: labutils.model.utils.freeze)
freeze = None
lr = None  # peak learning rate (None: the best of the LR sweep; a number skips the sweep)
lr_grid = None  # the sweep's LRs, e.g. [1e-3, 2e-3, 4e-3, 8e-3] (None: the profile's, labutils.profiles.LR_GRID)
batch_size = None  # sequences per step (None: the profile's)
steps = None  # optimiser steps (None: the profile's)
block_size = None  # context length in tokens (None: the preset's)
seed = None  # None: TrainConfig's default seed
out_dir = "results/02_baseline"
archive_reason = None  # your words on why earlier results are replaced; what changed is computed and added
tracking = None  # also log the runs to "tensorboard", "mlflow" or "tensorboard,mlflow" (csv always)

# %%
from labutils import Run, findings, memory, plotting, profiles, references, stage_folders, studies

# the parameters as given, before any is resolved: start_stage records them
parameters = dict(
    profile=profile,
    preset=preset,
    tokenizer=tokenizer,
    init_from=init_from,
    freeze=freeze,
    lr=lr,
    lr_grid=lr_grid,
    batch_size=batch_size,
    steps=steps,
    block_size=block_size,
    seed=seed,
)
init_from = stage_folders.keep_input(init_from, out_dir)  # a model in this stage's own folder: copied out first
profile = profiles.resolve(profile)
tokenizer = profiles.stage_tokenizer(tokenizer, init_from)
prepared = profiles.stage_data(out_dir, tokenizer)
# a RunConfig; a bad parameter fails here, named
config = profiles.baseline(
    profile,
    prepared.vocab_size,
    preset=preset,
    lr=lr,
    batch_size=batch_size,
    steps=steps,
    block_size=block_size,
    seed=seed,
    init_from=init_from,
    freeze=freeze,
)
prepared.check_block_size(config.model.block_size)
memory.check_fits(config)  # a batch far too big for this machine fails here, with the fix
stage = stage_folders.start_stage(out_dir, archive_reason, parameters=parameters, tracking=tracking)

# %% [markdown]
# ## The learning rate
# Each LR trains the baseline once at the profile's budget; the lowest loss on the selection windows picks
# the baseline's LR (with `lr` given, or when fine-tuning, the sweep is skipped and that run trains alone).

# %%
refs = references.run_references(prepared, config)  # count models on the very windows the runs are scored on
sweep = None
if lr is None and init_from is None:
    sweep = profiles.baseline_lr_sweep(
        profile, config, prepared, stage / "lr_sweep", lrs=lr_grid, devices=profiles.study_devices(profile)
    )
    run = Run.load(sweep["run_dir"])
    config = sweep["config"]  # the sweep's best run is the baseline
    fig = plotting.plot_lr_sweep(sweep, title=f"Baseline LR sweep ({profile} profile, one seed)", refs=refs)
    plotting.save_figure(fig, stage / "figures" / "lr_sweep.png")
else:  # in JupyterLab the loss curves redraw at every evaluation while it trains
    run = studies.reuse_or_train(config, prepared, stage / "run", on_eval=plotting.live_training_plot(stage / "run"))
findings.show(findings.config_table(config))  # the baseline as trained: at the LR the sweep chose

# %% [markdown]
# ## Curves
# Train loss per step and validation loss on fixed batches; perplexity is exp(loss). The last panel
# is the learning rate the optimiser actually used at each step (warm-up, then the schedule).

# %%
fig = plotting.plot_training_curves(run, title=f"Baseline ({profile} profile)")
plotting.save_figure(fig, stage / "figures" / "training_curves.png", key=True)

# %% [markdown]
# ## Samples
# Seeded completions from the best checkpoint (temperature 0.8, top-k 40).

# %%
# kept in the run's folder: a re-run after a report change (or a clone, which has no checkpoints) reads them back
samples = profiles.run_samples(run, prepared.tokenizer, ["ROMEO:", "First Citizen:\n", "O"], max_new_tokens=200)
samples.to_csv(stage / "samples.csv", index=False)
samples.style.set_properties(**{"white-space": "pre-wrap", "text-align": "left"}).hide(axis="index")

# %% [markdown]
# ## Hand-off
# `baseline.json` holds the baseline's full config: 03 ablates against it.

# %%
s = run.summary
numbers = {
    "profile": profile,
    "tokenizer": tokenizer,
    **config.to_dict(),
    "run_dir": run.out_dir,
    **profiles.initial_loss(config, run),
    **{
        k: s.get(k)
        for k in (
            "best_val_loss",
            "val_loss",
            "val_ppl",
            "val_accuracy",
            "val_bpb",
            "num_params",
            "steps",
            "tokens",
            "elapsed_s",
            "tokens_per_s",
        )
    },
    "eval_split": config.train.eval_split,
    "references": refs,
    "regime": references.regime(s["val_loss"], refs),
    "lr_sweep": None if sweep is None else {k: v for k, v in sweep.items() if k not in ("run_dir", "config")},
}
handoff = stage_folders.write_handoff(
    stage / "baseline.json",
    numbers,
    headline=["val_loss", "val_bpb", "lr", "num_params", "tokens", "tokens_per_s"],
    references=findings.references(numbers),
)
findings.show(findings.baseline(handoff))
