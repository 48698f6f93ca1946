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
# its LR (seed 0), and an arm whose ranking flips with the LR (seed 0 against seed 0) is flagged. The other
# half of val is kept for 04's confirmation, the test split for 05 alone.

# %% [markdown]
# ## The arms
# Each arm changes one thing in the baseline (02's run at 02's best LR); the `arms` parameter below lists them, and
# adding one is one line there (or `papermill ... -p arms '{"baseline": {}, "my_arm": {"model.norm": "rmsnorm"}}'`).
# - `lr_1e-3`, `batch_size_16`, `n_layer_1`, `d_model_64`: write-up 001's experiments: a lower learning rate, half
#   the batch (so twice the steps on the same tokens), a single layer (`model.n_layer=1`, against the baseline's
#   `n_layer`), a width of 64 (`model.d_model=64`, against the baseline's `d_model`).
# - `pos_rope`: rotary position embeddings instead of learned ones (write-up 000's final model uses them).
# - `pos_alibi`: ALiBi, no position embedding but a per-head penalty on attention scores that grows with distance.
# - `pos_sinusoidal`: the fixed sin/cos table of "Attention Is All You Need".
# - `gqa`: grouped-query attention, two key/value heads shared by the query heads (write-up 000).
# - `swiglu`: a gated SwiGLU MLP at the parameters of the GELU MLP (8/3 x width, three matrices).
# - `rmsnorm`: RMSNorm instead of LayerNorm.
# - `mla`: DeepSeek-style latent attention (keys and values through a low-rank latent).
# - `moe`: four SwiGLU experts with top-1 routing, at the dense baseline's active FLOPs per token.
# - `label_smoothing`: the training loss against targets smoothed by 0.1.
#
# `skip_arms` names the arms a profile leaves out to fit its time budget; an arm it does not name runs everywhere.

# %% tags=["parameters"]
profile = "auto"  # smoke | cpu | gpu | auto
tokenizer = "char"
# name -> what the arm changes in the baseline ("model.<field>" / "train.<field>": value); the baseline changes nothing
arms = {
    "baseline": {},
    "lr_1e-3": {"train.lr": 1e-3},
    "batch_size_16": {"train.batch_size": 16},
    "n_layer_1": {"model.n_layer": 1},
    "d_model_64": {"model.d_model": 64},
    "pos_rope": {"model.pos": "rope"},
    "pos_alibi": {"model.pos": "alibi"},
    "pos_sinusoidal": {"model.pos": "sinusoidal"},
    "gqa": {"model.attention": "gqa", "model.n_kv_head": 2},
    "swiglu": {"model.mlp": "swiglu", "model.ffn_mult": 2.6667, "model.d_ff": None},  # 8/3: GELU's parameters
    "rmsnorm": {"model.norm": "rmsnorm"},
    "mla": {"model.attention": "mla", "model.n_kv_head": None},
    "moe": {
        "model.mlp": "moe",
        "model.n_experts": 4,
        "model.moe_top_k": 1,
        "model.ffn_mult": 2.6667,
        "model.d_ff": None,
    },
    "label_smoothing": {"train.label_smoothing": 0.1},
}
# what each profile leaves out to fit its time budget (cpu: 3 seeds of 6 arms, and the LR check, in about 5 of its 30
# minutes)
skip_arms = {
    "smoke": [
        "batch_size_16",
        "n_layer_1",
        "d_model_64",
        "pos_sinusoidal",
        "swiglu",
        "rmsnorm",
        "mla",
        "moe",
        "label_smoothing",
    ],
    # cpu also leaves write-up 001's size arms to the stage that answers that question (05's sizing)
    "cpu": ["n_layer_1", "d_model_64", "pos_sinusoidal", "swiglu", "rmsnorm", "mla", "moe", "label_smoothing"],
    "gpu": ["pos_sinusoidal"],  # the 9-minute command (benchmarks/gpu_plan.py); RoPE and ALiBi are the position arms
}
lr = None  # overrides the learning rate of every run except the LR arms (lr_1e-3 stays at 1e-3) (None: the baseline's)
n_seeds = None  # seeds per arm (None: the profile's)
steps = None  # baseline-equivalent steps: the shared token budget is steps x batch x block (None: the profile's)
lr_check = [0.5, 2.0]  # multiples of each arm's LR it is also trained at, one seed ([]: none)
# "0,1,2": one run per GPU at once (write-up 001's --devices); "cuda:0*4": four on one GPU (None: the profile's)
devices = None
out_dir = "results/03_ablations"
archive_reason = None  # your words on why earlier results are replaced; what changed is computed and added
tracking = None  # also log the runs to "tensorboard", "mlflow" or "tensorboard,mlflow" (csv always)

