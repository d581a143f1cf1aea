"""`finetune plan`: memory and time of a recipe from its config.json alone, before any weight is loaded.

Resident base weights come from the loader's own accounting (`build_report` / `model_bytes`) run on a meta-device
skeleton whose 4-bit and 8-bit weights are quantised on the meta device, so no second formula exists. LoRA, gradients,
optimizer state and activations are counted from the shapes; activations follow what autograd keeps in our routed
expert forward (see `layer_bytes_per_token`). The model was checked against measured CPU peaks (tests/test_plan.py).
Time is finetune.plan.timing's, the table finetune.plan.render's. A hub id is read from the local cache only.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from finetune.distributed.sharding import fsdp_launch
from finetune.errors import UserError
from finetune.plan.config import config_dir, read_config
from finetune.plan.gpus import GIB, Gpu
from finetune.plan.host import fsdp_settings, host_ram
from finetune.plan.timing import data_size, time_estimate

CUDA_CONTEXT_BYTES = 768 * 2**20  # CUDA context + cuBLAS/cuDNN workspaces on a Hopper card, as nvidia-smi shows them
ALLOCATOR_SLACK = 0.08  # caching-allocator fragmentation, as a fraction of the peak allocated bytes
CPU_RUNTIME_BYTES = 16 * 2**20  # CPU scratch (oneDNN, threads) of the first step: fitted to the live peak that
# bench/plan_check.py measures (kernel high-water mark, glibc's mmap threshold fixed so freed tensors are returned;
# the same to 1 MiB run to run) with oneDNN's AVX2 kernels. Not modelled: what glibc's default keeps of freed
# tensors (measured 0-25% more, varying from run to run), and AVX-512/AMX kernels' ~200-300 MiB more scratch
TILE_TOKENS, TILE_VOCAB = 4096, 32768  # TRL's fused LM head tiles (trl.kernels.chunked_logprob)
FSDP_SIZES = (2, 4, 8)


@dataclass(frozen=True)
class Settings:
    """The recipe knobs the plan varies when it looks for something that fits."""

    max_length: int
    batch_size: int
    grad_accum: int
    gradient_checkpointing: bool
    optimizer: str
    num_gpus: int = 1
    sequences_per_record: int = 1  # DPO runs chosen + rejected in one forward; KTO a completion + its KL completion

    @classmethod
    def of(cls, recipe, num_gpus: int = 1) -> Settings:
        t = recipe.training
        per_record = 1 if recipe.method == "sft" else 2
        return cls(recipe.data.max_length, t.batch_size, t.gradient_accumulation_steps, t.gradient_checkpointing,
                   t.optimizer, num_gpus, per_record)  # fmt: skip


# ---- the model, from config.json ---------------------------------------------------------------------------------


def _guard_bnb_code_cache() -> None:
    """bitsandbytes caches its blockwise code map on the device of the first call; make that call a CPU one."""
    import bitsandbytes.functional as bnbf

    if "dynamic" not in bnbf.name2qmap:
        bnbf.quantize_blockwise(torch.zeros(256))


def meta_model(config, quantization: str, dtype: torch.dtype, double_quant: bool = True, blocksize: int = 64):
    """The loader's skeleton on the meta device, with every tensor in the dtype and layout a real load gives it."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    from finetune.moe.loading import _build_skeleton

    _guard_bnb_code_cache()
    meta = torch.device("meta")
    model = _build_skeleton(config, quantization, dtype, meta, double_quant, blocksize)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = torch.empty(module.out_features, module.in_features, device=meta, dtype=dtype)
            packed, state = bnbf.quantize_4bit(
                w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quantization
            )
            module.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=blocksize,
                                              compress_statistics=double_quant, quant_type=quantization,
                                              module=module, bnb_quantized=True)  # fmt: skip
            module.quant_state = state
        elif isinstance(module, bnb.nn.Linear8bitLt):
            w = torch.empty(module.out_features, module.in_features, device=meta, dtype=torch.float16)
            data, scb, _ = bnbf.int8_vectorwise_quant(w)
            module.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False, CB=data, SCB=scb)
        else:
            target = torch.float32 if isinstance(module, MixtralTopKRouter) else dtype
            for name, p in list(module._parameters.items()):
                if p is not None and p.is_floating_point():
                    module._parameters[name] = torch.nn.Parameter(p.to(target), requires_grad=False)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


@lru_cache(maxsize=16)
def _resident(config_json: str, quantization: str, dtype: torch.dtype, double_quant: bool):
    from transformers import MixtralConfig

    from finetune.moe.loading import build_report

    config = MixtralConfig(**json.loads(config_json))
    return build_report(meta_model(config, quantization, dtype, double_quant), quantization)


