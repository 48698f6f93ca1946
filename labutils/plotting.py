"""Figures for the reports: every plot has a title, axis units and a legend where needed.

Functions take tidy pandas data and return the matplotlib Figure; `save_figure` writes PNGs
beside the stage's other results so reports can embed and trace them.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np

from .stats import t_quantile

# Seaborn's whitegrid look from the style sheets matplotlib ships, not from seaborn itself: importing seaborn
# imports scipy.stats, two seconds of every stage kernel and training process that draws a figure.
plt.style.use(["seaborn-v0_8-whitegrid", "seaborn-v0_8-notebook"])
PALETTE = list(
    matplotlib.colormaps["tab10"].colors
)  # fixed, so a plot never inherits a colour cycle another library set
plt.rcParams["axes.prop_cycle"] = matplotlib.cycler(color=PALETTE)


def variant_colors(names) -> dict[str, tuple]:
    """One distinct colour per variant (tab20 beyond ten), the same in every figure of a study."""
    names = list(dict.fromkeys(names))
    palette = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"].colors
    return dict(zip(names, palette[: len(names)], strict=True))


def save_figure(fig, path: str | Path, dpi: int = 120, *, key: bool = False) -> None:
    """Save `fig` as PNG; `key=True` makes it the stage's key figure, the dashboard's thumbnail.
    Returns nothing, so a notebook cell ending with it shows the figure and no path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    if key:
        from .stage_folders import record_figure

        record_figure(path)


