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


def completion_text(prompt_ids: list[int], completion_ids: list[int], tokenizer, style: str = TRAINED_STYLE) -> Text:
    """A completion's text as it reads after its prompt (decoded in context, so a leading space survives)."""
    shown = tokenizer.decode(prompt_ids)
    return Text(tokenizer.decode(prompt_ids + completion_ids)[len(shown) :], style=style)


def preference_view(row: dict, tokenizer):
    """A DPO pair (prompt, then chosen and rejected side by side) or a KTO record (prompt, then its completion
    under its label): the prompt is dim (no loss), the completions highlighted (they carry the loss)."""
    from rich.console import Group
    from rich.table import Table

    prompt = row["prompt_ids"]
    sides = ["chosen", "rejected"] if "chosen_ids" in row else ["completion"]
    table = Table(expand=True, show_lines=False)
    for side in sides:
        title = side if side != "completion" else ("desirable" if row["label"] else "undesirable") + " completion"
        table.add_column(f"{title} ({len(row[f'{side}_ids'])} tokens)", ratio=1)
    table.add_row(*(completion_text(prompt, row[f"{side}_ids"], tokenizer) for side in sides))
    cut = ", start cut to fit max_length" if row.get("truncated") else ""
    head = Text(f"prompt ({len(prompt)} tokens{cut})", style="bold")
    return Group(head, mask_text(prompt, [-100] * len(prompt), tokenizer), table)
