"""The lab's five stages, defined in one place: what the engines (studies, tuning, training) run for them.

- How big each stage is under each profile. `smoke` takes seconds (the tests run it), `cpu` fits the
  whole pipeline within 30 minutes on a 2-core machine, `gpu` is sized to run all five stages in
  one 9-minute command on one H100/H200 (03's and 04's small runs four at a time on the GPU;
  `python benchmarks/gpu_plan.py` projects each stage from the measured step times), and `auto`
  picks `gpu` when CUDA is available, else `cpu`. Notebook parameters left as None take the
  profile's value; given ones win.
- Where each stage hands its findings to the next (`HANDOFFS`), and how a stage reads them.
- The variants stage 03 compares, stage 05's target, and the reference numbers reports compare with.

The tables hold only what differs from ModelConfig's and TrainConfig's defaults; the functions turn
them and the notebook's parameters into a validated `RunConfig`, once. The search space of 04 is a
parameter of its notebook. "Write-up 00N" names one of the five study write-ups this lab grew from
(its users' own reports), never a random seed.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from . import references, scaling
from .config import RunConfig
from .data import PreparedData, load_prepared, prepare_data
from .evaluation import Run, evaluate
from .files import atomic_write_json, repo_path
from .model import ModelConfig, model_shape
from .stage_folders import read_handoff, sibling
from .studies import Job, Study, finished_summary, run_job, run_on_devices, run_study
from .tables import fmt
from .validation import ConfigError, choice, require

PROFILES = ("smoke", "cpu", "gpu")

_QUIET = {"log_interval": 10}
_WRITEUP001 = {"lr": 5e-4}  # write-up 001's learning rate for MiniGPT (TrainConfig's default is 1e-3)

# Stage 02: write-up 001's baseline shape (minigpt) with the char tokenizer, at its own best LR: a sweep over LR_GRID
# (one seed, the profile's budget, scored on the selection windows; a best LR at the grid's edge extends the grid).
# Its budget is the budget of 03 and 04 too: one budget from 02 to 04. The cpu budget (150 steps of 32 x 64 tokens)
# is the least that keeps the baseline below the bigram reference on the selection windows, so 03 compares models past
# the count-model level; it was 300 steps until issue 50 gave the final model half of the pipeline's training FLOPs
# (02-04 and the sweep share the other half).
_SELECTION = {"eval_split": "selection"}
BASELINE = {
    "smoke": {
        "model": {"preset": "minigpt", "d_model": 32, "n_layer": 1, "n_head": 2, "block_size": 32},
        "train": {
            **_WRITEUP001,
            **_SELECTION,
            "device": "cpu",
            "batch_size": 8,
            "max_steps": 16,
            "warmup_steps": 2,
            "eval_interval": 8,
            "eval_tokens": 512,
            "log_interval": 4,
        },
    },
    "cpu": {
        "model": {"preset": "minigpt"},
        "train": {
            **_WRITEUP001,
            **_SELECTION,
            "device": "cpu",
            "batch_size": 32,
            "max_steps": 150,
            "warmup_steps": 15,
            "eval_interval": 50,
            "eval_tokens": 20480,
            **_QUIET,
        },
    },
    "gpu": {
        "model": {"preset": "minigpt"},
        "train": {
            **_WRITEUP001,
            **_SELECTION,
            "batch_size": 32,
            "max_steps": 1500,
            "warmup_steps": 100,
            "eval_interval": 250,
            "eval_tokens": 40960,
            "compile": False,
            **_QUIET,
        },
    },
}
# 02's LR sweep: log-spaced, a factor 2 apart (issue: >= 4 values); write-up 001's 5e-4 is far below the best at these
# budgets (cpu, 300 steps: 1e-3 -> 2.37, 2e-3 -> 2.28, 4e-3 -> 2.19, 8e-3 -> 2.19 nats on the selection windows)
LR_GRID = {"smoke": (1e-3, 2e-3, 4e-3, 8e-3), "cpu": (1e-3, 2e-3, 4e-3, 8e-3), "gpu": (1e-3, 2e-3, 4e-3, 8e-3)}
LR_GRID_EXTENSIONS = 3  # at most this many values added beyond an edge before the sweep says the optimum lies outside

# Stage 03: its arms, the arms each profile leaves out and the LR check are notebook 03's parameters (the notebook owns
# its experiment); a profile sets only its size: seeds a arm, and the devices. cpu trains two runs at a time, each on
# half the threads: these small models use two threads poorly, so two one-thread runs train about 1.3x the tokens per
# second of one run on both (benchmarks/cpu_workers.py).
ABLATIONS = {
    "smoke": {"n_seeds": 2},
    "cpu": {"n_seeds": 3, "devices": "cpu*2"},
    "gpu": {"n_seeds": 5, "devices": "cuda:0*4"},
}

# Stage 04: Optuna trials at 03's token budget (>= 20 in cpu, >= 40 in gpu), then the confirmation: untuned, the
# untuned config at the tuned LR only, and tuned, on new seeds and the confirmation half of val.
TUNING = {
    "smoke": {"n_trials": 3, "timeout": None, "n_seeds": 2},
    "cpu": {"n_trials": 20, "timeout": None, "n_seeds": 3, "devices": "cpu*2"},
    "gpu": {
        "n_trials": 40,
        "timeout": None,
        "n_seeds": 5,
        "devices": "cuda:0*4",
    },  # sized to fit one GPU command: benchmarks/gpu_plan.py
}

# Stage 05: write-up 000's final model (RoPE + GQA, char-level). cpu shrinks it to fit its budget.
FINAL = {
    "smoke": {
        "model": {"preset": "final-char", "d_model": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 1, "block_size": 32},
        "train": {
            "device": "cpu",
            "max_steps": None,
            "max_tokens": 8 * 32 * 20,
            "eval_interval": 10,
            "eval_batches": 2,
            "log_interval": 5,
            **_SELECTION,
        },
        "untuned": ("model.dropout", "train.label_smoothing"),
    },
    # cpu: the budget of 6M tokens of 4 x 128 (3.1e13 FLOPs a seed) gives the final model more than half of the
    # pipeline's training FLOPs (issue 50; the dashboard's compute chart shows the split). Dropout and label smoothing
    # are not taken from 04: it tunes at a third of an epoch, where no run overfits (train loss above validation), so
    # its values are no evidence for a run of several epochs; the report checks the final's own train and validation
    # losses instead (`regularisation_check`).
    "cpu": {
        "model": {
            "preset": "final-char",
            "d_model": 128,
            "n_layer": 4,
            "n_head": 4,
            "n_kv_head": 2,
            "block_size": 128,
            "dropout": 0.0,
        },
        "train": {
            "device": "cpu",
            "max_steps": None,
            "max_tokens": 6_000_000,
            "label_smoothing": 0.0,
            "eval_interval": 300,
            "eval_batches": 10,
            **_SELECTION,
            **_QUIET,
        },
        "untuned": ("model.dropout", "train.label_smoothing"),
    },
    # gpu: the shape and schedule of the first H200 visit's speedrun (nanoGPT's size with RoPE, 2,000-2,500 steps, its
    # step
    # replayed as CUDA graphs: last-10% loss 1.447 there), with write-up 000's GQA; the batch stays the GPU's, not 04's
    "gpu": {
        "model": {"preset": "final-char", "d_model": 384, "n_head": 6, "n_kv_head": 2, "dropout": 0.2},
        "train": {
            "batch_size": 64,
            "max_steps": None,
            "max_tokens": 2500 * 64 * 256,
            "compile_mode": "reduce-overhead",
            "lr": 1e-3,
            "betas": (0.9, 0.99),
            "warmup_steps": 100,
            "eval_interval": 250,
            "eval_batches": 20,
            **_SELECTION,
            **_QUIET,
        },
        "untuned": ("train.batch_size",),
    },
}

# Stage 05 sizes its model first, unless d_model or n_layer is given (labutils.scaling: the design, the LR rule, both
# fits, the recommendation). The design (budgets, ladder, seeds, LR fit) is notebook 05's `sweep` parameter; a profile
# sets only sizes: the ladder's widths, the sweep's batch (cpu: 16, which 03 found better than 32 at equal tokens) and
# the bootstrap's refits. smoke also shrinks the design to seconds, for the tests.
SIZING = {
    "smoke": {
        "max_width": 48,
        "aspect": 16,
        "head_dim": 16,
        "n_budgets": 2,
        "decades": 0.5,
        "n_sizes": 3,
        "max_extensions": 1,
        "min_steps": 2,
        "batch_size": 4,
        "replicated_budgets": 1,
        "lr_fit_multipliers": (0.5, 1.0, 2.0),
        "lr_fit_widths": 2,
        "drop_above_unigram": False,
        "n_boot": 20,
    },
    # cpu: the largest budget 1/30 of the final run's FLOPs (about 1e12, where 1/8 had put it before the final's
    # budget grew 3.7x): the sweep keeps its cost, the law extrapolates further, and 05 checks the final against it
    "cpu": {"batch_size": 16, "n_boot": 1000, "extrapolation": 30.0},
    "gpu": {"max_width": 768, "aspect": 64, "head_dim": 64, "width_step": 32, "batch_size": 64, "n_boot": 1000},
}
# The final run's seeds (cpu: 2, what its budget affords beside the sweep; the interval is then wide, and says so).
FINAL_SEEDS = {"smoke": 2, "cpu": 2, "gpu": 3}

# Hyper-parameters the final model takes from 04's hand-off (its architecture is FINAL's).
TUNED_KEYS = (
    "train.lr",
    "train.warmup_steps",
    "train.weight_decay",
    "train.betas",
    "train.label_smoothing",
    "train.batch_size",
    "model.dropout",
)


def resolve(profile: str) -> str:
    """'auto' becomes 'gpu' when CUDA is available, else 'cpu'; other names are checked."""
    if not isinstance(profile, str):
        raise ConfigError(f"profile: expected a string, one of {('auto', *PROFILES)}; got {profile!r}")
    if profile == "auto":
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    choice(profile, "profile", ("auto", *PROFILES))
    return profile


def check_count(name: str, value: Any, minimum: int = 1) -> None:
    """A notebook count parameter (steps, n_seeds, n_trials): a whole number >= minimum, or None."""
    require(
        value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= minimum),
        name,
        f"expected a whole number >= {minimum} or None, got {value!r}",
    )


def _given(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


# Fine-tuning (a stage's init_from): nanoGPT's finetune_shakespeare LR, held constant after a short warm-up; the model
# is the checkpoint's (its shape and dropouts), cropped to the profile's context unless block_size is given.
FINETUNE = {"lr": 3e-5, "schedule": "constant", "warmup_steps": 10}


def stage_tokenizer(tokenizer: str | None, init_from: str | None = None) -> str:
    """The tokenizer a stage prepares its corpus with: the one given, else 'char', or with init_from the checkpoint's
    own."""
    if init_from is None:
        return tokenizer or "char"
    from .model.hf import pretrained_tokenizer

    own = pretrained_tokenizer(init_from)
    require(
        tokenizer in (None, own),
        "tokenizer",
        f"{init_from} reads its own tokenizer {own!r}, not {tokenizer!r}; leave tokenizer=None with init_from",
    )
    return own


def _fine_tuning(
    init_from: str, table: dict[str, Any], vocab_size: int, block_size: int | None, **given: Any
) -> RunConfig:
    """A run from pretrained weights: the checkpoint's model at the profile's context (or block_size), the profile's
    budget and evaluation with FINETUNE's schedule, then the notebook's parameters."""
    from .config import model_config
    from .model.hf import pretrained_config

    context = block_size or model_config(table["model"], vocab_size).block_size
    train = {**table["train"], **FINETUNE, "init_from": str(init_from), **_given(**given)}
    return RunConfig.build(pretrained_config(init_from, block_size=context), train, vocab_size)


def initial_loss(config: RunConfig, run) -> dict[str, Any]:
    """Where a fine-tuning run started: its checkpoint and the validation loss of its evaluation before the first step
    ({} for a run from a random init)."""
    if not config.train.init_from:
        return {}
    return {"init_from": config.train.init_from, "initial_val_loss": float(run.evals["val_loss"].iloc[0])}


def baseline(
    profile: str,
    vocab_size: int,
    *,
    preset: str | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    steps: int | None = None,
    block_size: int | None = None,
    seed: int | None = None,
    device: str | None = None,
    init_from: str | None = None,
    freeze: list[str] | None = None,
) -> RunConfig:
    """Stage 02's run: the profile's baseline with the notebook's parameters on top (init_from: fine-tuning that
    checkpoint)."""
    check_count("steps", steps)  # named as the notebook parameter, not as the max_steps it sets
    table = BASELINE[resolve(profile)]
    if init_from is not None:
        require(preset is None, "preset", f"init_from={init_from!r} brings its own model; leave preset=None")
        return _fine_tuning(
            init_from,
            table,
            vocab_size,
            block_size,
            lr=lr,
            batch_size=batch_size,
            max_steps=steps,
            seed=seed,
            device=device,
            freeze=freeze,
        )
    # another preset brings its own sizes; the profile's size overrides are for minigpt
    model = dict(table["model"]) if preset in (None, table["model"]["preset"]) else {"preset": preset}
    model.update(_given(block_size=block_size))
    train = {
        **table["train"],
        **_given(lr=lr, batch_size=batch_size, max_steps=steps, seed=seed, device=device, freeze=freeze),
    }
    return RunConfig.build(model, train, vocab_size)


def lr_name(lr: float) -> str:
    return f"lr_{lr:g}"


def baseline_lr_sweep(
    profile: str,
    config: RunConfig,
    data,
    out_dir: str | Path,
    *,
    lrs: tuple[float, ...] | None = None,
    devices: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Stage 02's LR sweep: `config` at each LR of the profile's grid (one seed: the config's; its budget; scored on its
    evaluation windows), into out_dir/runs/lr_<value>/. A best LR at an edge of the grid extends the grid by one more
    factor on that side (up to LR_GRID_EXTENSIONS times) until the best lies inside; a re-run keeps finished runs.
    Returns the LRs and their losses in LR order, the best, whether it still lies at an edge, and its run folder."""
    grid = sorted(lrs or LR_GRID[resolve(profile)])
    require(
        len(grid) >= 2 and all(isinstance(x, (int, float)) and x > 0 for x in grid),
        "lrs",
        f"expected two or more learning rates > 0, got {grid!r}",
    )
    ratio = grid[-1] / grid[-2]
    extended = 0
    while True:
        study = Study(
            name="lr_sweep",
            base=config,
            variants={lr_name(x): {"train.lr": x} for x in grid},
            baseline=lr_name(grid[0]),
            n_seeds=1,
            first_seed=config.train.seed,
            budget="tokens",
            eval_split=config.train.eval_split,
        )
        result = run_study(study, data, out_dir, devices=devices, progress=progress)
        losses = result.summary.set_index("variant")[f"{study.metric}_mean"]
        values = [float(losses[lr_name(x)]) for x in grid]
        best = min(range(len(grid)), key=values.__getitem__)
        at_edge = best in (0, len(grid) - 1)
        if not at_edge or extended >= LR_GRID_EXTENSIONS:
            break
        grid = [grid[0] / ratio, *grid] if best == 0 else [*grid, grid[-1] * ratio]
        extended += 1
    run_dir = result.out_dir / "runs" / lr_name(grid[best]) / f"seed{config.train.seed}"
    saved = json.loads((run_dir / "config.json").read_text())
    chosen = RunConfig.from_dict(
        {"model": saved["model"], "train": saved["train"]}
    )  # as trained, on the config's device
    return {
        "lrs": grid,
        "losses": values,
        "best_lr": grid[best],
        "best_at_edge": at_edge,
        "extended": extended,
        "metric": study.metric,
        "tokens": study.budget_fields()["max_tokens"],
        "run_dir": run_dir,
        "config": chosen.override({"train.device": config.train.device}),
    }


