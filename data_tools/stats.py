"""Dataset statistics for `finetune data stats`: lengths, truncation, tokens per role, duplicates, histogram."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset

from data_tools.chat import ROLE_SLOTS
from data_tools.hygiene import count_duplicates

PERCENTILES = (50, 90, 95, 99)


def dataset_stats(ds: Dataset, max_length: int) -> dict[str, Any]:
    """Stats of a `tokenize_records` dataset (needs `length`, `role_tokens`, `content_hash`)."""
    lengths = np.asarray(ds["length"], dtype=np.int64)
    roles = np.asarray(ds["role_tokens"], dtype=np.int64).reshape(-1, len(ROLE_SLOTS))
    out: dict[str, Any] = {
        "records": len(ds),
        "tokens": int(lengths.sum()),
        "length_min": int(lengths.min()) if len(lengths) else 0,
        "length_mean": float(lengths.mean()) if len(lengths) else 0.0,
        "length_max": int(lengths.max()) if len(lengths) else 0,
        "length_percentiles": {f"p{p}": float(np.percentile(lengths, p)) for p in PERCENTILES} if len(lengths) else {},
        "max_length": max_length,
        "truncated": int((lengths > max_length).sum()),
        "tokens_per_role": {name: int(v) for name, v in zip(ROLE_SLOTS, roles.sum(axis=0), strict=True)},
        "duplicates": count_duplicates(list(ds["content_hash"])),
    }
    return out


def histogram(lengths: np.ndarray, bins: int = 20) -> list[tuple[int, int, int]]:
    """(low, high, count) buckets over the length range."""
    if len(lengths) == 0:
        return []
    counts, edges = np.histogram(lengths, bins=min(bins, max(1, int(lengths.max() - lengths.min()) + 1)))
    return [(int(edges[i]), int(edges[i + 1]), int(c)) for i, c in enumerate(counts)]


def plot_lengths(lengths: np.ndarray, max_length: int, path: Path) -> Path:
    """PNG histogram of token lengths with the max_length cut marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(lengths, bins=50, color="#4c72b0")
    ax.axvline(max_length, color="#c44e52", linestyle="--", label=f"max_length = {max_length}")
    ax.set_xlabel("tokens per record")
    ax.set_ylabel("records")
    ax.set_title(f"Token lengths ({len(lengths)} records)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
