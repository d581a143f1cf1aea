"""`finetune data …`: validate, convert, tokenize, preview, stats, split, dedupe.

Every command turns bad input into `error: …` on stderr and exit code 2 (no traceback), refuses to overwrite an
existing output without --overwrite, and never writes over its input.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from data_tools.hygiene import hashed_records

app = typer.Typer(help="Prepare data: validate, convert, tokenize, preview, stats, split, dedupe", no_args_is_help=True)

FormatOpt = Annotated[
    str,
    typer.Option("--format", help="auto|alpaca|sharegpt|messages|prompt_completion|text|preference|hh_rlhf|unpaired"),
]
RecipeOpt = Annotated[Path, typer.Option("--recipe", "-r", help="Recipe YAML (its model tokenizer and data settings)")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file (never an input)")]
StrictOpt = Annotated[
    bool,
    typer.Option("--strict", help="Refuse the file (exit 2) if a record is invalid, instead of naming it and going on"),
]
OutputOpt = Annotated[
    Path,
    typer.Option("--output", "-o", help="Output file; its extension picks the format: .jsonl, .json, .parquet, .csv"),
]
PLOT_SUFFIXES = (".png", ".svg", ".pdf")
FORMATS = ("auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text", "preference", "hh_rlhf", "unpaired")
METHOD_OF_KIND = {"conversation": "sft", "preference": "dpo", "unpaired": "kto"}


def guarded(fn):
    """Bad input → one-line error and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from finetune.errors import UserError

        try:
            return fn(*args, **kwargs)
        except UserError as e:  # DataError is one too
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, UnicodeDecodeError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _check_format(fmt: str) -> None:
    from data_tools.errors import DataError

    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def _claim_outputs(source: str, outputs: list[Path], overwrite: bool, suffixes=None) -> list[Path]:
    """Refuse outputs with another extension, that exist (without --overwrite), or that are (inside) the input;
    returns the input paths. Runs before any work, so a refused output costs nothing."""
    from data_tools.io import SUFFIXES, resolve_path
    from data_tools.writers import check_output

    inputs = [p for p in [resolve_path(source)] if p is not None]
    for out in outputs:
        check_output(out, overwrite, inputs, suffixes or SUFFIXES)
    return inputs


def load_context(recipe: Path):
    """(DataConfig, tokenizer, model_dir) of a recipe."""
    from finetune.model.load import load_tokenizer, resolve_model_dir
    from finetune.recipe.schema import load_recipe

    r = load_recipe(recipe)
    model_dir = resolve_model_dir(r.model.path)
    return r.data, load_tokenizer(model_dir), model_dir


def _tokenized(file: str, fmt: str, recipe: Path, *, strict: bool | None = None):
    """Load, validate and tokenise one file with a recipe's settings → (cfg, tokenizer, dataset, method).

    The file's own kind decides: conversations → input_ids/labels (sft); pairs → prompt_ids, chosen_ids,
    rejected_ids (dpo); unpaired records → prompt_ids, completion_ids, label (kto). Bad records: strict None
    follows the recipe's data.skip_invalid; True/False refuse them or name them on stderr and go on without them."""
    from data_tools.pipeline import format_spec, tokenize_records
    from data_tools.preference import tokenize_preference
    from data_tools.validate import data_kind, load_source, raise_or_report, skip_or_refuse

    _check_format(fmt)
    cfg, tokenizer, model_dir = load_context(recipe)
    loaded = load_source(file, fmt, kind="auto")
    if strict is None:
        raise_or_report(loaded, cfg.skip_invalid, echo=lambda m: typer.echo(m, err=True))
    else:
        skip_or_refuse(loaded, strict, echo=lambda m: typer.echo(m, err=True))
    spec = format_spec(cfg, tokenizer, model_dir)
    method = METHOD_OF_KIND[data_kind(loaded.format)]
    if method == "sft":
        ds = tokenize_records(loaded.records, spec, tokenizer, cfg.max_length, num_proc=cfg.num_proc)
    else:
        ds = tokenize_preference(loaded.records, method, spec, tokenizer, cfg.max_length, cfg.num_proc)
    return cfg, tokenizer, ds, method


