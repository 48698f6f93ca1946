"""What a profile's pipeline will do on one GPU, stage by stage, and how long it should take there.

Per stage: its runs (or trials), the steps and tokens of each, the worker processes sharing the GPU
and a projected time. The runs are built by the same labutils calls the notebooks make, so the plan
is the pipeline's own. A step time comes from the newest kit folder that measured that shape
(results/gpu/*/speed*.result.json: "measured"); otherwise it is derived from the first H200 visit's
nanoGPT-shape figures ("derived": the GPU's busy time scaled by the step's FLOPs, plus the host time
per layer that the compile mode leaves). Overheads that no GPU run has measured yet are constants
below, named as assumptions in the printed table. `make gpu DEVICE=cpu` prints it.

    python benchmarks/gpu_plan.py --profile gpu
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from labutils import profiles, scaling, studies  # noqa: E402
from labutils.config import RunConfig  # noqa: E402
from labutils.model import get_preset, model_shape  # noqa: E402

CHAR_VOCAB = 65  # tiny Shakespeare's characters: what 01 hands on
COMMAND_LIMIT_S = 9 * 60
# The first visit (H200, torch 2.11, 2026-11-29; benchmarks/README.md): nanogpt-char, batch 64 x 256, bf16.
REFERENCE = {
    "preset": "nanogpt-char",
    "batch_size": 64,
    "block_size": 256,
    "gpu_busy_ms": 6.38,
    "ms": {"eager": 15.03, "default": 13.69, "reduce-overhead": 6.49},
    "warmup_s": {"default": 17.3, "reduce-overhead": 13.8},
}
# Assumptions, until a visit measures them (each is printed with the plan):
STAGE_OVERHEAD_S = 12.0  # kernel start, imports, figures and reports: 11-14 s a stage in the CPU smoke pipeline
RUN_OVERHEAD_S = 2.0  # building the model, drawing the evaluation windows, checkpoints and summary of one run
WARM_COMPILE_SHARE = 0.25  # a compile served by the shared cache, against a cold one
WORKER_EFFICIENCY = (
    0.75  # launch-bound runs sharing one GPU: each extra worker adds this much of one worker's throughput
)
EVAL_COST = 1 / 3  # an evaluation batch (forward only) against a training step
DATA_PREP_S = (
    6.0  # 01 on the CPU profile's machine (README results): tiny Shakespeare is prepared on the host either way
)


@dataclass
class Stage:
    name: str
    runs: int
    workers: int
    steps: int  # per run (the largest when runs differ)
    tokens: int  # per run
    step_ms: float
    source: str
    seconds: float


@functools.cache
def _reference_flops() -> float:
    reference = model_shape(get_preset("nanogpt-char", vocab_size=CHAR_VOCAB))
    return reference.flops_per_token() * REFERENCE["batch_size"] * REFERENCE["block_size"]


def _mode(train) -> str:
    return "eager" if train.compile is False else train.compile_mode


def measured_step_ms(config: RunConfig, kit_root: Path = REPO / "results" / "gpu") -> tuple[float, str] | None:
    """The newest kit measurement of this model, batch, block size and compile mode, if a visit made one."""
    mode = {"default": "compiled"}.get(_mode(config.train), _mode(config.train))
    params = model_shape(config.model).num_params()
    for folder in sorted((p for p in kit_root.glob("*") if p.is_dir() and not p.name.endswith("dryrun")), reverse=True):
        for result in sorted(folder.glob("speed*.result.json")):
            record = json.loads(result.read_text())
            same = (
                record.get("params") == params
                and record.get("batch_size") == config.train.batch_size
                and record.get("block_size") == config.model.block_size
            )
            ms = (record.get("modes", {}).get(mode) or {}).get("ms_per_step") if same else None
            if ms:
                return ms, f"measured {folder.name}"
    return None


def step_ms(config: RunConfig) -> tuple[float, str]:
    """(ms a training step, where the figure comes from) on the reference GPU."""
    found = measured_step_ms(config)
    if found:
        return found
    mode = _mode(config.train)
    flops = (
        model_shape(config.model).flops_per_token()
        * config.train.batch_size
        * config.train.grad_accum_steps
        * config.model.block_size
    )
    gpu_ms = REFERENCE["gpu_busy_ms"] * flops / _reference_flops()
    host_per_layer = (
        REFERENCE["ms"].get(mode, REFERENCE["ms"]["default"]) - REFERENCE["gpu_busy_ms"]
    ) / 6  # nanogpt-char has 6 layers
    return gpu_ms + host_per_layer * config.model.n_layer, "derived from nanogpt-char"


def run_seconds(config: RunConfig, steps: int) -> float:
    """One run: its steps, its evaluations, its fixed overhead (compilation counted per worker in `stage`)."""
    ms, _ = step_ms(config)
    tcfg = config.train
    evals = steps // tcfg.eval_interval + 1
    eval_batches = (
        tcfg.eval_batches
        if not tcfg.eval_tokens
        else math.ceil(tcfg.eval_tokens / config.model.block_size / (tcfg.eval_batch_size or tcfg.batch_size))
    )
    return (steps + evals * eval_batches * EVAL_COST) * ms / 1000 + RUN_OVERHEAD_S


def tokens_of(config: RunConfig) -> int:
    """The tokens one run of `config` trains: its steps x tokens a step."""
    tcfg = config.train
    return steps_of(config) * tcfg.batch_size * tcfg.grad_accum_steps * config.model.block_size


def steps_of(config: RunConfig) -> int:
    tcfg = config.train
    per_step = tcfg.batch_size * tcfg.grad_accum_steps * config.model.block_size
    horizons = [h for h in (tcfg.max_steps, tcfg.max_tokens and math.ceil(tcfg.max_tokens / per_step)) if h]
    return min(horizons)


def stage(name: str, configs: list[RunConfig], workers: int) -> Stage:
    """A stage of `configs` runs spread over `workers` processes on one GPU."""
    workers = max(1, min(workers, len(configs)))
    seconds = [run_seconds(c, steps_of(c)) for c in configs]
    compiled = [c for c in configs if _mode(c.train) != "eager"]
    compile_s = 0.0
    if compiled:  # each worker compiles cold once; the shared cache serves the rest
        cold = REFERENCE["warmup_s"].get(_mode(compiled[0].train), REFERENCE["warmup_s"]["default"])
        compile_s = workers * cold + (len(compiled) - workers) * cold * WARM_COMPILE_SHARE
    throughput = 1 + (workers - 1) * WORKER_EFFICIENCY
    biggest = max(configs, key=steps_of)
    ms, source = step_ms(biggest)
    tokens = tokens_of(biggest)
    return Stage(
        name,
        len(configs),
        workers,
        steps_of(biggest),
        tokens,
        ms,
        source,
        STAGE_OVERHEAD_S + (sum(seconds) + compile_s) / throughput,
    )


def stage_runs(profile: str = "gpu") -> dict[str, list[RunConfig]]:
    """Every training run of `profile`'s pipeline as the notebooks build them (03's and 04's base: 02's baseline, as
    before 02 has run): 02's LR sweep (no extension past an edge counted), 03's arms and LR check, 04's trials (none
    pruned) and confirmation, 05's sizing sweep (the LR fit, then every budget's first sizes: sizes added at an edge
    are not counted, at most max_extensions rounds of one run a budget) and the final run on its seeds."""
    base = profiles.baseline(profile, CHAR_VOCAB)
    grid = profiles.LR_GRID[profiles.resolve(profile)]
    nb03 = profiles.notebook_defaults("03_ablations")  # the notebook owns its design
    skip = profiles.skip_for(nb03["skip_arms"], profile)
    ablation = profiles.ablation_study(profile, base, nb03["arms"], skip=skip)
    checks = profiles.lr_check_study(ablation, profiles.lr_check_multipliers(nb03["lr_check"]))
    settings = profiles.tuning_settings(profile)
    trial = ablation.run_config(ablation.baseline, 0)
    final = profiles.final(profile, CHAR_VOCAB)
    design = profiles.notebook_defaults("05_final_model")["sweep"]
    sweep = scaling.planned_studies(
        final, profiles.sweep_design(profile, design)[0], profiles.final_compute(final, None, None)
    )
    return {
        "02_baseline": [base.override({"train.lr": lr}) for lr in grid],
        "03_ablations": [
            s.run_config(v, seed) for s in (ablation, checks) if s for v in s.variants for seed in s.seeds
        ],
        # trials, then the confirmation's untuned, LR-only and tuned re-runs
        "04_tuning": [trial] * settings["n_trials"] + [trial] * (3 * settings["n_seeds"]),
        "05_sizing": [s.run_config(v, seed) for s in sweep.values() for v in s.variants for seed in s.seeds],
        "05_final": [final] * profiles.FINAL_SEEDS[profiles.resolve(profile)],
    }


def training_flops(profile: str = "gpu") -> dict[str, float]:
    """The training FLOPs each part of `stage_runs` plans (tokens x FLOPs per token, summed over its runs): issue 50
    asks that the final run get at least half of the pipeline's."""
    return {
        name: float(sum(tokens_of(c) * model_shape(c.model).flops_per_token() for c in configs))
        for name, configs in stage_runs(profile).items()
    }


