"""Recipe → data → model → TRL trainer → outputs.

The output folder contract: adapter/ (standard PEFT adapter + tokenizer), recipe.yaml (resolved),
metrics.json (summary), metrics.jsonl (every log line) and checkpoints/.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune.distributed.ranks import (
    checksums_by_rank,
    ddp_ignore_frozen,
    is_main_process,
    local_main_first,
    world_size,
)
from finetune.distributed.sharding import cpu_fsdp_arguments, local_bytes, local_bytes_by_group, save_gathered_adapter
from finetune.errors import UserError
from finetune.memory import PeakMemory
from finetune.model.load import check_model_dir, load_model, load_tokenizer, resolve_device, resolve_model_dir
from finetune.recipe.reader import run_length_notes
from finetune.recipe.schema import Recipe, dump_recipe
from finetune.recipe.secrets import scrub_yaml
from finetune.tracking.adapter_card import base_reference, set_base_reference, write_card
from finetune.tracking.callbacks import tracking_callbacks
from finetune.tracking.console import use_readable_progress
from finetune.tracking.sinks import Tracker, make_tracker, run_config
from finetune.train.arguments import init_adapter, trainer_arguments
from finetune.train.checkpoints import (
    adapter_staging,
    clean_leftovers,
    clear_checkpoints,
    first_logged_loss,
    publish_run,
    resolved_recipe,
    scan,
    trim_log,
    world_size_problem,
)
from finetune.train.divergence import DivergenceGuard
from finetune.train.interrupt import (
    AlreadyTrained,
    CheckpointControl,
    StopOnSignal,
    interrupted,
    nothing_left_to_train,
    restores_signals,
)

FINISHED_MARKERS = ("metrics.json", "adapter")


def finished_run_markers(output_dir: Path, overwrite: bool) -> list[str]:
    """Refuse to write over a finished run unless asked; returns what a later `clear_output_dir` will replace."""
    finished = [m for m in FINISHED_MARKERS if (output_dir / m).exists()]
    if finished and not overwrite:
        raise UserError(
            f"output_dir: {output_dir} already holds a finished run ({', '.join(finished)}); "
            "pass --overwrite to replace it, or set output_dir to a new folder (e.g. --set output_dir=...)"
        )
    return finished


def clear_output_dir(output_dir: Path, finished: list[str]) -> None:
    """With --overwrite, remove only what a run writes, and only once data and model have loaded."""
    if finished:
        for name in (*FINISHED_MARKERS, "metrics.jsonl", "samples.jsonl", "recipe.yaml", "checkpoints", "eval.json",
                     "eval_routing.png"):  # fmt: skip
            target = output_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)


def library_versions() -> dict[str, str]:
    import accelerate
    import bitsandbytes
    import datasets
    import peft
    import transformers
    import trl

    versions = {m.__name__: m.__version__ for m in (torch, transformers, peft, trl, bitsandbytes, accelerate, datasets)}
    versions["python"] = platform.python_version()
    return versions


def data_summary(stats: dict[str, Any]) -> str:
    """One line on what will be trained: records, skipped records (never silent), tokens, packing."""
    parts = [f"data: {stats.get('train_records')} train / {stats.get('eval_records')} eval records"]
    if stats.get("records_skipped"):
        from data_tools.validate import REASON_TEXT

        reasons = ", ".join(f"{REASON_TEXT.get(k, k)}: {n}" for k, n in stats.get("skipped_by_reason", {}).items())
        n = stats["records_skipped"]
        parts.append(f"{n} invalid record{'s' if n != 1 else ''} skipped" + (f" ({reasons})" if reasons else ""))
    if stats.get("truncated"):
        parts.append(f"{stats['truncated']} truncated to max_length")
    parts.append(f"{stats.get('trained_tokens')} of {stats.get('train_tokens')} tokens carry loss")
    if stats.get("packing_efficiency") is not None:
        parts.append(f"packing efficiency {stats['packing_efficiency']:.1%}")
    return ", ".join(parts)


@dataclass
class Start:
    """Where a run starts: its folder, a finished run there (replaced with --overwrite), the checkpoint it resumes."""

    output_dir: Path
    resume: bool
    finished: list[str]
    found: Any  # checkpoints.scan: complete checkpoints and leftovers
    latest: tuple[int, Path] | None  # (step, folder) resumed from
    started: float = field(default_factory=time.time)


@dataclass
class Session:
    """The trainer and everything that watches it: tracking, samples, divergence, signals, checkpoints, progress."""

    trainer: Any
    method: Any
    tracker: Tracker
    tracking: Any
    samples: Any
    expert_load: Any
    divergence: DivergenceGuard
    stop: StopOnSignal
    saving: CheckpointControl
    progress: Any


@dataclass
class Trained:
    """What the training loop gave: the trainer's result, its memory, and its times."""

    result: Any
    peak: PeakMemory
    train_seconds: float
    step_seconds: float


