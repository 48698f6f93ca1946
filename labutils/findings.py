"""Each stage's findings as Markdown, computed from its hand-off: what was asked, what was found
(numbers with units, seeds, intervals, significance), what it means for the next stage, and how it
compares with a reference. Nothing here is typed in: every number comes from the hand-off.

`show(markdown)` displays it in a notebook (rendered in the reader's report), or prints it elsewhere.
"""
from __future__ import annotations

from typing import Any

from . import stats
from .stagedefs import NANOGPT_SHAKESPEARE_CHAR_VAL_LOSS
from .tables import fmt, markdown_table


def show(markdown: str) -> None:
    """Markdown in a notebook, plain text elsewhere."""
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
    lines = ["### Findings", "", f"**Asked.** {asked}", "", "**Found.**", *[f"- {line}" for line in found], "",
             f"**For the next stage.** {means}"]
    if reference:
        lines += ["", f"**Reference.** {reference}"]
    return "\n".join(lines)


SPLIT_KINDS = {"contiguous": "Contiguous splits (character fractions, in order)",
               "hash": "Splits by document (a seeded hash of each document's text)"}


def data_prep(h: dict[str, Any]) -> str:
    total = h["train_tokens"] + h["val_tokens"] + h["test_tokens"]
    return _section(
        f"What does the `{h['corpus']}` corpus look like to the `{h['tokenizer']}` tokenizer, and how is it split?",
        [f"{fmt(total)} tokens over a vocabulary of {fmt(h['vocab_size'])} symbols, in {fmt(h['documents'])} documents "
         f"(median {fmt(h['median_document_tokens'])} tokens, longest {fmt(h['max_document_tokens'])}).",
         f"{SPLIT_KINDS[h.get('split_by', 'contiguous')]}: {fmt(h['train_tokens'])} train / {fmt(h['val_tokens'])} validation / "
         f"{fmt(h['test_tokens'])} test tokens "
         f"({100 * h['train_tokens'] / total:.1f}% / {100 * h['val_tokens'] / total:.1f}% / {100 * h['test_tokens'] / total:.1f}%).",
         f"Packing documents one per window of 256 tokens would waste {100 * h['padding_share_at_block_256']:.0f}% of each batch "
         "on padding, so training samples windows from the token stream instead."],
        "Every later stage trains on these token files; validation is halved into a selection and a confirmation half, "
        "and the test split is kept for 05 alone.")


def _started_from(h: dict[str, Any]) -> list[str]:
    """The bullet a fine-tuning run's report opens with: which weights it started from, and their loss before training."""
    if not h.get("init_from"):
        return []
    return [f"Started from the pretrained weights of `{h['init_from']}`, not a random init: validation loss "
            f"{fmt(h['initial_val_loss'], 'nats/token')} before the first step (step 0), {fmt(h['best_val_loss'], 'nats/token')} "
            f"at best, {fmt(h['initial_val_loss'] - h['best_val_loss'], 'nats/token')} gained by fine-tuning."]


def baseline(h: dict[str, Any]) -> str:
    model = f"the pretrained `{h['init_from']}`" if h.get("init_from") else "write-up 001's MiniGPT"
    return _section(
        f"How far does {model} ({fmt(h['num_params'])} parameters) get in {fmt(h['tokens'])} tokens "
        f"({fmt(h['steps'])} steps, `{h['profile']}` profile)?",
        [*_started_from(h),
         f"Best validation loss {fmt(h['best_val_loss'], 'nats/token')} (perplexity {fmt(h['val_ppl'])}"
         + (f"; last evaluation {fmt(h['val_bpb'])} bits per byte" if h.get("val_bpb") is not None else "")
         + f"); next-token accuracy {fmt(h['val_accuracy'], '%')}.",
         f"Throughput {fmt(h['tokens_per_s'], 'tokens/s')}; {fmt(h['elapsed_s'], 's')} of training."],
        "03 compares every ablation against this configuration, at its token budget, over several seeds.",
        "A uniform guess over the vocabulary scores ln(vocabulary); nanoGPT's much larger shakespeare_char model reaches "
        f"{NANOGPT_SHAKESPEARE_CHAR_VAL_LOSS} (05 compares on its split).")