def pipeline_plan(profile: str = "gpu") -> list[Stage]:
    """The stages of `profile` (`stage_runs`), each projected on one GPU."""
    runs = stage_runs(profile)
    study_workers = len(studies.parse_devices(profiles.study_devices(profile)) or [None])
    tune_workers = len(studies.parse_devices(profiles.tuning_settings(profile)["devices"]) or [None])
    # 05 sizes its model first, on 03's devices, then trains the final run on its seeds
    sizing = stage("05_final_model", runs["05_sizing"], study_workers)
    final_run = stage("05_final_model", runs["05_final"], 1)
    return [
        Stage("01_data_prep", 1, 1, 0, 0, 0.0, "host", STAGE_OVERHEAD_S + DATA_PREP_S),
        stage("02_baseline", runs["02_baseline"], study_workers),
        stage("03_ablations", runs["03_ablations"], study_workers),
        stage("04_tuning", runs["04_tuning"], tune_workers),
        dataclasses.replace(
            final_run, runs=final_run.runs + sizing.runs, seconds=final_run.seconds + sizing.seconds - STAGE_OVERHEAD_S
        ),
    ]


def plan_table(rows: list[Stage], profile: str = "gpu") -> str:
    total = sum(r.seconds for r in rows)
    lines = [
        f"Plan of the `{profile}`-profile pipeline on one GPU (projected from H200 figures):",
        "",
        "| stage | runs | workers on the GPU | steps per run | tokens per run | ms per step | from | projected |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.runs} | {r.workers} | {r.steps:,} | {r.tokens:,} | {r.step_ms:.2f} | {r.source} "
            f"| {r.seconds / 60:.1f} min |"
        )
    verdict = "fits" if total <= COMMAND_LIMIT_S else "does NOT fit"
    flops = training_flops(profile)
    lines += [
        "",
        f"In all: {total / 60:.1f} min, which {verdict} one {COMMAND_LIMIT_S // 60}-minute GPU command.",
        f"The final run's share of the planned training FLOPs: {flops['05_final'] / sum(flops.values()):.0%} "
        f"({flops['05_final']:.3g} of {sum(flops.values()):.3g}; no trial pruned, no size added at an edge).",
        f"Assumed until a visit measures them: {STAGE_OVERHEAD_S:.0f} s a stage, {RUN_OVERHEAD_S:.0f} s a run, a warm "
        "compile "
        f"{WARM_COMPILE_SHARE:.0%} of a cold one, each extra worker on the GPU +{WORKER_EFFICIENCY:.0%} throughput, no "
        "trial pruned.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="gpu", choices=profiles.PROFILES)
    args = parser.parse_args(argv)
    print(plan_table(pipeline_plan(args.profile), args.profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
