"""Held-out perplexity on the trained tokens only: the ids and loss mask of training, the aux loss never included.

Records are tokenised by the data tools exactly as training tokenises them (`data_tools.pipeline.tokenize_records`,
same chat format, `train_on` mask and max_length), so a token counts here if and only if it would carry loss in
training. The model is called without labels and without router logits, so the figure is the language-model NLL
alone (transformers adds `router_aux_loss_coef x aux` to its own loss when asked for router logits).

Per record we keep the summed NLL and the token count; the set's NLL is token-weighted (total NLL / total tokens),
and the 95% interval of base - adapter comes from a paired bootstrap over records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from data_tools.chat import IGNORE


@dataclass
class TokenizedSet:
    """Records ready for the model: ids, labels (-100 = no loss) and where each came from."""

    name: str
    input_ids: list[list[int]]
    labels: list[list[int]]
    where: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


def trained_count(labels: list[int]) -> int:
    """Tokens that carry loss: a label at position t is predicted from the tokens before it, so the first never is."""
    return sum(1 for label in labels[1:] if label != IGNORE)


def from_rows(name: str, rows: Any, limit: int | None = None) -> TokenizedSet:
    """A prepared dataset (input_ids, labels, maybe where), rows without a trained token left out."""
    n = len(rows) if limit is None else min(limit, len(rows))
    ids, labels, where = [], [], []
    has_where = "where" in getattr(rows, "column_names", [])
    for i in range(len(rows)):
        if len(ids) == n:
            break
        row = rows[i]
        if trained_count(row["labels"]) == 0:
            continue
        ids.append(list(row["input_ids"]))
        labels.append(list(row["labels"]))
        where.append(row["where"] if has_where else f"{name}[{i}]")
    return TokenizedSet(name, ids, labels, where)


def tokenize_file(path: str, spec: Any, tokenizer: Any, max_length: int, limit: int | None = None) -> TokenizedSet:
    """A data file (any format the data tools read) → TokenizedSet, exactly as training would tokenise it."""
    from data_tools.pipeline import tokenize_records
    from data_tools.validate import load_source, raise_or_report

    loaded = load_source(path, kind="conversation")
    raise_or_report(loaded, skip_invalid=False)
    records = loaded.records if limit is None else loaded.records[: limit * 2]  # some may carry no trained token
    rows = tokenize_records(records, spec, tokenizer, max_length)
    return from_rows(Path(path).name if not path.startswith("builtin:") else path, rows, limit)


def batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Record indices grouped by similar length (less padding), longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def record_nll(model: Any, data: TokenizedSet, batch_size: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(summed NLL, trained tokens) per record, in fp32 or better, right-padded batches with an attention mask."""
    nll = np.zeros(len(data), dtype=np.float64)
    tokens = np.zeros(len(data), dtype=np.int64)
    pad = 0
    for group in batches([len(x) for x in data.input_ids], batch_size):
        width = max(len(data.input_ids[i]) for i in group)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        labels = torch.full((len(group), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, i in enumerate(group):
            n = len(data.input_ids[i])
            ids[row, :n] = torch.tensor(data.input_ids[i])
            labels[row, :n] = torch.tensor(data.labels[i])
            mask[row, :n] = 1
        out = model(
            input_ids=ids.to(device), attention_mask=mask.to(device), output_router_logits=False, use_cache=False
        )
        for row, i in enumerate(group):  # one row at a time: a [T, vocab] fp32 copy, never [B, T, vocab]
            target = labels[row, 1:].to(device)
            losses = F.cross_entropy(out.logits[row, :-1].float(), target, ignore_index=IGNORE, reduction="sum")
            nll[i] = losses.double().item()
            tokens[i] = int((target != IGNORE).sum())
    return nll, tokens


def summary(nll: np.ndarray, tokens: np.ndarray) -> dict[str, float | int]:
    """Token-weighted NLL (nats per trained token) and its perplexity."""
    total = int(tokens.sum())
    mean = float(nll.sum() / total) if total else float("nan")
    return {"nll": mean, "perplexity": math.exp(mean) if total else float("nan"), "tokens": total, "records": len(nll)}


def bootstrap_difference(
    base: np.ndarray, adapter: np.ndarray, tokens: np.ndarray, samples: int, seed: int
) -> dict[str, Any]:
    """base - adapter token-weighted NLL (positive: the adapter is better), with a paired 95% percentile interval
    from `samples` resamples of the records (none when samples is 0 or there is a single record)."""
    estimate = float(base.sum() / tokens.sum() - adapter.sum() / tokens.sum())
    result: dict[str, Any] = {"nll": estimate, "ci95": None, "bootstrap_samples": samples}
    if samples <= 0 or len(tokens) < 2:
        return result
    rng = np.random.default_rng(seed)
    diffs = np.empty(samples, dtype=np.float64)
    chunk = max(1, 2_000_000 // len(tokens))  # bounded memory for the index matrix
    for start in range(0, samples, chunk):
        idx = rng.integers(0, len(tokens), size=(min(chunk, samples - start), len(tokens)))
        weight = tokens[idx].sum(1)
        diffs[start : start + len(idx)] = (base[idx].sum(1) - adapter[idx].sum(1)) / weight
    low, high = np.percentile(diffs, [2.5, 97.5])
    result["ci95"] = [float(low), float(high)]
    return result


def per_record(data: TokenizedSet, tokens: np.ndarray, by_column: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """One row per record: where, trained tokens, and each column's summed NLL."""
    return [
        {"where": data.where[i], "tokens": int(tokens[i]), **{f"{c}_nll": float(v[i]) for c, v in by_column.items()}}
        for i in range(len(data))
    ]
