"""Each stage's findings as Markdown, computed from its hand-off: what was asked, what was found
(numbers with units, seeds, intervals, significance), what it means for the next stage, and how it
compares with a reference. Nothing here is typed in: every number comes from the hand-off.

`show(markdown)` displays it in a notebook (rendered in the reader's report), or prints it elsewhere.
"""

from __future__ import annotations

import math
from typing import Any

from . import stats
from .profiles import NANOGPT_SHAKESPEARE_CHAR_VAL_LOSS
from .scaling import inside
from .tables import fmt, markdown_table


def show(markdown: str) -> None:
    """Markdown in a notebook, plain text elsewhere; nothing for an empty text."""
    if not markdown.strip():
        return
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display

        if get_ipython() is not None:
            display(Markdown(markdown))
            return
    except ImportError:
        pass
    print(markdown)


def _section(asked: str, found: list[str], means: str, reference: str | None = None) -> str:
    lines = [
        "### Findings",
        "",
        f"**Asked.** {asked}",
        "",
        "**Found.**",
        *[f"- {line}" for line in found],
        "",
        f"**For the next stage.** {means}",
    ]
    if reference:
        lines += ["", f"**Reference.** {reference}"]
    return "\n".join(lines)


SPLIT_KINDS = {
    "contiguous": "Contiguous splits (character fractions, in order)",
    "hash": "Splits by document (a seeded hash of each document's text)",
}


def data_prep(h: dict[str, Any]) -> str:
    total = h["train_tokens"] + h["val_tokens"] + h["test_tokens"]
    return _section(
        f"What does the `{h['corpus']}` corpus look like to the `{h['tokenizer']}` tokenizer, and how is it split?",
        [
            f"{fmt(total)} tokens over a vocabulary of {fmt(h['vocab_size'])} symbols, in {fmt(h['documents'])} "
            "documents "
            f"(median {fmt(h['median_document_tokens'])} tokens, longest {fmt(h['max_document_tokens'])}).",
            f"{SPLIT_KINDS[h.get('split_by', 'contiguous')]}: {fmt(h['train_tokens'])} train / {fmt(h['val_tokens'])} "
            "validation / "
            f"{fmt(h['test_tokens'])} test tokens "
            f"({100 * h['train_tokens'] / total:.1f}% / {100 * h['val_tokens'] / total:.1f}% / "
            f"{100 * h['test_tokens'] / total:.1f}%).",
            f"Packing documents one per window of 256 tokens would waste {100 * h['padding_share_at_block_256']:.0f}% "
            "of each batch "
            "on padding, so training samples windows from the token stream instead.",
        ],
        "Every later stage trains on these token files; validation is halved into a selection and a confirmation half, "
        "and the test split is kept for 05 alone.",
    )


def _started_from(h: dict[str, Any]) -> list[str]:
    """The bullet a fine-tuning run's report opens with: which weights it started from, and their loss before
    training."""
    if not h.get("init_from"):
        return []
    return [
        f"Started from the pretrained weights of `{h['init_from']}`, not a random init: validation loss "
        f"{fmt(h['initial_val_loss'], 'nats/token')} before the first step (step 0), "
        f"{fmt(h['best_val_loss'], 'nats/token')} "
        f"at best, {fmt(h['initial_val_loss'] - h['best_val_loss'], 'nats/token')} gained by fine-tuning."
    ]


def references_line(refs: dict[str, Any] | None) -> str:
    """'Count models fitted on the training split score ... on the same windows', or '' without references."""
    if not refs:
        return ""
    from .references import describe

    return f"Count models fitted on the training split (interpolated Kneser-Ney) score {describe(refs)}."


def regime_line(r: dict[str, Any] | None, what: str = "The baseline") -> str:
    """Where the baseline stands against the count models, in one sentence computed from `references.regime`."""
    if not r:
        return ""
    place = (
        f"{fmt(r['below_bigram'], 'nats/token')} below the bigram"
        if r["below_bigram"] > 0
        else f"{fmt(-r['below_bigram'], 'nats/token')} above the bigram"
    )
    return f"{what} ends {place} ({r['verdict']}; the profiles are sized for a margin of {fmt(r['margin'])})."


def _lr_sweep_line(h: dict[str, Any]) -> list[str]:
    sweep = h.get("lr_sweep")
    if not sweep:
        return [f"Learning rate {fmt(h['train']['lr'])}, as given (no sweep)."]
    pairs = ", ".join(
        f"{fmt(lr)} → {fmt(loss, decimals=3)}" for lr, loss in zip(sweep["lrs"], sweep["losses"], strict=True)
    )
    edge = (
        " The best still lies at the edge of the grid after extending it "
        f"{sweep['extended']} times: the optimum may lie beyond, so this baseline's LR is a bound, not an optimum."
        if sweep["best_at_edge"]
        else (
            f" The grid was extended {sweep['extended']} times past its edge to bracket the optimum."
            if sweep["extended"]
            else ""
        )
    )
    return [
        f"LR sweep (one seed each, {fmt(sweep['tokens'])} tokens, selection windows): {pairs}; the baseline trains at "
        f"**{fmt(sweep['best_lr'])}**.{edge}"
    ]


def baseline(h: dict[str, Any]) -> str:
    model = f"the pretrained `{h['init_from']}`" if h.get("init_from") else "write-up 001's MiniGPT"
    split = h.get("eval_split", "val")
    return _section(
        f"How far does {model} ({fmt(h['num_params'])} parameters) get in {fmt(h['tokens'])} tokens "
        f"({fmt(h['steps'])} steps, `{h['profile']}` profile) at its best learning rate?",
        [
            *_started_from(h),
            *_lr_sweep_line(h),
            f"Validation loss on the {split} windows {fmt(h['val_loss'], 'nats/token')} (perplexity {fmt(h['val_ppl'])}"
            + (f"; {fmt(h['val_bpb'])} bits per byte" if h.get("val_bpb") is not None else "")
            + f"); next-token accuracy {fmt(h['val_accuracy'], '%')}"
            + (
                " (a selection number: these windows chose the LR)."
                if h.get("lr_sweep") and split == "selection"
                else "."
            ),
            *[line for line in (references_line(h.get("references")), regime_line(h.get("regime"))) if line],
            f"Throughput {fmt(h['tokens_per_s'], 'tokens/s')}; {fmt(h['elapsed_s'], 's')} of training.",
        ],
        "03 compares every ablation against this configuration, at this token budget and learning rate, over paired "
        "seeds.",
        "A uniform guess over the vocabulary scores ln(vocabulary); nanoGPT's much larger shakespeare_char model "
        "reaches "
        f"{NANOGPT_SHAKESPEARE_CHAR_VAL_LOSS} (05 compares on its split).",
    )


def _bits_per_byte(h: dict[str, Any], metric: str) -> str:
    """'; 1.23 bits per byte' for the hand-off's metric, where the runs measured it (a tokenizer-free scale)."""
    value = h.get(stats.bpb_column(metric) or "")
    return f"; {fmt(value)} bits per byte" if value is not None else ""


