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


def _summary(lengths: np.ndarray) -> dict[str, float]:
    if not len(lengths):
        return {"min": 0, "mean": 0.0, "max": 0}
    out = {"min": int(lengths.min()), "mean": float(lengths.mean())}
    out.update({f"p{p}": float(np.percentile(lengths, p)) for p in PERCENTILES})
    out["max"] = int(lengths.max())
    return out


def preference_lengths(ds: Dataset) -> np.ndarray:
    """Longest sequence of each record as TRL feeds it: prompt + its longest completion (before truncation)."""
    sides = [c for c in ("chosen_length", "rejected_length", "completion_length") if c in ds.column_names]
    if len(ds) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.asarray(ds["prompt_length"], dtype=np.int64) + np.max(
        [np.asarray(ds[c], dtype=np.int64) for c in sides], axis=0
    )


def preference_dataset_stats(ds: Dataset, max_length: int) -> dict[str, Any]:
    """Stats of a `tokenize_preference` dataset: token lengths of prompt and each completion (before truncation),
    how many records were truncated, pairs or desirable/undesirable counts, duplicates."""
    sides = [s for s in ("chosen", "rejected", "completion") if f"{s}_length" in ds.column_names]
    out: dict[str, Any] = {"records": len(ds)}
    if "label" in ds.column_names:
        labels = np.asarray(ds["label"], dtype=bool)
        out["desirable"], out["undesirable"] = int(labels.sum()), int((~labels).sum())
    else:
        out["pairs"] = len(ds)
    out["tokens"] = {k: _summary(np.asarray(ds[f"{k}_length"], dtype=np.int64)) for k in ("prompt", *sides)}
    out["max_length"] = max_length
    out["truncated"] = int(np.asarray(ds["truncated"], dtype=bool).sum()) if len(ds) else 0
    out["duplicates"] = count_duplicates(list(ds["content_hash"]))
    return out


def preference_report(s: dict[str, Any]) -> list[str]:
    """The lines `finetune data stats` prints for `preference_dataset_stats`."""
    counts = f"pairs: {s['pairs']}" if "pairs" in s else f"desirable: {s['desirable']}  undesirable: {s['undesirable']}"
    lines = [f"records: {s['records']}   {counts}   duplicates: {s['duplicates']}", "tokens (before truncation):"]
    for part, t in s["tokens"].items():
        pct = "  ".join(f"{k} {v:.0f}" for k, v in t.items() if k.startswith("p"))
        lines.append(f"  {part:<10} min {t['min']}  mean {t['mean']:.1f}  {pct}  max {t['max']}")
    lines.append(f"truncated at max_length {s['max_length']}: {s['truncated']} (prompt start cut, BOS kept)")
    return lines


def histogram(lengths: np.ndarray, bins: int = 20) -> list[tuple[int, int, int]]:
    """(low, high, count) buckets of whole token counts, `high` inclusive: buckets never share a value.

    Every bucket has the same integer width, so labels read 15-15, 16-17 … rather than numpy's overlapping float
    edges printed as integers (15-16, 16-18).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return []
    low, high = int(lengths.min()), int(lengths.max())
    width = -(-(high - low + 1) // bins)  # ceil
    n = -(-(high - low + 1) // width)
    counts = np.bincount((lengths - low) // width, minlength=n)
    return [(low + i * width, low + (i + 1) * width - 1, int(c)) for i, c in enumerate(counts)]


def bucket_label(low: int, high: int) -> str:
    return str(low) if low == high else f"{low}-{high}"


def plot_lengths(lengths: np.ndarray, max_length: int, path: Path) -> Path:
    """PNG histogram of token lengths, its axis scaled to the data; max_length marked (on the axis if it is far off).

    An axis running to max_length squeezed short data into a sliver at the left, so the cut is drawn as a line
    only when it lies near the data, and is otherwise named at the right edge.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = np.asarray(lengths, dtype=np.int64)
    fig, ax = plt.subplots(figsize=(7, 4))
    buckets = histogram(lengths, bins=40)
    if buckets:
        edges = [lo - 0.5 for lo, _, _ in buckets] + [buckets[-1][1] + 0.5]
        ax.hist(lengths, bins=edges, color="#4c72b0")
    data_max = int(lengths.max()) if len(lengths) else max_length
    right = max(data_max, 1) * 1.05 + 1
    if max_length <= right * 1.25:
        right = max(right, max_length * 1.05)
        ax.axvline(max_length + 0.5, color="#c44e52", linestyle="--", label=f"max_length = {max_length}")
        ax.legend()
    else:
        ax.annotate(
            f"max_length = {max_length} →\n(beyond the longest record, {data_max})",
            xy=(1, 0.97),
            xycoords="axes fraction",
            ha="right",
            va="top",
            color="#c44e52",
        )
    truncated = int((lengths > max_length).sum())
    ax.set_xlim(left=max(0, (int(lengths.min()) if len(lengths) else 0) - 1), right=right)
    ax.set_xlabel("tokens per record")
    ax.set_ylabel("records")
    ax.set_title(f"Token lengths ({len(lengths)} records, {truncated} over max_length)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
