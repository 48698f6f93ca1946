"""Statistics of a study: per-variant means with t-intervals, tests against the baseline (plus Holm-adjusted
p-values), the minimum detectable effect, the efficiency score, the results table and a computed conclusion.

The test is paired when every arm ran the baseline's seeds (seed s of every arm shares its data order and, where
the shapes allow, its initialisation): each arm's differences to the baseline seed by seed, with their variance
pooled over the arms, so k arms at n seeds test with (k)(n - 1) degrees of freedom instead of a two-sample test's
few. Arms without the baseline's seeds fall back to Welch's test.

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
EFFICIENCY_FORMULA = (
    "efficiency = (baseline mean val_loss - val_loss) / elapsed_s, in nats per device-second of training "
    "(each run trains on one device; evaluation time excluded)"
)

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
    df = (var_a + var_b) ** 2 / (var_a**2 / (len(a) - 1) + var_b**2 / (len(b) - 1))  # Welch-Satterthwaite
    p = 2 * stdtr(df, -abs(diff) / se)
    half = t_quantile(df) * se
    return float(p), float(diff - half), float(diff + half), "welch"


def paired_pooled(differences: dict[str, np.ndarray]) -> tuple[float, int]:
    """The variance of paired differences pooled over arms, and its degrees of freedom: sum over arms of the squared
    deviations of each arm's seed-by-seed differences from their own mean, over sum of (n_arm - 1)."""
    usable = [d for d in differences.values() if len(d) >= 2]
    df = sum(len(d) - 1 for d in usable)
    if df == 0:
        return math.nan, 0
    return float(sum(((d - d.mean()) ** 2).sum() for d in usable) / df), df


def paired_test(d: np.ndarray, pooled_var: float, df: int) -> tuple[float, float, float]:
    """(p, CI low, CI high) of mean(d) = 0 with the pooled variance of differences and its df."""
    from scipy.special import stdtr

    se = math.sqrt(pooled_var / len(d))
    t = float(d.mean()) / se
    half = float(t_quantile(df)) * se
    return float(2 * stdtr(df, -abs(t))), float(d.mean() - half), float(d.mean() + half)


def power(effect: float, sd: float, n: int, df: int, alpha: float) -> float:
    """The chance that a two-sided t-test at level alpha on n differences (sd of one difference, df degrees of
    freedom) rejects when the true mean difference is `effect` (the noncentral t's tails)."""
    from scipy.special import nctdtr, stdtrit

    critical = stdtrit(df, 1 - alpha / 2)
    shift = effect * math.sqrt(n) / sd
    return float(1 - nctdtr(df, shift, critical) + nctdtr(df, shift, -critical))


def minimum_detectable_effect(sd: float, n: int, df: int, alpha: float, target: float = 0.8) -> float:
    """The smallest true difference the test detects with probability `target` (80% power), in the metric's units:
    the root of power(effect) = target, by bisection (power grows with the effect)."""
    if not (sd > 0 and n >= 1 and df >= 1):
        return math.nan
    low, high = 0.0, sd
    while power(high, sd, n, df, alpha) < target:
        high *= 2
    for _ in range(80):
        mid = (low + high) / 2
        low, high = (mid, high) if power(mid, sd, n, df, alpha) < target else (low, mid)
    return high


def paired_difference(runs: pd.DataFrame, a: str, b: str, metric: str) -> dict[str, float]:
    """mean(a - b) over the seeds both variants ran, with its 95% t-interval and two-sided p (n - 1 df)."""
    left = runs[runs["variant"] == a].set_index("seed")[metric]
    right = runs[runs["variant"] == b].set_index("seed")[metric]
    d = (left - right.reindex(left.index)).dropna().to_numpy(dtype=float)
    n, mean, std, half = mean_ci(d)
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": n, "p_value": own_paired_p(d)}


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


TESTS = ("paired", "welch")  # the `test` of a testable arm; anything else says why it was not tested