def _baseline_lr_edge(check: dict[str, Any]) -> dict[str, Any] | None:
    """Where the LR check put the baseline's best LR, when not at 1x: its multiple, how much lower it scored than at 1x
    (the check's seed), whether that multiple is an end of the check, and the other arms best at the same end."""
    table, checked = check.get("table") or [], check.get("multipliers") or []
    base = next((r for r in table if r["variant"] == "baseline"), None) or (table[0] if table else None)
    if not checked or base is None or base["best_multiplier"] == 1.0:
        return None
    m = base["best_multiplier"]
    ends = (min(checked + [1.0]), max(checked + [1.0]))
    return {
        "variant": base["variant"],
        "multiplier": m,
        "gain": base["x1"] - base[f"x{m:g}"],
        "side": "below" if m > 1 else "above",
        "edge": m in ends,
        "also": [r["variant"] for r in table if r is not base and r["best_multiplier"] == m],
    }


def lr_check_clause(check: dict[str, Any] | None) -> str:
    """A short clause for 03's conclusion when the LR check finds the shared LR off the baseline's optimum, else ''."""
    edge = _baseline_lr_edge(check or {})
    if edge is None:
        return ""
    return (
        f" LR check (seed {check.get('seed', 0)}): the baseline scored {fmt(edge['gain'], decimals=4)} lower at "
        f"{edge['multiplier']:g}x its LR than at 1x, so 02's LR is {edge['side']} the baseline's optimum at this "
        "budget and every effect is measured there."
    )


def _lr_edge_line(check: dict[str, Any]) -> str:
    """The LR check's baseline off its optimum, in a sentence with what it means for every effect of the study."""
    edge = _baseline_lr_edge(check)
    if edge is None:
        return ""
    others = len(check["table"]) - 1
    also = ", ".join(f"`{v}`" for v in edge["also"])
    where = f"{edge['multiplier']:g}x" + (", the check's edge" if edge["edge"] else "")
    return (
        f" At {edge['multiplier']:g}x its LR, the baseline scored {fmt(edge['gain'], decimals=4)} nats lower than at "
        f"1x (seed {check.get('seed', 0)}): 02's LR is {edge['side']} the baseline's optimum at this budget"
        + (" (the optimum may lie beyond the check's edge)" if edge["edge"] else "")
        + "; every effect above is measured at 02's LR, "
        + (
            f"and {len(edge['also'])} of the {others} other checked arms ({also}) were also best at {where}."
            if edge["also"]
            else f"and none of the {others} other checked arms was best at {edge['multiplier']:g}x."
        )
    )


def _lr_check_lines(h: dict[str, Any]) -> list[str]:
    """03's LR check in a sentence: which arms' verdicts flip with the LR (like for like, on the check's one seed),
    where the baseline's own optimum lies, and which arms are best at an end of the check."""
    check = h.get("lr_check") or {}
    flips, checked, table = check.get("flips") or [], check.get("multipliers") or [], check.get("table") or []
    if not checked:
        return []
    seed = check.get("seed", 0)
    edge = [r["variant"] for r in table if r["best_multiplier"] in (min(checked + [1.0]), max(checked + [1.0]))]
    verdict = (
        f"compared with the baseline on seed {seed} at the same multiple of the LR, the ranking against the baseline "
        f"flips for {', '.join(f'`{v}`' for v in flips)}: its verdict at the shared LR is an LR artefact."
        if flips
        else f"compared with the baseline on seed {seed} at 1x and best against best, no arm's ranking against the "
        "baseline flips with the LR."
    )
    rows = {r["variant"]: r for r in table}
    shrunk = [v for v in check.get("lr_dependent") or [] if v not in flips and v in rows]
    if shrunk:
        verdict += (
            " Though the sign holds, the effect shrinks by more than the study's detectable "
            f"{fmt(check.get('mde'), decimals=3)} nats once each runs at its best LR for "
            + ", ".join(
                f"`{v}` ({fmt(rows[v]['delta_x1'], decimals=3, sign=True)} at 1x, "
                f"{fmt(rows[v]['delta_best_vs_best'], decimals=3, sign=True)} best against best)"
                for v in shrunk
            )
            + f" (seed {seed}): part of each difference at the shared LR is the LR's doing, so the verdict there "
            "overstates how the arms compare when each runs at its own best LR."
        )
    at_edge = (
        f" {len(edge)} of {len(table)} checked arms ({', '.join(f'`{v}`' for v in edge)}) are best at an end of the "
        "multiples tried, so their own optimum may lie beyond it: 'best against best' compares them at the grid's "
        "edge, and a one-seed difference smaller than the study's detectable effect says nothing."
        if edge
        else ""
    )
    return [
        f"LR check (each arm at {', '.join(f'{m:g}x' for m in checked)} its LR, seed {seed}): "
        + verdict
        + _lr_edge_line(check)
        + at_edge
    ]


def _own_mde_clause(summary, arms: list[str]) -> str:
    """The detectable effect of each arm on its own seeds (its own variance, n - 1 df), for the arms named: what a
    reader needs where the pooled variance is not trusted (every verdict the own-seed test would give rests on it)."""
    if "mde_arm" not in summary:
        return ""
    rows = summary.set_index("variant")
    own = [
        f"`{v}` {fmt(rows.loc[v, 'mde_arm'], decimals=3)}"
        for v in arms
        if v in rows.index and rows.loc[v, "test"] == "paired" and rows.loc[v, "mde_arm"] == rows.loc[v, "mde_arm"]
    ]
    return (
        " On each arm's own seeds alone (its own variance, seeds - 1 degrees of freedom, no pooling) the detectable "
        f"difference is larger: {', '.join(own)} nats."
        if own
        else ""
    )


def _pooling_line(summary) -> list[str]:
    """Which arms' significance depends on pooling the variance over the arms: each arm's own paired test beside it."""
    if "p_arm_holm" not in summary or not (summary["test"] == "paired").any():
        return []
    rows = summary[summary["test"] == "paired"]
    depends = set(stats.pooling_dependent(summary))
    listed = "; ".join(
        f"`{v}` (p = {fmt(r['p_value'], digits=3)} pooled, {fmt(r['p_arm'], digits=3)} on its own seeds; Holm "
        f"{fmt(r['p_holm'], digits=3)} and {fmt(r['p_arm_holm'], digits=3)}): significant only "
        + ("with the pooled variance" if r["significant"] is True else "on its own seeds")
        + (
            f"; on its own seeds a true difference of {fmt(r['mde_arm'], decimals=3)} nats or more would have been "
            f"detected with 80% power (pooled: {fmt(r['mde'], decimals=3)})"
            if r.get("mde_arm") == r.get("mde_arm") and r.get("mde_arm") is not None
            else ""
        )
        for v, r in rows.set_index("variant").iterrows()
        if v in depends
    )
    return [
        f"Without pooling the variance over the arms (each arm's paired t-test on its own {int(rows['n'].max()) - 1} "
        "degrees of freedom, Holm over the same arms; the table's 'p (own seeds)'): "
        + (
            f"the verdict changes for {listed}. Its significance depends on the pooling."
            if len(depends) == 1
            else f"the verdict changes for {listed}. Their significance depends on the pooling."
            if depends
            else "every arm keeps its verdict; no significance depends on the pooling."
        )
    ]


