"""Seaborn figures for the reports: every plot has a title, axis units and a legend where needed.

Functions take tidy pandas data and return the matplotlib Figure; `save_figure` writes PNGs
beside the stage's other results so reports can embed and trace them.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

sns.set_theme(style="whitegrid", context="notebook")


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def plot_token_frequencies(freqs, top: int = 40, title: str = "Most frequent tokens (train split)"):
    """Bar chart of the `top` most frequent tokens with their share of the split, in percent."""
    data = freqs.head(top).assign(percent=lambda f: 100 * f["share"], label=lambda f: f["token"].where(f["token"].str.strip() != "", f["token"].map(repr)))
    fig, ax = plt.subplots(figsize=(max(8, top * 0.25), 4))
    sns.barplot(data=data, x="label", y="percent", color=sns.color_palette()[0], ax=ax)
    ax.set(title=title, xlabel="token", ylabel="share of tokens (%)")
    ax.tick_params(axis="x", rotation=90)
    fig.tight_layout()
    return fig


def plot_document_lengths(lengths: np.ndarray, title: str = "Document lengths (train split)"):
    """Histogram of document lengths in tokens, log-scaled because paragraphs vary by orders of magnitude."""
    fig, ax = plt.subplots(figsize=(8, 4))
    lengths = np.asarray(lengths)
    sns.histplot(x=lengths[lengths > 0], log_scale=True, bins=40, ax=ax)
    ax.axvline(float(np.median(lengths)), color="k", linestyle="--", label=f"median {np.median(lengths):.0f} tokens")
    ax.set(title=title, xlabel="document length (tokens, log scale)", ylabel="documents")
    ax.legend()
    fig.tight_layout()
    return fig


# =========================================================================== studies and tuning
# Figures for labutils.experiments (ablation summaries, per-run histories) and labutils.tuning
# (Optuna studies). Intervals are the t-intervals of labutils.stats, so plots match the tables.

def plot_training_curves(run, title: str = "Training curves"):
    """Four panels of one run: train/val loss, perplexity, val next-token accuracy, learning rate, per step."""
    history, evals = run.history, run.evals
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (loss_ax, ppl_ax), (acc_ax, lr_ax) = axes
    loss_ax.plot(history["step"], history["train_loss"], label="train", alpha=0.7)
    loss_ax.plot(evals["step"], evals["val_loss"], "o-", label="validation")
    ppl_ax.plot(history["step"], np.exp(history["train_loss"]), label="train", alpha=0.7)
    ppl_ax.plot(evals["step"], evals["val_ppl"], "o-", label="validation")
    acc_ax.plot(evals["step"], 100 * evals["val_accuracy"], "o-", color=sns.color_palette()[1], label="validation")
    if "val_loss_ema" in evals and evals["val_loss_ema"].notna().any():
        loss_ax.plot(evals["step"], evals["val_loss_ema"], "s--", label="validation (EMA weights)")
        ppl_ax.plot(evals["step"], evals["val_ppl_ema"], "s--", label="validation (EMA weights)")
        acc_ax.plot(evals["step"], 100 * evals["val_accuracy_ema"], "s--", label="validation (EMA weights)")
    lr_ax.plot(history["step"], history["lr"], color=sns.color_palette()[2])
    loss_ax.set(title="Loss", xlabel="step", ylabel="cross-entropy (nats/token)")
    ppl_ax.set(title="Perplexity", xlabel="step", ylabel="perplexity (log scale)", yscale="log")
    acc_ax.set(title="Next-token accuracy", xlabel="step", ylabel="accuracy (%)")
    lr_ax.set(title="Learning-rate schedule", xlabel="step", ylabel="learning rate")
    for ax in (loss_ax, ppl_ax, acc_ax):
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


METRIC_LABELS = {"val_loss": "validation loss (nats/token)", "best_val_loss": "best validation loss (nats/token)",
                 "train_loss": "training loss (nats/token)", "val_ppl": "validation perplexity", "val_accuracy": "validation accuracy"}
AXIS_LABELS = {"tokens": "training tokens", "step": "step", "elapsed_s": "training time (s)"}


def plot_ablation(summary, *, metric: str = "val_loss", title: str = "Ablation: mean over seeds with 95% confidence intervals"):
    """Mean `metric` per variant with 95% t-interval error bars, coloured by the Welch-test verdict;
    the baseline's mean is the dashed reference line and its interval the shaded band."""
    s = summary.reset_index(drop=True)
    base = s[s["test"] == "baseline"].iloc[0]
    significant = s["significant"].fillna(False).astype(bool)
    groups = {
        "baseline": (s["test"] == "baseline", "black"),
        "significantly better": (significant & (s["delta_vs_baseline"] < 0), sns.color_palette()[2]),
        "significantly worse": (significant & (s["delta_vs_baseline"] > 0), sns.color_palette()[3]),
        "not significant": ((s["test"] == "welch") & ~significant, sns.color_palette()[7]),
        "not testable (n<2 or no variance)": (s["test"].str.startswith("not testable"), "silver"),
    }
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.45 * len(s)))
    ax.axvspan(base[f"{metric}_ci_low"], base[f"{metric}_ci_high"], color="black", alpha=0.08)
    ax.axvline(base[f"{metric}_mean"], color="black", linestyle="--", linewidth=1, label=f"baseline mean ({base[f'{metric}_mean']:.4f})")
    for label, (mask, color) in groups.items():
        rows = s[mask]
        if len(rows):
            ax.errorbar(rows[f"{metric}_mean"], rows.index, xerr=rows[f"{metric}_ci95"].fillna(0), fmt="o", color=color,
                        capsize=4, label=label)
    ax.set_yticks(s.index, [f"{v} (n={n})" for v, n in zip(s["variant"], s["n"])])
    ax.invert_yaxis()
    ax.set(title=title, xlabel=f"{METRIC_LABELS.get(metric, metric)}: mean ± 95% CI", ylabel="variant")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    fig.tight_layout()
    return fig


