"""results/index.html and results/README.md: the one-page dashboard of the latest run of every stage.

Per stage: its status and time, its headline numbers with units and the reference they compare
with, a thumbnail of its key figure linking to the reader's report; above them, the run's context
(commit, machine, profile, seeds, total time) and a link to the archive. A stage run outside the
pipeline (bare papermill, JupyterLab) is shown as such, with its parameters and how to render it.
"""

from __future__ import annotations

import hashlib
import html
import json
from pathlib import Path
from typing import Any

from .files import NOTEBOOKS_DIR, RESULTS_DIR, RUN_FILE, STAGE_FILE, atomic_write_text
from .freshness import current_inputs, describe_change, same_inputs
from .tables import fmt, markdown_table

# What a headline number is measured in: a suffix after the number ("%" turns a fraction into a percentage).
UNITS = {
    "best_val_loss": "nats/token",
    "val_loss": "nats/token",
    "val_loss_mean": "nats/token",
    "confirm_loss_mean": "nats/token",
    "test_loss": "nats/token",
    "last10pct_val_loss": "nats/token",
    "best_trial_selection_loss": "nats/token",
    "delta_vs_baseline": "nats/token",
    "val_accuracy": "%",
    "test_accuracy": "%",
    "num_params": "parameters",
    "tokens": "tokens",
    "tokens_per_s": "tokens/s",
    "train_tokens": "tokens",
    "val_tokens": "tokens",
    "test_tokens": "tokens",
    "vocab_size": "symbols",
    "trials": "trials",
    "elapsed_s": "s",
    "p_value": "",
    "val_bpb": "bits/byte",
    "test_bpb": "bits/byte",
    "val_bpb_mean": "bits/byte",
    "confirm_bpb_mean": "bits/byte",
    "mde": "nats/token",
    "lr": "",
}


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def stage_table(results_dir: Path = RESULTS_DIR, notebooks: list[Path] | None = None) -> list[dict[str, Any]]:
    """One row per stage folder: status, duration, report links, headline numbers, references and key figure."""
    rows, earlier_ok = [], True
    if notebooks is None:  # the pipeline's notebooks, and any other stage folder found in results_dir
        names = {p.stem for p in NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb")} | {
            p.name for p in results_dir.glob("[0-9][0-9]_*") if p.is_dir()
        }
    else:
        names = {Path(p).stem for p in notebooks}
    for name in sorted(names):
        folder = results_dir / name
        run, stage = _read(folder / RUN_FILE), _read(folder / STAGE_FILE) or {}
        outside = bool(stage) and (run is None or stage.get("started", "") > run.get("finished", ""))
        if outside and "handoff" not in stage:
            status = "unfinished"  # running now, or cut off: the same command continues it
        elif outside:
            status = "outside the pipeline"
        else:
            status = "not run" if run is None else ("ok" if run["ok"] else "FAILED")
        stale_because = _stale_because(folder, run) if status == "ok" else None
        if status == "ok" and not earlier_ok:
            status = "stale"  # finished once, but an earlier stage has failed or not run since: its inputs are gone
            stale_because = "an earlier stage failed or has not run since"
        earlier_ok = earlier_ok and status == "ok"
        if stale_because:
            status = "stale"  # its inputs changed since it ran (`make pipeline` re-runs it)

        def link(file: str, name: str = name, folder: Path = folder) -> str | None:
            return f"{name}/{file}" if (folder / file).exists() else None

        rows.append(
            {
                "stage": name,
                "status": status,
                "seconds": None if outside or run is None else run["seconds"],
                "reused": None if outside or run is None else run.get("reused_runs_from"),
                "finished": "" if outside or run is None else run.get("finished", ""),
                "error": None if outside or run is None else run.get("error"),
                "stale_because": stale_because,
                "html": link(f"{name}.html"),
                "reader": link(f"{name}.reader.html"),
                "figure": link(stage["figure"]) if stage.get("figure") else None,
                "headline": stage.get("headline", {}),
                "references": stage.get("references", {}),
                "parameters": _set_parameters(stage) if outside else (run or {}).get("parameters", {}),
                "context": stage.get("context", {}),
                "regression": _regression(folder, stage) if status in ("ok", "stale") else None,
            }
        )
    return rows