def _bits_per_byte(h: dict[str, Any], metric: str) -> str:
    """'; 1.23 bits per byte' for the hand-off's metric, where the runs measured it (a tokenizer-free scale)."""
    value = h.get(stats.bpb_column(metric) or "")
    return f"; {fmt(value)} bits per byte" if value is not None else ""


def ablations(h: dict[str, Any], summary) -> str:
    """`summary`: the study's per-variant summary (stats.summarize), for the count of significant variants."""
    metric = h["metric"]
    significant = summary[summary["significant"].fillna(False).astype(bool) & (summary["delta_vs_baseline"] < 0)]["variant"].tolist()
    winners = ", ".join(f"`{v}`" for v in significant) or "none"
    return _section(
        f"Which of {len(summary) - 1} variants beats the baseline at one budget of {fmt(h['tokens'])} tokens, each over "
        f"{h['n']} seeds, scored on the same {fmt(h['eval_tokens'])} {h['eval_split']} tokens?",
        [h["conclusion"],
         f"Significantly better than the baseline after Holm's correction: {winners}.",
         f"Handed on: `{h['variant']}` ({fmt(h[metric + '_mean'], 'nats/token')} ± {fmt(h[metric + '_ci95'])}"
         + _bits_per_byte(h, metric) + f", Δ {fmt(h['delta_vs_baseline'], 'nats/token')} against the baseline)."],
        f"04 tunes `{h['variant']}`'s hyper-parameters at the same token budget. These are selection numbers: they chose the "
        "variant, so they are optimistic; 04's confirmation is held out.")


def tuning(h: dict[str, Any], trials_left_out: int) -> str:
    bpb = h.get(stats.bpb_column(h["metric"]) or "")
    return _section(
        f"How much do tuned hyper-parameters gain on 03's choice, confirmed on seeds {h['confirm_seeds']} and tokens the "
        "search never saw?",
        [f"{h['trials']} trials (the {trials_left_out} trials of earlier code in the same storage are left out); the best, "
         f"trial {h['best_trial']}, scored {fmt(h['best_trial_selection_loss'], 'nats/token')} on the selection tokens that chose it.",
         f"Confirmation (held out): {h['conclusion']}" + (f" `{h['variant']}`: {fmt(bpb)} bits per byte." if bpb is not None else ""),
         "Tuned overrides: " + ", ".join(f"`{k}` = {fmt(v)}" for k, v in h["overrides_tuned"].items()) + "."],
        "05 trains the final architecture with these hyper-parameters.",
        f"The selection number is {fmt(h['confirm_loss_mean'] - h['best_trial_selection_loss'], 'nats/token')} away from the "
        "held-out confirmation: the optimism of choosing on the numbers that score.")


def final(h: dict[str, Any]) -> str:
    target = (f"the `{h['profile']}` profile's target of {fmt(h['target_val_loss'])} is "
              + ("met" if h["meets_target"] else "not met")) if h.get("target_val_loss") is not None else "no target for this profile"
    return _section(
        f"How good is the final model ({fmt(h['num_params'])} parameters, {fmt(h['tokens'])} tokens) on text nothing was chosen on?",
        [*_started_from(h),
         f"Test loss **{fmt(h['test_loss'], 'nats/token')}** (perplexity {fmt(h['test_ppl'])}"
         + (f"; {fmt(h['test_bpb'])} bits per byte, the scale on which any tokenizer compares" if h.get("test_bpb") is not None else "")
         + f"), next-token accuracy {fmt(h['test_accuracy'], '%')}: the held-out headline.",
         f"Loss on the last 10% of the corpus (nanoGPT's split, which includes the validation tokens that chose this config): "
         f"{fmt(h['last10pct_val_loss'], 'nats/token')}; {target}.",
         f"Throughput {fmt(h['tokens_per_s'], 'tokens/s')} on {h['device']}, {fmt(h['elapsed_s'], 's')} of training."],
        "The saved model (weights, config, tokenizer, manifest) is what `labutils.load_model` and `python -m labutils.generate` load. "
        + ("Its weights are committed with the results, so a fresh clone can chat with it at once: "
           f"`python -m labutils.generate --checkpoint {h['model_dir']}`." if h.get("weights_committed")
           else "Its weights are too large to commit; `FORCE=1 make pipeline` rebuilds them in a fresh clone."),
        f"nanoGPT's shakespeare_char (10.7M parameters, a GPU): {NANOGPT_SHAKESPEARE_CHAR_VAL_LOSS} on the last 10%; this run is "
        f"{fmt(h['last10pct_val_loss'] - NANOGPT_SHAKESPEARE_CHAR_VAL_LOSS, 'nats/token')} above it.")