# %%
from labutils import findings, plotting, profiles, references, stage_folders, studies

# the parameters as given, before any is resolved: start_stage records them
parameters = dict(
    profile=profile,
    tokenizer=tokenizer,
    arms=arms,
    skip_arms=skip_arms,
    lr=lr,
    n_seeds=n_seeds,
    steps=steps,
    lr_check=lr_check,
    devices=devices,
)
profile = profiles.resolve(profile)
prepared = profiles.stage_data(out_dir, tokenizer)
# 02's run; the profile's baseline if 02 has not run
base = profiles.base_config(out_dir, "02_baseline", profile, prepared.vocab_size)
# every arm's config is built and checked here, before anything trains
study = profiles.ablation_study(
    profile, base, arms, skip=profiles.skip_for(skip_arms, profile), n_seeds=n_seeds, steps=steps, lr=lr
)
multipliers = profiles.lr_check_multipliers(lr_check)
checks = profiles.lr_check_study(study, multipliers)  # None when no multiples are asked for
stage = stage_folders.start_stage(out_dir, archive_reason, parameters=parameters, tracking=tracking)
findings.show(findings.variants_table(study.variants))

# %%
result = studies.run_study(
    study, prepared, stage, devices=profiles.study_devices(profile, devices)
)  # a re-run keeps finished runs
checked = (
    studies.run_study(checks, prepared, stage / "lr_check", devices=profiles.study_devices(profile, devices))
    if checks
    else None
)
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
# Each arm at 0.5x, 1x and 2x its LR on seed 0, and its difference to the baseline on seed 0 at the same multiple.
# An arm "flips" when its seed-0 difference to the baseline at the shared LR (1x) and the seed-0 difference between
# the two at their own best LRs have opposite signs. It is "LR-dependent" when it flips, or when its difference
# shrinks from 1x to best against best by more than the study's minimum detectable effect: the sign holds, but much
# of the effect at the shared LR is the LR's. The last column is the comparison's difference at 1x (mean over all
# seeds), for reference: it is not what the check compares.

# %%
lr_table = profiles.lr_check_table(
    study,
    result.runs,
    checked.runs if checked else result.runs.iloc[:0],
    multipliers,
    mde=studies.stats.study_mde(result.summary),
)
if len(lr_table):
    fig = plotting.plot_lr_check(lr_table, multipliers)
    plotting.save_figure(fig, stage / "figures" / "lr_check.png")
profiles.lr_check_labelled(lr_table, study.first_seed, len(study.seeds)).style.format(precision=4).hide(axis="index")

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
# too short to compare: the baseline is handed on; otherwise the best arm that is significantly better, else the
# baseline
best = result.best_config(require_significant=True, baseline_only=not regime["comparable"])
evaluation = study.budget_fields()
numbers = {
    **best,
    "tokens": study.max_tokens,
    "eval_split": evaluation["eval_split"],
    "eval_tokens": evaluation["eval_tokens"],
    "seeds": study.seeds,
    "references": refs,
    "regime": regime,
    "mde": studies.stats.study_mde(result.summary),
    "baseline_arm": result.summary.set_index("variant")
    .loc[study.baseline, [f"{study.metric}_mean", f"{study.metric}_ci95", "n"]]
    .to_dict(),
    "baseline_tokens": profiles.budget_tokens(base),
    "lr_given": lr,
    "arms": list(study.variants),
    "arms_left_out": profiles.arms_left_out(arms, study),
    "lr_check": {
        "multipliers": list(multipliers),
        "table": lr_table.to_dict("records"),
        "flips": lr_table.loc[lr_table["flips"], "variant"].tolist() if len(lr_table) else [],
        "lr_dependent": lr_table.loc[lr_table["lr_dependent"], "variant"].tolist() if len(lr_table) else [],
        "mde": studies.stats.study_mde(result.summary),
        "seed": study.first_seed,
    },
}
numbers["conclusion"] += findings.lr_check_clause(numbers["lr_check"])  # '' unless 02's LR is off the optimum
handoff = stage_folders.write_handoff(
    stage / "best.json",
    numbers,
    headline=["variant", "val_loss_mean", "val_bpb_mean", "delta_vs_baseline", "significant", "mde", "tokens"],
    references=findings.references(numbers),
)
findings.show(findings.ablations(handoff, result.summary))
findings.show(
    stage_folders.change_since_previous(
        stage_folders.previous_handoff(stage, "best.json"),
        handoff,
        ["variant", "val_loss_mean", "delta_vs_baseline", "significant", "eval_split", "eval_tokens"],
    )
)
findings.show(stage_folders.other_verdicts(stage, "best.json", handoff, ["variant", "significant"]))