def plot_past_runs(table, title: str = "The law against the lab's own final runs (last 10%, bits per byte)"):
    """Measured against predicted loss for each run of `table` (scaling.past_runs_check), the prediction's 95% interval
    as a bar; on the diagonal the law is right, above it the run did worse than predicted, below it better: a run
    below its bar is one the law called out of reach."""
    fig, ax = plt.subplots(figsize=(6.5, 5))
    low_err = table["predicted_bpb"] - table["low"]
    high_err = table["high"] - table["predicted_bpb"]
    current = table["run"] == "this run"
    for mask, color, label in ((~current, "#607d8b", "archived final runs"), (current, "#c62828", "this run")):
        ax.errorbar(
            table.loc[mask, "predicted_bpb"],
            table.loc[mask, "measured_bpb"],
            xerr=[low_err[mask], high_err[mask]],
            fmt="o",
            color=color,
            label=label,
            capsize=3,
        )
    span = [min(table["measured_bpb"].min(), table["low"].min()), max(table["measured_bpb"].max(), table["high"].max())]
    ax.plot(span, span, color="#999", linestyle="--", label="measured = predicted")
    ax.set(xlabel="predicted by the law (95% interval for one run)", ylabel="measured", title=title)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_repetition(fit, params: float, measured: tuple[float, float] | None = None):
    """The loss the data-constrained law (`scaling.DataConstrainedFit`) predicts against epochs for a model of `params`,
    beside the same law taking every token as fresh; shaded: past the epochs its runs reached (an extrapolation);
    `measured`: (epochs, loss) of a run of that size, drawn as a point."""
    epochs = np.geomspace(0.25, max(64.0, 2 * fit.max_epochs), 120)
    curve = fit.by_epochs(params, epochs)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(curve["epochs"], curve["loss"], color=PALETTE[0], label=f"data-constrained law (R* = {fit.r_star:.3g})")
    ax.plot(curve["epochs"], curve["fresh"], color="#999", linestyle="--", label="the same law, every token fresh")
    ax.axvspan(fit.max_epochs, epochs[-1], color="#eee", label="past the sweep's runs")
    if measured is not None:
        ax.plot(*measured, "o", color="#c62828", label="the final run")
    ax.set_xscale("log")
    ax.set(
        xlabel="epochs of the training split",
        ylabel="validation loss (bits per byte)",
        title=f"What repeating the data buys, {params / 1e6:.2f}M parameters: {fit.status.split(':')[0]}",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_token_frequencies(freqs, top: int = 40, title: str = "Most frequent tokens (train split)"):
    """Bar chart of the `top` most frequent tokens with their share of the split, in percent."""
    data = freqs.head(top).assign(
        percent=lambda f: 100 * f["share"],
        label=lambda f: f["token"].where(f["token"].str.strip() != "", f["token"].map(repr)),
    )
    fig, ax = plt.subplots(figsize=(max(8, top * 0.25), 4))
    ax.bar(data["label"], data["percent"], color=PALETTE[0])
    ax.set(title=title, xlabel="token", ylabel="share of tokens (%)", xlim=(-0.6, len(data) - 0.4))
    ax.tick_params(axis="x", rotation=90)
    fig.tight_layout()
    return fig


def plot_document_lengths(lengths: np.ndarray, title: str = "Document lengths (train split)"):
    """Histogram of document lengths in tokens, log-scaled because paragraphs vary by orders of magnitude."""
    fig, ax = plt.subplots(figsize=(8, 4))
    lengths = np.asarray(lengths)
    positive = lengths[lengths > 0]
    if positive.size:
        ax.hist(
            positive,
            bins=np.geomspace(positive.min(), positive.max() * 1.0001, 41),
            color=PALETTE[0],
            alpha=0.75,
            edgecolor="white",
        )
        ax.set_xscale("log")
    ax.axvline(float(np.median(lengths)), color="k", linestyle="--", label=f"median {np.median(lengths):.0f} tokens")
    ax.set(title=title, xlabel="document length (tokens, log scale)", ylabel="documents")
    ax.legend()
    fig.tight_layout()
    return fig


# =========================================================================== studies and tuning
# Figures for labutils.studies (ablation summaries, per-run histories) and labutils.tuning
# (Optuna studies). Intervals are the t-intervals of labutils.stats, so plots match the tables.


def train_loss_label(run) -> str:
    """What the logged training loss is: with label smoothing (or MoE's auxiliary term) it is the objective
    optimised, not the plain cross-entropy validation reports, and sits above it by design."""
    import json

    path = Path(run.out_dir) / "config.json"
    train = json.loads(path.read_text()).get("train", {}) if path.exists() else {}
    smoothing = train.get("label_smoothing") or 0.0
    return f"train (label-smoothed cross-entropy, ε = {smoothing:g})" if smoothing else "train (cross-entropy)"


def plot_training_curves(run, title: str = "Training curves"):
    """Four panels of one run: train/val loss, perplexity, val next-token accuracy, learning rate, per step.
    The legend says which loss the training curve is (label-smoothed or plain); validation is always plain."""
    history, evals = run.history, run.evals
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (loss_ax, ppl_ax), (acc_ax, lr_ax) = axes
    train_label = train_loss_label(run)
    loss_ax.plot(history["step"], history["train_loss"], label=train_label, alpha=0.7)
    loss_ax.plot(evals["step"], evals["val_loss"], "o-", label="validation (plain cross-entropy)")
    ppl_ax.plot(history["step"], np.exp(history["train_loss"]), label=train_label.split(" (")[0], alpha=0.7)
    ppl_ax.plot(evals["step"], evals["val_ppl"], "o-", label="validation")
    acc_ax.plot(evals["step"], 100 * evals["val_accuracy"], "o-", color=PALETTE[1], label="validation")
    if "val_loss_ema" in evals and evals["val_loss_ema"].notna().any():
        loss_ax.plot(evals["step"], evals["val_loss_ema"], "s--", label="validation (EMA weights)")
        ppl_ax.plot(evals["step"], evals["val_ppl_ema"], "s--", label="validation (EMA weights)")
        acc_ax.plot(evals["step"], 100 * evals["val_accuracy_ema"], "s--", label="validation (EMA weights)")
    lr_ax.plot(history["step"], history["lr"], color=PALETTE[2])
    loss_ax.set(title="Loss", xlabel="step", ylabel="loss (nats/token)")
    ppl_ax.set(title="Perplexity", xlabel="step", ylabel="perplexity (log scale)", yscale="log")
    acc_ax.set(title="Next-token accuracy", xlabel="step", ylabel="accuracy (%)")
    lr_ax.set(title="Learning-rate schedule", xlabel="step", ylabel="learning rate")
    for ax in (loss_ax, ppl_ax, acc_ax):
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


METRIC_LABELS = {
    "val_loss": "validation loss (nats/token)",
    "best_val_loss": "best validation loss (nats/token)",
    "train_loss": "training loss (nats/token)",
    "val_ppl": "validation perplexity",
    "val_accuracy": "validation accuracy",
    "confirm_loss": "held-out confirmation loss (nats/token)",
}
AXIS_LABELS = {"tokens": "training tokens", "step": "step", "elapsed_s": "training time (s)"}


def plot_ablation(
    summary,
    *,
    metric: str = "val_loss",
    title: str = "Ablation: mean over seeds with 95% confidence intervals",
    refs: dict | None = None,
):
    """Left: mean `metric` per variant with 95% t-interval error bars, coloured by the test's verdict, the baseline's
    mean dashed and its interval shaded, and the count-model references on the same windows (`refs`: bigram, 5-gram)
    as dotted lines. Right: each arm's difference to the baseline with its test's 95% interval, and the band of
    differences smaller than the study's minimum detectable effect (80% power), which no 'no' can rule out."""
    from .stats import study_mde

    s = summary.reset_index(drop=True)
    base = s[s["test"] == "baseline"].iloc[0]
    significant = s["significant"].fillna(False).astype(bool)
    groups = {
        "baseline": (s["test"] == "baseline", "black"),
        "significantly better": (significant & (s["delta_vs_baseline"] < 0), PALETTE[2]),
        "significantly worse": (significant & (s["delta_vs_baseline"] > 0), PALETTE[3]),
        "not significant": (s["test"].isin(("paired", "welch")) & ~significant, PALETTE[7]),
        "not testable (n<2 or no variance)": (s["test"].str.startswith("not testable"), "silver"),
    }
    height = 2.8 + 0.45 * len(s)
    fig, (ax, dax) = plt.subplots(1, 2, figsize=(14, height), sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    ax.axvspan(base[f"{metric}_ci_low"], base[f"{metric}_ci_high"], color="black", alpha=0.08)
    ax.axvline(
        base[f"{metric}_mean"],
        color="black",
        linestyle="--",
        linewidth=1,
        label=f"baseline mean ({base[f'{metric}_mean']:.4f})",
    )
    for name, style in (("bigram", (PALETTE[1], ":")), ("5-gram", (PALETTE[4], ":"))):
        if refs and name in refs:
            ax.axvline(
                refs[name],
                color=style[0],
                linestyle=style[1],
                linewidth=1.5,
                label=f"{name} count model ({refs[name]:.3f})",
            )
    for label, (mask, color) in groups.items():
        rows = s[mask]
        if len(rows):
            ax.errorbar(
                rows[f"{metric}_mean"],
                rows.index,
                xerr=rows[f"{metric}_ci95"].fillna(0),
                fmt="o",
                color=color,
                capsize=4,
                label=label,
            )
            arms = rows[rows["test"] != "baseline"]
            if len(arms):
                low, high = arms["delta_ci_low"], arms["delta_ci_high"]
                dax.errorbar(
                    arms["delta_vs_baseline"],
                    arms.index,
                    xerr=[(arms["delta_vs_baseline"] - low).fillna(0), (high - arms["delta_vs_baseline"]).fillna(0)],
                    fmt="o",
                    color=color,
                    capsize=4,
                )
    mde = study_mde(s)
    if mde == mde:  # not NaN
        dax.axvspan(-mde, mde, color=PALETTE[7], alpha=0.15, label=f"|Δ| < {mde:.3f}: not detectable at 80% power")
        dax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), fontsize="small")
    dax.axvline(0, color="black", linestyle="--", linewidth=1)
    dax.set(xlabel="Δ vs baseline (nats/token): mean and the test's 95% CI")
    ax.set_yticks(s.index, [f"{v} (n={n})" for v, n in zip(s["variant"], s["n"], strict=True)])
    ax.invert_yaxis()
    ax.set(xlabel=f"{METRIC_LABELS.get(metric, metric)}: mean ± 95% CI", ylabel="variant")
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", fontsize="small", ncol=4, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.8 / height, 1, 1))  # room at the bottom for the legend
    return fig