def summarize(runs: pd.DataFrame, baseline: str, *, metric: str = "val_loss", alpha: float = 0.05) -> pd.DataFrame:
    """One row per variant (in first-seen order): n, mean/std/95% CI of `metric`, the difference to the baseline
    with its 95% CI and p-value (paired over seeds with the pooled variance where the arm ran the baseline's seeds,
    else Welch's), Holm-adjusted p, `significant` (Holm-adjusted p < alpha, so the chance of any false positive
    across the study's comparisons stays below alpha; <NA> when not testable, see `test`), `mde`: the smallest
    difference this arm's test detects with 80% power at Holm's strictest level (alpha / comparisons), mean
    costs and the efficiency score beside its inputs."""
    if baseline not in set(runs["variant"]):
        raise ValueError(
            f"baseline variant {baseline!r} has no finished runs; variants present: {sorted(set(runs['variant']))}"
        )
    base_rows = runs.loc[runs["variant"] == baseline]
    base_values = base_rows[metric]
    base_mean = float(base_values.mean())
    base_by_seed = (
        base_rows.dropna(subset=[metric]).set_index("seed")[metric] if "seed" in runs else pd.Series(dtype=float)
    )
    differences: dict[str, np.ndarray] = {}
    for variant, group in runs.groupby("variant", sort=False):
        arm = group.dropna(subset=[metric]).set_index("seed")[metric] if "seed" in group else pd.Series(dtype=float)
        if variant != baseline and len(arm) >= 2 and arm.index.isin(base_by_seed.index).all() and arm.index.is_unique:
            differences[variant] = (arm - base_by_seed.loc[arm.index]).to_numpy(dtype=float)
    pooled_var, pooled_df = paired_pooled(differences)
    scale = max([float(np.abs(d).max()) for d in differences.values()] or [0.0])
    if pooled_df and pooled_var <= (1e-9 * max(scale, 1e-12)) ** 2:  # differences constant up to rounding: no variance
        pooled_var = 0.0
    means = [
        c
        for c in ("val_ppl", "val_accuracy", "val_bpb", "confirm_bpb", "tokens_per_s", "peak_memory_mb")
        if c in runs and runs[c].notna().any()
    ]
    rows = []
    for variant, group in runs.groupby("variant", sort=False):
        n, mean, std, half = mean_ci(group[metric])
        if variant == baseline:
            p, lo, hi, test, delta, sd, tested_n, df = math.nan, math.nan, math.nan, "baseline", 0.0, math.nan, 0, 0
        else:
            p, lo, hi, test, delta, sd, tested_n, df = _arm_test(
                group[metric], base_values, differences.get(variant), pooled_var, pooled_df
            )
        elapsed = float(group["elapsed_s"].mean())
        rows.append(
            {
                "variant": variant,
                "n": n,
                f"{metric}_mean": mean,
                f"{metric}_std": std,
                f"{metric}_ci95": half,
                f"{metric}_ci_low": mean - half,
                f"{metric}_ci_high": mean + half,
                "delta_vs_baseline": delta,
                "delta_ci_low": lo,
                "delta_ci_high": hi,
                "p_value": p,
                "test": test,
                "df": df,
                "_sd": sd,
                "_n": tested_n,
                "num_params": int(group["num_params"].iloc[0]),
                "flops_per_token": float(group["flops_per_token"].iloc[0]),
                "elapsed_s_mean": elapsed,
                **{f"{col}_mean": float(group[col].mean()) for col in means},
                "efficiency": efficiency(base_mean, mean, elapsed),
            }
        )
    summary = pd.DataFrame(rows)
    summary["p_holm"] = holm(summary["p_value"])
    comparisons = max(1, int(summary["p_value"].notna().sum()))
    summary["mde"] = [
        minimum_detectable_effect(sd, n, max(df, 1), alpha / comparisons) if test in TESTS else math.nan
        for sd, n, df, test in zip(summary["_sd"], summary["_n"], summary["df"], summary["test"], strict=True)
    ]
    summary["significant"] = pd.array(
        [pd.NA if math.isnan(p) else bool(p < alpha) for p in summary["p_holm"]], dtype="boolean"
    )
    summary["p_arm"], summary["p_arm_holm"] = per_arm_p(summary, differences)
    summary["mde_arm"] = [
        own_mde(differences[v], alpha / comparisons) if t == "paired" else m
        for v, t, m in zip(summary["variant"], summary["test"], summary["mde"], strict=True)
    ]
    return summary.drop(columns=["_sd", "_n"])


