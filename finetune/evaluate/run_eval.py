"""`finetune eval` end to end, and the same evaluation at the end of `finetune run` (the recipe's `evaluation:`).

Stages: resolve and check every input (inputs.resolve) → tokenise and read them (inputs.prepare) → load the model
once, adapter attached → per column (base = adapter disabled, then adapter): perplexity with the routing recorder on,
generation, lm-eval tasks → eval.json (+ eval_routing.png) written at once at the end → the W&B run's summary.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from finetune.evaluate.inputs import EVAL_FILE, EvalInputs, EvalRequest, prepare, resolve
from finetune.tracking.eval_table import flat_scalars, render

ROUTING_PNG = "eval_routing.png"


def columns_of(model: Any, has_adapter: bool) -> dict[str, Any]:
    """Column name → context manager factory; the base is the same model with the adapter switched off."""
    if not has_adapter:
        return {"base": contextlib.nullcontext}
    return {"base": model.disable_adapter, "adapter": contextlib.nullcontext}


def _unique(name: str, taken: dict[str, Any]) -> str:
    n, candidate = 2, name
    while candidate in taken:
        candidate, n = f"{name}#{n}", n + 1
    return candidate


def perplexity_section(model, inputs: EvalInputs, columns, device, result, echo) -> None:
    from finetune.evaluate.perplexity import bootstrap_difference, per_record, record_nll, summary
    from finetune.evaluate.routing_shift import RoutingRecorder, shift

    settings = inputs.settings
    recorder = RoutingRecorder(model) if settings.routing and "adapter" in columns else None
    nll: dict[str, list[Any]] = {column: [] for column in columns}
    tokens = []
    try:
        for column, context in columns.items():
            recording = recorder.column(column) if recorder is not None else contextlib.nullcontext()
            with context(), recording:
                for data in inputs.perplexity:
                    echo(f"eval: perplexity, {column}: {data.name} ({len(data)} records)")
                    values, counts = record_nll(model, data, settings.batch_size, device)
                    nll[column].append(values)
                    if column == "base":
                        tokens.append(counts)
    finally:
        if recorder is not None:
            recorder.remove()
    section = result.setdefault("perplexity", {})
    for j, data in enumerate(inputs.perplexity):
        part: dict[str, Any] = {column: summary(nll[column][j], tokens[j]) for column in columns}
        if "adapter" in columns:
            part["difference"] = bootstrap_difference(
                nll["base"][j], nll["adapter"][j], tokens[j], settings.bootstrap_samples, settings.seed
            )
        part["records"] = per_record(data, tokens[j], {column: nll[column][j] for column in columns})
        section[_unique(data.name, section)] = part
    if recorder is not None:
        result["routing"] = shift(recorder)


def generation_section(model, tokenizer, inputs: EvalInputs, columns, device, result, echo) -> None:
    from finetune.evaluate.generation_tasks import generate_replies, scores, side_by_side
    from finetune.export.generate import Generator, prompt_ids

    settings, gen = inputs.settings, Generator(model, tokenizer, inputs.source, device)
    section = result.setdefault("generation", {})
    for name, records in inputs.generation.items():
        prompts = [prompt_ids(gen, record.messages) for record in records]
        outputs = {}
        for column, context in columns.items():
            echo(f"eval: generation, {column}: {name} ({len(records)} records, greedy)")
            with context():
                outputs[column] = generate_replies(
                    model, tokenizer, prompts, batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens
                )
        references = [record.reference for record in records]
        part: dict[str, Any] = {column: scores(outputs[column], references) for column in columns}
        part["records"] = side_by_side(records, outputs)
        section[_unique(name, section)] = part


@contextlib.contextmanager
def without_router_logits(model):
    """No forward computes the aux loss while evaluating (a trained model's config asks for router logits, and
    generation and lm-eval call the model without saying): held-out figures are the language model's alone."""
    config = model.config
    saved = getattr(config, "output_router_logits", False)
    config.output_router_logits = False
    try:
        yield
    finally:
        config.output_router_logits = saved


def evaluate(model, tokenizer, inputs: EvalInputs, device, echo=print) -> dict[str, Any]:
    """Every figure, base and adapter, into one dict (what eval.json holds)."""
    with without_router_logits(model):
        return _evaluate(model, tokenizer, inputs, device, echo)


