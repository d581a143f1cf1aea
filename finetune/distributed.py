"""What the one run path needs to know about its ranks when a launcher started several processes.

Data is prepared once per machine (the local main rank tokenises into the datasets cache; the others then read it),
only global rank 0 prints, writes and tracks, and at the end every rank's adapter checksum is gathered so that
metrics.json proves the ranks stayed in sync. A single process takes none of these paths.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator

import torch


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
    from finetune.sharding import is_sharded

    if is_sharded(model):  # FSDP2 ranks hold different shards by design; the adapter is gathered whole instead
        return None
    gathered: list[str | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, adapter_checksum(model))
    return [str(c) for c in gathered]
