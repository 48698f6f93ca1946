"""The GPU kit: one command proves the CUDA path and brings back every GPU figure from one short visit.

    make wheelhouse                  # CPU machine with the package index: .whl/ holds what the GPU image lacks
    make gpu                         # GPU machine: every step into results/gpu/<date>-<gpu>/ and one tarball
    make gpu STEPS=tests,speed       # some steps only; a finished step is skipped, so the kit spreads over commands
    make gpu DEVICE=cpu              # dry run of every step at smoke sizes on the CPU
    python benchmarks/gpu_kit.py publish results/gpu/<folder>  # README + benchmarks/README from its summary.json

Steps: env (versions, GPU, driver, commit), tests (`pytest -m gpu`), speed (train_speed.py: nanogpt-char at
64x256 bf16 in every compile mode and speed lever with the full kernel table, and the shapes the pipeline
trains), target (time_to_target.py for nanoGPT's recipe and ours, each --repeats times: the first from a
cold compile cache, the others warm), nanogpt (nanoGPT's own train.py from the checkout NANOGPT points
to, the same way), pipeline (the `gpu` profile into the kit folder, never into results/; its plan is
printed first), summary (summary.json, summary.md, tarball).
Each runs as its own process under a time limit (default 570 s, inside a 10-minute command) and
records `step-<name>.json`; one with status "ok" is not run again unless --force (the summary always is). Steps never
install,
upgrade or downgrade torch: the wheelhouse goes into a target folder that PYTHONPATH puts first.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WHEELHOUSE, SITE = REPO / ".whl", REPO / ".gpu-site"
STEPS = ("env", "tests", "speed", "target", "nanogpt", "pipeline", "summary")
TARGET_RECIPES = (
    "speedrun-gpu",
)  # ours; nanoGPT's recipe runs as nanoGPT's own train.py in the nanogpt step (--recipes adds more)
REPEATS = 3  # every timed run: median, min and max of this many
STAGE_NAMES = tuple(sorted(p.stem for p in (REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")))
TARBALL_LIMIT = 16 * 2**20
WHEELHOUSE_LIMIT = 50 * 2**20
# What the kit needs that the GPU image lacks (its image list: benchmarks/gpu_image_packages.txt).
KIT_PACKAGES = ("papermill", "nbconvert", "ipykernel", "jupytext", "optuna", "ipywidgets")
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
MARK_BEGIN, MARK_END = "<!-- gpu-kit:begin -->", "<!-- gpu-kit:end -->"


def _relative(path: Path) -> Path:
    """`path` relative to the checkout when inside it (the steps run from there)."""
    path = Path(path).resolve()
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


class KitError(RuntimeError):
    """The kit cannot go on; the message says why and what to do."""


# --------------------------------------------------------------------------- step commands


def step_commands(
    step: str,
    device: str,
    out: Path,
    stages: list[str] | None = None,
    *,
    repeats: int = REPEATS,
    nanogpt: Path | None = None,
    recipes: tuple[str, ...] = TARGET_RECIPES,
) -> list[tuple[str, list[str]]]:
    """(name, argv) of the processes one step runs; `device == "cpu"` gives the dry run's smoke sizes.

    `stages` (e.g. ["04", "05"]) limits the pipeline step to those notebooks, so it can be spread
    over commands: a stage cut off half-way continues where it stopped, a finished one is skipped.
    Timed runs come `repeats` times, named <name>-<k>: the first compiles from a cold cache."""
    py, dry, out = sys.executable, device == "cpu", _relative(out)  # relative: logs carry no path of the machine
    if step == "tests":
        return [
            (
                "tests",
                [
                    py,
                    "-m",
                    "pytest",
                    "-m",
                    "gpu",
                    "tests/test_gpu.py",
                    "-q",
                    "-rs",
                    "-p",
                    "no:cacheprovider",
                    f"--junitxml={out / 'tests.xml'}",
                ],
            )
        ]
    if step == "speed":
        tiny = ["--set", "d_model=32", "--set", "n_layer=1", "--set", "n_head=2"]
        timing = (
            ["--steps", "2", "--warmup", "1", "--dtype", "fp32", "--device", "cpu", "--compile-backend", "aot_eager"]
            if dry
            else ["--steps", "50", "--warmup", "10", "--dtype", "bf16"]
        )
        # the nanoGPT shape in every mode and lever, profiled last under CUDA graphs; then the shapes the gpu profile
        # trains
        shapes = [
            (
                "speed",
                [
                    "--preset",
                    "nanogpt-char",
                    "--batch-size",
                    "64",
                    "--modes",
                    "eager,compiled,blocks,dropout0,relu2,bf16_residual,pad_vocab64,reduce-overhead",
                    "--profile",
                ],
            ),
            (
                "speed-minigpt",
                [
                    "--preset",
                    "minigpt",
                    "--set",
                    "vocab_size=65",
                    "--batch-size",
                    "32",
                    "--modes",
                    "eager,reduce-overhead",
                ],
            ),
            (
                "speed-final",
                [
                    "--preset",
                    "final-char",
                    "--set",
                    "d_model=384",
                    "--set",
                    "n_head=6",
                    "--set",
                    "n_kv_head=2",
                    "--set",
                    "dropout=0.2",
                    "--batch-size",
                    "64",
                    "--modes",
                    "reduce-overhead",
                ],
            ),
        ]
        if dry:  # tiny shapes, compiled with aot_eager (graph capture and the autograd split, no code generation: a
            # cold inductor compile takes tens of seconds on a CPU); without dropout, dropout0's graph is compiled's
            modes = ["eager,compiled,dropout0", "eager", "eager"]
            shapes = [
                (
                    name,
                    _replace_modes(argv, m)
                    + tiny
                    + ["--batch-size", "4", "--block-size", "32", "--set", "dropout=0.0"]
                    + (["--set", "n_kv_head=1"] if "final" in name else []),
                )
                for (name, argv), m in zip(shapes, modes, strict=True)
            ]
            shapes[0][1].extend(["--lever-base", "compiled"])
        return [
            (name, [py, "benchmarks/train_speed.py", *argv, *timing, "--json", str(out / f"{name}.result.json")])
            for name, argv in shapes
        ]
    if step == "target":
        # 45 s of training: with the launch, data and compilation, about the 60 s from launch that the targets read
        runs = (
            [("smoke", ["--device", "cpu", "--budget-s", "1.5", "--target", "4.2"])]
            if dry
            else [(recipe, ["--budget-s", "45", "--target", "1.47"]) for recipe in recipes]
        )
        return [
            (
                f"target-{recipe}-{k}",
                [
                    py,
                    "benchmarks/time_to_target.py",
                    "--recipe",
                    recipe,
                    *extra,
                    "--json",
                    str(out / f"target-{recipe}-{k}.result.json"),
                ],
            )
            for recipe, extra in runs
            for k in range(1, repeats + 1)
        ]
    if step == "nanogpt":
        if nanogpt is None:
            return []
        budget = (
            [
                "--budget-s",
                "20",
                "--within-s",
                "15",
                "--set",
                "compile=False",
                "--set",
                "device=cpu",
                "--set",
                "max_iters=30",
                "--set",
                "eval_interval=10",
                "--set",
                "eval_iters=2",
                "--set",
                "batch_size=4",
                "--set",
                "block_size=32",
                "--set",
                "n_layer=1",
                "--set",
                "n_head=2",
                "--set",
                "n_embd=32",
                "--target",
                "3.5",
            ]
            if dry
            else ["--budget-s", "65"]
        )
        return [
            (
                f"nanogpt-{k}",
                [
                    py,
                    "benchmarks/nanogpt_reference.py",
                    "--nanogpt",
                    str(nanogpt),
                    *budget,
                    "--json",
                    str(out / f"nanogpt-{k}.result.json"),
                ],
            )
            for k in range(1, repeats + 1)
        ]
    if step == "pipeline":
        notebooks = [
            str(n.relative_to(REPO))
            for n in sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
            if not stages or n.name[:2] in stages
        ]
        return [
            (
                "pipeline",
                [
                    py,
                    "-m",
                    "labutils.pipeline",
                    "--no-progress",
                    "--results-dir",
                    str(out / "pipeline"),
                    "-p",
                    "profile",
                    "smoke" if dry else "gpu",
                    *notebooks,
                ],
            )
        ]
    raise KitError(f"unknown step {step!r}; the steps are {', '.join(STEPS)}")


def _replace_modes(argv: list[str], modes: str) -> list[str]:
    at = argv.index("--modes")
    return [*argv[: at + 1], modes, *argv[at + 2 :]]


def kit_environment(device: str) -> dict[str, str]:
    """The steps' environment: the checkout and the wheelhouse's target folder first on the path."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_MININTERVAL="10")
    paths = [str(REPO)] + ([str(SITE)] if SITE.exists() else []) + [p for p in [os.environ.get("PYTHONPATH")] if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if (SITE / "share" / "jupyter").exists():  # nbconvert's templates and ipykernel's kernel spec live there
        env["JUPYTER_PATH"] = os.pathsep.join(
            filter(None, [str(SITE / "share" / "jupyter"), os.environ.get("JUPYTER_PATH")])
        )
    if device == "cpu":
        env["LABUTILS_GPU_TESTS_ON_CPU"] = "1"  # the GPU tests' device-agnostic half runs on the CPU
    return env


def process_environment(name: str, device: str, cache: Path | None = None) -> dict[str, str]:
    """The kit's environment, plus what one process needs: benchmarks log recompiles and graph breaks, and each
    timed run compiles into `cache` (empty for a run's first repeat: "from launch" then includes a cold compile;
    the same folder for the later repeats: a warm start), nanoGPT's the same way as ours."""
    env = kit_environment(device)
    if name.startswith(("speed", "target-")):
        env["TORCH_LOGS"] = "recompiles,graph_breaks"
    if cache is not None:
        env.update(TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"), TRITON_CACHE_DIR=str(cache / "triton"))
    return env


def compile_cache(out: Path, name: str) -> Path:
    """The compile cache a timed run's repeats share (target-speedrun-gpu-2 -> .compile-cache/target-speedrun-gpu);
    a first repeat starts it empty."""
    base, _, k = name.rpartition("-")
    folder = out / ".compile-cache" / (base if k.isdigit() else name)
    if k == "1":
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# --------------------------------------------------------------------------- running steps


def run_step(
    step: str,
    device: str,
    out: Path,
    *,
    force: bool = False,
    deadline: float | None = None,
    stages: list[str] | None = None,
    repeats: int = REPEATS,
    nanogpt: Path | None = None,
    recipes: tuple[str, ...] = TARGET_RECIPES,
) -> dict:
    """Run one step unless it finished before; write and return its record. Its processes stop at `deadline`
    (perf_counter)."""
    deadline = deadline if deadline is not None else time.perf_counter() + 570
    record_path = out / f"step-{step}.json"
    derived = step == "summary"  # always rewritten: it gathers whatever the other steps have recorded by now
    if not (force or derived) and record_path.exists() and json.loads(record_path.read_text()).get("status") == "ok":
        print(f"==> {step}: finished earlier, skipped (--force re-runs it)", flush=True)
        return json.loads(record_path.read_text())
    print(f"==> {step}", flush=True)
    start = time.perf_counter()
    if step == "env":
        record = {"status": "ok", **environment(device)}
    elif step == "summary":
        record = {"status": "ok", **write_summary(out)}
    else:
        record = {"status": "ok", "processes": []}
        commands = step_commands(step, device, out, stages, repeats=repeats, nanogpt=nanogpt, recipes=recipes)
        for name, argv in commands:
            if (out / f"{name}.result.json").exists() and name.startswith(("target-", "nanogpt-")) and not force:
                continue  # a repeat that finished in an earlier command: the step goes on from the next one
            record["processes"].append(run_process(name, argv, out, device, deadline=deadline))
        failed = [p["name"] for p in record["processes"] if p["returncode"] != 0]
        record["status"] = f"failed: {', '.join(failed)}" if failed else "ok"
        if step == "nanogpt" and not commands:
            record["status"] = (
                "skipped: no nanoGPT checkout given (NANOGPT=<path> with make, --nanogpt with the script)"
            )
        record.update(collect(step, out))
        missing = [n for n in STAGE_NAMES if n not in record.get("stages", {})] if step == "pipeline" else []
        if missing and record["status"] == "ok":
            record["status"] = f"partial: {', '.join(missing)} not run yet"  # not skipped next time: the rest runs then
    record["seconds"] = round(time.perf_counter() - start, 1)
    record["commit"] = commit()  # the code this step ran: a visit's commands may run at different commits
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"    {record['status']} in {record['seconds']:.0f} s", flush=True)
    return record


def run_process(name: str, argv: list[str], out: Path, device: str, deadline: float) -> dict:
    log = out / f"{name}.log"
    left = max(1.0, deadline - time.perf_counter())
    # a step spread over commands keeps every command's log
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(Path(a).name if a == sys.executable else a for a in argv) + "\n")
        fh.flush()
        # its own process group, so a time-out also ends what it started (pytest's subprocesses, papermill's kernel)
        cache = compile_cache(out, name) if name.startswith(("target-", "nanogpt-")) else None
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=process_environment(name, device, cache),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = 124
            fh.write(
                f"\n[gpu_kit] stopped after {left:.0f} s (the command's time limit); run the same command again to go "
                "on\n"
            )
    scrub_checkout_paths(out)
    tail = log.read_text().splitlines()[-3:]
    print(f"    {name}: exit {code}" + ("" if code == 0 else "  | " + " | ".join(tail)), flush=True)
    return {"name": name, "returncode": code, "log": log.name}


