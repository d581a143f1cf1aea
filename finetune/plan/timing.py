"""Time part of `finetune plan`: FLOPs per token from the active parameters, utilisation (measured or assumed),
and the size of an epoch from a tokenised sample of the local data (hub datasets by their `samples` count, at
max_length: the plan never uses the network), with the tokenizer the model folder has or mistral-common's v1."""

from __future__ import annotations

import json
import math
import tempfile
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import UserError

GPU_CHECK_RESULT = Path(__file__).resolve().parents[2] / "bench" / "results" / "gpu_check.json"
ASSUMED_HFU = 0.20  # hardware FLOPs utilisation when bench/results/gpu_check.json holds no measurement


# ---- time -------------------------------------------------------------------------------------------------------


def active_params(config) -> int:
    """Parameters one token passes through: attention projections, router, top-k experts, lm_head (no embedding)."""
    h, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or h // heads
    attention = h * heads * d * 2 + 2 * h * kv * d
    moe = config.num_local_experts * h + config.num_experts_per_tok * 3 * h * config.intermediate_size
    return config.num_hidden_layers * (attention + moe) + config.vocab_size * h


def flops_per_token(config, seq: int, checkpointing: bool) -> float:
    """Forward 2x active params, backward 2x (input gradients through frozen weights), recompute 2x more with
    checkpointing; causal attention scores 2*seq*heads*head_dim per layer forward, twice that backward."""
    heads = config.num_attention_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // heads
    passes = 3 if checkpointing else 2
    scores = config.num_hidden_layers * 2 * seq * heads * d
    return 2 * passes * active_params(config) + scores * (passes + 1)


def measured_hfu(path: Path = GPU_CHECK_RESULT) -> tuple[float, str] | None:
    """Hardware FLOPs utilisation of our variant in a gpu_check.json, recomputed with `flops_per_token`."""
    if not path.is_file():
        return None
    from finetune.model.tiny import TinySpec, mixtral_config

    data = json.loads(path.read_text())
    ours = next((r for r in data.get("results", []) if r.get("variant") == "ours" and r.get("tokens_per_s")), None)
    if ours is None:
        return None
    sh, run = data["shape"], data["settings"]["run"]
    spec = TinySpec(sh["hidden"], sh["ffn"], sh["layers"], sh["experts"], sh["top_k"], sh["heads"], sh["kv_heads"])
    config = mixtral_config(spec, vocab_size=sh["vocab"])
    peak = data["settings"]["cli"]["peak_tflops"] * 1e12
    hfu = ours["tokens_per_s"] * flops_per_token(config, run["seq"], run["grad_ckpt"]) / peak
    gpu = data.get("environment", {}).get("gpu") or data.get("environment", {}).get("device", "a GPU")
    return hfu, f"measured {hfu:.1%} on {gpu} ({path.name})"


@dataclass
class DataSize:
    """What one epoch holds, as the trainer sees it: records (after samples/weight and the eval hold-out) and the
    mean tokens of one sequence (capped at max_length). `exact` is False when a source could only be counted at
    max_length (a hub dataset, not read offline): the time is then an upper bound."""

    records: int | None
    mean_length: float | None
    exact: bool
    note: str


def time_estimate(config, s, gpu, data: DataSize | None, epochs: float, max_steps: int, packing: bool):
    """Throughput (None for a card of unknown speed), steps and seconds of the run, each only where it is known."""
    hfu, source = measured_hfu() or (ASSUMED_HFU, f"assumed {ASSUMED_HFU:.0%} (no bench/results/gpu_check.json)")
    fpt = flops_per_token(config, s.max_length, s.gradient_checkpointing)
    tokens_per_s = s.num_gpus * hfu * gpu.bf16_tflops * 1e12 / fpt if gpu.bf16_tflops else None
    rows_per_step = s.batch_size * s.grad_accum * s.num_gpus
    known = data is not None and data.mean_length is not None
    row_length = s.max_length if packing or not known else data.mean_length  # packed rows fill max_length
    tokens_per_step = round(row_length * rows_per_step * s.sequences_per_record)
    out = {"flops_per_token": fpt, "active_params": active_params(config), "hfu": hfu, "hfu_source": source,
           "tokens_per_second": tokens_per_s, "tokens_per_step": tokens_per_step, "gpu": gpu.name,
           "upper_bound": not (data is not None and data.exact)}  # fmt: skip
    if max_steps > 0:
        out["steps"] = max_steps
        out["upper_bound"] = not packing and out["upper_bound"]  # packed rows are full whatever the data
    elif data is not None and data.records is not None and data.mean_length is not None:
        rows = data.records * data.mean_length / s.max_length if packing else data.records
        out["steps"] = max(1, math.ceil(epochs * rows / rows_per_step))
        out["tokens_per_epoch"] = round(data.records * data.mean_length * s.sequences_per_record)
    if "steps" in out and tokens_per_s:  # epochs of data: the last step may be part-full, so count the tokens
        tokens = epochs * out["tokens_per_epoch"] if "tokens_per_epoch" in out else out["steps"] * tokens_per_step
        out["seconds"] = tokens / tokens_per_s
    return out


