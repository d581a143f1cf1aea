"""Packing several tokenised records into rows of at most max_length, with no attention across records.

TRL's best-fit-decreasing packer (`trl.pack_dataset`, strategy "bfd", pyarrow-vectorised) adds a `seq_lengths`
column; TRL's padding-free collator turns it into position ids that restart at 0 for every record. On CPU with
sdpa/eager attention, transformers (masking_utils.find_packed_sequence_indices) builds a block-diagonal causal mask
from those position ids when no attention_mask is passed and no cache is used — which is what padding-free training
does — so no token attends across a record boundary (tests/data/test_packing.py checks logits).

Packing efficiency is defined as real tokens / (packed rows × max_length): 1.0 means no padding at all.
"""

from __future__ import annotations

import pyarrow.compute as pc
from datasets import Dataset


def pack(dataset: Dataset, max_length: int, num_proc: int | None = None) -> Dataset:
    """Pack `input_ids`/`labels` rows (already truncated to max_length) into rows with `seq_lengths`."""
    from trl import pack_dataset

    dataset = dataset.select_columns(["input_ids", "labels"])
    map_kwargs = {"desc": "Packing"}
    if num_proc and num_proc > 1 and len(dataset) >= 2000:
        map_kwargs["num_proc"] = num_proc
    return pack_dataset(dataset, max_length, strategy="bfd", map_kwargs=map_kwargs)


def total_tokens(dataset: Dataset) -> int:
    """Sum of row lengths of `input_ids`, computed in Arrow."""
    if len(dataset) == 0:
        return 0
    table = dataset.with_format("arrow")[:]
    return int(pc.sum(pc.list_value_length(table["input_ids"])).as_py() or 0)


def trained_tokens(dataset: Dataset) -> int:
    """Number of label positions that carry loss (labels != -100)."""
    if len(dataset) == 0:
        return 0
    table = dataset.with_format("arrow")[:]
    flat = pc.list_flatten(table["labels"])
    return int(pc.sum(pc.not_equal(flat, -100)).as_py() or 0)


def efficiency(packed: Dataset, max_length: int) -> float | None:
    """Real tokens / (rows × max_length) of a packed dataset."""
    if len(packed) == 0:
        return None
    return total_tokens(packed) / (len(packed) * max_length)