def scrub_checkout_paths(out: Path) -> None:
    """Logs and JUnit files name source files by absolute path (torch's logs and warnings, pytest's skips): the
    checkout's become relative, the interpreter's `<python>/` and the temp folder's `<tmp>/`, so no file names a folder
    of the machine."""
    prefixes = {
        f"{REPO}/": "",
        f"{tempfile.gettempdir()}/": "<tmp>/",
        **{f"{p}/": "<python>/" for p in {sys.prefix, sys.base_prefix}},
    }
    for path in out.iterdir():
        if path.is_file() and path.suffix in (".log", ".xml", ".json"):
            text = scrubbed = path.read_text(errors="replace")
            for prefix in sorted(prefixes, key=len, reverse=True):  # a venv inside the checkout is the interpreter's
                replacement = prefixes[prefix]
                scrubbed = scrubbed.replace(prefix, replacement)
            if scrubbed != text:
                path.write_text(scrubbed)


def collect(step: str, out: Path) -> dict:
    """The figures a step left in its result files, for the summary."""
    if step == "tests":
        return {"tests": junit_results(out / "tests.xml")} if (out / "tests.xml").exists() else {}
    if step in ("speed", "target", "nanogpt"):
        return {
            "results": {
                p.name.removesuffix(".result.json"): json.loads(p.read_text())
                for p in sorted(out.glob(f"{step}*.result.json"))
            }
        }
    if step == "pipeline":
        stages = {}
        for run_file in sorted((out / "pipeline").glob("*/run.json")):
            run = json.loads(run_file.read_text())
            stage = (
                json.loads((run_file.parent / "stage.json").read_text())
                if (run_file.parent / "stage.json").exists()
                else {}
            )
            stages[run_file.parent.name] = {
                "ok": run["ok"],
                "seconds": run["seconds"],
                "error": run.get("error"),
                "headline": stage.get("headline", {}),
            }
        return {"stages": stages}
    return {}


