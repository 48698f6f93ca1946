"""Training-step speed of a preset: ms/step, tokens/s, MFU and peak memory, eager vs torch.compile.

Times the same step the training loop runs (forward under autocast, backward, clip, optimiser step)
on random tokens already on the device, so data loading and evaluation are left out. Both modes run
in one process on the same shapes; the compiled/eager ratio is measured, not assumed.

    python benchmarks/train_speed.py --preset final-char --batch-size 64 --dtype bf16
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


def measure(cfg, args, device: torch.device, dtype: torch.dtype, compiled: bool) -> dict:
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    optimizers = build_optimizers(model, TrainConfig(lr=1e-3, weight_decay=0.1, optimizer=args.optimizer), fused=device.type == "cuda")
    step_model = torch.compile(model) if compiled else model
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
    return {
        "mode": "compiled" if compiled else "eager",
        "ms_per_step": 1000 * seconds / args.steps,
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * model.flops_per_token() / peak if peak else float("nan"),
        "peak_memory_mb": hardware.peak_memory_mb(device),
        "warmup_s": warmup_s,
    }


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
    parser.add_argument("--modes", default="eager,compiled", help="comma-separated: eager, compiled")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="ModelConfig override, e.g. --set d_model=128 --set n_kv_head=2 (values read as JSON)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON (the GPU kit reads them)")
    args = parser.parse_args()

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
    print(f"{'mode':<9} {'ms/step':>9} {'tokens/s':>11} {'MFU':>7} {'peak MiB':>9} {'warm-up s':>9}")
    results = {}
    for mode in args.modes.split(","):
        r = measure(cfg, args, device, dtype, compiled=mode.strip() == "compiled")
        results[r["mode"]] = r
        mfu = "n/a" if math.isnan(r["mfu"]) else f"{r['mfu']:.1%}"  # no peak FLOP/s known for CPUs and MPS
        memory = "n/a" if math.isnan(r["peak_memory_mb"]) else f"{r['peak_memory_mb']:.0f}"
        print(f"{r['mode']:<9} {r['ms_per_step']:9.2f} {r['tokens_per_s']:11.0f} {mfu:>7} {memory:>9} {r['warmup_s']:9.1f}")
    ratio = None
    if {"eager", "compiled"} <= set(results):
        ratio = results["eager"]["ms_per_step"] / results["compiled"]["ms_per_step"]
        print(f"compiled/eager speed-up: {ratio:.2f}x (same process, same shapes)")
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