def ablations(h: dict[str, Any], summary) -> str:
    """`summary`: the study's per-variant summary (stats.summarize), for the verdicts of every arm."""
    metric = h["metric"]
    rows = summary.set_index("variant")
    tested = rows[rows["test"].isin(stats.TESTS)]
    significant = tested[tested["significant"].fillna(False).astype(bool)]
    better = [
        f"`{v}` ({fmt(r['delta_vs_baseline'], decimals=3, sign=True)}, 95% CI "
        f"{fmt(r['delta_ci_low'], decimals=3, sign=True)} "
        f"to {fmt(r['delta_ci_high'], decimals=3, sign=True)})"
        for v, r in significant.iterrows()
        if r["delta_vs_baseline"] < 0
    ]
    worse = [
        f"`{v}` ({fmt(r['delta_vs_baseline'], decimals=3, sign=True)})"
        for v, r in significant.iterrows()
        if r["delta_vs_baseline"] > 0
    ]
    undetected = [f"`{v}`" for v in tested.index if v not in significant.index]
    same_budget = (
        "02's baseline budget"
        if h.get("baseline_tokens") == h["tokens"]
        else f"not 02's budget of {fmt(h.get('baseline_tokens'))} tokens: `steps` was given"
    )
    regime = h.get("regime") or {}
    found = [
        h["conclusion"],
        *[line for line in (references_line(h.get("references")), regime_line(regime)) if line],
        "Significantly better than the baseline after Holm's correction: "
        + (", ".join(better) or "none")
        + "."
        + (" Significantly worse: " + ", ".join(worse) + "." if worse else ""),
        (
            f"Not significant: {', '.join(undetected)}. With {h['n']} paired seeds and the variance pooled over the "
            f"arms, a true difference of {fmt(h['mde'], decimals=3)} nats or more would have been detected with 80% "
            "power at Holm's strictest level, and none was; a smaller one is not ruled out."
            + _own_mde_clause(summary, [v for v in tested.index if v not in significant.index])
            if undetected and h.get("mde") == h.get("mde")
            else "Every tested arm differs significantly; the study's minimum detectable effect is "
            f"{fmt(h.get('mde'), decimals=3)}."
        ),
    ]
    found += _pooling_line(summary)
    found += _lr_check_lines(h)
    if h.get("lr_given") is not None:
        found.append(
            f"Every run trained at the given LR {fmt(h['lr_given'])} except the LR arms, which keep their own "
            "(write-up 001's `lr_1e-3` still runs at 1e-3)."
        )
    if h.get("arms_left_out"):
        left_out = ", ".join(f"`{v}`" for v in h["arms_left_out"])
        found.append(f"Left out of this profile to fit its budget at {h['n']} seeds (`skip_arms`): {left_out}.")
    handed = (
        f"`{h['variant']}`: the study is too short to compare (its baseline does not beat the bigram), so it chooses "
        "nothing and hands on the baseline"
        if not regime.get("comparable", True)
        else f"`{h['variant']}`" + (" (no arm is significantly better)" if h["variant"] == "baseline" else "")
    )
    found.append(
        f"Handed on: {handed} ({fmt(h[metric + '_mean'], 'nats/token')} ± {fmt(h[metric + '_ci95'])}"
        + _bits_per_byte(h, metric)
        + ")."
    )
    return _section(
        f"Which of {len(summary) - 1} arms beats the baseline at one budget of {fmt(h['tokens'])} tokens "
        f"({same_budget}), each "
        f"over {h['n']} paired seeds, scored on the same {fmt(h['eval_tokens'])} {h['eval_split']} tokens?",
        found,
        f"04 tunes `{h['variant']}`'s hyper-parameters at the same {fmt(h['tokens'])} tokens. These are selection "
        "numbers: they "
        "chose the arm, so they are optimistic; 04's confirmation is held out.",
    )


def tuning_search(study, edges: list[dict[str, Any]], min_trials_for_importance: int) -> str:
    """What the search's figures can and cannot show: the importance plot's trial count, and best values at an edge."""
    import optuna

    finished = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    lines = [f"{finished} of {len(study.trials)} trials finished their budget (the rest were pruned or failed)."]
    lag = study.user_attrs.get("history_lag")
    if lag:
        lines.append(
            f"Trial n was drawn and judged on trials 0 to n-{lag + 1} only, waiting for them to finish: trials ran in "
            "parallel, and this way which one finished first changed no draw and no pruning, so the search repeats."
        )
    if finished < min_trials_for_importance:
        lines.append(
            f"No importance plot: it would be fitted on {finished} finished trials, and below "
            f"{min_trials_for_importance} its bars are noise."
        )
    for e in edges:
        lines.append(
            f"The best `{e['name']}` ({fmt(e['value'])}) lies at the {e['side']} edge of its range {fmt(e['low'])}-"
            f"{fmt(e['high'])}: {next_search(e, 'the optimum may lie beyond it')}."
        )
    if not edges:
        lines.append("No best value lies within 5% of an end of its range.")
    return "\n".join(f"- {line}" for line in lines)


def _fmt_near_one(x: float) -> str:
    """`x` with enough digits that a value just below 1 does not read as 1."""
    return fmt(x, digits=max(4, math.ceil(-math.log10(1 - x)) + 2) if 0 < x < 1 else 4)


def next_search(e: dict[str, Any], beyond: str) -> str:
    """'`beyond`; search a-b next' for a flag of `tuning.edge_flags`, kept to legal values: a range inside (0, 1)
    whose widened end would reach 1 widens on the scale of 1 - value instead (its end to 1 - (1 - high) / 10), a
    range that starts at 0 or above does not widen below 0 (starting at 0, it is at its bound: nothing to search)."""
    low, high, next_low, next_high = e["low"], e["high"], e["next_low"], e["next_high"]
    notes = []
    if low >= 0 and next_low < 0:
        if low == 0:
            return f"0 is its bound, so no value lies beyond this edge; the best may be {fmt(0)} itself"
        next_low = 0.0
        notes.append("not below 0, its bound")
    if 0 <= low and high < 1 <= next_high:
        next_high = 1 - (1 - high) / 10
        notes.append(
            f"widened on the scale of 1 - `{e['name']}`, which must stay below 1: to 1 - (1 - {_fmt_near_one(high)})/10"
        )
    span = f"{fmt(next_low)}-{_fmt_near_one(next_high)}"
    return f"{beyond}; search {span} next" + (f" ({'; '.join(notes)})" if notes else "")


