"""Statistics of a study: per-variant means with t-intervals, Welch t-tests against the baseline
(plus Holm-adjusted p-values), the efficiency score, the results table and a computed conclusion.

Everything here works on the tidy run table (one row per variant and seed), so it can be tested on
synthetic numbers without training anything.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from .tables import fmt, markdown_table

# The one definition of the efficiency score (write-up 003's idea, made explicit): validation-loss
# improvement over the baseline per device-second of training. Positive = better than the baseline
# per second spent; the baseline scores 0. elapsed_s is train()'s training time (evaluation
# excluded); every study run trains on one device, so its seconds are device-seconds (GPU-seconds).
EFFICIENCY_FORMULA = ("efficiency = (baseline mean val_loss - val_loss) / elapsed_s, in nats per device-second of training "
                      "(each run trains on one device; evaluation time excluded)")

CONFIDENCE = 0.95


def t_quantile(degrees_of_freedom):
    """The two-sided CONFIDENCE quantile of Student's t (a number, or one per entry of an array or Series).
    scipy.special, not scipy.stats: importing scipy.stats takes two seconds of every process that reports."""
    from scipy.special import stdtrit

    return stdtrit(degrees_of_freedom, (1 + CONFIDENCE) / 2)


def efficiency(baseline_loss: float, loss, elapsed_s):
    """See EFFICIENCY_FORMULA; works on numbers and pandas Series alike."""
    return (baseline_loss - loss) / elapsed_s


def mean_ci(values) -> tuple[int, float, float, float]:
    """(n, mean, sample std, half-width of the 95% t-interval); std and half-width are NaN when n < 2."""
    x = np.asarray(pd.Series(values).dropna(), dtype=float)
    n = len(x)
    if n == 0:
        return 0, math.nan, math.nan, math.nan
    mean = float(x.mean())
    if n < 2:
        return n, mean, math.nan, math.nan
    std = float(x.std(ddof=1))
    return n, mean, std, float(t_quantile(n - 1) * std / math.sqrt(n))


def welch(a, b) -> tuple[float, float, float, str]:
    """Welch's t-test of mean(a) - mean(b): (p, CI low, CI high, test).

    `test` is 'welch' when the test ran, otherwise the reason it could not: fewer than 2 runs on a
    side (no variance estimate), or zero variance on both sides (the t statistic is undefined).
    """
    a, b = (np.asarray(pd.Series(v).dropna(), dtype=float) for v in (a, b))
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan, math.nan, "not testable: n<2"
    if a.std() == 0 and b.std() == 0:
        return math.nan, math.nan, math.nan, "not testable: zero variance"
    from scipy.special import stdtr

    var_a, var_b = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)  # squared standard errors of the two means
    diff, se = a.mean() - b.mean(), math.sqrt(var_a + var_b)
    df = (var_a + var_b) ** 2 / (var_a ** 2 / (len(a) - 1) + var_b ** 2 / (len(b) - 1))  # Welch-Satterthwaite
    p = 2 * stdtr(df, -abs(diff) / se)
    half = t_quantile(df) * se
    return float(p), float(diff - half), float(diff + half), "welch"


def holm(pvalues) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (NaNs stay NaN and do not count as comparisons)."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    m = len(idx)
    running = 0.0
    for rank, i in enumerate(idx[np.argsort(p[idx], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))  # step-down keeps adjusted p monotone
        out[i] = running
    return out


def add_efficiency(runs: pd.DataFrame, baseline: str, metric: str = "val_loss") -> pd.DataFrame:
    """`runs` with an `efficiency` column per run, against the baseline's mean `metric`."""
    base = runs.loc[runs["variant"] == baseline, metric].mean()
    return runs.assign(efficiency=efficiency(base, runs[metric], runs["elapsed_s"]))


# Bits per byte measured on the same evaluation as a loss metric: every tokenizer compares on it. A best
# validation loss has none (the run records bits per byte at its evaluations, not at its best one).
BPB_OF = {"val_loss": "val_bpb", "confirm_loss": "confirm_bpb"}


def bpb_column(metric: str) -> str | None:
    """The summary column of bits per byte that goes with `metric`'s mean, or None."""
    return f"{BPB_OF[metric]}_mean" if metric in BPB_OF else None


