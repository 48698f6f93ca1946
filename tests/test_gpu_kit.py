"""The GPU kit (benchmarks/gpu_kit.py) on the CPU: the parts of its dry run that take seconds, so it cannot rot.

The whole dry run (`make gpu DEVICE=cpu`) adds the GPU tests' CPU half and the smoke pipeline,
which the suite covers elsewhere (tests/test_gpu.py, tests/test_notebooks.py).
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from labutils.files import REPO_ROOT

spec = importlib.util.spec_from_file_location("gpu_kit", REPO_ROOT / "benchmarks" / "gpu_kit.py")
kit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kit)


def run_kit(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "benchmarks/gpu_kit.py", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
    )


FAKE_NANOGPT = """# A stand-in for nanoGPT's train.py: reads the data as nanoGPT's does and logs in its format.
import os, pickle, sys
import numpy as np
args = dict(a[2:].split("=", 1) for a in sys.argv[2:] if a.startswith("--"))
assert sys.argv[1] == "config/train_shakespeare_char.py" and os.path.exists(sys.argv[1]) and args["out_dir"] == "out"
meta = pickle.load(open("data/shakespeare_char/meta.pkl", "rb"))
train = np.fromfile("data/shakespeare_char/train.bin", dtype=np.uint16)
val = np.fromfile("data/shakespeare_char/val.bin", dtype=np.uint16)
assert meta["vocab_size"] == 65 and len(train) == int(0.9 * 1115394) and len(train) + len(val) == 1115394
assert "".join(meta["itos"][i] for i in train[:14]) == "First Citizen:" and meta["stoi"]["F"] == train[0]
for it in range(int(args["max_iters"]) + 1):
    if it % int(args["eval_interval"]) == 0:
        print(f"step {it}: train loss {4.25 - it * 0.1:.4f}, val loss {4.2 - it * 0.1:.4f}", flush=True)
    print(f"iter {it}: loss {4.0 - it * 0.05:.4f}, time {500.0 if it == 0 else 5.0 + it % 2:.2f}ms, mfu -100.00%",
    flush=True)