def plot_lr_sweep(sweep: dict, *, title: str = "LR sweep", refs: dict | None = None):
    """Loss against learning rate (log axis) for a sweep's one-seed runs, the chosen LR marked, and the count models
    on the same windows as horizontal lines."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(sweep["lrs"], sweep["losses"], "o-", color=PALETTE[0], label="one run per LR")
    best = sweep["lrs"].index(sweep["best_lr"])
    ax.plot(
        [sweep["best_lr"]],
        [sweep["losses"][best]],
        "*",
        markersize=16,
        color=PALETTE[2],
        label=f"chosen: {sweep['best_lr']:.3g}" + (" (at the grid's edge)" if sweep.get("best_at_edge") else ""),
    )
    for name, color in (("bigram", PALETTE[1]), ("5-gram", PALETTE[4])):
        if refs and name in refs:
            ax.axhline(
                refs[name], color=color, linestyle=":", linewidth=1.5, label=f"{name} count model ({refs[name]:.3f})"
            )
    ax.set_xscale("log")
    ax.set_xticks(sweep["lrs"], [f"{x:.3g}" for x in sweep["lrs"]])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set(title=title, xlabel="peak learning rate", ylabel=METRIC_LABELS.get(sweep.get("metric", "val_loss"), "loss"))
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_lr_check(table, multipliers, *, title: str = "Each arm at other learning rates (one seed)"):
    """Per arm: its loss at each LR multiplier (the study's LR = 1x); arms whose ranking against the baseline flips
    between the shared LR and each arm's best are drawn solid and named in the legend."""
    fig, ax = plt.subplots(figsize=(9, 5))
    xs = sorted((1.0, *multipliers))
    for i, row in enumerate(table.to_dict("records")):
        ys = [row.get(f"x{m:g}") for m in xs]
        baseline = row["variant"] == "baseline"
        label = row["variant"] + (" (ranking flips)" if row.get("flips") else "")
        ax.plot(
            xs,
            ys,
            "o-" if baseline or row.get("flips") else "o--",
            color="black" if baseline else PALETTE[i % 10],
            linewidth=2.5 if baseline else 1.5,
            alpha=1.0 if baseline or row.get("flips") else 0.6,
            label=label,
        )
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{m:g}x" for m in xs])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set(title=title, xlabel="multiple of the arm's LR in the comparison", ylabel="validation loss (nats/token)")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def plot_loss_curves(histories, *, y: str = "val_loss", x: str = "tokens", title: str | None = None):
    """One line per variant: the mean of `y` over seeds at each `x`, with its 95% t-interval band."""
    data = histories.dropna(subset=[y])
    colors = variant_colors(data["variant"])
    fig, ax = plt.subplots(figsize=(11, 5.5))
    for variant, group in data.groupby("variant", sort=False):
        color = colors[variant]
        agg = group.groupby(x)[y].agg(["mean", "std", "count"])
        half = t_quantile((agg["count"] - 1).clip(lower=1)) * agg["std"] / np.sqrt(agg["count"])
        style = "--" if variant == "baseline" else "-"
        ax.plot(
            agg.index,
            agg["mean"],
            style,
            color="black" if variant == "baseline" else color,
            label=f"{variant} (n={int(agg['count'].max())})",
        )
        ax.fill_between(
            agg.index, agg["mean"] - half.fillna(0), agg["mean"] + half.fillna(0), color=color, alpha=0.2, linewidth=0
        )
    ax.set(
        title=title or f"{METRIC_LABELS.get(y, y).capitalize()} per variant: mean over seeds, 95% CI band",
        xlabel=AXIS_LABELS.get(x, x),
        ylabel=METRIC_LABELS.get(y, y),
    )
    ax.legend(title="variant", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def pareto_front(cost, loss) -> np.ndarray:
    """Mask of the points no other point beats on both cost and loss (lower is better for both)."""
    cost, loss = np.asarray(cost, dtype=float), np.asarray(loss, dtype=float)
    return np.array(
        [
            not np.any((cost <= c_i) & (loss <= l_i) & ((cost < c_i) | (loss < l_i)))
            for c_i, l_i in zip(cost, loss, strict=False)
        ]
    )


def plot_pareto(
    summary, *, metric: str = "val_loss", title: str = "Loss against cost: the Pareto front of the variants"
):
    """Two panels, mean `metric` (± 95% CI) against parameters and against training time; the
    variants on the Pareto front (nothing both cheaper and better) are joined and highlighted."""
    colors = variant_colors(summary["variant"])
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True)
    for ax, cost, xlabel in zip(
        axes,
        ("num_params", "elapsed_s_mean"),
        ("parameters (log scale)", "mean training time per run (s)"),
        strict=True,
    ):
        front = pareto_front(summary[cost], summary[f"{metric}_mean"])
        best = summary[front].sort_values(cost)
        ax.plot(best[cost], best[f"{metric}_mean"], "-", color="black", linewidth=1, zorder=1, label="_front")
        # colours and the legend name the points; only the front is labelled in place
        for on_front, (_, row) in zip(front, summary.iterrows(), strict=True):
            ax.errorbar(
                row[cost],
                row[f"{metric}_mean"],
                yerr=0 if np.isnan(row[f"{metric}_ci95"]) else row[f"{metric}_ci95"],
                fmt="D" if on_front else "o",
                color=colors[row["variant"]],
                capsize=3,
                markersize=7,
                label=row["variant"],
            )
        for _, row in best.iterrows():
            ax.annotate(
                row["variant"],
                (row[cost], row[f"{metric}_mean"]),
                textcoords="offset points",
                xytext=(6, -12),
                fontsize="small",
            )
        if cost == "num_params":
            ax.set_xscale("log")
        ax.set(xlabel=xlabel, ylabel=METRIC_LABELS.get(metric, metric))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        title="variant (◆ on the Pareto front)",
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        fontsize="small",
    )
    fig.suptitle(title + " (mean ± 95% CI)")
    fig.tight_layout()
    return fig