def summarize(runs: pd.DataFrame, baseline: str, *, metric: str = "val_loss", alpha: float = 0.05) -> pd.DataFrame:
    """One row per variant (in first-seen order): n, mean/std/95% CI of `metric`, the difference to
    the baseline with its Welch CI and p-value, Holm-adjusted p, `significant` (Holm-adjusted p < alpha,
    so the chance of any false positive across the study's comparisons stays below alpha; <NA> when
    not testable, see `test`), mean costs and the efficiency score beside its inputs."""
    if baseline not in set(runs["variant"]):
        raise ValueError(f"baseline variant {baseline!r} has no finished runs; variants present: {sorted(set(runs['variant']))}")
    base_values = runs.loc[runs["variant"] == baseline, metric]
    base_mean = float(base_values.mean())
    means = [c for c in ("val_ppl", "val_accuracy", "val_bpb", "confirm_bpb", "tokens_per_s", "peak_memory_mb")
             if c in runs and runs[c].notna().any()]
    rows = []
    for variant, group in runs.groupby("variant", sort=False):
        n, mean, std, half = mean_ci(group[metric])
        if variant == baseline:
            p, lo, hi, test = math.nan, math.nan, math.nan, "baseline"
        else:
            p, lo, hi, test = welch(group[metric], base_values)
        elapsed = float(group["elapsed_s"].mean())
        rows.append({
            "variant": variant, "n": n, f"{metric}_mean": mean, f"{metric}_std": std, f"{metric}_ci95": half,
            f"{metric}_ci_low": mean - half, f"{metric}_ci_high": mean + half,
            "delta_vs_baseline": mean - base_mean, "delta_ci_low": lo, "delta_ci_high": hi,
            "p_value": p, "test": test,
            "num_params": int(group["num_params"].iloc[0]), "flops_per_token": float(group["flops_per_token"].iloc[0]),
            "elapsed_s_mean": elapsed,
            **{f"{col}_mean": float(group[col].mean()) for col in means},
            "efficiency": efficiency(base_mean, mean, elapsed),
        })
    summary = pd.DataFrame(rows)
    summary["p_holm"] = holm(summary["p_value"])
    summary["significant"] = pd.array([pd.NA if math.isnan(p) else bool(p < alpha) for p in summary["p_holm"]], dtype="boolean")
    return summary


def format_overrides(overrides: dict[str, Any]) -> str:
    """{"model.ffn_mult": 8 / 3} -> "model.ffn_mult=2.667": numbers as `fmt` writes them, other values as in code."""
    return ", ".join(f"{k}={fmt(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v}"
                     for k, v in overrides.items()) or "—"


def results_table(summary: pd.DataFrame, variants: dict[str, dict], *, metric: str = "val_loss") -> pd.DataFrame:
    """Write-up 001's results table, with seeds: variant, overrides, parameters, mean ± CI (and its bits per byte,
    where the runs measured them), Δ, p, verdict, efficiency."""
    bpb = bpb_column(metric)
    return pd.DataFrame({
        "variant": summary["variant"],
        "overrides": [format_overrides(variants.get(v, {})) for v in summary["variant"]],
        "num_params": summary["num_params"],
        "n": summary["n"],
        f"{metric}_mean": summary[f"{metric}_mean"],
        f"{metric}_ci95": summary[f"{metric}_ci95"],
        **({bpb: summary[bpb]} if bpb in summary else {}),
        "delta_vs_baseline": summary["delta_vs_baseline"],
        "p_value": summary["p_value"],
        "p_holm": summary["p_holm"],
        "significant": [verdict(s, t) for s, t in zip(summary["significant"], summary["test"], strict=True)],
        "elapsed_s_mean": summary["elapsed_s_mean"],
        "efficiency": summary["efficiency"],
    })


def verdict(significant, test: str) -> str:
    if test == "baseline":
        return "baseline"
    if test != "welch":
        return test
    return "yes" if bool(significant) else "no"


