"""Scaling-law fits of the lab's own runs: for a compute budget, how big a model, on how many tokens, reaching what loss.

Runs come as a tidy frame, one row per run: `compute` (training FLOPs, from the model's own FLOP count),
`params` (N), `tokens` (D) and `loss` (bits per byte, so that tokenizers compare).

- Approach 2, IsoFLOP (`isoflop_fit`): at each budget a parabola of loss in log N, its minimum N_opt(C),
  then the power laws N_opt = k_N C^a and D_opt = k_D C^b.
- Approach 3, parametric (`parametric_fit`): L(N, D) = E + A / N^alpha + B / D^beta, a Huber loss on log L
  minimised by L-BFGS from the best points of a grid of starts (Hoffmann et al. 2022; the replication of
  Besiroglu et al. 2024 found that a single start lands in poor local minima).
- The sweep, on the study machinery (`size_ladder`, `sweep_studies`, `run_sweep`): models along one depth/width
  rule, one Study per budget C (budget 'compute': each size trains the whole steps nearest to C / its FLOPs per
  token, attention included), every size at the LR of one rule (`lr_for_width`, LR proportional to width^-k), k fitted
  from a short LR sweep at the smallest budget (`lr_fit_study`, `fit_lr_rule`) and checked on held-out seeds by an LR
  sweep at the smallest and the largest width (`lr_check`). `recommend` turns a budget in FLOPs or in seconds on this machine
  into a size, a token count and a loss, with intervals; in seconds, at each size's throughput timed in the final
  run's own loop (`recommend_timed`), not the sweep's, whose runs share the machine.
- Intervals (`bootstrap`): the fit repeated on runs drawn with replacement, within each budget, so that every
  budget keeps a parabola; percentile intervals of every fitted quantity and prediction.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .config import RunConfig
from .data import as_prepared
from .errors import ConfigError
from .model import ModelConfig, model_shape
from .stats import CONFIDENCE
from .studies import Study, compute_tokens, run_study
from .training import completed_summary, train
from .validation import ConfigBase, require

# Past about four epochs, repeated tokens are worth less than new ones (Muennighoff et al. 2023): such runs
# are marked, since a law fitted on single-epoch data extrapolates there.
REPEATED_DATA_EPOCHS = 4.0
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


# --------------------------------------------------------------------------- the sweep


def size_ladder(base: ModelConfig, depths, *, aspect: int = 32, head_dim: int = 16) -> list[ModelConfig]:
    """One model per depth along the rule width = aspect x depth, in heads of head_dim (the rest as in `base`, a
    GQA base keeping its heads per key/value head), so that size varies along one line and not a cloud."""
    group = base.n_head // base.n_kv_head if base.n_kv_head else None
    models = []
    for depth in depths:
        width = aspect * depth
        if width % head_dim:
            raise ConfigError(f"width {width} (aspect {aspect} x depth {depth}) is not a whole number of {head_dim}-wide heads")
        heads = width // head_dim
        models.append(base.replace(n_layer=depth, d_model=width, n_head=heads, head_dim=None,
                                   n_kv_head=_kv_heads(heads, group) if group else None))
    return models


def _kv_heads(heads: int, group: int) -> int:
    """The most key/value heads that divide `heads` with at least `group` query heads each (GQA's sharing kept)."""
    return max(k for k in range(1, max(1, heads // group) + 1) if heads % k == 0)


# --------------------------------------------------------------------------- the sweep as studies


def lr_for_width(lr: float, base_width: int, width: int, exponent: float = 1.0) -> float:
    """The per-size LR rule, LR proportional to width^-exponent, anchored at `lr`, tuned at `base_width`. Exponent 1 is
    the prior: Adam moves every weight by about the LR per step, so a matrix's output moves about width times as far,
    and 1 / width keeps that fixed (µP's rule for Adam's hidden matrices, Yang et al. 2022, applied to every weight).
    `fit_lr_rule` fits the exponent, `lr_check` tests it."""
    return lr * (base_width / width) ** exponent


@dataclass
class Sweep(ConfigBase):
    """A compute-budget sweep: `depths` along width = aspect x depth at each of `budgets` (FLOPs per run), sizes
    that train fewer than `min_steps` steps at a budget left out there; the LR fit, `lr_fit_multipliers` of the prior
    rule's LR (1 / width) at the smallest and largest size of the smallest budget; and the LR check, `lr_multipliers`
    of the fitted rule's LR at the ladder's smallest and largest width, at the middle budget, on held-out seeds."""

    budgets: tuple
    depths: tuple
    aspect: int = 32
    head_dim: int = 16
    lr_multipliers: tuple = (0.5, 1.0, 2.0)
    lr_fit_multipliers: tuple = (0.25, 0.5, 1.0, 2.0, 4.0)
    n_seeds: int = 1
    min_steps: int = 8

    def validate(self) -> None:
        require(len(self.budgets) >= 2 and all(b > 0 for b in self.budgets), "budgets", "give two or more budgets in FLOPs (> 0)")
        require(len(self.depths) >= 3 and all(isinstance(d, int) and d >= 1 for d in self.depths), "depths",
                "give three or more whole depths >= 1: a parabola in log N needs three sizes")
        for name in ("lr_multipliers", "lr_fit_multipliers"):
            grid = getattr(self, name)
            require(len(grid) >= 3 and 1.0 in grid and all(x > 0 for x in grid) and len(set(grid)) == len(grid), name,
                    "give three or more distinct positive multipliers of the rule's LR, 1.0 among them")
        require(self.n_seeds >= 1 and self.min_steps >= 1, "n_seeds", "n_seeds and min_steps must be >= 1")


def shape_overrides(n_layer: int, d_model: int, n_head: int, n_kv_head: int | None) -> dict:
    """The dotted overrides that give a run one shape of the ladder (head_dim follows from width and heads)."""
    return {"model.n_layer": n_layer, "model.d_model": d_model, "model.n_head": n_head, "model.n_kv_head": n_kv_head,
            "model.head_dim": None}


def _size_name(model: ModelConfig) -> str:
    return f"L{model.n_layer}_d{model.d_model}"


# The LR studies, left out of the law's fit: the fit's seeds are the budget studies' own, the check's held out from both.
LR_FIT, LR_CHECK = "lr_fit", "lr_check"
LR_STUDIES = (LR_FIT, LR_CHECK)
CHECK_FIRST_SEED = 1000


def law_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs the law is fitted on: the budget studies', not the LR fit's or the LR check's."""
    return runs[~runs["study"].isin(LR_STUDIES)].reset_index(drop=True)


def _per_step(base: RunConfig) -> int:
    return base.train.batch_size * base.train.grad_accum_steps * base.model.block_size


def _overrides(base: RunConfig, model: ModelConfig, exponent: float, multiplier: float = 1.0) -> dict:
    lr = multiplier * lr_for_width(base.train.lr, base.model.d_model, model.d_model, exponent)
    return {**shape_overrides(model.n_layer, model.d_model, model.n_head, model.n_kv_head), "train.lr": lr}


def _steps(base: RunConfig, overrides: dict, compute: float) -> int:
    return compute_tokens(base.override(overrides), compute) // _per_step(base)  # what the study will train


def _study(base: RunConfig, sweep: Sweep, name: str, variants: dict, compute: float, first_seed: int = 0) -> Study:
    steps_each = [_steps(base, o, compute) for o in variants.values()]
    # evaluated (and checkpointed) once, at the end: a sweep's runs are short, and a cut one is trained again
    train = {"train.eval_interval": max(1, *steps_each),
             "train.warmup_steps": min(base.train.warmup_steps, max(0, min(steps_each) // 5)),
             "train.early_stopping_patience": None}
    return Study(name=name, base=base.override(train), variants=variants, baseline=next(iter(variants)), n_seeds=sweep.n_seeds,
                 first_seed=first_seed, budget="compute", compute=float(compute), eval_split=base.train.eval_split or "val")


def budget_sizes(base: RunConfig, sweep: Sweep) -> dict[float, list[ModelConfig]]:
    """The budgets the sweep keeps, each with the sizes of the ladder that train `min_steps` steps there: a budget
    with fewer than three (with a larger tuned batch, a small budget trains few steps) is left out, since a parabola
    needs three; fewer than two budgets left is an error."""
    models = size_ladder(base.model, sweep.depths, aspect=sweep.aspect, head_dim=sweep.head_dim)
    kept, too_small = {}, []
    for compute in sorted(float(b) for b in sweep.budgets):
        fits = [m for m in models if _steps(base, _overrides(base, m, 1.0), compute) >= sweep.min_steps]
        if len(fits) >= 3:
            kept[compute] = fits
        else:
            too_small.append(f"budget {compute:.3g} FLOPs trains {len(fits)} of the sizes {sweep.min_steps}+ steps")
    if len(kept) < 2:
        raise ConfigError("; ".join(too_small) + f" ({_per_step(base):,} tokens a step); a fit needs two budgets of three sizes or "
                          "more: raise the budgets, add smaller depths or lower the batch")
    return kept


def lr_fit_study(base: RunConfig, sweep: Sweep) -> Study:
    """The short LR sweep the rule is fitted from: `lr_fit_multipliers` of the prior rule's LR (1 / width) at the
    smallest and the largest size of the smallest budget kept, at that budget."""
    compute, sizes = min(budget_sizes(base, sweep).items())
    variants = {f"{_size_name(m)}_lr{x:g}": _overrides(base, m, 1.0, x) for m in (sizes[0], sizes[-1]) for x in sweep.lr_fit_multipliers}
    return _study(base, sweep, LR_FIT, variants, compute)


def sweep_studies(base: RunConfig, sweep: Sweep, lr_exponent: float = 1.0) -> dict[str, Study]:
    """The sweep's studies, by folder name: 'c0', 'c1', ... (one per budget kept, its sizes as variants, each at the
    LR of the rule with `lr_exponent`) and 'lr_check' (`lr_multipliers` of that LR at the ladder's smallest and largest
    width, at the lower middle budget, on seeds from CHECK_FIRST_SEED). Every run is scored on the base's evaluation
    tokens; the budget studies' seeds start at 0."""
    models = size_ladder(base.model, sweep.depths, aspect=sweep.aspect, head_dim=sweep.head_dim)
    kept = budget_sizes(base, sweep)
    budgets = sorted(float(b) for b in sweep.budgets)
    studies = {f"c{budgets.index(c)}": _study(base, sweep, f"c{budgets.index(c)}",
                                              {_size_name(m): _overrides(base, m, lr_exponent) for m in sizes}, c)
               for c, sizes in kept.items()}
    middle = list(kept)[(len(kept) - 1) // 2]  # the lower middle: with two budgets, the smaller
    variants = {f"{_size_name(m)}_lr{x:g}": _overrides(base, m, lr_exponent, x)
                for m in (models[0], models[-1]) for x in sweep.lr_multipliers}
    studies[LR_CHECK] = _study(base, sweep, LR_CHECK, variants, middle, first_seed=CHECK_FIRST_SEED)
    return studies


def run_sweep(studies: dict[str, Study], data, out_dir, *, devices=None, progress: bool = True) -> pd.DataFrame:
    """Train every study's runs not finished yet into out_dir/<name>/ (resumable, as any study), then one row per
    run: study, variant, seed, depth, width, lr, FIT_COLUMNS (compute: the study's budget; loss: bits per byte), the
    FLOPs it trained, val_loss, FLOPs per token and throughput."""
    frames = []
    for name, study in studies.items():
        result = run_study(study, data, f"{out_dir}/{name}", devices=devices, progress=progress)
        runs = result.runs.assign(study=name)
        configs = {v: study.config(v) for v in study.variants}
        runs["n_layer"] = runs["variant"].map({v: c.model.n_layer for v, c in configs.items()})
        runs["d_model"] = runs["variant"].map({v: c.model.d_model for v, c in configs.items()})
        runs["lr"] = runs["variant"].map({v: c.train.lr for v, c in configs.items()})
        runs["compute"] = study.compute  # the budget, so that a budget's runs group (whole steps make train_flops differ by < 1%)
        frames.append(runs)
    runs = pd.concat(frames, ignore_index=True)
    columns = ["study", "variant", "seed", "n_layer", "d_model", "lr", *FIT_COLUMNS, "train_flops", "val_loss", "flops_per_token",
               "tokens_per_s"]
    return runs.assign(params=runs["num_params"], loss=runs["val_bpb"])[columns]


def _lr_curves(runs: pd.DataFrame, study: str, base_lr: float, base_width: int, exponent: float) -> pd.DataFrame:
    """One LR study's loss (mean over seeds) by width and multiple of the rule's LR."""
    runs = runs[runs["study"] == study].copy()
    runs["multiplier"] = (runs["lr"] / [lr_for_width(base_lr, base_width, w, exponent) for w in runs["d_model"]]).round(6)
    return runs.groupby(["d_model", "multiplier"], as_index=False)["loss"].mean()


def _best_multiplier(curve: pd.DataFrame) -> tuple[float, bool]:
    """The multiplier of least loss, between the grid's points: the vertex of the parabola in log LR through the
    best point and its two neighbours; at the grid's edge, that point and True (the best may lie beyond)."""
    curve = curve.sort_values("multiplier")
    x, y = np.log2(curve["multiplier"].to_numpy(float)), curve["loss"].to_numpy(float)
    i = int(np.argmin(y))
    if i in (0, len(y) - 1):
        return float(2 ** x[i]), True
    a, b, _ = np.polyfit(x[i - 1:i + 2], y[i - 1:i + 2], 2)
    return float(2 ** (-b / (2 * a) if a > 0 else x[i])), False


def fit_lr_rule(runs: pd.DataFrame, base_lr: float, base_width: int, *, prior: float = 1.0,
                bounds: tuple[float, float] = (0.0, 2.0)) -> dict:
    """The rule's exponent k (LR proportional to width^-k) from the 'lr_fit' study: at its two widths, the best
    multiple of the prior rule's LR (`_best_multiplier`); k = prior + log(best at the small / best at the large) /
    log(large / small), kept within `bounds`. When a best lies at the edge of the multiples tried, the ratio is not
    measured and the prior stands (fitted False)."""
    curves = _lr_curves(runs, LR_FIT, base_lr, base_width, prior)
    best = {int(w): _best_multiplier(g) for w, g in curves.groupby("d_model")}
    require(len(best) == 2, "runs", f"the LR fit needs runs at two widths, got widths {sorted(best)}")
    (small, (m_small, edge_small)), (large, (m_large, edge_large)) = sorted(best.items())
    censored = [w for w, (_, edge) in best.items() if edge]
    raw = prior + math.log(m_small / m_large) / math.log(large / small)
    exponent = prior if censored else min(max(raw, bounds[0]), bounds[1])
    return {"exponent": exponent, "prior": prior, "fitted": not censored, "raw_exponent": raw, "bounded": not censored and raw != exponent,
            "censored_widths": censored, "best_multiplier": {w: m for w, (m, _) in best.items()}, "curves": curves,
            "compute": float(runs.loc[runs["study"] == LR_FIT, "compute"].iloc[0])}


def lr_check(runs: pd.DataFrame, base_lr: float, base_width: int, exponent: float = 1.0) -> dict:
    """Whether the LR rule holds: at each width of the 'lr_check' study, the multiplier of the rule's LR with the
    least loss (on the grid). The rule holds when the two optima are within one step of the multipliers' grid of each
    other; an optimum at the grid's edge says the anchor LR is off (the best may lie beyond), not that the rule fails."""
    means = _lr_curves(runs, LR_CHECK, base_lr, base_width, exponent)
    grid = sorted(means["multiplier"].unique())
    best = {int(w): float(g.loc[g["loss"].idxmin(), "multiplier"]) for w, g in means.groupby("d_model")}
    steps = [grid.index(m) for m in best.values()]
    return {"curves": means, "best_multiplier": best, "holds": bool(max(steps) - min(steps) <= 1),
            "at_grid_edge": bool(min(steps) == 0 or max(steps) == len(grid) - 1)}


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
    return {"compute": compute, "n_opt": math.exp(x_opt), "d_opt": math.exp(d_intercept + d_slope * x_opt),
            "loss_opt": intercept - slope ** 2 / (4 * curvature) if curvature > 0 else math.nan,
            "bracketed": bool(curvature > 0 and x.min() <= x_opt <= x.max()), "curvature": float(curvature)}


def isoflop_fit(runs: pd.DataFrame) -> IsoFlopFit:
    """Approach 2 on the runs (several sizes at each of several budgets); the power laws use only the budgets
    whose minimum lies within the sizes tried, and need two of them."""
    runs = _check_runs(runs).sort_values("compute", kind="stable")
    compute, params, tokens, loss = (runs[c].to_numpy(float) for c in FIT_COLUMNS)
    budgets, starts = np.unique(compute, return_index=True)
    ends = [*starts[1:], len(compute)]
    curves = pd.DataFrame([isoflop_curve(c, params[i:j], tokens[i:j], loss[i:j]) for c, i, j in zip(budgets, starts, ends, strict=True)])
    inside = curves[curves["bracketed"]]
    if len(inside) < 2:
        raise ConfigError(f"{len(inside)} of {len(curves)} budgets have their loss minimum within the sizes tried; the power "
                          "laws need two. Add sizes on the side where the loss still falls.")
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
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta


# Hoffmann et al.'s grid of starts, in (log A, log B, log E, alpha, beta)
START_GRID = {"log_a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0), "log_b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
              "log_e": (-1.0, -0.5, 0.0, 0.5, 1.0), "alpha": (0.0, 0.5, 1.0, 1.5, 2.0), "beta": (0.0, 0.5, 1.0, 1.5, 2.0)}


# (log A, log B, log E, alpha, beta): wide enough for any law the grid starts from, and finite, so that a resample
# that cannot pin A or B (one size left at a budget) lands on a bound instead of overflowing
FIT_BOUNDS = [(-10.0, 60.0), (-10.0, 60.0), (-20.0, 5.0), (0.0, 5.0), (0.0, 5.0)]


def _huber(residual: np.ndarray, delta: float) -> np.ndarray:
    size = np.abs(residual)
    return np.where(size <= delta, 0.5 * residual ** 2, delta * (size - 0.5 * delta))


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
    grad = np.array([slope @ weights[0], slope @ weights[1], slope @ weights[2],
                     -(slope * weights[0]) @ log_n, -(slope * weights[1]) @ log_d])
    return value, grad


def _grid_scores(grid: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float) -> np.ndarray:
    """The Huber objective at every start of the grid at once (rows of grid: log A, log B, log E, alpha, beta)."""
    log_a, log_b, log_e, alpha, beta = (grid[:, i:i + 1] for i in range(5))
    predicted = np.logaddexp(np.logaddexp(log_a - alpha * log_n, log_b - beta * log_d), log_e)
    return _huber(predicted - log_l, delta).sum(axis=1)


def parametric_fit(runs: pd.DataFrame, *, delta: float = 1e-3, starts: int = 8, init: ParametricFit | None = None) -> ParametricFit:
    """Approach 3: the grid's `starts` best points (and `init`, a fit to start from, as a bootstrap does from the
    fit on all runs), each refined by L-BFGS; the lowest objective wins."""
    from scipy.optimize import minimize

    runs = _check_runs(runs)
    log_n, log_d, log_l = (np.log(runs[c].to_numpy(float)) for c in ("params", "tokens", "loss"))
    grid = np.array(list(itertools.product(*START_GRID.values())))
    points = list(grid[np.argsort(_grid_scores(grid, log_n, log_d, log_l, delta))[:starts]])
    if init is not None:
        points.insert(0, np.array([math.log(init.A), math.log(init.B), math.log(init.E), init.alpha, init.beta]))
    best = None
    for theta in points:
        result = minimize(_huber_objective, theta, args=(log_n, log_d, log_l, delta), jac=True, method="L-BFGS-B",
                          bounds=FIT_BOUNDS, options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 5000})
        if best is None or result.fun < best.fun:
            best = result
    log_a, log_b, log_e, alpha, beta = best.x
    return ParametricFit(math.exp(log_e), math.exp(log_a), math.exp(log_b), float(alpha), float(beta))


def candidates(runs: pd.DataFrame, base: ModelConfig, depths, *, aspect: int, head_dim: int) -> pd.DataFrame:
    """The shapes a recommendation chooses from (the ladder at `depths`), with parameters, FLOPs per token and the
    FLOP rate this machine reached: each measured size's median over the sweep, an unmeasured size the rate of the
    nearest measured one (larger models use a machine at least as well, so a larger size's time is not under-stated)."""
    measured = runs.assign(rate=runs["tokens_per_s"] * runs["flops_per_token"]).groupby("d_model")["rate"].median()
    rows = []
    for model in size_ladder(base, depths, aspect=aspect, head_dim=head_dim):
        shape = model_shape(model)
        nearest = measured.index[np.abs(measured.index.to_numpy() - model.d_model).argmin()]
        rows.append({"n_layer": model.n_layer, "d_model": model.d_model, "n_head": model.n_head, "n_kv_head": model.n_kv_head,
                     "params": shape.num_params(), "flops_per_token": shape.flops_per_token(), "flops_per_s": float(measured[nearest]),
                     "measured": bool(model.d_model in measured.index)})
    return pd.DataFrame(rows)


def recommend(fit: ParametricFit, shapes: pd.DataFrame, *, compute: float | None = None, seconds: float | None = None,
              max_tokens: float | None = None) -> dict:
    """For a budget in FLOPs or in seconds of training on this machine: the shape (rows with `params` and
    `flops_per_token`, and the shape fields `candidates` adds) of least predicted loss, its tokens (compute / FLOPs
    per token) and that loss. In seconds, each shape's compute is its FLOP rate x seconds.
    Shapes that would train past `max_tokens` are left out: the law has no term for repeated data, so past a few
    epochs it promises what repetition does not give (`size_model` sets REPEATED_DATA_EPOCHS of the training split)."""
    require((compute is None) != (seconds is None), "budget", "give compute (FLOPs) or seconds, one of them")
    budget = np.full(len(shapes), float(compute)) if compute is not None else seconds * shapes["flops_per_s"].to_numpy(float)
    tokens = budget / shapes["flops_per_token"].to_numpy(float)
    losses = fit.loss(shapes["params"].to_numpy(float), tokens)
    allowed = tokens <= max_tokens if max_tokens is not None else np.ones(len(tokens), bool)
    if not allowed.any():
        raise ConfigError(f"every shape would train past {max_tokens:,.0f} tokens at this budget; add larger depths to the ladder")
    best = int(np.argmin(np.where(allowed, losses, np.inf)))
    row = shapes.iloc[best]
    shape = {k: None if pd.isna(row[k]) else int(row[k]) for k in ("n_layer", "d_model", "n_head", "n_kv_head") if k in shapes}
    return {**shape, "params": float(row["params"]), "tokens": float(tokens[best]), "compute": float(budget[best]),
            "loss": float(losses[best]), "seconds": seconds, "left_out_for_repetition": int((~allowed).sum())}


def time_shape(base: RunConfig, shape: pd.Series, data, out_dir, *, steps: int = 8) -> float:
    """`shape`'s FLOPs per second in base's own loop (its batch, device, dtype, compile, threads), alone in this
    process as the final run will be: a few steps into out_dir/L<n>_d<w> (kept, so a re-run reads them back),
    the first log window (warm-up, compilation) left out as in every run's tokens_per_s."""
    n_kv_head = None if pd.isna(shape["n_kv_head"]) else int(shape["n_kv_head"])
    overrides = {**shape_overrides(int(shape["n_layer"]), int(shape["d_model"]), int(shape["n_head"]), n_kv_head),
                 "train.max_steps": steps, "train.max_tokens": None, "train.time_budget_s": None, "train.warmup_steps": 0,
                 "train.eval_interval": steps, "train.eval_batches": 1, "train.eval_tokens": None, "train.eval_full": False,
                 "train.log_interval": max(1, steps // 4), "train.checkpoints": False, "train.early_stopping_patience": None}
    config = base.override(overrides)
    run_dir = f"{out_dir}/L{int(shape['n_layer'])}_d{int(shape['d_model'])}"
    summary = completed_summary(run_dir, config) or train(config, data, run_dir, progress=False).summary
    return float(summary["tokens_per_s"] * summary["flops_per_token"])


def recommend_timed(fit: ParametricFit, shapes: pd.DataFrame, seconds: float, timer: Callable[[pd.Series], float], *,
                    max_tokens: float | None = None) -> tuple[dict, pd.DataFrame]:
    """`recommend` for a budget in seconds, on rates the final run will reach: the sweep's rates come from runs that
    shared the machine (several at a time, a thread or a slice of a GPU each), so they under-state a run alone.
    The pick and its neighbours on the ladder are timed by `timer` (a shape's FLOPs per second: `time_shape`), the
    other shapes take their sweep rate times the ratio timed / sweep of the nearest timed shape, and the pick is made
    again until it and its neighbours are all timed. Returns the pick, with the rate it was spent at
    (`flops_per_s`), the sweep's at its size and the number of shapes timed, and the shapes with
    `sweep_flops_per_s`, `timed` and the rates used."""
    shapes = shapes.reset_index(drop=True).assign(sweep_flops_per_s=shapes["flops_per_s"].to_numpy(float), timed=False)
    while True:
        pick = recommend(fit, shapes, seconds=seconds, max_tokens=max_tokens)
        at = int(shapes.index[(shapes["d_model"] == pick["d_model"]) & (shapes["n_layer"] == pick["n_layer"])][0])
        todo = [i for i in (at - 1, at, at + 1) if 0 <= i < len(shapes) and not shapes.at[i, "timed"]]
        if not todo:
            pick.update(flops_per_s=float(shapes.at[at, "flops_per_s"]), sweep_flops_per_s=float(shapes.at[at, "sweep_flops_per_s"]),
                        shapes_timed=int(shapes["timed"].sum()))
            return pick, shapes
        for i in todo:
            shapes.at[i, "flops_per_s"], shapes.at[i, "timed"] = timer(shapes.loc[i]), True
        timed = shapes.index[shapes["timed"]].to_numpy()
        ratio = (shapes.loc[timed, "flops_per_s"] / shapes.loc[timed, "sweep_flops_per_s"]).to_numpy(float)
        for i in shapes.index[~shapes["timed"]]:
            shapes.at[i, "flops_per_s"] = shapes.at[i, "sweep_flops_per_s"] * ratio[np.abs(timed - i).argmin()]


# --------------------------------------------------------------------------- intervals


def bootstrap(runs: pd.DataFrame, statistic: Callable[[pd.DataFrame], dict], *, n_boot: int = 200, seed: int = 0,
              strata: str | None = "compute") -> pd.DataFrame:
    """`statistic` (a dict of numbers) on `n_boot` resamples of the runs, drawn with replacement within each
    stratum; a resample on which the fit fails (ConfigError: say, no budget bracketed) is left out."""
    rng = np.random.default_rng(seed)
    groups = [g.index.to_numpy() for _, g in runs.groupby(strata)] if strata else [runs.index.to_numpy()]
    rows = []
    for _ in range(n_boot):
        picked = np.concatenate([rng.choice(index, size=len(index), replace=True) for index in groups])
        try:
            rows.append(statistic(runs.loc[picked].reset_index(drop=True)))
        except ConfigError:
            continue
    if not rows:
        raise ConfigError(f"the fit failed on every one of {n_boot} bootstrap resamples")
    return pd.DataFrame(rows)


def intervals(samples: pd.DataFrame, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Percentile intervals of each bootstrapped quantity: one row each, with the share of resamples that fitted."""
    tail = 100 * (1 - confidence) / 2
    return pd.DataFrame({"low": samples.quantile(tail / 100), "median": samples.median(), "high": samples.quantile(1 - tail / 100),
                         "resamples": samples.notna().sum()})


def inside(value: float, low: float, high: float) -> str:
    """'inside' or 'outside' the interval: the verdict of an extrapolation check."""
    return "inside" if low <= value <= high else "outside"


# --------------------------------------------------------------------------- sizing a model from the lab's own fit


@dataclass
class Sizing:
    """A sweep's fits and what they recommend: the runs, approach 2 (when two budgets are bracketed), approach 3
    with its bootstrap fits, the LR check, the candidate shapes, the recommendation for the budget and the fitted
    LR rule."""

    runs: pd.DataFrame
    isoflop: IsoFlopFit | None
    fit: ParametricFit
    fits: pd.DataFrame  # bootstrap resamples of approach 3: E, A, B, alpha, beta
    lr: dict
    shapes: pd.DataFrame
    recommendation: dict
    budgets: tuple = ()  # the sweep's budgets, those left out for too few sizes among them
    lr_rule: dict = dataclasses.field(default_factory=lambda: {"exponent": 1.0, "fitted": False})  # `fit_lr_rule`'s

    @property
    def law(self) -> pd.DataFrame:
        """The runs the law is fitted on (`law_runs`)."""
        return law_runs(self.runs)

    @property
    def largest_budget(self) -> float:
        """The most FLOPs any run of the fit trained."""
        return float(self.law["train_flops"].max())

    def _bootstrap_law(self, dims: int) -> ParametricFit:
        """The bootstrap fits as one law of arrays: draws along a first axis that broadcasts over `dims` more."""
        shape = (-1,) + (1,) * dims
        return ParametricFit(**{k: self.fits[k].to_numpy(float).reshape(shape) for k in ("E", "A", "B", "alpha", "beta")})

    def predict(self, params: float, tokens: float) -> dict:
        """Approach 3's loss at (N, D) with its bootstrap interval."""
        band = intervals(pd.DataFrame({"loss": self._bootstrap_law(0).loss(params, tokens)})).loc["loss"]
        return {"loss": float(self.fit.loss(params, tokens)), "low": float(band["low"]), "high": float(band["high"])}

    def frontier(self, computes) -> pd.DataFrame:
        """At each budget in FLOPs: the least predicted loss over the candidate shapes (each on compute / its FLOPs
        per token), the shape that gives it, and the band of that least loss over the bootstrap fits."""
        computes = np.asarray(computes, dtype=float)[:, None]
        n, fpt = (self.shapes[c].to_numpy(float)[None, :] for c in ("params", "flops_per_token"))
        best = self.fit.loss(n, computes / fpt)
        draws = self._bootstrap_law(2).loss(n, computes / fpt).min(axis=2)  # draws x budgets x shapes, least over shapes
        tail = 100 * (1 - CONFIDENCE) / 2
        return pd.DataFrame({"compute": computes[:, 0], "loss": best.min(axis=1),
                             "d_model": self.shapes["d_model"].to_numpy()[best.argmin(axis=1)],
                             "low": np.percentile(draws, tail, axis=0), "high": np.percentile(draws, 100 - tail, axis=0)})

    def check(self, params: float, tokens: float, compute: float, measured: float) -> dict:
        """The extrapolation check: a run's measured loss against the predicted interval, and how far past the
        largest fitted budget it lies."""
        predicted = self.predict(params, tokens)
        largest = self.largest_budget
        return {"measured": measured, "predicted": predicted["loss"], "low": predicted["low"], "high": predicted["high"],
                "verdict": inside(measured, predicted["low"], predicted["high"]), "compute": compute, "tokens": tokens,
                "times_largest_budget": compute / largest}

    def to_dict(self) -> dict:
        iso = None if self.isoflop is None else {"a": self.isoflop.a, "b": self.isoflop.b, "n_coef": self.isoflop.n_coef,
                                                  "d_coef": self.isoflop.d_coef}
        bands = intervals(self.fits)
        fitted = set(self.runs["compute"])
        return {"parametric": dataclasses.asdict(self.fit), "parametric_ci95": bands[["low", "high"]].T.to_dict(), "isoflop": iso,
                "budgets": sorted(fitted), "budgets_left_out": sorted(set(map(float, self.budgets)) - fitted),
                "lr_rule_holds": self.lr["holds"], "lr_best_multiplier": self.lr["best_multiplier"],
                "lr_best_at_grid_edge": self.lr["at_grid_edge"], "recommendation": self.recommendation,
                "lr_rule": {k: v for k, v in self.lr_rule.items() if k != "curves"},
                "runs": len(self.runs), "runs_fitted": len(law_runs(self.runs)), "largest_budget": self.largest_budget,
                "repeated_epochs": REPEATED_DATA_EPOCHS, "repeated_runs": int(self.runs["repeated"].sum())}


def size_model(base: RunConfig, sweep: Sweep, data, out_dir, *, seconds: float | None = None, compute: float | None = None,
               max_depth: int | None = None, n_boot: int = 200, devices=None, progress: bool = True, time_steps: int | None = 8) -> Sizing:
    """Run (or continue) the sweep around `base`, fit both approaches with bootstrap intervals and recommend a shape
    of the ladder up to `max_depth` (default: twice the sweep's deepest) for the budget in seconds or FLOPs, among
    the shapes that stay within REPEATED_DATA_EPOCHS of the training split; its LR follows the rule. A budget in
    seconds is spent at rates timed in base's own loop, `time_steps` steps a shape into out_dir/timed
    (`recommend_timed`; None: the sweep's rates)."""
    data = as_prepared(data)
    train_tokens = len(data.tokens("train"))
    fit_runs = run_sweep({LR_FIT: lr_fit_study(base, sweep)}, data, out_dir, devices=devices, progress=progress)
    rule = fit_lr_rule(fit_runs, base.train.lr, base.model.d_model)
    studies = sweep_studies(base, sweep, lr_exponent=rule["exponent"])
    runs = run_sweep(studies, data, out_dir, devices=devices, progress=progress)
    runs = mark_repetition(pd.concat([fit_runs, runs], ignore_index=True), train_tokens)
    law = law_runs(runs)
    try:
        iso = isoflop_fit(law)
    except ConfigError:  # fewer than two budgets bracketed: approach 3 still fits, and the report says so
        iso = None
    fit = parametric_fit(law)
    fits = bootstrap(law, lambda r: dataclasses.asdict(parametric_fit(r, starts=1, init=fit)), n_boot=n_boot)
    shapes = candidates(runs, base.model, range(1, (max_depth or 2 * max(sweep.depths)) + 1), aspect=sweep.aspect,
                        head_dim=sweep.head_dim)
    max_tokens = REPEATED_DATA_EPOCHS * train_tokens
    if seconds is not None and time_steps:
        pick, shapes = recommend_timed(fit, shapes, seconds, lambda shape: time_shape(base, shape, data, f"{out_dir}/timed",
                                                                                  steps=time_steps), max_tokens=max_tokens)
    else:
        pick = recommend(fit, shapes, compute=compute, seconds=seconds, max_tokens=max_tokens)
    sizing = Sizing(runs, iso, fit, fits, lr_check(runs, base.train.lr, base.model.d_model, rule["exponent"]), shapes, pick,
                    tuple(sweep.budgets), rule)
    pick.update({f"loss_{k}": v for k, v in sizing.predict(pick["params"], pick["tokens"]).items() if k != "loss"})
    pick["lr"] = lr_for_width(base.train.lr, base.model.d_model, pick["d_model"], rule["exponent"])
    return sizing