def plot_sizing(sizing, final: dict | None = None, title: str = "Sizing the final model from the lab's own sweep"):
    """Four panels of a `scaling.Sizing`: the IsoFLOP curves (loss against parameters, one line per budget through the
    seeds' means); the fitted frontier under the repetition cap (least predicted loss against compute, its 95% band)
    with the sweep's runs, the count models and, given `final` (its check), the final runs; the LR fit (loss against LR
    at each width, each width's best marked); and the LR rule (best LR against width, the fitted rule and the prior).
    Losses in bits per byte."""
    law = sizing.law
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    (iso, front_ax), (fit_ax, rule_ax) = axes
    for (compute, group), color in zip(law.groupby("compute"), PALETTE, strict=False):
        means = group.groupby("params", as_index=False)["loss"].mean()
        iso.scatter(group["params"], group["loss"], color=color, s=12, alpha=0.6)
        iso.plot(means["params"], means["loss"], "-", color=color, label=f"{compute:.2g} FLOPs")
        front_ax.scatter(group["train_flops"], group["loss"], color=color, s=25, zorder=3)
    if sizing.isoflop is not None:
        curves = sizing.isoflop.curves[sizing.isoflop.curves["bracketed"]]
        iso.plot(curves["n_opt"], curves["loss_opt"], "k*", markersize=12, label="parabola minimum")
    iso.set(
        xscale="log",
        xlabel="parameters N (log scale)",
        ylabel="validation loss (bits/byte)",
        title=f"IsoFLOP curves: least loss inside the sizes at {sum(e is None for e in sizing.edges.values())} of "
        f"{len(sizing.edges)} budgets",
    )
    iso.legend(title="budget (dots: seeds)", fontsize="small")
    _plot_frontier(front_ax, sizing, final)
    _plot_lr_rule(fit_ax, rule_ax, sizing.lr_rule)
    for ax in axes.flat:  # decades only: minor-tick labels of a narrow log range collide
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _plot_frontier(ax, sizing, final: dict | None) -> None:
    """The capped frontier with its band, the largest fitted budget, the count models and the final runs' check."""
    law = sizing.law
    top = max(law["train_flops"].max(), (final or {}).get("compute", 0.0), sizing.final_compute)
    frontier = sizing.frontier(np.geomspace(law["train_flops"].min() / 2, top * 2, 60))
    ax.plot(
        frontier["compute"], frontier["loss"], color="black", label="fit: least loss over the ladder, within the cap"
    )
    ax.fill_between(
        frontier["compute"], frontier["low"], frontier["high"], color="black", alpha=0.12, label="95% band for one run"
    )
    ax.axvline(law["train_flops"].max(), color="grey", linestyle=":", label="largest fitted budget")
    counts = [
        (name, sizing.references[f"{name}_bpb"])
        for name in ("bigram", "5-gram")
        if f"{name}_bpb" in (sizing.references or {})
    ]
    for (name, bpb), style in zip(counts, ("--", "-."), strict=False):
        ax.axhline(bpb, color="tab:gray", linestyle=style, label=f"{name} count model, same windows")
    if final:
        band = [[final["predicted"] - final["low"]], [final["high"] - final["predicted"]]]
        ax.errorbar(final["compute"], final["predicted"], yerr=band, fmt="none", ecolor="tab:red", capsize=4)
        ax.plot(
            final["compute"],
            final["measured"],
            "*",
            color="tab:red",
            markersize=14,
            label=f"final runs, mean: {final['verdict']}",
        )
    shown = np.r_[law["loss"], frontier["loss"], (final or {}).get("measured", np.nan), [bpb for _, bpb in counts]]
    low, high = np.nanpercentile(shown, [0, 100])
    ax.set(
        xscale="log",
        ylim=(low - 0.3, high + 0.3),
        xlabel="training compute (FLOPs, log scale)",
        ylabel="validation loss (bits/byte)",
        title="Fitted frontier L(N, D) under the repetition cap, and the final runs",
    )
    ax.legend(fontsize="small")


