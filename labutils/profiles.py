"""How big each pipeline stage is under each profile, in one place.

`smoke` takes seconds (the tests run it), `cpu` fits the whole pipeline in about 15 minutes on a
2-core machine, `gpu` uses the seeds' own sizes on one GPU, and `auto` picks `gpu` when CUDA is
available, else `cpu`. Notebook parameters left as None take the profile's value; given ones win.
"""
from __future__ import annotations

import copy
from typing import Any

from .configbase import ConfigError, choice, require
from .experiments import ARCHITECTURE_VARIANTS, SEED001_VARIANTS, Study, apply_overrides

PROFILES = ("smoke", "cpu", "gpu")

_QUIET = {"log_interval": 10}

# Stage 02: the seed-001 baseline shape (minigpt) with the char tokenizer.
BASELINE = {
    "smoke": {"model": {"preset": "minigpt", "d_model": 32, "n_layer": 1, "n_head": 2, "block_size": 32},
              "train": {"device": "cpu", "lr": 5e-4, "batch_size": 8, "max_steps": 16, "warmup_steps": 2, "eval_interval": 8,
                        "eval_batches": 2, "log_interval": 4}},
    "cpu": {"model": {"preset": "minigpt"},
            "train": {"device": "cpu", "lr": 5e-4, "batch_size": 32, "max_steps": 600, "warmup_steps": 30, "eval_interval": 100,
                      "eval_batches": 10, **_QUIET}},
    "gpu": {"model": {"preset": "minigpt"},
            "train": {"lr": 5e-4, "batch_size": 32, "max_steps": 3000, "warmup_steps": 100, "eval_interval": 250, "eval_batches": 20,
                      "compile": False, **_QUIET}},
}

# Stage 03: every variant at one token budget, over seeds. smoke keeps a few variants to stay fast.
ABLATIONS = {
    "smoke": {"n_seeds": 2, "steps": 12, "variants": ["baseline", "lr_1e-3", "pos_rope", "gqa"]},
    "cpu": {"n_seeds": 2, "steps": 150, "variants": None},
    "gpu": {"n_seeds": 3, "steps": 2000, "variants": None},
}

# Stage 04: Optuna trials at the ablation budget, then the best re-run over seeds.
TUNING = {
    "smoke": {"n_trials": 3, "timeout": None, "n_seeds": 2},
    "cpu": {"n_trials": 8, "timeout": 180, "n_seeds": 2},
    "gpu": {"n_trials": 40, "timeout": 300, "n_seeds": 3},  # each stage fits one 10-minute GPU-kit command
}

# Stage 05: seed 000's final model (RoPE + GQA, char-level). cpu shrinks it to fit its budget.
FINAL = {
    "smoke": {"model": {"preset": "final-char", "d_model": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 1, "block_size": 32},
              "train": {"device": "cpu", "max_steps": None, "max_tokens": 8 * 32 * 20, "eval_interval": 10, "eval_batches": 2, "log_interval": 5}},
    "cpu": {"model": {"preset": "final-char", "d_model": 128, "n_layer": 4, "n_head": 4, "n_kv_head": 2, "block_size": 128},
            "train": {"device": "cpu", "max_steps": None, "max_tokens": 3_500_000, "time_budget_s": 240, "eval_interval": 150, "eval_batches": 10,
                      **_QUIET}},
    "gpu": {"model": {"preset": "final-char"},
            "train": {"max_steps": None, "max_tokens": 64 * 256 * 5000, "time_budget_s": 300, "eval_interval": 250, "eval_batches": 20, **_QUIET}},
}

# Hyper-parameters the final model takes from 04's hand-off (its architecture is FINAL's).
TUNED_KEYS = ("train.lr", "train.warmup_steps", "train.weight_decay", "train.betas", "train.label_smoothing",
              "train.batch_size", "model.dropout")


def resolve(profile: str) -> str:
    """'auto' becomes 'gpu' when CUDA is available, else 'cpu'; other names are checked."""
    if not isinstance(profile, str):
        raise ConfigError(f"profile: expected a string, one of {('auto', *PROFILES)}; got {profile!r}")
    if profile == "auto":
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    choice(profile, "profile", ("auto", *PROFILES))
    return profile


def _check_count(name: str, value: Any, minimum: int = 1) -> None:
    """A notebook count parameter (steps, n_seeds, n_trials): a whole number >= minimum, or None."""
    require(value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= minimum), name,
            f"expected a whole number >= {minimum} or None, got {value!r}")


