"""Training-step speed of a preset: ms/step, tokens/s, MFU and peak memory, eager vs torch.compile.

Times the same step the training loop runs (forward under autocast, backward, clip, optimiser step)
on random tokens already on the device, so data loading and evaluation are left out. Every mode runs
in one process on the same shapes; the compiled/eager ratio is measured, not assumed. Modes:
eager, compiled (torch.compile's default mode), and any other torch.compile mode by name
(reduce-overhead: CUDA graphs; max-autotune-no-cudagraphs), and speed levers, each switched on
alone on top of --lever-base: blocks (one compiled Block for every layer), dropout0, relu2, bf16_residual,
pad_vocab64. Peak memory is given twice: allocated, and reserved (which holds the CUDA-graph pool). --profile prints,
for the last mode, where a step's time goes: the GPU's busy time against the wall clock (the rest is
launch overhead and host work) and every kernel with its share of the step.

    python benchmarks/train_speed.py --preset final-char --batch-size 64 --dtype bf16
    python benchmarks/train_speed.py --preset nanogpt-char --batch-size 64 --dtype bf16 --modes
    eager,compiled,reduce-overhead --profile
    python benchmarks/train_speed.py --preset nanogpt-char --batch-size 64 --dtype bf16 --modes
    reduce-overhead,blocks,dropout0,relu2
    python benchmarks/train_speed.py --preset final-char --device cpu --batch-size 4 --block-size 64 --steps 5
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import time

import torch

from labutils import hardware
from labutils.config import TrainConfig
from labutils.model import GPT, PRESETS, get_preset
from labutils.training import build_optimizers, forward_backward


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


COMPILE_MODES = {
    "compiled": None,
    "reduce-overhead": "reduce-overhead",
    "max-autotune": "max-autotune",
    "max-autotune-no-cudagraphs": "max-autotune-no-cudagraphs",
}
# Speed levers, each switched on alone on top of --lever-base (default reduce-overhead): ModelConfig changes, and
# whether the blocks are compiled one by one (one compiled Block reused for every layer) instead of the whole model.
LEVERS = {
    "blocks": ({}, True),
    # a speed recipe: no dropout masks
    "dropout0": ({"dropout": 0.0, "emb_dropout": None, "attn_dropout": None, "resid_dropout": None}, False),
    "relu2": (
        {"mlp": "relu2"},
        False,
    ),  # relu(x)^2 instead of GELU: a cheaper activation, fused into the matmul epilogue
    "bf16_residual": ({"low_precision_residual": True}, False),  # the residual stream in bf16 under autocast
    # the embedding and head rows padded to a multiple of 64 (nanoGPT's 50304 for GPT-2's 50257): aligned matmul
    # shapes; the batches keep drawing from the real vocabulary, so the padded rows are never a target
    "pad_vocab64": (lambda cfg: {"vocab_size": -(-cfg.vocab_size // 64) * 64}, False),
}


def lever_changes(mode: str, cfg) -> dict:
    """The ModelConfig changes of a lever for this config (none for a compile mode)."""
    changes = LEVERS.get(mode, ({}, False))[0]
    return changes(cfg) if callable(changes) else changes


def measure(cfg, args, device: torch.device, dtype: torch.dtype, mode: str, profile: bool = False) -> dict:
    torch._dynamo.reset()  # each mode compiles afresh, so TORCH_LOGS=recompiles shows only recompiles within a mode
    torch.manual_seed(0)
    changes, per_block = lever_changes(mode, cfg), LEVERS.get(mode, ({}, False))[1]
    compile_mode = COMPILE_MODES[args.lever_base] if mode in LEVERS else COMPILE_MODES.get(mode)
    model = GPT(cfg.replace(**changes)).to(device)
    optimizers = build_optimizers(
        model, TrainConfig(lr=1e-3, weight_decay=0.1, optimizer=args.optimizer), fused=device.type == "cuda"
    )
    if mode == "eager":
        step_model = model
    elif per_block:
        for block in model.blocks:
            block.compile(mode=compile_mode, backend=args.compile_backend)
        step_model = model
    else:
        step_model = torch.compile(model, mode=compile_mode, backend=args.compile_backend)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.block_size), device=device)
    y = torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.block_size), device=device)
    params = list(model.parameters())

    def step() -> None:
        forward_backward(step_model, [(x, y)], autocast=autocast, scaler=scaler)
        for opt in optimizers:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for opt in optimizers:
            scaler.step(opt)
        scaler.update()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(args.warmup):  # includes compilation for the compiled model
        step()
    sync(device)
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    seconds = time.perf_counter() - start
    tokens_per_s = args.steps * args.batch_size * cfg.block_size / seconds
    peak = hardware.peak_flops(device, dtype)
    kernels = None
    if profile:
        try:  # the figures above must survive a profiler that fails on this build
            kernels = profile_steps(step, device, ms_per_step=1000 * seconds / args.steps)
        except Exception as exc:  # noqa: BLE001
            print(f"profile failed: {type(exc).__name__}: {exc}")
    return {
        "mode": mode,
        "ms_per_step": 1000 * seconds / args.steps,
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * model.flops_per_token() / peak if peak else float("nan"),
        "peak_memory_mb": hardware.peak_memory_mb(device),
        # reserved: what the caching allocator holds, CUDA graphs' private memory pool included (allocated leaves it
        # out)
        "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20 if device.type == "cuda" else float("nan"),
        "warmup_s": warmup_s,
        "kernels": kernels,
    }


def profile_steps(step, device: torch.device, ms_per_step: float, steps: int = 10) -> list[dict]:
    """Print where a step's time goes, every kernel with its share of the step (the device's busy time against
    the wall clock of the profiled steps, or ms_per_step if longer; the rest is launch overhead and host work),
    and return the table."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        # shares are of these steps' own wall clock: the profiler slows a step, and a busy machine slows
        # one timing more than another, so the unprofiled ms_per_step could be shorter than a kernel's time
        ms_per_step = max(ms_per_step, (time.perf_counter() - start) * 1000 / steps)
    events = [e for e in prof.key_averages() if (e.device_type.name == "CUDA") == cuda]
    time_of = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    rows = sorted(
        (
            {"kernel": e.key, "calls_per_step": e.count / steps, "ms_per_step": time_of(e) / 1000 / steps}
            for e in events
            if time_of(e) > 0
        ),
        key=lambda r: -r["ms_per_step"],
    )
    busy = sum(r["ms_per_step"] for r in rows)
    where = "the GPU" if cuda else "the CPU's own operators"
    print(
        f"profile: {where} busy {busy:.3f} ms of a {ms_per_step:.3f} ms step ({busy / ms_per_step:.0%}), "
        f"{sum(r['calls_per_step'] for r in rows):.0f} {'kernels' if cuda else 'operator calls'} a step; "
        f"{max(ms_per_step - busy, 0):.3f} ms is launch overhead and host work"
    )
    print(f"{'share':>6} {'ms/step':>8} {'calls':>6}  kernel (all of them)")
    for r in rows:
        r["share_of_step"] = r["ms_per_step"] / ms_per_step
        print(f"{r['share_of_step']:6.1%} {r['ms_per_step']:8.4f} {r['calls_per_step']:6.1f}  {r['kernel'][:110]}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="final-char", choices=sorted(PRESETS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--vocab-size", type=int, default=65, help="for presets whose vocabulary comes from the data")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    parser.add_argument(
        "--modes",
        default="eager,compiled",
        help=f"comma-separated: eager, {', '.join(COMPILE_MODES)}, "
        f"or a speed lever on top of --lever-base: {', '.join(LEVERS)}",
    )
    parser.add_argument(
        "--lever-base",
        default="reduce-overhead",
        choices=sorted(COMPILE_MODES),
        help="the compile mode levers run under",
    )
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile's backend: inductor (what is timed), or aot_eager (the GPU kit's CPU dry run: the same "
        "graph capture and autograd split, without inductor's code generation, which takes tens of seconds cold)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="print where the last mode's step time goes (torch.profiler)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="ModelConfig override, e.g. --set d_model=128 --set n_kv_head=2 (values read as JSON)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON (the GPU kit reads them)")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m != "eager" and m not in COMPILE_MODES and m not in LEVERS]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from eager, {', '.join(COMPILE_MODES)}, {', '.join(LEVERS)}")

    device = hardware.select_device(args.device)
    dtype = hardware.resolve_dtype(args.dtype, device)
    overrides = {"block_size": args.block_size} if args.block_size else {}
    if PRESETS[args.preset].get("vocab_size") is None:
        overrides["vocab_size"] = args.vocab_size
    for item in args.set:
        field, _, value = item.partition("=")
        try:
            overrides[field] = json.loads(value)
        except json.JSONDecodeError:
            overrides[field] = value
    cfg = get_preset(args.preset, **overrides)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    print(
        f"date {datetime.date.today()}  device {hardware.device_name(device)}  torch {torch.__version__}  "
        f"python {platform.python_version()}"
    )
    print(
        f"preset {args.preset}  params {GPT(cfg).num_params() / 1e6:.2f}M  batch {args.batch_size} x block "
        f"{cfg.block_size}  dtype {str(dtype).removeprefix('torch.')}  optimizer {args.optimizer}  steps {args.steps}"
    )
    print(f"{'mode':<16} {'ms/step':>9} {'tokens/s':>11} {'MFU':>7} {'peak MiB':>9} {'reserved':>9} {'warm-up s':>9}")
    results = {}
    for i, mode in enumerate(modes):
        r = measure(cfg, args, device, dtype, mode, profile=args.profile and i == len(modes) - 1)
        results[r["mode"]] = r
        mfu = "n/a" if math.isnan(r["mfu"]) else f"{r['mfu']:.1%}"  # no peak FLOP/s known for CPUs and MPS
        memory, reserved = (
            "n/a" if math.isnan(r[k]) else f"{r[k]:.0f}" for k in ("peak_memory_mb", "peak_reserved_mb")
        )
        print(
            f"{r['mode']:<16} {r['ms_per_step']:9.2f} {r['tokens_per_s']:11.0f} {mfu:>7} {memory:>9} {reserved:>9} "
            f"{r['warmup_s']:9.1f}"
        )
    ratio = None
    if {"eager", "compiled"} <= set(results):
        ratio = results["eager"]["ms_per_step"] / results["compiled"]["ms_per_step"]
        print(f"compiled/eager speed-up: {ratio:.2f}x (same process, same shapes)")
    for mode in set(results) - {"eager", "compiled"}:
        if "eager" in results:
            print(f"{mode}/eager speed-up: {results['eager']['ms_per_step'] / results[mode]['ms_per_step']:.2f}x")
    if args.json:
        record = {
            "date": str(datetime.date.today()),
            "device": hardware.device_name(device),
            "torch": torch.__version__,
            "lever_base": args.lever_base,
            "compile_backend": args.compile_backend,
            "levers": {m: lever_changes(m, cfg) or "compile each Block" for m in modes if m in LEVERS},
            "preset": args.preset,
            "params": GPT(cfg).num_params(),
            "batch_size": args.batch_size,
            "block_size": cfg.block_size,
            "dtype": str(dtype).removeprefix("torch."),
            "steps": args.steps,
            "compiled_speedup": ratio,
            "modes": {
                mode: {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}  # strict JSON
                for mode, r in results.items()
            },
        }
        with open(args.json, "w") as fh:
            json.dump(record, fh, indent=2)


if __name__ == "__main__":
    main()
