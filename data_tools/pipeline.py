"""Recipe data section → tokenised, masked (and optionally packed) datasets ready for TRL's SFTTrainer.

`prepare_data` is the one entry point for every method (DPO/KTO data is prepared in data_tools.preference), and
`check_data_kind` tells, cheaply, whether the data fits the method.

Flow: read + validate every source (all problems at once) → canonical messages → tokenise with a batched, parallel,
cached `datasets.map` → drop records left without trained tokens → hold out eval by content hash → mix sources by
weight/sample count → shuffle → pack. The tokenised Arrow file is keyed by content + format + tokenizer, so running
the same recipe again reads it instead of tokenising.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, concatenate_datasets

from data_tools.chat import FormatSpec, encode_batch, mistral_tokenizer_file, resolve_template
from data_tools.config import DataConfig, SourceConfig
from data_tools.errors import DataError
from data_tools.hygiene import content_hash, in_eval
from data_tools.packing import efficiency, pack, total_tokens, trained_tokens
from data_tools.validate import Loaded, load_source, raise_or_report

PIPELINE_VERSION = "2"  # bump when tokenisation output changes, to invalidate caches (2: no `where` in the cache)


@dataclass
class PreparedData:
    """Datasets with `input_ids`, `labels` (and `seq_lengths` when packed), stats, and SFTConfig settings."""

    train: Dataset
    eval: Dataset | None
    stats: dict[str, Any]
    trainer_kwargs: dict[str, Any]


def check_pad_token(tokenizer) -> None:
    """A pad token equal to EOS gets EOS labels masked by many collators, and the model never learns to stop."""
    if tokenizer.pad_token_id is None:
        raise DataError("the tokenizer has no pad token (TRL would fall back to EOS); set it, e.g. to <unk>")
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise DataError(
            f"the tokenizer's pad token equals its EOS token ({tokenizer.eos_token!r}); EOS labels would be masked "
            "and the model would never learn to stop. Use a different pad token (for Mixtral: <unk>, id 0)"
        )


def format_spec(cfg: DataConfig, tokenizer, model_dir: Path | None) -> FormatSpec:
    """The formatting settings of a recipe, with the mistral tokenizer file or the Jinja template resolved."""
    mistral_file = str(mistral_tokenizer_file(model_dir)) if cfg.chat_format == "mistral" else None
    return FormatSpec(
        chat_format=cfg.chat_format,
        train_on=cfg.train_on,
        system_prompt=cfg.system_prompt,
        mistral_file=mistral_file,
        template=resolve_template(cfg.chat_format, cfg.chat_template, tokenizer),
    )


def default_num_proc(n_records: int, requested: int | None) -> int | None:
    """Parallel workers only pay off on larger inputs."""
    if requested is not None:
        workers = min(requested, n_records)
        return workers if workers > 1 else None  # datasets starts a pool even for num_proc=1
    if n_records < 4000:
        return None
    return max(1, min(os.cpu_count() or 1, 8))


def _tokenizer_fingerprint(spec: FormatSpec, tokenizer) -> str:
    h = hashlib.sha256()
    if spec.chat_format == "mistral":
        h.update(Path(spec.mistral_file).read_bytes())
    else:
        h.update(tokenizer.backend_tokenizer.to_str().encode())
    return h.hexdigest()


def tokenize_records(
    records: list[dict[str, Any]],
    spec: FormatSpec,
    tokenizer,
    max_length: int,
    *,
    num_proc: int | None = None,
    cache_dir: Path | None = None,
) -> Dataset:
    """Canonical records → Dataset(input_ids, labels, length, role_tokens, content_hash, where), cached on disk.

    The cache is keyed by content, so `where` is added after it: two files with the same content share the
    tokenised rows, and each still reports its own locations.
    """
    hashes = [content_hash(r) for r in records]
    wheres = [r["where"] for r in records]
    ds = Dataset.from_dict({"messages": [r["messages"] for r in records], "content_hash": hashes})
    if not records:
        return ds.add_column("input_ids", []).add_column("labels", []).add_column("length", []).add_column("where", [])
    key_src = json.dumps(
        [PIPELINE_VERSION, spec.__dict__, _tokenizer_fingerprint(spec, tokenizer), max_length], sort_keys=True
    )
    key = hashlib.sha256((key_src + "".join(hashes)).encode()).hexdigest()[:32]
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    ds = ds.map(
        encode_batch,
        batched=True,
        batch_size=256,
        fn_kwargs={
            "spec": spec,
            "max_length": max_length,
            "tokenizer": None if spec.chat_format == "mistral" else tokenizer,
        },
        num_proc=default_num_proc(len(records), num_proc),
        cache_file_name=str(cache_dir / f"tokenized-{key}.arrow"),
        load_from_cache_file=True,
        new_fingerprint=key,
        remove_columns=["messages"],
        desc="Tokenising",
    )
    return ds.add_column("where", wheres)


def default_cache_dir() -> Path:
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "finetune-data"


def _load(src: SourceConfig, counts: Counter) -> Loaded:
    """Read and validate one source, counting its records and problems."""
    loaded = load_source(src.path, src.format, src.split, kind="conversation")
    counts["records_total"] += len(loaded.records) + len(loaded.problems)
    counts["records_skipped"] += len(loaded.problems)
    for reason, n in loaded.counts.items():
        counts[f"skip:{reason}"] += n
    return loaded


def _keep_trained(ds: Dataset, counts: Counter) -> Dataset:
    """Drop (and count) records whose truncated labels carry no loss: they would only add padding."""
    if len(ds) == 0:
        return ds
    table = ds.with_format("arrow")[:]
    kept_len = pc.list_value_length(table["input_ids"]).to_numpy(zero_copy_only=False)
    counts["truncated"] += int((table["length"].to_numpy() > kept_len).sum())
    per_row = per_row_trained(table["labels"])
    counts["dropped_no_trained_tokens"] += int((per_row == 0).sum())
    return ds if per_row.all() else ds.select(np.flatnonzero(per_row))


def per_row_trained(labels) -> np.ndarray:
    """Trained-label count of each row of an Arrow list column (vectorised)."""
    flat = pc.list_flatten(labels).to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(labels).to_numpy(zero_copy_only=False)
    return np.bincount(parents, weights=(flat != -100), minlength=len(labels)).astype(np.int64)


def _mix(parts: list[tuple[SourceConfig, Dataset]], seed: int) -> Dataset:
    """Each source contributes `samples` records, or round(weight × its size), drawn deterministically."""
    chosen = []
    for i, (src, ds) in enumerate(parts):
        n = len(ds)
        want = src.samples if src.samples is not None else round(n * src.weight) if src.weight is not None else n
        if n == 0 or want == 0:
            continue
        rng = np.random.default_rng([seed, i])
        idx = np.concatenate([rng.permutation(n) for _ in range(-(-want // n))])[:want] if want != n else np.arange(n)
        chosen.append(ds.select(np.sort(idx) if want <= n else idx))
    if not chosen:
        names = ", ".join(f"{src.path} ({len(ds)} left)" for src, ds in parts)
        raise DataError(
            f"no training records left after validation and filtering in {names}; see the skipped and dropped "
            "counts above, or run `finetune data validate` / `finetune data stats` on these files"
        )
    return concatenate_datasets(chosen)


def prepare_sft_data(
    cfg: DataConfig, tokenizer, *, model_dir: Path | None, seed: int, cache_dir: Path | None = None, echo=print
) -> PreparedData:
    """Validate, format, tokenise, mask, split, mix, shuffle and pack the recipe's data for SFT.

    `seed` is the training seed; data randomness (mixing, shuffling, eval hold-out) follows `cfg.shuffle_seed`
    so that changing the training seed does not change which records are held out.
    """
    del seed
    check_pad_token(tokenizer)
    spec = format_spec(cfg, tokenizer, model_dir)
    counts: Counter = Counter()
    # Validate every source before tokenising anything, so all problems come out at once.
    loaded = [(src, _load(src, counts)) for src in cfg.train]
    eval_loaded = _load(cfg.eval, Counter()) if cfg.eval else None
    problems = [p for _, lo in loaded for p in lo.problems] + (eval_loaded.problems if eval_loaded else [])
    raise_or_report(Loaded(format="mixed", problems=problems), cfg.skip_invalid, echo)

    def tokenize(lo: Loaded) -> Dataset:
        return tokenize_records(lo.records, spec, tokenizer, cfg.max_length, num_proc=cfg.num_proc, cache_dir=cache_dir)

    parts, held = [], []
    for src, lo in loaded:
        ds = _keep_trained(tokenize(lo), counts)
        if cfg.eval_fraction > 0:
            mask = np.array([in_eval(h, cfg.shuffle_seed, cfg.eval_fraction) for h in ds["content_hash"]], dtype=bool)
            held.append(ds.select(np.flatnonzero(mask)))
            ds = ds.select(np.flatnonzero(~mask))
        parts.append((src, ds))
    train = _mix(parts, cfg.shuffle_seed).shuffle(seed=cfg.shuffle_seed)
    train = train.select_columns(["input_ids", "labels"])
    eval_ds = None
    if eval_loaded is not None:
        eval_ds = _keep_trained(tokenize(eval_loaded), Counter()).select_columns(["input_ids", "labels"])
    elif held:
        eval_ds = concatenate_datasets(held).select_columns(["input_ids", "labels"])
        if len(eval_ds) == 0:
            echo(f"warning: eval_fraction {cfg.eval_fraction} held out no records; no eval set")
            eval_ds = None

    stats: dict[str, Any] = {
        "records_total": counts["records_total"],
        "records_skipped": counts["records_skipped"],
        "skipped_by_reason": {k[5:]: v for k, v in sorted(counts.items()) if k.startswith("skip:")},
        "dropped_no_trained_tokens": counts["dropped_no_trained_tokens"],
        "train_records": len(train),
        "eval_records": len(eval_ds) if eval_ds is not None else 0,
        "train_tokens": total_tokens(train),
        "trained_tokens": trained_tokens(train),
        "truncated": counts["truncated"],
        "packing_efficiency": None,
    }
    kwargs: dict[str, Any] = {"dataset_kwargs": {"skip_prepare_dataset": True}, "max_length": cfg.max_length}
    if cfg.packing:
        train = pack(train, cfg.max_length, default_num_proc(len(train), cfg.num_proc))
        stats["packed_rows"] = len(train)
        stats["packing_efficiency"] = efficiency(train, cfg.max_length)
        # packing=True with the bfd strategy makes TRL use its padding-free collator, which turns `seq_lengths`
        # into per-record position ids; preparation is skipped, so TRL does not re-pack or re-tokenise.
        kwargs.update(packing=True, packing_strategy="bfd", padding_free=True)
    else:
        kwargs.update(packing=False, padding_free=False)
    return PreparedData(train=train, eval=eval_ds, stats=stats, trainer_kwargs=kwargs)