def duration_text(seconds: float) -> str:
    """Seconds, minutes or hours, whichever reads best: `under a second`, `42 s`, `7.5 min`, `3.2 h (1.3 days)`."""
    if seconds < 1:
        return "under a second"
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 90:
        return f"{minutes:.1f} min" if minutes < 10 else f"{minutes:.0f} min"
    hours = minutes / 60
    return f"{hours:.1f} h" + (f" ({hours / 24:.1f} days)" if hours >= 48 else "")


def one_line(error: Exception, width: int = 240) -> str:
    """An error as one readable line, shortened at a word boundary (never mid-word)."""
    text = error.message if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
    return textwrap.shorten(" ".join(str(text).split()), width=width, placeholder=" ...")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
MIXTRAL_V1_VOCAB = 32000  # the vocabulary of mistral-common's tokenizer.model.v1, Mixtral-8x7B's tokenizer


@contextmanager
def tokenizer_folder(folder: Path, config):
    """(folder with the model's tokenizer, note): the model folder's own, or for a config.json alone of Mixtral's
    vocabulary the v1 tokenizer mistral-common ships (offline); None when neither is there."""
    if any((folder / name).is_file() for name in TOKENIZER_FILES):
        yield folder, ""
        return
    if config.vocab_size != MIXTRAL_V1_VOCAB:
        yield None, f"{folder} has no tokenizer files and its vocabulary is not Mixtral's v1"
        return
    from finetune.model.tiny import write_tokenizer

    with tempfile.TemporaryDirectory(prefix="finetune-plan-") as tmp:
        write_tokenizer(Path(tmp))
        yield Path(tmp), "; tokenizer: Mixtral v1 from mistral-common, as the model folder has none"


def data_size(recipe, folder: Path, config) -> DataSize:
    """Records and mean sequence length of one epoch: local sources from a tokenised sample of up to 200 records
    each (by the tokeniser `run` uses), hub datasets by their `samples` count at max_length (never read here: the
    plan does not use the network)."""
    from datasets.utils import logging as datasets_logging

    from data_tools.io import resolve_path

    cfg, max_length = recipe.data, recipe.data.max_length
    local, hub = [], []
    try:
        for src in cfg.train:
            (local if resolve_path(src.path) is not None else hub).append(src)
    except UserError as e:
        return DataSize(None, None, False, f"data not read ({one_line(e)})")
    uncounted = [src.path for src in hub if src.samples is None]
    if uncounted:
        return DataSize(None, None, False, f"data not read: {', '.join(uncounted)} is a hub dataset (not read "
                        "offline) without a samples count; set data.train[i].samples, or point it at local files")  # fmt: skip
    records, tokens = sum(src.samples for src in hub), float(sum(src.samples for src in hub) * max_length)
    notes = (
        [f"{len(hub)} hub source(s), not read offline: each record counted at max_length {max_length}"] if hub else []
    )
    if local:
        bars = datasets_logging.is_progress_bar_enabled()
        datasets_logging.disable_progress_bar()  # the plan prints a table, not tokenising progress
        try:
            with tokenizer_folder(folder, config) as (tok_dir, tok_note):
                if tok_dir is None:
                    return DataSize(None, None, False, f"data not read: {tok_note}")
                n, mean = sample_lengths(recipe, local, tok_dir)
            records, tokens = records + n, tokens + n * mean
            notes.insert(
                0, f"a tokenised sample of up to 200 records from each of {len(local)} local source(s){tok_note}"
            )
        except Exception as e:  # an unreadable source or tokenizer: the plan still gives memory and throughput
            return DataSize(None, None, False, f"data not read ({one_line(e)})")
        finally:
            if bars:
                datasets_logging.enable_progress_bar()
    if cfg.eval is None and cfg.eval_fraction > 0:
        records, tokens = records * (1 - cfg.eval_fraction), tokens * (1 - cfg.eval_fraction)
    return DataSize(round(records), tokens / max(records, 1), not hub, "from " + "; ".join(notes))


def sample_lengths(recipe, sources, tok_dir: Path) -> tuple[int, float]:
    """(records the trainer sees, mean tokens per sequence) over local sources, from up to 200 records each."""
    from collections import Counter

    import numpy as np

    from data_tools.pipeline import check_pad_token, format_spec, tokenize_records
    from data_tools.preference import as_method, load_for, tokenize_preference
    from data_tools.stats import preference_lengths
    from data_tools.validate import load_source
    from finetune.model.load import load_tokenizer

    cfg, method = recipe.data, recipe.method
    tokenizer = load_tokenizer(tok_dir)
    check_pad_token(tokenizer)
    spec = format_spec(cfg, tokenizer, tok_dir)
    records, tokens = 0, 0.0
    for src in sources:
        if method == "sft":
            rows = load_source(src.path, src.format, src.split, kind="conversation").records
            with tempfile.TemporaryDirectory() as tmp:
                ds = tokenize_records(rows[:200], spec, tokenizer, cfg.max_length, cache_dir=Path(tmp))
            lengths = np.minimum(np.asarray(ds["length"], dtype=np.int64), cfg.max_length)
        else:
            rows = as_method(load_for(src, method, Counter()).records, method)
            ds = tokenize_preference(rows[:200], method, spec, tokenizer, cfg.max_length)
            lengths = np.minimum(preference_lengths(ds), cfg.max_length)  # prompt + longest completion
        n = src.samples or round(len(rows) * (src.weight if src.weight is not None else 1.0))
        records += n
        tokens += n * (float(lengths.mean()) if len(lengths) else 0.0)
    return records, tokens / max(records, 1)