def resident_report(config, quantization: str, dtype: torch.dtype, double_quant: bool = True):
    """`LoadReport` (per-group and total resident bytes) of the model a real load would give, without loading."""
    return _resident(config.to_json_string(use_diff=False), quantization, dtype, double_quant)


# ---- trainable state -------------------------------------------------------------------------------------------


def lora_params(config, lora) -> int:
    """Trainable parameters: attention LoRA (stock PEFT), per-expert LoRA, and the router when it is trained."""
    h, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or h // heads
    dims = {"q_proj": (h, heads * d), "k_proj": (h, kv * d), "v_proj": (h, kv * d), "o_proj": (heads * d, h)}
    per_layer = sum(lora.r * sum(dims[t]) for t in lora.attention_targets)
    e, f, re = config.num_local_experts, config.intermediate_size, lora.expert_r or lora.r
    expert = {"gate_up_proj": e * re * (h + 2 * f), "down_proj": e * re * (f + h)}
    per_layer += sum(expert[t] for t in lora.expert_targets)
    if lora.router == "trainable":
        per_layer += e * h
    return per_layer * config.num_hidden_layers


def optimizer_bytes_per_param(name: str) -> tuple[float, str]:
    """Optimizer state per trainable parameter, and how it was read from the optimizer name."""
    n = name.lower()
    if "8bit" in n:
        return 2.0, "8-bit states (2 bytes/param)" + (", paged" if "paged" in n else "")
    if "adafactor" in n:
        return 0.5, "factored second moment (~0.5 bytes/param)"
    if "sgd" in n or "lion" in n:
        return 4.0, "one 32-bit state (4 bytes/param)"
    return 8.0, "two 32-bit states (8 bytes/param)" + (", paged" if "paged" in n else "")


# ---- activations ---------------------------------------------------------------------------------------------------


def layer_bytes_per_token(config, b: int, lora) -> float:
    """Bytes autograd keeps per token for one decoder layer in our forward (sdpa attention, routed experts).

    attention: norm input and output, q, k, v, rotated q/k, attention output, o_proj input and output;
    MoE: norm input and output, routed copies of the hidden state (k x: gathered input, down output, concatenated,
    weighted), gate_up output (2F), activation and product (2F); float32 copies where the compute dtype is narrower
    (RMSNorm upcasts, the float32 router input, expert-LoRA inputs).
    """
    h, heads, kv, k = (
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.num_experts_per_tok,
    )
    d = getattr(config, "head_dim", None) or h // heads
    f, e = config.intermediate_size, config.num_local_experts
    attention = 6 * h + 2 * heads * d + 3 * kv * d
    if lora.dropout > 0:
        attention += h * len(lora.attention_targets)
    moe = 4 * h + k * (4 * h + 4 * f)
    out = b * (attention + moe) + 4 * 2 * e  # router logits and probabilities stay float32
    if b < 4:
        out += 4 * (4 * h + h + k * (h + f))
    return out


def activation_bytes(config, s: Settings, b: int, lora, *, aux_loss: bool, triton: bool) -> dict[str, int]:
    """Peak activation memory per GPU, by part."""
    tokens = s.batch_size * s.sequences_per_record * s.max_length
    h, f, k, e = config.hidden_size, config.intermediate_size, config.num_experts_per_tok, config.num_local_experts
    layers, vocab = config.num_hidden_layers, config.vocab_size
    per_layer = layer_bytes_per_token(config, b, lora)
    parts = {}
    if s.gradient_checkpointing:
        parts["layer inputs (checkpointed)"] = layers * tokens * h * b
        parts["one layer recomputed"] = int(tokens * per_layer)
    else:
        parts["all layers"] = int(layers * tokens * per_layer)
    parts["backward gradients (one layer)"] = tokens * b * (2 * h + 2 * k * f)
    if aux_loss:  # router logits of every layer kept for the aux loss, plus its softmax and one-hot expert mask
        parts["router logits (aux loss)"] = layers * tokens * e * (12 + 8 * k)
    tile = min(tokens, TILE_TOKENS) * min(vocab, TILE_VOCAB)
    parts["LM head tile (fused log-probs)"] = tile * b + (0 if triton else 5 * 4 * tile) + tokens * h * (4 + b)
    dequant = 2 * f * h * b * (1 if triton or b == 4 else 2)  # CPU bf16 backward also makes a transposed copy
    parts["per-expert transient"] = dequant + tokens * k // e * (h + 2 * f) * b
    return parts


# ---- the plan ---------------------------------------------------------------------------------------------------


@dataclass
class Memory:
    lines: dict[str, int]
    peak_allocated: int
    total: int
    limit: int
    fsdp: int = 1

    @property
    def fits(self) -> bool:
        return self.total <= self.limit

    @property
    def headroom(self) -> int:
        return self.limit - self.total