def study_devices(profile: str, devices: Any = None) -> Any:
    """Where 03's runs train: the notebook's `devices` when given, else the profile's (the gpu profile puts
    several small runs on one GPU at once), else None (one after another on the config's device)."""
    return devices if devices is not None else ABLATIONS[resolve(profile)].get("devices")


def tuning_settings(profile: str, **given: Any) -> dict[str, Any]:
    """n_trials, timeout, n_seeds and devices of stage 04: the profile's, with the given ones on top."""
    unknown = sorted(set(given) - {"n_trials", "timeout", "n_seeds", "devices"})
    require(not unknown, "tuning_settings", f"unknown settings {unknown}")
    check_count("n_trials", given.get("n_trials"))
    check_count("n_seeds", given.get("n_seeds"), 2)
    timeout = given.get("timeout")
    require(
        timeout is None or (isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0),
        "timeout",
        f"expected seconds > 0 or None, got {timeout!r}",
    )
    return {"devices": None, **TUNING[resolve(profile)], **_given(**given)}


# What stage 05's last-10% validation loss should reach per profile (issue 50's targets: cpu 1.50, below the 5-gram's
# 1.590 on that split; gpu 1.40, below nanoGPT's 1.470; None: no target), and nanoGPT's published shakespeare_char
# figure on the same split (its README: 10.7M parameters), for comparison.
TARGET_VAL_LOSS = {"smoke": None, "cpu": 1.50, "gpu": 1.40}
NANOGPT_SHAKESPEARE_CHAR_VAL_LOSS = 1.4697


