"""Training-step speed of a preset: ms/step, tokens/s, MFU and peak memory, eager vs torch.compile.

Times the same step the training loop runs (forward under autocast, backward, clip, optimiser step)
on random tokens already on the device, so data loading and evaluation are left out. Every mode runs
in one process on the same shapes; the compiled/eager ratio is measured, not assumed. Modes:
eager, compiled (torch.compile's default mode), and any other torch.compile mode by name
(reduce-overhead: CUDA graphs; max-autotune-no-cudagraphs). --profile prints, for the last mode,
where a step's time goes: the GPU's busy time against the wall clock (the rest is launch overhead
and host work) and the kernels that take most of it.

    python benchmarks/train_speed.py --preset final-char --batch-size 64 --dtype bf16
    python benchmarks/train_speed.py --preset nanogpt-char --batch-size 64 --dtype bf16 --modes eager,compiled,reduce-overhead --profile
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


COMPILE_MODES = {"compiled": None, "reduce-overhead": "reduce-overhead", "max-autotune": "max-autotune",
                 "max-autotune-no-cudagraphs": "max-autotune-no-cudagraphs"}


def measure(cfg, args, device: torch.device, dtype: torch.dtype, mode: str, profile: bool = False) -> dict:
    torch._dynamo.reset()  # each mode compiles afresh, so TORCH_LOGS=recompiles shows only recompiles within a mode
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    optimizers = build_optimizers(model, TrainConfig(lr=1e-3, weight_decay=0.1, optimizer=args.optimizer), fused=device.type == "cuda")
    step_model = model if mode == "eager" else torch.compile(model, mode=COMPILE_MODES[mode])
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
    if profile:
        try:  # the figures above must survive a profiler that fails on this build
            profile_steps(step, device, ms_per_step=1000 * seconds / args.steps)
        except Exception as exc:  # noqa: BLE001
            print(f"profile failed: {type(exc).__name__}: {exc}")
    return {
        "mode": mode,
        "ms_per_step": 1000 * seconds / args.steps,
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * model.flops_per_token() / peak if peak else float("nan"),
        "peak_memory_mb": hardware.peak_memory_mb(device),
        "warmup_s": warmup_s,
    }


def profile_steps(step, device: torch.device, ms_per_step: float, steps: int = 10) -> None:
    """Print where a step's time goes: device busy time per step against the wall clock, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    events = prof.key_averages()
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type.name == "CUDA"]
        busy_ms = sum(e.self_device_time_total for e in kernels) / 1000 / steps
        launches = sum(e.count for e in kernels) / steps
        print(f"profile: the GPU is busy {busy_ms:.2f} ms of a {ms_per_step:.2f} ms step ({busy_ms / ms_per_step:.0%}), "
              f"{launches:.0f} kernels a step; the rest is launch overhead and host work")
        print(events.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=70))
    else:
        print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70))


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
    parser.add_argument("--modes", default="eager,compiled", help=f"comma-separated: eager, {', '.join(COMPILE_MODES)}")
    parser.add_argument("--profile", action="store_true", help="print where the last mode's step time goes (torch.profiler)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="ModelConfig override, e.g. --set d_model=128 --set n_kv_head=2 (values read as JSON)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON (the GPU kit reads them)")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m != "eager" and m not in COMPILE_MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from eager, {', '.join(COMPILE_MODES)}")

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
    print(f"date {datetime.date.today()}  device {hardware.device_name(device)}  torch {torch.__version__}  "
          f"python {platform.python_version()}")
    print(f"preset {args.preset}  params {GPT(cfg).num_params() / 1e6:.2f}M  batch {args.batch_size} x block "
          f"{cfg.block_size}  dtype {str(dtype).removeprefix('torch.')}  optimizer {args.optimizer}  steps {args.steps}")
    print(f"{'mode':<16} {'ms/step':>9} {'tokens/s':>11} {'MFU':>7} {'peak MiB':>9} {'warm-up s':>9}")
    results = {}
    for i, mode in enumerate(modes):
        r = measure(cfg, args, device, dtype, mode, profile=args.profile and i == len(modes) - 1)
        results[r["mode"]] = r
        mfu = "n/a" if math.isnan(r["mfu"]) else f"{r['mfu']:.1%}"  # no peak FLOP/s known for CPUs and MPS
        memory = "n/a" if math.isnan(r["peak_memory_mb"]) else f"{r['peak_memory_mb']:.0f}"
        print(f"{r['mode']:<16} {r['ms_per_step']:9.2f} {r['tokens_per_s']:11.0f} {mfu:>7} {memory:>9} {r['warmup_s']:9.1f}")
    ratio = None
    if {"eager", "compiled"} <= set(results):
        ratio = results["eager"]["ms_per_step"] / results["compiled"]["ms_per_step"]
        print(f"compiled/eager speed-up: {ratio:.2f}x (same process, same shapes)")
    for mode in set(results) - {"eager", "compiled"}:
        if "eager" in results:
            print(f"{mode}/eager speed-up: {results['eager']['ms_per_step'] / results[mode]['ms_per_step']:.2f}x")
    if args.json:
        record = {"date": str(datetime.date.today()), "device": hardware.device_name(device), "torch": torch.__version__,
                  "preset": args.preset, "params": GPT(cfg).num_params(), "batch_size": args.batch_size, "block_size": cfg.block_size,
                  "dtype": str(dtype).removeprefix("torch."), "steps": args.steps, "compiled_speedup": ratio,
                  "modes": {mode: {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}  # strict JSON
                            for mode, r in results.items()}}
        with open(args.json, "w") as fh:
            json.dump(record, fh, indent=2)


if __name__ == "__main__":
    main()