def gathered_bytes(report, num_layers: int, fsdp: int) -> dict[str, int]:
    """What FSDP2 holds whole beside the shards: the decoder layer being computed plus the next one it prefetches,
    and the lm_head unit, which accelerate keeps gathered from the end of the forward into the backward."""
    per_layer = sum(report.groups[g]["bytes"] for g in ("attention", "experts", "router", "norms")) / num_layers
    lm_head = report.groups["lm_head"]["bytes"]
    return {
        "base: 2 decoder layers gathered (FSDP2 unit + prefetch)": math.ceil(2 * per_layer * (fsdp - 1) / fsdp),
        "base: lm_head gathered (FSDP2)": math.ceil(lm_head * (fsdp - 1) / fsdp),
    }


@dataclass
class Planner:
    """Fixed facts of one recipe on one device kind; `memory(settings)` answers for any variation of the knobs."""

    recipe: Any
    config: Any
    dtype: torch.dtype
    device: str  # "cuda" or "cpu"
    limit: int

    @property
    def report(self):
        m = self.recipe.model
        return resident_report(self.config, m.quantization, self.dtype, m.double_quant)

    def memory(self, s: Settings, fsdp: int = 1) -> Memory:
        b = torch.finfo(self.dtype).bits // 8
        report = self.report
        lines = {f"base: {g}": v["bytes"] for g, v in report.groups.items() if v["bytes"]}
        other = report.model_bytes - sum(v["bytes"] for v in report.groups.values())
        if other:
            lines["base: buffers (rotary)"] = other
        if fsdp > 1:
            lines = {f"{k} / {fsdp} (FSDP2)": math.ceil(v / fsdp) for k, v in lines.items()}
            lines.update(gathered_bytes(report, self.config.num_hidden_layers, fsdp))
        n = lora_params(self.config, self.recipe.lora)
        per_param, _ = optimizer_bytes_per_param(s.optimizer)
        shard = f" / {fsdp} (FSDP2)" if fsdp > 1 else ""  # FSDP2 shards the adapter, its gradients and its state too
        lines[f"LoRA weights (fp32){shard}"] = math.ceil(4 * n / fsdp)
        lines[f"LoRA gradients (fp32){shard}"] = math.ceil(4 * n / fsdp)
        lines[f"optimizer ({s.optimizer}){shard}"] = math.ceil(per_param * n / fsdp)
        triton = self.device == "cuda"
        acts = activation_bytes(self.config, s, b, self.recipe.lora, aux_loss=self.recipe.moe.aux_loss, triton=triton)
        lines.update({f"activations: {k}": v for k, v in acts.items()})
        allocated = sum(lines.values())
        if self.device == "cuda":
            lines["CUDA context (constant)"] = CUDA_CONTEXT_BYTES
            lines[f"allocator slack ({ALLOCATOR_SLACK:.0%} of allocated)"] = int(ALLOCATOR_SLACK * allocated)
        else:
            lines["CPU runtime scratch (constant)"] = CPU_RUNTIME_BYTES
        return Memory(lines, allocated, sum(lines.values()), self.limit, fsdp)

    def largest_max_length(self, s: Settings, fsdp: int = 1) -> int | None:
        """The longest max_length (a multiple of 256, up to max_position_embeddings) that fits; None if none does."""
        cap = self.config.max_position_embeddings
        if self.memory(replace(s, max_length=cap), fsdp).fits:
            return cap
        lo, hi = 0, cap // 256
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.memory(replace(s, max_length=256 * mid), fsdp).fits else (lo, mid - 1)
        return 256 * lo or None

    def suggestions(self, s: Settings) -> list[dict[str, Any]]:
        """Changes that make a recipe fit, each with its new total per GPU."""
        out = []

        def add(change: str, new: Settings, fsdp: int = 1, note: str = "") -> None:
            m = self.memory(new, fsdp)
            out.append({"change": change, "total_bytes": m.total, "fits": m.fits, "note": note})

        if not s.gradient_checkpointing:
            add("--set training.gradient_checkpointing=true", replace(s, gradient_checkpointing=True))
        if s.batch_size > 1:
            acc = s.grad_accum * s.batch_size
            add(f"--set training.batch_size=1 --set training.gradient_accumulation_steps={acc}",
                replace(s, batch_size=1, grad_accum=acc), note="same global batch")  # fmt: skip
        longest = self.largest_max_length(s)
        if longest and longest < s.max_length:
            add(f"--set data.max_length={longest}", replace(s, max_length=longest), note="the longest that fits")
        if "8bit" not in s.optimizer:
            add("--set training.optimizer=paged_adamw_8bit", replace(s, optimizer="paged_adamw_8bit"))
        for n in FSDP_SIZES:
            sharded, optimizer_note = fsdp_settings(replace(s, num_gpus=n), n)  # no bitsandbytes optimizer
            switch = f" --set training.optimizer={sharded.optimizer}" if optimizer_note else ""
            add(f"FSDP2 over {n} GPUs (--num-processes {n} --accelerate-config accelerate/fsdp2.yaml{switch})",
                sharded, fsdp=n)  # fmt: skip
        return out