def junit_results(path: Path) -> dict:
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, detail = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome, detail = (
                    ("skipped" if child.tag == "skipped" else "failed"),
                    (child.get("message") or "")[:300],
                )
        cases.append(
            {
                "test": f"{case.get('name')}",
                "outcome": outcome,
                "seconds": float(case.get("time") or 0),
                "detail": detail,
            }
        )
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "skipped")}
    return {**counts, "cases": cases}


def environment(device: str) -> dict:
    import platform

    import torch

    info = {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": commit(),
        "gpu": None,
        "gpu_count": 0,
        "driver": None,
    }
    if device != "cpu" and torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(), gpu_count=torch.cuda.device_count())
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            pass
    from importlib.metadata import distributions

    search = [str(SITE), *sys.path]  # the steps see the wheelhouse's folder first; this process was not started with it
    info["packages"] = {
        name: next((d.version for d in distributions(name=name, path=search)), None)
        for name in (
            "numpy",
            "pandas",
            "scipy",
            "tiktoken",
            "transformers",
            *KIT_PACKAGES,
            "nbclient",
            "jupyter_client",
        )
    }
    return info


def commit() -> str | None:
    """The checkout's commit: from git, or (on a GPU machine that got a copy without .git) what `make wheelhouse`
    recorded."""
    if os.environ.get("KIT_COMMIT"):  # a copy whose .git lags its files (the device tool's) says which commit it holds
        return os.environ["KIT_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=10,
            )
            return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    recorded = WHEELHOUSE / "COMMIT"
    return recorded.read_text().strip() if recorded.exists() else None


