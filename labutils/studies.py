"""Studies: a base config plus named variants (dotted overrides), each trained for several seeds at
one shared budget, into `out_dir/runs/<variant>/seed<k>/`, then summarised with intervals and tests.

Re-running skips finished runs; `devices=["cuda:0", "cuda:1"]` runs one process per device. The
statistics live in `labutils.stats`; the variant sets stage 03 compares in `labutils.profiles`.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from . import hardware, processes, stats
from .config import RunConfig
from .data import as_prepared
from .evaluation import Run, evaluate
from .files import atomic_write_json, atomic_write_text, repo_path
from .guards import completed_summary, config_changes
from .model import model_shape
from .training import train
from .validation import ConfigBase, StudyError, choice, require

# The study sets these itself: equal budgets and the seeds are what make variants comparable.
STUDY_OWNED = (
    "train.max_steps",
    "train.max_tokens",
    "train.time_budget_s",
    "train.seed",
    "train.early_stopping_patience",
    "train.eval_tokens",
    "train.eval_split",
)
RUN_COLUMNS = [
    "variant",
    "seed",
    "val_loss",
    "best_val_loss",
    "val_ppl",
    "val_accuracy",
    "val_bpb",
    "confirm_loss",
    "confirm_bpb",
    "train_loss",
    "num_params",
    "flops_per_token",
    "train_flops",
    "steps",
    "tokens",
    "elapsed_s",
    "tokens_per_s",
    "peak_memory_mb",
    "mfu",
    "stop_reason",
    "efficiency",
]


# --------------------------------------------------------------------------- the study


@dataclass
class Study(ConfigBase):
    """Variants of `base` compared over `n_seeds` seeds at one budget.

    budget 'tokens': every run trains on `max_tokens` tokens (default: the base's max_tokens, else
    the baseline's max_steps x tokens per step), so variants with other batch sizes stay
    compute-matched. budget 'time': every run gets `time_budget_s` seconds of training.
    budget 'compute': every run trains on `compute` FLOPs (its model's own FLOP count per token, attention
    included), the whole steps nearest to that: variants of other sizes then see other token counts, as the
    runs of a scaling sweep do (`labutils.scaling`).
    """

    name: str
    base: RunConfig
    variants: dict
    baseline: str = "baseline"
    n_seeds: int = 3
    first_seed: int = 0
    budget: Literal["tokens", "time", "compute"] = "tokens"
    max_tokens: int | None = None
    time_budget_s: float | None = None
    compute: float | None = None
    metric: Literal["val_loss", "best_val_loss", "confirm_loss"] = "val_loss"
    alpha: float = 0.05
    eval_split: Literal["val", "selection"] = "selection"
    confirm_split: str | None = None

    def validate(self) -> None:
        require(bool(self.name.strip()), "name", "give the study a name")
        require(bool(self.variants), "variants", "give at least the baseline variant, e.g. {'baseline': {}}")
        choice(self.baseline, "baseline", list(self.variants))
        require(self.n_seeds >= 1, "n_seeds", f"must be >= 1 (2+ to test differences), got {self.n_seeds}")
        require(self.first_seed >= 0, "first_seed", f"must be >= 0, got {self.first_seed}")
        require(0 < self.alpha < 1, "alpha", f"must be in (0, 1), got {self.alpha}")
        require(
            (self.metric == "confirm_loss") == (self.confirm_split is not None),
            "metric",
            "metric 'confirm_loss' and confirm_split go together: set both (a confirmation) or neither",
        )
        require(
            self.max_tokens is None or self.max_tokens >= 1, "max_tokens", f"must be positive, got {self.max_tokens}"
        )
        require(
            self.time_budget_s is None or self.time_budget_s > 0,
            "time_budget_s",
            f"must be positive, got {self.time_budget_s}",
        )
        require(
            (self.budget == "compute") == (self.compute is not None),
            "compute",
            "budget 'compute' and compute (FLOPs per run) go together: set both or neither",
        )
        require(self.compute is None or self.compute > 0, "compute", f"must be positive FLOPs, got {self.compute}")
        require(
            self.base.train.early_stopping_patience is None,
            "base",
            "train.early_stopping_patience would stop variants at different budgets; remove it from a study",
        )
        for variant, overrides in self.variants.items():
            require(
                isinstance(variant, str) and variant.replace("_", "").replace("-", "").replace(".", "").isalnum(),
                "variants",
                f"variant name {variant!r} must be a folder name (letters, digits, _ - .)",
            )
            self.config(variant)  # every variant's config is built and validated now, not in run 17
            owned = sorted(set(overrides) & set(STUDY_OWNED))
            require(
                not owned,
                "variants",
                f"variant {variant!r} overrides {owned}, which the study sets for every "
                "run (budget and seeds); change the Study's budget instead",
            )

    @property
    def seeds(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.n_seeds))

    def config(self, variant: str) -> RunConfig:
        """The base with `variant`'s overrides applied."""
        return self.base.override(self.variants[variant], context=f"variant {variant!r}: ")

    def run_config(self, variant: str, seed: int, budget: dict[str, Any] | None = None) -> RunConfig:
        """What run (variant, seed) trains: the variant's config at the study's budget, evaluation set and seed
        (`budget`: `budget_fields()`, when the caller has it already)."""
        config = self.config(variant)
        budget = dict(budget or self.budget_fields())
        if self.budget == "compute":
            budget["max_tokens"] = compute_tokens(config, self.compute)
        return RunConfig(config.model, dataclasses.replace(config.train, **budget, seed=seed))

    def budget_fields(self) -> dict[str, Any]:
        """The train fields that fix every run's budget and its evaluation set (the same tokens for every arm;
        with budget 'compute', `run_config` then sets each variant's tokens from its FLOPs per token)."""
        return shared_budget(
            self.config(self.baseline),
            self.budget,
            max_tokens=self.max_tokens,
            time_budget_s=self.time_budget_s,
            eval_split=self.eval_split,
        )


def compute_tokens(config: RunConfig, compute: float) -> int:
    """The tokens of the whole optimizer steps nearest to `compute` FLOPs for this config's model (one step at
    least)."""
    per_step = config.train.batch_size * config.train.grad_accum_steps * config.model.block_size
    steps = max(1, round(compute / (model_shape(config.model).flops_per_token() * per_step)))
    return steps * per_step


def shared_budget(
    baseline: RunConfig,
    budget: Literal["tokens", "time", "compute"],
    *,
    max_tokens: int | None = None,
    time_budget_s: float | None = None,
    eval_split: str = "selection",
) -> dict[str, Any]:
    """The train fields every arm of a comparison shares: its budget and the tokens it is scored on.

    budget 'tokens': `max_tokens`, else the baseline's max_tokens, else its max_steps x tokens per step.
    budget 'time': `time_budget_s`, else the baseline's. budget 'compute': no shared token count (each arm's
    comes from its FLOPs per token: `compute_tokens`). Evaluation: the baseline's eval_tokens, else
    what its eval_batches x eval batch size x block_size come to, fixed for arms of any batch size.
    (Studies and tune() both call this; the fields it sets are ones no arm may override.)
    """
    tcfg, block = baseline.train, baseline.model.block_size
    eval_fields = {
        "eval_tokens": tcfg.eval_tokens or tcfg.eval_batches * (tcfg.eval_batch_size or tcfg.batch_size) * block,
        "eval_split": eval_split,
    }
    if budget == "time":
        seconds = time_budget_s or tcfg.time_budget_s
        require(
            seconds is not None,
            "time_budget_s",
            "budget 'time' needs Study(time_budget_s=...) or train.time_budget_s in the base",
        )
        return {"max_steps": None, "max_tokens": None, "time_budget_s": seconds, **eval_fields}
    if budget == "compute":
        return {"max_steps": None, "max_tokens": None, "time_budget_s": None, **eval_fields}
    tokens = max_tokens or tcfg.max_tokens
    if tokens is None:
        require(
            tcfg.max_steps is not None,
            "max_tokens",
            "budget 'tokens' needs Study(max_tokens=...) or max_tokens/max_steps in the base",
        )
        tokens = tcfg.max_steps * tcfg.batch_size * tcfg.grad_accum_steps * block
    return {"max_steps": None, "max_tokens": int(tokens), "time_budget_s": None, **eval_fields}


@dataclass
class Job:
    """One (variant, seed) run: resolved configs and where it goes."""

    variant: str
    seed: int
    config: RunConfig
    run_dir: Path
    data_dir: Path
    progress: bool = False
    confirm_split: str | None = None


def plan_runs(study: Study, data, out_dir: str | Path) -> list[Job]:
    """Every (variant, seed) job with its validated config, before anything runs."""
    data = as_prepared(data)
    out_dir = repo_path(out_dir)
    budget = study.budget_fields()
    return [
        Job(
            variant,
            seed,
            study.run_config(variant, seed, budget),
            out_dir / "runs" / variant / f"seed{seed}",
            Path(data.dir),
            confirm_split=study.confirm_split,
        )
        for variant in study.variants
        for seed in study.seeds
    ]


def finished_summary(run_dir: str | Path, config: RunConfig) -> dict[str, Any] | None:
    """The summary of the run that finished in `run_dir` with `config`, else None. A stage owns its run folders and
    keeps them across re-runs (labutils.stage_folders.runs_reusable): a folder holding a run of another config (a
    parameter or the design changed) is cleared here, so the new config trains there instead of the two mixing."""
    run_dir = repo_path(run_dir)
    saved = run_dir / "config.json"
    if saved.exists() and config_changes(json.loads(saved.read_text()), config.to_dict()):
        shutil.rmtree(run_dir)
        return None
    return completed_summary(run_dir, config)


def reuse_or_train(config: RunConfig, data, run_dir: str | Path, **train_kwargs: Any) -> Run:
    """The run of `config` in `run_dir`: read back when it finished there before (nothing is written), else trained
    (continuing from its last checkpoint). What a stage calls, so a re-run after a report change retrains nothing."""
    if finished_summary(run_dir, config) is not None:
        return Run.load(run_dir)
    return train(config, as_prepared(data), run_dir, **train_kwargs)


def _is_finished(job: Job) -> bool:
    """True when the run completed with this job's config (and, for a confirmation, was scored on its split)."""
    summary = finished_summary(job.run_dir, job.config)
    return summary is not None and not (job.confirm_split and summary.get("confirm_loss") is None)


def run_job(job: Job, device: str | None) -> dict[str, Any]:
    """Train one job, on `device` when given (else the config's device); returns its summary.

    With a confirm_split, the best checkpoint is then scored on all of that split (`confirm_loss`).
    """
    config = job.config.override({"train.device": device}) if device else job.config
    data = as_prepared(job.data_dir)  # a Job crosses to worker processes as a path; the folder is opened here
    run = train(config, data, job.run_dir, resume=True, progress=job.progress)
    if not job.confirm_split:
        return run.summary
    scored = evaluate(run, data, job.confirm_split, device=config.train.device)
    summary = {
        **run.summary,
        "confirm_loss": scored[f"{job.confirm_split}_loss"],
        "confirm_bpb": scored[f"{job.confirm_split}_bpb"],
        "confirm_split": job.confirm_split,
        "confirm_tokens": scored["tokens"],
    }
    atomic_write_json(job.run_dir / "summary.json", summary)
    return summary


# --------------------------------------------------------------------------- devices

_WORKER_DEVICE: str | None = None


def parse_devices(devices) -> list[str] | None:
    """None, 'cpu', '1,2,3', [1, 2], ['cuda:0', 'cuda:1'] or 'cuda:0*4' -> one device string per worker process
    (bare numbers are CUDA ids; 'cuda:0*4' is four workers sharing one GPU, for runs too small to fill it)."""
    if devices is None:
        return None
    if isinstance(devices, str):
        devices = [d.strip() for d in devices.split(",") if d.strip()]
    out = []
    for device in devices:
        name, star, count = str(device).partition("*")
        require(
            not star or (count.isdigit() and int(count) >= 1),
            "devices",
            f"{device!r}: write a device and how many workers share it, e.g. 'cuda:0*4'",
        )
        out += [f"cuda:{name}" if name.isdigit() else name] * (int(count) if star else 1)
    require(bool(out), "devices", "give at least one device, or None to run sequentially on the config's device")
    return out


def _pin_device(queue) -> None:
    """Pool initializer: each worker takes one device (and its share of it) for its whole life."""
    global _WORKER_DEVICE
    _WORKER_DEVICE, sharing = queue.get()
    hardware.pin_worker(_WORKER_DEVICE, sharing)


def _call_pinned(fn: Callable, job: Any) -> Any:
    return fn(job, _WORKER_DEVICE)


def run_on_devices(
    fn: Callable[[Any, str | None], Any],
    jobs: list,
    devices=None,
    *,
    progress: bool = True,
    desc: str = "runs",
    folder: Path | None = None,
) -> list[Any]:
    """`fn(job, device)` for every job; results (or the exception raised) in job order.

    With two or more devices, one spawned worker process per entry runs one job at a time (an entry
    repeated, as in 'cuda:0*4', puts that many runs on one device at once); otherwise jobs run here
    one after another. Which worker trains a job changes nothing in its result: each run's seed,
    batches and evaluation windows come from its config. `fn` must be importable
    (a module-level function) for the workers to find it. The workers end with this process
    (`processes.worker_pool`: on SIGTERM/SIGINT, an interrupt, or when it is gone) and record
    themselves in `folder`/.workers while they live.
    """
    devices = parse_devices(devices)
    results: list[Any] = [None] * len(jobs)
    if not devices or len(devices) == 1 or len(jobs) <= 1:
        device = devices[0] if devices else None
        for i, job in enumerate(hardware.progress_bar(jobs, desc=desc, disable=not progress)):
            try:
                results[i] = fn(job, device)
            except Exception as exc:  # noqa: BLE001 (keep going: finished runs are kept, a re-run retries this one)
                results[i] = exc
        return results
    queue = mp.get_context("spawn").Queue()
    for device in devices:
        queue.put((device, devices.count(device)))
    with processes.worker_pool(len(devices), folder, initializer=_pin_device, initargs=(queue,)) as pool:
        futures = {pool.submit(_call_pinned, fn, job): i for i, job in enumerate(jobs)}
        finished = processes.as_completed_waking(futures)
        for future in hardware.progress_bar(finished, total=len(futures), desc=desc, disable=not progress):
            try:
                results[futures[future]] = future.result()
            except Exception as exc:  # noqa: BLE001 (as above, including a worker that died)
                results[futures[future]] = exc
    return results


# --------------------------------------------------------------------------- running and results


@dataclass
class StudyResult:
    """A study's tidy run table, per-variant summary and results table, with the folder they came from."""

    study: Study
    out_dir: Path
    runs: pd.DataFrame
    summary: pd.DataFrame
    table: pd.DataFrame

    def conclusion(self) -> str:
        return stats.conclusion(self.summary, metric=self.study.metric, alpha=self.study.alpha)

    def markdown(self) -> str:
        return stats.results_markdown(self.table, metric=self.study.metric)

    def styled_table(self, labels: dict[str, str] | None = None, caption: str | None = None):
        """The results table as a report shows it: numbers rounded, units in the header, no index column; `labels`
        shows variants under other names (display only), `caption` says what the table's test is."""
        m = self.study.metric
        formats = {
            "num_params": "{:,.0f}",
            f"{m}_mean": "{:.4f}",
            f"{m}_ci95": "± {:.4f}",
            "delta_vs_baseline": "{:+.4f}",
            "delta_ci_low": "{:+.4f}",
            "delta_ci_high": "{:+.4f}",
            "mde": "{:.4f}",
            "p_value": "{:.3g}",
            "p_holm": "{:.3g}",
            "elapsed_s_mean": "{:.1f}",
            "efficiency": "{:.3g}",
        }
        if (bpb := stats.bpb_column(m)) in self.table:
            formats[bpb] = "{:.4f}"
        formats.update({c: "{:.3g}" for c in ("p_arm", "p_arm_holm") if c in self.table})
        table = self.table.assign(variant=self.table["variant"].map(lambda v: (labels or {}).get(v, v)))
        styled = (
            table.style.format(formats, na_rep="—")
            .hide(axis="index")
            .set_properties(subset=["variant", "overrides"], **{"text-align": "left"})
        )
        return styled.set_caption(caption) if caption else styled

    def histories(self) -> pd.DataFrame:
        """Per-step train_loss with val_loss/val_ppl/val_accuracy at eval steps, for every run."""
        frames = []
        for row in self.runs.itertuples():
            run_dir = self.out_dir / "runs" / row.variant / f"seed{row.seed}"
            steps = pd.read_csv(run_dir / "metrics.csv")
            evals = pd.read_csv(run_dir / "evals.csv")[["step", "tokens", "val_loss", "val_ppl", "val_accuracy"]]
            frames.append(
                steps.merge(evals, on=["step", "tokens"], how="outer").assign(variant=row.variant, seed=row.seed)
            )
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def best_config(self, *, require_significant: bool = False, baseline_only: bool = False) -> dict[str, Any]:
        """The hand-off: the chosen variant's full model and train config, its numbers and the conclusion.

        The best variant by mean; with require_significant=True the best of those significantly better than the
        baseline, else the baseline; with baseline_only=True (a study too short to compare) the baseline.
        """
        rows = self.summary.set_index("variant")
        better = rows[rows["significant"].fillna(False).astype(bool) & (rows["delta_vs_baseline"] < 0)]
        if baseline_only:
            name = self.study.baseline
        elif require_significant:
            name = str(better[f"{self.study.metric}_mean"].idxmin()) if len(better) else self.study.baseline
        else:
            name = stats.best_variant(self.summary, metric=self.study.metric)
        row = rows.loc[name]
        config = json.loads((self.out_dir / "runs" / name / f"seed{self.study.seeds[0]}" / "config.json").read_text())
        config["train"]["device"] = self.study.base.train.device  # not the worker's GPU
        metric = self.study.metric

        def number(v) -> float | None:
            return None if pd.isna(v) else float(v)  # JSON has no NaN

        return {
            "study": self.study.name,
            "variant": name,
            "overrides": self.study.variants[name],
            "model": config["model"],
            "train": config["train"],
            "metric": metric,
            "n": int(row["n"]),
            f"{metric}_mean": number(row[f"{metric}_mean"]),
            f"{metric}_ci95": number(row[f"{metric}_ci95"]),
            **({bpb: number(row[bpb])} if (bpb := stats.bpb_column(metric)) in row else {}),
            "delta_vs_baseline": number(row["delta_vs_baseline"]),
            "delta_ci_low": number(row["delta_ci_low"]),
            "delta_ci_high": number(row["delta_ci_high"]),
            "test": row["test"],
            "p_value": number(row["p_value"]),
            "p_holm": number(row["p_holm"]),
            "arm_mde": number(row["mde"]),
            "significant": None if pd.isna(row["significant"]) else bool(row["significant"]),
            "conclusion": self.conclusion(),
        }


def collect_runs(study: Study, out_dir: str | Path) -> pd.DataFrame:
    """The tidy table (RUN_COLUMNS) of the study's completed runs found under out_dir/runs."""
    out_dir = repo_path(out_dir)
    rows = []
    for variant in study.variants:
        for seed in study.seeds:
            path = out_dir / "runs" / variant / f"seed{seed}" / "summary.json"
            summary = json.loads(path.read_text()) if path.exists() else {}
            if summary.get("status") == "completed":
                rows.append({"variant": variant, "seed": seed, **{c: summary.get(c) for c in RUN_COLUMNS[2:-1]}})
    runs = pd.DataFrame(rows, columns=RUN_COLUMNS[:-1])
    runs["train_flops"] = runs["flops_per_token"] * runs["tokens"]  # the compute each run spent, forward + backward
    return stats.add_efficiency(runs, study.baseline, study.metric)[RUN_COLUMNS]


def summarize_study(study: Study, out_dir: str | Path) -> StudyResult:
    """Read the finished runs, compute the statistics and write runs.csv, summary.csv, results_table.csv/.md."""
    out_dir = repo_path(out_dir)
    runs = collect_runs(study, out_dir)
    summary = stats.summarize(runs, study.baseline, metric=study.metric, alpha=study.alpha)
    table = stats.results_table(summary, study.variants, metric=study.metric)
    result = StudyResult(study, out_dir, runs, summary, table)
    for name, frame in (("runs", runs), ("summary", summary), ("results_table", table)):
        atomic_write_text(out_dir / f"{name}.csv", frame.to_csv(index=False))
    atomic_write_text(out_dir / "results_table.md", result.markdown())
    return result


def run_study(study: Study, data, out_dir: str | Path, *, devices=None, progress: bool = True) -> StudyResult:
    """Train every (variant, seed) not finished yet into out_dir/runs/<variant>/seed<k>/, then summarise.

    `data` is a PreparedData or a prepared folder. devices: None runs sequentially on the config's
    device; a list (or '1,2,3') runs one process per device. Raises StudyError after all runs were
    attempted if some failed; the finished ones stay and a re-run retries only the others. Raises
    FolderInUseError, before anything is written, while processes of an earlier run still train in out_dir.
    """
    data = as_prepared(data)
    out_dir = repo_path(out_dir)
    jobs = plan_runs(study, data, out_dir)
    processes.refuse_if_in_use(out_dir)  # workers of an earlier, stopped run still training here: not beside them
    atomic_write_json(out_dir / "study.json", study.to_dict())  # Study.from_json + summarize_study reload the results
    todo = [job for job in jobs if not _is_finished(job)]
    devices = parse_devices(devices)
    for job in todo:
        job.progress = progress and not (devices and len(devices) > 1)  # per-run bars only when runs do not interleave
    outcomes = run_on_devices(run_job, todo, devices, progress=progress, desc=study.name, folder=out_dir)
    failed = [(job, err) for job, err in zip(todo, outcomes, strict=True) if isinstance(err, BaseException)]
    if failed:
        lines = "\n".join(f"  {job.variant}/seed{job.seed}: {type(err).__name__}: {err}" for job, err in failed)
        raise StudyError(f"{len(failed)} of {len(jobs)} runs failed (re-run to retry only these):\n{lines}")
    return summarize_study(study, out_dir)