def _regression(folder: Path, stage: dict[str, Any]) -> str | None:
    """The hand-off's regression against the best archived run, in words (None when there is none): a headline
    worse than before is shown on the dashboard, not only in the report that explains it."""
    handoff = _read(folder / stage["handoff"]) if stage.get("handoff") else None
    r = (handoff or {}).get("regression")
    if not r:
        return None
    paired = r.get("paired")
    noise = f"; seed for seed {paired['mean']:+.3f} ({_paired_ci(paired)})" if paired else ""
    return (
        f"Regression: {fmt(r['worse_by'], decimals=3)} worse than the best archived run ({fmt(r['best'], decimals=4)}, "
        f"{r['archived']}){noise}; its report says what differs and why"
    )


def _paired_ci(paired: dict[str, Any]) -> str:
    """The 95% interval of a regression's seed-for-seed difference (`stage_folders.paired_seeds`)."""
    low, high = paired["ci95"]
    return f"95% CI {low:+.3f} to {high:+.3f}"


def _stale_because(folder: Path, run: dict[str, Any] | None) -> str | None:
    """What changed since a finished stage ran (its notebook, parameters, code or an earlier stage's hand-off), in
    words; None while it is current. Only for the pipeline's own notebooks, with the parameters it was given."""
    notebook = NOTEBOOKS_DIR / f"{folder.name}.ipynb"
    if not run or not notebook.exists() or not run.get("inputs"):
        return None
    now = current_inputs(notebook, run.get("parameters") or {}, folder)
    return None if same_inputs(run["inputs"], now) else describe_change(run["inputs"], now)


def _set_parameters(stage: dict[str, Any]) -> dict[str, Any]:
    """The parameters of a run outside the pipeline that hold a value (None means "the profile's" in every stage)."""
    return {k: v for k, v in stage.get("inputs", {}).get("parameters", {}).items() if v is not None}