@app.command()
@guarded
def validate(
    files: Annotated[list[str], typer.Argument(help="Data files or folders (jsonl, json, parquet, csv)")],
    recipe: Annotated[Path | None, typer.Option("--recipe", "-r", help="Also count records over max_length")] = None,
    fmt: FormatOpt = "auto",
) -> None:
    """Report every bad record as FILE:LINE: reason; exit 2 when any record is invalid."""
    from data_tools.errors import DataError
    from data_tools.validate import REASON_TEXT, load_source

    _check_format(fmt)
    counts: Counter = Counter()
    total = 0
    too_long: list[str] = []
    context = load_context(recipe) if recipe is not None else None
    file_errors: list[str] = []
    for file in files:
        try:
            loaded = load_source(file, fmt, kind="auto")
        except DataError as e:  # a file that cannot be read at all: report it and go on with the others
            file_errors.append(str(e))
            typer.echo(f"error: {e}")
            continue
        total += len(loaded.records) + len(loaded.problems)
        counts.update(loaded.counts)
        for _, line in loaded.problems:
            typer.echo(line)
        if context is not None and loaded.records and "messages" in loaded.records[0]:
            from data_tools.pipeline import format_spec, tokenize_records

            cfg, tokenizer, model_dir = context
            spec = format_spec(cfg, tokenizer, model_dir)
            ds = tokenize_records(loaded.records, spec, tokenizer, cfg.max_length, num_proc=cfg.num_proc)
            for where, n in zip(ds["where"], ds["length"], strict=True):
                if n > cfg.max_length:
                    too_long.append(f"{where}: {n} tokens > max_length {cfg.max_length} (would be truncated)")
    for line in too_long:
        typer.echo(line)
    bad = sum(counts.values())
    if total or not file_errors:
        typer.echo(f"{total} records, {total - bad} valid, {bad} invalid")
    for reason, n in sorted(counts.items()):
        typer.echo(f"  {REASON_TEXT.get(reason, reason)}: {n}")
    if recipe is not None:
        typer.echo(f"  {REASON_TEXT['too_long']}: {len(too_long)} (warning)")
    if file_errors:
        typer.echo(f"{len(file_errors)} file(s) could not be read (see error: lines above)")
    if bad or file_errors:
        raise typer.Exit(2)


