"""Data preparation and loading at scale: MB/s, peak memory, and the data share of a training step.

Builds a synthetic corpus of --size-mb (tiny Shakespeare's paragraphs, shuffled and repeated, one
document per JSON line, so it runs offline), then, each in a fresh process so peak memory is its own:

1. tiktoken's own `encode_ordinary_batch` on the same documents and cores, timing only the encoder
   (the ceiling preparation is measured against);
2. `prepare_data` on the corpus: MB/s and peak resident memory;
3. training steps on CPU from the prepared memory map: time spent drawing batches against the
   whole step, and the resident memory the data adds beyond the model;
4. document mode and whole-split evaluation from the same map: the memory document batches keep
   (chunk bounds) against the padded int64 rows they built before, and a pass over every window of
   val (what eval_full and `evaluate` score) against the int64 copy of the split it made before;
5. where the page cache can be dropped (root): drawing batches from a cold cache, with the
   kernel's default read-ahead and with the random-access advice labutils gives the map.

    python benchmarks/data_scale.py --size-mb 200
    python benchmarks/data_scale.py --size-mb 2000 --tokenizer gpt2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rss_mb(kind: str = "VmRSS") -> float:
    """Resident MB: all of it (VmRSS), file-backed pages such as a memory map's (RssFile), or the heap's (RssAnon)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(f"{kind}:")) / 1024


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def build_corpus(path: Path, size_mb: float, seed: int = 0) -> None:
    """Tiny Shakespeare's paragraphs, reshuffled each round, written as JSON lines until the file is size_mb."""
    paragraphs = [p for p in (REPO / "data" / "tinyshakespeare.txt").read_text().split("\n\n") if p.strip()]
    rng, target, written = random.Random(seed), size_mb * 1e6, 0
    with open(path, "w") as out:
        while written < target:
            rng.shuffle(paragraphs)
            for start in range(0, len(paragraphs), 8):  # documents of 8 paragraphs: ~1.2 kB, a short story's page
                line = json.dumps({"text": "\n\n".join(paragraphs[start : start + 8])}) + "\n"
                out.write(line)
                written += len(line)
                if written >= target:
                    return


def ceiling(corpus: Path, tokenizer: str) -> dict:
    """tiktoken's batch encoder alone on the corpus' documents (read outside the clock), as prepare_data batches
    them."""
    from labutils.corpora import open_corpus
    from labutils.data import CHUNK_CHARS
    from labutils.tokenizers import get_tokenizer

    encoding, batch, chars, total, seconds = get_tokenizer(tokenizer).encoding, [], 0, 0, 0.0

    def encode() -> float:
        start = time.perf_counter()
        encoding.encode_ordinary_batch(batch, num_threads=os.cpu_count() or 1)
        return time.perf_counter() - start

    for doc, _ in open_corpus(corpus).documents():
        batch.append(doc)
        chars += len(doc)
        if chars >= CHUNK_CHARS:
            seconds += encode()
            total, batch, chars = total + chars, [], 0
    if batch:
        seconds += encode()
        total += chars
    return {"m_chars": total / 1e6, "seconds": seconds, "m_chars_per_s": total / 1e6 / seconds}


def prepare(corpus: Path, tokenizer: str, out_dir: Path) -> dict:
    from labutils.data import prepare_data

    start = time.perf_counter()
    prepared = prepare_data(corpus, tokenizer, out_dir=out_dir, force=True, progress=False)
    seconds = time.perf_counter() - start
    size, chars = corpus.stat().st_size, sum(prepared.meta["characters"].values())
    return {
        "corpus_mb": size / 1e6,
        "seconds": seconds,
        "mb_per_s": size / 1e6 / seconds,
        "m_chars_per_s": chars / 1e6 / seconds,
        "peak_rss_mb": peak_rss_mb(),
        "tokens": prepared.meta["tokens"],
        "dtype": prepared.meta["dtype"],
    }


