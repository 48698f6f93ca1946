"""What only a CUDA GPU can show: `pytest -m gpu`, the first step of the GPU kit (`make gpu`).

Without CUDA every test here skips with its reason. `LABUTILS_GPU_TESTS_ON_CPU=1` (set by the kit's
CPU dry run, `make gpu DEVICE=cpu`) runs the device-agnostic ones on the CPU at small sizes, so their
own logic is exercised before a GPU ever sees them; the CUDA-only checks (fused kernels, fused
AdamW, NCCL, CUDA out-of-memory) still skip there.

Tolerances, stated once: bf16 + compile against eager fp32 over 200 steps: every 20-step mean of the
training loss within 0.08 (the loss falls by ~2 in that time, so a small shift in pace shows), the
last validation loss within 0.05 (bf16 keeps 8 bits of mantissa: the curves must overlap, not
match). Resume on CUDA: every loss within 0.02 (bf16 and atomics in attention's backward make two
runs drift apart a little; a resume that lost the optimiser state or the data position jumps by
more). Fused attention kernels in bf16: against fp32 on the same weights, at most twice the error of bf16
math, in the worst element and on average.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import train_with
from torch.nn.attention import SDPBackend, sdpa_kernel

from labutils import memory
from labutils import training as train_mod
from labutils.batches import StreamBatches, eval_batches
from labutils.data import prepare_data
from labutils.evaluation import Run
from labutils.files import REPO_ROOT
from labutils.generate import generate_tokens
from labutils.model import GPT, ModelConfig
from labutils.model.hf import export_hf
from labutils.training import build_optimizers
from labutils.validation import TrainingError

pytestmark = pytest.mark.gpu
HAS_CUDA = torch.cuda.is_available()
ON_CPU = not HAS_CUDA and os.environ.get("LABUTILS_GPU_TESTS_ON_CPU") == "1"
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (a CUDA-only kernel or library)")
ENV = {
    **os.environ,
    "PYTHONUNBUFFERED": "1",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
}

# The small model every training test uses: RoPE + GQA, as the final model.
MODEL = dict(preset="final-char", d_model=128, n_layer=4, n_head=4, n_kv_head=2, block_size=128)
if ON_CPU:
    MODEL.update(d_model=32, n_layer=1, n_head=2, n_kv_head=1, block_size=32)


@pytest.fixture(scope="module")
def device():
    if HAS_CUDA:
        return torch.device("cuda")
    if ON_CPU:
        return torch.device("cpu")
    pytest.skip("needs a CUDA GPU (LABUTILS_GPU_TESTS_ON_CPU=1 runs the device-agnostic ones on the CPU)")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_data("tinyshakespeare", "char", out_dir=tmp_path_factory.mktemp("data") / "char")


@pytest.fixture
def exact_fp32():
    """TF32 off: comparisons of two fp32 computations must not inherit the training loop's TF32 setting."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def small_model(device, seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=65, block_size=64, d_model=64, n_layer=2, n_head=4, tie_weights=False, init_std=0.2, **overrides
    )
    return GPT(ModelConfig(**cfg)).to(device).eval()


# --------------------------------------------------------------------------- training numerics