def _plot_lr_rule(fit_ax, rule_ax, rule: dict) -> None:
    """Loss against LR at each width of the LR fit (best LR dotted), and best LR against width with the fitted rule."""
    widths = sorted(rule["best_lr"])
    for (width, group), color in zip(rule["curves"].groupby("d_model"), PALETTE, strict=False):
        fit_ax.plot(group["lr"], group["loss"], "o-", color=color, label=f"width {width}")
        fit_ax.axvline(rule["best_lr"][int(width)], color=color, linestyle=":")
    fit_ax.set(
        xscale="log",
        xlabel="learning rate (log scale); dotted: each width's best",
        ylabel="validation loss (bits/byte)",
        title=f"LR fit at {rule['compute']:.2g} FLOPs",
    )
    fit_ax.legend(fontsize="small")
    grid = np.geomspace(min(widths) / 1.5, max(widths) * 1.5, 20)
    censored = set(rule["censored_widths"])
    for w in widths:
        rule_ax.plot(w, rule["best_lr"][w], "o" if w not in censored else "x", color="black", markersize=9)
    rule_ax.plot(
        grid,
        rule["intercept"] * grid ** -rule["exponent"],
        color="tab:blue",
        label=f"rule: {rule['intercept']:.3g} x width^-{rule['exponent']:.2f}",
    )
    prior = rule["prior"]
    rule_ax.plot(
        grid,
        prior["intercept"] * grid ** -prior["exponent"],
        color="tab:gray",
        linestyle="--",
        label="prior: 1 / width",
    )
    rule_ax.fill_between(
        grid,
        rule["intercept"] * grid ** -rule["exponent"] / 2,
        rule["intercept"] * grid ** -rule["exponent"] * 2,
        color="tab:blue",
        alpha=0.1,
        label="one grid step either side",
    )
    rule_ax.set_xscale("log")
    rule_ax.set_xticks(widths, labels=[str(w) for w in widths])  # after the log scale, which resets the ticks
    rule_ax.set(
        yscale="log",
        xlabel="width (log scale)",
        ylabel="best LR (log scale; x: at the grid's edge)",
        title="LR rule: "
        + ("every width's best within one step of it" if rule["holds"] else "does NOT hold: a best off it"),
    )
    rule_ax.legend(fontsize="small")