def tuned_table(tuned: dict[str, Any] | None, config: RunConfig, profile: str | None = None, *, sized: bool = False):
    """What 04 handed on for each tuned key, beside what stage 05 actually uses; with the `profile`, why each value
    differs from 04's (`sized`: the sizing's pick set the LR and the batch)."""
    import pandas as pd

    def value(source, key):
        section, name = key.split(".")
        found = (source or {}).get(section, {}).get(name)
        return fmt(found) if isinstance(found, (list, tuple)) else found

    table = pd.DataFrame(
        {
            "from 04": {k: value(tuned, k) for k in TUNED_KEYS},
            "used": {k: value(config.to_dict(), k) for k in TUNED_KEYS},
        }
    )
    if profile is not None:
        table["why"] = [
            _why_not_04(key, profile, sized) if row["from 04"] != row["used"] else "04's hand-off"
            for key, row in table.iterrows()
        ]
    return table


def _why_not_04(key: str, profile: str, sized: bool) -> str:
    table, (section, name) = FINAL[resolve(profile)], key.split(".")
    if sized and key == "train.lr":
        return "the sweep's LR rule at the pick's width (fitted at the LR fit's widths, smaller than the pick's)"
    if sized and key == "train.batch_size":
        return "the sweep's batch: the law and the LR rule were measured at it"
    if key in table.get("untuned", ()) and key in ("model.dropout", "train.label_smoothing"):
        return (
            "not 04's: 04 tunes at a third of an epoch, where no run overfits; off until the final's own curves "
            "call for it (the regularisation check)"
        )
    return "the profile's final design (FINAL)" if name in table.get(section, {}) else "04 handed on no value"


# the model fields a sizing pick sets (the shape of the ladder it chose from)
SIZED_FIELDS = ("d_model", "n_layer", "n_head", "n_kv_head")


def change_evidence(changes: dict[str, Any], out_dir: str | Path, *, sized: bool) -> dict[str, str]:
    """For each model field 05 changed from 04's config, the lab's evidence for the change: 03's arms that changed
    that field (their difference to the baseline, interval and verdict, from 03's results_table.csv beside `out_dir`),
    and the sizing law's pick for the shape fields when 05 trained it (`sized`); else that no run compared it."""
    import pandas as pd

    table = sibling(out_dir, "03_ablations/results_table.csv")
    arms = pd.read_csv(table) if table.exists() else pd.DataFrame(columns=["variant", "overrides"])
    evidence = {}
    for field in changes:
        said = ["the sizing law's pick (05's sweep)"] if sized and field in SIZED_FIELDS else []
        for _, arm in arms[arms["overrides"].astype(str).str.contains(f"model.{field}=", regex=False)].iterrows():
            verdict = "significant" if arm["significant"] == "yes" else "not significant"
            said.append(
                f"03's `{arm['variant']}` ({arm['overrides']}): {arm['delta_vs_baseline']:+.3f} nats/token against the "
                f"baseline (95% CI {arm['delta_ci_low']:+.3f} to {arm['delta_ci_high']:+.3f}, {verdict}), at 03's size"
            )
        evidence[field] = " and ".join(said) or "the profile's final design only: no run of the lab compared it"
    return evidence


