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

from finetune.adapter_card import base_reference, set_base_reference, write_card
from finetune.checkpoints import (
    clean_leftovers,
    clear_checkpoints,
    first_logged_loss,
    resolved_recipe,
    scan,
    staging_dir,
    trim_log,
    world_size_problem,
)
from finetune.console import use_readable_progress
from finetune.distributed import checksums_by_rank, is_main_process, local_main_first, world_size
from finetune.divergence import DivergenceGuard
from finetune.errors import UserError
from finetune.interrupt import CheckpointControl, StopOnSignal, interrupted
from finetune.memory import PeakMemory
from finetune.model import check_model_dir, load_model, load_tokenizer, resolve_device, resolve_model_dir
from finetune.recipe import Recipe, dump_recipe
from finetune.sharding import cpu_fsdp_arguments, local_bytes, local_bytes_by_group, save_gathered_adapter
from finetune.tracking import Tracker, make_tracker, run_config, scrub_yaml, tracking_callbacks

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
        for name in (*FINISHED_MARKERS, "metrics.jsonl", "samples.jsonl", "recipe.yaml", "checkpoints"):
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
        # every rank loads identical weights; broadcasting buffers (our quantised experts) each step would copy the model
        "ddp_broadcast_buffers": False,
        "max_length": recipe.data.max_length,
        "router_aux_loss_coef": recipe.moe.aux_loss_coef if recipe.moe.aux_loss else 0.0,
        "disable_tqdm": False,
        "logging_nan_inf_filter": False,  # a NaN/inf loss must show (and stop the run), not be averaged away
    }
    return {**args, **recipe.training.extra}


def data_summary(stats: dict[str, Any]) -> str:
    """One line on what will be trained: records, skipped records (never silent), tokens, packing."""
    parts = [f"data: {stats.get('train_records')} train / {stats.get('eval_records')} eval records"]
    if stats.get("records_skipped"):
        parts.append(f"{stats['records_skipped']} invalid records skipped {stats.get('skipped_by_reason', {})}")
    if stats.get("truncated"):
        parts.append(f"{stats['truncated']} truncated to max_length")
    parts.append(f"{stats.get('trained_tokens')} of {stats.get('train_tokens')} tokens carry loss")
    if stats.get("packing_efficiency") is not None:
        parts.append(f"packing efficiency {stats['packing_efficiency']:.1%}")
    return ", ".join(parts)


def init_adapter(recipe: Recipe) -> Path | None:
    """The adapter a preference run starts from (`dpo.init_adapter`): the folder itself or its adapter/."""
    from finetune.preflight import init_adapter_dir
    from finetune.recipe import method_settings

    path = getattr(method_settings(recipe), "init_adapter", None)
    return init_adapter_dir(Path(path).expanduser()) if path else None


def run(recipe: Recipe, *, overwrite: bool = False, force: bool = False, resume: bool = True) -> dict[str, Any]:
    """Train one recipe end to end and return the metrics written to metrics.json.

    An output_dir with checkpoints but no finished run resumes from its newest complete checkpoint (`resume=False`
    deletes them and starts over). A SIGTERM/SIGINT saves a checkpoint and raises `interrupt.Interrupted`."""
    from finetune.preflight import check

    # every refusal possible before loading, a resume from a different recipe included; `finetune validate` runs it
    check(recipe, overwrite=overwrite, resume=resume)
    from data_tools.pipeline import prepare_data
    from finetune.methods import METHODS

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
    from finetune.plan import preflight

    preflight(recipe, model_dir, force=force)  # on CUDA, stop before loading when the recipe clearly does not fit
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
        (output_dir / "recipe.yaml").write_text(scrub_yaml(dump_recipe(recipe)), encoding="utf-8")
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
    trainer = method.build_trainer(recipe, model, tokenizer, prepared, kwargs, callbacks)
    use_readable_progress(trainer)  # a readable line per logging step instead of the raw dict
    train_started = time.time()
    with PeakMemory(loaded.device) as train_peak, stop:
        result = trainer.train(resume_from_checkpoint=str(latest[1]) if latest else None)
    train_seconds = time.time() - train_started
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
        "tokens_per_second": tokens / train_seconds if train_seconds > 0 else None,
        "tokens_per_second_per_device": tokens / train_seconds / world if train_seconds > 0 else None,
        **({"adapter_checksum_by_rank": checksums} if checksums else {}),
        "train_seconds": train_seconds,
        "wall_seconds": time.time() - started,
        "peak_memory": train_peak.peak,
        "train_memory_added": train_peak.delta,  # peak above the level when training started (see memory.py)
        "peak_memory_kind": "cuda_max_allocated" if loaded.device.type == "cuda" else "process_rss",
        "load_peak_memory": loaded.load_peak_memory,
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
    save_gathered_adapter(model, output_dir / "adapter", main_process)  # under FSDP2 all ranks gather it
    if main_process:
        tokenizer.save_pretrained(str(output_dir / "adapter"))
        write_card(output_dir / "adapter", recipe, metrics, base)
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str), encoding="utf-8")
        if recipe.tracking.log_adapter:
            tracker.log_artifact(output_dir / "adapter")
    tracker.log({f"summary/{k}": v for k, v in metrics.items()}, step=result.global_step)
    tracker.close()
    return metrics