@restores_signals  # StopOnSignal, installed when training starts, stays through the final evaluation and write
def run(recipe: Recipe, *, overwrite: bool = False, force: bool = False, resume: bool = True) -> dict[str, Any]:
    """Train one recipe end to end and return the metrics written to metrics.json.

    An output_dir with checkpoints but no finished run resumes from its newest complete checkpoint (`resume=False`
    deletes them and starts over). A SIGTERM/SIGINT saves a checkpoint and raises `interrupt.Interrupted`."""
    from finetune.train.preflight import check

    # every refusal possible before loading, a resume from a different recipe included; `finetune validate` runs it
    check(recipe, overwrite=overwrite, resume=resume)
    start = find_start(recipe, overwrite=overwrite, resume=resume)
    model_dir, tokenizer, prepared = prepare_inputs(recipe, force=force)
    loaded, base = load(recipe, model_dir)
    prepare_outputs(recipe, start, prepared)
    session = build_trainer(recipe, start, loaded, tokenizer, prepared)
    trained = train(session, start, loaded, prepared)
    return finish(recipe, start, session, trained, loaded, tokenizer, prepared, model_dir, base)


def find_start(recipe: Recipe, *, overwrite: bool, resume: bool) -> Start:
    """A fresh start, a resume from the newest complete checkpoint, or the replacement of a finished run."""
    output_dir = Path(recipe.output_dir)
    finished = finished_run_markers(output_dir, overwrite)
    found = scan(output_dir)
    latest = found.latest if resume and not finished else None  # --overwrite replaces a finished run, checkpoints too
    problem = latest and world_size_problem(latest[1], world_size())
    if problem:
        raise UserError(problem)
    torch.manual_seed(recipe.training.seed)
    return Start(output_dir, resume, finished, found, latest)


def prepare_inputs(recipe: Recipe, *, force: bool) -> tuple[Path, Any, Any]:
    """The model folder, the tokenizer and the tokenised data, before the model loads: a bad record costs seconds."""
    from data_tools.prepare import prepare_data
    from finetune.plan.estimate import preflight
    from finetune.train.methods import METHODS

    model_dir = resolve_model_dir(
        recipe.model.path, revision=recipe.model.revision, allow_pickle=recipe.model.allow_pickle
    )
    check_model_dir(model_dir, recipe.model)
    main_process = is_main_process()  # under accelerate/torchrun only rank 0 prints the data, writes outputs, tracks
    echo = print if main_process else lambda *_: None
    preflight(recipe, model_dir, force=force, echo=echo)  # on CUDA, stop when it clearly does not fit
    tokenizer = load_tokenizer(model_dir, trust_remote_code=recipe.model.trust_remote_code)
    with local_main_first(resolve_device(recipe.model.device)):  # the other ranks then read the tokenisation cache
        prepared = prepare_data(
            recipe.data, tokenizer, model_dir=model_dir, seed=recipe.training.seed, method=recipe.method, echo=echo
        )
    if main_process:
        print(data_summary(prepared.stats))
        METHODS[recipe.method].show_first_record(prepared.train, tokenizer)
    return model_dir, tokenizer, prepared


def load(recipe: Recipe, model_dir: Path) -> tuple[Any, str]:
    """The quantised model with LoRA attached, and the portable name of its base that the adapter records."""
    loaded = load_model(
        recipe.model, recipe.lora, model_dir, train_aux=recipe.moe.aux_loss, init_adapter=init_adapter(recipe)
    )
    for line in loaded.summary if is_main_process() else []:
        print(line)
    base = base_reference(recipe.model.path, model_dir, recipe.model.revision)
    set_base_reference(loaded.model, base)  # adapters name the base portably, not this machine's cache path
    return loaded, base