def plot_tuning_history(study, *, metric: str = "val_loss"):
    """Each trial's value and the best so far, by trial number (Optuna's plot, experimental-API warning silenced)."""
    import warnings

    import optuna
    import optuna.visualization.matplotlib as ovm

    with warnings.catch_warnings(), plt.rc_context():  # Optuna switches the global style to ggplot: keep that local
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = ovm.plot_optimization_history(study, target_name=metric)
    ax.set(title="Tuning history: completed trials and the best so far", ylabel=METRIC_LABELS.get(metric, metric))
    ax.figure.tight_layout()
    return ax.figure


def plot_param_importances(study, *, metric: str = "val_loss"):
    """Importance of each hyper-parameter for the objective (Optuna's default evaluator: no scikit-learn needed)."""
    import optuna

    importances = optuna.importance.get_param_importances(study)
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * len(importances)))
    ax.barh(list(importances), list(importances.values()), color=PALETTE[0])
    ax.invert_yaxis()  # the most important first, at the top
    for i, value in enumerate(importances.values()):
        ax.annotate(
            f"{value:.2f}", (value, i), textcoords="offset points", xytext=(4, 0), va="center", fontsize="small"
        )
    ax.set(
        title=f"Hyper-parameter importance for {metric} ({len(study.trials)} trials)",
        xlabel="importance (share of the explained variance)",
        ylabel="hyper-parameter",
    )
    fig.tight_layout()
    return fig


