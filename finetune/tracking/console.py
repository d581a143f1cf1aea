"""What a person reads in the terminal: one line per logging step, the end-of-run summary, `--explain`.

transformers prints each log as a raw dict of strings, under a tqdm bar; `ReadableProgress` replaces both with one
formatted line per log, the same on a terminal and in a log file. The summary says what the run achieved, where everything is and which
commands to run next. Formatting is kept in pure functions so it is tested without training.
"""

from __future__ import annotations

import json
import shlex
import textwrap
import time
import typing
from pathlib import Path
from typing import Any

from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback

# --- per-step lines -----------------------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """4:05 / 1:02:03 style, as tqdm shows it."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def size(n_bytes: float) -> str:
    """Decimal units, as the recipe headers and bench results quote them."""
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.0f} MB"


def train_line(logs: dict[str, Any], step: int, max_steps: int, tokens_per_s: float | None, eta_s: float | None) -> str:
    """`step  5/60  loss 10.080  lr 3.75e-03  grad norm 1.66  aux 2.342  1,010 tok/s  ETA 3:05`."""
    width = len(str(max_steps))
    parts = [f"step {step:>{width}}/{max_steps}", f"loss {logs['loss']:.4f}"]
    if "learning_rate" in logs:
        parts.append(f"lr {logs['learning_rate']:.2e}")
    if logs.get("grad_norm") is not None:
        parts.append(f"grad norm {logs['grad_norm']:.3g}")
    if "aux_loss" in logs:
        parts.append(f"aux {logs['aux_loss']:.4f}")
    parts += preference_parts(logs, "")
    if tokens_per_s:
        parts.append(f"{tokens_per_s:,.0f} tok/s")
    if eta_s is not None and step < max_steps:
        parts.append(f"ETA {duration(eta_s)}")
    return "  ".join(parts)


def preference_parts(logs: dict[str, Any], prefix: str) -> list[str]:
    """DPO/KTO: how often the chosen answer wins, and by how much (TRL's rewards/* figures)."""
    parts = []
    if f"{prefix}rewards/accuracies" in logs:
        parts.append(f"reward acc {logs[f'{prefix}rewards/accuracies']:.0%}")
    if f"{prefix}rewards/margins" in logs:
        parts.append(f"margin {logs[f'{prefix}rewards/margins']:.3f}")
    return parts


def eval_line(logs: dict[str, Any], step: int, max_steps: int) -> str:
    """`eval  step 60/60  loss 7.6010  accuracy 12.5%  9 s`."""
    parts = [f"eval  step {step}/{max_steps}", f"loss {logs['eval_loss']:.4f}"]
    if "eval_mean_token_accuracy" in logs and "eval_rewards/accuracies" not in logs:
        parts.append(f"accuracy {logs['eval_mean_token_accuracy']:.1%}")
    parts += preference_parts(logs, "eval_")
    if "eval_aux_loss" in logs:
        parts.append(f"aux {logs['eval_aux_loss']:.4f}")
    if "eval_runtime" in logs:
        parts.append(f"{logs['eval_runtime']:.0f} s")
    return "  ".join(parts)


def other_line(logs: dict[str, Any]) -> str:
    """Any other log (not train, eval or the end-of-training record), compact but complete."""
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in logs.items())


class ReadableProgress(TrainerCallback):
    """A readable line per logging step on stdout, and the time spent in training steps.

    It is the run's one progress display, on a terminal or not: the line already says step N/M, tok/s and ETA, a
    tqdm bar would repeat it, and a log file then holds the same lines the terminal showed (no bar frames, no
    `\\r`). The step time (forward, backward, optimizer step; not evaluation, checkpoints or sample generation) is
    what the per-line tok/s and the summary's tokens/s divide by."""

    def __init__(self) -> None:
        self.last_time: float | None = None
        self.last_step = 0
        self.last_tokens: float | None = None
        self.step_seconds = 0.0  # the whole run's time in training steps
        self.interval_seconds = 0.0  # step time since the previous line
        self.step_started: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_time, self.last_step, self.last_tokens = time.time(), state.global_step, None

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.step_started is not None:
            seconds = time.perf_counter() - self.step_started
            self.step_seconds += seconds
            self.interval_seconds += seconds
            self.step_started = None

    def rates(self, logs: dict[str, Any], step: int, max_steps: int) -> tuple[float | None, float | None]:
        """Tokens/s over the training steps since the previous line; ETA from the wall time per step (which
        includes evaluation and checkpoints, as the rest of the run will)."""
        now = time.time()
        elapsed = now - (self.last_time or now)
        seconds = self.interval_seconds or elapsed  # steps not timed (driven without on_step_begin): wall time
        tokens = logs.get("num_tokens")
        tokens_per_s = None
        if tokens is not None and seconds > 0:
            tokens_per_s = (tokens - (self.last_tokens or 0)) / seconds
        steps = step - self.last_step
        eta = elapsed / steps * (max_steps - step) if steps > 0 else None
        self.last_time, self.last_step, self.last_tokens, self.interval_seconds = now, step, tokens, 0.0
        return tokens_per_s, eta

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            line = train_line(
                logs, state.global_step, state.max_steps, *self.rates(logs, state.global_step, state.max_steps)
            )
        elif "eval_loss" in logs:
            line = eval_line(logs, state.global_step, state.max_steps)
        elif "train_runtime" in logs:
            return  # the end-of-training record; the run summary says it better
        else:
            line = other_line(logs)
        print(line, flush=True)


