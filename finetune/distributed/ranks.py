"""What the one run path needs to know about its ranks when a launcher started several processes.

Data is prepared once per machine (the local main rank tokenises into the datasets cache; the others then read it),
only global rank 0 prints, writes and tracks, and at the end every rank's adapter checksum is gathered so that
metrics.json proves the ranks stayed in sync. Under DDP the frozen base is left out of DDP's initial broadcast
(`ddp_ignore_frozen`). A single process takes none of these paths.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator

import torch

# DDP's `find_unused_parameters`. Every parameter DDP sees is trainable (ddp_ignore_frozen names the rest) and every
# forward reaches each one: attention LoRA, each layer's expert LoRA as whole tensors (an expert without tokens gets
# zero rows, never no gradient) and the trained router's copy. So DDP need not look for unused ones: transformers'
# default for a PEFT model (True) makes it traverse the autograd graph every step and warn that it found none.
DDP_FIND_UNUSED_PARAMETERS = False


def world_size() -> int:
    """Processes in the run, as the launcher (accelerate, torchrun) set it; 1 when not launched."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main_process() -> bool:
    """Global rank 0: the one process that prints the data preview, writes output_dir and tracks."""
    return int(os.environ.get("RANK", "0") or 0) == 0


@contextlib.contextmanager
def local_main_first(device: torch.device) -> Iterator[None]:
    """Run the block on each machine's local rank 0 first, then on the other ranks (which then hit its cache).

    The process group is set up through accelerate's PartialState with the same `cpu` choice TrainingArguments makes
    (`use_cpu` = the model's device is the CPU), so the Trainer later finds the same backend already initialised.
    """
    if world_size() <= 1:
        yield
        return
    from accelerate import PartialState

    with PartialState(cpu=device.type == "cpu").local_main_process_first():
        yield


def adapter_checksum(model: torch.nn.Module) -> str:
    """sha256 over every trainable tensor's name, shape, dtype and bytes, in name order."""
    digest = hashlib.sha256()
    for name, param in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
        tensor = param.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def checksums_by_rank(model: torch.nn.Module) -> list[str] | None:
    """Every rank's adapter checksum, in rank order (a collective: all ranks call it); None for one process."""
    if world_size() <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    from finetune.distributed.sharding import is_sharded

    if is_sharded(model):  # FSDP2 ranks hold different shards by design; the adapter is gathered whole instead
        return None
    gathered: list[str | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, adapter_checksum(model))
    return [str(c) for c in gathered]


def ddp_ignore_frozen(model: torch.nn.Module) -> list[str]:
    """Name every frozen parameter and every buffer for DDP to leave alone; returns the names.

    DDP broadcasts all parameters and buffers from rank 0 when it wraps the model, frozen ones included: with the
    quantised experts stored as parameters that is the whole 4-bit base (~24 GB per rank for Mixtral-8x7B). Every
    rank loads the same checkpoint into the same quantised bytes and computes the same rotary buffer, so only the
    trainable adapter needs that broadcast (DDP still makes its initial values agree). PyTorch's supported way to
    exclude tensors from DDP is `DistributedDataParallel._set_params_and_buffers_to_ignore_for_model` (fully
    qualified names, as `named_parameters()` of the module DDP wraps gives them); frozen tensors get no gradient, so
    nothing else changes. Outside DDP the names are never read; an FSDP2-sharded model gets none.
    """
    from finetune.distributed.sharding import is_sharded

    if is_sharded(model):
        return []
    from torch.nn.parallel import DistributedDataParallel

    names = [name for name, param in model.named_parameters() if not param.requires_grad]
    names += [name for name, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names