def model_changes_table(tuned: dict[str, Any] | None, config: RunConfig, evidence: dict[str, str] | None = None):
    """`model_changes` as a table: each changed model field, 04's value beside the one 05 uses, and with `evidence`
    (`change_evidence`) what the lab measured for it."""
    import pandas as pd

    changes = model_changes(tuned, config)
    columns = {
        "from 04": {k: fmt(v[0]) for k, v in changes.items()},
        "used": {k: fmt(v[1]) for k, v in changes.items()},
    }
    if evidence is not None:
        columns["evidence"] = {k: evidence.get(k, "") for k in changes}
    return pd.DataFrame(columns)


def shakespeare_char(meta: dict[str, Any]) -> bool:
    """Whether prepared data (its meta.json) is what the target and nanoGPT's figure were measured on: the bundled
    tiny Shakespeare, one character a token (char, or bytes of its ASCII text), cut contiguously as nanoGPT cuts it."""
    corpus, tokenizer = meta.get("corpus") or {}, meta.get("tokenizer") or {}
    return (
        corpus.get("name") == "tinyshakespeare"
        and tokenizer.get("kind") in ("char", "byte")
        and meta.get("split_by") == "contiguous"
    )


def past_finals_check(sizing, stage_dir, profile: str, prepared: PreparedData, current: dict[str, Any]):
    """The law against the lab's own final runs (`scaling.past_runs_check`): this run (`current`: its num_params,
    tokens, last10pct_val_loss and model) and every archived final run of this profile on the same vocabulary, on the
    last 10% of the corpus in bits per byte."""
    import numpy as np

    from .stage_folders import archived_handoffs

    vocab = (current.get("model") or {}).get("vocab_size")
    records = [("this run", current)] + [
        (folder.name, h)
        for folder, h, _ in archived_handoffs(stage_dir, "final.json")
        if h.get("profile") == profile and (h.get("model") or {}).get("vocab_size") == vocab
    ]
    windows = np.concatenate([prepared.tokens("val"), prepared.tokens("test")])
    bytes_per_token = float(np.asarray(prepared.token_bytes)[windows].mean())
    return scaling.past_runs_check(sizing, records, bytes_per_token)


def target_check(
    profile: str,
    last10pct_val_loss: float,
    per_seed: list[float] | None = None,
    ci95: list[float] | None = None,
    *,
    shakespeare: bool = True,
) -> dict[str, Any]:
    """The final model's last-10% validation loss against the profile's target and nanoGPT's figure. `meets_target`
    is the mean's; with seeds, `target_verdict` says whether the seeds establish it: "met" when the mean's 95%
    interval lies at or below the target, "missed" when it lies above, "not established" when it spans the target
    (with one run: the run's own side). Both references belong to tiny Shakespeare at one character a token
    (`shakespeare_char`): another corpus or tokenizer (`shakespeare=False`) is compared with neither."""
    target = TARGET_VAL_LOSS[resolve(profile)] if shakespeare else None
    nanogpt = NANOGPT_SHAKESPEARE_CHAR_VAL_LOSS if shakespeare else None
    checked: dict[str, Any] = {
        "target_val_loss": target,
        "meets_target": None if target is None else bool(last10pct_val_loss <= target),
        "nanogpt_val_loss": nanogpt,
        "gap_to_nanogpt": None if nanogpt is None else last10pct_val_loss - nanogpt,
        "shakespeare_char": shakespeare,
    }
    if target is None:
        return checked
    low, high = ci95 if ci95 else (last10pct_val_loss, last10pct_val_loss)
    checked["target_verdict"] = "met" if high <= target else "missed" if low > target else "not established"
    if per_seed:
        checked["meets_target_per_seed"] = [bool(v <= target) for v in per_seed]
    return checked


def model_changes(tuned: dict[str, Any] | None, config: RunConfig) -> dict[str, tuple[Any, Any]]:
    """The model fields in which the final config differs from the config 04 tuned (03's handed-on arm on 02's
    baseline), as (04's, 05's): what the final design and the sizing changed that 03 and 04 never compared."""
    if not tuned or not tuned.get("model"):
        return {}

    def fields(model: ModelConfig) -> dict[str, Any]:  # the MLP's width as the model resolves it (ffn_mult, d_ff or
        # its default), so ffn_mult None and 4 are the same MLP, not a change
        return {**dataclasses.asdict(model), "ffn_mult": model.ffn_hidden / model.d_model, "d_ff": None}

    before, final = fields(ModelConfig(**tuned["model"])), fields(config.model)
    return {k: (before[k], v) for k, v in final.items() if before[k] != v}


def final(
    profile: str,
    vocab_size: int,
    tuned: dict[str, Any] | None = None,
    *,
    lr: float | None = None,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    time_budget_s: float | None = None,
    d_model: int | None = None,
    n_layer: int | None = None,
    block_size: int | None = None,
    seed: int | None = None,
    sized: dict[str, Any] | None = None,
    init_from: str | None = None,
    freeze: list[str] | None = None,
) -> RunConfig:
    """Stage 05's run: FINAL's architecture, 04's tuned hyper-parameters (`tuned`: its hand-off), then the parameters;
    `sized` (a sizing's recommendation) sets the shape and, unless `lr` is given, the rule's LR for it. With init_from,
    the checkpoint's model fine-tuned at the profile's budget: 04 tuned a model trained from scratch, so none of its
    values apply, and the shape is the checkpoint's."""
    table = FINAL[resolve(profile)]
    if init_from is not None:
        require(
            d_model is None and n_layer is None and sized is None,
            "d_model",
            f"init_from={init_from!r} fixes the model's shape; leave d_model and n_layer None",
        )
        return _fine_tuning(
            init_from,
            table,
            vocab_size,
            block_size,
            lr=lr,
            batch_size=batch_size,
            max_tokens=max_tokens,
            time_budget_s=time_budget_s,
            seed=seed,
            freeze=freeze,
        )
    model, train = dict(table["model"]), dict(table["train"])
    for key in (k for k in TUNED_KEYS if k not in table.get("untuned", ())):
        section, name = key.split(".")
        if name in (tuned or {}).get(section, {}):
            (model if section == "model" else train)[name] = tuned[section][name]
    if sized:
        model.update({k: sized[k] for k in ("d_model", "n_layer", "n_head", "n_kv_head")}, head_dim=None)
        # the recommended shape's tokens for the budget's FLOPs, at the batch, LR and evaluation windows the sweep
        # measured
        # the law at; no step count or time of the unsized table survives (a leftover max_steps trained 10x the
        # sizing's)
        train.update(
            lr=sized["lr"],
            batch_size=sized["batch_size"],
            eval_tokens=sized["eval_tokens"],
            max_tokens=round(sized["tokens"]),
            max_steps=None,
            time_budget_s=None,
        )
    model.update(_given(d_model=d_model, n_layer=n_layer, block_size=block_size))
    train.update(
        _given(
            lr=lr, batch_size=batch_size, max_tokens=max_tokens, time_budget_s=time_budget_s, seed=seed, freeze=freeze
        )
    )
    return RunConfig.build(model, train, vocab_size)