def test_compiled_bf16_training_follows_eager_fp32(device, data, tmp_path):
    """Both compile modes: the default, and reduce-overhead, whose step replays as CUDA graphs; and the blocks compiled
    one by one."""
    steps = 200
    common = dict(
        device=str(device),
        seed=0,
        lr=3e-3,
        warmup_steps=20,
        batch_size=16,
        max_steps=steps,
        eval_interval=steps,
        eval_batches=4,
        log_interval=20,
    )
    eager = train_with(MODEL, {**common, "dtype": "fp32", "compile": False}, data, tmp_path / "eager", progress=False)
    assert eager.summary["compile"] is False

    def windows(run):
        return run.history.train_loss.groupby(run.history.index // 20).mean()

    assert windows(eager).iloc[-1] < windows(eager).iloc[0] - 0.5, (
        "the model did not learn: the comparison proves nothing"
    )
    fast_dtype = "bf16" if HAS_CUDA else "fp32"  # CPU bf16 autocast is slow and not what this checks
    # compile_blocks (one compiled Block for every layer) on CUDA only: on the CPU dry run it is one more cold compile
    for mode, blocks in [("default", False), ("reduce-overhead", False)] + ([("default", True)] if HAS_CUDA else []):
        fast = train_with(
            MODEL,
            {**common, "dtype": fast_dtype, "compile": True, "compile_mode": mode, "compile_blocks": blocks},
            data,
            tmp_path / f"{mode}-{blocks}",
            progress=False,
        )
        assert fast.summary["compile"] is True and fast.summary["compile_mode"] == mode
        assert fast.summary["dtype"] == ("bfloat16" if HAS_CUDA else "float32")
        gap = (windows(fast) - windows(eager)).abs()
        assert gap.max() <= 0.08, (
            f"{mode}: 20-step mean losses differ by up to {gap.max():.4f}:\n"
            f"{pd.DataFrame({'eager': windows(eager), 'fast': windows(fast)})}"
        )
        assert abs(fast.summary["val_loss"] - eager.summary["val_loss"]) <= 0.05, mode


ATTENTION_KINDS = {
    "mha": dict(),
    "gqa": dict(attention="gqa", n_kv_head=2, pos="rope"),
    "mqa": dict(attention="mqa", pos="rope"),
    "mla": dict(attention="mla", q_rank=32, kv_rank=32, pos="rope"),
}


FUSED_BACKENDS = {
    "flash_or_efficient": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
}


@needs_cuda
@pytest.mark.parametrize("backend", list(FUSED_BACKENDS))
@pytest.mark.parametrize("case", ["causal", "padding_mask", "kv_cache"])
@pytest.mark.parametrize("kind", list(ATTENTION_KINDS))
def test_each_attention_kind_runs_on_a_fused_kernel_in_bf16(kind, case, backend):
    """With only fused backends allowed (flash and memory-efficient, or cuDNN), SDPA raises instead of falling back to
    math;
    a case cuDNN has no kernel for skips, naming it (torch's cuDNN attention leaves out some masks and shapes).

    Both bf16 computations, fused and math, round differently, so each is scored against the same
    weights in fp32: the fused kernel may be at most twice as far off as bf16 math is."""
    model = small_model("cuda", **ATTENTION_KINDS[kind]).to(torch.bfloat16)
    exact_model = small_model("cuda", **ATTENTION_KINDS[kind])
    exact_model.load_state_dict({k: v.float() for k, v in model.state_dict().items()})  # the bf16-rounded weights
    idx = torch.randint(0, 65, (4, 48), device="cuda")
    mask = torch.ones(4, 48, dtype=torch.bool, device="cuda")
    mask[:, :5] = False  # left padding

    def forward(model):
        if case == "causal":
            model.train()
            logits, loss = model(idx, idx)
            loss.backward()  # the backward kernels must be fused too
            model.eval()
            return logits.float()
        if case == "padding_mask":
            return model(idx, padding_mask=mask)[0].float()
        cache = model.new_cache()
        pieces = [model(idx[:, :32], cache=cache)[0], model(idx[:, 32:40], cache=cache)[0]]  # prefill, a chunk
        pieces += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(40, 48)]  # then decoding
        return torch.cat(pieces, dim=1).float()

    try:
        with sdpa_kernel(FUSED_BACKENDS[backend]):
            fused = forward(model)
    except RuntimeError as error:
        if backend != "cudnn" or "No available kernel" not in str(error):
            raise
        pytest.skip(f"cuDNN attention has no kernel for {kind}/{case} on torch {torch.__version__}: {str(error)[:200]}")
    with sdpa_kernel([SDPBackend.MATH]):
        bf16_math, exact = forward(model), forward(exact_model)
    keep = mask[:, :, None].expand_as(fused) if case == "padding_mask" else torch.ones_like(fused, dtype=torch.bool)
    fused_error, math_error = (fused - exact)[keep].abs(), (bf16_math - exact)[keep].abs()
    assert math_error.max() > 0, "bf16 math matched fp32 exactly: the comparison proves nothing"
    assert fused_error.max() <= 2 * math_error.max() and fused_error.mean() <= 2 * math_error.mean(), (
        f"fused max/mean error {fused_error.max():.4f}/{fused_error.mean():.5f} vs bf16 math "
        f"{math_error.max():.4f}/{math_error.mean():.5f}"
    )


@needs_cuda
def test_train_split_on_the_gpu_keeps_its_stored_width_and_todays_batches(data):
    """Issue 16: the split travels as 2-byte ids, and the batches are those of the int64 copy it replaced."""
    tokens = data.tokens("train")
    stored = StreamBatches(tokens, 64, 8, seed=5, device="cuda")
    widened = StreamBatches(torch.from_numpy(np.asarray(tokens, dtype=np.int64)), 64, 8, seed=5, device="cuda")
    assert stored.data.dtype == torch.int16 and stored.data.element_size() == 2
    for _ in range(5):
        (x1, y1), (x2, y2) = next(stored), next(widened)
        assert x1.dtype == torch.int64 and x1.is_cuda and torch.equal(x1, x2) and torch.equal(y1, y2)


