"""Recipe → data → model → TRL trainer → outputs.

The output folder contract: adapter/ (standard PEFT adapter + tokenizer), recipe.yaml (resolved),
metrics.json (summary), metrics.jsonl (every log line) and checkpoints/.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
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
from finetune.train.checkpoints import (
    adapter_staging,
    clean_leftovers,
    clear_checkpoints,
    first_logged_loss,
    publish_run,
    resolved_recipe,
    scan,
    staging_dir,
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


def trainer_arguments(recipe: Recipe, output_dir: Path, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Keyword arguments for TRL's config: the recipe's training section, then training.extra on top."""
    t = recipe.training
    args: dict[str, Any] = {
        "output_dir": str(staging_dir(output_dir)),  # checkpoints.publish moves each finished one to checkpoints/
        "max_steps": t.max_steps,
        "num_train_epochs": t.num_epochs,
        "seed": t.seed,
        "data_seed": t.seed,
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": t.lr_scheduler,
        "warmup_steps": t.warmup_ratio,
        "per_device_train_batch_size": t.batch_size,
        "per_device_eval_batch_size": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        # transformers 5 names; the old gradient_checkpointing* names warn on every run, even when off
        "activation_checkpointing": t.gradient_checkpointing,
        "activation_checkpointing_kwargs": {"use_reentrant": False},
        "optim": t.optimizer,
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "logging_steps": t.logging_steps,
        "logging_first_step": True,
        "save_strategy": "steps" if t.save_steps else "no",  # timed and signal saves: interrupt.CheckpointControl
        "save_steps": t.save_steps or 500,
        "save_total_limit": None,  # rotation is ours, among complete checkpoints only (checkpoints.rotate)
        "report_to": "none",
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
        "use_cpu": device.type == "cpu",
        "dataloader_num_workers": 0,
        # False: DDP syncs buffers neither at init nor per step (the one buffer, rotary inv_freq, is the same on every
        # rank). Parameters DDP broadcasts at init regardless, frozen too: train.run calls ddp_ignore_frozen for those
        "ddp_broadcast_buffers": False,
        "max_length": recipe.data.max_length,
        "router_aux_loss_coef": recipe.moe.aux_loss_coef if recipe.moe.aux_loss else 0.0,
        "disable_tqdm": True,  # console.ReadableProgress is the one display: a line per log, no tqdm bar
        "logging_nan_inf_filter": False,  # a NaN/inf loss must show (and stop the run), not be averaged away
    }
    return {**args, **recipe.training.extra}


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


def init_adapter(recipe: Recipe) -> Path | None:
    """The adapter a preference run starts from (`dpo.init_adapter`): the folder itself or its adapter/."""
    from finetune.recipe.schema import method_settings
    from finetune.train.preflight import init_adapter_dir

    path = getattr(method_settings(recipe), "init_adapter", None)
    return init_adapter_dir(Path(path).expanduser()) if path else None