def _headline_lines(row: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [
        (key, fmt(value, UNITS.get(key, "")), row["references"].get(key, "")) for key, value in row["headline"].items()
    ]


def _context(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The run's context, from the stages' own records: commit, machine, profile, seeds, total time."""
    context = merged_context(rows)
    total = total_time(rows)
    items = [
        ("commit", context.get("commit")),
        ("machine", context.get("machine")),
        ("torch", context.get("torch")),
        ("profile", context.get("profile")),
        ("seeds", _seeds(rows)),
        ("total time", total),
    ]
    return [(k, fmt(v)) for k, v in items if v is not None]


def merged_context(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The stages' recorded contexts in one (commit, machine, torch, profile), a later stage's value winning."""
    context: dict[str, Any] = {}
    for row in rows:
        context.update({k: v for k, v in row["context"].items() if v not in (None, "", [])})
    return context


def training_seconds(row: dict[str, Any]) -> float | None:
    """What a stage cost to produce: the seconds of the execution that trained its runs (a re-execution that reused
    them all took seconds, not the training's time), plus this execution's own where it trained some of them."""
    if row["seconds"] is None:
        return None
    reused = row.get("reused")
    if not reused:
        return float(row["seconds"])
    return float(reused["seconds"]) + (float(row["seconds"]) if reused.get("runs_trained") else 0.0)


def total_time(rows: list[dict[str, Any]]) -> str | None:
    """The one total the dashboard, the README and docs/results.md give: the stages' training executions, summed
    (`training_seconds`), and this execution's own seconds where it reused runs."""
    trained = [t for t in map(training_seconds, rows) if t is not None]
    if not trained:
        return None
    total = f"{sum(trained):,.0f} s over {len(trained)} stages ({sum(trained) / 60:.1f} minutes)"
    executed = sum(r["seconds"] for r in rows if r["seconds"] is not None)
    if any(r.get("reused") for r in rows):
        total += f"; the latest execution, reusing finished runs, took {executed:,.0f} s"
    return total


def _seeds(rows: list[dict[str, Any]]) -> str | None:
    """Each stage's seeds (they differ: 03's paired seeds, 04's confirmation seeds, 05's final ones)."""
    seeds = [f"{r['stage'][:2]}: {fmt(r['context']['seeds'])}" for r in rows if r["context"].get("seeds")]
    return "; ".join(seeds) or None


def _time(row: dict[str, Any]) -> str:
    """The stage's time, and where it reused runs, the time of the execution that trained them."""
    if row["seconds"] is None:
        return ""
    text, reused = f"{row['seconds']:.0f} s", row["reused"]
    if reused:
        trained = f", training {reused['runs_trained']}" if reused.get("runs_trained") else ""
        count = reused.get("runs_reused", 0)
        text += (
            f" (reusing {count} run{'' if count == 1 else 's'}{trained}; they trained in an execution of "
            f"{reused['seconds']:,.0f} s, {reused['finished']})"
        )
    return text


def _outside_detail(row: dict[str, Any]) -> str:
    """How a stage run outside the pipeline got there, with what, and how to bring its reports in."""
    if row["status"] == "unfinished":
        return (
            "running now, or cut off before its hand-off; the same command (`make pipeline`, or the same papermill "
            "call) "
            f"continues it and keeps its finished runs; parameters: {fmt(row['parameters']) or 'the defaults'}"
        )
    return (
        "run by papermill or JupyterLab, not `make pipeline`; `make pipeline` re-runs it, or render what papermill "
        "wrote "
        "with `python -m labutils.pipeline --render <executed notebook, e.g. out.ipynb>`; "
        f"parameters: {fmt(row['parameters']) or 'the defaults'}"
    )


def gain_ladder(results_dir: Path = RESULTS_DIR) -> list[list[str]]:
    """From stage to stage on windows the numbers share: 02's baseline and 03's choice on the selection windows, 03's
    choice, the tuned LR alone and 04's tuned config on the confirmation half, each beside the count models on the same
    windows; rows [windows, what, nats/token, note]. Empty before 02 has run."""
    h02, h03, h04 = (
        _read(results_dir / stage / name)
        for stage, name in (("02_baseline", "baseline.json"), ("03_ablations", "best.json"), ("04_tuning", "best.json"))
    )
    rows: list[list[str]] = []

    def interval(mean, half, n) -> str:
        return (
            fmt(mean, decimals=4)
            + ("" if half is None or half != half else f" ± {fmt(half, decimals=4)}")
            + f" (n={int(n)})"
        )

    def counts(where: str, refs: dict | None) -> None:
        for name in ("bigram", "5-gram"):
            if refs and name in refs:
                rows.append([where, f"{name} count model", fmt(refs[name], decimals=4), "fitted on the training split"])

    if h02 and "val_loss" in h02:
        where = f"{h02.get('eval_split', 'val')} windows ({fmt(h02.get('train', {}).get('eval_tokens'))} tokens)"
        counts(where, h02.get("references"))
        rows.append([where, "02 baseline at its best LR", interval(h02["val_loss"], None, 1), "one seed; chose the LR"])
    if h03 and h03.get("baseline_arm"):
        where = f"{h03['eval_split']} windows ({fmt(h03['eval_tokens'])} tokens)"
        arm = h03["baseline_arm"]
        rows.append(
            [where, "03 baseline arm", interval(arm["val_loss_mean"], arm["val_loss_ci95"], arm["n"]), "paired seeds"]
        )
        if h03["variant"] != "baseline":
            rows.append(
                [
                    where,
                    f"03 choice `{h03['variant']}`",
                    interval(h03["val_loss_mean"], h03["val_loss_ci95"], h03["n"]),
                    f"Δ {fmt(h03['delta_vs_baseline'], decimals=4, sign=True)} (95% CI "
                    f"{fmt(h03.get('delta_ci_low'), decimals=3, sign=True)}"
                    f" to {fmt(h03.get('delta_ci_high'), decimals=3, sign=True)})",
                ]
            )
        else:
            rows.append(
                [
                    where,
                    "03 choice: the baseline",
                    "",
                    "no arm significantly better"
                    if (h03.get("regime") or {}).get("comparable", True)
                    else "too short to compare",
                ]
            )
    if h04 and h04.get("confirmation_arms"):
        where = "confirmation half of val (whole, held out)"
        counts(where, h04.get("references"))
        names = {"baseline": "03's choice, untuned", "lr_only": "untuned at the tuned LR", "tuned": "04 tuned"}
        for arm in h04["confirmation_arms"]:
            rows.append(
                [
                    where,
                    names.get(arm["variant"], arm["variant"]),
                    interval(arm["confirm_loss_mean"], arm["confirm_loss_ci95"], arm["n"]),
                    "new seeds",
                ]
            )
        gains = h04.get("gains") or {}
        for key, label in (
            ("total", "what tuning bought"),
            ("lr", "of it, the LR alone"),
            ("rest", "of it, the other values"),
        ):
            if key in gains:
                g = gains[key]
                rows.append(
                    [
                        where,
                        label,
                        fmt(g["mean"], decimals=4, sign=True),
                        f"95% CI {fmt(g['ci_low'], decimals=3, sign=True)} to "
                        f"{fmt(g['ci_high'], decimals=3, sign=True)}, "
                        f"paired over {g['n']} seeds, this pair of arms alone",
                    ]
                )
    return rows


LADDER_HEADER = ["windows", "what", "nats/token (mean ± 95% CI)", "note"]


def write_index(results_dir: Path = RESULTS_DIR, notebooks: list[Path] | None = None) -> Path:
    """results/index.html and results/README.md, from every stage's stage.json and run.json."""
    rows, ladder = stage_table(results_dir, notebooks), gain_ladder(results_dir)
    compute = write_compute_figure(results_dir)
    _write_markdown(results_dir, rows, ladder, compute)
    return _write_html(results_dir, rows, ladder, compute)


def _write_markdown(
    results_dir: Path, rows: list[dict[str, Any]], ladder: list[list[str]], compute: tuple[Path | None, str | None]
) -> Path:
    table = []
    for r in rows:
        status = r["status"] + (f" ({r['error']})" if r["error"] else "")
        status += f": {r['stale_because']}" if r["stale_because"] else ""
        status += f" (**{r['regression']}**)" if r["regression"] else ""
        if r["status"] in ("outside the pipeline", "unfinished"):
            status += f": {_outside_detail(r)}"
        numbers = "<br>".join(f"{k}: **{v}**" + (f" (ref. {ref})" if ref else "") for k, v, ref in _headline_lines(r))
        figure = f"[![{r['stage']}]({r['figure']})]({r['reader'] or r['figure']})" if r["figure"] else ""
        table.append(
            [
                r["stage"],
                status,
                _time(r),
                " · ".join(f"[{k}]({r[k]})" for k in ("reader", "html") if r[k]),
                numbers,
                figure,
            ]
        )
    context = " · ".join(f"{k}: {v}" for k, v in _context(rows))
    text = (
        "# Results\n\nWritten by `make pipeline`; each stage links its report (`reader`: findings, tables and figures; "
        f"`html`: with the code). {context}. Superseded runs: [archive/](../archive/README.md).\n\n"
        + (
            f"## Where the training compute went\n\n{compute[1]}\n\n![compute]({compute[0].name})\n\n"
            if compute[0]
            else ""
        )
        + markdown_table(["stage", "status", "time", "reports", "headline (reference)", "key figure"], table)
        + "\n"
        + (
            "\n## From stage to stage\n\nEach number beside the count models on the same windows.\n\n"
            + markdown_table(LADDER_HEADER, ladder)
            + "\n"
            if ladder
            else ""
        )
    )
    return atomic_write_text(results_dir / "README.md", text)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{margin-bottom:.2em}.context{color:#555;margin-bottom:1.5em}.context span{margin-right:1.5em}
.stage{display:grid;grid-template-columns:260px 1fr;gap:1.2em;border-top:1px solid #ddd;padding:1em 0}
.stage img{width:260px;border:1px solid
#ccc;border-radius:4px}.thumb-missing{width:260px;height:150px;background:#f3f3f3;
display:flex;align-items:center;justify-content:center;color:#999}.status{font-weight:bold}.ok{color:#2e7d32}
.FAILED{color:#c62828}.stale,.outside{color:#b26a00}table.numbers td{padding:.15em 1em .15em 0;vertical-align:top}
.ref{color:#666;font-size:.9em}a{color:#1565c0}img.compute{max-width:100%;margin-bottom:1em}"""


def _write_html(
    results_dir: Path, rows: list[dict[str, Any]], ladder: list[list[str]], compute: tuple[Path | None, str | None]
) -> Path:
    esc = lambda v: html.escape(str(v))  # noqa: E731
    blocks = []
    for r in rows:
        thumb = (
            f'<a href="{esc(r["reader"] or r["figure"])}"><img src="{esc(r["figure"])}" alt="{esc(r["stage"])} key '
            'figure"></a>'
            if r["figure"]
            else '<div class="thumb-missing">no figure</div>'
        )
        numbers = "".join(
            f'<tr><td>{esc(k)}</td><td><b>{esc(v)}</b></td><td class="ref">{esc(ref)}</td></tr>'
            for k, v, ref in _headline_lines(r)
        )
        links = " · ".join(f'<a href="{esc(r[k])}">{k}</a>' for k in ("reader", "html") if r[k])
        css = "outside" if r["status"] in ("outside the pipeline", "unfinished") else r["status"]
        detail = esc(r["error"] or r["stale_because"] or "")
        detail += f'<b class="FAILED">{esc(r["regression"])}</b>' if r["regression"] else ""
        if r["status"] in ("outside the pipeline", "unfinished"):
            detail = esc(_outside_detail(r))
        time_ = f" · {esc(_time(r))}" if r["seconds"] is not None else ""
        blocks.append(
            f'<div class="stage">{thumb}<div><h2>{esc(r["stage"])}</h2><p><span class="status '
            f'{css}">{esc(r["status"])}</span>'
            f'{time_} · {links} <span class="ref">{esc(r["finished"])}</span></p><p>{detail}</p>'
            f'<table class="numbers">{numbers}</table></div></div>'
        )
    context = "".join(f"<span>{esc(k)}: <b>{esc(v)}</b></span>" for k, v in _context(rows))
    ladder_html = (
        (
            "<h2>From stage to stage</h2><p>Each number beside the count models on the same windows.</p>"
            "<table class='numbers'><tr>"
            + "".join(f"<th align=left>{esc(h)}</th>" for h in LADDER_HEADER)
            + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{esc(c).replace('`', '')}</td>" for c in row) + "</tr>" for row in ladder)
            + "</table>"
        )
        if ladder
        else ""
    )
    page = (
        f"<!doctype html><meta charset='utf-8'><title>labutils results</title><style>{_CSS}</style>"
        f"<h1>Results</h1><div class='context'>{context}</div>"
        "<p>Written by <code>make pipeline</code>. Each stage: its key figure (click for the reader's report), "
        "headline numbers "
        "with units and the reference they compare with. Superseded runs: <a "
        "href='../archive/README.md'>archive</a>.</p>"
        + (
            f"<h2>Where the training compute went</h2><p>{esc(compute[1])}</p>"
            f"<img class='compute' src='{esc(compute[0].name)}' alt='training compute by part of the pipeline'>"
            if compute[0]
            else ""
        )
        + "".join(blocks)
        + ladder_html
    )
    return atomic_write_text(results_dir / "index.html", page)


# --------------------------------------------------------------------------- where the training compute went

FINAL_PART = "05 final model"
# the parts of the pipeline that train runs, by stage folder and the run folder's first component under it
_PARTS = {
    "02_baseline": "02 LR sweep",
    "03_ablations": "03 ablations",
    "04_tuning": "04 tuning",
    "05_final_model/sizing": "05 sizing sweep",
    "05_final_model": FINAL_PART,
}


def compute_spent(results_dir: Path = RESULTS_DIR):
    """The training compute of each part of the pipeline, from every run's summary.json (pruned and cut runs count
    what they trained): runs, FLOPs (tokens x the model's FLOPs per token, forward and backward) and process-seconds
    (each run's own training time, summed over runs, so parallel workers add up), with each part's share. Empty when
    no stage has trained runs."""
    import pandas as pd

    rows = []
    for stage in sorted(Path(results_dir).glob("[0-9][0-9]_*")):
        for summary in sorted(stage.rglob("summary.json")):
            run = _read(summary)
            first = summary.relative_to(stage).parts[0]
            part = _PARTS.get(f"{stage.name}/{first}", _PARTS.get(stage.name))
            if not run or part is None or not run.get("tokens"):
                continue
            flops = run["tokens"] * run["flops_per_token"] if run.get("flops_per_token") else float("nan")
            rows.append({"part": part, "flops": flops, "seconds": float(run.get("elapsed_s") or 0.0)})
    if not rows:
        return pd.DataFrame(columns=["runs", "flops", "seconds", "flops_share", "seconds_share"])
    table = pd.DataFrame(rows).groupby("part", sort=False)
    table = table.agg(runs=("flops", "size"), flops=("flops", "sum"), seconds=("seconds", "sum"))
    table = table.reindex([p for p in dict.fromkeys(_PARTS.values()) if p in table.index])
    return table.assign(
        flops_share=table["flops"] / table["flops"].sum(), seconds_share=table["seconds"] / table["seconds"].sum()
    )


def compute_sentence(table) -> str | None:
    """The final model's share of the pipeline's training compute, in one sentence (None without a final model)."""
    if FINAL_PART not in table.index:
        return None
    final = table.loc[FINAL_PART]
    return (
        f"The final model's training took {final['flops_share']:.0%} of the pipeline's training FLOPs "
        f"({final['flops']:.3g} of {table['flops'].sum():.3g}) and {final['seconds_share']:.0%} of its training "
        f"process-seconds ({final['seconds']:,.0f} of {table['seconds'].sum():,.0f} s); the studies that chose it had "
        "the rest."
    )


def plot_compute(table, *, highlight: str | None = None, title: str = "Where the training compute went"):
    """Two bar panels over the parts of the pipeline (rows of `table`): training FLOPs and training process-seconds,
    each bar labelled with its share; the `highlight` part (the final model) in its own colour. (Drawn here, in the
    style labutils.plotting sets, since plotting's key figures record themselves through stage_folders, which
    refreshes this dashboard; a matplotlib Figure, outside pyplot.)"""
    import matplotlib.style
    import numpy as np
    from matplotlib.figure import Figure

    with matplotlib.style.context(["seaborn-v0_8-whitegrid", "seaborn-v0_8-notebook"]):
        fig = Figure(figsize=(10, 0.45 * len(table) + 1.4))
        axes = fig.subplots(1, 2, sharey=True)
        colors = ["#c62828" if part == highlight else "#90a4ae" for part in table.index]
        for ax, column, label in zip(
            axes, ("flops", "seconds"), ("training FLOPs", "training process-seconds (s)"), strict=True
        ):
            values = table[column].to_numpy(float)
            ax.barh(list(table.index), values, color=colors)
            for y, (value, share) in enumerate(zip(values, table[f"{column}_share"], strict=True)):
                ax.text(value, y, f" {share:.0%}", va="center", fontsize=9)
            ax.set(xlabel=label, xlim=(0, 1.18 * np.nanmax(values)))
        axes[0].invert_yaxis()  # the pipeline's order, top to bottom (the panels share the axis: once for both)
        fig.suptitle(title)
        fig.tight_layout()
    return fig


DRAWN_FROM = "labutils-drawn-from"  # the PNG text chunk holding what compute.png was drawn from


def write_compute_figure(results_dir: Path = RESULTS_DIR) -> tuple[Path | None, str | None]:
    """results/compute.png, the compute by part as bars, and its sentence; (None, None) when nothing trained."""
    table = compute_spent(results_dir)
    figure = Path(results_dir) / "compute.png"
    if table.empty:
        figure.unlink(missing_ok=True)
        return None, None
    # drawn only when its numbers or this module changed: the dashboard is refreshed several times a stage (each key
    # figure, the hand-off, the pipeline after the stage), and each drawing cost half a second of CPU
    drawn_from = hashlib.sha256(table.to_csv().encode() + Path(__file__).read_bytes()).hexdigest()[:16]
    if _drawn_from(figure) != drawn_from:
        # a Figure of its own, never pyplot's: this runs inside a stage's kernel too (a key figure refreshes the
        # dashboard), where a pyplot figure opened and closed here cost the cell its own figures' display
        plot_compute(table, highlight=FINAL_PART).savefig(
            figure, dpi=120, bbox_inches="tight", metadata={DRAWN_FROM: drawn_from}
        )
    return figure, compute_sentence(table) or "No final model has trained yet: the bars are the studies' runs."


def _drawn_from(figure: Path) -> str | None:
    """What `figure` was drawn from (write_compute_figure's hash), None when it does not exist or does not say."""
    from PIL import Image

    try:
        with Image.open(figure) as image:
            return image.text.get(DRAWN_FROM)
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- the README's and docs' results, computed

RESULTS_BEGIN, RESULTS_END = "<!-- results:begin -->", "<!-- results:end -->"
# which split each stage's number is measured on: selection numbers chose something, held-out ones did not
NUMBER_KIND = {
    "02_baseline": "selection",
    "03_ablations": "selection",
    "04_tuning": "held out",
    "05_final_model": "test",
}


def _ci(low: float, high: float) -> str:
    return f"95% CI {low:+.3f} to {high:+.3f}"


def _data_summary(results_dir: Path) -> tuple[str, str] | None:
    data = _read(results_dir / "01_data_prep" / "data.json")
    if not data:
        return None
    return (
        f"{data['corpus']}, {data['tokenizer']} tokenizer ({data['vocab_size']:,} symbols): "
        f"{data['train_tokens']:,} train / {data['val_tokens']:,} val / {data['test_tokens']:,} test tokens",
        "",
    )


def _baseline_summary(results_dir: Path) -> tuple[str, str] | None:
    base = _read(results_dir / "02_baseline" / "baseline.json")
    if not base:
        return None
    sweep, refs = base.get("lr_sweep") or {}, base["references"]
    text = f"{base['num_params'] / 1e6:.2f}M parameters, {base['tokens']:,} tokens"
    if sweep:
        ranked = sorted(zip(sweep["losses"], sweep["lrs"], strict=True))
        best, best_lr = ranked[0]
        text += f", best of {len(sweep['lrs'])} LRs ({best_lr:g}): **{best:.3f}**"
        if len(ranked) > 1:
            second, second_lr = ranked[1]
            text += f"; next {second_lr:g} at {second:.3f} ({second - best:+.4f}, one seed each)"
    else:
        text += f": **{base['val_loss']:.3f}**"
    return text, f"bigram {refs['bigram']:.3f}, 5-gram {refs['5-gram']:.3f}"


def _ablation_summary(results_dir: Path) -> tuple[str, str] | None:
    import pandas as pd

    from .stats import TESTS, pooling_dependent

    best, summary_csv = _read(results_dir / "03_ablations" / "best.json"), results_dir / "03_ablations" / "summary.csv"
    if not best or not summary_csv.exists():
        return None
    summary = pd.read_csv(summary_csv)
    significant = summary[summary["test"].isin(TESTS) & (summary["significant"] == True)]  # noqa: E712 (NaN: untested)
    better = significant[significant["delta_vs_baseline"] < 0].sort_values("delta_vs_baseline")
    worse = ", ".join(f"`{v}`" for v in significant.loc[significant["delta_vs_baseline"] > 0, "variant"])
    on_pooling = pooling_dependent(summary)  # the verdict differs between the pooled test and the arm's own
    check = best.get("lr_check") or {}
    lr_dependent = check.get("lr_dependent") or check.get("flips") or []
    listed = ", ".join(
        f"`{r.variant}` {r.delta_vs_baseline:+.3f} ({_ci(r.delta_ci_low, r.delta_ci_high)})"
        for r in better.itertuples()
    )
    text = f"{len(summary)} arms × {best['n']} paired seeds; better: {listed or 'none'}; worse: {worse or 'none'}"
    text += f"; detectable effect {best['mde']:.3f}"
    if on_pooling:
        text += f"; verdict depends on pooling the variance: {', '.join(f'`{v}`' for v in on_pooling)}"
    if lr_dependent:
        text += f"; LR-dependent: {', '.join(f'`{v}`' for v in lr_dependent)}"
    baseline_lr = next((r for r in check.get("table") or [] if r["variant"] == "baseline"), None)
    if baseline_lr and baseline_lr["best_multiplier"] != 1.0:
        text += (
            f"; the baseline scores {baseline_lr['x1'] - baseline_lr['best_loss']:.3f} lower at "
            f"{baseline_lr['best_multiplier']:g}× its LR (seed {check.get('seed', 0)})"
        )
    text += f"; `{best['variant']}` ({best['val_loss_mean']:.3f}) handed on"
    return text, f"bigram {best['references']['bigram']:.3f}"


def _tuning_summary(results_dir: Path) -> tuple[str, str] | None:
    tuned = _read(results_dir / "04_tuning" / "best.json")
    if not tuned:
        return None
    gain, arms = tuned["gains"]["total"], {a["variant"]: a for a in tuned.get("confirmation_arms") or []}
    untuned, tuned_arm = arms.get("baseline", {}), arms.get("tuned", {})
    text = (
        f"{tuned['trials']} trials ({tuned['finished_trials']} finished); on new seeds, tuned "
        f"{tuned_arm.get('confirm_loss_mean', float('nan')):.3f} against untuned "
        f"{untuned.get('confirm_loss_mean', float('nan')):.3f}: **{gain['mean']:+.3f}** "
        f"({_ci(gain['ci_low'], gain['ci_high'])}); `{tuned['variant']}` handed on "
        f"({'significant' if tuned['significant'] else 'not significant'})"
    )
    refs = tuned["references"]
    return text, f"bigram {refs['bigram']:.3f}, 5-gram {refs['5-gram']:.3f}"


def _final_summary(results_dir: Path) -> tuple[str, str] | None:
    final = _read(results_dir / "05_final_model" / "final.json")
    if not final:
        return None
    model, refs = final["model"], final["references"]
    low, high = final.get("test_loss_ci95") or (final["test_loss"], final["test_loss"])
    text = (
        f"{model['n_layer']} layers × {model['d_model']} ({final['num_params'] / 1e6:.2f}M parameters), "
        f"{final['tokens']:,.0f} tokens: **{final['test_loss']:.3f}** (95% CI {low:.3f}–{high:.3f}) over "
        f"{final.get('n_seeds', 1)} seeds; last 10% {final['last10pct_val_loss']:.3f}"
    )
    if final.get("target_val_loss") is not None:
        text += f" (target ≤ {final['target_val_loss']}: {final.get('target_verdict', '?')})"
    regression = final.get("regression")
    if regression:
        text += f"; {regression['worse_by']:.3f} worse than the archived {regression['best']:.3f}"
        paired = regression.get("paired")
        if paired:
            text += f" (seed for seed {_paired_ci(paired)})"
    beaten = "beaten" if final.get("beats_5gram_on_test") else "not beaten"
    return text, f"bigram {refs['bigram']:.3f}, 5-gram {refs['5-gram']:.3f} ({beaten})"


SUMMARIES = {
    "01_data_prep": _data_summary,
    "02_baseline": _baseline_summary,
    "03_ablations": _ablation_summary,
    "04_tuning": _tuning_summary,
    "05_final_model": _final_summary,
}


def _stage_summaries(results_dir: Path) -> dict[str, tuple[str, str]]:
    """Per stage: (what it found, the count models on the same tokens), every number read from its hand-off."""
    found = {stage: summarize(results_dir) for stage, summarize in SUMMARIES.items()}
    return {stage: row for stage, row in found.items() if row is not None}


def results_summary(results_dir: Path = RESULTS_DIR) -> str:
    """The README's and docs/results.md's results table, computed from the hand-offs and run records in
    `results_dir`: no number in it is typed by hand (`write_results_blocks` puts it between the markers)."""
    rows = stage_table(results_dir)
    found, context = _stage_summaries(results_dir), merged_context(rows)
    finished = max((r["finished"] for r in rows if r["finished"]), default="")
    lines = [
        f"`make pipeline`, `{context.get('profile', '?')}` profile, finished {finished[:10] or '?'}, "
        f"{context.get('machine', '?')}, torch {context.get('torch', '?')}, commit {context.get('commit', '?')}: "
        f"{total_time(rows) or '?'}. Losses in nats per token; each beside count models scored on the same tokens.",
        "",
        markdown_table(
            ["stage", "result", "count models, same tokens", "time"],
            [
                [
                    f"{r['stage'][:2]} {r['stage'][3:].replace('_', ' ')}"
                    + (f" ({NUMBER_KIND[r['stage']]})" if r["stage"] in NUMBER_KIND else ""),
                    found.get(r["stage"], ("not run", ""))[0],
                    found.get(r["stage"], ("", ""))[1],
                    f"{training_seconds(r):,.0f} s" if training_seconds(r) is not None else "",
                ]
                for r in rows
                if r["stage"] in found
            ],
        ),
    ]
    return "\n".join(lines)


def write_results_blocks(files: list[Path], results_dir: Path = RESULTS_DIR) -> list[Path]:
    """Replace the text between RESULTS_BEGIN and RESULTS_END in each file by `results_summary`; the files changed."""
    block = results_summary(results_dir)
    changed = []
    for file in files:
        text = file.read_text()
        if RESULTS_BEGIN not in text or RESULTS_END not in text:
            raise ValueError(f"{file} has no {RESULTS_BEGIN} ... {RESULTS_END} block to write the results into")
        head, rest = text.split(RESULTS_BEGIN, 1)
        new = f"{head}{RESULTS_BEGIN}\n{block}\n{RESULTS_END}{rest.split(RESULTS_END, 1)[1]}"
        if new != text:
            atomic_write_text(file, new)
            changed.append(file)
    return changed