def own_mde(d: np.ndarray, alpha: float) -> float:
    """The minimum detectable effect of a paired arm on its own differences alone (their sd, n - 1 df): what its own
    test (`own_paired_p`) detects with 80% power at `alpha`. With 3 seeds (2 df) it is several times the pooled one."""
    d = np.asarray(d, dtype=float)
    if len(d) < 2 or not d.var(ddof=1) > 0:
        return math.nan
    return minimum_detectable_effect(float(d.std(ddof=1)), len(d), len(d) - 1, alpha)


def own_paired_p(d: np.ndarray) -> float:
    """Two-sided p of mean(d) = 0 from the arm's own seed-by-seed differences alone (n - 1 df, nothing pooled):
    `paired_test` with d's own variance."""
    d = np.asarray(d, dtype=float)
    if len(d) < 2 or not d.var(ddof=1) > 0:
        return math.nan
    return paired_test(d, float(d.var(ddof=1)), len(d) - 1)[0]


def per_arm_p(summary: pd.DataFrame, differences: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Each arm's p without pooling, and Holm's over the same arms as the study's: a paired arm's t-test on its own
    differences (n - 1 df); a Welch arm's p as it is (Welch pools nothing); NaN for the baseline and untested arms."""
    p = np.array(
        [
            own_paired_p(differences[v]) if t == "paired" else (pv if t in TESTS else math.nan)
            for v, t, pv in zip(summary["variant"], summary["test"], summary["p_value"], strict=True)
        ],
        dtype=float,
    )
    return p, holm(p)


def pooling_dependent(summary: pd.DataFrame, alpha: float = 0.05) -> list[str]:
    """The paired arms whose verdict differs between the pooled test (`significant`) and their own test (its
    Holm-adjusted p < alpha, NaN: not significant)."""
    if "p_arm_holm" not in summary:
        return []
    rows = summary[summary["test"] == "paired"]
    return [
        str(v)
        for v, pooled, own in zip(rows["variant"], rows["significant"], rows["p_arm_holm"], strict=True)
        if (False if pd.isna(pooled) else bool(pooled)) != bool(own < alpha)
    ]


def _arm_test(values, base_values, d: np.ndarray | None, pooled_var: float, pooled_df: int):
    """One arm against the baseline: (p, CI low, CI high, test, difference, sd of one difference, n, df); paired with
    the pooled variance when the arm has its differences `d`, else Welch's, whose difference of means counts as one
    'pair' with the standard error as its sd (so the same power formula applies)."""
    if d is not None and pooled_var > 0:
        p, lo, hi = paired_test(d, pooled_var, pooled_df)
        return p, lo, hi, "paired", float(d.mean()), math.sqrt(pooled_var), len(d), pooled_df
    if d is not None and pooled_var == 0:
        return math.nan, math.nan, math.nan, "not testable: zero variance", float(d.mean()), math.nan, 0, 0
    p, lo, hi, test = welch(values, base_values)
    a, b = values.dropna(), base_values.dropna()
    delta = float(a.mean() - b.mean())
    if test != "welch":
        return p, lo, hi, test, delta, math.nan, 0, 0
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    df = int((va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)))
    return p, lo, hi, test, delta, math.sqrt(va + vb), 1, df


def study_mde(summary: pd.DataFrame) -> float:
    """The study's minimum detectable effect: the largest of its arms' (an effect this large is detected in any arm)."""
    values = summary["mde"].dropna() if "mde" in summary else pd.Series(dtype=float)
    return float(values.max()) if len(values) else math.nan


def format_overrides(overrides: dict[str, Any]) -> str:
    """{"model.ffn_mult": 8 / 3} -> "model.ffn_mult=2.667": numbers as `fmt` writes them, other values as in code."""
    return (
        ", ".join(
            f"{k}={fmt(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v}"
            for k, v in overrides.items()
        )
        or "—"
    )