@restores_signals  # StopOnSignal, installed when training starts, stays through the final evaluation and write
def run(recipe: Recipe, *, overwrite: bool = False, force: bool = False, resume: bool = True) -> dict[str, Any]:
    """Train one recipe end to end and return the metrics written to metrics.json.

    An output_dir with checkpoints but no finished run resumes from its newest complete checkpoint (`resume=False`
    deletes them and starts over). A SIGTERM/SIGINT saves a checkpoint and raises `interrupt.Interrupted`."""
    from finetune.train.preflight import check

    # every refusal possible before loading, a resume from a different recipe included; `finetune validate` runs it
    check(recipe, overwrite=overwrite, resume=resume)
    from data_tools.prepare import prepare_data
    from finetune.train.methods import METHODS

    method = METHODS[recipe.method]

    started = time.time()
    output_dir = Path(recipe.output_dir)
    finished = finished_run_markers(output_dir, overwrite)
    found = scan(output_dir)
    latest = found.latest if resume and not finished else None  # --overwrite replaces a finished run, checkpoints too
    problem = latest and world_size_problem(latest[1], world_size())
    if problem:
        raise UserError(problem)
    torch.manual_seed(recipe.training.seed)

    # data is validated and tokenised before the model is loaded: a bad record costs seconds, not a model load
    model_dir = resolve_model_dir(
        recipe.model.path, revision=recipe.model.revision, allow_pickle=recipe.model.allow_pickle
    )
    check_model_dir(model_dir, recipe.model)
    from finetune.plan.estimate import preflight

    rank0_echo = print if is_main_process() else lambda *_: None  # the estimate once, from rank 0
    preflight(recipe, model_dir, force=force, echo=rank0_echo)  # on CUDA, stop when it clearly does not fit
    tokenizer = load_tokenizer(model_dir, trust_remote_code=recipe.model.trust_remote_code)
    main_process = is_main_process()  # under accelerate/torchrun only rank 0 prints the data, writes outputs, tracks
    with local_main_first(resolve_device(recipe.model.device)):  # the other ranks then read the tokenisation cache
        prepared = prepare_data(
            recipe.data, tokenizer, model_dir=model_dir, seed=recipe.training.seed, method=recipe.method,
            echo=print if main_process else lambda *_: None,
        )  # fmt: skip
    if main_process:
        print(data_summary(prepared.stats))
        method.show_first_record(prepared.train, tokenizer)

    loaded = load_model(
        recipe.model, recipe.lora, model_dir, train_aux=recipe.moe.aux_loss, init_adapter=init_adapter(recipe)
    )
    for line in loaded.summary if main_process else []:
        print(line)
    model = loaded.model
    base = base_reference(recipe.model.path, model_dir, recipe.model.revision)
    set_base_reference(model, base)  # adapters name the base portably, not this machine's cache path

    if main_process:
        clear_output_dir(output_dir, finished)
        if not resume:  # the old run's checkpoints and logs go first, so the two runs never mix
            clear_checkpoints(output_dir)
            for name in ("metrics.jsonl", "samples.jsonl"):
                (output_dir / name).unlink(missing_ok=True)
        elif not finished:
            for line in clean_leftovers(found):
                print(line)
            if latest is not None:
                trim_log(output_dir / "metrics.jsonl", latest[0])  # rows the killed run logged after its checkpoint
        unit = "packed rows" if prepared.stats.get("packing_efficiency") is not None else "rows"
        rows = len(prepared.train)
        resolved = run_length_notes(scrub_yaml(dump_recipe(recipe)), recipe.training, rows, world_size(), unit)
        (output_dir / "recipe.yaml").write_text(resolved, encoding="utf-8")  # says what sets the run's length
    config = run_config(recipe.model_dump(mode="json"), loaded, library_versions())
    tracker = make_tracker(recipe, output_dir, config) if main_process else Tracker([])
    tracking, samples, expert_load = tracking_callbacks(recipe, tracker, loaded, tokenizer, prepared, main_process)
    divergence = DivergenceGuard()
    if latest is not None:
        tracking.first_loss = first_logged_loss(output_dir / "metrics.jsonl")
    stop = StopOnSignal()
    saving = CheckpointControl(
        stop,
        save_minutes=recipe.training.save_minutes,
        save_total_limit=recipe.training.save_total_limit,
        recipe_text=resolved_recipe(recipe),
        resume_step=latest[0] if latest else None,
    )

    kwargs = trainer_arguments(recipe, output_dir, loaded.device, loaded.dtype)
    kwargs.update(prepared.trainer_kwargs)
    kwargs.update(cpu_fsdp_arguments(loaded.device, loaded.dtype))  # FSDP2 on CPU (accelerate enables it on GPUs)
    if prepared.eval is not None:
        kwargs.update(eval_strategy="steps" if recipe.training.eval_steps else "no")
        kwargs.update(eval_steps=recipe.training.eval_steps)
    callbacks = [tracking, samples, divergence, saving]
    ddp_ignore_frozen(model)  # DDP's initial broadcast: the adapter only, not the 4-bit base every rank loaded
    trainer = method.build_trainer(recipe, model, tokenizer, prepared, kwargs, callbacks)
    progress = use_readable_progress(trainer)  # a readable line per logging step; times the training steps
    train_started = time.time()
    stop.install()  # until run returns: a signal after the last step lets it finish, a second exits (resumable)
    with PeakMemory(loaded.device) as train_peak:
        try:
            result = trainer.train(resume_from_checkpoint=str(latest[1]) if latest else None)
        except AlreadyTrained:  # resumed from the last step's checkpoint (killed while finishing): only finish
            result = nothing_left_to_train(trainer, tracking)
    train_seconds = time.time() - train_started
    step_seconds = progress.step_seconds
    stopped = interrupted(saving, stop, output_dir, trainer.state.max_steps)
    if stopped is not None:  # not finished: no adapter, no metrics.json, so the same command resumes
        if expert_load is not None:
            expert_load.remove()
        tracker.close()
        raise stopped
    if prepared.eval is not None and not divergence.problem:
        trainer.evaluate()  # logged through the tracking callback
    divergence.check(model)  # a NaN/inf loss or adapter weight stops here: no adapter, no metrics.json
    if expert_load is not None:
        expert_load.remove()

    tokens = int(tracking.num_tokens or 0)  # TRL gathers it over the ranks: the global count
    world = world_size()
    checksums = checksums_by_rank(model)  # a collective on every rank; equal checksums: the ranks stayed in sync
    metrics = {
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
        "tokens_per_second_covers": {"from_step": latest[0] if latest else 0, "to_step": result.global_step},
        **({"adapter_checksum_by_rank": checksums} if checksums else {}),
        "step_seconds": step_seconds,  # in training steps (forward, backward, optimizer)
        "train_seconds": train_seconds,  # wall time of the training loop: steps, evaluation, checkpoints, samples
        "sample_seconds": samples.seconds,
        "wall_seconds": time.time() - started,
        "peak_memory": train_peak.peak,
        "train_memory_added": train_peak.delta,  # peak above the level when training started (see memory.py)
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
    staged = adapter_staging(output_dir, clear=main_process)  # renamed to adapter/ once whole (publish_run)
    save_gathered_adapter(model, staged, main_process)  # under FSDP2 all ranks gather it
    if main_process:
        tokenizer.save_pretrained(str(staged))
        write_card(staged, recipe, metrics, base)
        with stop.deferring_exit():  # a second signal now exits after the renames, not between them
            publish_run(staged, output_dir, json.dumps(metrics, indent=2, default=str))
        if recipe.tracking.log_adapter:
            tracker.log_artifact(output_dir / "adapter")
    tracker.log({f"summary/{k}": v for k, v in metrics.items()}, step=result.global_step)
    if recipe.evaluation is not None and main_process:  # base vs adapter on the model in memory: eval.json
        from finetune.evaluate.run_eval import evaluate_after_training

        eval_rows = prepared.eval if recipe.method == "sft" else None
        evaluate_after_training(recipe, model, tokenizer, model_dir, eval_rows, tracker, result.global_step)
    tracker.close()
    return metrics