@app.command()
@guarded
def convert(
    src: Annotated[str, typer.Argument(help="Input file or folder")],
    to: Annotated[str, typer.Option("--to", help="messages | preference | unpaired")],
    out: OutputOpt,
    fmt: FormatOpt = "auto",
    skip_invalid: Annotated[bool, typer.Option(help="Skip (and count) invalid records")] = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Convert to the canonical conversation (messages), preference (prompt/chosen/rejected) or unpaired
    (prompt/completion/label, for KTO: each pair → one desirable and one undesirable record) form."""
    from data_tools.errors import DataError
    from data_tools.formats import unpair
    from data_tools.validate import data_kind, load_source, raise_or_report
    from data_tools.writers import write_records

    _check_format(fmt)
    if to not in ("messages", "preference", "unpaired"):
        raise DataError(f"--to must be messages, preference or unpaired, not {to!r}")
    inputs = _claim_outputs(src, [out], overwrite)
    if to == "unpaired":  # unpaired input is rewritten in canonical form; pairs are split in two
        loaded = load_source(src, fmt, kind="auto")
        if data_kind(loaded.format) == "conversation":
            raise DataError(
                f"{src} is in {loaded.format!r} format (conversations), which has no chosen/rejected pairs to unpair; "
                "use preference, hh_rlhf or unpaired data"
            )
    else:
        loaded = load_source(src, fmt, kind="conversation" if to == "messages" else "preference")
    raise_or_report(loaded, skip_invalid, echo=lambda m: typer.echo(m, err=True))
    keys = {"messages": ("messages",), "preference": ("prompt", "chosen", "rejected")}.get(
        to, ("prompt", "completion", "label")
    )
    records = loaded.records
    if to == "unpaired":
        records = [u for r in records for u in (unpair(r) if "chosen" in r else [r])]
    n = write_records(out, ({k: r[k] for k in keys} for r in records), overwrite, inputs)
    typer.echo(f"wrote {n} records ({loaded.format} → {to}) to {out}")


@app.command()
@guarded
def tokenize(
    file: Annotated[str, typer.Argument(help="Data file or folder")],
    recipe: RecipeOpt,
    out: Annotated[Path, typer.Option("--output", "-o", help="Output file: .jsonl, .json or .parquet")],
    fmt: FormatOpt = "auto",
    overwrite: OverwriteOpt = False,
) -> None:
    """Write the token ids per input record, in input order: input_ids and labels (before packing) for
    conversations; prompt_ids, chosen_ids, rejected_ids for pairs; prompt_ids, completion_ids, label for unpaired."""
    from data_tools.preference import columns
    from data_tools.writers import write_records

    _check_format(fmt)
    inputs = _claim_outputs(file, [out], overwrite, suffixes=(".jsonl", ".json", ".parquet"))
    _, _, ds, method = _tokenized(file, fmt, recipe)
    keys = ["input_ids", "labels"] if method == "sft" else columns(method)
    rows = ({"where": r["where"], **{k: r[k] for k in keys}} for r in ds)
    n = write_records(out, rows, overwrite, inputs)
    typer.echo(f"wrote {n} tokenised records to {out}")


@app.command()
@guarded
def preview(
    file: Annotated[str, typer.Argument(help="Data file or folder")],
    recipe: RecipeOpt,
    n: Annotated[int, typer.Option("-n", help="How many records to show")] = 3,
    fmt: FormatOpt = "auto",
    strict: StrictOpt = False,
) -> None:
    """Show formatted records; tokens that carry loss are highlighted in green, masked ones are dim.

    Pairs show the prompt, then chosen and rejected side by side; unpaired records their completion and label."""
    from rich.console import Console
    from rich.text import Text

    from data_tools.preview import LEGEND, mask_text, preference_view

    _, tokenizer, ds, method = _tokenized(file, fmt, recipe, strict=strict)
    console = Console()
    if method != "sft":
        for row in ds.select(range(min(n, len(ds)))):
            console.rule()
            console.print(Text(row["where"], style="bold"), soft_wrap=True)
            console.print(preference_view(row, tokenizer))
        console.print(LEGEND)
        return
    for row in ds.select(range(min(n, len(ds)))):
        ids, labels = row["input_ids"], row["labels"]
        trained = sum(label != -100 for label in labels)
        console.rule()  # the location on its own line: a rule title would cut a long path short
        console.print(Text(f"{row['where']}  ({len(ids)} tokens, {trained} trained)", style="bold"), soft_wrap=True)
        console.print(mask_text(ids, labels, tokenizer))
    console.print(LEGEND)


@app.command()
@guarded
def stats(
    file: Annotated[str, typer.Argument(help="Data file or folder")],
    recipe: RecipeOpt,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write a length histogram here (.png, .svg, .pdf)")
    ] = None,
    fmt: FormatOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the stats as JSON")] = False,
    overwrite: OverwriteOpt = False,
    strict: StrictOpt = False,
) -> None:
    """Record count, token-length percentiles and histogram, truncation, tokens per role, duplicates.

    Tokens per role: a system prompt counts as system even where the chat format puts it inside a user message;
    `other` is the BOS token and the chat format's own tokens outside the messages. For preference data: token
    lengths of prompt, chosen and rejected (or completion), and the histogram of prompt + longest completion.
    """
    import numpy as np

    from data_tools import stats as st

    _check_format(fmt)
    if plot is not None:
        _claim_outputs(file, [plot], overwrite, suffixes=PLOT_SUFFIXES)
    cfg, _, ds, method = _tokenized(file, fmt, recipe, strict=strict)
    if method != "sft":
        lengths = st.preference_lengths(ds)
        s = st.preference_dataset_stats(ds, cfg.max_length)
        if not as_json:
            typer.echo("\n".join(st.preference_report(s)))
    else:
        lengths = np.asarray(ds["length"])
        s = st.dataset_stats(ds, cfg.max_length)
    if as_json:
        typer.echo(json.dumps(s, indent=2))
    elif method == "sft":
        typer.echo(f"records: {s['records']}   tokens: {s['tokens']}   duplicates: {s['duplicates']}")
        pct = "  ".join(f"{k} {v:.0f}" for k, v in s["length_percentiles"].items())
        typer.echo(f"length: min {s['length_min']}  mean {s['length_mean']:.1f}  {pct}  max {s['length_max']}")
        typer.echo(f"truncated at max_length {cfg.max_length}: {s['truncated']}")
        roles = s["tokens_per_role"]
        typer.echo(
            "tokens per role: "
            + "  ".join(f"{k} {v}" for k, v in roles.items() if k != "other")
            + f"  other {roles['other']} (BOS and chat-format tokens)"
        )
    if not as_json:
        buckets = st.histogram(lengths)
        peak = max((c for _, _, c in buckets), default=1)
        width = max((len(st.bucket_label(lo, hi)) for lo, hi, _ in buckets), default=0)
        typer.echo("tokens per record:" if method == "sft" else "tokens per record (prompt + longest completion):")
        for lo, hi, c in buckets:
            typer.echo(f"  {st.bucket_label(lo, hi):>{width}} {c:>7} {'█' * max(1 if c else 0, round(40 * c / peak))}")
    if plot is not None:
        st.plot_lengths(lengths, cfg.max_length, plot)
        typer.echo(f"wrote {plot}")


@app.command()
@guarded
def split(
    file: Annotated[str, typer.Argument(help="Data file or folder")],
    eval_fraction: Annotated[float, typer.Option("--eval-fraction", help="Fraction held out for eval (0-1)")],
    out_dir: Annotated[Path, typer.Option("--output", "-o", help="Folder for train.EXT and eval.EXT")],
    seed: Annotated[int, typer.Option("--seed", help="Split seed")] = 0,
    fmt: FormatOpt = "auto",
    ext: Annotated[str, typer.Option("--ext", help="File type of the outputs: jsonl, json, parquet or csv")] = "jsonl",
    overwrite: OverwriteOpt = False,
) -> None:
    """Deterministic split by content hash: the same input and seed give the same split, in any order."""
    from data_tools.errors import DataError
    from data_tools.hygiene import in_eval
    from data_tools.writers import write_records

    _check_format(fmt)
    if not 0 < eval_fraction < 1:
        raise DataError(f"--eval-fraction must be between 0 and 1, not {eval_fraction}")
    ext = ext.lower().lstrip(".")
    if ext not in ("jsonl", "json", "parquet", "csv"):
        raise DataError(f"--ext {ext!r} is not supported; use jsonl, json, parquet or csv")
    train_path, eval_path = out_dir / f"train.{ext}", out_dir / f"eval.{ext}"
    inputs = _claim_outputs(file, [train_path, eval_path], overwrite)
    rows = hashed_records(file, fmt)
    held = [in_eval(h, seed, eval_fraction) for _, h, _ in rows]
    n_train = write_records(
        train_path, (r for (r, _, _), e in zip(rows, held, strict=True) if not e), overwrite, inputs
    )
    n_eval = write_records(eval_path, (r for (r, _, _), e in zip(rows, held, strict=True) if e), overwrite, inputs)
    typer.echo(f"train: {n_train} records → {train_path}\neval: {n_eval} records → {eval_path}")


@app.command()
@guarded
def dedupe(
    file: Annotated[str, typer.Argument(help="Data file or folder")],
    out: OutputOpt,
    fmt: FormatOpt = "auto",
    overwrite: OverwriteOpt = False,
) -> None:
    """Drop exact duplicates (after normalising whitespace and case), keeping the first occurrence."""
    from data_tools.writers import write_records

    _check_format(fmt)
    inputs = _claim_outputs(file, [out], overwrite)
    rows = hashed_records(file, fmt)
    seen: set[str] = set()
    kept = []
    for raw, _, norm in rows:
        if norm not in seen:
            seen.add(norm)
            kept.append(raw)
    n = write_records(out, kept, overwrite, inputs)
    typer.echo(f"kept {n} of {len(rows)} records ({len(rows) - n} duplicates removed) → {out}")
