"""The GPUs `finetune plan` knows by name: memory and dense bf16 peak, each with its source, in one place.

Memory is the datasheet capacity in GiB (NVIDIA and AMD quote GPU memory in binary units); the driver reports a
little less (ECC, reserved pages), which the planner's CUDA-context and slack constants cover. Peaks are dense bf16
tensor-core FLOP/s without structured sparsity (datasheets often print the 2:4-sparse figure, twice as large).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from finetune.errors import UserError

GIB = 2**30


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int
    bf16_tflops: float | None  # dense peak, TFLOP/s; None for a card known by its memory alone (no time estimate)


GPUS: dict[str, Gpu] = {
    # NVIDIA Ada GPU Architecture whitepaper v2.1, Appendix A Table 1: 24 GB GDDR6X; 165.2 TFLOPS BF16 dense
    # (FP32 accumulate), 330.4 with sparsity
    "rtx4090": Gpu("RTX 4090", 24 * GIB, 165.2),
    # NVIDIA L4 datasheet: 24 GB GDDR6; BF16 Tensor Core 242 TFLOPS with sparsity, i.e. 121 dense
    "l4": Gpu("L4", 24 * GIB, 121.0),
    # NVIDIA A10 datasheet: 24 GB GDDR6; BF16 Tensor Core 125 TFLOPS dense (250 with sparsity)
    "a10": Gpu("A10", 24 * GIB, 125.0),
    # NVIDIA L40S datasheet: 48 GB GDDR6; BF16 Tensor Core 362.05 TFLOPS dense (733 with sparsity)
    "l40s": Gpu("L40S", 48 * GIB, 362.05),
    # NVIDIA A100 datasheet: 40 GB HBM2 / 80 GB HBM2e; BF16 Tensor Core 312 TFLOPS dense (624 with sparsity)
    "a100-40": Gpu("A100 40GB", 40 * GIB, 312.0),
    "a100-80": Gpu("A100 80GB", 80 * GIB, 312.0),
    # NVIDIA H100 datasheet, SXM: 80 GB HBM3; BF16 Tensor Core 1,979 TFLOPS with sparsity, i.e. 989 dense
    "h100": Gpu("H100 80GB SXM", 80 * GIB, 989.0),
    # NVIDIA H200 datasheet, SXM: 141 GB HBM3e; BF16 Tensor Core 1,979 TFLOPS with sparsity, i.e. 989 dense
    "h200": Gpu("H200 SXM", 141 * GIB, 989.0),
    # AMD Instinct MI300X datasheet: 192 GB HBM3; peak BF16 1,307.4 TFLOPS dense (2,614.9 with sparsity)
    "mi300x": Gpu("MI300X", 192 * GIB, 1307.4),
}
ALIASES = {"4090": "rtx4090", "a100": "a100-80", "h100-80": "h100", "mi300": "mi300x"}
DEFAULT_GPU = "h100"


def _key(name: str) -> str:
    return re.sub(r"[\s_]+", "", name.strip().lower()).replace("gb", "")


def find_gpu(name: str) -> Gpu:
    """A GPU from the table by a forgiving name: 'H100', 'a100-40', 'RTX 4090', 'l40s'."""
    key = _key(name)
    key = ALIASES.get(key, key)
    if key in GPUS:
        return GPUS[key]
    for gpu in GPUS.values():
        if _key(gpu.name) == key:
            return gpu
    raise UserError(
        f"--gpu {name!r}: not in the GPU table",
        [f"known: {', '.join(GPUS)}", "or give the memory directly: --gpu-memory 24GB"],
    )


def choose_gpu(gpu: str | None, gpu_memory: str | None) -> tuple[Gpu, str | None]:
    """The card `finetune plan` plans for, and a note when the user named none (the default is then said).

    --gpu NAME: that card; --gpu-memory alone: a card of that size whose speed is unknown (no throughput is made
    up for it); both: the named card's speed with that memory; neither: DEFAULT_GPU, said to be assumed."""
    if gpu is None and gpu_memory is None:
        card = GPUS[DEFAULT_GPU]
        return (
            card,
            f"assumed {card.name} (none given); choose with --gpu NAME ({', '.join(GPUS)}) or --gpu-memory SIZE",
        )
    if gpu is None:
        memory = parse_memory(gpu_memory)
        return Gpu(f"a {memory / GIB:g} GiB GPU", memory, None), None
    card = find_gpu(gpu)
    return (Gpu(card.name, parse_memory(gpu_memory), card.bf16_tflops) if gpu_memory else card), None


def parse_memory(text: str) -> int:
    """'24GB', '24 GiB', '80g', '16384MiB' -> bytes. GB and GiB both mean 2^30 here, as GPU memory is quoted."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not m:
        raise UserError(f"--gpu-memory {text!r}: expected a size such as 24GB, 80GiB or 40960MiB")
    value, unit = float(m.group(1)), m.group(2) or "G"
    return int(value * 1024 ** "KMGT".index(unit) * 1024)


def table_lines() -> list[str]:
    return [
        f"  {k:<9} {g.name:<14} {g.memory_bytes / GIB:5.0f} GiB  {g.bf16_tflops:7.1f} TFLOP/s" for k, g in GPUS.items()
    ]
