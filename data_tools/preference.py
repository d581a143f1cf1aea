"""Preference data (DPO pairs, KTO unpaired records) → token ids in the columns TRL 1.16's collators read.

Tokenisation is ours, by the same encoders as SFT (data_tools.chat): with chat_format mistral the ids are
mistral-common's. `prompt_ids` is the conversation up to and including the final `[/INST]`; a completion is the
assistant reply's tokens plus EOS, so `prompt_ids + chosen_ids == encode_instruct(prompt + [chosen]).tokens`.

TRL 1.16's DPOTrainer and KTOTrainer always re-tokenise text columns with the tokenizer's chat template in
`_prepare_dataset` (no column set makes them skip it). The trainer builders therefore replace that one method with
`trl_ready`, which does the rest of what it does (KTO's KL completions, the too-long-prompt filter) on our ids.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset

from data_tools.chat import IGNORE, FormatSpec, get_encoder
from data_tools.config import DataConfig, SourceConfig
from data_tools.errors import DataError
from data_tools.formats import unpair
from data_tools.hygiene import content_hash, in_eval
from data_tools.pipeline import PreparedData, _mix, default_num_proc, format_spec
from data_tools.validate import KIND_TEXT, Loaded, data_kind, load_source, raise_or_report

SIDES = {"dpo": ("chosen", "rejected"), "kto": ("completion",)}  # the completion columns of each method


def columns(method: str) -> list[str]:
    """The columns of a prepared dataset: what TRL's collator for the method reads."""
    return ["prompt_ids", *(f"{side}_ids" for side in SIDES[method])] + (["label"] if method == "kto" else [])


def completion_start(labels: list[int]) -> int:
    """Where the final reply starts: the start of the last run of trained labels (its tokens and EOS).

    The encoders mark assistant replies as trained and the prompt's format tokens (`[/INST]`, a generation prompt)
    as not, so the boundary comes from message spans, never from searching the text.
    """
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE:  # format tokens a template puts after the reply
        end -= 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return start