def prepare_outputs(recipe: Recipe, start: Start, prepared: Any) -> None:
    """Rank 0 clears what this run replaces, trims what a killed run left, and writes the resolved recipe."""
    if not is_main_process():
        return
    output_dir = start.output_dir
    clear_output_dir(output_dir, start.finished)
    if not start.resume:  # the old run's checkpoints and logs go first, so the two runs never mix
        clear_checkpoints(output_dir)
        for name in ("metrics.jsonl", "samples.jsonl"):
            (output_dir / name).unlink(missing_ok=True)
    elif not start.finished:
        for line in clean_leftovers(start.found):
            print(line)
        if start.latest is not None:
            trim_log(output_dir / "metrics.jsonl", start.latest[0])  # rows the killed run logged after its checkpoint
    unit = "packed rows" if prepared.stats.get("packing_efficiency") is not None else "rows"
    rows = len(prepared.train)
    resolved = run_length_notes(scrub_yaml(dump_recipe(recipe)), recipe.training, rows, world_size(), unit)
    (output_dir / "recipe.yaml").write_text(resolved, encoding="utf-8")  # says what sets the run's length


def build_trainer(recipe: Recipe, start: Start, loaded: Any, tokenizer: Any, prepared: Any) -> Session:
    """TRL's trainer for the method, with the tracking, divergence, signal and checkpoint callbacks."""
    from finetune.train.methods import METHODS

    method = METHODS[recipe.method]
    main_process = is_main_process()
    config = run_config(recipe.model_dump(mode="json"), loaded, library_versions())
    tracker = make_tracker(recipe, start.output_dir, config) if main_process else Tracker([])
    tracking, samples, expert_load = tracking_callbacks(recipe, tracker, loaded, tokenizer, prepared, main_process)
    if start.latest is not None:
        tracking.first_loss = first_logged_loss(start.output_dir / "metrics.jsonl")
    divergence = DivergenceGuard()
    stop = StopOnSignal()
    saving = CheckpointControl(
        stop,
        save_minutes=recipe.training.save_minutes,
        save_total_limit=recipe.training.save_total_limit,
        recipe_text=resolved_recipe(recipe),
        resume_step=start.latest[0] if start.latest else None,
    )
    kwargs = trainer_arguments(recipe, start.output_dir, loaded.device, loaded.dtype)
    kwargs.update(prepared.trainer_kwargs)
    kwargs.update(cpu_fsdp_arguments(loaded.device, loaded.dtype))  # FSDP2 on CPU (accelerate enables it on GPUs)
    if prepared.eval is not None:
        kwargs.update(eval_strategy="steps" if recipe.training.eval_steps else "no")
        kwargs.update(eval_steps=recipe.training.eval_steps)
    callbacks = [tracking, samples, divergence, saving]
    ddp_ignore_frozen(loaded.model)  # DDP's initial broadcast: the adapter only, not the 4-bit base every rank loaded
    trainer = method.build_trainer(recipe, loaded.model, tokenizer, prepared, kwargs, callbacks)
    progress = use_readable_progress(trainer)  # a readable line per logging step; times the training steps
    return Session(trainer, method, tracker, tracking, samples, expert_load, divergence, stop, saving, progress)


def train(session: Session, start: Start, loaded: Any, prepared: Any) -> Trained:
    """The training loop, then the final evaluation and the divergence check; a signal raises `Interrupted`."""
    trainer, stop = session.trainer, session.stop
    train_started = time.time()
    stop.install()  # until run returns: a signal after the last step lets it finish, a second exits (resumable)
    with PeakMemory(loaded.device) as peak:
        try:
            result = trainer.train(resume_from_checkpoint=str(start.latest[1]) if start.latest else None)
        except AlreadyTrained:  # resumed from the last step's checkpoint (killed while finishing): only finish
            result = nothing_left_to_train(trainer, session.tracking)
    train_seconds = time.time() - train_started
    stopped = interrupted(session.saving, stop, start.output_dir, trainer.state.max_steps)
    if stopped is not None:  # not finished: no adapter, no metrics.json, so the same command resumes
        if session.expert_load is not None:
            session.expert_load.remove()
        session.tracker.close()
        raise stopped
    if prepared.eval is not None and not session.divergence.problem:
        trainer.evaluate()  # logged through the tracking callback
    session.divergence.check(loaded.model)  # a NaN/inf loss or adapter weight stops here: no adapter, no metrics.json
    if session.expert_load is not None:
        session.expert_load.remove()
    return Trained(result, peak, train_seconds, session.progress.step_seconds)