"""


def fake_nanogpt(folder: Path) -> Path:
    (folder / "config").mkdir(parents=True)
    (folder / "train.py").write_text(FAKE_NANOGPT)
    for name in ("model.py", "configurator.py", "config/train_shakespeare_char.py"):
        (folder / name).write_text("")
    return folder


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    # where a real dry run goes (ignored by git), so the path scan below sees what a committed kit folder would hold
    out = REPO_ROOT / "results" / "gpu" / f"test-{os.getpid()}-cpu-dryrun"
    nanogpt = fake_nanogpt(tmp_path_factory.mktemp("nanoGPT"))
    result = run_kit(
        "run",
        "--device",
        "cpu",
        "--steps",
        "env,speed,target,nanogpt,summary",
        "--repeats",
        "2",
        "--nanogpt",
        str(nanogpt),
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    yield out, result
    shutil.rmtree(out, ignore_errors=True)
    out.with_name(out.name + ".tar.gz").unlink(missing_ok=True)


@pytest.mark.slow
def test_dry_run_records_every_figure_with_its_versions(dry_run):
    out, result = dry_run
    env = json.loads((out / "step-env.json").read_text())
    assert env["status"] == "ok" and env["device"] == "cpu" and env["torch"].startswith("2.") and env["commit"]
    assert all(env["packages"][name] for name in kit.KIT_PACKAGES)
    speed_step = json.loads((out / "step-speed.json").read_text())
    assert speed_step["commit"] and set(speed_step["results"]) == {"speed", "speed-minigpt", "speed-final"}
    speed = speed_step["results"]["speed"]
    assert set(speed["modes"]) == {"eager", "compiled", "dropout0"} and speed["modes"]["eager"]["ms_per_step"] > 0
    assert speed["compiled_speedup"] == pytest.approx(
        speed["modes"]["eager"]["ms_per_step"] / speed["modes"]["compiled"]["ms_per_step"]
    )
    kernels = speed["modes"]["dropout0"]["kernels"]  # the profiled mode: every kernel with its share of the step
    assert len(kernels) > 15 and all(0 < k["share_of_step"] <= 1 for k in kernels)
    targets = json.loads((out / "step-target.json").read_text())["results"]
    assert sorted(targets) == ["target-smoke-1", "target-smoke-2"]  # the repeats: cold, then warm
    target = targets["target-smoke-1"]
    assert (
        target["eval"] == "whole split" and target["last10pct_val_loss"] > 0 and target["seconds_to_target"] is not None
    )
    assert target["ms_per_step"] > 0 and target["best_val_loss_within"] is not None
    # nanoGPT's split (no test tokens) went to a folder of its own, not over the pipeline's
    # data/prepared/tinyshakespeare-char
    nanogpt_split = json.loads((REPO_ROOT / "data/prepared/tinyshakespeare-char-nanogpt-split/meta.json").read_text())[
        "splits"
    ]
    assert nanogpt_split == {"train": 0.9, "val": 0.1, "test": 0.0}
    nano = json.loads((out / "step-nanogpt.json").read_text())["results"]["nanogpt-1"]
    assert (
        nano["ms_per_step"] in (5.0, 5.5, 6.0)
        and nano["evals"][0]["val_loss"] == 4.2
        and nano["seconds_to_target"] is not None
    )
    summary = (out / "summary.md").read_text()
    eager_ms = f"{speed['modes']['eager']['ms_per_step']:.2f}"
    assert f"| eager | {eager_ms} |" in summary and "| smoke | 2 |" in summary and "| tests | not run |" in summary
    assert "| nanoGPT train.py | 5.00" in summary or "| nanoGPT train.py | 5.50" in summary
    assert "every kernel (" in summary and "ran at commit" in summary
    assert "Plan of the `gpu`-profile pipeline" in result.stdout and (out / "plan.md").exists()
    assert json.loads((out / "summary.json").read_text())["environment"]["torch"] == env["torch"]
    for path in out.rglob("*"):
        if path.is_file() and ".compile-cache" not in path.parts:
            assert str(REPO_ROOT) not in path.read_text(errors="replace"), f"{path.name} holds a path of this machine"


@pytest.mark.slow
def test_dry_run_tarball_holds_the_folder_without_weights(dry_run):
    out, _ = dry_run
    tarball = out.with_name(out.name + ".tar.gz")
    assert tarball.stat().st_size <= kit.TARBALL_LIMIT
    with tarfile.open(tarball) as tar:
        names = tar.getnames()
    assert (
        f"{out.name}/summary.md" in names
        and f"{out.name}/step-speed.json" in names
        and f"{out.name}/speed.log" in names
    )
    assert not any(n.endswith(".pt") for n in names)


@pytest.mark.slow
def test_finished_steps_are_skipped_and_failed_ones_run_again(dry_run, monkeypatch, capsys):
    out, _ = dry_run
    before = (out / "step-speed.json").read_text()
    # in this process, as main() calls it (a second kit process would spend seconds on imports and the plan)
    assert (
        kit.run_step("speed", "cpu", out)["status"] == "ok"
        and "speed: finished earlier, skipped" in capsys.readouterr().out
    )
    assert (out / "step-speed.json").read_text() == before

    calls = []

    def failing_then_working(step, device, folder, stages=None, **kwargs):
        calls.append(step)
        code = 3 if len(calls) == 1 else 0
        return [("probe", [sys.executable, "-c", f"import sys; print('probe'); sys.exit({code})"])]

    monkeypatch.setattr(kit, "step_commands", failing_then_working)
    first = kit.run_step("probe", "cpu", out)
    assert first["status"] == "failed: probe" and first["processes"][0]["returncode"] == 3
    assert kit.run_step("probe", "cpu", out)["status"] == "ok"  # a failed step is not skipped
    assert kit.run_step("probe", "cpu", out)["status"] == "ok" and len(calls) == 2  # a finished one is


def test_a_step_past_its_time_limit_is_stopped_and_says_how_to_go_on(tmp_path, monkeypatch):
    monkeypatch.setattr(
        kit, "step_commands", lambda *args, **kw: [("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])]
    )
    record = kit.run_step("sleeper", "cpu", tmp_path, deadline=time.perf_counter() + 1)
    assert (
        record["status"] == "failed: sleeper" and record["processes"][0]["returncode"] == 124 and record["seconds"] < 30
    )
    assert "run the same command again" in (tmp_path / "sleeper.log").read_text()


def test_pipeline_step_runs_the_chosen_stages_and_stays_partial_until_all_ran(tmp_path, monkeypatch):
    commands = kit.step_commands("pipeline", "cpu", tmp_path, ["04", "05"])
    assert commands[0][1][-2:] == ["notebooks/04_tuning.ipynb", "notebooks/05_final_model.ipynb"]
    assert "--results-dir" in commands[0][1] and "smoke" in commands[0][1]
    assert kit.step_commands("pipeline", "cuda", tmp_path)[0][1][-6:-5] == ["gpu"]  # all five notebooks follow
    for stage in kit.STAGE_NAMES[:2]:
        (tmp_path / "pipeline" / stage).mkdir(parents=True)
        (tmp_path / "pipeline" / stage / "run.json").write_text(json.dumps({"ok": True, "seconds": 3.0}))
    assert set(kit.collect("pipeline", tmp_path)["stages"]) == set(kit.STAGE_NAMES[:2])
    monkeypatch.setattr(kit, "step_commands", lambda *args, **kw: [("pipeline", [sys.executable, "-c", "pass"])])
    record = kit.run_step("pipeline", "cpu", tmp_path)
    assert record["status"] == f"partial: {', '.join(kit.STAGE_NAMES[2:])} not run yet"
    assert kit.run_step("pipeline", "cpu", tmp_path)["processes"]  # partial is not finished: it runs again


def test_unknown_step_and_missing_env_are_clear_errors(tmp_path):
    result = run_kit("run", "--device", "cpu", "--steps", "speed,warp", "--out", str(tmp_path))
    assert result.returncode == 2 and "unknown step(s) ['warp']" in result.stderr
    with pytest.raises(kit.KitError, match="no step-env.json: run the env step first"):
        kit.write_summary(tmp_path)


def test_junit_results_count_and_explain(tmp_path):
    (tmp_path / "t.xml").write_text(
        '<testsuites><testsuite><testcase name="a" time="1.5"/><testcase name="b"><skipped message="needs a CUDA '
        'GPU"/></testcase>'
        '<testcase name="c"><failure message="math fallback"/></testcase></testsuite></testsuites>'
    )
    result = kit.junit_results(tmp_path / "t.xml")
    assert (result["passed"], result["failed"], result["skipped"]) == (1, 1, 1)
    assert {c["test"]: c["detail"] for c in result["cases"]}["c"] == "math fallback"


def fake_summary(folder: Path, device: str = "cuda") -> Path:
    folder.mkdir(parents=True)
    env = {
        "date": "2026-01-01",
        "device": device,
        "gpu": "NVIDIA H100 80GB HBM3" if device == "cuda" else None,
        "driver": "580.1",
        "cuda": "13.0",
        "torch": "2.11.0+cu130",
        "python": "3.12.3",
        "commit": "abc123",
    }
    speed = {
        "preset": "nanogpt-char",
        "params": 10_700_000,
        "batch_size": 64,
        "block_size": 256,
        "dtype": "bfloat16",
        "compiled_speedup": 2.5,
        "modes": {
            m: {
                "ms_per_step": ms,
                "tokens_per_s": 16384 / ms * 1000,
                "mfu": 0.3,
                "peak_memory_mb": 2000,
                "warmup_s": 1.0,
            }
            for m, ms in (("eager", 10.0), ("compiled", 4.0))
        },
    }
    steps = {
        "speed": {"status": "ok", "results": {"speed": speed}},
        "target": {
            "status": "ok",
            "results": {
                "target-nanogpt-char": {
                    "recipe": "nanogpt-char",
                    "target": 1.47,
                    "params": 10_700_000,
                    "seconds_to_target": 41.5,
                    "best_val_loss": 1.45,
                    "best_at_s": 60.0,
                    "last10pct_val_loss": 1.4612,
                    "tokens_per_s": 4e6,
                }
            },
        },
    }
    (folder / "summary.json").write_text(json.dumps({"environment": env, "steps": steps}))
    return folder


def test_publish_writes_the_figures_between_the_markers_only(tmp_path):
    folder = fake_summary(tmp_path / "results/gpu/run")
    readme, bench = tmp_path / "README.md", tmp_path / "bench.md"
    for path in (readme, bench):
        path.write_text(f"# Title\nbefore\n{kit.MARK_BEGIN}\nold figures\n{kit.MARK_END}\nafter\n")
    kit.publish(folder, readme, bench)
    text, figures = readme.read_text(), bench.read_text()
    assert (
        "old figures" not in text and text.startswith("# Title\nbefore\n") and text.endswith(f"{kit.MARK_END}\nafter\n")
    )
    assert (
        "| nanogpt-char step, batch 64x256 bfloat16 (compiled) | 4.00 ms |" in text and "NVIDIA H100 80GB HBM3" in text
    )
    assert "| compiled | 4.00 | 4,096,000 | 30.0% | 2000 | n/a | 1.0 |" in figures
    assert "Compiled/eager speed-up in the same process: 2.50x" in figures
    assert (
        "| nanogpt-char | 1 | n/a | 41.5 |" in figures
        and "| nanoGPT train.py | not run (NANOGPT=<checkout>) |" in figures
    )
    kit.publish(folder, readme, bench)
    assert readme.read_text() == text and bench.read_text() == figures  # publishing twice changes nothing


def test_publish_refuses_a_dry_run_and_files_without_markers(tmp_path):
    dry = fake_summary(tmp_path / "dry", device="cpu")
    readme = tmp_path / "README.md"
    readme.write_text(f"{kit.MARK_BEGIN}\n{kit.MARK_END}\n")
    with pytest.raises(kit.KitError, match="is a CPU dry run"):
        kit.publish(dry, readme, readme)
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    with pytest.raises(kit.KitError, match="has no <!-- gpu-kit:begin -->"):
        kit.publish(fake_summary(tmp_path / "gpu"), plain, readme)
    assert plain.read_text() == "no markers\n"  # nothing written on failure


def test_tarball_drops_full_reports_before_it_gives_up(tmp_path, monkeypatch):
    out = tmp_path / "kit"
    (out / "pipeline/02_baseline/checkpoints").mkdir(parents=True)
    (out / "summary.md").write_text("# figures\n")
    (out / "pipeline/02_baseline/02_baseline.reader.html").write_text("reader")
    (out / "pipeline/02_baseline/02_baseline.html").write_bytes(os.urandom(200_000))  # incompressible
    (out / "pipeline/02_baseline/checkpoints/model.pt").write_bytes(b"weights")
    monkeypatch.setattr(kit, "TARBALL_LIMIT", 100_000)
    with tarfile.open(kit.make_tarball(out)) as tar:
        names = tar.getnames()
    assert "kit/pipeline/02_baseline/02_baseline.reader.html" in names and "kit/summary.md" in names
    assert "kit/pipeline/02_baseline/02_baseline.html" not in names and not any("checkpoints" in n for n in names)
    monkeypatch.setattr(kit, "TARBALL_LIMIT", 10)
    with pytest.raises(kit.KitError, match="does not fit"):
        kit.make_tarball(out)


# --------------------------------------------------------------------------- the wheelhouse


def make_wheel(folder: Path, name: str, version: str = "0.1", body: str = "VALUE = 42\n") -> Path:
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"{name}/__init__.py", body)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return wheel


def test_wheelhouse_never_keeps_what_the_image_has(tmp_path):
    for name in ("torch", "numpy", "nvidia_cublas", "papermill", "SQLAlchemy", "Jinja2", "optuna"):
        (tmp_path / f"{name}-1.0-py3-none-any.whl").write_bytes(b"")
    kept = [w.name.split("-")[0] for w in kit.prune_wheelhouse(tmp_path)]
    assert kept == ["SQLAlchemy", "optuna", "papermill"]


def test_wheelhouse_installs_into_its_folder_and_leaves_torch_alone(tmp_path):
    house, site = tmp_path / "whl", tmp_path / "site"
    house.mkdir()
    make_wheel(house, "kitprobe")
    assert kit.install_wheelhouse(sys.executable, house, site) is True
    assert (site / "kitprobe" / "__init__.py").exists()
    probe = subprocess.run(
        [sys.executable, "-c", "import kitprobe, torch; print(kitprobe.VALUE, torch.__file__)"],
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
    )
    assert probe.returncode == 0 and probe.stdout.startswith("42 ") and str(site) not in probe.stdout
    assert kit.install_wheelhouse(sys.executable, house, site) is False  # installed already: nothing to do


def test_a_wheel_that_would_shadow_torch_is_refused(tmp_path):
    house, site = tmp_path / "whl", tmp_path / "site"
    house.mkdir()
    make_wheel(house, "torch", "2.0.0", body="__version__ = '2.0.0+fake'\n")
    with pytest.raises(kit.KitError, match="would change torch"):
        kit.install_wheelhouse(sys.executable, house, site)
    assert not (site / ".installed").exists()


def test_install_pipeline_moves_the_gpu_reports_in_and_archives_the_cpu_ones(tmp_path):
    results = tmp_path / "repo/results"
    (results / "02_baseline").mkdir(parents=True)
    (results / "02_baseline/run.json").write_text(json.dumps({"ok": True, "seconds": 41.0}))
    (results / "02_baseline/baseline.json").write_text('{"profile": "cpu"}')
    folder = fake_summary(tmp_path / "kit")
    (folder / "pipeline/02_baseline").mkdir(parents=True)
    (folder / "pipeline/02_baseline/run.json").write_text(json.dumps({"ok": True, "seconds": 12.0}))
    (folder / "pipeline/02_baseline/baseline.json").write_text('{"profile": "gpu"}')
    assert kit.install_pipeline(folder, results) == ["02_baseline"]
    assert json.loads((results / "02_baseline/baseline.json").read_text()) == {"profile": "gpu"}
    archived = list((tmp_path / "repo/archive/02_baseline").iterdir())
    assert len(archived) == 1 and json.loads((archived[0] / "baseline.json").read_text()) == {"profile": "cpu"}
    reason = (archived[0] / "REASON.txt").read_text()
    assert "gpu-profile run of the GPU kit (2026-01-01, NVIDIA H100 80GB HBM3, torch 2.11.0+cu130" in reason
    assert (results / "index.html").exists() and not (folder / "pipeline/02_baseline").exists()
    with pytest.raises(kit.KitError, match="holds no finished stage"):
        kit.install_pipeline(folder, results)


def test_the_readmes_have_the_sections_publish_writes():
    for path in (REPO_ROOT / "README.md", REPO_ROOT / "benchmarks" / "README.md"):
        text = path.read_text()
        assert (
            text.count(kit.MARK_BEGIN) == 1
            and text.count(kit.MARK_END) == 1
            and text.index(kit.MARK_BEGIN) < text.index(kit.MARK_END)
        ), path


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or __import__("torch").cuda.is_available(),
    reason="shows the skip on a machine without CUDA",
)
def test_gpu_tests_skip_cleanly_without_cuda(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LABUTILS_GPU_TESTS_ON_CPU"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "tests/test_gpu.py",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={tmp_path / 'gpu.xml'}",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:]
    counts = kit.junit_results(tmp_path / "gpu.xml")
    assert counts["passed"] == counts["failed"] == 0 and counts["skipped"] >= 20
    assert all("needs a CUDA GPU" in c["detail"] for c in counts["cases"])


def test_scrub_makes_checkout_paths_relative(tmp_path):
    # a pytest skip in JUnit XML and a torch log line name files by absolute path; a committed kit folder must not
    (tmp_path / "tests.xml").write_text(f'<skipped message="1 GPU">{REPO_ROOT}/tests/test_gpu.py:258: 1 GPU</skipped>')
    (tmp_path / "speed.log").write_text(
        f"Recompiling function forward in {REPO_ROOT}/labutils/model/gpt.py:110\n"
        f"{sys.prefix}/lib/site-packages/torch/profiler.py:224: UserWarning\n"
    )
    (tmp_path / "weights.pt").write_bytes(b"left alone")
    kit.scrub_checkout_paths(tmp_path)
    assert (tmp_path / "tests.xml").read_text() == '<skipped message="1 GPU">tests/test_gpu.py:258: 1 GPU</skipped>'
    assert (tmp_path / "speed.log").read_text() == (
        "Recompiling function forward in labutils/model/gpt.py:110\n"
        "<python>/lib/site-packages/torch/profiler.py:224: UserWarning\n"
    )
    assert (tmp_path / "weights.pt").read_bytes() == b"left alone"


@pytest.mark.slow
def test_a_cut_timed_step_runs_only_the_repeats_it_lacks(dry_run, monkeypatch):
    out, _ = dry_run
    lost = out / "target-smoke-2.result.json"
    kept = lost.read_text()
    lost.unlink()
    record = json.loads((out / "step-target.json").read_text())
    (out / "step-target.json").write_text(json.dumps({**record, "status": "failed: target-smoke-2"}))
    # the step's own commands, each standing in for a timed run by writing that run's result (the dry run timed them)
    real = kit.step_commands
    monkeypatch.setattr(
        kit,
        "step_commands",
        lambda *args, **kw: [
            (name, [sys.executable, "-c", f"open({argv[-1]!r}, 'w').write({kept!r})"])
            for name, argv in real(*args, **kw)
        ],
    )
    again = kit.run_step("target", "cpu", out, repeats=2)
    assert again["status"] == "ok" and [p["name"] for p in again["processes"]] == ["target-smoke-2"]
    assert sorted(again["results"]) == ["target-smoke-1", "target-smoke-2"]


def test_nanogpt_step_without_a_checkout_is_skipped_and_says_how(tmp_path):
    assert kit.run_step("nanogpt", "cpu", tmp_path)["status"].startswith(
        "skipped: no nanoGPT checkout given (NANOGPT=<path>"
    )
    result = run_kit(
        "run", "--device", "cpu", "--steps", "nanogpt", "--nanogpt", str(tmp_path / "nowhere"), "--out", str(tmp_path)
    )
    assert result.returncode == 2 and "no train.py there" in result.stderr


def test_nanogpt_reference_reads_nanogpts_own_log_lines():
    spec = importlib.util.spec_from_file_location(
        "nanogpt_reference", REPO_ROOT / "benchmarks" / "nanogpt_reference.py"
    )
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    lines = [
        (1.0, "step 0: train loss 4.2000, val loss 4.1900"),
        (2.0, "iter 0: loss 4.2000, time 9000.00ms, mfu -100.00%"),
        *[
            (2.0 + i / 10, f"iter {i}: loss 3.0000, time {6.0 if i % 2 else 8.0:.2f}ms, mfu 20.00%")
            for i in range(1, 40)
        ],
        (30.0, "step 250: train loss 1.4000, val loss 1.4650"),
        (70.0, "step 500: train loss 1.3000, val loss 1.4400"),
    ]
    figures = ref.read_log(lines, target=1.47, within_s=60, skip=5)
    assert (
        figures["ms_per_step"] in (6.0, 7.0, 8.0)
        and figures["seconds_to_target"] == 30.0
        and figures["step_at_target"] == 250
    )
    assert figures["best_val_loss_within"] == 1.465  # the 1.44 came after 60 s


def test_the_gpu_plan_fits_one_command_and_uses_measured_step_times(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_plan", REPO_ROOT / "benchmarks" / "gpu_plan.py")
    plan = sys.modules.setdefault("gpu_plan", importlib.util.module_from_spec(spec))
    spec.loader.exec_module(plan)
    from labutils import profiles

    rows = {r.name: r for r in plan.pipeline_plan("gpu")}
    assert tuple(rows) == kit.STAGE_NAMES and sum(r.seconds for r in rows.values()) <= plan.COMMAND_LIMIT_S
    nb03 = profiles.notebook_defaults("03_ablations")
    ablation = profiles.ablation_study(
        "gpu", profiles.baseline("gpu", 65), nb03["arms"], skip=profiles.skip_for(nb03["skip_arms"], "gpu")
    )
    checked = (
        len([v for v, o in ablation.variants.items() if not profiles.sets_lr(o)]) * 2
    )  # each at 0.5x and 2x its LR
    # every variant at 5 paired seeds, and the LR check
    assert rows["03_ablations"].runs == len(ablation.variants) * 5 + checked and rows["03_ablations"].workers == 4
    assert (
        rows["04_tuning"].runs >= 40 + 3 * 5 and rows["04_tuning"].workers == 4
    )  # >= 40 trials and the 3-arm confirmation
    assert rows["02_baseline"].runs == len(profiles.LR_GRID["gpu"])  # the LR sweep
    assert rows["02_baseline"].source == "derived from nanogpt-char"
    assert (
        rows["05_final_model"].runs > 1 + 2 * 3 * 3
    )  # the sizing sweep's runs (five depths, three budgets) and the final run
    # once a visit has measured a shape, the plan takes that figure
    measured = tmp_path / "2027-01-01-nvidia-h200"
    measured.mkdir()
    base = profiles.baseline("gpu", 65)
    from labutils.model import GPT

    (measured / "speed-minigpt.result.json").write_text(
        json.dumps(
            {
                "params": GPT(base.model).num_params(),
                "batch_size": 32,
                "block_size": 64,
                "modes": {"eager": {"ms_per_step": 1.25}},
            }
        )
    )
    assert plan.measured_step_ms(base, kit_root=tmp_path) == (1.25, "measured 2027-01-01-nvidia-h200")
    assert "which fits one 9-minute GPU command" in plan.plan_table(list(rows.values()))


def test_the_speed_levers_change_only_what_they_name():
    speed_spec = importlib.util.spec_from_file_location("train_speed", REPO_ROOT / "benchmarks" / "train_speed.py")
    speed = importlib.util.module_from_spec(speed_spec)
    speed_spec.loader.exec_module(speed)
    from labutils.model import ModelConfig

    char, gpt2 = (
        ModelConfig(vocab_size=65, block_size=8, d_model=16, n_layer=1, n_head=2),
        ModelConfig(vocab_size=50257),
    )
    assert speed.lever_changes("pad_vocab64", char) == {"vocab_size": 128}
    assert speed.lever_changes("pad_vocab64", gpt2) == {"vocab_size": 50304}  # nanoGPT's padded GPT-2 vocabulary
    assert speed.lever_changes("pad_vocab64", char.replace(vocab_size=128)) == {"vocab_size": 128}
    assert speed.lever_changes("bf16_residual", char) == {"low_precision_residual": True}
    assert speed.lever_changes("reduce-overhead", char) == {} and speed.LEVERS["blocks"][1] is True
    for mode in speed.LEVERS:  # every lever builds a valid model
        char.replace(**speed.lever_changes(mode, char))


def test_the_final_run_gets_at_least_half_of_every_profiles_planned_training_flops():
    """Issue 50: the compute goes to the answer. The plan counts every run the notebooks build (trials unpruned, no
    size added at an edge, so the studies' share is if anything overstated) and the final's seeds at their budget."""
    spec = importlib.util.spec_from_file_location("gpu_plan", REPO_ROOT / "benchmarks" / "gpu_plan.py")
    plan = sys.modules.setdefault("gpu_plan", importlib.util.module_from_spec(spec))
    spec.loader.exec_module(plan)
    from labutils import profiles
    from labutils.model import model_shape

    for profile in ("cpu", "gpu"):
        flops = plan.training_flops(profile)
        assert set(flops) == {"02_baseline", "03_ablations", "04_tuning", "05_sizing", "05_final"}
        assert all(v > 0 for v in flops.values())
        final = profiles.final(profile, 65)
        per_seed = final.train.max_tokens * model_shape(final.model).flops_per_token()
        assert flops["05_final"] == pytest.approx(profiles.FINAL_SEEDS[profile] * per_seed, rel=0.01)
        assert flops["05_final"] >= sum(flops.values()) / 2, (profile, flops)
    assert "The final run's share of the planned training FLOPs" in plan.plan_table(plan.pipeline_plan("gpu"))