def untuned_label(base_variant: str | None) -> str:
    """What 04 calls its untuned arm (its study's 'baseline'): the config 03 handed on, not 02's baseline."""
    return f"untuned ({_untuned_source(base_variant)})"


def _untuned_source(base_variant: str | None) -> str:
    return f"03's {base_variant}" if base_variant else "the profile's baseline: 03 has not run"


def confirmation_caption(arms: list[dict[str, Any]], base_variant: str | None) -> str:
    """What the confirmation table's Δ interval, p and 'significant' are, from its arms' records
    (`stats.arm_records`)."""
    tested = [a for a in arms if a.get("p_value") is not None]
    if not tested:
        return f"Each arm against the untuned config ({_untuned_source(base_variant)}); no arm could be tested."
    test = (
        f"paired over seeds, with the variance of the differences pooled over the {len(tested)} arms' seeds "
        f"({tested[0]['df']} degrees of freedom)"
        if tested[0]["test"] == "paired"
        else "Welch's two-sample t-test"
    )
    return (
        f"Each arm against the untuned config ({_untuned_source(base_variant)}) on the confirmation half. "
        f"Δ's 95% interval and p: {test}; "
        f"significant: p after Holm's correction over {len(tested)} comparisons below 0.05. The findings below also "
        "give each difference paired over its own seeds alone, uncorrected."
    )


def _two_tests(h: dict[str, Any]) -> list[str]:
    """Per arm, whether the table's test (pooled over the arms, Holm-corrected) and the arm's own paired interval
    agree on significance; computed from the hand-off's `confirmation_arms` and `gains`."""
    arms = {a["variant"]: a for a in h.get("confirmation_arms") or [] if a.get("significant") is not None}
    lines = []
    for key, arm in (("lr", "lr_only"), ("total", "tuned")):
        g, a = (h.get("gains") or {}).get(key), arms.get(arm)
        if not g or not a or g.get("ci_low") is None:
            continue
        alone, pooled = not g["ci_low"] <= 0 <= g["ci_high"], bool(a["significant"])
        side = "better" if a["delta_vs_baseline"] < 0 else "worse"
        table = (
            f"the table's test (pooled over the arms' seeds, {a['df']} degrees of freedom, Holm-corrected) calls "
            f"`{arm}` {'significantly ' + side if pooled else 'not significant'} (95% CI "
            f"{fmt(a['delta_ci_low'], decimals=3, sign=True)} to {fmt(a['delta_ci_high'], decimals=3, sign=True)}, "
            f"Holm p = {fmt(a['p_holm'], digits=3)})"
        )
        own = (
            f"its own seeds' paired interval ({g['n'] - 1} degrees of freedom, uncorrected) "
            f"{'agrees' if alone == pooled else 'does not' if pooled else 'does call it significant'}: "
            f"{fmt(g['mean'], decimals=3, sign=True)}, 95% CI {fmt(g['ci_low'], decimals=3, sign=True)} to "
            f"{fmt(g['ci_high'], decimals=3, sign=True)}, p = {fmt(g['p_value'], digits=3)}"
        )
        verb = "agree" if alone == pooled else "disagree"
        follows = "" if alone == pooled else " 05's recipe follows the table's test."
        lines.append(f"The two tests {verb} on `{arm}` against the untuned config: {table}; {own}.{follows}")
    return lines


def _gain(g: dict[str, Any] | None) -> str:
    if not g:
        return "not measured"
    low, high = fmt(g["ci_low"], decimals=3, sign=True), fmt(g["ci_high"], decimals=3, sign=True)
    return f"{fmt(g['mean'], decimals=3, sign=True)} (95% CI {low} to {high})"


def tuning(h: dict[str, Any], trials_left_out: int) -> str:
    bpb = h.get(stats.bpb_column(h["metric"]) or "")
    gains = h.get("gains") or {}
    budget = h.get("ablation_tokens")
    same = (
        f"exactly 03's {fmt(budget)} tokens"
        if h.get("trial_tokens") == [budget]
        else f"{', '.join(fmt(t) for t in h.get('trial_tokens') or [])} tokens, against 03's {fmt(budget)}"
        if budget
        else f"{fmt(h.get('tokens'))} tokens (03 has not run)"
    )
    optimism = h.get("optimism") or {}
    found = [
        f"{h['trials']} trials (the {trials_left_out} trials of earlier code in the same storage are left out); each "
        "that "
        f"finished trained {same}. The best, trial {h['best_trial']}, scored "
        f"{fmt(h['best_trial_selection_loss'], 'nats/token')} "
        "on the selection tokens that chose it.",
        f"{h.get('finished_trials')} trials finished their budget; {h.get('finished_trials_below_bigram')} of them "
        "beat the bigram "
        f"on their windows ({fmt((h.get('selection_references') or {}).get('bigram'), decimals=3)} nats/token)."
        if h.get("selection_references")
        else "",
        "Confirmation (held out; its baseline is the untuned config, "
        f"{_untuned_source(h.get('base_variant'))}): {h['conclusion']}"
        + (f" `{h['variant']}`: {fmt(bpb)} bits per byte." if bpb is not None else ""),
        references_line(h.get("references")),
        regime_line(h.get("regime"), "The untuned config"),
        "What tuning bought on the confirmation half, each difference paired over seeds, this pair of arms alone "
        f"(not the table's test): {_gain(gains.get('total'))} nats/token in all; the LR alone "
        f"{_gain(gains.get('lr'))}, the other values on top of it {_gain(gains.get('rest'))}.",
        *_two_tests(h),
        "Tuned overrides: " + ", ".join(f"`{k}` = {fmt(v)}" for k, v in h["overrides_tuned"].items()) + ".",
    ]
    for e in h.get("edges") or []:
        found.append(
            f"`{e['name']}` = {fmt(e['value'])} lies at the {e['side']} edge of {fmt(e['low'])}-{fmt(e['high'])}: "
            f"{next_search(e, 'not bracketed')}."
        )
    reference = (
        f"The optimism of choosing, on the windows that chose: the best trial scored "
        f"{fmt(optimism['best_trial_value'], decimals=4)}, the same config on {optimism['n']} new seeds "
        f"{fmt(optimism['same_config_new_seeds'], decimals=4)} on the same selection windows: "
        f"{fmt(optimism['optimism'], decimals=4, sign=True)} nats/token."
        if optimism
        else None
    )
    return _section(
        "How much do tuned hyper-parameters gain on 03's choice at 03's budget, confirmed on seeds "
        f"{h['confirm_seeds']} and "
        "tokens the search never saw?",
        [line for line in found if line],
        (
            "05 trains the final architecture with these hyper-parameters."
            if h["variant"] == "tuned"
            else "05 trains the final architecture with the untuned values at the tuned LR: the LR alone is "
            "significantly better, the "
            "tuned values are not."
            if h["variant"] == "lr_only"
            else "05 trains the final architecture with 03's choice as it was (untuned): no tuned arm beat it "
            "significantly on the "
            "held-out confirmation, so a change of recipe would rest on a gain nobody could detect."
        ),
        reference,
    )


