"""FSDP2 that shards the quantised model, through accelerate, at load time.

Under an accelerate FSDP launch (`distributed_type: FSDP`, `fsdp_version: 2`, see accelerate/fsdp2.yaml) the model is
sharded as it loads: each rank allocates, reads and quantises only its own experts (dim 0 is the expert index, E/N
experts per rank, on its GPU when there is one), and `shard_loaded` then runs accelerate's own `fsdp2_prepare_model`
(the units, mixed precision and mesh the Trainer would use) with the expert storage on the meta device, and fills
each rank's shard with what it loaded. No rank ever holds the whole expert stack, on the host or on a GPU; the
Trainer later finds the model already sharded and leaves it as it is. `QuantizedExperts` keeps its 4-bit storage as
frozen integer parameters, so FSDP2 treats it like any weight: each rank gathers one layer for its forward and again
for its backward, and frees it after. Inside the gathered layer the experts are still dequantised one at a time.
4-bit attention is packed into the compute dtype (`quant_storage`), the form accelerate shards; it leaves
uint8-packed `Params4bit` whole on every rank. Each router is an FSDP2 unit of its own with a float32 policy, so
mixed precision never gathers it in bf16 (see `finetune.moe.router`).

accelerate 1.15 turns FSDP on only for accelerator devices: a CPU launch with an FSDP config would silently run DDP.
For CPU launches (the two-process gloo tests, debugging) `cpu_fsdp_arguments` configures the accelerate state as FSDP
before the trainer exists and tells the trainer to use it (`accelerator_config.use_configured_state`, a public
TrainingArguments option). On GPUs accelerate does all of this itself.

`FINETUNE_SHARD_AT_LOAD=0` turns sharding at load off: every rank loads the whole model (on GPUs the experts in host
memory, `expert_staging_device`) and the Trainer shards it through accelerate, as before load-time sharding. It
costs N copies of the 4-bit experts per machine; it is there to compare against and to fall back on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

FSDP_EXAMPLE = "accelerate/fsdp2.yaml"
SHARD_AT_LOAD = "FINETUNE_SHARD_AT_LOAD"  # set to 0: load whole, shard after loading (see the module doc)
FSDP_OPTIMIZER = "adamw_torch"  # what a bitsandbytes optimizer is replaced with under FSDP2 (refusals, the planner)
# transformers optimizer names that build a bitsandbytes optimizer (transformers' trainer_optimizer dispatch table)
BNB_OPTIMIZERS = frozenset(
    {
        "adamw_bnb_8bit", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit", "ademamix", "ademamix_8bit",
        "paged_ademamix_32bit", "paged_ademamix_8bit", "lion_32bit", "lion_8bit", "paged_lion_32bit",
        "paged_lion_8bit", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit", "galore_adamw_8bit",
        "galore_adamw_8bit_layerwise",
    }
)  # fmt: skip


def is_bnb_optimizer(name: str) -> bool:
    return name.lower() in BNB_OPTIMIZERS


def fsdp_launch() -> bool:
    """True inside `accelerate launch` with an FSDP config (accelerate exports its settings as environment)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def shard_at_load() -> bool:
    """Whether an FSDP2 launch shards while loading (the default) or after (`FINETUNE_SHARD_AT_LOAD=0`)."""
    return os.environ.get(SHARD_AT_LOAD, "1").strip().lower() not in ("0", "false", "no", "off")


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
    if os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() in ("true", "1"):
        problems.append(
            "accelerate config: fsdp_cpu_ram_efficient_loading is not supported and not needed: every rank already "
            "loads only its own shard of the experts; set fsdp_cpu_ram_efficient_loading: false"
        )
    if is_bnb_optimizer(recipe.training.optimizer):
        problems.append(
            f"training.optimizer: {recipe.training.optimizer} is a bitsandbytes optimizer, which knows nothing of "
            "FSDP2's sharded (DTensor) parameters and sizes its state from their global shape; under FSDP2 set "
            f"training.optimizer: {FSDP_OPTIMIZER} (or adamw_torch_fused on GPUs), e.g. "
            f"--set training.optimizer={FSDP_OPTIMIZER}"
        )
    return problems


def quant_storage(dtype: torch.dtype) -> torch.dtype:
    """The dtype 4-bit attention weights are packed into: the compute dtype under FSDP (shardable), else uint8."""
    return dtype if fsdp_launch() else torch.uint8