def shade_of_low(cmap) -> str:
    """How a colour map draws its low end, read from the map (relative luminance), for a title that says it."""

    def luminance(rgba) -> float:
        return 0.2126 * rgba[0] + 0.7152 * rgba[1] + 0.0722 * rgba[2]

    return "darker" if luminance(cmap(0.0)) < luminance(cmap(1.0)) else "lighter"


def plot_parallel_coordinates(study, params: list[str] | None = None, *, metric: str = "val_loss"):
    """Every completed trial as a line across its hyper-parameters (each axis scaled to its own range,
    log ranges on a log scale), coloured by its objective value; axis ends show the real values."""
    import optuna

    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    names = params or sorted({name for t in trials for name in t.params})
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 5))
    if not trials or not names:
        ax.set(title="No completed trials to show")
        return fig
    from .tuning import exact_loss

    values = np.array([exact_loss(t) for t in trials])
    norm = plt.Normalize(values.min(), values.max())
    scaled, ends = {}, {}
    for name in names:
        raw = [t.params.get(name) for t in trials]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw)
        if numeric:
            x = np.array(raw, dtype=float)
            log = x.min() > 0 and x.max() / x.min() > 20
            x = np.log10(x) if log else x
            span = x.max() - x.min() or 1.0
            scaled[name] = (x - x.min()) / span
            fmt = (lambda v: f"{10**v:.3g}") if log else (lambda v: f"{v:.3g}")
            ends[name] = (fmt(x.min()), fmt(x.max()))
        else:
            levels = sorted({str(v) for v in raw})
            scaled[name] = np.array([levels.index(str(v)) / max(len(levels) - 1, 1) for v in raw])
            ends[name] = (levels[0], levels[-1])
    cmap = plt.get_cmap("viridis")
    for i in np.argsort(-values):  # best trials drawn last, on top
        ax.plot(range(len(names)), [scaled[n][i] for n in names], color=cmap(norm(values[i])), alpha=0.8, linewidth=1.5)
    for j, name in enumerate(names):
        ax.axvline(j, color="grey", linewidth=0.8)
        ax.annotate(ends[name][0], (j, 0), textcoords="offset points", xytext=(3, -12), fontsize="x-small")
        ax.annotate(ends[name][1], (j, 1), textcoords="offset points", xytext=(3, 4), fontsize="x-small")
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_yticks([])
    ax.set(
        ylim=(-0.12, 1.12),
        ylabel="position within each parameter's range",
        title=f"Completed trials across hyper-parameters ({len(trials)} trials, {shade_of_low(cmap)} = lower {metric})",
    )
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=METRIC_LABELS.get(metric, metric))
    fig.tight_layout()
    return fig