def _target(h: dict[str, Any]) -> str:
    """The target, met or not by the mean, and whether the seeds establish it (their interval against it)."""
    if h.get("target_val_loss") is None:
        return (
            "no target: the profile's target was set on tiny Shakespeare at one character a token, not this corpus"
            if h.get("shakespeare_char") is False
            else "no target for this profile"
        )
    said = f"the `{h['profile']}` profile's target of {fmt(h['target_val_loss'])} is " + (
        "met" if h["meets_target"] else "not met"
    )
    per_seed, verdict = h.get("meets_target_per_seed"), h.get("target_verdict")
    if not per_seed or len(per_seed) < 2 or verdict is None:
        return said
    return (
        f"{said} by the mean ({_seeds_on_target(h)}); the mean's 95% interval against the target: **{verdict}** with "
        f"{len(per_seed)} seeds"
    )


def _seeds_on_target(h: dict[str, Any]) -> str:
    """'seed 1 misses it' (the seeds whose own loss misses the target) or 'every seed meets it'."""
    missed = [str(r["seed"]) for r, ok in zip(h["per_seed"], h["meets_target_per_seed"], strict=True) if not ok]
    return f"seed {', '.join(missed)} misses it" if missed else "every seed meets it"


def _model_changes(changes: dict[str, Any] | None, evidence: dict[str, str] | None = None) -> list[str]:
    """The model fields 05 changed from the config 03 and 04 compared and tuned, each with the lab's evidence for it
    (`profiles.change_evidence`): 03's arms were each one change at 03's size, never this combination."""
    if not changes:
        return []
    evidence = evidence or {}
    listed = "; ".join(
        f"`{k}` {fmt(then)} → {fmt(now)}" + (f" — {evidence[k]}" if evidence.get(k) else "")
        for k, (then, now) in changes.items()
    )
    unsupported = [k for k in changes if evidence.get(k, "").startswith("the profile's final design only")]
    return [
        f"The final model differs from the config 03 and 04 compared and tuned in {len(changes)} fields: {listed}. "
        + (
            f"{len(unsupported)} of them ({', '.join(f'`{k}`' for k in unsupported)}) no run of the lab compared. "
            if unsupported
            else ""
        )
        + "03 measured each change alone at its own size, never this combination, so the tuned values are carried to "
        "a model they were not tuned on."
    ]


def final(h: dict[str, Any]) -> str:
    target = _target(h)
    return _section(
        f"How good is the final model ({fmt(h['num_params'])} parameters, {fmt(h['tokens'])} tokens) on text nothing "
        "was chosen on?",
        [
            *_started_from(h),
            f"Test loss **{fmt(h['test_loss'], 'nats/token')}**{_over_seeds(h, 'test_loss')} (perplexity "
            f"{fmt(h['test_ppl'])}"
            + (
                f"; {fmt(h['test_bpb'])} bits per byte, the scale on which any tokenizer compares"
                if h.get("test_bpb") is not None
                else ""
            )
            + f"), next-token accuracy {fmt(h['test_accuracy'], '%')}: the held-out headline.",
            *(
                [
                    references_line(h["references"]),
                    f"Beats the 5-gram count model on test: **{fmt(h['beats_5gram_on_test'])}** "
                    f"({fmt(h['test_loss'] - h['references']['5-gram'], decimals=3, sign=True)} nats/token against "
                    "it).",
                ]
                if h.get("references")
                else []
            ),
            "Loss on the last 10% of the corpus (nanoGPT's split, which includes the validation tokens that chose "
            "this config): "
            f"{fmt(h['last10pct_val_loss'], 'nats/token')}{_over_seeds(h, 'last10pct_val_loss')}"
            + (
                f" (5-gram count model: {fmt(h['last10pct_references']['5-gram'], decimals=3)})"
                if h.get("last10pct_references")
                else ""
            )
            + f"; {target}.",
            f"Throughput {fmt(h['tokens_per_s'], 'tokens/s')} on {h['device']}, {fmt(h['elapsed_s'], 's')} of "
            "training.",
            *_model_changes(h.get("model_vs_04"), h.get("model_vs_04_evidence")),
            *_regression_line(h.get("regression"), h.get("profile")),
        ],
        "The saved model (weights, config, tokenizer, manifest) is what `labutils.load_model` and `python -m "
        "labutils.generate` load. "
        + (
            "Its weights are committed with the results, so a fresh clone can chat with it at once: "
            f"`python -m labutils.generate --checkpoint {h['model_dir']}`."
            if h.get("weights_committed")
            else "Its weights are too large to commit; `FORCE=1 make pipeline` rebuilds them in a fresh clone."
        ),
        (
            f"nanoGPT's shakespeare_char (10.7M parameters, a GPU): {NANOGPT_SHAKESPEARE_CHAR_VAL_LOSS} on the last "
            "10%; this run is "
            f"{fmt(h['last10pct_val_loss'] - NANOGPT_SHAKESPEARE_CHAR_VAL_LOSS, 'nats/token')} above it."
            if h.get("nanogpt_val_loss") is not None or "shakespeare_char" not in h
            else "nanoGPT's published figure is for tiny Shakespeare at one character a token, not this corpus: its "
            "references here are the count models above, fitted and scored on this corpus's own splits."
        ),
    )


def _over_seeds(h: dict[str, Any], key: str) -> str:
    """', the mean of 2 seeds (95% interval a to b)' for a multi-seed headline; '' for one run."""
    if h.get("n_seeds", 1) < 2:
        return ""
    low, high = h[f"{key}_ci95"]
    how = f"; {h['interval']}" if h.get("interval") else ""
    own = h.get(f"{key}_ci95_own_seeds")
    alone = f"; the seeds alone: {fmt(own[0], decimals=3)} to {fmt(own[1], decimals=3)}" if own else ""
    return (
        f", the mean of {h['n_seeds']} seeds (95% interval {fmt(low, decimals=3)} to {fmt(high, decimals=3)}"
        f"{how}{alone})"
    )


def _regression_line(r: dict[str, Any] | None, profile: str | None) -> list[str]:
    """A headline worse than the best archived one of its profile, said as a regression with what differs."""
    if not r:
        return []
    differs = (
        "; ".join(f"`{k}` {fmt(then)} → {fmt(now)}" for k, (then, now) in r["differs"].items())
        or "none of the recorded fields"
    )
    return [
        f"**Regression:** the test loss is {fmt(r['worse_by'], decimals=3)} nats/token worse than the best archived "
        f"`{profile}` "
        f"run ({fmt(r['best'], decimals=4)}, `{r['archived']}`), a regression until explained. What differs from it: "
        f"{differs}." + _regression_causes(r["differs"]) + _regression_noise(r.get("paired"))
    ]


