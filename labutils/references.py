"""Count-model references: what a unigram, a bigram and a 5-gram fitted on the training split score on the very
windows a run is scored on. A model that does not beat the bigram has learned nothing a table of pair counts
does not know, so every comparison states these numbers beside its own (and 03 refuses to choose below them).

The n-gram models are interpolated Kneser-Ney (Chen & Goodman 1998, one absolute discount per order,
D = n1 / (n1 + 2 n2)); the unigram is the order-1 member of the same family (discounted counts interpolated
with a uniform guess), so no reference ever gives a token probability 0. A window's context is its own tokens
only, as the transformer's is: the first target of a window is predicted from one token, the second from two.

Counting is vectorised: the k-grams of the training split are numbered level by level (a k-gram is the pair
(number of its first k-1 tokens, its last token)), which stays exact for any vocabulary size. For vocabularies
the size of GPT-2's the count is capped at `MAX_COUNT_TOKENS` training tokens; the result says when it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from .validation import ConfigError

ORDERS = {"unigram": 1, "bigram": 2, "5-gram": 5}
# Beyond this many training tokens, only the first ones are counted (a GPT-2-sized corpus: the cost of the counts
# grows with the tokens, not with the vocabulary, and 20M tokens count in well under a minute).
MAX_COUNT_TOKENS = 20_000_000
MIN_DISCOUNT = 0.05


@dataclass
class _Counts:
    """One kind of count of a level's k-grams (raw, or continuation: distinct left neighbours), its discount, and per
    prefix the total count and the number of distinct followers."""

    counts: np.ndarray
    discount: float
    prefix_total: np.ndarray
    prefix_types: np.ndarray


@dataclass
class _Level:
    """The k-grams of one order: sorted codes (prefix number x V + last token), their raw counts (used when this
    order is the longest context a target has) and their continuation counts (used when a longer order backs off)."""

    codes: np.ndarray
    raw: _Counts
    continuation: _Counts


@dataclass
class KneserNey:
    """An interpolated Kneser-Ney model of `order` fitted on `tokens` (ids below `vocab_size`)."""

    order: int
    vocab_size: int
    levels: list[_Level] = field(default_factory=list)
    counted_tokens: int = 0
    capped: bool = False

    @classmethod
    def fit(cls, tokens, order: int, vocab_size: int, *, max_tokens: int = MAX_COUNT_TOKENS) -> KneserNey:
        if order < 1:
            raise ConfigError(f"order: an n-gram model needs order >= 1, got {order}")
        tokens = np.asarray(tokens, dtype=np.int64)
        capped = len(tokens) > max_tokens
        tokens = tokens[:max_tokens]
        if len(tokens) < order:
            raise ConfigError(f"a {order}-gram model needs at least {order} training tokens, got {len(tokens)}")
        if tokens.min() < 0 or tokens.max() >= vocab_size:
            raise ConfigError(f"token ids must lie in [0, {vocab_size}); found {tokens.min()}..{tokens.max()}")
        model = cls(order, vocab_size, counted_tokens=len(tokens), capped=capped)
        # ids[k-1][i]: the number of the k-gram starting at position i among the sorted distinct k-grams
        ids: list[np.ndarray] = []
        uniques: list[np.ndarray] = []
        first_at: list[np.ndarray] = []
        raw: list[np.ndarray] = []
        for k in range(1, order + 1):
            n = len(tokens) - k + 1
            code = tokens[k - 1 : k - 1 + n] if k == 1 else ids[-1][:n] * vocab_size + tokens[k - 1 : k - 1 + n]
            unique, first, inverse, count = np.unique(code, return_index=True, return_inverse=True, return_counts=True)
            ids.append(inverse)
            uniques.append(unique)
            first_at.append(first)
            raw.append(count)
        for k in range(1, order + 1):
            prefix = uniques[k - 1] // vocab_size if k > 1 else np.zeros(len(uniques[0]), dtype=np.int64)
            n_prefixes = len(uniques[k - 2]) if k > 1 else 1

            def kind(counts: np.ndarray, prefix: np.ndarray = prefix, n_prefixes: int = n_prefixes) -> _Counts:
                n1, n2 = int((counts == 1).sum()), int((counts == 2).sum())
                # Chen & Goodman's estimate, kept inside [0.05, 1]: with no singletons it would be 0 and give unseen
                # tokens probability 0 (small corpora, continuation counts)
                discount = min(1.0, max(MIN_DISCOUNT, n1 / (n1 + 2 * n2))) if n1 + 2 * n2 > 0 else 0.5
                return _Counts(
                    counts.astype(np.float64),
                    discount,
                    np.bincount(prefix, weights=counts, minlength=n_prefixes),
                    np.bincount(prefix, weights=counts > 0, minlength=n_prefixes),
                )

            if k < order:  # continuation count: how many distinct tokens precede this k-gram in the training split
                longer_first = first_at[k]  # where each distinct (k+1)-gram first occurs; its suffix starts one later
                continuation = np.bincount(ids[k - 1][longer_first + 1], minlength=len(uniques[k - 1]))
            model.levels.append(
                _Level(uniques[k - 1], kind(raw[k - 1]), kind(continuation) if k < order else kind(raw[k - 1]))
            )
        return model

    def _lookup(self, level: _Level, code: np.ndarray) -> np.ndarray:
        """The index of each code among the level's k-grams, or -1 where it never occurred (or code is -1)."""
        at = np.searchsorted(level.codes, code)
        at = np.minimum(at, len(level.codes) - 1)
        found = (code >= 0) & (level.codes[at] == code)
        return np.where(found, at, -1)

    def log_probs(self, windows: np.ndarray) -> np.ndarray:
        """ln P(token t | the up to order-1 tokens before it in its window) for every t >= 1 of every window:
        `windows` is (n_windows, block_size + 1), the inputs and the last target; returns (n_windows, block_size)."""
        windows = np.asarray(windows, dtype=np.int64)
        if windows.ndim != 2 or windows.shape[1] < 2:
            raise ConfigError(f"windows: expected (n_windows, block_size + 1) token ids, got shape {windows.shape}")
        if windows.min() < 0 or windows.max() >= self.vocab_size:
            raise ConfigError(f"window token ids must lie in [0, {self.vocab_size}); the model's vocabulary is smaller")
        n_win, length = windows.shape
        # number[k-1][:, j]: the training number of the k-gram starting at column j of each window (-1: unseen)
        number: list[np.ndarray] = []
        for k in range(1, self.order + 1):
            cols = length - k + 1
            last = windows[:, k - 1 : k - 1 + cols]
            code = (
                last
                if k == 1
                else np.where(number[-1][:, :cols] >= 0, number[-1][:, :cols] * self.vocab_size + last, -1)
            )
            number.append(self._lookup(self.levels[k - 1], code))
        out = np.empty((n_win, length - 1))
        for t in range(1, length):  # target column t, predicted from columns max(0, t - order + 1) .. t - 1
            top = min(self.order, t + 1)
            prob = np.full(n_win, 1.0 / self.vocab_size)
            for k in range(1, top + 1):
                # the longest order a target has uses raw counts; the orders it backs off to, continuation counts
                # (the window's start cuts a context short: its longest order is then a lower one, as for a lower model)
                level, start = self.levels[k - 1], t - k + 1
                c = level.raw if k == top else level.continuation
                gram = number[k - 1][:, start]
                count = np.where(gram >= 0, c.counts[np.maximum(gram, 0)], 0.0)
                if k == 1:
                    prob = (np.maximum(count - c.discount, 0) + c.discount * c.prefix_types[0] * prob) / c.prefix_total[
                        0
                    ]
                    continue
                context = number[k - 2][:, start]
                total = np.where(context >= 0, c.prefix_total[np.maximum(context, 0)], 0.0)
                types = np.where(context >= 0, c.prefix_types[np.maximum(context, 0)], 0.0)
                seen = total > 0
                mixed = (np.maximum(count - c.discount, 0) + c.discount * types * prob) / np.where(seen, total, 1.0)
                prob = np.where(seen, mixed, prob)
            out[:, t - 1] = np.log(prob)
        return out