@needs_cuda
def test_a_seed_draws_the_same_windows_on_the_gpu_as_on_the_cpu(data):
    """Issue 41: batches and evaluation windows come from a host generator, so a CPU and a GPU run of one config train
    and are scored on the same tokens, and a resume whose data device flips restores the generator."""
    tokens = data.tokens("train")
    on_cpu, on_gpu = StreamBatches(tokens, 64, 8, seed=5), StreamBatches(tokens, 64, 8, seed=5, device="cuda")
    for _ in range(3):
        (xc, yc), (xg, yg) = next(on_cpu), next(on_gpu)
        assert xg.is_cuda and torch.equal(xc, xg.cpu()) and torch.equal(yc, yg.cpu())
    flipped = StreamBatches(tokens, 64, 8, seed=0)
    flipped.load_state_dict(on_gpu.state_dict())
    assert torch.equal(next(flipped)[0], next(on_gpu)[0].cpu())
    windows = [
        torch.cat([x for x, _ in eval_batches(tokens, 64, 16, n_tokens=4096, device=d)]).cpu() for d in ("cpu", "cuda")
    ]
    assert torch.equal(*windows)


@needs_cuda
def test_training_uses_fused_adamw(data, tmp_path, monkeypatch):
    built = []

    def recording(*args, **kwargs):
        built.extend(build_optimizers(*args, **kwargs))
        return built

    monkeypatch.setattr(train_mod, "build_optimizers", recording)
    train_with(
        MODEL,
        dict(device="cuda", max_steps=3, warmup_steps=1, eval_interval=3, eval_batches=1, batch_size=4, compile=False),
        data,
        tmp_path / "run",
        progress=False,
    )
    adamw = [o for o in built if isinstance(o, torch.optim.AdamW)]
    assert adamw and all(o.defaults["fused"] is True for o in adamw)
    assert all(
        o.defaults["lr"] == 1e-3 and tuple(o.defaults["betas"]) == (0.9, 0.95) for o in adamw
    )  # from the TrainConfig
    assert all(p.is_cuda for o in adamw for g in o.param_groups for p in g["params"])


@pytest.mark.parametrize("kind", list(ATTENTION_KINDS))
def test_cached_generation_equals_uncached_greedy(device, kind, exact_fp32):
    model = small_model(device, **ATTENTION_KINDS[kind])
    prompt = list(range(3, 20))
    # 60 new tokens from a 17-token prompt run past block_size=64: the window slides too
    cached = list(generate_tokens(model, prompt, 60, temperature=0, use_cache=True))
    uncached = list(generate_tokens(model, prompt, 60, temperature=0, use_cache=False))
    assert cached == uncached
    assert len(set(cached)) > 2  # not a degenerate repetition


# Paths no GPU had run before issue 28 (fp16 with GradScaler, Muon, EMA, gradient checkpointing, accumulation,
# MoE, document batches, pinned host batches, the bf16 residual stream). Each trains a short eager run in the
# device's own dtype (eager: a cold compile of each would cost the visit minutes; compile has its own tests) and
# must learn: finite losses, and the last two logged losses 0.3 below the first two.
TRAINING_PATHS = {
    "fp16_grad_scaler": ({}, {"dtype": "fp16"}),
    "muon": ({}, {"optimizer": "muon"}),
    "ema": ({}, {"ema": 0.95}),
    "grad_checkpoint": ({"grad_checkpoint": True}, {}),
    "grad_accum": ({}, {"grad_accum_steps": 2, "batch_size": 8}),
    "moe": ({"mlp": "moe", "n_experts": 4}, {}),
    "document_batches": ({}, {"batch_mode": "document"}),
    "pinned_host_batches": ({}, {"data_on_device": False}),
    "bf16_residual": ({"low_precision_residual": True}, {}),
}