def kit_folder(device: str) -> Path:
    """results/gpu/<date>-<gpu name>/ (a dry run: results/gpu/<date>-cpu-dryrun/, which git ignores)."""
    name = "cpu-dryrun"
    if device != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise KitError(
                "no CUDA device is visible to torch here: run the kit on a GPU machine, "
                "or `make gpu DEVICE=cpu` for the dry run"
            )
        name = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return REPO / "results" / "gpu" / f"{datetime.date.today().isoformat()}-{name}"


# --------------------------------------------------------------------------- summary and tarball


def load_records(out: Path) -> dict[str, dict]:
    return {
        step: json.loads((out / f"step-{step}.json").read_text())
        for step in STEPS
        if (out / f"step-{step}.json").exists()
    }


def _num(value, fmt: str = ".2f", unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{fmt}}{unit}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows
    ]


def repeated(results: dict[str, dict]) -> dict[str, list[dict]]:
    """{"target-speedrun-gpu-1": r1, "target-speedrun-gpu-2": r2} -> {"speedrun-gpu": [r1, r2]}, repeats in order."""
    groups: dict[str, list[tuple[int, dict]]] = {}
    for name, record in results.items():
        base, _, k = name.rpartition("-")
        base, k = (base, int(k)) if k.isdigit() else (name, 1)
        groups.setdefault(base.removeprefix("target-"), []).append((k, record))
    return {name: [r for _, r in sorted(runs, key=lambda kr: kr[0])] for name, runs in groups.items()}


def spread(runs: list[dict], key: str, fmt: str = ".2f") -> str:
    """median [min-max] of a figure over repeats; 'n/a' when none has it, the value alone for one run."""
    import statistics

    values = [r[key] for r in runs if r.get(key) is not None]
    if not values:
        return "n/a"
    median = f"{statistics.median(values):{fmt}}"
    return median if len(values) == 1 else f"{median} [{min(values):{fmt}}-{max(values):{fmt}}] ({len(values)})"