def results_table(summary: pd.DataFrame, variants: dict[str, dict], *, metric: str = "val_loss") -> pd.DataFrame:
    """Write-up 001's results table, with seeds: variant, overrides, parameters, mean ± CI (and its bits per byte,
    where the runs measured them), Δ, p, verdict, efficiency."""
    bpb = bpb_column(metric)
    return pd.DataFrame(
        {
            "variant": summary["variant"],
            "overrides": [format_overrides(variants.get(v, {})) for v in summary["variant"]],
            "num_params": summary["num_params"],
            "n": summary["n"],
            f"{metric}_mean": summary[f"{metric}_mean"],
            f"{metric}_ci95": summary[f"{metric}_ci95"],
            **({bpb: summary[bpb]} if bpb in summary else {}),
            "delta_vs_baseline": summary["delta_vs_baseline"],
            "delta_ci_low": summary["delta_ci_low"],
            "delta_ci_high": summary["delta_ci_high"],
            "test": summary["test"],
            "mde": summary["mde"],
            "p_value": summary["p_value"],
            "p_holm": summary["p_holm"],
            **(
                {"p_arm": summary["p_arm"], "p_arm_holm": summary["p_arm_holm"]}
                if "p_arm" in summary and (summary["test"] == "paired").any()
                else {}
            ),
            "significant": [verdict(s, t) for s, t in zip(summary["significant"], summary["test"], strict=True)],
            "elapsed_s_mean": summary["elapsed_s_mean"],
            "efficiency": summary["efficiency"],
        }
    )


def verdict(significant, test: str) -> str:
    if test == "baseline":
        return "baseline"
    if test not in TESTS:
        return test
    return "yes" if bool(significant) else "no"


