"""The recipe's data for its method, and the checks a preflight runs on it before anything loads.

`prepare_data` hands SFT data to `pipeline` and preference data (DPO, KTO) to `preference`; the checks say, with the
recipe key or FILE:LINE, whether each source holds the kind of data the method trains on and whether every record
is readable.
"""

from __future__ import annotations

from collections import Counter
from contextlib import closing
from pathlib import Path

from data_tools.config import DataConfig
from data_tools.errors import DataError
from data_tools.pipeline import PreparedData, prepare_sft_data
from data_tools.validate import load_source


def prepare_data(
    cfg: DataConfig,
    tokenizer,
    *,
    model_dir: Path | None,
    seed: int,
    method: str = "sft",
    cache_dir: Path | None = None,
    echo=print,
) -> PreparedData:
    """The recipe's data for a method: sft → input_ids/labels (prepare_sft_data); dpo → prompt_ids, chosen_ids,
    rejected_ids; kto → prompt_ids, completion_ids, label (data_tools.preference). Wrong-kind data is an error."""
    problems = check_data_kind(cfg, method)
    if problems:
        if len(problems) == 1:
            raise DataError(problems[0])
        raise DataError(f"{len(problems)} data sources do not fit method: {method}", problems)
    if method == "sft":
        return prepare_sft_data(cfg, tokenizer, model_dir=model_dir, seed=seed, cache_dir=cache_dir, echo=echo)
    from data_tools.preference import prepare_preference_data

    return prepare_preference_data(cfg, tokenizer, model_dir=model_dir, method=method, echo=echo)


ACCEPTED_KINDS = {"sft": ("conversation",), "dpo": ("preference",), "kto": ("unpaired", "preference")}
NEEDS = {
    "sft": "conversations (formats alpaca, sharegpt, messages, prompt_completion, text)",
    "dpo": "preference pairs (prompt/chosen/rejected: formats preference, hh_rlhf)",
    "kto": "unpaired records (prompt/completion/label: format unpaired) or preference pairs",
}
SUGGEST = {
    "conversation": "use method: sft, or preference data such as builtin:tiny-preference",
    "preference": "use method: dpo (or kto), or conversation data such as builtin:tiny-chat",
    "unpaired": "use method: kto, or pairs such as builtin:tiny-preference",
}


def check_data_kind(cfg: DataConfig, method: str) -> list[str]:
    """Does each source hold the kind of data the method trains on? One key-named line per source that does not.

    Cheap enough for a preflight: reads only up to the first parseable record of each local source. Sources that
    cannot be read, hub ids (offline) and records whose format cannot be detected are left to the loader, which
    reports them with FILE:LINE.
    """
    from data_tools.formats import detect_format
    from data_tools.io import read_records, resolve_path
    from data_tools.validate import KIND_TEXT, data_kind

    if method not in ACCEPTED_KINDS:
        return []
    sources = [(f"data.train[{i}]", s) for i, s in enumerate(cfg.train)]
    if cfg.eval is not None:
        sources.append(("data.eval", cfg.eval))
    problems = []
    for key, src in sources:
        fmt, origin = src.format, f"{key}.format"
        if fmt == "auto":
            try:
                if resolve_path(src.path) is None:
                    continue
                with closing(read_records(src.path)) as records:
                    first = next((r for r in records if r.data is not None), None)
            except DataError:
                continue
            fmt = detect_format(first.data) if first is not None else None
            if fmt is None:
                continue
            origin = f"detected from {first.where}"
        kind = data_kind(fmt)
        if kind not in ACCEPTED_KINDS[method]:
            problems.append(
                f"{key}: {src.path} is in {fmt} format ({KIND_TEXT[kind]}, {origin}), but method: {method} needs "
                f"{NEEDS[method]}; {SUGGEST[kind]}"
            )
    return problems


RECORD_LINES_SHOWN = 50  # bad records listed by `check_records`; `finetune data validate FILE` lists every one


def check_records(cfg: DataConfig, method: str) -> list[str]:
    """Every local record read and checked by the loader `prepare_data` uses for the method: one `FILE:LINE: reason`
    line per bad record (the first RECORD_LINES_SHOWN, then a count) under one problem, or [] when `run` would take
    the data.

    With `skip_invalid` bad records are no problem unless no training record is left. Hub ids are left to the run
    (offline); a source that cannot be read at all is one line. Reads every record: `finetune validate
    --no-data-check` skips it for very large data.
    """
    from data_tools.io import resolve_path
    from data_tools.preference import load_for

    if method not in ACCEPTED_KINDS:
        return []
    sources = [(f"data.train[{i}]", s) for i, s in enumerate(cfg.train)]
    if cfg.eval is not None:
        sources.append(("data.eval", cfg.eval))
    bad, problems, valid = [], [], 0
    for key, src in sources:
        try:
            if resolve_path(src.path) is None:
                valid += 1  # a hub dataset: not read here, assumed to hold records
                continue
            if method == "sft":
                loaded = load_source(src.path, src.format, src.split, kind="conversation")
            else:
                loaded = load_for(src, method, Counter())
        except DataError as e:
            problems.append(f"{key}: {e.message}")
            continue
        bad += [line for _, line in loaded.problems]
        valid += len(loaded.records) if key != "data.eval" else 0
    if bad and cfg.skip_invalid and not valid and not problems:
        problems.append(listed(f"data.train: every record is invalid ({len(bad)}), so none is left to train on", bad))
    if bad and not cfg.skip_invalid:
        head = f"data: {len(bad)} invalid record(s); fix them, or set data.skip_invalid: true to skip and count them"
        problems.append(listed(head, bad))
    return problems


def listed(head: str, lines: list[str], shown: int = RECORD_LINES_SHOWN) -> str:
    """One problem: its head, then the first `shown` record lines indented under it (UserError prints `  - head`)."""
    more = [f"... and {len(lines) - shown} more; `finetune data validate FILE` lists every one"]
    more = more if len(lines) > shown else []
    return "\n".join([head, *(f"      {line}" for line in [*lines[:shown], *more])])
