"""Scaling-law fits of the lab's own runs: for a compute budget, how big a model, on how many tokens, reaching what loss.

Runs come as a tidy frame, one row per run: `compute` (training FLOPs, from the model's own FLOP count),
`params` (N), `tokens` (D) and `loss` (bits per byte, so that tokenizers compare).

- Approach 2, IsoFLOP (`isoflop_fit`): at each budget a parabola of loss in log N, its minimum N_opt(C),
  then the power laws N_opt = k_N C^a and D_opt = k_D C^b.
- Approach 3, parametric (`parametric_fit`): L(N, D) = E + A / N^alpha + B / D^beta, a Huber loss on log L
  minimised by L-BFGS from the best points of a grid of starts (Hoffmann et al. 2022; the replication of
  Besiroglu et al. 2024 found that a single start lands in poor local minima).
- The sweep (`size_ladder`, `sweep_plan`): models along one depth/width rule, each trained at every budget on
  the whole steps that come nearest to C / (its FLOPs per token), with the compute it really gets.
- Intervals (`bootstrap`): the fit repeated on runs drawn with replacement, within each budget, so that every
  budget keeps a parabola; percentile intervals of every fitted quantity and prediction.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .errors import ConfigError
from .model import ModelConfig, model_shape
from .stats import CONFIDENCE

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
                                   n_kv_head=max(1, heads // group) if group else None))
    return models


def sweep_plan(budgets, models: list[ModelConfig], tokens_per_step: int, *, min_steps: int = 10) -> pd.DataFrame:
    """Every (budget, model) run: FLOPs per token from the model's own count (attention included), the whole
    steps nearest to budget / (FLOPs per token x tokens_per_step), and the compute and tokens those steps give.
    A model that would train fewer than `min_steps` steps at a budget is left out there (too big for it)."""
    shapes = [model_shape(model) for model in models]
    rows = []
    for budget in budgets:
        for index, (model, shape) in enumerate(zip(models, shapes, strict=True)):
            flops_per_token = shape.flops_per_token()
            steps = round(budget / (flops_per_token * tokens_per_step))
            if steps >= min_steps:
                tokens = steps * tokens_per_step
                rows.append({"budget": float(budget), "model": index, "n_layer": model.n_layer, "d_model": model.d_model,
                             "params": shape.num_params(), "flops_per_token": flops_per_token, "steps": steps, "tokens": tokens,
                             "compute": flops_per_token * tokens})
    if not rows:
        raise ConfigError(f"no model trains {min_steps} steps at any budget; raise the budgets or add smaller models")
    return pd.DataFrame(rows)


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
                          bounds=[(None, None)] * 3 + [(0.0, None)] * 2, options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 5000})
        if best is None or result.fun < best.fun:
            best = result
    log_a, log_b, log_e, alpha, beta = best.x
    return ParametricFit(math.exp(log_e), math.exp(log_a), math.exp(log_b), float(alpha), float(beta))


def compute_optimal(fit: ParametricFit, compute: float, candidates: pd.DataFrame) -> dict:
    """The candidate shape (rows with `params` and `flops_per_token`) of least predicted loss at `compute` FLOPs,
    each trained on compute / flops_per_token tokens."""
    tokens = compute / candidates["flops_per_token"].to_numpy(float)
    losses = fit.loss(candidates["params"].to_numpy(float), tokens)
    best = int(np.argmin(losses))
    return {"compute": compute, "index": candidates.index[best], "params": float(candidates["params"].iloc[best]),
            "tokens": float(tokens[best]), "loss": float(losses[best])}


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
