"""Text generation with a KV cache: `generate` returns a completion, `stream` yields it piece by piece.

Sampling: temperature (0 = greedy), top-k, top-p, a seed, and stop strings. Greedy decoding with
the cache gives exactly the tokens of decoding without it. `python -m labutils.generate
--checkpoint DIR` runs one prompt, or an interactive prompt loop when --prompt is omitted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from typing import Protocol

import torch

from .model import GPT


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p; the first always stays.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_tokens(
    model: GPT,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_cache: bool = True,
) -> Iterator[int]:
    """Yield new token ids one at a time. Context beyond block_size is cropped to the last
    block_size tokens, as without a cache: the cache is then rebuilt from that window."""
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens; give at least one character")
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError(f"need temperature >= 0, top_k >= 1, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
    device = next(model.parameters()).device
    block_size = model.config.block_size
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    tokens = list(prompt_ids)
    cache = model.new_cache() if use_cache else None

    def window_logits() -> torch.Tensor:
        if cache is not None:
            cache.reset()
        idx = torch.tensor([tokens[-block_size:]], dtype=torch.long, device=device)
        return model(idx, cache=cache)[0][:, -1]

    was_training = model.training
    model.eval()  # no dropout while sampling; the caller's mode is restored at the end
    try:
        logits = window_logits()
        for _ in range(max_new_tokens):
            token = int(sample_next(logits, temperature, top_k, top_p, generator))
            yield token
            tokens.append(token)
            if cache is not None and cache.seq_len < block_size:
                logits = model(torch.tensor([[token]], device=device), cache=cache)[0][:, -1]
            else:
                logits = window_logits()
    finally:
        model.train(was_training)


def _as_list(stop: str | Iterable[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else [s for s in stop if s]


def stream(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: str | Iterable[str] | None = None,
    use_cache: bool = True,
) -> Iterator[str]:
    """Yield the completion of `prompt` in pieces as tokens are sampled; ends before any stop string
    or the tokenizer's end-of-text token (`eot_id`, when it has one).

    Text that could be the start of a stop string, or an incomplete UTF-8 character, is held back
    until the next tokens decide it, so the pieces joined equal `generate`'s result.
    """
    stops = _as_list(stop)
    eot_id = getattr(tokenizer, "eot_id", None)
    ids: list[int] = []
    sent = 0
    for token in generate_tokens(
        model, tokenizer.encode(prompt), max_new_tokens, temperature, top_k, top_p, seed, use_cache
    ):
        if token == eot_id:
            break
        ids.append(token)
        text = tokenizer.decode(ids)
        hits = [text.find(s, max(sent - len(s), 0)) for s in stops]
        hits = [h for h in hits if h >= 0]
        if hits:
            if min(hits) > sent:
                yield text[sent : min(hits)]
            return
        end = len(text.rstrip("\ufffd"))
        held = max(
            (n for s in stops for n in range(1, min(len(s) - 1, end - sent) + 1) if text[end - n : end] == s[:n]),
            default=0,
        )
        safe = end - held
        if safe > sent:
            yield text[sent:safe]
            sent = safe
    text = tokenizer.decode(ids) if ids else ""
    if len(text) > sent:
        yield text[sent:]


def generate(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: str | Iterable[str] | None = None,
    use_cache: bool = True,
) -> str:
    """The completion of `prompt` (without the prompt), cut before the first stop string."""
    return "".join(stream(model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, use_cache))


def sample_table(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Iterable[str],
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 40,
    seed: int = 0,
):
    """One seeded sample per prompt as a pandas table (prompt, completion), for reports.

    Prompt i draws from seed + i: with one stream for all, a character model's completions of two
    prompts become the same text once the prompts fall out of what it attends to.
    """
    import pandas as pd

    rows = [
        {
            "prompt": p,
            "completion": generate(
                model, tokenizer, p, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed + i
            ),
        }
        for i, p in enumerate(prompts)
    ]
    return pd.DataFrame(rows)


MAX_NEW_TOKENS = 20_000  # the CLI's bound: about 2.5 minutes of the 0.56M final model on 2 CPU cores (130 tokens/s)
LONG_GENERATION = 2_000  # past this the CLI warns how long it will take


def _number(kind, test, what: str):
    """An argparse type: `kind` of the text, refused with what is allowed when `test` fails."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m labutils.generate", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", required=True, help="folder written by save_model (model.pt, config.json, tokenizer.json)"
    )
    parser.add_argument("--prompt", help="text to complete (not empty); omit for an interactive prompt loop")
    parser.add_argument(
        "--max-new-tokens",
        type=_number(int, lambda n: 1 <= n <= MAX_NEW_TOKENS, f"a whole number from 1 to {MAX_NEW_TOKENS:,}"),
        default=200,
        help=f"at most {MAX_NEW_TOKENS:,}; past {LONG_GENERATION:,} it warns how long it takes",
    )
    parser.add_argument(
        "--temperature",
        type=_number(float, lambda t: 0 <= t < float("inf"), "a temperature >= 0 (0: greedy)"),
        default=0.8,
        help="0 for greedy decoding",
    )
    parser.add_argument("--top-k", type=_number(int, lambda k: k >= 1, "a whole number >= 1"), default=None)
    parser.add_argument("--top-p", type=_number(float, lambda p: 0 < p <= 1, "a probability in (0, 1]"), default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--device", default="cpu")
    return parser


def _refuse_missing_folder(parser: argparse.ArgumentParser, folder) -> None:
    """A --checkpoint that is no folder: say so, and what a model folder is, instead of a manifest error."""
    if not folder.is_dir():
        parser.exit(
            2,
            f"error: no such folder: {folder}"
            + (" (it is a file; give the folder that holds it)" if folder.exists() else "")
            + ". A model folder holds manifest.json, model.pt, config.json and tokenizer.json; the pipeline's final "
            "model is results/05_final_model/model\n",
        )


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.prompt is not None and not args.prompt:
        parser.error("--prompt is empty: give text to complete, or omit --prompt for the interactive loop")

    from pathlib import Path

    from labutils.checkpoints import load_model
    from labutils.tokenizers import load_tokenizer  # the tokenizers are not needed to import this module
    from labutils.validation import CheckpointError, DataError

    _refuse_missing_folder(parser, Path(args.checkpoint))
    try:
        model = load_model(args.checkpoint, device=args.device)
    except CheckpointError as exc:  # e.g. weights not in a fresh clone: say what rebuilds them, not a traceback
        parser.exit(2, f"error: {exc}\n")
    tokenizer_path = Path(args.checkpoint) / "tokenizer.json"
    if not tokenizer_path.exists():
        parser.error(f"{tokenizer_path} not found: save the model with save_model(model, dir, tokenizer=...)")
    tokenizer = load_tokenizer(tokenizer_path)
    options = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
    )

    if args.max_new_tokens > LONG_GENERATION:
        print(
            f"warning: {args.max_new_tokens:,} new tokens take a while: one at a time, about "
            f"{args.max_new_tokens / 130 / 60:.0f} minutes at the 130 tokens/s the 0.56M-parameter final model runs "
            "on 2 CPU cores (larger models are slower); Ctrl-C stops it",
            file=sys.stderr,
        )

    def complete(prompt: str) -> bool:
        """Print the completion; False, with the reason on stderr, for a prompt the vocabulary cannot encode."""
        try:
            for piece in stream(model, tokenizer, prompt, **options):
                print(piece, end="", flush=True)
        except DataError as exc:  # a character the checkpoint's vocabulary lacks: its vocabulary is fixed
            print(f"error: {exc}", file=sys.stderr)
            return False
        print()
        return True

    if args.prompt is not None:
        if not complete(args.prompt):
            parser.exit(2)
        return
    print("Type a prompt and press Enter; an empty line or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            prompt = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            break
        if not prompt.strip():
            break
        complete(prompt)


if __name__ == "__main__":
    main()