def make_plan(
    recipe, gpu: Gpu, *, num_gpus: int = 1, read_data: bool = True, gpu_note: str | None = None
) -> dict[str, Any]:
    """The whole plan as one JSON-able dict (what `--json` prints); `gpu_note` says how the card was chosen."""
    folder = config_dir(recipe)
    config = read_config(folder)
    dtype = torch.float32 if recipe.model.dtype == "float32" else getattr(torch, recipe.model.dtype, torch.bfloat16)
    planner = Planner(recipe, config, dtype, "cuda", gpu.memory_bytes)
    fsdp = num_gpus if num_gpus > 1 else 1
    s, optimizer_note = fsdp_settings(Settings.of(recipe, num_gpus), fsdp)
    mem = planner.memory(s, fsdp)
    report = planner.report
    host = host_ram(report, config, num_gpus, "cuda", torch.finfo(dtype).bits // 8)
    data = data_size(recipe, folder, config) if read_data else None
    t = recipe.training
    plan = {
        "model": recipe.model.path, "gpu": gpu.name, "gpu_note": gpu_note, "num_gpus": num_gpus,
        "dtype": str(dtype).removeprefix("torch."),
        "quantization": recipe.model.quantization, "settings": s.__dict__,
        "resident_bytes": report.model_bytes,
        "groups": {g: v["bytes"] for g, v in report.groups.items()},
        "lora_params": lora_params(config, recipe.lora),
        "lines": mem.lines, "peak_allocated_bytes": mem.peak_allocated, "total_bytes": mem.total,
        "gpu_memory_bytes": gpu.memory_bytes, "fits": mem.fits, "headroom_bytes": mem.headroom,
        "fsdp_note": "FSDP2: the base, the adapter and its optimizer state / N per GPU, plus the layers gathered "
                     "in flight; each rank loads and quantises only its own 1/N of the experts, onto its GPU; "
                     "launch with accelerate/fsdp2.yaml" if fsdp > 1 else None,
        "optimizer_note": optimizer_note,
        "host_ram": host,
        "suggestions": [] if mem.fits else planner.suggestions(s),
        "largest_max_length": planner.largest_max_length(s, fsdp),
        "time": time_estimate(config, s, gpu, data, t.num_epochs, t.max_steps, packed(recipe)),
        "tokens_source": data.note if data is not None else "data not read",
    }  # fmt: skip
    return plan


def packed(recipe) -> bool:
    """Whether the run trains on packed rows (SFT with data.packing; DPO/KTO never pack)."""
    return recipe.method == "sft" and recipe.data.packing


def preflight(recipe, model_dir: Path, *, force: bool = False, echo=print) -> None:
    """Before `run` loads the model: on CUDA stop (unless forced) when the plan clearly does not fit the free memory;
    on CPU print the estimate as one line."""
    config = read_config(model_dir)
    cuda = recipe.model.device != "cpu" and torch.cuda.is_available()
    dtype_name = recipe.model.dtype
    if dtype_name == "auto":
        dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    else:
        dtype = getattr(torch, dtype_name)
    if not cuda:
        mem = Planner(recipe, config, dtype, "cpu", 0).memory(Settings.of(recipe))
        echo(f"plan: about {mem.total / GIB:.2f} GiB peak memory above the process (estimate)")
        return
    index = int(os.environ.get("LOCAL_RANK", "0"))
    free, _ = torch.cuda.mem_get_info(index)
    planner = Planner(recipe, config, dtype, "cuda", free)
    fsdp = int(os.environ.get("WORLD_SIZE", "1")) if fsdp_launch() else 1  # under FSDP2 each GPU holds 1/N
    s = Settings.of(recipe, fsdp)
    mem = planner.memory(s, fsdp)
    if mem.total <= 1.1 * free or force:  # "clearly" = more than 10% over: the model is checked to within 20%
        echo(f"plan: about {mem.total / GIB:.1f} GiB of {free / GIB:.1f} GiB free on cuda:{index}")
        return
    fixes = [f"{x['change']}: {x['total_bytes'] / GIB:.1f} GiB{'' if x['fits'] else ' (still too big)'}"
             for x in planner.suggestions(s)]  # fmt: skip
    raise UserError(
        f"the recipe needs about {mem.total / GIB:.1f} GiB on cuda:{index}, which has {free / GIB:.1f} GiB free; "
        "change the recipe (see `finetune plan`) or pass --force to try anyway",
        fixes,
    )
