"""Content hashes, deterministic splits and exact-duplicate removal.

Splits hash each record's canonical content with the seed, so the same input and seed give the same split in any
order. Dedupe compares content after normalising whitespace and case.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

_WS = re.compile(r"\s+")
CONTENT_KEYS = ("messages", "prompt", "chosen", "rejected", "completion", "label")  # absent keys do not change a hash


def content_hash(record: dict[str, Any]) -> str:
    """Hash of a canonical record's content (messages, prompt/chosen/rejected or prompt/completion/label); metadata like `where` ignored."""
    content = {k: record[k] for k in CONTENT_KEYS if k in record}
    blob = json.dumps(content, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()


def normalized_hash(record: dict[str, Any]) -> str:
    """Like `content_hash` after collapsing whitespace and lower-casing every string."""

    def norm(x):
        if isinstance(x, str):
            return _WS.sub(" ", x).strip().lower()
        if isinstance(x, list):
            return [norm(v) for v in x]
        if isinstance(x, dict):
            return {k: norm(v) for k, v in x.items()}
        return x

    content = {k: norm(record[k]) for k in CONTENT_KEYS if k in record}
    blob = json.dumps(content, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()


def in_eval(chash: str, seed: int, fraction: float) -> bool:
    """Deterministic membership of the eval split from the content hash and the seed."""
    if fraction <= 0:
        return False
    h = hashlib.sha1(f"{seed}:{chash}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def count_duplicates(hashes: list[str]) -> int:
    """How many records repeat an earlier one."""
    return len(hashes) - len(set(hashes))


def hashed_records(file: str, fmt: str):
    """(raw record, canonical content hash, normalised hash) for every record; invalid records stop the command."""
    from data_tools.errors import DataError
    from data_tools.formats import (
        PREFERENCE_FORMATS,
        UNPAIRED_FORMATS,
        Problem,
        to_conversation,
        to_preference,
        to_unpaired,
    )
    from data_tools.io import read_records
    from data_tools.validate import mismatch, source_format

    raw = list(read_records(file))
    fmt, origin = source_format(raw, fmt, file)
    out, problems = [], []
    for r in raw:
        if r.error:
            problems.append(f"{r.where}: {r.error}")
            continue
        try:
            if fmt in PREFERENCE_FORMATS:
                canon = to_preference(r.data, fmt)
            elif fmt in UNPAIRED_FORMATS:
                canon = to_unpaired(r.data, fmt)
            else:
                canon = {"messages": to_conversation(r.data, fmt)}
        except Problem as p:
            problems.append(f"{r.where}: {(mismatch(r.data, fmt, origin, file) or p).detail}")
            continue
        out.append((r.data, content_hash(canon), normalized_hash(canon)))
    if problems:
        raise DataError(f"{len(problems)} invalid record(s); fix them first (see `finetune data validate`)", problems)
    return out