def results_markdown(table: pd.DataFrame, *, metric: str = "val_loss") -> str:
    """The results table as GitHub Markdown, with the metric as 'mean ± 95% CI'."""
    bpb = bpb_column(metric)
    bpb = bpb if bpb in table else None
    own = "p_arm" in table
    header = [
        "variant",
        "overrides",
        "params",
        "n",
        f"{metric} (mean ± 95% CI)",
        *(["bits/byte"] if bpb else []),
        "Δ vs baseline (95% CI)",
        "test",
        "p",
        "p (Holm)",
        *(["p (own seeds)", "p (own seeds, Holm)"] if own else []),
        "significant",
        "detectable Δ (80% power)",
        "train time (s)",
        "efficiency (nats/s)",
    ]
    rows = []
    for r in table.to_dict("records"):
        ci = r[f"{metric}_ci95"]
        loss = fmt(r[f"{metric}_mean"], decimals=4) + ("" if math.isnan(ci) else f" ± {fmt(ci, decimals=4)}")
        delta = "—" if r["significant"] == "baseline" else fmt(r["delta_vs_baseline"], decimals=4, sign=True)
        if r["significant"] != "baseline" and not math.isnan(r["delta_ci_low"]):
            low, high = fmt(r["delta_ci_low"], decimals=3, sign=True), fmt(r["delta_ci_high"], decimals=3, sign=True)
            delta += f" ({low} to {high})"
        rows.append(
            [
                f"`{r['variant']}`",
                r["overrides"],
                fmt(r["num_params"]),
                fmt(r["n"]),
                loss,
                *([fmt(r[bpb], decimals=4)] if bpb else []),
                delta,
                r["test"] if r["test"] in TESTS else "—",
                fmt(r["p_value"], digits=3),
                fmt(r["p_holm"], digits=3),
                *([fmt(r["p_arm"], digits=3), fmt(r["p_arm_holm"], digits=3)] if own else []),
                r["significant"],
                fmt(r["mde"], decimals=4),
                fmt(r["elapsed_s_mean"], decimals=1),
                fmt(r["efficiency"], digits=3),
            ]
        )
    notes = [
        f"Intervals: {CONFIDENCE:.0%} t-intervals over seeds; Δ's interval is its test's. Test: `paired` compares each "
        "arm with the baseline seed by seed (same data order, same initialisation where the shapes allow), with the "
        "variance of the differences pooled over the arms; `welch` (arms without the baseline's seeds) is Welch's "
        "two-sample t-test. Significant: p below 0.05 after Holm's correction for the number of variants compared.",
        "Detectable Δ: a true difference this large or larger would have been detected with 80% power at Holm's "
        "strictest level (0.05 / comparisons), from the measured seed-to-seed noise with the table's test; a 'no' "
        "with a detectable Δ of X says that a true difference of X or more would probably (80%) have been found and "
        "was not, not that there is no difference. On an arm's own seeds (its own variance, seeds - 1 degrees of "
        "freedom) the detectable Δ is larger: the findings give it where a verdict rests on it.",
        *(
            [
                "p (own seeds): the same paired test on the arm's own differences alone (seeds - 1 degrees of freedom, "
                "no variance pooled over the arms), with Holm's correction over the same arms; 'significant' is the "
                "pooled test's."
            ]
            if own
            else []
        ),
        f"{EFFICIENCY_FORMULA}.",
    ]
    return markdown_table(header, rows) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def arm_records(summary: pd.DataFrame, *, metric: str = "val_loss") -> list[dict[str, Any]]:
    """Each arm's mean ± 95% CI and its test against the baseline (Δ with its interval, test, df, p, Holm p,
    significant), as JSON-safe records: a missing value (NaN, <NA>) is None, numbers are Python's."""
    columns = [
        "variant",
        f"{metric}_mean",
        f"{metric}_ci95",
        "n",
        "delta_vs_baseline",
        "delta_ci_low",
        "delta_ci_high",
        "test",
        "df",
        "p_value",
        "p_holm",
        "significant",
    ]

    def clean(v: Any) -> Any:
        if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
            return None
        return v.item() if isinstance(v, np.generic) else v

    return [{c: clean(r[c]) for c in columns if c in summary} for r in summary.to_dict("records")]


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
        if r["test"] not in TESTS:
            return (
                f"{r['test'].replace('not testable: ', 'not testable (')}): "
                "run at least 2 seeds per variant with some seed-to-seed variation to test it"
            )
        m = int(rows["p_value"].notna().sum())
        holm_text = f", Holm-adjusted p = {r['p_holm']:.3g} over {m} comparisons" if m > 1 else ""
        interval = f"95% CI {r['delta_ci_low']:+.4f} to {r['delta_ci_high']:+.4f}"
        if r["p_holm"] < alpha:
            wide = abs(r["delta_ci_high"] - r["delta_ci_low"]) / 2 > abs(r["delta_vs_baseline"]) / 2
            verdict_text = f"significant at α = {alpha:g} after Holm's correction" + (
                f", though its interval ({interval}) is wide: the size of the effect is poorly known" if wide else ""
            )
        else:
            verdict_text = (
                f"not significant at α = {alpha:g} after Holm's correction ({interval}): a true difference of "
                f"{r['mde']:.3f} or more would have been detected with 80% power, and none was"
            )
        name = "paired t-test (variance pooled over arms)" if r["test"] == "paired" else "Welch t-test"
        return f"{name} p = {r['p_value']:.3g}{holm_text}: {verdict_text}"

    best = best_variant(summary, metric=metric)
    others = rows.drop(index=base_name)
    if best == base_name:
        if others.empty:
            return f"Only the baseline `{base_name}` was run: {metric} {mean_ci_text(base)}."
        closest = str(others[f"{metric}_mean"].idxmin())
        return (
            f"No variant beat the baseline `{base_name}` ({metric} {mean_ci_text(base)}, mean ± 95% CI); "
            f"the closest was `{closest}` (Δ = {rows.loc[closest, 'delta_vs_baseline']:+.4f}, {test_text(closest)})."
        )
    r = rows.loc[best]
    text = (
        f"Best variant: `{best}` with {metric} {mean_ci_text(r)} against the baseline's {mean_ci_text(base)} "
        f"(mean ± 95% CI); Δ = {r['delta_vs_baseline']:+.4f}, {test_text(best)}."
    )
    # efficiency of a gain that is not significant would rank noise, so only significant gains compete
    efficient = others[(others["significant"].fillna(False).astype(bool)) & (others["delta_vs_baseline"] < 0)]
    top = str(efficient["efficiency"].idxmax()) if not efficient.empty else best
    if top != best:
        e = rows.loc[top]
        text += (
            f" Most efficient: `{top}` ({e['efficiency']:.3g} nats/s: Δ = {e['delta_vs_baseline']:+.4f} "
            f"in {e['elapsed_s_mean']:.1f} s of training)."
        )
    return text
