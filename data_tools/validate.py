"""Validation with exact locations: every bad record becomes `FILE:LINE: reason`, all reported at once.

The same functions feed `finetune data validate` and `prepare_sft_data`, so a file that validates clean is a file
that trains.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from data_tools.errors import DataError
from data_tools.formats import (
    PREFERENCE_FORMATS,
    UNPAIRED_FORMATS,
    Problem,
    detect_format,
    to_conversation,
    to_preference,
    to_unpaired,
)
from data_tools.io import RawRecord, read_records

REASON_TEXT = {
    "invalid_json": "invalid JSON",
    "missing_field": "missing field",
    "empty_content": "empty content",
    "non_string_content": "non-string content",
    "roles_not_alternating": "roles do not alternate",
    "no_assistant": "no assistant turn",
    "unknown_role": "unknown role",
    "identical_pair": "identical chosen and rejected",
    "bad_label": "label not true/false",
    "too_long": "longer than max_length (would be truncated)",
    "format_mismatch": "in another format than the file",
}


def check_conversation(messages: list[dict[str, str]]) -> None:
    """Order rules: an optional leading system message, then user/assistant alternating, ending with the assistant.

    A lone assistant message is plain text (trained on entirely).
    """
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not any(m["role"] == "assistant" for m in body):
        raise Problem("no_assistant", "no assistant turn")
    if len(body) == 1:
        return
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            number = i + 1 + (len(messages) - len(body))
            raise Problem(
                "roles_not_alternating",
                f"roles must alternate user/assistant: message {number} is {m['role']!r}, expected {expected!r}",
            )
    if body[-1]["role"] != "assistant":
        raise Problem("roles_not_alternating", "the last message must be from the assistant")


def check_prompt(prompt: list[dict[str, str]]) -> None:
    """A preference prompt is a conversation that ends with the user turn being answered."""
    body = prompt[1:] if prompt and prompt[0]["role"] == "system" else prompt
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise Problem(
                "roles_not_alternating", f"prompt roles must alternate user/assistant: message {i + 1} is {m['role']!r}"
            )
    if not body or body[-1]["role"] != "user":
        raise Problem("roles_not_alternating", "the prompt must end with a user message")


@dataclass
class Loaded:
    """Valid canonical records (each with `where`) and the problems of the rest."""

    format: str
    records: list[dict[str, Any]] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (reason code, "FILE:LINE: detail")

    @property
    def counts(self) -> Counter:
        return Counter(reason for reason, _ in self.problems)


def source_format(raw: list[RawRecord], fmt: str, name: str) -> tuple[str, str | None]:
    """(format, origin): the named format (origin None), or the one the first parseable record's keys suggest,
    with that record's location as origin."""
    if fmt != "auto":
        return fmt, None
    first = next((r for r in raw if r.data is not None), None)
    if first is None:
        return "messages", None  # nothing parseable: every record is reported as invalid anyway
    detected = detect_format(first.data)
    if detected is None:
        raise DataError(
            f"{first.where}: cannot detect the format of {name} from this first record "
            f"(keys: {', '.join(sorted(first.data)) or 'none'}); "
            "set format: alpaca|sharegpt|messages|prompt_completion|text|preference|hh_rlhf|unpaired"
        )
    return detected, first.where


def mismatch(data: dict[str, Any], fmt: str, origin: str | None, name: str) -> Problem | None:
    """When a record that failed to convert is in another format than its file was read as, say so plainly
    (the detail of the failure, e.g. "missing field 'instruction'", hides the cause)."""
    own = detect_format(data)
    if own is None or own == fmt:
        return None
    how = f"detected from {origin}" if origin else "the format option"
    return Problem(
        "format_mismatch",
        f"this record is in {own} format, but {name} was read as {fmt} ({how}); keep one format per file "
        "(`finetune data convert` turns any format into messages)",
    )


def data_kind(fmt: str) -> str:
    """The canonical form a format converts to: `preference` (pairs), `unpaired` (labelled single completions) or
    `conversation`."""
    if fmt in PREFERENCE_FORMATS:
        return "preference"
    return "unpaired" if fmt in UNPAIRED_FORMATS else "conversation"


KIND_TEXT = {
    "conversation": "conversations without chosen/rejected",
    "preference": "chosen/rejected pairs",
    "unpaired": "single completions with desirable/undesirable labels",
}