def final_compute(base: RunConfig, data: PreparedData, out_dir: str | Path) -> float:
    """The final run's budget in FLOPs: its tokens x its shape's FLOPs per token; a budget in seconds (a parameter) is
    converted once, at the rate `base` reaches timed alone in out_dir/timed (kept: a re-run converts to the same
    FLOPs)."""
    if base.train.max_tokens:
        return float(base.train.max_tokens * model_shape(base.model).flops_per_token())
    require(
        bool(base.train.time_budget_s), "max_tokens", "the final run needs a budget: give max_tokens or time_budget_s"
    )
    return float(base.train.time_budget_s * scaling.time_shape(base, Path(out_dir) / "timed", data))


def sweep_design(profile: str, design: Any = None) -> tuple[scaling.Sweep, int]:
    """Notebook 05's `sweep` parameter (the design: budgets, ladder, seeds, LR fit; a dict, or JSON text from
    papermill) with the profile's sizes on top (SIZING: widths, batch; smoke shrinks the design to seconds), checked;
    and the number of bootstrap refits."""
    design = from_text(design, "sweep")
    require(design is None or isinstance(design, dict), "sweep", f"expected a dict of Sweep fields, got {design!r}")
    settings = {**(design or {}), **SIZING[resolve(profile)]}
    n_boot = settings.pop("n_boot")
    if isinstance(settings.get("lr_fit_multipliers"), list):
        settings["lr_fit_multipliers"] = tuple(settings["lr_fit_multipliers"])
    return scaling.Sweep(**settings), n_boot


def size_final(
    profile: str, base: RunConfig, data: PreparedData, out_dir: str | Path, design: Any = None, *, progress: bool = True
):
    """Stage 05's sizing: the sweep `design` (notebook 05's, `sweep_design`) around `base` (05's run before sizing)
    into out_dir, on 03's devices, for base's budget (`final_compute`); runs at or above the unigram on the sweep's
    windows are left out of the fit."""
    sweep, n_boot = sweep_design(profile, design)
    compute = final_compute(base, data, out_dir)
    refs = references.run_references(data, scaling.sweep_base(base, sweep))
    sizing = scaling.size_model(
        base,
        sweep,
        data,
        out_dir,
        compute=compute,
        unigram=refs["unigram_bpb"],
        n_boot=n_boot,
        devices=study_devices(profile),
        progress=progress,
    )
    sizing.references = refs
    return sizing


def final_runs(config: RunConfig, data: PreparedData, stage: str | Path, seeds: list[int], devices: Any = None):
    """The final run on each of `seeds` (config with train.seed set), into stage/run and stage/run_seed<s>; with two
    or more `devices` (study_devices: cpu "cpu*2", one thread each) the seeds train at once, as 03's runs do: faster
    in all than one after another on every thread (benchmarks/cpu_workers.py). A run that finished with its config is
    read back. Returns {seed: Run} in seed order."""
    stage = repo_path(stage)
    folders = [stage / ("run" if i == 0 else f"run_seed{s}") for i, s in enumerate(seeds)]
    jobs = [
        Job("final", s, config.override({"train.seed": s}), folder, Path(data.dir))
        for s, folder in zip(seeds, folders, strict=True)
    ]
    todo = [job for job in jobs if finished_summary(job.run_dir, job.config) is None]
    results = run_on_devices(run_job, todo, devices, desc="final runs", folder=stage)
    failed = [(job, r) for job, r in zip(todo, results, strict=True) if isinstance(r, BaseException)]
    if failed:
        job, error = failed[0]
        raise RuntimeError(f"the final run on seed {job.seed} failed ({error!r}); a re-run continues it") from error
    return {job.seed: Run.load(job.run_dir) for job in jobs}


def regularisation_check(runs: dict[int, Any], config: RunConfig) -> dict[str, Any]:
    """The final run's regularisers against its own curves (issue 50: a regulariser whose run ends with train loss
    above validation loss costs more than it saves). Per seed, the last train loss (in training mode, with its dropout
    and smoothing) and the last validation loss on the run's evaluation windows; `gap` is validation minus train, the
    mean over seeds, and `verdict` says what it shows."""
    regularisers = {
        "dropout": config.model.dropout,
        "label_smoothing": config.train.label_smoothing,
        "weight_decay": config.train.weight_decay,
    }
    per_seed = [
        {"seed": s, "train_loss": run.summary["train_loss"], "val_loss": run.summary["val_loss"]}
        for s, run in runs.items()
    ]
    gap = sum(r["val_loss"] - r["train_loss"] for r in per_seed) / len(per_seed)
    on = [name for name in ("dropout", "label_smoothing") if regularisers[name]]
    if on and gap <= 0:
        cost = "costs more than it saves" if len(on) == 1 else "cost more than they save"
        verdict = f"train loss ends {-gap:.3f} nats above validation loss: {' and '.join(on)} {cost}"
    elif gap > 0:
        verdict = (
            f"train loss ends {gap:.3f} nats below validation loss: the model has begun to fit the repeated data, and "
            "regularisation (dropout, a larger weight decay) is the next lever to test at this budget"
        )
    else:
        verdict = f"train loss ends {-gap:.3f} nats above validation loss, with no dropout or smoothing: no overfitting"
    return {**regularisers, "per_seed": per_seed, "gap": gap, "verdict": verdict}


def final_seeds(profile: str, seed: int | None = None, n_seeds: int | None = None) -> list[int]:
    """The final run's seeds: `n_seeds` (default FINAL_SEEDS of the profile) from `seed` (default 0)."""
    n_seeds = FINAL_SEEDS[resolve(profile)] if n_seeds is None else n_seeds
    check_count("n_seeds", n_seeds)
    return list(range(seed or 0, (seed or 0) + n_seeds))


# What a stage reads from a finished run's weights, kept in the run's folder: a stage re-executed after a report change
# reads it back, and so does a clone of the repo, which has every run's records but none of its checkpoints.
SCORES_FILE, SAMPLES_FILE = "scores.json", "samples.json"