MIN_TRIALS_FOR_IMPORTANCE = 20


def save_tuning_figures(study, folder: str | Path, *, metric: str = "val_loss") -> dict[str, Path]:
    """The tuning figures (history, parallel coordinates, and the importance only with MIN_TRIALS_FOR_IMPORTANCE
    finished trials) as PNGs in `folder`, left open so a notebook shows them; the history is the stage's key figure."""
    import optuna

    finished = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    plots = {
        "history": plot_tuning_history,
        "importance": plot_param_importances,
        "parallel": plot_parallel_coordinates,
    }
    if finished < MIN_TRIALS_FOR_IMPORTANCE:  # fitted on fewer trials, the importances are noise with bars
        plots.pop("importance")
    paths = {}
    for name, plot in plots.items():
        fig = plot(study, metric=metric)
        paths[name] = Path(folder) / f"tuning_{name}.png"
        save_figure(fig, paths[name], key=name == "history")
    return paths


def live_training_plot(run_dir: str | Path):
    """An `on_eval` callback for `train` that redraws train and validation loss in place while a run
    trains, in a JupyterLab notebook; None elsewhere (papermill, `make pipeline`, scripts), where the
    finished run's curves are plotted once instead. Pass it straight on: `train(..., on_eval=live)`.
    """
    import os

    if os.environ.get("LABUTILS_HEADLESS") == "1" or "JPY_SESSION_NAME" not in os.environ:
        return None
    import pandas as pd
    from IPython.display import display

    run_dir = Path(run_dir)
    handle = None

    def redraw(step: int, metrics: dict) -> None:
        nonlocal handle
        history = pd.read_csv(run_dir / "metrics.csv") if (run_dir / "metrics.csv").exists() else None
        evals = pd.read_csv(run_dir / "evals.csv") if (run_dir / "evals.csv").exists() else None
        fig, ax = plt.subplots(figsize=(8, 3.2))
        if history is not None and len(history):
            ax.plot(history["step"], history["train_loss"], color=PALETTE[0], alpha=0.5, lw=1, label="train")
        if evals is not None and len(evals):
            ax.plot(evals["step"], evals["val_loss"], "o-", color=PALETTE[1], label="validation")
        ax.set(
            title=f"{run_dir.name}: step {step}, val loss {metrics['val_loss']:.4f}",
            xlabel="step",
            ylabel="loss (nats/token)",
        )
        ax.legend(loc="upper right")
        plt.close(fig)  # shown through the display handle only, not again at the end of the cell
        if handle is None:
            handle = display(fig, display_id=True)
        else:
            handle.update(fig)

    return redraw
