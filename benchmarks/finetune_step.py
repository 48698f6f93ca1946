"""How long a fine-tuning step of a GPT-2-small-shaped checkpoint takes here: import, then optimiser steps.

Builds a randomly initialised GPT-2 small (124M parameters, transformers' own config class) in a temporary folder,
imports it with labutils.import_hf, and times AdamW steps at the context and batch sizes the notebooks' profiles
use, so a user can choose `steps` / `max_tokens` for a CPU or GPU before starting. Random weights train as fast as
pretrained ones. Prints one line per size.

    .venv/bin/python benchmarks/finetune_step.py [--device cpu] [--steps 3]
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from labutils.model.hf import import_hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per size (after one untimed)")
    parser.add_argument("--sizes", default="8x64,32x64,8x256", help="batch x block pairs")
    args = parser.parse_args()
    import transformers

    with tempfile.TemporaryDirectory() as folder:
        transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(folder)
        started = time.perf_counter()
        model = import_hf(Path(folder)).to(args.device).train()
        print(
            f"import: {time.perf_counter() - started:.1f} s for {model.num_params() / 1e6:.1f}M parameters "
            f"(torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads)"
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-5)
    for size in args.sizes.split(","):
        batch, block = (int(n) for n in size.split("x"))
        x = torch.randint(0, 50257, (batch, block), device=args.device)
        times = []
        for i in range(args.steps + 1):
            started = time.perf_counter()
            _, loss = model(x, x)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - started)
        step = sorted(times)[len(times) // 2]
        print(
            f"batch {batch} x block {block}: {step:.2f} s a step (median of {len(times)}), {batch * block / step:,.0f} "
            "tokens/s"
        )


if __name__ == "__main__":
    main()