def held_out_scores(run, data: PreparedData, split: str) -> dict[str, Any]:
    """`evaluate(run, data, split)` (the best checkpoint on every token of `split`), kept in the run's scores.json."""
    path = Path(run.out_dir) / SCORES_FILE
    kept = json.loads(path.read_text()) if path.exists() else {}
    if split not in kept:
        kept[split] = evaluate(run, data, split)
        atomic_write_json(path, kept)
    return kept[split]


def run_samples(run, tokenizer, prompts: list[str], max_new_tokens: int, model=None):
    """sample_table of the run's best checkpoint (or `model`), kept in the run's samples.json with its prompts and
    length: asked again for the same ones, the table is read back."""
    import pandas as pd

    from .generate import sample_table

    path, asked = Path(run.out_dir) / SAMPLES_FILE, {"prompts": list(prompts), "max_new_tokens": max_new_tokens}
    kept = json.loads(path.read_text()) if path.exists() else {}
    if {k: kept.get(k) for k in asked} != asked:
        table = sample_table(model or run.load_model(), tokenizer, prompts, max_new_tokens=max_new_tokens)
        kept = {**asked, "rows": table.to_dict("records")}
        atomic_write_json(path, kept)
    return pd.DataFrame(kept["rows"])


def final_model(run, shipped: str | Path):
    """The final run's best weights: its checkpoint, or where the checkpoints are not (a clone) the model the results
    ship in `shipped`, saved from that checkpoint."""
    from .checkpoints import load_model

    return run.load_model() if (Path(run.out_dir) / "checkpoints" / "best").exists() else load_model(repo_path(shipped))


def final_scores(runs: dict[int, Any], data: PreparedData) -> list[dict[str, Any]]:
    """Each final run (by seed) scored by its best checkpoint on every token of the test split and of the last 10% of
    the corpus, with its last validation evaluation (bits per byte, the sweep's windows) and its budget."""
    rows = []
    for seed, run in runs.items():
        test, last10 = held_out_scores(run, data, "test"), held_out_scores(run, data, "val+test")
        rows.append(
            {
                "seed": seed,
                "test_loss": test["test_loss"],
                "test_bpb": test["test_bpb"],
                "test_ppl": test["test_ppl"],
                "test_accuracy": test["test_accuracy"],
                "last10pct_val_loss": last10["val+test_loss"],
                "val_bpb": float(run.evals["val_bpb"].iloc[-1]),
                "tokens": run.summary["tokens"],
                "elapsed_s": run.summary["elapsed_s"],
                "tokens_per_s": run.summary["tokens_per_s"],
            }
        )
    return rows


def pooled_mean_ci(values, other_sd: float, other_dof: int) -> tuple[float, float, float, int]:
    """The mean of `values` with a 95% t-interval whose standard deviation pools the values' own spread with a seed
    noise `other_sd` measured on `other_dof` degrees of freedom elsewhere: (mean, half-width, pooled sd, dof).
    With two seeds a t(1) interval is 12.7 standard errors wide; pooling borrows the degrees of freedom of replicate
    runs, on the assumption that their seed noise is this run's. (Here, not in stats: stats is training code, and an
    edit there retrains every run.)"""
    import numpy as np

    from .stats import t_quantile

    x = np.asarray([v for v in values if v is not None], dtype=float)
    own_ss = float(((x - x.mean()) ** 2).sum()) if len(x) else 0.0
    dof = max(len(x) - 1, 0) + int(other_dof)
    if not len(x) or dof < 1:
        return (float(x.mean()) if len(x) else math.nan), math.nan, math.nan, dof
    sd = math.sqrt((own_ss + other_dof * other_sd**2) / dof)
    return float(x.mean()), float(t_quantile(dof) * sd / math.sqrt(len(x))), sd, dof


def ablation_seed_noise(out_dir: str | Path) -> dict[str, Any] | None:
    """The seed noise of 03's replicate runs beside a stage folder: the standard deviation of the validation loss over
    seeds within each arm, pooled over the arms (`stats.paired_pooled`: each arm's seeds share its config, so only the
    seed differs), with its degrees of freedom, from 03's runs.csv; None when 03 has no arm with two seeds."""
    import pandas as pd

    from .stats import paired_pooled

    table = sibling(out_dir, "03_ablations/runs.csv")
    if not table.exists():
        return None
    runs = pd.read_csv(table).dropna(subset=["val_loss"])
    arms = {arm: group["val_loss"].to_numpy(float) for arm, group in runs.groupby("variant")}
    variance, dof = paired_pooled(arms)
    if not dof:
        return None
    seeds = sorted({len(v) for v in arms.values() if len(v) >= 2})
    replicated = sum(len(v) >= 2 for v in arms.values())
    return {
        "sd": math.sqrt(variance),
        "dof": dof,
        "source": f"03's replicate runs: {replicated} arms x {'-'.join(map(str, seeds))} seeds, validation loss",
    }


def seed_headline(scores: list[dict[str, Any]], noise: dict[str, Any] | None = None) -> dict[str, Any]:
    """The final runs' means over seeds, each loss with its 95% t-interval over seeds (None with one seed): the
    headline is the mean, so a target is met by the mean, not by one lucky seed. With `noise` (replicate runs' seed
    noise, `ablation_seed_noise`), the loss intervals pool it with the seeds' own spread (`pooled_mean_ci`) and
    say so in `interval`; the seeds' own t-interval stays as `<key>_ci95_own_seeds`."""
    from .stats import mean_ci

    out: dict[str, Any] = {"seeds": [r["seed"] for r in scores], "n_seeds": len(scores), "per_seed": scores}
    for key in (
        "test_loss",
        "test_bpb",
        "test_accuracy",
        "last10pct_val_loss",
        "val_bpb",
        "tokens",
        "elapsed_s",
        "tokens_per_s",
    ):
        n, mean, _, half = mean_ci([r[key] for r in scores])
        out[key] = mean
        if key in ("test_loss", "last10pct_val_loss", "val_bpb"):
            out[f"{key}_ci95"] = None if math.isnan(half) else [mean - half, mean + half]
    out["test_ppl"] = math.exp(out["test_loss"])  # the perplexity of the mean loss, not the mean of perplexities
    dof = len(scores) - 1
    out["interval"] = f"t over the {len(scores)} seeds' own spread ({dof} degree{'' if dof == 1 else 's'} of freedom)"
    if noise and len(scores) >= 2:
        for key in ("test_loss", "last10pct_val_loss"):  # in nats, as 03's validation loss
            out[f"{key}_ci95_own_seeds"] = out[f"{key}_ci95"]
            mean, half, sd, dof = pooled_mean_ci([r[key] for r in scores], noise["sd"], noise["dof"])
            out[f"{key}_ci95"] = [mean - half, mean + half]
        out["interval"] = (
            f"t with the seed noise pooled from the final's {len(scores)} seeds and {noise['source']} (their sd "
            f"{noise['sd']:.4f} on {noise['dof']} degrees of freedom, {dof} in all; assumes 03's seed noise is the "
            "final's)"
        )
    return out


