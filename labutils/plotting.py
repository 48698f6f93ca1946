"""Seaborn figures for the reports: every plot has a title, axis units and a legend where needed.

Functions take tidy pandas data and return the matplotlib Figure; `save_figure` writes PNGs
beside the stage's other results so reports can embed and trace them.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

sns.set_theme(style="whitegrid", context="notebook")


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def plot_token_frequencies(freqs, top: int = 40, title: str = "Most frequent tokens (train split)"):
    """Bar chart of the `top` most frequent tokens with their share of the split, in percent."""
    data = freqs.head(top).assign(percent=lambda f: 100 * f["share"], label=lambda f: f["token"].where(f["token"].str.strip() != "", f["token"].map(repr)))
    fig, ax = plt.subplots(figsize=(max(8, top * 0.25), 4))
    sns.barplot(data=data, x="label", y="percent", color=sns.color_palette()[0], ax=ax)
    ax.set(title=title, xlabel="token", ylabel="share of tokens (%)")
    ax.tick_params(axis="x", rotation=90)
    fig.tight_layout()
    return fig


def plot_document_lengths(lengths: np.ndarray, title: str = "Document lengths (train split)"):
    """Histogram of document lengths in tokens, log-scaled because paragraphs vary by orders of magnitude."""
    fig, ax = plt.subplots(figsize=(8, 4))
    lengths = np.asarray(lengths)
    sns.histplot(x=lengths[lengths > 0], log_scale=True, bins=40, ax=ax)
    ax.axvline(float(np.median(lengths)), color="k", linestyle="--", label=f"median {np.median(lengths):.0f} tokens")
    ax.set(title=title, xlabel="document length (tokens, log scale)", ylabel="documents")
    ax.legend()
    fig.tight_layout()
    return fig