@pytest.mark.parametrize("path", list(TRAINING_PATHS))
def test_each_training_path_learns_on_the_device(path, device, data, tmp_path, monkeypatch):
    cuda_only = {
        "fp16_grad_scaler": "fp16 autocast with a gradient scaler",
        "pinned_host_batches": "host batches pinned for the copy",
    }
    if path in cuda_only and not HAS_CUDA:
        pytest.skip(f"{path}: a CUDA path ({cuda_only[path]})")
    model, train = TRAINING_PATHS[path]
    pinned = []
    if path == "pinned_host_batches":
        take = StreamBatches.__next__
        monkeypatch.setattr(
            StreamBatches, "__next__", lambda self: pinned.append(take(self)[0].is_pinned()) or take(self)
        )
    steps = 100
    common = dict(
        device=str(device),
        seed=0,
        lr=3e-3,
        warmup_steps=10,
        batch_size=16,
        max_steps=steps,
        eval_interval=steps,
        eval_batches=4,
        log_interval=10,
        compile=False,
        dtype="bf16" if HAS_CUDA else "fp32",
    )
    run = train_with({**MODEL, **model}, {**common, **train}, data, tmp_path / path, progress=False)
    losses = run.history.train_loss.to_numpy()
    assert np.isfinite(losses).all() and np.isfinite(run.summary["val_loss"]), f"{path}: {losses}"
    assert losses[-2:].mean() < losses[:2].mean() - 0.3, f"{path} did not learn: {losses}"
    if path == "fp16_grad_scaler":
        assert run.summary["dtype"] == "float16"
    if path == "ema":
        assert np.isfinite(run.evals["val_loss_ema"]).all()
    if path == "pinned_host_batches":
        assert pinned and all(pinned)


@pytest.mark.parametrize("kind", ["gqa", "mqa", "mla"])
def test_attention_with_a_padding_mask_compiles_to_what_eager_computes(kind, device, exact_fp32):
    """Forward and backward under torch.compile with a padding mask, against eager on the same weights (fp32)."""
    torch._dynamo.reset()
    model = small_model(device, **ATTENTION_KINDS[kind]).train()
    idx = torch.randint(0, 65, (4, 48), device=device)
    mask = torch.ones(4, 48, dtype=torch.bool, device=device)
    mask[:, :5] = False  # left padding
    targets = idx.masked_fill(~mask, -100)

    def loss_and_grads(forward):
        model.zero_grad(set_to_none=True)
        logits, loss = forward(idx, targets, padding_mask=mask)
        loss.backward()
        return logits[mask], loss, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    eager, compiled = loss_and_grads(model), loss_and_grads(torch.compile(model))
    torch.testing.assert_close(compiled[0], eager[0], atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(compiled[1], eager[1], atol=2e-5, rtol=2e-5)
    for got, expected in zip(compiled[2], eager[2], strict=True):
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-3)


# --------------------------------------------------------------------------- faults


def run_spec(folder: Path, data, device, out_dir: Path, **train_overrides) -> Path:
    spec = {
        "model": MODEL,
        "data": str(data.dir),
        "out_dir": str(out_dir),
        "train": {
            **dict(
                device=str(device),
                dtype="bf16" if HAS_CUDA else "fp32",
                compile=False,
                deterministic=True,
                seed=0,
                lr=3e-3,
                warmup_steps=10,
                batch_size=16,
                max_steps=300,
                eval_interval=25,
                eval_batches=4,
                checkpoint_interval=25,
                log_interval=5,
            ),
            **train_overrides,
        },
    }
    path = folder / f"{out_dir.name}.json"
    path.write_text(json.dumps(spec))
    return path


