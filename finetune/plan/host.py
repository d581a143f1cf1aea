"""Host RAM while loading, per machine, and the optimizer a sharded plan assumes: the planner's FSDP2 facts.

While loading, each process holds in host memory what it reads from the checkpoint before it is placed: at most the
gate and up halves of one expert plus their joined copy (4·F·H values), or one embedding matrix and its cast copy
(2·V·H), in the compute dtype. On a GPU every tensor then goes to the device: under FSDP2 each rank loads and
quantises only its own E/N experts straight onto its GPU, so a machine's host RAM for loading is that one in-flight
tensor per process, not N copies of the experts. On a CPU the model itself lives in host memory: each rank holds its
1/N shard of the experts, the rest of the base whole until it is sharded (and its shard), plus the tensor in flight.
The processes' own libraries (torch, CUDA, about 1-3 GiB each) are not counted: this is what loading adds.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from finetune.distributed.sharding import FSDP_OPTIMIZER, is_bnb_optimizer


def in_flight_bytes(config, dtype_bytes: int) -> int:
    """The largest checkpoint data one process holds in host memory at once while loading."""
    h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    return max(4 * f * h, 2 * v * h) * dtype_bytes


def host_ram(report, config, processes: int, device: str, dtype_bytes: int) -> dict[str, Any]:
    """Host RAM that loading adds, per process and per machine (`processes` ranks on it; 1 = no sharding)."""
    flight = in_flight_bytes(config, dtype_bytes)
    if device == "cuda":
        per_process = flight
        held = "one checkpoint tensor in flight; the experts load straight onto each GPU"
        if processes > 1:
            held += f", 1/{processes} per rank"
    else:
        experts = report.groups["experts"]["bytes"]
        rest = report.model_bytes - experts
        n = max(processes, 1)
        per_process = math.ceil(experts / n) + flight + (rest + math.ceil(rest / n) if n > 1 else rest)
        held = (
            f"the experts / {n}, the rest of the base whole until sharded, one tensor in flight"
            if n > 1
            else ("the whole base plus one tensor in flight")
        )
    return {
        "per_process_bytes": per_process,
        "processes": max(processes, 1),
        "per_machine_bytes": per_process * max(processes, 1),
        "what": held,
    }


def fsdp_settings(settings, fsdp: int) -> tuple[Any, str | None]:
    """The settings a sharded plan uses: a bitsandbytes optimizer is refused under FSDP2 (see
    `sharding.launch_problems`), so the plan assumes `FSDP_OPTIMIZER` instead and says so."""
    if fsdp <= 1 or not is_bnb_optimizer(settings.optimizer):
        return settings, None
    note = (
        f"training.optimizer {settings.optimizer} is a bitsandbytes optimizer, refused under FSDP2; planned with "
        f"{FSDP_OPTIMIZER} (--set training.optimizer={FSDP_OPTIMIZER})"
    )
    return replace(settings, optimizer=FSDP_OPTIMIZER), note
