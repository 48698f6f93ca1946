"""Scaling-law fits of the lab's own runs: for a compute budget, how big a model, on how many tokens, reaching what
loss.

Runs come as a tidy frame, one row per run: `compute` (training FLOPs, from the model's own FLOP count),
`params` (N), `tokens` (D) and `loss` (bits per byte, so that tokenizers compare).

- The design (`Sweep`, `size_ladder`, `plan_budgets`, `initial_sizes`): budgets follow from the final run's compute C_f,
  the largest `extrapolation` times below it and the rest spread over `decades` below that, raised together when the
  ladder's smallest sizes would train fewer than `min_steps` steps there (a large vocabulary's head makes small
  models expensive per token). Each budget starts with `n_sizes` consecutive sizes of a ladder that grows by about
  `ladder_ratio` in parameters, centred on Chinchilla's 20 tokens a parameter; `run_budgets` then adds sizes on the
  side where a budget's least loss sits at the edge, until it is bracketed (resumable, like every study).
- The LR rule (`lr_fit_study`, `fit_lr_rule`): LR(width) = intercept x width^-exponent, both fitted from the best LR
  (a parabola's vertex in log LR) at several widths of a short sweep; it holds when every width's best lies inside the
  multiples tried and within one grid step of the rule. Every size of the sweep, and the final run, train at it.
- Approach 2, IsoFLOP (`isoflop_fit`): at each budget a parabola of loss in log N, its minimum N_opt(C), then the power
  laws N_opt = k_N C^a and D_opt = k_D C^b over the budgets whose minimum is bracketed.
- Approach 3, parametric (`parametric_fit`): L(N, D) = E + A / N^alpha + B / D^beta, a Huber loss on log L minimised by
  L-BFGS from the best points of a grid of starts (Hoffmann et al. 2022; Besiroglu et al. 2024 found that one start
  lands in poor local minima).
- Intervals (`parametric_bootstrap`): the fitted law plus noise of the size of the fit's residuals (at least the seed
  noise the replicated budgets measure), refitted from several starts, 1,000 times by default. A parameter whose fit, or
  whose interval, reaches a bound of the fit is "not identified" (`identification`), and then the recommendation comes
  from approach 2 when it is bracketed, or there is none and the report says what to run.
- The recommendation (`recommend`): the law's pick (least predicted loss over the ladder at C_f) and, separately, the
  pick under the repetition cap (at most REPEATED_DATA_EPOCHS of the training split), which the final run trains.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .config import RunConfig
from .data import as_prepared
from .model import ModelConfig, model_shape
from .stats import CONFIDENCE
from .studies import Study, compute_tokens, finished_summary, run_study
from .training import train
from .validation import ConfigBase, ConfigError, require

# The repetition cap: a fresh-token law may not pick a run longer than this many epochs of the training split. 8, not
# Muennighoff et al.'s 4 (where repeating is almost as good as fresh data): on tiny Shakespeare the lab's 4 x 128 model
# went on gaining to 12 epochs (test 1.663 after 3.5 epochs, 1.596 after 12; issue 50), and the data-constrained law
# that could set the cap from the runs is not identified until they reach 16 epochs (`data_constrained_fit`)
REPEATED_DATA_EPOCHS = 8.0
FIT_COLUMNS = ("compute", "params", "tokens", "loss")


def mark_repetition(runs: pd.DataFrame, train_tokens: int) -> pd.DataFrame:
    """The runs with `epochs` over a training split of `train_tokens` and `repeated` past REPEATED_DATA_EPOCHS."""
    epochs = runs["tokens"] / train_tokens
    return runs.assign(epochs=epochs, repeated=epochs > REPEATED_DATA_EPOCHS)


def _check_runs(runs: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in FIT_COLUMNS if c not in runs]
    if missing:
        raise ConfigError(f"scaling fits need the columns {', '.join(FIT_COLUMNS)}; missing {', '.join(missing)}")
    runs = runs.dropna(subset=list(FIT_COLUMNS))
    if (runs[list(FIT_COLUMNS)] <= 0).any().any():
        raise ConfigError("compute, params, tokens and loss must all be positive")
    return runs


# --------------------------------------------------------------------------- the design


def size_ladder(
    base: ModelConfig, max_width: int, *, aspect: int = 32, head_dim: int = 32, width_step: int = 8, ratio: float = 1.5
) -> list[ModelConfig]:
    """Shapes along one line, each about `ratio` times the parameters of the one before: widths in steps of
    `width_step` up to `max_width`, depth = width / aspect (at least 1), heads of about head_dim (fewer where the width
    does not divide), the rest as in `base` (a GQA base keeps its query heads per key/value head)."""
    group = base.n_head // base.n_kv_head if base.n_kv_head else None
    models, last = [], 0.0
    for width in range(width_step, max_width + 1, width_step):
        heads = max(1, width // head_dim)
        while width % heads or (width // heads) % 2:  # whole heads, of an even size (RoPE rotates pairs)
            heads -= 1
        model = base.replace(
            n_layer=max(1, round(width / aspect)),
            d_model=width,
            n_head=heads,
            head_dim=None,
            n_kv_head=_kv_heads(heads, group) if group else None,
        )
        params = model_shape(model).num_params()
        if params >= ratio * last:
            models.append(model)
            last = params
    return models


def _kv_heads(heads: int, group: int) -> int:
    """The most key/value heads that divide `heads` with at least `group` query heads each (GQA's sharing kept)."""
    return max(k for k in range(1, max(1, heads // group) + 1) if heads % k == 0)


@dataclass
class Sweep(ConfigBase):
    """How 05 sizes its model (module docstring): the ladder (`max_width`, `aspect`, `head_dim`, `width_step`,
    `ladder_ratio`), the budgets (`n_budgets` over `decades`, the largest C_f / `extrapolation`), `n_sizes` a budget
    to start with and up to `max_extensions` rounds of sizes added at an edge, `min_steps` a run (fewer: left out of
    the fit), the sweep's batch (None: the base's; the final run trains at the sweep's batch, the one the law and the LR
    rule were measured at), `replicate_seeds` seeds at the `replicated_budgets` smallest budgets (the noise floor), and
    the LR fit: `lr_fit_multipliers` of the prior rule's LR at `lr_fit_widths` widths. `drop_above_unigram`: leave out
    of the fit the runs that end at or above the unigram (off only in the smoke profile, whose runs all do)."""

    max_width: int = 256
    aspect: int = 32
    head_dim: int = 32
    width_step: int = 8
    ladder_ratio: float = 1.5
    n_budgets: int = 4
    decades: float = 1.5
    extrapolation: float = 8.0
    n_sizes: int = 5
    max_extensions: int = 3
    min_steps: int = 100
    batch_size: int | None = None
    tokens_per_param: float = 20.0
    replicated_budgets: int = 2
    replicate_seeds: int = 2
    lr_fit_multipliers: tuple = (0.25, 0.5, 1.0, 2.0, 4.0)
    lr_fit_widths: int = 3
    drop_above_unigram: bool = True

    def validate(self) -> None:
        require(self.n_budgets >= 2 and self.decades > 0, "n_budgets", "give two or more budgets over decades > 0")
        require(self.n_sizes >= 3, "n_sizes", "give three or more sizes a budget: a parabola in log N needs three")
        require(
            self.extrapolation >= 1, "extrapolation", "the final run's compute over the largest budget must be >= 1"
        )
        require(
            self.ladder_ratio > 1 and self.width_step >= 1 and self.max_width >= self.width_step,
            "ladder_ratio",
            "the ladder needs ladder_ratio > 1 and max_width >= width_step >= 1",
        )
        grid = self.lr_fit_multipliers
        require(
            len(grid) >= 3 and 1.0 in grid and all(x > 0 for x in grid) and len(set(grid)) == len(grid),
            "lr_fit_multipliers",
            "give three or more distinct positive multipliers of the rule's LR, 1.0 among them",
        )
        require(self.lr_fit_widths >= 2, "lr_fit_widths", "the LR rule's exponent needs two widths or more")
        require(
            self.min_steps >= 1 and self.replicate_seeds >= 1 and self.max_extensions >= 0,
            "min_steps",
            "min_steps and replicate_seeds must be >= 1, max_extensions >= 0",
        )
        require(self.batch_size is None or self.batch_size >= 1, "batch_size", "give a batch of 1 or more, or None")


def shape_overrides(n_layer: int, d_model: int, n_head: int, n_kv_head: int | None) -> dict:
    """The dotted overrides that give a run one shape of the ladder (head_dim follows from width and heads)."""
    return {
        "model.n_layer": n_layer,
        "model.d_model": d_model,
        "model.n_head": n_head,
        "model.n_kv_head": n_kv_head,
        "model.head_dim": None,
    }


def _size_name(model: ModelConfig) -> str:
    return f"L{model.n_layer}_d{model.d_model}"


LR_FIT = "lr_fit"  # the LR fit's study, left out of the law's fit


def law_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs the law is fitted on: the budget studies' runs that trained `min_steps` steps and ended below the
    unigram (`usable`, when `size_model` marked it), not the LR fit's."""
    keep = runs["study"] != LR_FIT
    if "usable" in runs:
        keep &= runs["usable"].astype(bool)
    return runs[keep].reset_index(drop=True)


def sweep_base(base: RunConfig, sweep: Sweep) -> RunConfig:
    """`base` as the sweep trains it: at the sweep's batch, scored on the evaluation tokens `base` is scored on (so
    every run of the sweep and the final run share one set of windows), one evaluation at the end."""
    tcfg = base.train
    eval_tokens = (
        tcfg.eval_tokens or tcfg.eval_batches * (tcfg.eval_batch_size or tcfg.batch_size) * base.model.block_size
    )
    return base.override(
        {
            "train.batch_size": sweep.batch_size or tcfg.batch_size,
            "train.eval_tokens": eval_tokens,
            "train.eval_split": tcfg.eval_split or "val",
            "train.early_stopping_patience": None,
        }
    )


def _per_step(base: RunConfig) -> int:
    return base.train.batch_size * base.train.grad_accum_steps * base.model.block_size


def _steps(base: RunConfig, model: ModelConfig, compute: float) -> int:
    """The whole steps a study at `compute` FLOPs trains `model` for (what `compute_tokens` gives it)."""
    return compute_tokens(
        base.override(shape_overrides(model.n_layer, model.d_model, model.n_head, model.n_kv_head)), compute
    ) // _per_step(base)


def plan_budgets(base: RunConfig, sweep: Sweep, ladder: list[ModelConfig], final_compute: float) -> tuple[float, ...]:
    """The sweep's budgets for a final run of `final_compute` FLOPs (module docstring); `base` at the sweep's batch."""
    require(
        len(ladder) >= sweep.n_sizes,
        "max_width",
        f"the ladder has {len(ladder)} sizes up to width {sweep.max_width}; "
        f"a budget needs {sweep.n_sizes}: raise max_width or lower ladder_ratio",
    )
    top = final_compute / sweep.extrapolation
    bottom = top / 10**sweep.decades
    fpt = model_shape(ladder[sweep.n_sizes - 1]).flops_per_token()
    floor = (
        (sweep.min_steps + 0.5) * _per_step(base) * fpt
    )  # the n_sizes smallest sizes train min_steps at the smallest
    shift = max(1.0, floor / bottom)
    return tuple(float(b) for b in np.geomspace(bottom * shift, top * shift, sweep.n_budgets))


def initial_sizes(base: RunConfig, sweep: Sweep, ladder: list[ModelConfig], compute: float) -> list[int]:
    """The ladder indices a budget starts with: `n_sizes` consecutive sizes that train `min_steps` steps, centred on
    the size nearest `tokens_per_param` tokens a parameter (Chinchilla's 20: a prior the extensions correct)."""
    allowed = [i for i, m in enumerate(ladder) if _steps(base, m, compute) >= sweep.min_steps]
    if len(allowed) < sweep.n_sizes:
        raise ConfigError(
            f"budget {compute:.3g} FLOPs trains {len(allowed)} of the ladder's sizes {sweep.min_steps}+ steps "
            f"({_per_step(base):,} tokens a step); it needs {sweep.n_sizes}: lower the sweep's batch_size"
        )
    ratio = [_steps(base, ladder[i], compute) * _per_step(base) / model_shape(ladder[i]).num_params() for i in allowed]
    center = int(np.argmin(np.abs(np.log(np.asarray(ratio) / sweep.tokens_per_param))))
    start = min(max(0, center - sweep.n_sizes // 2), len(allowed) - sweep.n_sizes)
    return [allowed[k] for k in range(start, start + sweep.n_sizes)]


# --------------------------------------------------------------------------- the LR rule


def prior_rule(base: RunConfig) -> dict:
    """LR = base's LR x base width / width: the rule before the LR fit measured one. Why 1 / width: Adam moves every
    weight by about the LR per step, so a matrix's output moves about width times as far, and 1 / width keeps that
    fixed (µP's rule for Adam's hidden matrices, Yang et al. 2022, applied to every weight)."""
    return {"exponent": 1.0, "intercept": base.train.lr * base.model.d_model, "fitted": False}


def rule_lr(rule: dict, width: int) -> float:
    """The rule's LR at `width`: intercept x width^-exponent."""
    return rule["intercept"] * width ** -rule["exponent"]


def _overrides(model: ModelConfig, lr: float) -> dict:
    return {**shape_overrides(model.n_layer, model.d_model, model.n_head, model.n_kv_head), "train.lr": lr}


def _study(base: RunConfig, name: str, variants: dict, compute: float, n_seeds: int = 1) -> Study:
    # Each run evaluated (and checkpointed) once, at its end: a sweep's runs are short, and a cut one is trained again.
    # Its warm-up is at most a fifth of its own steps. Both are the run's own, never the budget's other sizes': a size
    # added at an edge then leaves every run already trained as it was (when they came from the set of sizes, each
    # extension changed every run's config of that budget, and the whole budget trained again).
    def own(overrides: dict) -> dict:
        steps = compute_tokens(base.override(overrides), compute) // _per_step(base)
        return {
            **overrides,
            "train.eval_interval": max(1, steps),
            "train.warmup_steps": min(base.train.warmup_steps, max(0, steps // 5)),
        }

    return Study(
        name=name,
        base=base,
        variants={variant: own(overrides) for variant, overrides in variants.items()},
        baseline=next(iter(variants)),
        n_seeds=n_seeds,
        budget="compute",
        compute=float(compute),
        eval_split=base.train.eval_split or "val",
    )


def lr_fit_study(base: RunConfig, sweep: Sweep, ladder: list[ModelConfig], budgets: tuple[float, ...]) -> Study:
    """The LR sweep the rule is fitted from: `lr_fit_multipliers` of the prior rule's LR at `lr_fit_widths` widths
    spread over the second budget's first sizes (the smallest budget's sizes are the ladder's tiniest), at that
    budget."""
    compute = budgets[min(1, len(budgets) - 1)]
    sizes = initial_sizes(base, sweep, ladder, compute)
    picks = sorted({sizes[round(k)] for k in np.linspace(0, len(sizes) - 1, sweep.lr_fit_widths)})
    prior = prior_rule(base)
    variants = {
        f"{_size_name(ladder[i])}_lr{x:g}": _overrides(ladder[i], x * rule_lr(prior, ladder[i].d_model))
        for i in picks
        for x in sweep.lr_fit_multipliers
    }
    return _study(base, LR_FIT, variants, compute)


def budget_study(
    base: RunConfig, sweep: Sweep, ladder: list[ModelConfig], index: int, compute: float, sizes: list[int], rule: dict
) -> Study:
    """Budget `index` ('c0', 'c1', ...): the ladder's `sizes`, each at the rule's LR, on replicated seeds at the
    `replicated_budgets` smallest budgets."""
    variants = {_size_name(ladder[i]): _overrides(ladder[i], rule_lr(rule, ladder[i].d_model)) for i in sorted(sizes)}
    seeds = sweep.replicate_seeds if index < sweep.replicated_budgets else 1
    return _study(base, f"c{index}", variants, compute, n_seeds=seeds)


def sweep_ladder(base: RunConfig | ModelConfig, sweep: Sweep, max_width: int | None = None) -> list[ModelConfig]:
    """The sweep's ladder around `base`'s model (`size_ladder` with the sweep's settings), up to `max_width` (None:
    the sweep's)."""
    return size_ladder(
        base.model if isinstance(base, RunConfig) else base,
        max_width or sweep.max_width,
        aspect=sweep.aspect,
        head_dim=sweep.head_dim,
        width_step=sweep.width_step,
        ratio=sweep.ladder_ratio,
    )


def planned_studies(base: RunConfig, sweep: Sweep, compute: float) -> dict[str, Study]:
    """The studies a sweep for a final run of `compute` FLOPs starts with, before the LR fit has set the rule (the
    prior's) and before any size is added at an edge: what a plan of the pipeline counts."""
    base = sweep_base(base, sweep)
    ladder = sweep_ladder(base, sweep)
    budgets = plan_budgets(base, sweep, ladder, compute)
    studies = {LR_FIT: lr_fit_study(base, sweep, ladder, budgets)}
    for k, c in enumerate(budgets):
        studies[f"c{k}"] = budget_study(
            base, sweep, ladder, k, c, initial_sizes(base, sweep, ladder, c), prior_rule(base)
        )
    return studies


def run_sweep(studies: dict[str, Study], data, out_dir, *, devices=None, progress: bool = True) -> pd.DataFrame:
    """Train every study's runs not finished yet into out_dir/<name>/ (resumable, as any study), then one row per
    run: study, variant, seed, depth, width, lr, steps, FIT_COLUMNS (compute: the study's budget; loss: bits per byte),
    the FLOPs it trained, val_loss, FLOPs per token and throughput."""
    frames = []
    for name, study in studies.items():
        result = run_study(study, data, f"{out_dir}/{name}", devices=devices, progress=progress)
        runs = result.runs.assign(study=name)
        configs = {v: study.config(v) for v in study.variants}
        for column, field in (
            ("n_layer", lambda c: c.model.n_layer),
            ("d_model", lambda c: c.model.d_model),
            ("lr", lambda c: c.train.lr),
            ("per_step", _per_step),
        ):
            runs[column] = runs["variant"].map({v: field(c) for v, c in configs.items()})
        runs["compute"] = (
            study.compute
        )  # the budget, so that a budget's runs group (whole steps make train_flops differ by < 1%)
        frames.append(runs)
    runs = pd.concat(frames, ignore_index=True)
    runs["steps"] = (runs["tokens"] // runs["per_step"]).astype(int)
    columns = [
        "study",
        "variant",
        "seed",
        "n_layer",
        "d_model",
        "lr",
        "steps",
        *FIT_COLUMNS,
        "train_flops",
        "val_loss",
        "flops_per_token",
        "tokens_per_s",
    ]
    return runs.assign(params=runs["num_params"], loss=runs["val_bpb"])[columns]


def _best_multiplier(curve: pd.DataFrame) -> tuple[float, bool]:
    """The multiplier of least loss, between the grid's points: the vertex of the parabola in log LR through the
    best point and its two neighbours; at the grid's edge, that point and True (the best may lie beyond)."""
    curve = curve.sort_values("multiplier")
    x, y = np.log2(curve["multiplier"].to_numpy(float)), curve["loss"].to_numpy(float)
    i = int(np.argmin(y))
    if i in (0, len(y) - 1):
        return float(2 ** x[i]), True
    a, b, _ = np.polyfit(x[i - 1 : i + 2], y[i - 1 : i + 2], 2)
    return float(2 ** (-b / (2 * a) if a > 0 else x[i])), False


def fit_lr_rule(runs: pd.DataFrame, prior: dict, *, bounds: tuple[float, float] = (0.0, 2.0)) -> dict:
    """LR(width) = intercept x width^-exponent from the 'lr_fit' study: each width's best LR (`_best_multiplier` of the
    prior rule's), then a line through log best LR against log width, the exponent kept within `bounds` (its
    intercept refitted there). Widths whose best lies at the edge of the multiples tried are censored: with fewer than
    two measured the exponent stays the prior's (its intercept from the one measured, if any). The rule holds when no
    width is censored and every measured best is within one grid step of the rule."""
    fit = runs[runs["study"] == LR_FIT].copy()
    fit["multiplier"] = (fit["lr"] / [rule_lr(prior, w) for w in fit["d_model"]]).round(6)
    curves = fit.groupby(["d_model", "multiplier"], as_index=False)["loss"].mean()
    best = {int(w): _best_multiplier(g) for w, g in curves.groupby("d_model")}
    require(len(best) >= 2, "runs", f"the LR fit needs runs at two widths or more, got widths {sorted(best)}")
    best_lr = {w: m * rule_lr(prior, w) for w, (m, _) in best.items()}
    measured = [w for w, (_, edge) in best.items() if not edge]
    log_w, log_lr = np.log(measured), np.log([best_lr[w] for w in measured])
    raw = float(-np.polyfit(log_w, log_lr, 1)[0]) if len(measured) >= 2 else None
    exponent = min(max(raw, bounds[0]), bounds[1]) if len(measured) >= 2 else prior["exponent"]
    intercept = float(np.exp(np.mean(log_lr + exponent * log_w))) if measured else prior["intercept"]
    rule = {
        "exponent": exponent,
        "intercept": intercept,
        "fitted": len(measured) >= 2,
        "raw_exponent": raw,
        "bounded": len(measured) >= 2 and raw != exponent,
        "censored_widths": sorted(set(best) - set(measured)),
        "best_multiplier": {w: m for w, (m, _) in best.items()},
        "best_lr": best_lr,
        "prior": dict(prior),
        "compute": float(fit["compute"].iloc[0]),
    }
    grid = np.log2(sorted(curves["multiplier"].unique()))
    step = float(np.min(np.diff(grid)))  # one step of the multiples' grid, in log2
    rule["off_by_steps"] = {w: abs(math.log2(best_lr[w] / rule_lr(rule, w))) / step for w in best}
    rule["holds"] = bool(not rule["censored_widths"] and max(rule["off_by_steps"].values()) <= 1 + 1e-9)
    rule["curves"] = curves.assign(
        lr=[m * rule_lr(prior, w) for w, m in zip(curves["d_model"], curves["multiplier"], strict=True)]
    )
    return rule


# --------------------------------------------------------------------------- approach 2: IsoFLOP


@dataclass(frozen=True)
class IsoFlopFit:
    """Per budget: the parabola's minimum (N_opt, D_opt, loss there) and whether the sizes tried bracket it;
    across the bracketed budgets: N_opt = n_coef * C^a and D_opt = d_coef * C^b."""

    curves: pd.DataFrame  # one row per budget: compute, n_opt, d_opt, loss_opt, bracketed, curvature
    a: float
    n_coef: float
    b: float
    d_coef: float

    def n_opt(self, compute) -> np.ndarray:
        return self.n_coef * np.asarray(compute, dtype=float) ** self.a

    def d_opt(self, compute) -> np.ndarray:
        return self.d_coef * np.asarray(compute, dtype=float) ** self.b


def isoflop_curve(compute: float, params: np.ndarray, tokens: np.ndarray, loss: np.ndarray) -> dict:
    """One budget's parabola of loss in log N: its minimum, and the tokens there (log D is linear in log N at
    a fixed budget when FLOPs per token grow with N, so it is interpolated the same way)."""
    x = np.log(params)
    if len(np.unique(x)) < 3:
        raise ConfigError(f"budget {compute:.3g} FLOPs has {len(np.unique(x))} model sizes; a parabola needs 3")
    curvature, slope, intercept = np.polyfit(x, loss, 2)
    x_opt = -slope / (2 * curvature) if curvature > 0 else math.nan
    d_slope, d_intercept = np.polyfit(x, np.log(tokens), 1)
    return {
        "compute": compute,
        "n_opt": math.exp(x_opt),
        "d_opt": math.exp(d_intercept + d_slope * x_opt),
        "loss_opt": intercept - slope**2 / (4 * curvature) if curvature > 0 else math.nan,
        "bracketed": bool(curvature > 0 and x.min() <= x_opt <= x.max()),
        "curvature": float(curvature),
    }


def isoflop_fit(runs: pd.DataFrame) -> IsoFlopFit:
    """Approach 2 on the runs (several sizes at each of several budgets); the power laws use only the budgets
    whose minimum lies within the sizes tried, and need two of them."""
    runs = _check_runs(runs).sort_values("compute", kind="stable")
    compute, params, tokens, loss = (runs[c].to_numpy(float) for c in FIT_COLUMNS)
    require(len(compute) > 0, "runs", "no runs to fit")
    budgets, starts = np.unique(compute, return_index=True)
    ends = [*starts[1:], len(compute)]
    curves = pd.DataFrame(
        [isoflop_curve(c, params[i:j], tokens[i:j], loss[i:j]) for c, i, j in zip(budgets, starts, ends, strict=True)]
    )
    inside = curves[curves["bracketed"]]
    if len(inside) < 2:
        raise ConfigError(
            f"{len(inside)} of {len(curves)} budgets have their loss minimum within the sizes tried; the power "
            "laws need two. Add sizes on the side where the loss still falls."
        )
    log_c = np.log(inside["compute"].to_numpy())
    a, log_kn = np.polyfit(log_c, np.log(inside["n_opt"].to_numpy()), 1)
    b, log_kd = np.polyfit(log_c, np.log(inside["d_opt"].to_numpy()), 1)
    return IsoFlopFit(curves, float(a), math.exp(log_kn), float(b), math.exp(log_kd))


# --------------------------------------------------------------------------- approach 3: L(N, D)


@dataclass(frozen=True)
class ParametricFit:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, params, tokens) -> np.ndarray:
        n, d = np.asarray(params, dtype=float), np.asarray(tokens, dtype=float)
        return self.E + self.A / n**self.alpha + self.B / d**self.beta


# Hoffmann et al.'s grid of starts, in (log A, log B, log E, alpha, beta)
START_GRID = {
    "log_a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "log_b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "log_e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
}


# (log A, log B, log E, alpha, beta): wide enough for any law the grid starts from, and finite, so that a resample
# that cannot pin A or B (one size left at a budget) lands on a bound instead of overflowing
FIT_BOUNDS = [(-10.0, 60.0), (-10.0, 60.0), (-20.0, 5.0), (0.0, 5.0), (0.0, 5.0)]


GRID = np.array(list(itertools.product(*START_GRID.values())))


def _huber(residual: np.ndarray, delta: float) -> np.ndarray:
    size = np.abs(residual)
    return np.where(size <= delta, 0.5 * residual**2, delta * (size - 0.5 * delta))


def _huber_objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float):
    """The summed Huber loss of log L(N, D) against log L, and its gradient in (log A, log B, log E, alpha, beta)."""
    log_a, log_b, log_e, alpha, beta = theta
    terms = np.stack([log_a - alpha * log_n, log_b - beta * log_d, np.full_like(log_n, log_e)])
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    residual = top + np.log(total) - log_l
    weights /= total  # d log L / d term
    value = _huber(residual, delta).sum()
    slope = np.clip(residual, -delta, delta)  # the Huber loss's derivative
    grad = np.array(
        [
            slope @ weights[0],
            slope @ weights[1],
            slope @ weights[2],
            -(slope * weights[0]) @ log_n,
            -(slope * weights[1]) @ log_d,
        ]
    )
    return value, grad


def _grid_scores(grid: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float) -> np.ndarray:
    """The Huber objective at every start of the grid at once (rows of grid: log A, log B, log E, alpha, beta)."""
    log_a, log_b, log_e, alpha, beta = (grid[:, i : i + 1] for i in range(5))
    predicted = np.logaddexp(np.logaddexp(log_a - alpha * log_n, log_b - beta * log_d), log_e)
    return _huber(predicted - log_l, delta).sum(axis=1)


def _fit_logs(
    log_n: np.ndarray,
    log_d: np.ndarray,
    log_l: np.ndarray,
    *,
    delta: float,
    starts: int,
    init: ParametricFit | None = None,
    tolerance: float = 1e-15,
) -> np.ndarray:
    """The (log A, log B, log E, alpha, beta) of least Huber objective: the grid's `starts` best points (and `init`),
    each refined by L-BFGS within FIT_BOUNDS to a relative change of `tolerance` in the objective."""
    from scipy.optimize import minimize

    points = list(GRID[np.argsort(_grid_scores(GRID, log_n, log_d, log_l, delta))[:starts]])
    if init is not None:
        points.insert(0, np.array([math.log(init.A), math.log(init.B), math.log(init.E), init.alpha, init.beta]))
    best = None
    for theta in points:
        result = minimize(
            _huber_objective,
            np.clip(theta, *np.array(FIT_BOUNDS).T),
            args=(log_n, log_d, log_l, delta),
            jac=True,
            method="L-BFGS-B",
            bounds=FIT_BOUNDS,
            options={"ftol": tolerance, "gtol": 1e-12, "maxiter": 5000},
        )
        if best is None or result.fun < best.fun:
            best = result
    return best.x


def _as_fit(theta: np.ndarray) -> ParametricFit:
    log_a, log_b, log_e, alpha, beta = theta
    return ParametricFit(math.exp(log_e), math.exp(log_a), math.exp(log_b), float(alpha), float(beta))


def parametric_fit(
    runs: pd.DataFrame, *, delta: float = 1e-3, starts: int = 8, init: ParametricFit | None = None
) -> ParametricFit:
    """Approach 3: the grid's `starts` best points (and `init`, a fit to start from), each refined by L-BFGS; the
    lowest objective wins."""
    runs = _check_runs(runs)
    log_n, log_d, log_l = (np.log(runs[c].to_numpy(float)) for c in ("params", "tokens", "loss"))
    return _as_fit(_fit_logs(log_n, log_d, log_l, delta=delta, starts=starts, init=init))


# --------------------------------------------------------------------------- running the sweep


def _edge(runs: pd.DataFrame) -> str | None:
    """Where a budget's least mean loss (over seeds) sits among its sizes: 'low', 'high' or None (bracketed)."""
    means = runs.groupby("d_model")["loss"].mean().sort_index()
    best = int(np.argmin(means.to_numpy()))
    return "low" if best == 0 else "high" if best == len(means) - 1 else None


def run_budgets(
    base: RunConfig,
    sweep: Sweep,
    ladder: list[ModelConfig],
    budgets: tuple[float, ...],
    rule: dict,
    data,
    out_dir,
    *,
    devices=None,
    progress: bool = True,
) -> tuple[pd.DataFrame, dict[str, str | None]]:
    """Train every budget's sizes (`initial_sizes`), then, up to `max_extensions` times, add the next size of the ladder
    on the side where a budget's least loss sits at the edge (when it exists and trains `min_steps` steps). Every run is
    a study's, so a cut sweep continues and a re-run retrains nothing. Returns the runs and each budget's edge (None:
    the least loss lies inside the sizes tried)."""
    sizes = {k: initial_sizes(base, sweep, ladder, c) for k, c in enumerate(budgets)}
    for _ in range(sweep.max_extensions + 1):
        studies = {f"c{k}": budget_study(base, sweep, ladder, k, c, sizes[k], rule) for k, c in enumerate(budgets)}
        runs = run_sweep(studies, data, out_dir, devices=devices, progress=progress)
        edges = {name: _edge(runs[runs["study"] == name]) for name in studies}
        grown = False
        for k, compute in enumerate(budgets):
            edge, low, high = edges[f"c{k}"], min(sizes[k]), max(sizes[k])
            if edge == "low" and low > 0:
                sizes[k].append(low - 1)
            elif (
                edge == "high" and high + 1 < len(ladder) and _steps(base, ladder[high + 1], compute) >= sweep.min_steps
            ):
                sizes[k].append(high + 1)
            else:
                continue
            grown = True
        if not grown:
            break
    return runs, edges


# --------------------------------------------------------------------------- intervals


PARAMETERS = ("A", "B", "E", "alpha", "beta")  # FIT_BOUNDS' order: log A, log B, log E, alpha, beta


def _theta(fit: ParametricFit) -> np.ndarray:
    return np.array([math.log(fit.A), math.log(fit.B), math.log(fit.E), fit.alpha, fit.beta])


def noise_floor(runs: pd.DataFrame) -> float:
    """The seed noise of a run's log loss: the pooled standard deviation over seeds of one size at one budget (NaN
    without replicated runs)."""
    log_loss = np.log(runs["loss"].to_numpy(float))
    groups = [runs["compute"].to_numpy(), runs["d_model"].to_numpy()]
    deviation = log_loss - pd.Series(log_loss).groupby(groups).transform("mean").to_numpy()
    dof = int((pd.Series(log_loss).groupby(groups).size() - 1).sum())
    return float(np.sqrt((deviation**2).sum() / dof)) if dof > 0 else math.nan


def brackets_beyond_noise(runs: pd.DataFrame, edges: dict[str, str | None], noise: float) -> int | None:
    """How many budgets whose least mean loss lies inside the sizes tried (`edges` None) have it below both end sizes
    by more than twice the standard error of a difference of two means, with `noise` the seed noise of a run's log
    loss (`noise_floor`); None when no replicated runs measured that noise."""
    if not math.isfinite(noise):
        return None
    beyond = 0
    for name, edge in edges.items():
        group = runs[runs["study"] == name]
        if edge is not None or group.empty:
            continue
        sizes = np.log(group["loss"].astype(float)).groupby(group["d_model"]).agg(["mean", "size"]).sort_index()
        best = sizes["mean"].idxmin()
        margins = [
            (sizes.at[end, "mean"] - sizes.at[best, "mean"])
            / (noise * math.sqrt(1 / sizes.at[end, "size"] + 1 / sizes.at[best, "size"]))
            for end in (sizes.index[0], sizes.index[-1])
        ]
        beyond += min(margins) > 2
    return beyond


def leave_one_budget_out(runs: pd.DataFrame, fit: ParametricFit) -> dict | None:
    """The law's error on data it was not fitted on: refitted without each budget in turn (from `fit`), its log-loss
    residuals (measured - predicted) on that budget's runs. Returns each budget's mean residual and the RMS over every
    held-out run (seed noise and the error of the law's form together); None with fewer than three budgets."""
    runs = _check_runs(runs)
    budgets = sorted(runs["compute"].unique())
    if len(budgets) < 3:
        return None
    residuals, per_budget = [], {}
    for budget in budgets:
        kept, held = runs[runs["compute"] != budget], runs[runs["compute"] == budget]
        refit = parametric_fit(kept, init=fit, starts=4)
        held_out = np.log(held["loss"].to_numpy(float)) - np.log(
            refit.loss(held["params"].to_numpy(float), held["tokens"].to_numpy(float))
        )
        residuals.extend(held_out)
        per_budget[f"{budget:.3g}"] = float(held_out.mean())
    return {"per_budget": per_budget, "rms": float(np.sqrt(np.mean(np.square(residuals))))}


def parametric_bootstrap(
    runs: pd.DataFrame, fit: ParametricFit, *, n_boot: int = 1000, seed: int = 0, starts: int = 3, delta: float = 1e-3
) -> tuple[pd.DataFrame, float]:
    """The law refitted to `n_boot` synthetic sweeps: at every run's N and D, the fitted log loss plus normal noise of
    sigma, the larger of the fit's residual standard deviation (n - 5 degrees of freedom) and the seed noise
    (`noise_floor`); each refit starts from the fit and the grid's `starts - 1` best points. Returns the refits (E, A,
    B, alpha, beta) and sigma."""
    runs = _check_runs(runs)
    log_n, log_d, log_l = (np.log(runs[c].to_numpy(float)) for c in ("params", "tokens", "loss"))
    predicted = np.log(fit.loss(np.exp(log_n), np.exp(log_d)))
    residual = math.sqrt(((log_l - predicted) ** 2).sum() / max(1, len(log_l) - 5))
    sigma = max(residual, np.nan_to_num(noise_floor(runs)))
    rng = np.random.default_rng(seed)
    # each refit to 1e-10 of its objective: its spread is the noise's, far above that
    draws = [
        _fit_logs(
            log_n,
            log_d,
            predicted + rng.normal(0, sigma, len(log_l)),
            delta=delta,
            starts=starts - 1,
            init=fit,
            tolerance=1e-10,
        )
        for _ in range(n_boot)
    ]
    return pd.DataFrame([dataclasses.asdict(_as_fit(theta)) for theta in draws]), sigma


def identification(fit: ParametricFit, draws: pd.DataFrame, *, tolerance: float = 1e-3) -> dict[str, str]:
    """Per parameter: 'identified', 'at a bound' (the fit ended on a bound of FIT_BOUNDS) or 'interval reaches a bound'
    (more than a tail's share of the refits did): a parameter at a bound is the optimizer's, not the data's."""
    low, high = np.array(FIT_BOUNDS).T
    near = tolerance * (high - low)
    thetas = np.column_stack(
        [np.log(draws["A"]), np.log(draws["B"]), np.log(draws["E"]), draws["alpha"], draws["beta"]]
    )
    at_bound = (thetas - low < near) | (high - thetas < near)
    theta = _theta(fit)
    out = {}
    for k, name in enumerate(PARAMETERS):
        if theta[k] - low[k] < near[k] or high[k] - theta[k] < near[k]:
            out[name] = "at a bound"
        elif at_bound[:, k].mean() > (1 - CONFIDENCE) / 2:
            out[name] = "interval reaches a bound"
        else:
            out[name] = "identified"
    return out


# --------------------------------------------------------------------------- a law that knows the data repeats

# Muennighoff et al. 2023 ("Scaling Data-Constrained Language Models"): D tokens over U unique ones are worth
# D' = U + U R* (1 - exp(-R / R*)) fresh ones, R = D / U - 1 the repetitions past the first epoch: each repetition is
# worth less, and past a few R* none is worth anything. R* is profiled over this grid (their fit: R* about 15).
REPETITION_GRID = np.geomspace(0.25, 400.0, 33)
# R* is a claim about what many epochs are worth: the runs must reach this many before it is read off them
# (issue 50's design: 1 to 16 or more epochs of the training split)
MIN_EPOCHS_SPANNED = 16.0


def effective_tokens(tokens, unique_tokens: float, r_star: float) -> np.ndarray:
    """D': what `tokens` over `unique_tokens` distinct ones are worth in fresh tokens (equal to `tokens` up to one
    epoch; bounded by unique_tokens x (1 + r_star) however long a run repeats)."""
    tokens = np.asarray(tokens, dtype=float)
    repeats = np.maximum(tokens / unique_tokens - 1.0, 0.0)
    return np.minimum(tokens, unique_tokens) + unique_tokens * r_star * (1.0 - np.exp(-repeats / r_star))


@dataclass(frozen=True)
class DataConstrainedFit:
    """L(N, D) = E + A / N^alpha + B / D'^beta, D' = effective_tokens(D, unique_tokens, r_star); `identified` when
    R* is inside its grid and the law without it (D' = D) fits worse by more than the noise allows (a likelihood-ratio
    test, 5%), else `status` says why not."""

    law: ParametricFit
    r_star: float
    unique_tokens: float
    status: str
    max_epochs: float
    profile: pd.DataFrame  # the residual sum of squares (log loss) at each R* of the grid, and the law without it

    @property
    def identified(self) -> bool:
        return self.status == "identified"

    @property
    def sentence(self) -> str:
        """The finding in one line: R* where identified, else why not (the status names the best-fitting R*)."""
        return f"R* = {self.r_star:.3g}, identified" if self.identified else self.status

    def loss(self, params, tokens) -> np.ndarray:
        return self.law.loss(params, effective_tokens(tokens, self.unique_tokens, self.r_star))

    def by_epochs(self, params: float, epochs) -> pd.DataFrame:
        """The loss this law predicts for a model of `params` trained for each of `epochs`, beside the law that
        takes every token as fresh (the same E, A, B, alpha, beta with D' = D)."""
        tokens = np.asarray(epochs, dtype=float) * self.unique_tokens
        predicted = {"loss": self.loss(params, tokens), "fresh": self.law.loss(params, tokens)}
        return pd.DataFrame({"epochs": epochs, "tokens": tokens, **predicted})

    def to_dict(self) -> dict:
        return {
            "r_star": self.r_star,
            "status": self.status,
            "unique_tokens": self.unique_tokens,
            "max_epochs": self.max_epochs,
            **{k: float(v) for k, v in dataclasses.asdict(self.law).items()},
        }


def _rss(runs: pd.DataFrame, fit: ParametricFit, tokens: np.ndarray) -> float:
    residual = np.log(runs["loss"].to_numpy(float)) - np.log(fit.loss(runs["params"].to_numpy(float), tokens))
    return float(np.square(residual).sum())


def data_constrained_fit(
    runs: pd.DataFrame, unique_tokens: float, *, noise: float | None = None, grid=REPETITION_GRID, starts: int = 4
) -> DataConstrainedFit:
    """The data-constrained law fitted to `runs` (params, tokens, loss) over a training split of `unique_tokens`: at
    each R* of `grid` the law is fitted to D' (the lab's Huber fit, each fit starting from the one at the next larger
    R*), and the R* of least residual wins. Identified when the runs reach MIN_EPOCHS_SPANNED epochs, that R* is
    inside the grid, and the law without repetition costs more than chi2(1, 95%) = 3.84 in residual sum of squares
    over sigma^2, sigma the larger of the residuals' (n - 6 degrees of freedom) and `noise` (the seed noise of one
    run's log loss)."""
    runs = _check_runs(runs)
    tokens, log_n, log_l = (
        runs["tokens"].to_numpy(float),
        np.log(runs["params"].to_numpy(float)),
        np.log(runs["loss"].to_numpy(float)),
    )
    fresh = parametric_fit(runs, starts=starts)
    fits, rss, previous = [None] * len(grid), np.empty(len(grid)), fresh
    for i in reversed(range(len(grid))):  # from the law without repetition costs, each fit starting from the last
        effective = effective_tokens(tokens, unique_tokens, grid[i])
        theta = _fit_logs(log_n, np.log(effective), log_l, delta=1e-3, starts=2, init=previous, tolerance=1e-10)
        fits[i] = previous = _as_fit(theta)
        rss[i] = _rss(runs, previous, effective)
    profile = pd.DataFrame({"r_star": [*map(float, grid), math.inf], "rss": [*rss, _rss(runs, fresh, tokens)]})
    best = int(np.argmin(rss))
    sigma2 = max(rss[best] / max(1, len(runs) - 6), (noise or 0.0) ** 2)
    max_epochs = float(tokens.max() / unique_tokens)
    if max_epochs < MIN_EPOCHS_SPANNED:
        status = (
            f"not identified: the runs reach {max_epochs:.1f} epochs, fewer than the {MIN_EPOCHS_SPANNED:.0f} a law of"
            f" repetition needs (R* = {grid[best]:.3g} fits them best)"
        )
    elif best in (0, len(grid) - 1):
        status = f"not identified: R* at the edge of its grid ({grid[best]:.3g})"
    elif (profile["rss"].iloc[-1] - rss[best]) / sigma2 < 3.84:
        status = f"not identified: the runs (at most {max_epochs:.1f} epochs) fit as well without a cost of repetition"
    else:
        status = "identified"
    return DataConstrainedFit(fits[best], float(grid[best]), float(unique_tokens), status, max_epochs, profile)


def intervals(samples: pd.DataFrame, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Percentile intervals of each bootstrapped quantity: one row each, with the number of draws."""
    tail = 100 * (1 - confidence) / 2
    return pd.DataFrame(
        {
            "low": samples.quantile(tail / 100),
            "median": samples.median(),
            "high": samples.quantile(1 - tail / 100),
            "resamples": samples.notna().sum(),
        }
    )


def inside(value: float, low: float, high: float) -> str:
    """'inside' or 'outside' the interval: the verdict of an extrapolation check."""
    return "inside" if low <= value <= high else "outside"


def past_runs_check(sizing: Sizing, records: list[tuple[str, dict]], bytes_per_token: float) -> pd.DataFrame:
    """The law against the lab's earlier final runs: each (name, hand-off) with its model's parameters, its tokens
    and its loss on the last 10% of the corpus (in bits per byte: nats / ln 2 / `bytes_per_token` of those windows),
    once per distinct (parameters, tokens, loss), against the law's prediction and 95% interval for one run at its N
    and D. `calls_out_of_reach`: the prediction lies above the measured loss by more than the interval's half-width,
    a result the lab has reached that the law says it cannot. The law is fitted on the validation windows, these are
    nanoGPT's last 10% (validation and test): the same text's distribution, not the same windows."""
    rows, seen = [], set()
    for name, h in records:
        params, tokens, loss = h.get("num_params"), h.get("tokens"), h.get("last10pct_val_loss")
        if not (params and tokens and loss) or (params, tokens, round(loss, 6)) in seen:
            continue
        seen.add((params, tokens, round(loss, 6)))
        band = sizing.predict(params, tokens)
        measured = loss / math.log(2) / bytes_per_token
        rows.append(
            {
                "run": name,
                "n_layer": (h.get("model") or {}).get("n_layer"),
                "d_model": (h.get("model") or {}).get("d_model"),
                "params": int(params),
                "tokens": int(tokens),
                "epochs": tokens / sizing.train_tokens,
                "measured_bpb": measured,
                "predicted_bpb": band["loss"],
                "low": band["low"],
                "high": band["high"],
                "verdict": inside(measured, band["low"], band["high"]),
                "calls_out_of_reach": bool(band["loss"] - measured > (band["high"] - band["low"]) / 2),
            }
        )
    return pd.DataFrame(rows)


def past_runs_summary(table: pd.DataFrame) -> dict:
    """How many earlier final runs the law predicts inside its interval, and how many it calls out of reach."""
    if table.empty:
        return {"runs": 0}
    worst = table.loc[(table["predicted_bpb"] - table["measured_bpb"]).idxmax()]
    return {
        "runs": len(table),
        "inside": int((table["verdict"] == "inside").sum()),
        "calls_out_of_reach": int(table["calls_out_of_reach"].sum()),
        "worst": {k: _number(worst[k]) for k in ("params", "tokens", "measured_bpb", "predicted_bpb", "low", "high")}
        | {"run": worst["run"]},
    }


# --------------------------------------------------------------------------- the recommendation


def candidates(base: ModelConfig, sweep: Sweep, max_width: int) -> pd.DataFrame:
    """The shapes a recommendation chooses from: the sweep's ladder continued up to `max_width`, with parameters and
    FLOPs per token."""
    rows = []
    for model in sweep_ladder(base, sweep, max_width):
        shape = model_shape(model)
        rows.append(
            {
                "n_layer": model.n_layer,
                "d_model": model.d_model,
                "n_head": model.n_head,
                "n_kv_head": model.n_kv_head,
                "params": shape.num_params(),
                "flops_per_token": shape.flops_per_token(),
            }
        )
    return pd.DataFrame(rows)


def _shape(shapes: pd.DataFrame, i: int) -> dict:
    row = shapes.iloc[i]
    return {
        **{
            k: None if pd.isna(row[k]) else int(row[k])
            for k in ("n_layer", "d_model", "n_head", "n_kv_head")
            if k in shapes
        },
        "params": float(row["params"]),
    }


def recommend(fit: ParametricFit, shapes: pd.DataFrame, *, compute: float, max_tokens: float | None = None) -> dict:
    """For a budget in FLOPs: the shape (rows with `params` and `flops_per_token`, and the shape fields `candidates`
    gives) of least predicted loss, its tokens (compute / FLOPs per token) and that loss. Shapes that would train past
    `max_tokens` are left out: the law has no term for repeated data, so past a few epochs it promises what
    repetition does not give (`size_model` sets REPEATED_DATA_EPOCHS of the training split)."""
    tokens = compute / shapes["flops_per_token"].to_numpy(float)
    losses = fit.loss(shapes["params"].to_numpy(float), tokens)
    allowed = tokens <= max_tokens if max_tokens is not None else np.ones(len(tokens), bool)
    if not allowed.any():
        raise ConfigError(f"every shape would train past {max_tokens:,.0f} tokens at this budget; raise max_width")
    best = int(np.argmin(np.where(allowed, losses, np.inf)))
    return {
        **_shape(shapes, best),
        "tokens": float(tokens[best]),
        "compute": float(compute),
        "loss": float(losses[best]),
        "left_out_for_repetition": int((~allowed).sum()),
    }


def isoflop_pick(iso: IsoFlopFit, shapes: pd.DataFrame, *, compute: float, max_tokens: float | None = None) -> dict:
    """Approach 2's pick: the shape whose parameters are nearest (in log) N_opt(compute), among those within
    `max_tokens`."""
    tokens = compute / shapes["flops_per_token"].to_numpy(float)
    distance = np.abs(np.log(shapes["params"].to_numpy(float) / float(iso.n_opt(compute))))
    allowed = tokens <= max_tokens if max_tokens is not None else np.ones(len(tokens), bool)
    if not allowed.any():
        raise ConfigError(f"every shape would train past {max_tokens:,.0f} tokens at this budget; raise max_width")
    best = int(np.argmin(np.where(allowed, distance, np.inf)))
    return {
        **_shape(shapes, best),
        "tokens": float(tokens[best]),
        "compute": float(compute),
        "n_opt": float(iso.n_opt(compute)),
        "left_out_for_repetition": int((~allowed).sum()),
    }


def time_shape(base: RunConfig, out_dir, data, *, steps: int = 8) -> float:
    """base's FLOPs per second in its own loop, alone in this process as the final run will be: a few steps into
    out_dir (kept, so a re-run reads them back, and converts the same seconds into the same FLOPs), the first log
    window (warm-up, compilation) left out as in every run's tokens_per_s."""
    overrides = {
        "train.max_steps": steps,
        "train.max_tokens": None,
        "train.time_budget_s": None,
        "train.warmup_steps": 0,
        "train.eval_interval": steps,
        "train.eval_batches": 1,
        "train.eval_tokens": None,
        "train.eval_full": False,
        "train.log_interval": max(1, steps // 4),
        "train.checkpoints": False,
        "train.early_stopping_patience": None,
    }
    config = base.override(overrides)
    summary = finished_summary(out_dir, config) or train(config, data, out_dir, progress=False).summary
    return float(summary["tokens_per_s"] * summary["flops_per_token"])


# --------------------------------------------------------------------------- sizing a model from the lab's own fit


@dataclass
class Sizing:
    """A sweep, its fits and what they recommend for the final run's `final_compute` FLOPs: the law's own pick
    (`law_pick`), its pick within the repetition cap (`capped_pick`) and what 05 trains (`recommendation`: the capped
    pick when every parameter is identified, approach 2's when it is not and approach 2 fitted, else None)."""

    runs: pd.DataFrame
    isoflop: IsoFlopFit | None
    fit: ParametricFit
    fits: pd.DataFrame  # the parametric bootstrap's refits: E, A, B, alpha, beta
    sigma: float  # the bootstrap's noise in log loss
    identified: dict
    lr_rule: dict
    shapes: pd.DataFrame
    final_compute: float
    max_tokens: float
    law_pick: dict
    capped_pick: dict
    recommendation: dict | None
    budgets: tuple = ()
    edges: dict = dataclasses.field(default_factory=dict)
    references: dict | None = None  # the count models on the sweep's windows (`references.reference_losses`)
    model_form: dict | None = None  # the law's error on budgets it was not fitted on (`leave_one_budget_out`)

    @property
    def run_noise(self) -> float:
        """The noise of one run's log loss the predicted intervals carry: the bootstrap's, or where larger the law's
        error on a budget left out of its fit (which holds that noise and the error of the law's form)."""
        held_out = (self.model_form or {}).get("rms")
        return max(self.sigma, held_out) if held_out is not None else self.sigma

    @property
    def train_tokens(self) -> float:
        """The training split's tokens (`max_tokens` is REPEATED_DATA_EPOCHS of them)."""
        return self.max_tokens / REPEATED_DATA_EPOCHS

    @property
    def law(self) -> pd.DataFrame:
        """The runs the law is fitted on (`law_runs`)."""
        return law_runs(self.runs)

    @property
    def largest_budget(self) -> float:
        """The most FLOPs any run of the fit trained."""
        return float(self.law["train_flops"].max())

    @property
    def not_identified(self) -> list[str]:
        return [k for k, v in self.identified.items() if v != "identified"]

    def _draws(self, params, tokens) -> np.ndarray:
        """The bootstrap laws' losses at (N, D) (draws along the first axis), each times the noise of one run."""
        params, tokens = np.asarray(params, dtype=float), np.asarray(tokens, dtype=float)
        shape = (-1,) + (1,) * np.broadcast(params, tokens).ndim
        laws = ParametricFit(
            **{k: self.fits[k].to_numpy(float).reshape(shape) for k in ("E", "A", "B", "alpha", "beta")}
        )
        shape = (len(self.fits), *np.broadcast(params, tokens).shape)
        noise = np.random.default_rng(0).normal(0, self.run_noise, shape)
        return laws.loss(params, tokens) * np.exp(noise)

    def predict(self, params: float, tokens: float) -> dict:
        """Approach 3's loss at (N, D) and its 95% predicted interval for one run (the refits' spread and a run's
        noise, `run_noise`: at least the law's error on a budget it did not see)."""
        tail = 100 * (1 - CONFIDENCE) / 2
        low, high = np.percentile(self._draws(params, tokens), [tail, 100 - tail])
        return {"loss": float(self.fit.loss(params, tokens)), "low": float(low), "high": float(high)}

    def frontier(self, computes, *, capped: bool = True) -> pd.DataFrame:
        """At each budget in FLOPs: the least predicted loss over the candidate shapes (each on compute / its FLOPs per
        token; with `capped`, only the shapes within the repetition cap, as the pick is made), the width that gives
        it, and the 95% band of that least loss."""
        computes = np.asarray(computes, dtype=float)[:, None]
        n, fpt = (self.shapes[c].to_numpy(float)[None, :] for c in ("params", "flops_per_token"))
        tokens = computes / fpt
        out = np.where(tokens > self.max_tokens, np.inf, 0.0) if capped else np.zeros_like(tokens)
        best = self.fit.loss(n, tokens) + out
        draws = (self._draws(n, tokens) + out).min(axis=2)  # draws x budgets x shapes: least over the shapes allowed
        tail = 100 * (1 - CONFIDENCE) / 2
        return pd.DataFrame(
            {
                "compute": computes[:, 0],
                "loss": best.min(axis=1),
                "d_model": self.shapes["d_model"].to_numpy()[best.argmin(axis=1)],
                "low": np.percentile(draws, tail, axis=0),
                "high": np.percentile(draws, 100 - tail, axis=0),
            }
        )

    def compute_to_reach(self, loss: float, *, up_to: float = 1e4) -> float | None:
        """The least compute at which the capped frontier predicts `loss` or less, searched up to `up_to` times the
        final run's; None when it does not get there (the ladder or the cap runs out first)."""
        computes = np.geomspace(self.largest_budget / 10, self.final_compute * up_to, 200)
        reached = self.frontier(computes)["loss"].to_numpy() <= loss
        return float(computes[reached.argmax()]) if reached.any() else None

    def neighbours(self, pick: dict) -> dict:
        """The predicted loss of the ladder's shapes next to `pick` at the same compute, within the cap, against the
        width of the pick's predicted interval: whether the interval can tell them apart."""
        at = int(np.flatnonzero(self.shapes["d_model"].to_numpy() == pick["d_model"])[0])
        around = {}
        for i in (at - 1, at + 1):
            if 0 <= i < len(self.shapes):
                row = self.shapes.iloc[i]
                tokens = pick["compute"] / row["flops_per_token"]
                if tokens <= self.max_tokens:
                    around[int(row["d_model"])] = float(self.fit.loss(row["params"], tokens))
        band = self.predict(pick["params"], pick["tokens"])
        gap = min(around.values()) - band["loss"] if around else math.nan
        return {
            "neighbours": around,
            "interval_width": band["high"] - band["low"],
            "gap_to_nearest": gap,
            "tells_neighbours": bool(gap > (band["high"] - band["low"]) / 2),
        }

    def check(self, params: float, tokens: float, compute: float, measured: float) -> dict:
        """The extrapolation check: a run's measured loss against the predicted interval, how far past the largest
        fitted budget it lies, and the residual (measured - predicted). Made whether or not every parameter is
        identified: the bootstrap's predictions carry that uncertainty (a parameter traded against another still
        predicts), and the test of a law is what it predicts."""
        predicted = self.predict(params, tokens)
        verdict = inside(measured, predicted["low"], predicted["high"])
        return {
            "measured": measured,
            "predicted": predicted["loss"],
            "low": predicted["low"],
            "high": predicted["high"],
            "residual": measured - predicted["loss"],
            "verdict": verdict,
            "compute": compute,
            "tokens": tokens,
            "times_largest_budget": compute / self.largest_budget,
        }

    def left_out(self) -> list[dict]:
        """The budget studies' runs not in the fit, each with the reason."""
        runs = self.runs[(self.runs["study"] != LR_FIT) & ~self.runs["usable"].astype(bool)]
        return [
            {
                "study": r.study,
                "variant": r.variant,
                "seed": int(r.seed),
                "steps": int(r.steps),
                "loss": float(r.loss),
                "reason": r.left_out,
            }
            for r in runs.itertuples()
        ]

    def to_dict(self) -> dict:
        iso = (
            None
            if self.isoflop is None
            else {
                "a": self.isoflop.a,
                "b": self.isoflop.b,
                "n_coef": self.isoflop.n_coef,
                "d_coef": self.isoflop.d_coef,
                "budgets_bracketed": int(self.isoflop.curves["bracketed"].sum()),
            }
        )
        law = self.law
        per_budget = law.groupby("compute")
        return {
            "parametric": dataclasses.asdict(self.fit),
            "parametric_ci95": intervals(self.fits)[["low", "high"]].T.to_dict(),
            "identification": self.identified,
            "not_identified": self.not_identified,
            "isoflop": iso,
            "budgets": [float(b) for b in self.budgets],
            "decades": math.log10(max(self.budgets) / min(self.budgets)),
            "sizes_per_budget": {f"{c:.3g}": int(g["d_model"].nunique()) for c, g in per_budget},
            "seeds_per_budget": {f"{c:.3g}": int(g["seed"].nunique()) for c, g in per_budget},
            "budgets_bracketed": sum(e is None for e in self.edges.values()),
            "budgets_bracketed_beyond_noise": brackets_beyond_noise(self.runs, self.edges, noise_floor(law)),
            "edges": self.edges,
            "fewest_steps": int(law["steps"].min()),
            "left_out": self.left_out(),
            "noise_floor": _number(noise_floor(law)),
            "sigma": self.sigma,
            "model_form": self.model_form,
            "run_noise": self.run_noise,
            "n_boot": len(self.fits),
            "lr_rule": {k: v for k, v in self.lr_rule.items() if k != "curves"},
            "lr_rule_holds": self.lr_rule["holds"],
            "final_compute": self.final_compute,
            "extrapolation": self.final_compute / self.largest_budget,
            "law_pick": self.law_pick,
            "capped_pick": self.capped_pick,
            "recommendation": self.recommendation,
            "runs": len(self.runs),
            "runs_fitted": len(law),
            "runs_lr_fit": int((self.runs["study"] == LR_FIT).sum()),
            "largest_budget": self.largest_budget,
            "largest_fitted_params": float(law["params"].max()),
            "repeated_epochs": REPEATED_DATA_EPOCHS,
            "max_tokens": self.max_tokens,
            "repeated_runs": int(law["repeated"].sum()),
            **self._to_beat_5gram(),
        }

    def _to_beat_5gram(self) -> dict:
        """What it would take, by the capped frontier, for one run to score the 5-gram's bits per byte on the sweep's
        windows (None: not within 10,000x the final run's compute on this ladder)."""
        if not self.references or "5-gram_bpb" not in self.references:
            return {}
        target = self.references["5-gram_bpb"]
        compute = self.compute_to_reach(target)
        return {
            "five_gram_bpb": target,
            "unigram_bpb": self.references.get("unigram_bpb"),
            "compute_to_beat_5gram": compute,
            "times_final_compute_to_beat_5gram": None if compute is None else compute / self.final_compute,
        }


def _number(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def _mark_usable(runs: pd.DataFrame, min_steps: int, unigram: float | None) -> pd.DataFrame:
    """`usable` and, where not, `left_out` (why): fewer than `min_steps` steps, or a loss at or above the unigram's."""
    few = runs["steps"] < min_steps
    flat = runs["loss"] >= unigram if unigram is not None else pd.Series(False, index=runs.index)
    reason = np.where(few, f"fewer than {min_steps} steps", np.where(flat, "at or above the unigram", ""))
    return runs.assign(usable=~(few | flat), left_out=reason)


def _pick(sizing: Sizing, base: RunConfig, rule: dict) -> dict | None:
    """What 05 trains (`Sizing.recommendation`), in whole steps of the sweep's batch at the rule's LR, with the law's
    predicted interval and its neighbours; None when neither approach can recommend."""
    if not sizing.not_identified:
        pick = {**sizing.capped_pick, "source": "law"}
    elif sizing.isoflop is not None:
        pick = {
            **isoflop_pick(sizing.isoflop, sizing.shapes, compute=sizing.final_compute, max_tokens=sizing.max_tokens),
            "source": "isoflop",
        }
    else:
        return None
    per_step = _per_step(base)
    pick["tokens"] = float(max(1, round(pick["tokens"] / per_step)) * per_step)
    predicted = sizing.predict(pick["params"], pick["tokens"])
    pick.update(
        loss=predicted["loss"],
        loss_low=predicted["low"],
        loss_high=predicted["high"],
        **sizing.neighbours(pick),
        lr=rule_lr(rule, pick["d_model"]),
        batch_size=base.train.batch_size,
        eval_tokens=base.train.eval_tokens,
    )
    return pick


def size_model(
    base: RunConfig,
    sweep: Sweep,
    data,
    out_dir,
    *,
    compute: float,
    unigram: float | None = None,
    n_boot: int = 1000,
    devices=None,
    progress: bool = True,
) -> Sizing:
    """Run (or continue) the sweep around `base` for a final run of `compute` FLOPs: the LR fit, then the budgets with
    their extensions; fit both approaches on the usable runs (`unigram`: the unigram's bits per byte on the sweep's
    windows), bootstrap approach 3 and recommend a shape of the ladder continued to twice max_width."""
    data = as_prepared(data)
    train_tokens = len(data.tokens("train"))
    base = sweep_base(base, sweep)
    ladder = sweep_ladder(base, sweep)
    budgets = plan_budgets(base, sweep, ladder, compute)
    fit_runs = run_sweep(
        {LR_FIT: lr_fit_study(base, sweep, ladder, budgets)}, data, out_dir, devices=devices, progress=progress
    )
    rule = fit_lr_rule(fit_runs, prior_rule(base))
    runs, edges = run_budgets(base, sweep, ladder, budgets, rule, data, out_dir, devices=devices, progress=progress)
    runs = _mark_usable(
        mark_repetition(pd.concat([fit_runs, runs], ignore_index=True), train_tokens),
        sweep.min_steps,
        unigram if sweep.drop_above_unigram else None,
    )
    law = law_runs(runs)
    try:
        iso = isoflop_fit(law)
    except ConfigError:  # fewer than two budgets bracketed: approach 3 still fits, and the report says so
        iso = None
    fit = parametric_fit(law)
    fits, sigma = parametric_bootstrap(law, fit, n_boot=n_boot)
    shapes = candidates(base.model, sweep, 2 * sweep.max_width)
    max_tokens = REPEATED_DATA_EPOCHS * train_tokens
    sizing = Sizing(
        runs,
        iso,
        fit,
        fits,
        sigma,
        identification(fit, fits),
        rule,
        shapes,
        float(compute),
        max_tokens,
        recommend(fit, shapes, compute=compute),
        recommend(fit, shapes, compute=compute, max_tokens=max_tokens),
        None,
        budgets,
        edges,
    )
    sizing.model_form = leave_one_budget_out(law, fit)
    sizing.recommendation = _pick(sizing, base, rule)
    return sizing
