"""nanoGPT's own train.py beside ours: its shakespeare_char recipe on the same machine, timed from launch.

Points at a nanoGPT checkout (never vendored or committed here), copies what its training runs
(train.py, model.py, configurator.py, config/) into a temporary folder, writes the data files its
data/shakespeare_char/prepare.py would write, from the bundled tiny Shakespeare (no download: the GPU
machines have no network), and runs `python train.py config/train_shakespeare_char.py` with its own
defaults. From its log lines, stamped with the seconds since launch: ms per iteration (median after
the first --skip iterations), when its val loss first reached --target, and its best val loss within
--within-s of launch. nanoGPT estimates its val loss on eval_iters random batches of the val split
(200 by its recipe), not on every token as time_to_target.py does: each number is read its own way,
and the table says so.

    python benchmarks/nanogpt_reference.py --nanogpt ~/src/nanoGPT --json nanogpt.result.json
"""

from __future__ import annotations

import time

LAUNCH = time.perf_counter()

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "data" / "tinyshakespeare.txt"
NEEDED = ("train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py")
ITER_LINE = re.compile(r"^iter (\d+): loss ([-\d.naninf]+), time ([\d.]+)ms")
EVAL_LINE = re.compile(r"^step (\d+): train loss ([-\d.naninf]+), val loss ([-\d.naninf]+)")


def check_checkout(nanogpt: Path) -> None:
    missing = [name for name in NEEDED if not (nanogpt / name).exists()]
    if missing:
        raise SystemExit(
            f"nanogpt_reference: {nanogpt} is not a nanoGPT checkout ({', '.join(missing)} missing); "
            "give the folder of a clone of github.com/karpathy/nanoGPT with NANOGPT=<path>"
        )


def write_shakespeare_char(folder: Path, corpus: Path = CORPUS) -> dict:
    """nanoGPT's char-level data format: the sorted characters of the whole text as the vocabulary, the
    first 90% as train.bin and the rest as val.bin (uint16 ids), and meta.pkl with vocab_size, stoi, itos."""
    text = corpus.read_text()
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([stoi[ch] for ch in text], dtype=np.uint16)
    cut = int(len(text) * 0.9)
    folder.mkdir(parents=True, exist_ok=True)
    ids[:cut].tofile(folder / "train.bin")
    ids[cut:].tofile(folder / "val.bin")
    with open(folder / "meta.pkl", "wb") as fh:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, fh)
    return {"vocab_size": len(chars), "train_tokens": cut, "val_tokens": len(text) - cut}


def checkout_commit(nanogpt: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=nanogpt, capture_output=True, text=True, timeout=10)
        return (out.stdout.strip() or None) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def run(
    nanogpt: Path, overrides: list[str], budget_s: float, python: str = sys.executable
) -> tuple[list[tuple[float, str]], int, bool]:
    """Run nanoGPT's training in a temporary copy; its output lines with seconds since this script's launch,
    its exit code, and whether it was stopped at `budget_s` from launch."""
    with tempfile.TemporaryDirectory(prefix="nanogpt-") as tmp:
        work = Path(tmp)
        for name in NEEDED[:-1]:
            shutil.copy2(nanogpt / name, work / name)
        shutil.copytree(nanogpt / "config", work / "config")
        write_shakespeare_char(work / "data" / "shakespeare_char")
        command = [python, "train.py", "config/train_shakespeare_char.py", "--out_dir=out", *overrides]
        proc = subprocess.Popen(
            command,
            cwd=work,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        lines, stopped = [], False
        for line in proc.stdout:
            lines.append((time.perf_counter() - LAUNCH, line.rstrip("\n")))
            if time.perf_counter() - LAUNCH > budget_s:
                proc.kill()
                stopped = True
                break
        proc.wait()
        return lines, proc.returncode, stopped


def read_log(lines: list[tuple[float, str]], *, target: float, within_s: float, skip: int) -> dict:
    """ms/iteration, time to target and best val loss from nanoGPT's own log lines."""
    iters = [(int(m[1]), float(m[3])) for _, line in lines if (m := ITER_LINE.match(line))]
    evals = [
        {"step": int(m[1]), "val_loss": float(m[3]), "seconds_from_launch": t}
        for t, line in lines
        if (m := EVAL_LINE.match(line))
    ]
    steady = [ms for it, ms in iters if it >= skip] or [ms for _, ms in iters]
    reached = next((e for e in evals if e["val_loss"] <= target), None)
    early = [e for e in evals if e["seconds_from_launch"] <= within_s]
    best = min(early, key=lambda e: e["val_loss"]) if early else None
    return {
        "ms_per_step": statistics.median(steady) if steady else None,
        "iterations": max((it for it, _ in iters), default=None),
        "seconds_to_target": reached["seconds_from_launch"] if reached else None,
        "step_at_target": reached["step"] if reached else None,
        "best_val_loss_within": best["val_loss"] if best else None,
        "best_at_s": best["seconds_from_launch"] if best else None,
        "evals": evals,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--nanogpt", required=True, help="a nanoGPT checkout (its train.py, model.py, configurator.py, config/)"
    )
    parser.add_argument("--target", type=float, default=1.47)
    parser.add_argument("--within-s", type=float, default=60.0, help="best val loss within this many seconds of launch")
    parser.add_argument("--budget-s", type=float, default=75.0, help="stop nanoGPT this many seconds after launch")
    parser.add_argument("--skip", type=int, default=20, help="iterations left out of the median (compilation, warm-up)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="more of nanoGPT's own overrides, e.g. --set compile=False",
    )
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    nanogpt = Path(args.nanogpt).expanduser().resolve()
    check_checkout(nanogpt)
    lines, code, stopped = run(nanogpt, [f"--{kv}" for kv in args.set], args.budget_s, args.python)
    figures = read_log(lines, target=args.target, within_s=args.within_s, skip=args.skip)
    if code not in (0, None) and not stopped:
        print("\n".join(line for _, line in lines[-20:]))
        print(f"nanogpt_reference: nanoGPT's train.py exited with {code}", file=sys.stderr)
    print(
        f"date {datetime.date.today()}  nanoGPT {checkout_commit(nanogpt) or 'unknown commit'}  overrides "
        f"{args.set or 'none'}"
    )
    print(f"ms/iteration (median after {args.skip}): {figures['ms_per_step']}")
    print(
        f"time to val loss <= {args.target}: {figures['seconds_to_target']} s from launch (nanoGPT's "
        f"{len(figures['evals'])} estimates)"
    )
    print(f"best val loss within {args.within_s:.0f} s: {figures['best_val_loss_within']} at {figures['best_at_s']} s")
    if args.json:
        record = {
            "date": str(datetime.date.today()),
            "recipe": "nanoGPT train.py config/train_shakespeare_char.py",
            "target": args.target,
            "within_s": args.within_s,
            "overrides": args.set,
            "nanogpt_commit": checkout_commit(nanogpt),
            "returncode": code,
            "stopped_at_budget": stopped,
            "total_s": time.perf_counter() - LAUNCH,
            "eval": "nanoGPT's estimate (eval_iters random batches of val)",
            **figures,
        }
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0 if stopped or code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