def finish(
    recipe: Recipe, start: Start, session: Session, trained: Trained, loaded: Any, tokenizer: Any, prepared: Any,
    model_dir: Path, base: str,
) -> dict[str, Any]:  # fmt: skip
    """metrics.json and the adapter, published together once whole; then the recipe's evaluation, if any."""
    model, tracker = loaded.model, session.tracker
    main_process = is_main_process()
    metrics = run_metrics(recipe, start, session, trained, loaded, prepared)
    staged = adapter_staging(start.output_dir, clear=main_process)  # renamed to adapter/ once whole (publish_run)
    save_gathered_adapter(model, staged, main_process)  # under FSDP2 all ranks gather it
    if main_process:
        tokenizer.save_pretrained(str(staged))
        write_card(staged, recipe, metrics, base)
        with session.stop.deferring_exit():  # a second signal now exits after the renames, not between them
            publish_run(staged, start.output_dir, json.dumps(metrics, indent=2, default=str))
        if recipe.tracking.log_adapter:
            tracker.log_artifact(start.output_dir / "adapter")
    step = trained.result.global_step
    tracker.log({f"summary/{k}": v for k, v in metrics.items()}, step=step)
    if recipe.evaluation is not None and main_process:  # base vs adapter on the model in memory: eval.json
        from finetune.evaluate.run_eval import evaluate_after_training

        eval_rows = prepared.eval if recipe.method == "sft" else None
        evaluate_after_training(recipe, model, tokenizer, model_dir, eval_rows, tracker, step)
    tracker.close()
    return metrics


def run_metrics(
    recipe: Recipe, start: Start, session: Session, trained: Trained, loaded: Any, prepared: Any
) -> dict[str, Any]:
    """metrics.json: losses, method figures, tokens and their rate over the steps alone, memory, data, versions."""
    tracking, method, result = session.tracking, session.method, trained.result
    model, step_seconds = loaded.model, trained.step_seconds
    tokens = int(tracking.num_tokens or 0)  # TRL gathers it over the ranks: the global count
    world = world_size()
    checksums = checksums_by_rank(model)  # a collective on every rank; equal checksums: the ranks stayed in sync
    return {
        "first_loss": tracking.first_loss,
        "final_train_loss": tracking.last_loss,
        "train_loss_mean": result.training_loss,
        "eval_loss": tracking.eval_loss,
        "aux_loss": tracking.last_aux_loss,
        **{key: tracking.last_logs.get(key) for key in method.SUMMARY_KEYS if key in tracking.last_logs},
        **{
            f"eval_{key}": tracking.eval_logs[f"eval_{key}"]
            for key in method.SUMMARY_KEYS
            if f"eval_{key}" in tracking.eval_logs
        },
        "method": recipe.method,
        "steps": result.global_step,
        "tokens_trained": tokens,
        "world_size": world,
        # over the training steps alone: evaluation, checkpoints and sample generation are timed apart
        "tokens_per_second": tokens / step_seconds if step_seconds > 0 else None,
        "tokens_per_second_per_device": tokens / step_seconds / world if step_seconds > 0 else None,
        # a resumed run counts tokens and times steps in this process only: the steps after its checkpoint
        "tokens_per_second_covers": {
            "from_step": start.latest[0] if start.latest else 0,
            "to_step": result.global_step,
        },
        **({"adapter_checksum_by_rank": checksums} if checksums else {}),
        "step_seconds": step_seconds,  # in training steps (forward, backward, optimizer)
        "train_seconds": trained.train_seconds,  # wall time of the training loop: steps, evaluation, checkpoints, samples
        "sample_seconds": session.samples.seconds,
        "wall_seconds": time.time() - start.started,
        "peak_memory": trained.peak.peak,
        "train_memory_added": trained.peak.delta,  # peak above the level when training started (see memory.py)
        "peak_memory_kind": "cuda_max_allocated" if loaded.device.type == "cuda" else "process_rss",
        "load_peak_memory": loaded.load_peak_memory,
        "load_memory_added": loaded.load_memory_added,  # host RSS above the start of loading, FSDP2 sharding included
        "model_bytes": loaded.report.model_bytes,
        "model_bytes_per_rank": local_bytes(model),  # rank 0's resident base bytes; under FSDP2 about 1/N
        "model_bytes_per_rank_by_group": local_bytes_by_group(model),
        "quantized_fraction": loaded.report.quantized_fraction,
        "quantization": recipe.model.quantization,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "records_skipped": prepared.stats.get("records_skipped", 0),
        "packing_efficiency": prepared.stats.get("packing_efficiency"),
        "data": prepared.stats,
        "versions": library_versions(),
    }
