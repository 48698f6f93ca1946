"""Tokens per second of small-model training on the CPU: one process with every thread, against N worker
processes that split the threads between them (what `devices="cpu*N"` does for a study, a search or a sweep).

    python benchmarks/cpu_workers.py                       # the cpu profile's 03 shape (MiniGPT), 2 workers
    python benchmarks/cpu_workers.py --preset final-char --set d_model=96 --set n_layer=3 --workers 2

Both arms train the same model on the same random batches in the same run, one after the other; the
figure to read is the ratio, measured here, not the absolute speed of this machine.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import torch

from labutils.hardware import pin_worker
from labutils.model import GPT, get_preset


def train_steps(preset: str, overrides: dict, batch_size: int, steps: int, sharing: int) -> float:
    """Seconds for `steps` AdamW steps after three warm-up steps, on this process's share of the threads."""
    pin_worker("cpu", sharing)
    torch.manual_seed(0)
    model = GPT(get_preset(preset, **overrides))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    vocab, block = model.config.vocab_size, model.config.block_size
    x, y = torch.randint(0, vocab, (batch_size, block)), torch.randint(0, vocab, (batch_size, block))
    for step in range(steps + 3):
        if step == 3:
            started = time.perf_counter()
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="minigpt")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a model field (ints only)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    overrides = {"vocab_size": 65, **{k: int(v) for k, v in (s.split("=", 1) for s in args.set)}}
    job = (args.preset, overrides, args.batch_size, args.steps)
    tokens = args.batch_size * get_preset(args.preset, **overrides).block_size * args.steps

    ctx = mp.get_context("spawn")  # as the study's workers: fresh processes, each with the default thread count
    with ctx.Pool(1) as pool:
        alone = pool.apply(train_steps, (*job, 1))
    with ctx.Pool(args.workers) as pool:
        shared = pool.starmap(train_steps, [(*job, args.workers)] * args.workers)
    one, many = tokens / alone, tokens * args.workers / max(shared)
    print(
        f"{args.preset} {overrides}, batch {args.batch_size}, {args.steps} steps, {torch.get_num_threads()} threads "
        "here"
    )
    print(f"one process, every thread:          {one:10,.0f} tokens/s")
    print(f"{args.workers} processes, threads split:     {many:10,.0f} tokens/s in all")
    print(f"ratio: {many / one:.2f}x")


if __name__ == "__main__":
    main()