def test_killed_run_resumes_the_same_loss_curve(device, data, tmp_path):
    def command(out):
        return [
            sys.executable,
            "-m",
            "labutils.training",
            "--config",
            str(run_spec(tmp_path, data, device, out)),
            "--no-progress",
        ]

    reference = subprocess.run(
        command(tmp_path / "reference"), cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "killed"
    victim = subprocess.Popen(command(out), cwd=REPO_ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while (
        not (out / "checkpoints/last/manifest.json").exists()
        or len((out / "metrics.csv").read_text().splitlines()) < 100
    ):
        assert victim.poll() is None, f"the run ended before the kill: {victim.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert not (out / "summary.json").exists(), "the run finished before the kill: the test proved nothing"
    again = subprocess.run(command(out), cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed, whole = Run.load(out), Run.load(tmp_path / "reference")
    assert json.loads((out / "environment.json").read_text())["resumed_from_step"] > 0
    assert len(resumed.history) == len(whole.history) == 300
    torch.testing.assert_close(
        torch.tensor(resumed.history.train_loss.values),
        torch.tensor(whole.history.train_loss.values),
        atol=2e-2,
        rtol=0,
    )
    torch.testing.assert_close(
        torch.tensor(resumed.evals.val_loss.values), torch.tensor(whole.evals.val_loss.values), atol=2e-2, rtol=0
    )


@needs_cuda
def test_absurd_batch_gets_the_clear_out_of_memory_message(data, tmp_path, monkeypatch):
    free, _ = torch.cuda.mem_get_info()
    # logits alone (batch x block x vocab in bf16) would need 4x the free memory
    batch = int(4 * free / (MODEL["block_size"] * 65 * 2)) + 1
    config = dict(
        device="cuda",
        dtype="bf16",
        compile=False,
        batch_size=batch,
        eval_batch_size=4,
        max_steps=2,
        warmup_steps=0,
        eval_batches=1,
    )
    allocated = torch.cuda.memory_allocated()
    # the estimate refuses it before anything is allocated, with the advice a step that runs out gets
    with pytest.raises(
        TrainingError,
        match=rf"Out of memory on cuda(:\d+)?: one training step with a micro-batch of batch_size={batch} "
        r"x block_size=\d+ tokens needs about [\d,.]+ GiB \(an estimate\) "
        r"but [\d,.]+ GiB is available\. "
        r".*batch_size=\d+(, | with )grad_accum_steps=\d+.*grad_checkpoint=True",
    ):
        train_with(MODEL, config, data, tmp_path / "refused", progress=False)
    assert torch.cuda.memory_allocated() == allocated and not (tmp_path / "refused/checkpoints").exists()
    # without the estimate the first step runs out for real, and CUDA's error becomes the same advice
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: None)
    with pytest.raises(
        TrainingError,
        match=rf"Out of memory at step 1 on cuda(:\d+)? with a micro-batch of batch_size={batch} "
        r"x block_size=\d+ "
        r"tokens\. .*batch_size=\d+(, | with )grad_accum_steps=\d+",
    ):
        train_with(MODEL, config, data, tmp_path / "oom", progress=False)
    torch.cuda.empty_cache()
    # the device is usable afterwards: the error left nothing behind that blocks the next run
    ok = train_with(
        MODEL,
        dict(device="cuda", compile=False, batch_size=4, max_steps=2, warmup_steps=0, eval_batches=1),
        data,
        tmp_path / "after",
        progress=False,
    )
    assert ok.summary["status"] == "completed"


@needs_cuda
def test_torchrun_over_all_gpus_trains_with_ddp_over_nccl(data, tmp_path):
    gpus = torch.cuda.device_count()

    def spec(name, nproc):
        return run_spec(tmp_path, data, "cuda", tmp_path / name, batch_size=16 // nproc, max_steps=40, eval_interval=20)

    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={gpus}",
        "-m",
        "labutils.training",
        "--config",
        str(spec("ddp", gpus)),
        "--no-progress",
    ]
    result = subprocess.run(torchrun, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = Run.load(tmp_path / "ddp")
    assert ddp.summary["status"] == "completed" and ddp.summary["world_size"] == gpus
    if gpus < 2:
        # one GPU: the run above had no peer, so check that NCCL itself runs a collective on this machine
        probe = tmp_path / "nccl_probe.py"
        probe.write_text(
            "import torch, torch.distributed as d\n"
            "d.init_process_group('nccl', device_id=torch.device('cuda', 0))\n"
            "t = torch.ones(4, device='cuda'); d.all_reduce(t); assert t.sum().item() == 4\n"
            "d.destroy_process_group()\n"
        )
        nccl = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(probe)],
            cwd=REPO_ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert nccl.returncode == 0, nccl.stderr[-3000:]
        pytest.skip(
            "1 GPU: trained under torchrun and NCCL ran an all-reduce, but DDP across ranks needs 2 or more GPUs"
        )
    single = subprocess.run(
        [sys.executable, "-m", "labutils.training", "--config", str(spec("single", 1)), "--no-progress"],
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    one = Run.load(tmp_path / "single")
    assert one.summary["tokens"] == ddp.summary["tokens"]
    torch.testing.assert_close(
        torch.tensor(ddp.evals.val_loss.values), torch.tensor(one.evals.val_loss.values), atol=2e-2, rtol=0
    )


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("case", ["llama", "gpt2"])
def test_hugging_face_export_logits_match(device, case, tmp_path, exact_fp32):
    transformers = pytest.importorskip("transformers")
    fields = (
        dict(pos="rope", norm="rmsnorm", mlp="swiglu", attention="gqa", n_kv_head=2, bias=False)
        if case == "llama"
        else dict(pos="learned", norm="layernorm", mlp="gelu", bias=True)
    )
    model = small_model(device, **fields)
    export_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").to(device).eval()
    idx = torch.randint(0, 65, (2, 40), device=device)
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-4, rtol=1e-4)
    shutil.rmtree(tmp_path / "hf")