def use_readable_progress(trainer: Any) -> ReadableProgress:
    """Replace the trainer's own display (tqdm's ProgressCallback, or PrinterCallback's raw dicts) with
    ReadableProgress, whatever training.extra.disable_tqdm says; returns it for its step time."""
    for stock in (ProgressCallback, PrinterCallback):
        if any(type(cb) is stock for cb in trainer.callback_handler.callbacks):
            trainer.remove_callback(stock)
    progress = ReadableProgress()
    trainer.add_callback(progress)
    return progress


# --- end-of-run summary -------------------------------------------------------------------------------------------

# What a run leaves behind, in the order a reader wants it: (path in output_dir, what it is); shown when present.
OUTPUTS = (
    ("adapter/", "LoRA adapter in standard PEFT format, with the tokenizer"),
    ("adapter/README.md", "model card: how to load the adapter, the recipe and the results"),
    ("metrics.json", "summary: losses, tokens/s, memory, versions"),
    ("metrics.jsonl", "every logged step (loss, lr, grad norm, expert load)"),
    ("recipe.yaml", "the recipe exactly as run, every default filled in"),
)

PEFT_LOAD = (
    "from peft import PeftModel; from transformers import AutoModelForCausalLM; "
    "base = AutoModelForCausalLM.from_pretrained({base_literal}); "
    "print(PeftModel.from_pretrained(base, {adapter_literal}))"
)

# Next commands, as (what it does, command template). Placeholders: {out} output folder, {recipe} the recipe as
# run, {data} the first training source, {peft_load} the python one-liner above. A new command is one line here.
NEXT_STEPS: tuple[tuple[str, str], ...] = (
    ("the logged steps", "tail -n 3 {out}/metrics.jsonl"),
    ("what was trained on, with the loss mask", "finetune data preview {data} --recipe {recipe} -n 3"),
    ("try it (the run's base, quantisation and chat format)", "finetune generate --model {out} --prompt 'Hello!'"),
    ("merge into the base for serving, verified by logits", "finetune merge {out} -o {out}-merged"),
    ("plots of loss, routing and samples", "finetune report {out}"),
    ("load the adapter with stock PEFT", "python -c {peft_load}"),
    ("train again with a change", "finetune run {recipe} --set output_dir={out}-2 --set training.max_steps=..."),
)


def next_commands(output_dir: Path, base_model: str, data_path: str | None) -> list[tuple[str, str]]:
    """NEXT_STEPS filled in for this run; a step whose input is unknown (no data source) is left out."""
    values = {
        "out": shlex.quote(str(output_dir)),
        "recipe": shlex.quote(str(output_dir / "recipe.yaml")),
        "data": shlex.quote(data_path) if data_path else None,
        "peft_load": shlex.quote(
            PEFT_LOAD.format(
                base_literal=json.dumps(base_model), adapter_literal=json.dumps(str(output_dir / "adapter"))
            )
        ),
    }
    return [
        (what, template.format(**values))
        for what, template in NEXT_STEPS
        if not any(values[k] is None and "{" + k + "}" in template for k in values)
    ]


def summary_lines(metrics: dict[str, Any], recipe: Any) -> list[str]:
    """The end of `finetune run`: results, where the outputs are, and the next commands."""
    loss = f"loss {metrics['first_loss']:.4f} -> {metrics['final_train_loss']:.4f}"
    if metrics.get("eval_loss") is not None:
        loss += f", eval loss {metrics['eval_loss']:.4f}"
    lines = [f"done: {metrics['steps']} steps in {duration(metrics['wall_seconds'])}, {loss}"]
    lines.append(f"  {speed_text(metrics)}")
    lines.append(f"  {memory_text(metrics)}")
    output_dir = Path(recipe.output_dir)
    lines.append(f"outputs in {output_dir}/")
    for name, what in OUTPUTS:
        if (output_dir / name.rstrip("/")).exists():
            lines.append(f"  {name:<18} {what}")
    lines.append("next:")
    for what, command in next_commands(output_dir, *summary_inputs(recipe)):
        lines += [f"  # {what}", f"  {command}"]
    return lines


def speed_text(metrics: dict[str, Any]) -> str:
    """Tokens/s over the training steps alone, then where the rest of the training loop's time went."""
    speed = f"{metrics['tokens_per_second']:,.0f} tokens/s" if metrics.get("tokens_per_second") else "no tokens"
    steps = metrics.get("step_seconds", metrics["train_seconds"])
    text = f"{speed} over {duration(steps)} of training steps"
    covers = metrics.get("tokens_per_second_covers") or {}
    if covers.get("from_step"):  # a resumed run measured only what it ran itself
        text += f" {covers['from_step'] + 1}-{covers['to_step']} (resumed at step {covers['from_step']})"
    other, samples = metrics["train_seconds"] - steps, metrics.get("sample_seconds") or 0.0
    if other >= 1:
        parts = ["evaluation", "checkpoints"] + ([f"samples {duration(samples)}"] if samples >= 1 else [])
        text += f"; the loop's other {duration(other)}: {', '.join(parts)}"
    return text