def truncate(
    prompt: list[int], completions: list[list[int]], max_length: int, bos_id: int | None
) -> tuple[list[int], list[list[int]], bool]:
    """Fit prompt + each completion into max_length: the prompt keeps its BOS and its end (at least half of
    max_length, or all of it when shorter), the completions keep their start. Returns (prompt, completions, cut)."""
    longest = max(len(c) for c in completions)
    if len(prompt) + longest <= max_length:
        return prompt, completions, False
    keep = min(len(prompt), max(max_length - longest, max_length // 2))
    if keep < len(prompt):
        head = prompt[:1] if prompt and bos_id is not None and prompt[0] == bos_id else []
        prompt = head[:keep] if keep <= len(head) else head + prompt[len(prompt) - (keep - len(head)) :]
    budget = max_length - len(prompt)
    return prompt, [c[:budget] for c in completions], True


def encode_batch(batch: dict[str, list], spec: FormatSpec, max_length: int, sides, bos_id, tokenizer=None):
    """Batched `datasets.map` function: prompt + each side → prompt_ids, <side>_ids, full lengths, truncated."""
    enc = get_encoder(spec, tokenizer)
    n = len(batch["prompt"])
    convs = [batch["prompt"][i] + batch[side][i] for side in sides for i in range(n)]
    encoded = enc.encode_many(convs) if hasattr(enc, "encode_many") else [enc.encode(c) for c in convs]
    out: dict[str, list] = {"prompt_ids": [], "prompt_length": [], "truncated": []}
    for side in sides:
        out[f"{side}_ids"], out[f"{side}_length"] = [], []
    for i in range(n):
        parts = [encoded[k * n + i][0] for k in range(len(sides))]
        starts = [completion_start(encoded[k * n + i][1]) for k in range(len(sides))]
        prompt = parts[0][: starts[0]]
        if any(ids[:s] != prompt for ids, s in zip(parts, starts, strict=True)):
            raise DataError(
                f"{batch['where'][i]}: the chat format renders this prompt differently before {' and '.join(sides)}, "
                "so the pair has no common prompt; use chat_format: mistral or chatml"
            )
        completions = [ids[s:] for ids, s in zip(parts, starts, strict=True)]
        out["prompt_length"].append(len(prompt))
        for side, c in zip(sides, completions, strict=True):
            out[f"{side}_length"].append(len(c))
        prompt, completions, cut = truncate(prompt, completions, max_length, bos_id)
        out["prompt_ids"].append(prompt)
        out["truncated"].append(cut)
        for side, c in zip(sides, completions, strict=True):
            out[f"{side}_ids"].append(c)
    return out


def tokenize_preference(
    records: list[dict[str, Any]], method: str, spec: FormatSpec, tokenizer, max_length: int, num_proc=None
) -> Dataset:
    """Canonical pairs (dpo) or unpaired records (kto) → Dataset(prompt_ids, <side>_ids, [label], lengths,
    truncated, where, content_hash)."""
    sides = SIDES[method]
    data = {key: [r[key] for r in records] for key in ("prompt", *sides, "where")}
    if method == "kto":
        data["label"] = [bool(r["label"]) for r in records]
    data["content_hash"] = [content_hash(r) for r in records]
    ds = Dataset.from_dict(data)
    if not records:
        return ds
    spec = replace(spec, train_on="assistant")  # the masks mark the reply; everything before it is the prompt
    return ds.map(
        encode_batch,
        batched=True,
        batch_size=256,
        fn_kwargs={
            "spec": spec,
            "max_length": max_length,
            "sides": sides,
            "bos_id": tokenizer.bos_token_id,
            "tokenizer": None if spec.chat_format == "mistral" else tokenizer,
        },
        num_proc=default_num_proc(len(records), num_proc),
        remove_columns=["prompt", *sides],
        desc="Tokenising",
    )


def load_for(src: SourceConfig, method: str, counts: Counter) -> Loaded:
    """Read and validate one source for the method; for KTO, pairs are read as pairs (unpaired after the eval
    hold-out, so both halves of a pair land on the same side)."""
    kind = "preference" if method == "dpo" else "auto"
    loaded = load_source(src.path, src.format, src.split, kind=kind)
    if method == "kto" and data_kind(loaded.format) == "conversation":
        raise DataError(
            f"{src.path} is in {loaded.format!r} format ({KIND_TEXT['conversation']}); method: kto needs unpaired "
            "records (prompt, completion, label) or preference pairs"
        )
    counts["records_total"] += len(loaded.records) + len(loaded.problems)
    counts["records_skipped"] += len(loaded.problems)
    for reason, n in loaded.counts.items():
        counts[f"skip:{reason}"] += n
    return loaded


def as_method(records: list[dict[str, Any]], method: str) -> list[dict[str, Any]]:
    """KTO takes unpaired records: each pair becomes one desirable and one undesirable record."""
    if method == "kto":
        return [u for r in records for u in (unpair(r) if "chosen" in r else [r])]
    return records


def prepare_preference_data(
    cfg: DataConfig,
    tokenizer,
    *,
    model_dir: Path | None,
    method: str,
    num_proc: int | None = None,
    echo=print,
) -> PreparedData:
    """Validate, hold out, tokenise (ours, mistral-common's ids), truncate, mix and shuffle preference data."""
    if method not in SIDES:
        raise ValueError(f"method must be dpo or kto, not {method!r}")
    spec = format_spec(cfg, tokenizer, model_dir)
    counts: Counter = Counter()
    loaded = [(src, load_for(src, method, counts)) for src in cfg.train]
    eval_loaded = load_for(cfg.eval, method, Counter()) if cfg.eval else None
    problems = [p for _, lo in loaded for p in lo.problems] + (eval_loaded.problems if eval_loaded else [])
    raise_or_report(Loaded(format="mixed", problems=problems), cfg.skip_invalid, echo)

    def tokenize(records):
        workers = num_proc or cfg.num_proc
        return tokenize_preference(as_method(records, method), method, spec, tokenizer, cfg.max_length, workers)

    parts, held = [], []
    for src, lo in loaded:
        records = lo.records
        if cfg.eval_fraction > 0:
            out = [in_eval(content_hash(r), cfg.shuffle_seed, cfg.eval_fraction) for r in records]
            held += [r for r, o in zip(records, out, strict=True) if o]
            records = [r for r, o in zip(records, out, strict=True) if not o]
        parts.append((src, tokenize(records)))
    train = _mix(parts, cfg.shuffle_seed).shuffle(seed=cfg.shuffle_seed)
    counts["truncated"] = int(sum(train["truncated"]))  # of the records drawn for training
    eval_records = eval_loaded.records if eval_loaded is not None else held
    eval_ds = tokenize(eval_records) if eval_records else None
    if cfg.eval_fraction > 0 and eval_ds is None:
        echo(f"warning: eval_fraction {cfg.eval_fraction} held out no records; no eval set")
    stats = preference_stats(train, method, counts)
    stats["eval_records"] = len(eval_ds) if eval_ds is not None else 0
    keep = columns(method)
    return PreparedData(
        train=train.select_columns(keep),
        eval=eval_ds.select_columns(keep) if eval_ds is not None else None,
        stats=stats,
        trainer_kwargs={"max_length": cfg.max_length},
    )


def preference_stats(train: Dataset, method: str, counts: Counter) -> dict[str, Any]:
    """Record counts, skips by reason, truncation and mean token counts of the training set."""
    sides = SIDES[method]
    lengths = {k: np.array([len(x) for x in train[f"{k}_ids"]], dtype=np.int64) for k in ("prompt", *sides)}
    completion_tokens = sum(int(v.sum()) for k, v in lengths.items() if k != "prompt")
    stats: dict[str, Any] = {
        "records_total": counts["records_total"],
        "records_skipped": counts["records_skipped"],
        "skipped_by_reason": {k[5:]: v for k, v in sorted(counts.items()) if k.startswith("skip:")},
        "train_records": len(train),
        "truncated": counts["truncated"],
        # what TRL feeds the model: prompt + each completion; the completions carry the loss
        "train_tokens": int(lengths["prompt"].sum()) * len(sides) + completion_tokens,
        "trained_tokens": completion_tokens,
    }
    if method == "dpo":
        stats["pairs"] = len(train)
    else:
        labels = np.asarray(train["label"], dtype=bool)
        stats["desirable"], stats["undesirable"] = int(labels.sum()), int((~labels).sum())
    for key, v in lengths.items():
        stats[f"{key}_tokens_mean"] = float(v.mean()) if len(v) else 0.0
    return stats


def trl_ready(dataset: Dataset, args) -> Dataset:
    """What TRL 1.16's `_prepare_dataset` does after tokenising, on our pre-tokenised dataset: drop rows whose
    prompt fills `args.max_length` and, for KTO losses that estimate the KL term, add `KL_completion_ids` (each
    batch of `per_device_train_batch_size` rotated by one, as TRL does). Idempotent."""
    if args.max_length is not None:
        dataset = dataset.filter(lambda row: len(row["prompt_ids"]) < args.max_length)
    kto = "completion_ids" in dataset.column_names
    if (
        kto
        and getattr(args, "loss_type", None) != "apo_zero_unpaired"
        and "KL_completion_ids" not in dataset.column_names
    ):

        def rotate(batch):
            return {"KL_completion_ids": [batch["completion_ids"][-1], *batch["completion_ids"][:-1]]}

        dataset = dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)
    return dataset
