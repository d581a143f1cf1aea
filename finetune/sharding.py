"""FSDP2 that shards the quantised model, through accelerate.

Under an accelerate FSDP launch (`distributed_type: FSDP`, `fsdp_version: 2`, see accelerate/fsdp2.yaml), accelerate
calls `fully_shard` on every decoder layer. `QuantizedExperts` keeps its 4-bit storage as frozen integer parameters,
so FSDP2 shards it like any weight: each rank holds 1/N of every layer's experts (dim 0 is the expert index), gathers
one layer for its forward and again for its backward, and frees it after. Inside the gathered layer the experts are
still dequantised one at a time. 4-bit attention is packed into the compute dtype (`quant_storage`), the form
accelerate shards; it leaves uint8-packed `Params4bit` whole on every rank.

accelerate 1.15 turns FSDP on only for accelerator devices: a CPU launch with an FSDP config would silently run DDP.
For CPU launches (the two-process gloo tests, debugging) `cpu_fsdp_arguments` configures the accelerate state as FSDP
before the trainer exists and tells the trainer to use it (`accelerator_config.use_configured_state`, a public
TrainingArguments option). On GPUs accelerate does all of this itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

FSDP_EXAMPLE = "accelerate/fsdp2.yaml"


def fsdp_launch() -> bool:
    """True inside `accelerate launch` with an FSDP config (accelerate exports its settings as environment)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def launch_problems(recipe: Any) -> list[str]:
    """Recipe × launch combinations that cannot shard, found before anything loads."""
    if not fsdp_launch():
        return []
    problems = []
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        problems.append(
            f"accelerate config: fsdp_version {version} is not supported; set fsdp_config.fsdp_version: 2 "
            f"(FSDP2 shards the 4-bit experts; see {FSDP_EXAMPLE})"
        )
    if recipe.model.quantization == "int8":
        problems.append(
            "model.quantization: int8 cannot be sharded by FSDP2 (bitsandbytes keeps int8 row scales outside the "
            "weight, and a sharded weight loses them); use nf4, fp4 or none, or launch DDP with accelerate_config.yaml"
        )
    if os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true" and recipe.model.quantization != "none":
        problems.append(
            "accelerate config: fsdp_offload_params with a 4-bit model is not supported (bitsandbytes' 4-bit "
            "kernels need the weights on the GPU); set fsdp_offload_params: false"
        )
    return problems


def quant_storage(dtype: torch.dtype) -> torch.dtype:
    """The dtype 4-bit attention weights are packed into: the compute dtype under FSDP (shardable), else uint8."""
    return dtype if fsdp_launch() else torch.uint8


def expert_staging_device(device: torch.device) -> torch.device | None:
    """Where the quantised experts load under FSDP2 on GPUs: host memory. accelerate shards after loading, so loading
    them onto the GPU would hold the whole 4-bit stack there first (22 GB for Mixtral-8x7B, the size of a 24 GB card);
    from host memory FSDP2 moves each decoder layer's shard to the GPU as it shards that layer. The cost is host RAM:
    each rank on a machine stages the whole expert stack once."""
    return torch.device("cpu") if fsdp_launch() and device.type == "cuda" else None


def cpu_fsdp_arguments(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """On CPU under an FSDP launch: configure accelerate's state as FSDP2 and return the trainer argument that uses it."""
    if not fsdp_launch() or device.type != "cpu":
        return {}
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    state = Accelerator(cpu=True, mixed_precision=mixed).state
    if state.distributed_type == DistributedType.MULTI_CPU:
        state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* settings accelerate launch exported
        # both shared states: every later AcceleratorState (the trainer's) copies the process-level one over its own
        state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    return {"accelerator_config": {"use_configured_state": True}}


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def local_bytes(model: nn.Module) -> int:
    """This rank's resident base-model bytes: the local shard of each sharded parameter, everything else whole.

    Units that stay gathered after a forward-only pass (accelerate keeps the lm_head unit gathered after forward;
    the end-of-run samples are forward-only) are resharded first, as the next training step would.
    """
    from torch.distributed.fsdp import FSDPModule

    from finetune.moe.loading import model_bytes

    if not is_sharded(model):
        return model_bytes(model)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return model_bytes(model, local=True)


def local_bytes_by_group(model: nn.Module) -> dict[str, int]:
    """This rank's base parameter bytes per group (experts, attention, embeddings, ...): under FSDP2 each is ~1/N."""
    from torch.distributed.tensor import DTensor

    from finetune.moe.loading import group_of, is_adapter_tensor

    groups: dict[str, int] = {}
    for name, param in model.named_parameters():
        group = group_of(name.removeprefix("base_model.model."))
        if group is None or is_adapter_tensor(name):
            continue
        local = param.to_local() if isinstance(param, DTensor) else param
        groups[group] = groups.get(group, 0) + local.numel() * local.element_size()
    return groups


def full_adapter_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The trainable (adapter) weights gathered whole on rank 0; every rank must call it. None when not sharded."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


def save_gathered_adapter(model: nn.Module, output_dir: Path, main_process: bool) -> None:
    """Write the standard PEFT adapter from rank 0, gathering it first when the model is sharded."""
    from finetune.moe.lora import save_adapter

    state = full_adapter_state(model)  # a collective: all ranks take part
    if main_process:
        save_adapter(model, output_dir, state_dict=state)


class GatheredAdapterSave:
    """Trainer mixin: under FSDP2 a checkpoint gathers the adapter alone. The Trainer's own FSDP save gathers the whole
    model onto rank 0's host memory (for Mixtral-8x7B, the 24 GB 4-bit base) only to keep the adapter from it."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not is_sharded(self.model):
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        save_gathered_adapter(self.model, Path(output_dir), self.args.should_save)  # every rank is here
        if self.args.should_save and self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