def figures_markdown(summary: dict, full_kernels: bool = True) -> list[str]:
    """The figures of a kit run as Markdown: what summary.md (every kernel) and benchmarks/README.md (the largest)
    show."""
    env, steps = summary["environment"], summary["steps"]
    lines = [
        f"Run of {env['date']} on {env['gpu'] or 'CPU (dry run)'} (driver {env['driver'] or 'n/a'}, CUDA "
        f"{env['cuda'] or 'n/a'}, "
        f"torch {env['torch']}, Python {env['python']}), commit `{env['commit'] or 'unknown'}`.",
        "",
    ]
    tests = steps.get("tests", {}).get("tests")
    if tests:
        lines += [
            f"**GPU tests** (`pytest -m gpu`): {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} "
            "skipped.",
            "",
        ]
        rows = [[c["test"], "failed", c["detail"]] for c in tests["cases"] if c["outcome"] == "failed"]
        skipped: dict[str, list[str]] = {}
        for c in tests["cases"]:
            if c["outcome"] == "skipped":
                skipped.setdefault(c["detail"], []).append(c["test"])
        rows += [
            [names[0] if len(names) == 1 else f"{len(names)} tests ({names[0].split('[')[0]}, ...)", "skipped", why]
            for why, names in skipped.items()
        ]
        lines += (
            _table(["test", "outcome", "why"], [[a, b, c.replace("|", "/")] for a, b, c in rows]) + [""] if rows else []
        )
    speeds = steps.get("speed", {}).get("results", {})
    for name in sorted(speeds, key=lambda n: (n != "speed", n)):  # the nanoGPT shape first, then the pipeline's shapes
        speed = speeds[name]
        levers = f"; levers on top of {speed.get('lever_base')}" if speed.get("levers") else ""
        lines += [
            f"**Step speed** (`train_speed.py`, {speed['preset']}, {speed['params'] / 1e6:.2f}M parameters, "
            f"batch {speed['batch_size']} x {speed['block_size']}, {speed['dtype']}{levers}):",
            "",
        ]
        lines += _table(
            [
                "mode",
                "ms/step",
                "tokens/s",
                "MFU",
                "peak allocated MiB",
                "peak reserved MiB (with the CUDA-graph pool)",
                "warm-up s",
            ],
            [
                [
                    m,
                    _num(r["ms_per_step"]),
                    _num(r["tokens_per_s"], ",.0f"),
                    _num(r["mfu"] and 100 * r["mfu"], ".1f", "%"),
                    _num(r["peak_memory_mb"], ".0f"),
                    _num(r.get("peak_reserved_mb"), ".0f"),
                    _num(r["warmup_s"], ".1f"),
                ]
                for m, r in speed["modes"].items()
            ],
        )
        if speed.get("compiled_speedup"):
            lines += ["", f"Compiled/eager speed-up in the same process: {_num(speed['compiled_speedup'])}x."]
        lines.append("")
        profiled = next(((m, r) for m, r in speed["modes"].items() if r.get("kernels")), None)
        if profiled:
            mode, r = profiled
            busy = sum(k["ms_per_step"] for k in r["kernels"])
            shown = r["kernels"] if full_kernels else r["kernels"][:15]
            lines += [
                f"Where a {mode} step's {r['ms_per_step']:.2f} ms go: "
                f"{'every kernel' if full_kernels else 'the 15 largest kernels'} "
                f"({len(r['kernels'])} in all, busy {busy:.2f} ms; "
                f"{max(r['ms_per_step'] - busy, 0):.2f} ms launch overhead and host work"
                + ("" if full_kernels else "; every kernel in the kit folder's summary.md")
                + "):",
                "",
            ]
            lines += _table(
                ["share of the step", "ms/step", "calls/step", "kernel"],
                [
                    [
                        f"{k['share_of_step']:.1%}",
                        f"{k['ms_per_step']:.4f}",
                        f"{k['calls_per_step']:.1f}",
                        k["kernel"][:90].replace("|", "/"),
                    ]
                    for k in shown
                ],
            ) + [""]
    targets = repeated(steps.get("target", {}).get("results", {}))
    nanogpt = repeated(steps.get("nanogpt", {}).get("results", {}))
    if targets:
        lines += [
            "**Time to target** (`time_to_target.py`, from process launch, compile included; the whole validation "
            "split at every "
            "evaluation; median [min-max] over the repeats, the first from a cold compile cache):",
            "",
        ]
        lines += _table(
            [
                "recipe",
                "runs",
                "ms/step",
                "s to val <= target, cold",
                "s to target, warm",
                "best val within 60 s",
                "tokens/s",
            ],
            [
                [
                    recipe,
                    len(rs),
                    spread(rs, "ms_per_step"),
                    _num(rs[0].get("seconds_to_target"), ".1f"),
                    spread(rs[1:], "seconds_to_target", ".1f"),
                    spread(rs, "best_val_loss_within", ".4f"),
                    spread(rs, "tokens_per_s", ",.0f"),
                ]
                for recipe, rs in targets.items()
            ],
        ) + [""]
    if targets or nanogpt:
        lines += [
            "**Beside nanoGPT's own train.py** (same GPU and command; nanoGPT's recipe "
            "`config/train_shakespeare_char.py` as it "
            "ships; median [min-max]; nanoGPT's val loss is its own estimate on 200 random batches, "
            "ours every token of the split):",
            "",
        ]
        rows = [
            [
                f"ours: {recipe}",
                spread(rs, "ms_per_step"),
                spread(rs[1:] or rs, "seconds_to_target", ".1f"),
                spread(rs, "best_val_loss_within", ".4f"),
            ]
            for recipe, rs in targets.items()
        ]
        rows += [
            [
                "nanoGPT train.py",
                spread(rs, "ms_per_step"),
                spread(rs[1:] or rs, "seconds_to_target", ".1f"),
                spread(rs, "best_val_loss_within", ".4f"),
            ]
            for rs in nanogpt.values()
        ] or [["nanoGPT train.py", "not run (NANOGPT=<checkout>)", "", ""]]
        target = next(
            (rs[0].get("target") for rs in [*targets.values(), *nanogpt.values()] if rs[0].get("target")), 1.47
        )
        lines += _table(["run", "ms/step", f"s to val <= {target} from launch, warm", "best val within 60 s"], rows) + [
            ""
        ]
    stages = steps.get("pipeline", {}).get("stages", {})
    if stages:
        total = sum(s["seconds"] for s in stages.values())
        lines += [
            f"**Pipeline** (`{'smoke' if env['device'] == 'cpu' else 'gpu'}` profile, {total / 60:.1f} min in all):",
            "",
        ]
        lines += _table(
            ["stage", "status", "time", "headline"],
            [
                [
                    name,
                    "ok" if s["ok"] else f"FAILED ({s['error']})",
                    f"{s['seconds']:.0f} s",
                    "; ".join(f"{k} {_num(v, '.4g') if isinstance(v, float) else v}" for k, v in s["headline"].items()),
                ]
                for name, s in stages.items()
            ],
        ) + [""]
    return lines