def _evaluate(model, tokenizer, inputs: EvalInputs, device, echo) -> dict[str, Any]:
    from finetune.evaluate.lm_eval_tasks import run_tasks

    source, settings = inputs.source, inputs.settings
    model.eval()
    columns = columns_of(model, source.adapter_dir is not None)
    result: dict[str, Any] = {
        "model": str(source.model_dir),
        "adapter": str(source.adapter_dir) if source.adapter_dir is not None else None,
        "quantization": source.quantization,
        "chat_format": source.chat_format,
        "columns": list(columns),
        "settings": settings.model_dump(),
    }
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    if inputs.perplexity:
        perplexity_section(model, inputs, columns, device, result, echo)
        seconds["perplexity"] = time.perf_counter() - started
    if inputs.generation:
        started = time.perf_counter()
        generation_section(model, tokenizer, inputs, columns, device, result, echo)
        seconds["generation"] = time.perf_counter() - started
    if inputs.tasks:
        started = time.perf_counter()
        echo(f"eval: lm-eval tasks {', '.join(spec.given for spec in inputs.tasks)} ({', '.join(columns)})")
        result["tasks"] = run_tasks(
            model, tokenizer, inputs.tasks, columns, batch_size=settings.batch_size, limit=settings.limit,
            bootstrap_iters=settings.bootstrap_samples,
        )  # fmt: skip
        seconds["tasks"] = time.perf_counter() - started
    result["seconds"] = seconds
    return result


def write_outputs(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """eval.json (written whole, then renamed into place) and the routing-shift heatmap when there is one."""
    from finetune.tracking.report_eval import routing_shift_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if result.get("routing"):
        figure = routing_shift_figure(result["routing"])
        figure.savefig(out_dir / ROUTING_PNG)
        written.append(out_dir / ROUTING_PNG)
    target = out_dir / EVAL_FILE
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, target)
    return [target, *written]


def wandb_run_id(run_dir: Path) -> str | None:
    """The id of the run's newest W&B run folder (wandb/run-DATE-ID or wandb/offline-run-DATE-ID)."""
    folders = sorted((run_dir / "wandb").glob("*run-*-*"), key=lambda p: p.name.rpartition("run-")[2])
    return folders[-1].name.rpartition("-")[2] if folders else None


def publish_wandb(recipe: Any, run_dir: Path, flat: dict[str, float], echo=print) -> bool:
    """Add the figures to the summary of the run's W&B run (resumed by id); never fatal. True when it did."""
    if recipe is None or recipe.tracking.backend != "wandb":
        return False
    run_id = wandb_run_id(run_dir)
    if run_id is None:
        return False
    settings = recipe.tracking
    try:
        import wandb

        from finetune.tracking.sinks import resolve_mode

        run = wandb.init(
            id=run_id, resume="allow", project=settings.project, entity=settings.entity, dir=str(run_dir),
            mode=resolve_mode(settings.mode), settings=wandb.Settings(silent=True, console="off"),
        )  # fmt: skip
        run.summary.update(flat)
        run.finish()
    except Exception as e:  # tracking is a view on the results, never a reason to lose them
        echo(f"warning: could not add the evaluation to W&B run {run_id} ({e}); eval.json has every figure")
        return False
    return True


def run_cli(request: EvalRequest, echo=print) -> tuple[dict[str, Any], list[Path]]:
    """`finetune eval`: check, prepare, load once, evaluate, write; returns the result and the files written."""
    from finetune.export.generate import load_generator
    from finetune.model.load import load_tokenizer

    inputs = resolve(request)  # every refusal, before anything loads
    inputs = prepare(inputs, load_tokenizer(inputs.source.model_dir))
    started = time.perf_counter()
    gen = load_generator(inputs.source, dtype=request.dtype, device=request.device)
    load_seconds = time.perf_counter() - started
    result = evaluate(gen.model, gen.tokenizer, inputs, gen.device, echo)
    result["seconds"]["load"] = load_seconds
    written = write_outputs(result, inputs.out_dir)
    if request.run_dir is not None:
        publish_wandb(inputs.recipe, request.run_dir, flat_scalars(result), echo)
    return result, written


def evaluate_after_training(recipe, model, tokenizer, model_dir: Path, eval_rows, tracker, step: int, echo=print):
    """The recipe's `evaluation:` at the end of `finetune run`, on the trained model in memory (no second load):
    eval.json in output_dir, the figures into the run's tracker (W&B summary). Checked by preflight already."""
    from finetune.distributed.ranks import world_size
    from finetune.evaluate.inputs import EvalInputs
    from finetune.export.generate import Source

    output_dir = Path(recipe.output_dir)
    if world_size() > 1:
        echo(f"note: evaluation runs in one process; run `finetune eval {output_dir}` after this multi-process run")
        return None
    data = recipe.data
    source = Source(model_dir, output_dir / "adapter", recipe.model.quantization, data.chat_format,
                    data.system_prompt, data.chat_template)  # fmt: skip
    inputs = prepare(EvalInputs(source, recipe.evaluation, output_dir, recipe), tokenizer, eval_rows)
    device = next(model.parameters()).device
    result = evaluate(model, tokenizer, inputs, device, echo)
    write_outputs(result, output_dir)
    tracker.log(flat_scalars(result), step=step)
    for line in render(result):
        echo(line)
    return result