def _regression_noise(paired: dict[str, Any] | None) -> str:
    """Whether seed noise alone could give the regression: the seeds both runs trained, difference by difference."""
    if not paired:
        return " The two runs share fewer than 2 seeds, so seed noise cannot be told apart from the change."
    low, high = paired["ci95"]
    each = ", ".join(f"{d:+.3f}" for d in paired["differences"])
    seeds = ", ".join(str(s) for s in paired["seeds"])
    verdict = (
        "so seed noise alone could give it: the runs do not tell the two recipes apart, and more seeds would"
        if low <= 0
        else "so it is more than seed noise"
    )
    return (
        f" Seed for seed (seeds {seeds}), now minus then: {each}; mean {paired['mean']:+.3f}, 95% CI {low:+.3f} to "
        f"{high:+.3f} ({len(paired['differences']) - 1} df): the interval "
        f"{'includes' if low <= 0 else 'lies above'} 0, {verdict}."
    )


def _regression_causes(differs: dict[str, Any]) -> str:
    """Why the headline may have moved, read off what differs: fewer tokens, a smaller model, other hyper-parameters."""
    causes = []
    tokens, params = differs.get("tokens"), differs.get("num_params")
    if tokens and tokens[1] < tokens[0]:
        causes.append(
            f"each seed trained on {tokens[0] / tokens[1]:.2g}x fewer tokens (05's budget is fixed in FLOPs, and "
            "its sizing sweep now takes part of the stage's time)"
        )
    if params and params[1] < params[0]:
        causes.append(f"the model is {params[0] / params[1]:.2g}x smaller (the size the sweep picked for the budget)")
    tuned = [k for k in differs if k.startswith("train.") or k == "model.dropout"]
    if tuned:
        causes.append(f"other hyper-parameters ({', '.join(f'`{k}`' for k in tuned)}: 04's tuning and the LR rule)")
    return (" Likely why: " + "; ".join(causes) + ".") if causes else ""


def _past_runs(past: dict[str, Any] | None) -> list[str]:
    """The law against the lab's own final runs of this profile: how many it predicts inside its interval, and how many
    it calls out of reach (predicted worse than measured by more than the interval's half-width)."""
    if not past or not past["runs"]:
        return []
    worst, out = past["worst"], past["calls_out_of_reach"]
    line = (
        f"Against the lab's own final runs of this profile ({past['runs']} distinct, this one included; last 10%, bits "
        f"per byte), the law's interval holds {past['inside']} of {past['runs']}"
    )
    if not out:
        return [line + "; it calls none of them out of reach."]
    return [
        line + f"; it predicts **worse than measured for {out}** by more than its interval's half-width, calling "
        f"results the lab has reached out of reach. The worst: {fmt(worst['params'])} parameters on "
        f"{fmt(worst['tokens'])} tokens ({worst['run']}) measured {fmt(worst['measured_bpb'], decimals=3)}, "
        f"predicted {fmt(worst['predicted_bpb'], decimals=3)} ({fmt(worst['low'], decimals=3)} to "
        f"{fmt(worst['high'], decimals=3)}). "
        "The law's interval carries the refits' spread and seed noise, not the error of its form: its picks past the "
        "sweep are not to be trusted this far."
    ]


def sizing(h: dict[str, Any]) -> str:
    """What stage 05's sweep measured and recommended, whether 05 used it, and the final runs as the check of its
    extrapolation: every count and verdict from the hand-off."""
    s = h.get("sizing")
    if not s:
        return _section(
            "How was the final model sized?",
            ["By the parameters given (d_model / n_layer): no sizing sweep ran."],
            "Leave d_model and n_layer unset for 05 to size its model by a sweep first.",
        )
    lines = [
        *_sweep_design(s),
        _lr_rule(s["lr_rule"]),
        _law(s),
        *_recommendation(s),
        _extrapolation(s["check"], h.get("per_seed")),
        *_past_runs(s.get("past_runs")),
        *_to_beat_5gram(s),
    ]
    iso = s.get("isoflop")
    return _section(
        "How big a model for this budget, by the lab's own scaling fit?",
        lines,
        "The sweep chose on the validation split; the test numbers above were never used to choose anything. "
        + (
            f"Approach 2 (IsoFLOP), on the {iso['budgets_bracketed']} budgets whose parabola has its minimum inside "
            "the "
            f"sizes tried, has N_opt growing as C^{fmt(iso['a'])}."
            if iso
            else "Approach 2 (IsoFLOP) did not fit: fewer than two budgets have their parabola's minimum inside the "
            "sizes tried."
        ),
    )


def _sweep_design(s: dict[str, Any]) -> list[str]:
    budgets, sizes, seeds = s["budgets"], list(s["sizes_per_budget"].values()), list(s["seeds_per_budget"].values())
    reasons = sorted({r["reason"] for r in s["left_out"]})
    return [
        f"The law rests on {s['runs_fitted']} runs at {len(budgets)} budgets from {budgets[0]:.2g} to "
        f"{budgets[-1]:.2g} FLOPs "
        f"({fmt(s['decades'], decimals=2)} decades), {_span(sizes)} sizes a budget, {_span(seeds)} seeds; every fitted "
        f"run trained {s['fewest_steps']}+ optimizer steps. "
        + (
            f"{len(s['left_out'])} runs were left out ({'; '.join(reasons)}). "
            if s["left_out"]
            else "No run was left out. "
        )
        + f"{s['runs_lr_fit']} more runs measured the LR rule and are not in the law.",
        f"The least loss lies inside the sizes tried at {s['budgets_bracketed']} of {len(budgets)} budgets"
        + (
            " (sizes were added at an edge until it did, or the ladder ran out)"
            if s["budgets_bracketed"] < len(budgets)
            else ""
        )
        + _bracket_noise(s),
    ]


def _bracket_noise(s: dict[str, Any]) -> str:
    """Whether those brackets stand out of the seed noise: a least loss within noise of an end size brackets nothing."""
    beyond, bracketed = s.get("budgets_bracketed_beyond_noise"), s["budgets_bracketed"]
    if not bracketed:
        return "."
    if beyond is None:
        return "; no replicated runs measured the seed noise, so whether any bracket stands out of it is not known."
    within = bracketed - beyond
    return (
        f"; at {beyond} of those {bracketed} both end sizes lie above the least by more than twice the standard error "
        f"of the seed noise (σ = {fmt(s['noise_floor'], decimals=4)} in log loss)"
        + (f", at {within} the least loss is within that noise of an end size: no bracket there." if within else ".")
    )


def _span(counts: list[int]) -> str:
    return f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)} to {max(counts)}"