def results_markdown(table: pd.DataFrame, *, metric: str = "val_loss") -> str:
    """The results table as GitHub Markdown, with the metric as 'mean ± 95% CI'."""
    bpb = bpb_column(metric)
    bpb = bpb if bpb in table else None
    header = ["variant", "overrides", "params", "n", f"{metric} (mean ± 95% CI)", *(["bits/byte"] if bpb else []), "Δ vs baseline",
              "p (Welch)", "p (Holm)", "significant", "train time (s)", "efficiency (nats/s)"]
    rows = []
    for r in table.to_dict("records"):
        ci = r[f"{metric}_ci95"]
        loss = fmt(r[f"{metric}_mean"], decimals=4) + ("" if math.isnan(ci) else f" ± {fmt(ci, decimals=4)}")
        delta = "—" if r["significant"] == "baseline" else fmt(r["delta_vs_baseline"], decimals=4, sign=True)
        rows.append([f"`{r['variant']}`", r["overrides"], fmt(r["num_params"]), fmt(r["n"]), loss,
                     *([fmt(r[bpb], decimals=4)] if bpb else []), delta, fmt(r["p_value"], digits=3), fmt(r["p_holm"], digits=3),
                     r["significant"], fmt(r["elapsed_s_mean"], decimals=1), fmt(r["efficiency"], digits=3)])
    notes = [f"Intervals: {CONFIDENCE:.0%} t-intervals over seeds. Significant: Welch's t-test against the baseline, "
             "p below 0.05 after Holm's correction for the number of variants compared.", f"{EFFICIENCY_FORMULA}."]
    return markdown_table(header, rows) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def best_variant(summary: pd.DataFrame, *, metric: str = "val_loss") -> str:
    """The variant with the lowest mean `metric` (ties: the first listed)."""
    return str(summary.loc[summary[f"{metric}_mean"].idxmin(), "variant"])


def conclusion(summary: pd.DataFrame, *, metric: str = "val_loss", alpha: float = 0.05) -> str:
    """A sentence computed from the summary: the best variant and whether its lead is significant."""
    rows = summary.set_index("variant")
    base_name = rows.index[rows["test"] == "baseline"][0]
    base = rows.loc[base_name]

    def mean_ci_text(r) -> str:
        ci = "" if math.isnan(r[f"{metric}_ci95"]) else f" ± {fmt(r[f'{metric}_ci95'], decimals=4)}"
        return f"{fmt(r[f'{metric}_mean'], decimals=4)}{ci} (n={r['n']})"

    def test_text(name: str) -> str:
        r = rows.loc[name]
        if r["test"] != "welch":
            return (f"{r['test'].replace('not testable: ', 'not testable (')}): "
                    "run at least 2 seeds per variant with some seed-to-seed variation to test it")
        m = int(rows["p_value"].notna().sum())
        holm_text = f", Holm-adjusted p = {r['p_holm']:.3g} over {m} comparisons" if m > 1 else ""
        verdict_text = (f"significant at α = {alpha:g} after Holm's correction" if r["p_holm"] < alpha
                        else f"not significant at α = {alpha:g}; the difference is within seed-to-seed noise")
        return f"Welch t-test p = {r['p_value']:.3g}{holm_text}: {verdict_text}"

    best = best_variant(summary, metric=metric)
    others = rows.drop(index=base_name)
    if best == base_name:
        if others.empty:
            return f"Only the baseline `{base_name}` was run: {metric} {mean_ci_text(base)}."
        closest = str(others[f"{metric}_mean"].idxmin())
        return (f"No variant beat the baseline `{base_name}` ({metric} {mean_ci_text(base)}, mean ± 95% CI); "
                f"the closest was `{closest}` (Δ = {rows.loc[closest, 'delta_vs_baseline']:+.4f}, {test_text(closest)}).")
    r = rows.loc[best]
    text = (f"Best variant: `{best}` with {metric} {mean_ci_text(r)} against the baseline's {mean_ci_text(base)} "
            f"(mean ± 95% CI); Δ = {r['delta_vs_baseline']:+.4f}, {test_text(best)}.")
    # efficiency of a gain that is not significant would rank noise, so only significant gains compete
    efficient = others[(others["significant"].fillna(False).astype(bool)) & (others["delta_vs_baseline"] < 0)]
    top = str(efficient["efficiency"].idxmax()) if not efficient.empty else best
    if top != best:
        e = rows.loc[top]
        text += (f" Most efficient: `{top}` ({e['efficiency']:.3g} nats/s: Δ = {e['delta_vs_baseline']:+.4f} "
                 f"in {e['elapsed_s_mean']:.1f} s of training).")
    return text
