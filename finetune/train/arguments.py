"""What the run hands TRL: its config's keyword arguments from the recipe, and the adapter a run starts from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from finetune.distributed.ranks import DDP_FIND_UNUSED_PARAMETERS
from finetune.recipe.schema import Recipe
from finetune.train.checkpoints import staging_dir


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
        "ddp_find_unused_parameters": DDP_FIND_UNUSED_PARAMETERS,  # every trainable parameter has a gradient each step
        "max_length": recipe.data.max_length,
        "router_aux_loss_coef": recipe.moe.aux_loss_coef if recipe.moe.aux_loss else 0.0,
        "disable_tqdm": True,  # console.ReadableProgress is the one display: a line per log, no tqdm bar
        "logging_nan_inf_filter": False,  # a NaN/inf loss must show (and stop the run), not be averaged away
    }
    return {**args, **recipe.training.extra}


def init_adapter(recipe: Recipe) -> Path | None:
    """The adapter a preference run starts from (`dpo.init_adapter`): the folder itself or its adapter/."""
    from finetune.recipe.schema import method_settings
    from finetune.train.preflight import init_adapter_dir

    path = getattr(method_settings(recipe), "init_adapter", None)
    return init_adapter_dir(Path(path).expanduser()) if path else None