@lru_cache(maxsize=8)
def _fitted(data_dir: str, order: int) -> KneserNey:
    from .data import as_prepared

    data = as_prepared(data_dir)
    return KneserNey.fit(data.tokens("train"), order, data.vocab_size)


def window_tokens(data, split: str, block_size: int, *, n_tokens: int | None = None, seed: int = 1234) -> np.ndarray:
    """The (n_windows, block_size + 1) token windows a run is scored on: with n_tokens, the fixed random windows of
    `batches.eval_batches` (its seed and count); without, every non-overlapping window of the split
    (`batches.tiled_batches`, whole-split evaluation)."""
    import torch

    from .batches import eval_batches, tiled_batches

    tokens = data.tokens(split)
    batches = (
        eval_batches(tokens, block_size, 256, n_tokens=n_tokens, seed=seed)
        if n_tokens
        else tiled_batches(tokens, block_size, 256)
    )
    rows = [torch.cat([x, y[:, -1:]], dim=1) for x, y in batches]
    return torch.cat(rows).numpy().astype(np.int64)


def reference_losses(
    data,
    split: str,
    block_size: int,
    *,
    n_tokens: int | None = None,
    seed: int = 1234,
    models: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Each count model's loss on the windows a run with this block size and evaluation set is scored on
    (`window_tokens`): {name: nats per token}, {name}_bpb: bits per byte, plus what was scored."""
    from .evaluation import bits_per_byte

    models = models or ORDERS
    windows = window_tokens(data, split, block_size, n_tokens=n_tokens, seed=seed)
    targets = windows[:, 1:]
    n_bytes = int(np.asarray(data.token_bytes)[targets].sum())
    out: dict[str, Any] = {
        "split": split,
        "block_size": block_size,
        "eval_tokens": int(targets.size),
        "windows": "whole split" if n_tokens is None else f"{len(windows)} fixed random windows (seed {seed})",
    }
    capped = False
    for name, order in models.items():
        model = _fitted(str(data.dir), order)
        capped |= model.capped
        loss = float(-model.log_probs(windows).mean())
        out[name] = loss
        out[f"{name}_bpb"] = bits_per_byte(loss, int(targets.size), n_bytes) if n_bytes else math.nan
    out["counted_train_tokens"] = _fitted(str(data.dir), max(models.values())).counted_tokens
    out["count_capped"] = capped
    return out


def run_references(data, config) -> dict[str, Any]:
    """`reference_losses` on the windows a RunConfig's evaluations use (its eval_split and eval set)."""
    tcfg, block = config.train, config.model.block_size
    if tcfg.eval_full:
        return reference_losses(data, tcfg.eval_split, block)
    n_tokens = tcfg.eval_tokens or tcfg.eval_batches * (tcfg.eval_batch_size or tcfg.batch_size) * block
    return reference_losses(data, tcfg.eval_split, block, n_tokens=n_tokens)


def describe(refs: dict[str, Any], names=("unigram", "bigram", "5-gram")) -> str:
    """'unigram 3.31, bigram 2.48, 5-gram 2.05 nats/token (... bits/byte)' for a report line."""
    parts = ", ".join(f"{name} {refs[name]:.3f}" for name in names if name in refs)
    bpb = ", ".join(f"{refs[f'{name}_bpb']:.3f}" for name in names if f"{name}_bpb" in refs)
    cap = (
        f"; counts capped at the first {refs['counted_train_tokens']:,} training tokens"
        if refs.get("count_capped")
        else ""
    )
    return f"{parts} nats/token ({bpb} bits/byte) on the same {refs['eval_tokens']:,} {refs['split']} tokens{cap}"


# A comparison needs its baseline past the count models: the `cpu` and `gpu` budgets are set so that it ends at least
# this far below the bigram on its windows (issue: 0.15 nats); below the bigram at all, it may compare; above, never.
REGIME_MARGIN = 0.15


def regime(loss: float, refs: dict[str, Any], *, margin: float = REGIME_MARGIN) -> dict[str, Any]:
    """Where a baseline's loss stands against the bigram and 5-gram on the same windows: `comparable` when it beats the
    bigram (below it), `margin_met` when by at least `margin`; a comparison whose baseline is not comparable is too
    short to compare, and chooses nothing."""
    gap = refs["bigram"] - loss
    return {
        "loss": loss,
        "bigram": refs["bigram"],
        "below_bigram": gap,
        "comparable": bool(gap > 0),
        "margin": margin,
        "margin_met": bool(gap >= margin),
        "beats_5gram": bool(loss < refs["5-gram"]),
        "verdict": (
            "past the count models"
            if loss < refs["5-gram"]
            else "comparable: below the bigram"
            if gap >= margin
            else "comparable, but less than the margin below the bigram"
            if gap > 0
            else "too short to compare: the baseline does not beat the bigram"
        ),
    }
