"""Render token ids with their loss mask, so a person can see exactly what is trained.

On a terminal with colour the trained spans are highlighted; without colour (piped into a log, or NO_COLOR) a
highlight is lost, so they are printed between « and » instead, and the legend says so. The choice is made when
the text is printed, from the console it is printed on, so every caller gets it.
"""

from __future__ import annotations

from rich.text import Text

TRAINED_STYLE = "bold black on green"
MASKED_STYLE = "dim"
OPEN, CLOSE = "«", "»"
COLOUR_LEGEND = f"[{TRAINED_STYLE}]trained[/]  [{MASKED_STYLE}]masked (-100)[/]"
PLAIN_LEGEND = f"{OPEN}text{CLOSE} is trained (carries loss); text outside {OPEN} {CLOSE} is masked (-100, no loss)"


def has_colour(console) -> bool:
    """Whether a highlight shows: a colour terminal, NO_COLOR unset."""
    return console.color_system is not None and not console.no_color


class MaskText(Text):
    """Text with its trained spans styled; on a console without colour they print between « and »."""

    def __rich__(self) -> ForConsole:
        return ForConsole(self)  # rich asks this first, before it would merge the text with its neighbours

    def marked(self) -> Text:
        """The plain text with « » around each trained span (its surrounding spaces and newlines left outside)."""
        out, at = Text(), 0
        for span in sorted((s for s in self.spans if s.style == TRAINED_STYLE), key=lambda s: s.start):
            out.append(self.plain[at : span.start])
            piece = self.plain[span.start : span.end]
            core = piece.strip()
            lead = piece[: len(piece) - len(piece.lstrip())] if core else ""
            trail = piece[len(lead) + len(core) :] if core else ""
            out.append(f"{lead}{OPEN}{core or piece}{CLOSE}{trail}")
            at = span.end
        out.append(self.plain[at:])
        return out


class ForConsole:
    """A MaskText as the console it is printed on can show it: highlighted, or marked with « »."""

    def __init__(self, text: MaskText):
        self.text = text

    def shown(self, console) -> Text:
        return self.text.copy() if has_colour(console) else self.text.marked()

    def __rich_console__(self, console, options):
        yield self.shown(console)

    def __rich_measure__(self, console, options):
        return self.shown(console).__rich_measure__(console, options)


class Legend:
    """What the highlight (or, without colour, the « » marks) means."""

    def __rich_console__(self, console, options):
        yield Text.from_markup(COLOUR_LEGEND) if has_colour(console) else Text(PLAIN_LEGEND)


LEGEND = Legend()


def mask_text(ids: list[int], labels: list[int], tokenizer) -> Text:
    """The decoded text, trained spans highlighted; prefixes are decoded at mask changes so spaces survive."""
    text = MaskText()
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
    text = MaskText()
    text.append(tokenizer.decode(prompt_ids + completion_ids)[len(shown) :], style=style)
    return text


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