# --------------------------------------------------------------------------- hand-offs

# The file each stage leaves in its folder for the next ones (what the dashboard reads as its headline).
HANDOFFS = {
    "01_data_prep": "data.json",
    "02_baseline": "baseline.json",
    "03_ablations": "best.json",
    "04_tuning": "best.json",
    "05_final_model": "final.json",
}


def handoff_path(out_dir: str | Path, stage: str) -> Path:
    """Where `stage` leaves its hand-off, beside the stage folder `out_dir`."""
    choice(stage, "stage", tuple(HANDOFFS))
    return sibling(out_dir, f"{stage}/{HANDOFFS[stage]}")


def upstream(out_dir: str | Path, stage: str) -> dict[str, Any] | None:
    """An earlier stage's hand-off, or None when it has not run (each stage then runs alone on defaults)."""
    return read_handoff(handoff_path(out_dir, stage))


def stage_data(out_dir: str | Path, tokenizer: str = "char") -> PreparedData:
    """The data stage 01 prepared (read from its hand-off), or the bundled corpus prepared now.

    Later stages call this so each also runs alone: without 01's hand-off, or when 01 used another
    tokenizer, they fall back to the default corpus with the tokenizer asked for.
    """
    path = handoff_path(out_dir, "01_data_prep")
    if path.exists():
        found = json.loads(path.read_text())
        if found.get("tokenizer") == tokenizer and repo_path(found["prepared_dir"]).exists():
            return load_prepared(found["prepared_dir"])
    return prepare_data("tinyshakespeare", tokenizer)


def base_config(out_dir: str | Path, stage: str, profile: str, vocab_size: int) -> RunConfig:
    """The config an earlier stage handed on (02's baseline, 03's best variant), else the profile's baseline."""
    found = upstream(out_dir, stage)
    if found and found["train"].get(
        "init_from"
    ):  # 03 and 04 vary architectures and schedules of models trained from scratch
        raise ConfigError(
            f"init_from: {stage} fine-tuned {found['train']['init_from']}, and 03 and 04 study models trained from "
            "scratch. Fine-tune with 01, 02 and 05 alone (python -m labutils.pipeline notebooks/01_data_prep.ipynb "
            "notebooks/02_baseline.ipynb notebooks/05_final_model.ipynb -p init_from ...), or re-run 02 without "
            "init_from"
        )
    return (
        RunConfig.from_dict({"model": found["model"], "train": found["train"]})
        if found
        else baseline(profile, vocab_size)
    )


# --------------------------------------------------------------------------- stage 03's variants


def budget_tokens(config: RunConfig, steps: int | None = None) -> int:
    """A stage's token budget: `steps` x the config's tokens per step when given, else the config's own max_tokens
    (what 03 hands on), else its max_steps x tokens per step (02's baseline). One number from 02 to 04."""
    per_step = config.train.batch_size * config.train.grad_accum_steps * config.model.block_size
    if steps is not None:
        return steps * per_step
    if config.train.max_tokens:
        return int(config.train.max_tokens)
    require(
        config.train.max_steps is not None, "steps", "the base config has neither max_tokens nor max_steps; give steps"
    )
    return config.train.max_steps * per_step


def sets_lr(overrides: dict[str, Any]) -> bool:
    """Whether an arm is itself a learning-rate experiment (it keeps its LR under a study-wide `lr`)."""
    return "train.lr" in overrides


def notebook_defaults(stage: str) -> dict[str, Any]:
    """The defaults of a stage notebook's parameters cell (03's arms, 05's sweep design): what a plan or a check
    outside the notebook builds from, so the notebook stays the one place its experiment is written."""
    from .files import NOTEBOOKS_DIR
    from .freshness import parameter_defaults

    return parameter_defaults(NOTEBOOKS_DIR / f"{stage}.ipynb")