def _lr_rule(rule: dict[str, Any]) -> str:
    """How the per-size LR rule came about, and whether every measured width's best LR lies on it."""
    best = ", ".join(f"{fmt(lr)} at width {w}" for w, lr in rule["best_lr"].items())
    line = f"A short LR sweep at {rule['compute']:.2g} FLOPs found the best LR at {best}"
    if not rule["fitted"]:
        line += (
            f"; at width {', '.join(map(str, rule['censored_widths']))} the best lies at the edge of the multiples "
            "tried, so "
            f"the exponent was not measured: every size trained at LR = {fmt(rule['intercept'])} x "
            f"width^-{fmt(rule['exponent'])}"
        )
    else:
        bound = f" (fitted {fmt(rule['raw_exponent'])}, kept at the bound)" if rule.get("bounded") else ""
        line += (
            f"; fitted, LR = {fmt(rule['intercept'])} x width^-{fmt(rule['exponent'])}{bound}, the rule every size and "
            "the "
            "final run trained at"
        )
    off = ", ".join(f"{fmt(v, decimals=2)} at width {w}" for w, v in rule["off_by_steps"].items())
    return line + (
        f". The rule **{'holds' if rule['holds'] else 'does not hold'}**: measured bests off it by {off} steps of the "
        "LR grid (it holds when every width's best is inside the grid and within one step)."
    )


def _law(s: dict[str, Any]) -> str:
    fit, band = s["parametric"], s["parametric_ci95"]
    interval = ", ".join(f"{k} {fmt(band[k]['low'])} to {fmt(band[k]['high'])}" for k in ("alpha", "beta", "E"))
    missing, status = s["not_identified"], s["identification"]
    return (
        f"L(N, D) = {fmt(fit['E'])} + {fmt(fit['A'])} / N^{fmt(fit['alpha'])} + {fmt(fit['B'])} / D^{fmt(fit['beta'])} "
        f"(bits/byte), 5 free parameters; a {s['n_boot']:,}-draw parametric bootstrap with noise of "
        f"{fmt(s['sigma'], decimals=4)} in log loss (seed noise {fmt(s['noise_floor'], decimals=4)}) gives 95% "
        f"intervals {interval}. "
        + (
            f"**Not identified:** {', '.join(f'{k} ({status[k]})' for k in missing)}: the optimizer's bounds, "
            "not the data, set them."
            if missing
            else "Every parameter is identified (none at a bound of the fit)."
        )
        + _model_form(s)
    )


def _model_form(s: dict[str, Any]) -> str:
    """The law's error on budgets it did not see, and whether the predicted intervals carry it."""
    form = s.get("model_form")
    if not form:
        return " Too few budgets to test the law on one it was not fitted on: its intervals carry no error of its form."
    each = ", ".join(f"{fmt(r, decimals=3, sign=True)} at {b}" for b, r in form["per_budget"].items())
    carried = (
        "the predicted intervals below carry it (it exceeds the bootstrap's noise)"
        if form["rms"] > s["sigma"]
        else "within the bootstrap's noise, which the intervals carry"
    )
    return (
        f" Refitted without each budget in turn, the law misses that budget's runs by {each} in log loss (mean "
        f"residual, measured - predicted); RMS {fmt(form['rms'], decimals=4)}: {carried}."
    )


def _shape(pick: dict[str, Any]) -> str:
    """A recommended size in words: its depth, width, parameters and tokens."""
    return (
        f"{pick['n_layer']} layers of width {pick['d_model']} ({fmt(pick['params'])} parameters) on "
        f"{fmt(pick['tokens'])} tokens"
    )


def _recommendation(s: dict[str, Any]) -> list[str]:
    law, capped, pick = s["law_pick"], s["capped_pick"], s["recommendation"]
    lines = [
        f"For the final run's {s['final_compute']:.3g} FLOPs the law's own pick is {_shape(law)}, predicted "
        f"{fmt(law['loss'])} "
        "bits/byte; "
        + (
            "the same within the repetition cap."
            if law["d_model"] == capped["d_model"]
            else f"within the cap of {fmt(s['repeated_epochs'])} epochs ({fmt(s['max_tokens'])} tokens) it is "
            f"{_shape(capped)}, predicted {fmt(capped['loss'])}."
        )
    ]
    if law["d_model"] < capped["d_model"] and capped.get("left_out_for_repetition"):
        lines.append(
            f"The cap binds: it leaves out the {capped['left_out_for_repetition']} shapes that would repeat the data "
            f"more than {fmt(s['repeated_epochs'])} times, the law's optimum among them, so the pick under the cap is "
            "the smallest shape the cap allows, set by the cap rather than by the law: the optimum under the cap is "
            "not identified."
        )
    if pick is None:
        return lines + [
            "**No recommendation**: the law is not identified and approach 2 did not fit, so 05 trained the profile's "
            "own shape. To identify it: more budgets with their minimum inside the sizes tried, longer runs, more "
            "seeds."
        ]
    source = (
        "the law's pick under the cap"
        if pick["source"] == "law"
        else f"approach 2's (N_opt = {fmt(pick['n_opt'])}; the law is not identified)"
    )
    lines.append(
        f"05 trains {source}: {_shape(pick)} at LR {fmt(pick['lr'])} and batch {pick['batch_size']}, predicted "
        f"{fmt(pick['loss'])} bits/byte (95% interval for one run {fmt(pick['loss_low'])} to {fmt(pick['loss_high'])}, "
        f"width {fmt(pick['interval_width'], decimals=3)}). "
        + (
            "Its neighbours on the ladder are predicted "
            f"{', '.join(f'{fmt(v)} (width {w})' for w, v in pick['neighbours'].items())}, "
            f"the nearest {fmt(pick['gap_to_nearest'], decimals=3)} above: the interval "
            + ("tells them apart." if pick["tells_neighbours"] else "cannot tell them apart.")
            if pick["neighbours"]
            else ""
        )
    )
    return lines


def _extrapolation(check: dict[str, Any], per_seed: list[dict[str, Any]] | None = None) -> str:
    seeds = [(r["seed"], r["val_bpb"]) for r in per_seed or [] if r.get("val_bpb") is not None]
    each = (
        " Seed by seed: "
        + ", ".join(f"{fmt(v)} (seed {seed}, {inside(v, check['low'], check['high'])})" for seed, v in seeds)
        + "; the interval is one run's, and a mean of seeds varies less, so a mean outside it lies outside the "
        "mean's own interval too."
        if len(seeds) > 1
        else ""
    )
    return (
        f"The final runs, at {fmt(check['times_largest_budget'])}x the largest fitted budget, measured "
        f"{fmt(check['measured'])} "
        f"bits/byte (mean over seeds) against a predicted {fmt(check['predicted'])} ({fmt(check['low'])} to "
        f"{fmt(check['high'])}): "
        f"**{check['verdict']}**, residual {fmt(check['residual'], decimals=3, sign=True)} bits/byte." + each
    )