def summary_inputs(recipe: Any) -> tuple[str, str | None]:
    """The base model as stock transformers loads it, and the first training source."""
    from finetune.model.tiny import TINY_MODEL_NAME, cache_root

    base = recipe.model.path
    if base == TINY_MODEL_NAME:
        base = str(cache_root() / TINY_MODEL_NAME)
    return base, recipe.data.train[0].path if recipe.data.train else None


def memory_text(metrics: dict[str, Any]) -> str:
    """Peak memory with what it measures: CUDA allocator peak, or the whole process's resident memory on CPU."""
    peak = metrics.get("peak_memory")
    if not peak:
        return "peak memory: not measured"
    if metrics.get("peak_memory_kind") == "cuda_max_allocated":
        return f"peak GPU memory {size(peak)} (torch allocator)"
    added = metrics.get("train_memory_added")
    extra = f", of which training added {size(added)}" if added else ""
    return f"peak memory {size(peak)} (whole process, resident{extra})"


# --- recipe --explain ---------------------------------------------------------------------------------------------

NONE_NOTE = "none: leave the key out or write null"
WIDE = 160  # from this many columns the four-column table leaves descriptions room to read


def user_type(annotation: Any) -> str:
    """A type as a recipe author thinks of it: `integer or none`, `one of: sft, dpo`, `list of sources`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "one of: " + ", ".join(str(a) for a in args)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        inner = user_type(rest[0]) if len(rest) == 1 else " or ".join(user_type(a) for a in rest)
        return f"{inner}, or none" if inner.startswith("one of:") else f"{inner} or none"
    if origin is list:
        item = args[0] if args else Any
        if typing.get_origin(item) is typing.Literal:
            return "list, each one of: " + ", ".join(str(a) for a in typing.get_args(item))
        return f"list of {plural(user_type(item))}"
    if origin is dict:
        return "mapping of names to values"
    names = {bool: "true or false", int: "integer", float: "number", str: "text", Path: "path"}
    if annotation in names:
        return names[annotation]
    if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
        return section_noun(annotation)
    return "any value" if annotation is Any else str(annotation).replace("typing.", "")


def section_noun(model: type) -> str:
    """SourceConfig -> source, ModelSettings -> settings section (nested schema classes by their role)."""
    name = model.__name__
    for suffix in ("Config", "Settings"):
        if name.endswith(suffix) and name != suffix:
            stem = name.removesuffix(suffix).lower()
            return "section" if stem in ("model", "lora", "data", "training", "moe", "tracking", "dpo", "kto") else stem
    return "section"


def plural(noun: str) -> str:
    simple = {"integer": "integers", "number": "numbers", "source": "sources", "path": "paths"}
    return simple.get(noun, noun)


def default_text(value: Any) -> str:
    """A default as it would be written in YAML (none instead of null, to match the type column)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(default_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{}" if not value else str(value)
    return str(value)


def explain_rows(model: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, user type, default, description) for every recipe key, nested sections flattened."""
    from finetune.recipe.errors import unwrap_model

    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = unwrap_model(field.annotation)
        if field.is_required():
            default = "required"
        elif field.default_factory is not None:
            default = "" if nested else default_text(field.default_factory())
        else:
            default = default_text(field.default)
        rows.append((key, user_type(field.annotation), default, field.description or ""))
        if nested is not None:
            inner = f"{key}[]." if typing.get_origin(field.annotation) is list else f"{key}."
            rows += explain_rows(nested, prefix=inner)
    return rows


def print_explain(model: type, width: int | None = None) -> None:
    """Print every key so that it fits the terminal: a table when wide, key-then-description when narrow."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(width=width, highlight=False) if width else Console(highlight=False)
    rows = explain_rows(model)
    if console.width >= WIDE:
        table = Table("key", "type", "default", "description", expand=True)
        table.columns[0].no_wrap = True
        for column, ratio in zip(table.columns[1:], (3, 2, 6), strict=True):
            column.ratio, column.overflow = ratio, "fold"
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))
        console.print(table)
    else:  # narrow: the key and its type on one line, the description indented below, wrapped by hand
        for key, type_text, default, description in rows:
            head = f"{key}  {type_text}; {default_phrase(default)}" if default else f"{key}  {type_text}"
            text = Text(wrap(head, console.width, "", " " * 8))
            text.stylize("bold", 0, len(key))
            console.print(text)
            if description:
                console.print(Text(wrap(description, console.width, " " * 4, " " * 4)))
    console.print(Text(NONE_NOTE))


def default_phrase(default: str) -> str:
    return "required" if default == "required" else f"default {default}"


def wrap(text: str, width: int, first: str, rest: str) -> str:
    return textwrap.fill(text, width, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False)