def sizing(h: dict[str, Any]) -> str:
    """What stage 05's sweep recommended, whether 05 used it, and the final run as the check of its extrapolation."""
    s = h.get("sizing")
    if not s:
        return _section("How was the final model sized?", ["By the parameters given (d_model / n_layer): no sizing sweep ran."],
                        "Leave d_model and n_layer unset for 05 to size its model by a sweep first.")
    pick, check, fit = s["recommendation"], s["check"], s["parametric"]
    budget = f"{fmt(pick['seconds'], 's')} of training on this machine" if pick.get("seconds") else f"{fmt(pick['compute'])} FLOPs"
    left_out = s.get("budgets_left_out") or []
    lines = [f"The sweep ({s['runs']} runs at budgets up to {s['largest_budget']:.2g} FLOPs) fitted L(N, D) = {fmt(fit['E'])} + "
             f"{fmt(fit['A'])} / N^{fmt(fit['alpha'])} + {fmt(fit['B'])} / D^{fmt(fit['beta'])} (bits/byte)."
             + (f" The profile's budget of {', '.join(f'{b:.2g}' for b in left_out)} FLOPs was left out: at this batch it trains "
                "fewer than three sizes enough steps for a parabola." if left_out else ""),
             f"For {budget} it recommends {pick['n_layer']} layers of width {pick['d_model']} ({fmt(pick['params'])} parameters) on "
             f"{fmt(pick['tokens'])} tokens, predicted {fmt(pick['loss'])} bits/byte (95% interval {fmt(pick['loss_low'])} to "
             f"{fmt(pick['loss_high'])})" + (f"; {pick['left_out_for_repetition']} smaller shapes were left out: on the tokens this budget "
                                             f"gives them they would pass {fmt(s['repeated_epochs'])} epochs of the training split"
                                             if pick.get("left_out_for_repetition") else "") + ".",
             *_timed_rate(pick, check),
             ("05 trained that shape." if s["used"] else "05 trained the shape its parameters gave, not the recommendation."),
             f"The final run, at {fmt(check['times_largest_budget'])}x the largest fitted budget, measured {fmt(check['measured'])} "
             f"bits/byte against a predicted {fmt(check['predicted'])} ({fmt(check['low'])} to {fmt(check['high'])}): "
             f"**{check['verdict']}** the interval.",
             _lr_rule(s.get("lr_rule") or {"exponent": 1.0, "fitted": False}),
             f"On held-out seeds the rule (LR proportional to width^-{fmt(s.get('lr_rule', {}).get('exponent', 1.0))}) "
             + ("holds" if s["lr_rule_holds"] else "does not hold")
             + f": the best multiple of its LR is {', '.join(f'{fmt(v)} at width {w}' for w, v in s['lr_best_multiplier'].items())}"
             + ("; at the edge of the multiples tried, so the best LR may lie beyond them (the anchor, 04's tuned LR, is off "
                "for these runs; `Sweep.lr_multipliers` widens the check)." if s.get("lr_best_at_grid_edge") else ".")]
    return _section("How big a model for this budget, by the lab's own scaling fit?", lines,
                    "The sweep chose on the validation split; the test numbers above were never used to choose anything. "
                    "Approach 2 (IsoFLOP) " + ("also fitted: N_opt grows as C^" + fmt(s["isoflop"]["a"]) if s.get("isoflop")
                                               else "did not fit: fewer than two budgets have their loss minimum inside the sizes tried")
                    + ".")