def expert_staging_device(device: torch.device) -> torch.device | None:
    """Where the quantised experts load when an FSDP launch does not shard them at load (a multi-dimensional device
    mesh, or `FINETUNE_SHARD_AT_LOAD=0`; see `load_sharding`): host memory, as accelerate shards only after loading
    and the whole 4-bit stack would not fit a 24 GB card first. Every rank then stages the whole stack in host memory."""
    return torch.device("cpu") if fsdp_launch() and device.type == "cuda" else None


def fsdp_accelerator(device: torch.device, dtype: torch.dtype):
    """The Accelerator of an FSDP launch, its state configured as FSDP2 also on CPU ranks (see the module doc)."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=mixed)
    state = accelerator.state
    if device.type == "cpu" and state.distributed_type == DistributedType.MULTI_CPU:
        state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* settings accelerate launch exported
        # both shared states: every later AcceleratorState (the trainer's) copies the process-level one over its own
        state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    return accelerator


def cpu_fsdp_arguments(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """On CPU under an FSDP launch: configure accelerate's state as FSDP2 and return the trainer argument that uses it."""
    if not fsdp_launch() or device.type != "cpu":
        return {}
    fsdp_accelerator(device, dtype)
    return {"accelerator_config": {"use_configured_state": True}}


@dataclass
class LoadSharding:
    """How this rank loads under FSDP2: its rank and the number of ranks its experts are split over."""

    accelerator: Any
    rank: int
    world: int


def load_sharding(device: torch.device, dtype: torch.dtype) -> LoadSharding | None:
    """Under an FSDP2 launch whose ranks shard over one mesh dimension: this rank's place, before anything loads.

    None outside FSDP2, with `FINETUNE_SHARD_AT_LOAD=0`, and for multi-dimensional meshes (HSDP, TP:
    `parallelism_config`), which load whole and let accelerate shard later (`expert_staging_device`)."""
    if not fsdp_launch() or not shard_at_load():
        return None
    accelerator = fsdp_accelerator(device, dtype)
    if not accelerator.is_fsdp2:
        return None
    if getattr(accelerator, "torch_device_mesh", None) is not None:
        return None
    import torch.distributed as dist

    return LoadSharding(accelerator, dist.get_rank(), dist.get_world_size())


def adapter_to_trl_dtype(model: nn.Module) -> None:
    """Cast the adapter of a quantised model to bf16, as TRL's SFT, DPO and KTO trainers do when they are built
    (`param.data = param.data.to(torch.bfloat16)` for every trainable parameter but DoRA's magnitude; QLoRA's recipe).

    Sharded at load, the adapter is already FSDP2's DTensors when the trainer is built: TRL's cast then changes the
    DTensor's dtype but not its local shard, and the first optimizer step fails (`expected dtype float ... got
    BFloat16`). Cast before sharding, the same rule leaves TRL's own cast nothing to change.
    """
    for name, param in model.named_parameters():
        if param.requires_grad and "lora_magnitude_vector" not in name:
            param.data = param.data.to(torch.bfloat16)


def shard_loaded(model: nn.Module, sharding: LoadSharding) -> nn.Module:
    """FSDP2 over a model whose experts were loaded as this rank's shard: accelerate's own `fsdp2_prepare_model`,
    with each router first made a float32 unit and the expert storage on meta until it is sharded (no full stack)."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from finetune.moe.quantized import QuantizedExperts
    from finetune.moe.router import Float32Router

    plugin = sharding.accelerator.state.fsdp_plugin
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    for module in model.modules():
        if isinstance(module, Float32Router):
            fully_shard(
                module, reshard_after_forward=plugin.reshard_after_forward, offload_policy=plugin.cpu_offload,
                mp_policy=fp32,
            )  # fmt: skip
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        adapter_to_trl_dtype(model)
    experts = [m for m in model.modules() if isinstance(m, QuantizedExperts)]
    local = {m: m.sharded_storage(sharding.rank, sharding.world) for m in experts}
    model = fsdp2_prepare_model(sharding.accelerator, model)
    for module in experts:  # one module's loaded shard and its FSDP2 copy at a time, never all of both
        module.adopt_sharded(local.pop(module))
    return model


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