def train_steps(prepared_dir: Path, steps: int = 10) -> dict:
    """CPU steps of a small model: data time (drawing the batch) against the whole step, and the memory the data
    adds."""
    import numpy as np
    import torch

    from labutils.batches import StreamBatches
    from labutils.config import TrainConfig
    from labutils.data import load_prepared
    from labutils.model import GPT, ModelConfig
    from labutils.training import build_optimizers, forward_backward

    torch.manual_seed(0)
    prepared = load_prepared(prepared_dir)
    cfg = ModelConfig(vocab_size=prepared.vocab_size, block_size=256, d_model=128, n_layer=4, n_head=4, pos="rope")
    model = GPT(cfg)
    optimizers = build_optimizers(model, TrainConfig(lr=1e-3))
    fake = torch.randint(0, cfg.vocab_size, (16, 257))

    def step(x, y):
        forward_backward(model, [(x, y)], autocast=torch.autocast("cpu", enabled=False))
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(3):  # activations, optimiser state and the allocator's pools exist before the data does
        step(fake[:, :-1], fake[:, 1:])
    before, before_anon = rss_mb("RssFile"), rss_mb("RssAnon")
    batches = StreamBatches(prepared.tokens("train"), cfg.block_size, 16, seed=0)
    data_s = step_s = 0.0
    for _ in range(steps):
        start = time.perf_counter()
        x, y = next(batches)
        drawn = time.perf_counter()
        step(x, y)
        data_s += drawn - start
        step_s += time.perf_counter() - start
    data_rss, heap_rss = rss_mb("RssFile") - before, rss_mb("RssAnon") - before_anon
    before = rss_mb()
    copy = torch.from_numpy(np.asarray(prepared.tokens("train"), dtype=np.int64))  # what training made before issue 16
    copy_rss = rss_mb() - before
    del copy
    return {
        "steps": steps,
        "batch": "16 x 256",
        "ms_per_step": 1000 * step_s / steps,
        "data_ms_per_step": 1000 * data_s / steps,
        "data_share": data_s / step_s,
        "data_rss_mb": data_rss,
        "heap_growth_mb": heap_rss,
        "int64_copy_rss_mb": copy_rss,
        "train_tokens": prepared.meta["tokens"]["train"],
    }


def documents_and_evaluation(prepared_dir: Path, steps: int = 20) -> dict:
    """Document-mode batches of 16 x 256 from the train map, then one pass over every 256-token window of val:
    time and the heap each adds (RssAnon), beside what the int64 rows and copies made before would take."""
    from labutils.batches import DocumentBatches, tiled_batches
    from labutils.data import load_prepared

    prepared = load_prepared(prepared_dir)
    train, val = prepared.tokens("train"), prepared.tokens("val")
    heap = rss_mb("RssAnon")
    start = time.perf_counter()
    sampler = DocumentBatches(train, prepared.doc_starts("train"), 256, 16, pad_id=prepared.pad_id, seed=0)
    built = time.perf_counter()
    for _ in range(steps):
        next(sampler)
    drawn = time.perf_counter()
    document_heap = rss_mb("RssAnon") - heap
    heap = rss_mb("RssAnon")
    targets = sum(int(y.numel()) for _, y in tiled_batches(val, 256, 64))
    walked = time.perf_counter()
    chunks = len(sampler)
    return {
        "chunks": chunks,
        "padded_rows_mb": chunks * (257 + 1) * 8 / 2**20,  # int64 rows and lengths, as before
        "documents_build_s": built - start,
        "document_ms_per_batch": 1000 * (drawn - built) / steps,
        "document_heap_mb": document_heap,
        "val_tokens": len(val),
        "val_targets": targets,
        "val_pass_s": walked - drawn,
        "val_pass_heap_mb": rss_mb("RssAnon") - heap,
        "val_int64_copy_mb": 8 * len(val) / 2**20,
    }


def cold_batches(prepared_dir: Path, advice: str, batches: int = 100) -> dict:
    """Draw batches from a split whose pages are not cached (the caller drops the page cache first):
    with the map's random-access advice ("random", what labutils does) or the kernel's default read-ahead
    ("default")."""
    import numpy as np

    from labutils import batches as batches_mod
    from labutils import data

    if advice == "default":
        data._random_access_map = lambda path, dtype, n: np.memmap(path, dtype=dtype, mode="r", shape=(n,))
    prepared = data.load_prepared(prepared_dir)
    before, sampler = rss_mb("RssFile"), batches_mod.StreamBatches(prepared.tokens("train"), 256, 16, seed=1)
    start = time.perf_counter()
    for _ in range(batches):
        next(sampler)
    return {
        "advice": advice,
        "batches": batches,
        "ms_per_batch": 1000 * (time.perf_counter() - start) / batches,
        "mapped_rss_mb": rss_mb("RssFile") - before,
    }


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (needs root); False where that is not allowed."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