def _lr_rule(rule: dict[str, Any]) -> str:
    """How the per-size LR rule's exponent came about: fitted from the short LR sweep, bounded, or the prior kept."""
    if "best_multiplier" not in rule:
        return "Every size trained at LR proportional to 1 / width (no LR fit ran)."
    best = " and ".join(f"{fmt(v)}x at width {w}" for w, v in rule["best_multiplier"].items())
    sweep = f"A short LR sweep at {rule['compute']:.2g} FLOPs, in multiples of the 1 / width rule's LR, found the best at {best}"
    if not rule["fitted"]:
        return (sweep + f": at width {', '.join(map(str, rule['censored_widths']))} at the edge of the multiples tried, so the "
                "ratio was not measured and every size trained at the prior, LR proportional to 1 / width.")
    bound = f" (fitted {fmt(rule['raw_exponent'])}, kept at the bound)" if rule.get("bounded") else ""
    return sweep + f"; fitted, LR proportional to width^-{fmt(rule['exponent'])}{bound}, and every size trained at that rule."


def _timed_rate(pick: dict[str, Any], check: dict[str, Any]) -> list[str]:
    """For a budget in seconds: the rate it was spent at (timed alone in 05's loop) against the sweep's, and how many
    of the planned tokens the final run trained in its time."""
    if not pick.get("shapes_timed"):
        return []
    line = (f"The seconds were turned into tokens at {fmt(pick['flops_per_s'] / 1e9)} GFLOP/s, the shape's rate timed alone in "
            f"05's own loop ({pick['shapes_timed']} shapes timed); the sweep's runs, sharing the machine, reached "
            f"{fmt(pick['sweep_flops_per_s'] / 1e9)} GFLOP/s at this size.")
    if check.get("tokens"):
        line += f" The final run trained {fmt(check['tokens'])} tokens, {check['tokens'] / pick['tokens']:.0%} of the plan."
    return [line]


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
    rows = [[f"`{name}`", ", ".join(f"`{k}` = {fmt(v)}" for k, v in overrides.items()) or "the base config"]
            for name, overrides in variants.items()]
    return markdown_table(["variant", "overrides"], rows)


def search_space_table(space: dict[str, dict[str, Any]]) -> str:
    """Optuna's search space as Markdown: what each parameter sets and where it samples."""
    def where(p):
        if p["type"] == "categorical":
            return "one of " + ", ".join(fmt(c) for c in p["choices"])
        return f"{fmt(p['low'])} to {fmt(p['high'])}" + (" (log scale)" if p.get("log") else "")
    return markdown_table(["parameter", "sets", "samples"], [[name, f"`{p['target']}`", where(p)] for name, p in space.items()])


def references(h: dict[str, Any]) -> dict[str, str]:
    """What a stage's headline numbers compare with, for the dashboard: computed from its hand-off."""
    import math

    refs = {}
    if "vocab_size" in h.get("model", {}) and "best_val_loss" in h:
        refs["best_val_loss"] = f"a uniform guess: {math.log(h['model']['vocab_size']):.3f}"
    metric = h.get("metric")
    if metric and h.get(f"{metric}_mean") is not None and h.get("delta_vs_baseline") is not None:
        baseline = h[f"{metric}_mean"] - h["delta_vs_baseline"]
        label = "untuned, same seeds (held out)" if metric == "confirm_loss" else f"baseline, {h['n']} seeds"
        refs[f"{metric}_mean"] = f"{label}: {fmt(baseline, decimals=4)}"
        verdict = {True: "; significant", False: "; not significant"}.get(h.get("significant"), "")
        refs["delta_vs_baseline"] = (f"Welch p = {fmt(h.get('p_value'))}{verdict} after Holm's correction" if verdict
                                     else f"Welch p = {fmt(h.get('p_value'))}")
    if "best_trial_selection_loss" in h:
        refs["best_trial_selection_loss"] = "selection number: chose the trial, so optimistic"
    for key in ("last10pct_val_loss", "test_loss"):
        if key in h:
            target = f"; target {h['target_val_loss']}" if h.get("target_val_loss") is not None else ""
            split = "" if key == "last10pct_val_loss" else " (on the last 10%, not this split)"
            refs[key] = (f"nanoGPT shakespeare_char: {NANOGPT_SHAKESPEARE_CHAR_VAL_LOSS}{split}"
                         f"{target if key == 'last10pct_val_loss' else ''}")
    return refs