def _given(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _spec(table: dict, profile: str, model: dict[str, Any], train: dict[str, Any]) -> dict[str, dict]:
    spec = copy.deepcopy(table[resolve(profile)])
    spec["model"].update(model)
    spec["train"].update(train)
    return spec


def baseline_spec(profile: str, *, preset: str | None = None, lr: float | None = None, batch_size: int | None = None,
                  max_steps: int | None = None, block_size: int | None = None, seed: int | None = None,
                  device: str | None = None) -> dict[str, dict]:
    """The baseline's {"model", "train"} spec: the profile's sizes with the given parameters on top."""
    spec = _spec(BASELINE, profile, _given(preset=preset, block_size=block_size),
                 _given(lr=lr, batch_size=batch_size, max_steps=max_steps, seed=seed, device=device))
    if "preset" in spec["model"] and preset is not None and preset != BASELINE[resolve(profile)]["model"].get("preset"):
        # another preset brings its own sizes; the profile's size overrides were for minigpt
        spec["model"] = _given(preset=preset, block_size=block_size)
    return spec


def ablation_study(profile: str, base: dict[str, dict], *, n_seeds: int | None = None, steps: int | None = None,
                   variants: list[str] | None = None, lr: float | None = None) -> Study:
    """Seed 001's hyper-parameter experiments and the architecture ablations against `base`.

    `lr` (the notebook parameter) overrides the learning rate of every run, including the
    `lr_1e-3` variant, whose own value is then the same as the baseline's.
    """
    settings = ABLATIONS[resolve(profile)]
    _check_count("n_seeds", n_seeds, 2)  # one seed gives no interval and no test
    _check_count("steps", steps)
    every = {**SEED001_VARIANTS, **ARCHITECTURE_VARIANTS}
    if isinstance(variants, str):  # `-p variants gqa,pos_rope` from the command line
        variants = [v.strip() for v in variants.split(",") if v.strip()]
    require(variants is None or (isinstance(variants, list) and all(isinstance(v, str) for v in variants)), "variants",
            f"expected a list of variant names or a comma-separated string, got {variants!r}")
    names = variants or settings["variants"] or list(every)
    unknown = sorted(set(names) - set(every))
    if unknown:
        raise ConfigError(f"variants: unknown {unknown}; choose from {list(every)}")
    base = apply_overrides(base, {"train.lr": lr} if lr is not None else {})
    chosen = {name: dict(every[name]) for name in names}
    if lr is not None:
        chosen = {name: {k: v for k, v in o.items() if k != "train.lr"} for name, o in chosen.items()}
    chosen.setdefault("baseline", {})
    chosen = {"baseline": chosen.pop("baseline"), **chosen}
    train = base["train"]
    block = base["model"].get("block_size")
    if block is None:
        from .config import get_preset

        block = get_preset(base["model"].get("preset", "minigpt"), vocab_size=2).block_size
    tokens = (steps or settings["steps"]) * train.get("batch_size", 32) * train.get("grad_accum_steps", 1) * block
    # the budget lives in the base too, so tuning (04) and its re-runs train on exactly the same tokens
    train = {k: v for k, v in train.items() if k not in ("max_steps", "time_budget_s", "early_stopping_patience")}
    train["max_tokens"] = tokens
    train["warmup_steps"] = min(train.get("warmup_steps", 0), (steps or settings["steps"]) // 5)
    train["eval_interval"] = max(1, (steps or settings["steps"]) // 3)
    return Study(name="ablations", base={"model": base["model"], "train": train}, variants=chosen,
                 n_seeds=n_seeds or settings["n_seeds"], max_tokens=tokens)


def tuning_settings(profile: str, **given: Any) -> dict[str, Any]:
    """n_trials, timeout and n_seeds of stage 04: the profile's, with the given ones on top."""
    unknown = sorted(set(given) - {"n_trials", "timeout", "n_seeds"})
    require(not unknown, "tuning_settings", f"unknown settings {unknown}")
    _check_count("n_trials", given.get("n_trials"))
    _check_count("n_seeds", given.get("n_seeds"), 2)
    timeout = given.get("timeout")
    require(timeout is None or (isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0), "timeout",
            f"expected seconds > 0 or None, got {timeout!r}")
    return {**TUNING[resolve(profile)], **_given(**given)}


# What stage 05's last-10% validation loss should reach per profile (issue targets; None: no target),
# and nanoGPT's published shakespeare_char figure on the same split, for comparison.
TARGET_VAL_LOSS = {"smoke": None, "cpu": 1.85, "gpu": 1.47}
NANOGPT_SHAKESPEARE_CHAR_VAL_LOSS = 1.4697


def tuned_table(tuned: dict[str, Any] | None, spec: dict[str, dict]):
    """What 04 handed on for each tuned key, beside what stage 05 actually uses."""
    import pandas as pd

    def value(source, key):
        section, name = key.split(".")
        return (source or {}).get(section, {}).get(name)

    return pd.DataFrame({"from 04": {k: value(tuned, k) for k in TUNED_KEYS}, "used": {k: value(spec, k) for k in TUNED_KEYS}})


def target_check(profile: str, last10pct_val_loss: float) -> dict[str, Any]:
    """The final model's last-10% validation loss against the profile's target and nanoGPT's figure."""
    target = TARGET_VAL_LOSS[resolve(profile)]
    return {"target_val_loss": target, "meets_target": None if target is None else bool(last10pct_val_loss <= target),
            "nanogpt_val_loss": NANOGPT_SHAKESPEARE_CHAR_VAL_LOSS,
            "gap_to_nanogpt": last10pct_val_loss - NANOGPT_SHAKESPEARE_CHAR_VAL_LOSS}


def final_spec(profile: str, tuned: dict[str, Any] | None = None, **given: Any) -> dict[str, dict]:
    """The final model: FINAL's architecture, 04's tuned hyper-parameters, then the given parameters."""
    spec = copy.deepcopy(FINAL[resolve(profile)])
    if tuned:
        for key in TUNED_KEYS:
            section, name = key.split(".")
            if name in tuned.get(section, {}):
                spec[section][name] = tuned[section][name]
    model_keys = {"block_size", "d_model", "n_layer", "preset"}
    spec["model"].update(_given(**{k: v for k, v in given.items() if k in model_keys}))
    spec["train"].update(_given(**{k: v for k, v in given.items() if k not in model_keys}))
    return spec