def plot_loss_curves(histories, *, y: str = "val_loss", x: str = "tokens", title: str | None = None):
    """One line per variant: the mean of `y` over seeds at each `x`, with its 95% t-interval band."""
    from scipy import stats

    data = histories.dropna(subset=[y])
    fig, ax = plt.subplots(figsize=(9, 5))
    for (variant, group), color in zip(data.groupby("variant", sort=False), sns.color_palette(n_colors=data["variant"].nunique())):
        agg = group.groupby(x)[y].agg(["mean", "std", "count"])
        half = stats.t.ppf(0.975, (agg["count"] - 1).clip(lower=1)) * agg["std"] / np.sqrt(agg["count"])
        ax.plot(agg.index, agg["mean"], color=color, label=f"{variant} (n={int(agg['count'].max())})")
        ax.fill_between(agg.index, agg["mean"] - half.fillna(0), agg["mean"] + half.fillna(0), color=color, alpha=0.2, linewidth=0)
    ax.set(title=title or f"{METRIC_LABELS.get(y, y).capitalize()} per variant: mean over seeds, 95% CI band",
           xlabel=AXIS_LABELS.get(x, x), ylabel=METRIC_LABELS.get(y, y))
    ax.legend(title="variant", fontsize="small")
    fig.tight_layout()
    return fig


def pareto_front(cost, loss) -> np.ndarray:
    """Mask of the points no other point beats on both cost and loss (lower is better for both)."""
    cost, loss = np.asarray(cost, dtype=float), np.asarray(loss, dtype=float)
    return np.array([not np.any((cost <= c) & (loss <= l) & ((cost < c) | (loss < l))) for c, l in zip(cost, loss)])


def plot_pareto(summary, *, metric: str = "val_loss", title: str = "Loss against cost: the Pareto front of the variants"):
    """Two panels, mean `metric` (± 95% CI) against parameters and against training time; the
    variants on the Pareto front (nothing both cheaper and better) are joined and highlighted."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, cost, xlabel in zip(axes, ("num_params", "elapsed_s_mean"), ("parameters (log scale)", "mean training time per run (s)")):
        front = pareto_front(summary[cost], summary[f"{metric}_mean"])
        ax.errorbar(summary[cost], summary[f"{metric}_mean"], yerr=summary[f"{metric}_ci95"].fillna(0), fmt="o",
                    color=sns.color_palette()[7], capsize=3, label="variant (mean ± 95% CI)")
        best = summary[front].sort_values(cost)
        ax.plot(best[cost], best[f"{metric}_mean"], "-D", color=sns.color_palette()[3], label="Pareto front")
        for _, row in summary.iterrows():
            ax.annotate(row["variant"], (row[cost], row[f"{metric}_mean"]), textcoords="offset points", xytext=(5, 5), fontsize="small")
        if cost == "num_params":
            ax.set_xscale("log")
        ax.set(xlabel=xlabel, ylabel=METRIC_LABELS.get(metric, metric))
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _optuna_figure(plot, study, *, title: str, ylabel: str | None = None, **kwargs):
    """Call an optuna.visualization.matplotlib function and return its Figure (experimental-API warning silenced)."""
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = plot(study, **kwargs)
    ax = np.ravel(ax)[0] if isinstance(ax, np.ndarray) else ax
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.figure.tight_layout()
    return ax.figure


def plot_tuning_history(study, *, metric: str = "val_loss"):
    """Each trial's value and the best so far, by trial number."""
    import optuna.visualization.matplotlib as ovm

    return _optuna_figure(ovm.plot_optimization_history, study, title="Tuning history: completed trials and the best so far",
                          ylabel=METRIC_LABELS.get(metric, metric), target_name=metric)


def plot_param_importances(study, *, metric: str = "val_loss"):
    """Importance of each hyper-parameter for the objective (Optuna's default evaluator, PED-ANOVA: no scikit-learn needed)."""
    import optuna.visualization.matplotlib as ovm

    return _optuna_figure(ovm.plot_param_importances, study, title=f"Hyper-parameter importance for {metric}", target_name=metric)


def plot_parallel_coordinates(study, params: list[str] | None = None, *, metric: str = "val_loss"):
    """Every completed trial as a line across its hyper-parameters, coloured by its objective value."""
    import optuna.visualization.matplotlib as ovm

    return _optuna_figure(ovm.plot_parallel_coordinate, study, title=f"Completed trials across hyper-parameters, coloured by {metric}",
                          params=params, target_name=metric)