def load_source(path: str, fmt: str = "auto", split: str = "train", kind: str = "conversation") -> Loaded:
    """Read, convert and validate one source. kind: `conversation` (SFT), `preference` (DPO), `unpaired` (KTO) or
    `auto` (the format's own)."""
    # progress bars appear only when reading or checking takes more than two seconds
    raw = list(tqdm(read_records(path, split), desc=f"Reading {path}", unit=" records", delay=2, disable=None))
    fmt, origin = source_format(raw, fmt, path)
    if kind == "auto":
        kind = data_kind(fmt)
    if kind == "preference" and fmt not in PREFERENCE_FORMATS:
        raise DataError(
            f"{path} is in {fmt!r} format ({KIND_TEXT[data_kind(fmt)]}), which has no chosen/rejected pairs; "
            "use preference or hh_rlhf data"
        )
    if kind == "unpaired" and fmt not in UNPAIRED_FORMATS:
        raise DataError(
            f"{path} is in {fmt!r} format ({KIND_TEXT[data_kind(fmt)]}), not unpaired records with a label; "
            "use unpaired data (prompt, completion, label), or `finetune data convert --to unpaired` for pairs"
        )
    if kind == "conversation" and fmt in UNPAIRED_FORMATS:
        raise DataError(
            f"{path} is in {fmt!r} format ({KIND_TEXT['unpaired']}), which holds no conversations to train on; "
            "use it with method: kto"
        )
    loaded = Loaded(format=fmt)
    for r in tqdm(raw, desc=f"Validating {path}", unit=" records", delay=2, disable=None):  # None: not when piped
        if r.error is not None:
            loaded.problems.append(("invalid_json", f"{r.where}: {r.error}"))
            continue
        try:
            if kind == "preference":
                pair = to_preference(r.data, fmt)
                check_prompt(pair["prompt"])
                loaded.records.append({**pair, "where": r.where})
            elif kind == "unpaired":
                record = to_unpaired(r.data, fmt)
                check_prompt(record["prompt"])
                loaded.records.append({**record, "where": r.where})
            else:
                messages = to_conversation(r.data, fmt)
                check_conversation(messages)
                loaded.records.append({"messages": messages, "where": r.where})
        except Problem as p:
            p = mismatch(r.data, fmt, origin, path) or p
            loaded.problems.append((p.reason, f"{r.where}: {p.detail}"))
    return loaded


def raise_or_report(loaded: Loaded, skip_invalid: bool, echo=print) -> None:
    """Stop on bad records (all listed at once), or with skip_invalid say how many were skipped and why."""
    if not loaded.problems:
        return
    if not skip_invalid:
        raise DataError(
            f"{len(loaded.problems)} invalid record(s) (set data.skip_invalid: true to skip and count them)",
            [line for _, line in loaded.problems],
        )
    summary = ", ".join(f"{REASON_TEXT.get(k, k)}: {v}" for k, v in sorted(loaded.counts.items()))
    echo(f"skipped {len(loaded.problems)} invalid record(s) ({summary}); first: {loaded.problems[0][1]}")


SHOWN_PROBLEMS = 20  # bad records named by the commands that inspect data; `finetune data validate` names all


def invalid_lines(loaded: Loaded, shown: int = SHOWN_PROBLEMS) -> list[str]:
    """The first `shown` `FILE:LINE: reason` lines, then how many more there are and where to see them."""
    lines = [line for _, line in loaded.problems[:shown]]
    if len(loaded.problems) > shown:
        lines.append(f"... and {len(loaded.problems) - shown} more (`finetune data validate FILE` lists every one)")
    return lines


def skip_or_refuse(loaded: Loaded, strict: bool, echo=print) -> None:
    """For the commands that inspect a file (preview, stats): name the bad records and go on with the good ones, or
    with `strict` refuse the file. Either way the hint is a flag of the command, not a recipe key."""
    if not loaded.problems:
        return
    n = len(loaded.problems)
    if strict:
        raise DataError(f"{n} invalid record(s); fix them, or leave out --strict to skip them", invalid_lines(loaded))
    if not loaded.records:
        raise DataError(f"every record is invalid ({n}); nothing to show", invalid_lines(loaded))
    summary = ", ".join(f"{REASON_TEXT.get(k, k)}: {v}" for k, v in sorted(loaded.counts.items()))
    echo(f"warning: skipped {n} invalid record(s) ({summary}); going on with the {len(loaded.records)} valid ones:")
    for line in invalid_lines(loaded):
        echo(f"  {line}")