def _to_beat_5gram(s: dict[str, Any]) -> list[str]:
    if "five_gram_bpb" not in s:
        return []
    floor_ci = (s.get("parametric_ci95") or {}).get("E")
    if s["compute_to_beat_5gram"] is None and floor_ci and floor_ci["low"] < s["five_gram_bpb"] <= s["parametric"]["E"]:
        return [
            f"On these windows the 5-gram scores {fmt(s['five_gram_bpb'])} bits/byte; the fitted frontier does not "
            f"reach it within 10,000x this budget, because the fitted irreducible loss E ({fmt(s['parametric']['E'])}) "
            f"lies above it. But E's 95% interval ({fmt(floor_ci['low'])} to {fmt(floor_ci['high'])}) includes the "
            "5-gram's score: whether any size of this model gets there **cannot be decided** from this sweep."
        ]
    if s["compute_to_beat_5gram"] is None:
        floor = s["parametric"]["E"]
        why = (
            f": the fitted irreducible loss E ({fmt(floor)}) lies above it, so by this law no size gets there. The law "
            "rests on "
            f"runs of at most {fmt(s['largest_fitted_params'])} parameters and says what the sweep's scale sees, not "
            "what a "
            "model far larger would do"
            if floor >= s["five_gram_bpb"]
            else ": within the repetition cap the ladder's shapes stop improving first"
        )
        return [
            f"On these windows the 5-gram scores {fmt(s['five_gram_bpb'])} bits/byte; the fitted frontier does not "
            "reach it "
            f"within 10,000x this budget{why}."
        ]
    return [
        f"On these windows the 5-gram scores {fmt(s['five_gram_bpb'])} bits/byte; the fitted frontier reaches it at "
        f"{s['compute_to_beat_5gram']:.2g} FLOPs, {fmt(s['times_final_compute_to_beat_5gram'])}x this budget: what a "
        "model that beats "
        "the 5-gram would take, by the lab's own law."
    ]


# --------------------------------------------------------------------------- tables and references


def config_table(config) -> str:
    """A RunConfig as Markdown: the model and training fields that differ from their defaults."""
    from .config import TrainConfig
    from .model import ModelConfig

    rows = []
    for section, cfg, default in (("model", config.model, ModelConfig()), ("train", config.train, TrainConfig())):
        changed = {k: v for k, v in cfg.to_dict().items() if v != default.to_dict()[k]}
        rows.append([section, ", ".join(f"`{k}` = {fmt(v)}" for k, v in changed.items())])
    return markdown_table(["config", "fields that differ from the defaults"], rows)


def variants_table(variants: dict[str, dict[str, Any]]) -> str:
    """A study's variants and their overrides as Markdown."""
    rows = [
        [f"`{name}`", ", ".join(f"`{k}` = {fmt(v)}" for k, v in overrides.items()) or "the base config"]
        for name, overrides in variants.items()
    ]
    return markdown_table(["variant", "overrides"], rows)


def search_space_table(space: dict[str, dict[str, Any]]) -> str:
    """Optuna's search space as Markdown: what each parameter sets and where it samples."""

    def where(p):
        if p["type"] == "categorical":
            return "one of " + ", ".join(fmt(c) for c in p["choices"])
        return f"{fmt(p['low'])} to {fmt(p['high'])}" + (" (log scale)" if p.get("log") else "")

    return markdown_table(
        ["parameter", "sets", "samples"], [[name, f"`{p['target']}`", where(p)] for name, p in space.items()]
    )


def references(h: dict[str, Any]) -> dict[str, str]:
    """What a stage's headline numbers compare with, for the dashboard: computed from its hand-off."""
    import math

    refs = {}
    counts = h.get("references") or {}
    same = (
        f"bigram {counts['bigram']:.3f}, 5-gram {counts['5-gram']:.3f} on the same windows"
        if "bigram" in counts
        else ""
    )
    if "vocab_size" in h.get("model", {}) and "val_loss" in h and "metric" not in h:
        refs["val_loss"] = "; ".join(x for x in (same, f"uniform {math.log(h['model']['vocab_size']):.3f}") if x)
        if "best_val_loss" in h:
            refs["best_val_loss"] = f"a uniform guess: {math.log(h['model']['vocab_size']):.3f}"
    metric = h.get("metric")
    if metric and h.get(f"{metric}_mean") is not None and h.get("delta_vs_baseline") is not None:
        baseline = h[f"{metric}_mean"] - h["delta_vs_baseline"]
        label = "untuned, same seeds (held out)" if metric == "confirm_loss" else f"baseline, {h['n']} paired seeds"
        refs[f"{metric}_mean"] = f"{label}: {fmt(baseline, decimals=4)}" + (f"; {same}" if same else "")
        verdict = {True: "; significant", False: "; not significant"}.get(h.get("significant"), "")
        test = "paired" if h.get("test") == "paired" else "Welch"
        interval = (
            f", 95% CI {fmt(h['delta_ci_low'], decimals=3, sign=True)} to "
            f"{fmt(h['delta_ci_high'], decimals=3, sign=True)}"
            if h.get("delta_ci_low") is not None
            else ""
        )
        refs["delta_vs_baseline"] = (
            f"{test} p = {fmt(h.get('p_value'))}{interval}{verdict} after Holm's correction"
            if verdict
            else f"{test} p = {fmt(h.get('p_value'))}{interval}"
        )
    if h.get("mde") is not None:
        refs["mde"] = "a true difference this large or larger is detected with 80% power (pooled variance, Holm)"
    if "best_trial_selection_loss" in h:
        refs["best_trial_selection_loss"] = "selection number: chose the trial, so optimistic"
    if "trials" in h and h.get("trial_tokens"):
        refs["tokens"] = (
            "03's budget"
            if h.get("trial_tokens") == [h.get("ablation_tokens")]
            else f"03 trained {fmt(h.get('ablation_tokens'))}"
        )
    for key in ("last10pct_val_loss", "test_loss"):
        if key in h:
            target = f"; target {h['target_val_loss']}" if h.get("target_val_loss") is not None else ""
            split = "" if key == "last10pct_val_loss" else " (on the last 10%, not this split)"
            counted = h.get("references" if key == "test_loss" else "last10pct_references") or {}
            grams = (
                f"; 5-gram {counted['5-gram']:.3f}, bigram {counted['bigram']:.3f} on the same windows"
                if counted
                else ""
            )
            nanogpt = (
                f"nanoGPT shakespeare_char: {NANOGPT_SHAKESPEARE_CHAR_VAL_LOSS}{split}"
                if h.get("nanogpt_val_loss") is not None or "shakespeare_char" not in h
                else "count models of this corpus only"
            )
            refs[key] = f"{nanogpt}{target if key == 'last10pct_val_loss' else ''}{grams}"
    if h.get("target_verdict") is not None:
        refs["target_verdict"] = _verdict_reference(h)
    return refs


_INTERVAL_AGAINST_TARGET = {"met": "lies at or below it", "missed": "lies above it", "not established": "spans it"}


def _verdict_reference(h: dict[str, Any]) -> str:
    """What the target verdict rests on: the target, the mean's side of it, each seed's, and the interval's."""
    said = f"last-10% target {fmt(h['target_val_loss'])}: the mean {'meets' if h['meets_target'] else 'misses'} it"
    per_seed = h.get("meets_target_per_seed")
    if per_seed and len(per_seed) > 1:
        said += f", {_seeds_on_target(h)}; the seeds' 95% interval {_INTERVAL_AGAINST_TARGET[h['target_verdict']]}"
    return said
