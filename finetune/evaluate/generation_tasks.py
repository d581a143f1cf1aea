"""Generation tasks from local files: greedy replies in the run's chat format, scored against references.

A record is `{"prompt": "...", "reference": "..."}` or `{"messages": [... ending with the user turn], "reference":
"..."}` (JSONL, or anything `data_tools.io` reads). Prompts are built by the training formatter, as `finetune
generate` builds them (`finetune.export.generate.prompt_ids`). Scores are the libraries the field reports with, never
reimplemented: ROUGE-L F1 from `rouge-score` (mean over records), chrF from `sacrebleu` (corpus level, 0-100); plus
exact match and contains (the reference appears in the reply), both after stripping surrounding whitespace.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from finetune.errors import UserError

EVAL_EXTRA = "pip install 'finetune[eval]'"
ROLES = ("system", "user", "assistant")


@dataclass
class GenerationRecord:
    where: str
    messages: list[dict[str, str]]  # ends with the user turn to be answered
    reference: str


def record_problem(data: dict[str, Any]) -> str | None:
    """What is wrong with one record, or None."""
    if "reference" not in data:
        return "no 'reference' (each record needs the expected reply as 'reference')"
    if not isinstance(data["reference"], str) or not data["reference"].strip():
        return "'reference' must be a non-empty string"
    if isinstance(data.get("prompt"), str) and data["prompt"].strip():
        return None
    messages = data.get("messages")
    if messages is None:
        return "no 'prompt' and no 'messages' (give the user's question as 'prompt', or a 'messages' list)"
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {role, content}"
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return f"'messages' entries need a role ({', '.join(ROLES)}) and a string content; got {m!r:.80}"
    if messages[-1]["role"] != "user":
        return "'messages' must end with the user turn to be answered (the reply is generated)"
    return None


def read_generation_file(path: str, limit: int | None = None) -> tuple[list[GenerationRecord], list[str]]:
    """(records, problems as FILE:LINE lines); a file-level problem (missing, not UTF-8) is a UserError."""
    from data_tools.errors import DataError
    from data_tools.io import read_records

    records, problems = [], []
    try:
        for raw in read_records(path):
            if raw.error is not None:
                problems.append(f"{raw.where}: {raw.error}")
                continue
            problem = record_problem(raw.data)
            if problem:
                problems.append(f"{raw.where}: {problem}")
                continue
            if limit is None or len(records) < limit:
                data = raw.data
                messages = data.get("messages") or [{"role": "user", "content": data["prompt"]}]
                records.append(GenerationRecord(raw.where, list(messages), data["reference"]))
    except DataError as e:
        raise UserError(str(e)) from None
    if not records and not problems:
        problems.append(f"{path}: holds no records")
    return records, problems


def require_scorers() -> None:
    """rouge-score and sacrebleu are the optional `eval` extra."""
    for module, package in (("rouge_score", "rouge-score"), ("sacrebleu", "sacrebleu")):
        try:
            __import__(module)
        except ImportError:
            raise UserError(f"generation metrics need {package}, which is not installed; {EVAL_EXTRA}") from None


@torch.no_grad()
def generate_replies(model, tokenizer, prompts: list[list[int]], *, batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy replies, in left-padded batches (similar lengths together), returned in the prompts' order."""
    device = next(model.parameters()).device
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        use_cache=True,
    )
    replies = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for start in range(0, len(order), batch_size):
        group = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in group)
        ids = torch.full((len(group), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, i in enumerate(group):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        for row, i in enumerate(group):
            replies[i] = tokenizer.decode(out[row, width:].tolist(), skip_special_tokens=True).strip()
    return replies


def scores(outputs: list[str], references: list[str]) -> dict[str, float]:
    """exact_match, contains and rougeL (means over records, 0-1), chrf (sacrebleu's corpus chrF, 0-100)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    n = max(len(outputs), 1)
    pairs = list(zip(outputs, references, strict=True))
    return {
        "exact_match": sum(o.strip() == r.strip() for o, r in pairs) / n,
        "contains": sum(r.strip() in o for o, r in pairs) / n,
        "rougeL": sum(scorer.score(r, o)["rougeL"].fmeasure for o, r in pairs) / n,
        "chrf": sacrebleu.corpus_chrf(outputs, [references]).score,
    }


def side_by_side(records: list[GenerationRecord], outputs: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Per-record rows with every column's reply; the records where the columns disagree come first."""
    rows = []
    for i, record in enumerate(records):
        replies = {column: texts[i] for column, texts in outputs.items()}
        rows.append({
            "where": record.where,
            "prompt": record.messages[-1]["content"],
            "reference": record.reference,
            **replies,
            "agree": len(set(replies.values())) <= 1,
        })  # fmt: skip
    return sorted(rows, key=lambda row: row["agree"])  # stable: file order within each group


def name_of(path: str) -> str:
    return Path(path).name