def from_text(value: Any, name: str) -> Any:
    """A notebook parameter that is a dict or list, as papermill may hand it over: `-p arms '{...}'` arrives as its
    text, read back here as JSON or a Python literal; any other value is returned as it is."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ConfigError(f"{name}: {value!r} is neither JSON nor a Python literal") from None


def parse_arms(arms: Any) -> dict[str, dict[str, Any]]:
    """03's `arms` parameter checked: {name: {"section.field": value}}, the baseline's {} first. papermill hands a
    dict given as `-p arms '{...}'` over as its text: JSON or a Python literal is read back here."""
    arms = from_text(arms, "arms")
    example = '{"baseline": {}, "pos_alibi": {"model.pos": "alibi"}}'
    require(
        isinstance(arms, dict)
        and all(isinstance(name, str) and isinstance(o, dict) and all("." in k for k in o) for name, o in arms.items()),
        "arms",
        f"expected {{arm name: {{'model.field' or 'train.field': value}}}}, e.g. {example}; got {arms!r}",
    )
    require(arms.get("baseline", {}) == {}, "arms", "the baseline arm changes nothing: give it {} (or leave it out)")
    return {"baseline": {}, **{name: dict(o) for name, o in arms.items() if name != "baseline"}}


def skip_for(skip_arms: Any, profile: str) -> list[str]:
    """03's `skip_arms` parameter checked ({profile: [arm, ...]}, JSON text from papermill too): this profile's list."""
    skip_arms = from_text(skip_arms, "skip_arms") or {}
    require(
        isinstance(skip_arms, dict)
        and set(skip_arms) <= set(PROFILES)
        and all(isinstance(v, list) and all(isinstance(a, str) for a in v) for v in skip_arms.values()),
        "skip_arms",
        f"expected {{profile: [arm name, ...]}} for profiles {list(PROFILES)}, got {skip_arms!r}",
    )
    return list(skip_arms.get(resolve(profile), []))


def ablation_study(
    profile: str,
    base: RunConfig,
    arms: Any,
    *,
    skip: list[str] | None = None,
    n_seeds: int | None = None,
    steps: int | None = None,
    lr: float | None = None,
) -> Study:
    """Stage 03: notebook 03's `arms` (name -> overrides of `base`) but those in `skip` (what the profile leaves out),
    over the profile's seeds, every arm at one token budget: `budget_tokens(base, steps)` (02's budget unless steps
    is given). Every arm's config is built and checked here, before anything trains.

    `lr` (the notebook parameter) sets the learning rate of every run except the arms that are LR experiments
    themselves: `lr_1e-3` still runs at 1e-3, so write-up 001's five experiments keep their meaning.
    """
    check_count("n_seeds", n_seeds, 2)  # one seed gives no interval and no test
    check_count("steps", steps)
    arms = parse_arms(arms)
    # skip names arms of the notebook's default list: those a user's own `arms` lacks are no error
    chosen = {name: overrides for name, overrides in arms.items() if name == "baseline" or name not in (skip or ())}
    tokens = budget_tokens(base, steps)
    per_step = base.train.batch_size * base.train.grad_accum_steps * base.model.block_size
    base_steps = max(1, tokens // per_step)
    # the budget lives in the base too, so tuning (04) and its re-runs train on exactly the same tokens
    train = dataclasses.replace(
        base.train,
        lr=base.train.lr if lr is None else lr,
        max_tokens=tokens,
        max_steps=None,
        time_budget_s=None,
        early_stopping_patience=None,
        warmup_steps=min(base.train.warmup_steps, base_steps // 5),
        eval_interval=max(1, base_steps // 3),
    )
    return Study(
        name="ablations",
        base=RunConfig(base.model, train),
        variants=chosen,
        n_seeds=n_seeds or ABLATIONS[resolve(profile)]["n_seeds"],
        max_tokens=tokens,
    )


def arms_left_out(arms: Any, study: Study) -> list[str]:
    """The arms of notebook 03's `arms` that this study does not run (its profile's `skip_arms`)."""
    return [name for name in parse_arms(arms) if name not in study.variants]


def lr_check_multipliers(lr_check: Any) -> tuple[float, ...]:
    """03's `lr_check` parameter checked: the multiples of each arm's LR it is also trained at."""
    multipliers = lr_check if lr_check is not None else ()
    require(
        isinstance(multipliers, (list, tuple))
        and all(isinstance(m, (int, float)) and not isinstance(m, bool) and m > 0 and m != 1 for m in multipliers),
        "lr_check",
        f"expected a list of multiples of the LR other than 1, e.g. [0.5, 2.0] (or [] for none), got {multipliers!r}",
    )
    return tuple(sorted(float(m) for m in multipliers))


def lr_check_study(study: Study, multipliers: tuple[float, ...]) -> Study | None:
    """03's LR check: every arm that is not an LR experiment, at multipliers x its own LR, on the study's first seed
    (its 1x run is the comparison's seed-0 run), at the study's budget and windows. None when no multipliers."""
    if not multipliers:
        return None
    arms = [name for name, overrides in study.variants.items() if not sets_lr(overrides)]
    variants = {
        lr_check_name(arm, m): {**study.variants[arm], "train.lr": study.config(arm).train.lr * m}
        for arm in arms
        for m in multipliers
    }
    return Study(
        name="lr_check",
        base=study.base,
        variants=variants,
        baseline=lr_check_name(study.baseline, multipliers[0]),
        n_seeds=1,
        first_seed=study.first_seed,
        max_tokens=study.max_tokens,
    )


def lr_check_name(arm: str, multiplier: float) -> str:
    return f"{arm}_lr{multiplier:g}x"


def lr_check_table(study: Study, runs, check_runs, multipliers: tuple[float, ...], mde: float | None = None):
    """Per arm (not an LR experiment) and LR multiplier m: its seed-`first_seed` metric (`x<m>`) and its difference to
    the baseline's at the same m and seed (`delta_x<m>`); the best multiplier; best against best (`delta_best_vs_best`,
    the same seed); `delta_at_1x`: the comparison's difference at 1x (mean over all seeds, for reference only);
    `flips`: like for like on that one seed, the sign of the difference at 1x and of best against best differ, so the
    verdict at the shared LR is an LR artefact; `shrink`: how much of the arm's difference at 1x is gone best against
    best (|Δ at 1x| - |Δ best vs best|, same seed; positive: the effect shrinks), and `lr_dependent`: it flips, or it
    shrinks by more than `mde` (the study's minimum detectable effect), so much of its verdict at the shared LR is the
    LR's doing although the sign holds (issue 48: `batch_size_16` led by 0.073 at 1x and by 0.022 best against best)."""
    import pandas as pd

    metric, seed = study.metric, study.first_seed
    first = runs[runs["seed"] == seed].set_index("variant")[metric]
    checked = check_runs.set_index("variant")[metric] if len(check_runs) else pd.Series(dtype=float)
    xs = [f"x{m:g}" for m in sorted((1.0, *multipliers))]
    rows = []
    for arm, overrides in study.variants.items():
        if sets_lr(overrides) or arm not in first.index:
            continue
        losses = {
            1.0: float(first[arm]),
            **{m: float(checked[lr_check_name(arm, m)]) for m in multipliers if lr_check_name(arm, m) in checked.index},
        }
        rows.append(
            {
                "variant": arm,
                **{f"x{m:g}": losses.get(m) for m in sorted((1.0, *multipliers))},
                "best_multiplier": min(losses, key=losses.get),
                "best_loss": min(losses.values()),
            }
        )
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    base = table.set_index("variant").loc[study.baseline]
    for x in xs:
        table[f"delta_{x}"] = table[x] - base[x]  # the same seed and the same multiple of each one's LR
    table["delta_best_vs_best"] = table["best_loss"] - base["best_loss"]
    means = runs.groupby("variant")[metric].mean()
    table["delta_at_1x"] = [float(means[v] - means[study.baseline]) for v in table["variant"]]
    table["flips"] = [
        v != study.baseline and (a > 0) != (b > 0)
        for v, a, b in zip(table["variant"], table["delta_x1"], table["delta_best_vs_best"], strict=True)
    ]
    table["shrink"] = table["delta_x1"].abs() - table["delta_best_vs_best"].abs()
    limit = mde if mde is not None and mde == mde else math.inf
    table["lr_dependent"] = [
        v != study.baseline and (flip or shrink > limit)
        for v, flip, shrink in zip(table["variant"], table["flips"], table["shrink"], strict=True)
    ]
    return table


def lr_check_labelled(table, seed: int, n_seeds: int):
    """The LR-check table as a report shows it: every column says what its number is (which seed, which LR)."""
    if table.empty:
        return table
    names = {"variant": "variant"}
    for x in [c for c in table.columns if c.startswith("x")]:
        names[x] = f"loss at {x[1:]}x (seed {seed})"
    for x in [c for c in table.columns if c.startswith("delta_x")]:
        names[x] = f"Δ vs baseline at {x[7:]}x (seed {seed})"
    names.update(
        {
            "best_multiplier": f"best multiple (seed {seed})",
            "best_loss": f"best loss (seed {seed})",
            "delta_best_vs_best": f"Δ best vs baseline's best (seed {seed})",
            "flips": f"ranking flips (seed {seed}: Δ at 1x vs best vs best)",
            "shrink": f"|Δ| lost best vs best (seed {seed})",
            "lr_dependent": "LR-dependent (flips, or loses more than the detectable effect)",
            "delta_at_1x": f"Δ at 1x, mean of {n_seeds} seeds (the comparison)",
        }
    )
    shown = table.assign(best_multiplier=[f"{m:g}x" for m in table["best_multiplier"]])
    return shown[list(names)].rename(columns=names)