def write_summary(out: Path) -> dict:
    records = load_records(out)
    if "env" not in records:
        raise KitError(
            f"{out} has no step-env.json: run the env step first (it records the versions every figure needs)"
        )
    summary = {
        "environment": {k: v for k, v in records["env"].items() if k not in ("status", "seconds")},
        "steps": {k: v for k, v in records.items() if k != "env"},
    }
    summary["status"] = {k: v["status"] for k, v in records.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    status_rows = [
        [
            step,
            records[step]["status"] if step in records else "not run",
            _num(records.get(step, {}).get("seconds"), ".0f", " s"),
            f"`{(records.get(step, {}).get('commit') or 'n/a')[:12]}`",
        ]
        for step in STEPS
        if step != "summary"
    ]
    lines = [f"# GPU kit: {summary['environment']['gpu'] or 'CPU dry run'}, {summary['environment']['date']}", ""]
    lines += _table(["step", "status", "time", "ran at commit"], status_rows) + [""] + figures_markdown(summary)
    lines += ["Each step's log is `<step>.log` beside this file; `step-<name>.json` holds its raw figures.", ""]
    (out / "summary.md").write_text("\n".join(lines))
    return {"files": ["summary.json", "summary.md"]}


def make_tarball(out: Path) -> Path:
    """<folder>.tar.gz beside the folder, at most 16 MiB: weights never, then full reports dropped if needed."""
    tarball = out.with_name(out.name + ".tar.gz")

    def never(p: Path) -> bool:
        return p.suffix in (".pt", ".gz") or "checkpoints" in p.parts or ".compile-cache" in p.parts

    def heavy(p: Path) -> bool:
        return (
            p.suffix == ".ipynb" or (p.suffix == ".html" and not p.name.endswith(".reader.html"))
        ) and "pipeline" in p.parts

    for drop in (never, lambda p: never(p) or heavy(p)):
        files = sorted(p for p in out.rglob("*") if p.is_file() and not drop(p.relative_to(out)))
        with tarfile.open(tarball, "w:gz") as tar:
            for path in files:
                tar.add(path, arcname=str(Path(out.name) / path.relative_to(out)))
        if tarball.stat().st_size <= TARBALL_LIMIT:
            print(f"    {tarball.name}: {len(files)} files, {tarball.stat().st_size / 2**20:.1f} MiB", flush=True)
            return tarball
    tarball.unlink()
    raise KitError(
        f"the kit folder does not fit {TARBALL_LIMIT // 2**20} MiB even without weights and full reports; "
        f"see what is large in {out}"
    )


# --------------------------------------------------------------------------- publishing


def replace_between_markers(path: Path, block: str) -> None:
    text = path.read_text()
    if MARK_BEGIN not in text or MARK_END not in text:
        raise KitError(
            f"{path} has no {MARK_BEGIN} ... {MARK_END} section: add the two markers where the GPU figures go"
        )
    head, rest = text.split(MARK_BEGIN, 1)
    _, tail = rest.split(MARK_END, 1)
    path.write_text(f"{head}{MARK_BEGIN}\n{block.strip()}\n{MARK_END}{tail}")


def publish(folder: Path, readme: Path, benchmarks_readme: Path, *, allow_dry_run: bool = False) -> None:
    """Write a kit run's figures into benchmarks/README.md (all of them) and README.md (the headline table)."""
    summary_path = folder / "summary.json"
    if not summary_path.exists():
        raise KitError(f"{summary_path} does not exist: run the kit's summary step first (make gpu STEPS=summary)")
    summary = json.loads(summary_path.read_text())
    env = summary["environment"]
    if env["device"] == "cpu" and not allow_dry_run:
        raise KitError(f"{folder} is a CPU dry run: its figures say nothing about GPUs, so they are not published")
    source = (
        "Written by `python benchmarks/gpu_kit.py publish "
        f"{folder.relative_to(REPO) if folder.is_relative_to(REPO) else folder.name}`; raw figures in that folder."
    )
    replace_between_markers(benchmarks_readme, "\n".join(figures_markdown(summary, full_kernels=False) + [source]))
    rows = []
    speed = summary["steps"].get("speed", {}).get("results", {}).get("speed")
    if speed:
        rows += [
            [
                f"{speed['preset']} step, batch {speed['batch_size']}x{speed['block_size']} {speed['dtype']} ({m})",
                f"{_num(r['ms_per_step'])} ms",
            ]
            for m, r in speed["modes"].items()
        ]
    for recipe, rs in repeated(summary["steps"].get("target", {}).get("results", {})).items():
        rows.append(
            [
                f"{recipe}: s to whole-split val <= {rs[0]['target']} from launch, warm (cold) / best val within 60 s",
                f"{spread(rs[1:] or rs, 'seconds_to_target', '.1f')} ({_num(rs[0].get('seconds_to_target'), '.1f')}) / "
                f"{spread(rs, 'best_val_loss_within', '.4f')}",
            ]
        )
    for rs in repeated(summary["steps"].get("nanogpt", {}).get("results", {})).values():
        rows.append(
            [
                "nanoGPT's train.py: ms/step / s to val <= 1.47, warm / best val within 60 s",
                f"{spread(rs, 'ms_per_step')} / {spread(rs[1:] or rs, 'seconds_to_target', '.1f')} / "
                f"{spread(rs, 'best_val_loss_within', '.4f')}",
            ]
        )
    for name, s in summary["steps"].get("pipeline", {}).get("stages", {}).items():
        rows.append([f"pipeline {name}", ("ok" if s["ok"] else "FAILED") + f", {s['seconds']:.0f} s"])
    intro = (
        f"GPU figures from the kit's run of {env['date']} on {env['gpu'] or 'CPU (dry run)'}, "
        f"torch {env['torch']}, CUDA {env['cuda'] or 'n/a'}, commit `{env['commit']}`:"
    )
    replace_between_markers(readme, "\n".join([intro, ""] + _table(["what", "figure"], rows) + ["", source]))


def install_pipeline(folder: Path, results_dir: Path) -> list[str]:
    """Move the kit's pipeline stages into results/, archiving the stages they replace; rewrite the index."""
    sys.path.insert(0, str(REPO))
    from labutils import pipeline, stage_folders

    env = json.loads((folder / "summary.json").read_text())["environment"]
    finished = sorted(p for p in (folder / "pipeline").glob("[0-9][0-9]_*") if (p / "run.json").exists())
    if not finished:
        raise KitError(f"{folder / 'pipeline'} holds no finished stage: run the kit's pipeline step first")
    reason = (
        f"replaced by the gpu-profile run of the GPU kit ({env['date']}, {env['gpu']}, torch {env['torch']}, "
        f"commit {env['commit']})"
    )
    for stage in finished:
        stage_folders.archive_stage(results_dir / stage.name, reason)
        shutil.rmtree(
            results_dir / stage.name, ignore_errors=True
        )  # only what archiving kept in place (Optuna's study.db, copied)
        shutil.move(str(stage), results_dir / stage.name)
    pipeline.write_index(results_dir)
    print(f"moved {', '.join(s.name for s in finished)} into {results_dir}; the stages they replaced are in archive/")
    return [s.name for s in finished]


# --------------------------------------------------------------------------- the wheelhouse


def _project(wheel: Path) -> str:
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def image_packages() -> set[str]:
    lines = (REPO / "benchmarks" / "gpu_image_packages.txt").read_text().splitlines()
    return {re.sub(r"[-_.]+", "-", line.strip()).lower() for line in lines if line.strip() and not line.startswith("#")}


def prune_wheelhouse(folder: Path) -> list[Path]:
    """Delete the wheels of packages the image has (a second copy could shadow the image's, torch above all);
    return the rest."""
    image = image_packages()
    for wheel in folder.glob("*.whl"):
        if _project(wheel) in image or _project(wheel).startswith("nvidia-"):
            wheel.unlink()
    return sorted(folder.glob("*.whl"))


def build_wheelhouse(python: str = sys.executable) -> Path:
    """Download into .whl/ the CPython 3.12 manylinux x86-64 wheels the GPU image lacks (never torch)."""
    staging = REPO / ".whl.partial"
    shutil.rmtree(staging, ignore_errors=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    command = [
        python,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        "--abi",
        "cp312",
        *platforms,
        "-d",
        str(staging),
        *KIT_PACKAGES,
    ]
    if subprocess.run(command).returncode != 0:
        raise KitError("pip could not download the wheelhouse: this needs a machine that reaches the package index")
    kept = prune_wheelhouse(staging)
    size = sum(w.stat().st_size for w in kept)
    if size > WHEELHOUSE_LIMIT:
        raise KitError(f"the wheelhouse is {size / 2**20:.1f} MiB, over {WHEELHOUSE_LIMIT // 2**20} MiB; see {staging}")
    (staging / "COMMIT").write_text((commit() or "unknown") + "\n")
    (staging / "MANIFEST.txt").write_text("".join(f"{w.name}\t{w.stat().st_size}\n" for w in kept))
    shutil.rmtree(WHEELHOUSE, ignore_errors=True)
    staging.rename(WHEELHOUSE)
    print(f"{WHEELHOUSE.name}/: {len(kept)} wheels, {size / 2**20:.1f} MiB; commit {commit()}")
    return WHEELHOUSE


def torch_identity(python: str, env: dict[str, str]) -> str:
    probe = subprocess.run(
        [python, "-c", "import torch; print(torch.__version__, torch.__file__)"],
        env=env,
        capture_output=True,
        text=True,
    )
    return probe.stdout.strip() if probe.returncode == 0 else f"torch not importable: {probe.stderr.strip()[-300:]}"


def install_wheelhouse(python: str = sys.executable, wheelhouse: Path = WHEELHOUSE, site: Path = SITE) -> bool:
    """Install the wheelhouse into `site` (no index, no dependencies): torch stays exactly the image's.

    Returns False when there is nothing to do (no wheels, or these wheels are installed already).
    """
    wheels = sorted(wheelhouse.glob("*.whl"))
    marker = site / ".installed"
    if not wheels or (marker.exists() and marker.read_text() == "\n".join(w.name for w in wheels)):
        return False
    plain = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    before = torch_identity(python, plain)
    shutil.rmtree(site, ignore_errors=True)
    command = [
        python,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--no-cache-dir",
        "--target",
        str(site),
        *map(str, wheels),
    ]
    if subprocess.run(command).returncode != 0:
        raise KitError(
            f"pip could not install {wheelhouse.name}/ into {site.name}/: were the wheels built for this Python "
            f"({sys.version_info.major}.{sys.version_info.minor})? Rebuild them with `make wheelhouse`"
        )
    shadowing = sorted(
        p.name for p in site.iterdir() if _project(p) in ("torch", "triton") or p.name.startswith(("torch", "nvidia"))
    )
    after = torch_identity(python, {**plain, "PYTHONPATH": str(site)})
    if shadowing or before != after:
        raise KitError(
            f"installing the wheelhouse would change torch ({before} -> {after}; {shadowing}); "
            f"remove those wheels from {wheelhouse.name}/"
        )
    marker.write_text("\n".join(w.name for w in wheels))
    print(f"installed {len(wheels)} wheels into {site.name}/; torch unchanged: {after}", flush=True)
    return True


def preflight(device: str) -> None:
    """Fail in seconds, naming what is missing, rather than minutes into a step."""
    needed = ["labutils", "pytest", "pandas", *KIT_PACKAGES]
    probe = (
        "import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))"
    )
    missing = subprocess.run(
        [sys.executable, "-c", probe, *needed], cwd=REPO, env=kit_environment(device), capture_output=True, text=True
    ).stdout.split()
    if missing:
        raise KitError(
            f"{', '.join(missing)} cannot be imported by {sys.executable}: on the GPU machine bring .whl/ (built by "
            "`make wheelhouse` on a machine with the package index); elsewhere `pip install -e .[dev]`"
        )


def pipeline_plan_text(profile: str = "gpu") -> str:
    """benchmarks/gpu_plan.py's table: the runs, steps and tokens of each stage on one GPU, with projected times."""
    spec = importlib.util.spec_from_file_location("gpu_plan", REPO / "benchmarks" / "gpu_plan.py")
    plan = sys.modules.setdefault("gpu_plan", importlib.util.module_from_spec(spec))
    try:
        spec.loader.exec_module(plan)
        return plan.plan_table(plan.pipeline_plan(profile), profile)
    except Exception as exc:  # noqa: BLE001 (the plan informs; it must not cost a GPU visit its steps)
        return f"plan of the {profile} profile could not be made: {type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the kit's steps")
    run.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the dry run at smoke sizes")
    run.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, from: {', '.join(STEPS)}")
    run.add_argument("--out", help="the kit folder (default results/gpu/<date>-<gpu>/)")
    run.add_argument("--force", action="store_true", help="re-run steps that finished before")
    run.add_argument(
        "--timeout-s",
        type=float,
        default=570,
        help="time limit of this whole command: no step starts, and running ones "
        "stop, after it (default 570: inside a 10-minute command); run it again to go on",
    )
    run.add_argument("--stages", help="the pipeline step's notebooks by number, e.g. 01,02,03 (default: all)")
    run.add_argument(
        "--recipes",
        default=",".join(TARGET_RECIPES),
        help="time_to_target.py recipes of the target step "
        f"(default {','.join(TARGET_RECIPES)}; e.g. speedrun-gpu,nanogpt-char for nanoGPT's recipe in our loop too)",
    )
    run.add_argument(
        "--repeats",
        type=int,
        default=REPEATS,
        help=f"runs of each timed recipe, the first from a cold compile cache (default {REPEATS})",
    )
    run.add_argument(
        "--nanogpt",
        default=os.environ.get("NANOGPT") or None,
        help="a nanoGPT checkout for the nanogpt step (default: $NANOGPT); never committed or vendored",
    )
    plan = commands.add_parser(
        "plan", help="print what the gpu-profile pipeline will do on one GPU, stage by stage, with projected times"
    )
    plan.add_argument("--profile", default="gpu")
    commands.add_parser("wheelhouse", help="download the wheels the GPU image lacks into .whl/")
    pub = commands.add_parser("publish", help="write a kit run's figures into README.md and benchmarks/README.md")
    pub.add_argument("folder")
    pub.add_argument("--readme", default=str(REPO / "README.md"))
    pub.add_argument("--benchmarks-readme", default=str(REPO / "benchmarks" / "README.md"))
    pub.add_argument(
        "--allow-dry-run", action="store_true", help="publish a CPU dry run (for testing the publishing only)"
    )
    pub.add_argument(
        "--install-pipeline",
        action="store_true",
        help="also move the kit's pipeline reports into results/ (the stages there go to archive/ with the reason)",
    )
    pub.add_argument("--results-dir", default=str(REPO / "results"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        if args.command == "wheelhouse":
            build_wheelhouse()
            return 0
        if args.command == "plan":
            print(pipeline_plan_text(args.profile))
            return 0
        if args.command == "publish":
            folder = Path(args.folder).resolve()
            publish(folder, Path(args.readme), Path(args.benchmarks_readme), allow_dry_run=args.allow_dry_run)
            if args.install_pipeline:
                install_pipeline(folder, Path(args.results_dir))
            return 0
        steps = [s.strip() for s in args.steps.split(",") if s.strip()]
        unknown = [s for s in steps if s not in STEPS]
        if unknown:
            raise KitError(f"unknown step(s) {unknown}; the steps are {', '.join(STEPS)}")
        if args.device != "cpu":
            install_wheelhouse()
        preflight(args.device)
        out = Path(args.out).resolve() if args.out else kit_folder(args.device)
        out.mkdir(parents=True, exist_ok=True)
        print(f"GPU kit ({'dry run on the CPU' if args.device == 'cpu' else args.device}) -> {out}", flush=True)
        if not (out / "step-env.json").exists() and "env" not in steps:
            steps.insert(0, "env")  # every figure needs the versions it was made with
        deadline = time.perf_counter() + args.timeout_s
        stages = [s.strip().zfill(2) for s in args.stages.split(",")] if args.stages else None
        nanogpt = Path(args.nanogpt).expanduser().resolve() if args.nanogpt else None
        if nanogpt is not None and not (nanogpt / "train.py").exists():
            raise KitError(f"--nanogpt {nanogpt}: no train.py there; give the folder of a nanoGPT checkout")
        if args.repeats < 1:
            raise KitError(f"--repeats must be at least 1, got {args.repeats}")
        if "pipeline" in steps or args.device == "cpu":
            plan_text = pipeline_plan_text("gpu")
            (out / "plan.md").write_text(plan_text + "\n")
            print(plan_text, flush=True)
        failed = []
        for step in steps:
            if time.perf_counter() > deadline - 5:
                print(
                    f"==> {step}: not started, the command's {args.timeout_s:.0f} s are used up; run it again to go on",
                    flush=True,
                )
                failed.append(step)
                continue
            status = run_step(
                step,
                args.device,
                out,
                force=args.force,
                deadline=deadline,
                stages=stages,
                repeats=args.repeats,
                nanogpt=nanogpt,
                recipes=tuple(r.strip() for r in args.recipes.split(",") if r.strip()),
            )["status"]
            if status != "ok" and not status.startswith("skipped"):
                failed.append(step)
        if "summary" not in steps:  # every command leaves a current summary and tarball: a fresh GPU machine may follow
            run_step("summary", args.device, out)
        make_tarball(out)
        print(
            f"{'not finished: ' + ', '.join(failed) if failed else 'all steps ok'}; summary: {out / 'summary.md'}",
            flush=True,
        )
        return 1 if failed else 0
    except KitError as exc:
        print(f"gpu_kit: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