def in_subprocess(function: str, *args: str) -> dict:
    """Run one measurement in a fresh interpreter, so its peak memory is its own."""
    code = (
        f"import json, sys; sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(REPO / 'benchmarks')!r}); "
        "import data_scale as d; from pathlib import Path; "
        f"print(json.dumps(d.{function}(*[Path(a) if '/' in a else a for a in sys.argv[1:]])))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"}
    )
    if result.returncode != 0:
        sys.exit(f"{function} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=200)
    parser.add_argument("--tokenizer", default="gpt2")
    parser.add_argument(
        "--workdir", help="where the corpus and prepared files go (default: a temporary folder, removed after)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        corpus = work / f"synthetic-{args.size_mb:g}mb.jsonl"
        if not corpus.exists():
            start = time.perf_counter()
            build_corpus(corpus, args.size_mb)
            print(
                f"built {corpus.name}: {corpus.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - start:.0f} s",
                flush=True,
            )
        import torch

        print(f"{os.cpu_count()} cores, torch {torch.__version__}, tokenizer {args.tokenizer}", flush=True)
        top = in_subprocess("ceiling", str(corpus), args.tokenizer)
        print(
            f"tiktoken encode_ordinary_batch alone: {top['m_chars_per_s']:.2f} M characters/s ({top['m_chars']:.0f}M "
            "characters in "
            f"{top['seconds']:.0f} s)",
            flush=True,
        )
        prep = in_subprocess("prepare", str(corpus), args.tokenizer, str(work / "prepared"))
        print(
            f"prepare_data: {prep['m_chars_per_s']:.2f} M characters/s, {prep['mb_per_s']:.2f} MB/s of file "
            f"({prep['seconds']:.0f} s; "
            f"{prep['m_chars_per_s'] / top['m_chars_per_s']:.0%} of the ceiling), "
            f"peak RSS {prep['peak_rss_mb']:.0f} MB, {sum(prep['tokens'].values()) / 1e6:.1f}M tokens "
            f"({prep['dtype']})",
            flush=True,
        )
        steps = in_subprocess("train_steps", str(work / "prepared"))
        print(
            f"training on CPU ({steps['batch']}): {steps['ms_per_step']:.1f} ms/step, data "
            f"{steps['data_ms_per_step']:.2f} ms "
            f"({steps['data_share']:.1%} of the step); the memory map holds {steps['data_rss_mb']:.0f} MB resident "
            "after "
            f"{steps['steps']} steps (the heap grew {steps['heap_growth_mb']:.0f} MB); the whole-split int64 copy "
            "training made "
            f"before: {steps['int64_copy_rss_mb']:.0f} MB",
            flush=True,
        )
        docs = in_subprocess("documents_and_evaluation", str(work / "prepared"))
        print(
            f"document mode (16 x 256): {docs['chunks']:,} chunks indexed in {docs['documents_build_s']:.1f} s, "
            f"{docs['document_ms_per_batch']:.2f} ms a batch; the heap grew {docs['document_heap_mb']:.0f} MB (the "
            "padded int64 rows "
            f"built before: {docs['padded_rows_mb']:.0f} MB)",
            flush=True,
        )
        print(
            f"whole-split evaluation windows: {docs['val_targets'] / 1e6:.1f}M targets of val read in "
            f"{docs['val_pass_s']:.1f} s; "
            f"the heap grew {docs['val_pass_heap_mb']:.0f} MB (an int64 copy, as before: "
            f"{docs['val_int64_copy_mb']:.0f} MB)",
            flush=True,
        )
        cold = []
        for advice in ("default", "random"):
            if drop_page_cache():
                cold.append(in_subprocess("cold_batches", str(work / "prepared"), advice))
                print(
                    f"batches from a cold page cache, {advice} read-ahead: {cold[-1]['ms_per_batch']:.2f} ms a batch "
                    "of 16 x 256, "
                    f"{cold[-1]['mapped_rss_mb']:.0f} MB of the map resident after {cold[-1]['batches']}",
                    flush=True,
                )
            else:
                print("cold page cache: skipped (dropping the page cache needs root)", flush=True)
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "size_mb": args.size_mb,
                        "tokenizer": args.tokenizer,
                        "cores": os.cpu_count(),
                        "ceiling": top,
                        "prepare": prep,
                        "train": steps,
                        "documents": docs,
                        "cold": cold,
                    },
                    indent=2,
                )
            )
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
