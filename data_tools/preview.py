"""Render token ids with their loss mask, so a person can see exactly what is trained."""

from __future__ import annotations

from rich.text import Text

TRAINED_STYLE = "bold black on green"
MASKED_STYLE = "dim"
LEGEND = f"[{TRAINED_STYLE}]trained[/]  [{MASKED_STYLE}]masked (-100)[/]"


def mask_text(ids: list[int], labels: list[int], tokenizer) -> Text:
    """The decoded text, trained spans highlighted; prefixes are decoded at mask changes so spaces survive."""
    text = Text()
    start, shown = 0, ""
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] == -100) != (labels[start] == -100):
            upto = tokenizer.decode(ids[:i])
            text.append(upto[len(shown) :], style=MASKED_STYLE if labels[start] == -100 else TRAINED_STYLE)
            start, shown = i, upto
    return text


def first_sample(row: dict) -> tuple[list[int], list[int]]:
    """The first record of a (possibly packed) row: packed rows carry `seq_lengths`."""
    ids, labels = row["input_ids"], row["labels"]
    lengths = row.get("seq_lengths")
    end = lengths[0] if lengths else len(ids)
    return ids[:end], labels[:end]
