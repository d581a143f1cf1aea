"""Streaming Mixtral load that quantises tensor by tensor, so no 16-bit copy of the model ever exists.

The skeleton is built on the meta device; `mlp.experts` becomes a `QuantizedExperts` (allocated at its quantised size
on the target device), attention q/k/v/o become bitsandbytes `Linear4bit`/`Linear8bitLt` (so PEFT applies its bnb
LoRA layers), and the router becomes a `Float32Router`. Then every safetensors tensor is read with `safe_open` and
placed (and quantised) as it arrives. Per-expert w1/w3 halves are joined and quantised as soon as both are there.
Embeddings, lm_head and norms stay in `dtype`; the router stays float32.

With `expert_shard=(rank, world)` (an FSDP2 run) each rank allocates, reads and quantises only its own experts
(`quantized.expert_shard`), so no rank ever holds the whole expert stack; `finetune.distributed.sharding` then shards the rest.
Checkpoint reading lives in `checkpoint`, resident-size accounting in `accounting`; their names are re-exported here.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import bitsandbytes as bnb
import torch
from safetensors import safe_open
from torch import nn
from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM
from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding, MixtralTopKRouter

from finetune.errors import UserError
from finetune.moe.accounting import (  # noqa: F401  (re-exported: the loader's public names)
    GROUPS,
    LoadReport,
    build_report,
    group_of,
    is_adapter_tensor,
    model_bytes,
    verify_quantized,
)
from finetune.moe.checkpoint import (
    FUSED_KEY,
    PER_EXPERT_KEY,
    PIECE_OF,
    ROUTER_KEY,
    _check_keys,
    _layer_of,
    _read_config,
    keys_of,
    shard_files,
)
from finetune.moe.quantized import FOUR_BIT, QUANTIZATIONS, QuantizedExperts
from finetune.moe.quantized import expert_shard as expert_shard_of
from finetune.moe.router import Float32Router

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def release_freed_host_memory() -> None:
    """Hand the C heap's freed pages back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    Loading frees a checkpoint tensor and the quantiser's temporaries for every expert. glibc keeps freed blocks
    below its (self-raising, up to 32 MB) mmap threshold in the heap, so on models with small tensors the process
    kept about the bytes of the whole quantised stack again as free heap (86 MB after loading a 92 MB model,
    bench/bench_fsdp_load.py). Trimming once per decoder layer bounds that garbage to one layer's worth.
    """
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018  (raises AttributeError without glibc)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def keep_standard_cpu_layout(model: nn.Module) -> int:
    """Keep every 4-bit linear on bitsandbytes' standard path, on every CPU; returns how many were set.

    On CPUs with AVX512-BF16, bitsandbytes (0.49+) repacks a `Linear4bit` weight in place into a CPU-only layout
    the first time it runs in eval mode without grad, then uses `gemv_4bit`: results drift, `dequantize_4bit` of
    the repacked weight is wrong, and a later training backward returns no input gradient. One eval step would
    silently corrupt training (and merges, generation, DPO reference passes), so we keep the standard layout.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def _quantized_linear(
    linear: nn.Linear, quantization: str, dtype: torch.dtype, double_quant: bool, storage
) -> nn.Module:
    if quantization in FOUR_BIT:
        return bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=False,
            compute_dtype=dtype,
            compress_statistics=double_quant,
            quant_type=quantization,
            quant_storage=storage,
            device="meta",
        )
    return bnb.nn.Linear8bitLt(
        linear.in_features, linear.out_features, bias=False, has_fp16_weights=False, threshold=0.0, device="meta"
    )


def _build_skeleton(
    config: MixtralConfig,
    quantization,
    dtype,
    device,
    double_quant,
    blocksize,
    storage=torch.uint8,
    expert_device=None,
    held: range | None = None,
):
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    for layer in model.model.layers:
        layer.mlp.experts = QuantizedExperts(
            config.num_local_experts,
            config.hidden_size,
            config.intermediate_size,
            quantization=quantization,
            dtype=dtype,
            device=expert_device or device,
            blocksize=blocksize,
            double_quant=double_quant,
            hidden_act=config.hidden_act,
            held=held,
        )
        with torch.device("meta"):
            layer.mlp.gate = Float32Router(config)
        if quantization != "none":
            for proj in ATTENTION_PROJECTIONS:
                old = getattr(layer.self_attn, proj)
                setattr(layer.self_attn, proj, _quantized_linear(old, quantization, dtype, double_quant, storage))
    return model


def _place(model: nn.Module, name: str, tensor, quantization, dtype, device, blocksize, double_quant, storage):
    module_name, _, param_name = name.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, bnb.nn.Linear4bit):
        weight = bnb.nn.Params4bit(
            tensor.to(dtype),
            requires_grad=False,
            blocksize=blocksize,
            compress_statistics=double_quant,
            quant_type=quantization,
            quant_storage=storage,
            module=module,
        )
        module.weight = weight.to(device)  # quantises on arrival
        module.quant_state = module.weight.quant_state
    elif isinstance(module, bnb.nn.Linear8bitLt):
        module.weight = bnb.nn.Int8Params(tensor.to(dtype), requires_grad=False, has_fp16_weights=False).to(device)
    else:
        target_dtype = torch.float32 if isinstance(module, MixtralTopKRouter) else dtype
        module._parameters[param_name] = nn.Parameter(tensor.to(device=device, dtype=target_dtype))


def load_mixtral(
    path,
    *,
    quantization: str = "nf4",
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    double_quant: bool = True,
    blocksize: int = 64,
    num_layers: int | None = None,
    quant_storage: torch.dtype = torch.uint8,
    expert_device: str | torch.device | None = None,
    expert_shard: tuple[int, int] | None = None,
) -> tuple[MixtralForCausalLM, LoadReport]:
    """Load a local Mixtral checkpoint with its experts (and attention) quantised as each tensor streams in.

    `num_layers` keeps only the first decoder layers (a truncated model, for checks that cannot hold the whole one).
    `quant_storage` is the dtype the 4-bit attention weights are packed into: FSDP2 shards only floating-point
    `Params4bit` (accelerate leaves uint8 ones whole on every rank), so sharded runs pack them into the compute dtype.
    `expert_device` stages the experts elsewhere (e.g. host memory).
    `expert_shard=(rank, world)`: keep only this FSDP2 rank's experts (`quantized.expert_shard`); the other experts'
    tensors are never read. The report still describes the whole model.
    """
    if quantization not in QUANTIZATIONS:
        raise UserError(f"unknown quantization {quantization!r}", [f"choose one of {', '.join(QUANTIZATIONS)}"])
    path = Path(path)
    device = torch.device(device)
    config = _read_config(path)
    config.dtype = dtype
    config.name_or_path = str(path)  # PEFT records it as base_model_name_or_path
    if num_layers is not None:
        config.num_hidden_layers = min(num_layers, config.num_hidden_layers)
    files = shard_files(path)
    keys = [key for file in files for key in keys_of(file) if _layer_of(key) < config.num_hidden_layers]

    expert_device = torch.device(expert_device) if expert_device is not None else None
    held = expert_shard_of(config.num_local_experts, *expert_shard) if expert_shard else None
    model = _build_skeleton(
        config, quantization, dtype, device, double_quant, blocksize, quant_storage, expert_device, held
    )
    _check_keys(keys, model, config)
    wanted = set(keys)
    layers = model.model.layers
    pending: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    place = dict(
        quantization=quantization,
        dtype=dtype,
        device=device,
        blocksize=blocksize,
        double_quant=double_quant,
        storage=quant_storage,
    )
    layer_before = None
    for file, key in [(shard, key) for shard in files for key in keys_of(shard) if key in wanted]:
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if _layer_of(key) != layer_before:  # a new decoder layer: return the last one's freed temporaries
            layer_before = _layer_of(key)
            release_freed_host_memory()
        # One short-lived handle per tensor: the file mapping (which counts as resident memory) is dropped as soon
        # as the tensor is placed, so loading never holds more than one checkpoint tensor.
        with safe_open(str(file), framework="pt") as f:
            if m := PER_EXPERT_KEY.match(key):
                layer, expert, piece = int(m.group(1)), int(m.group(2)), PIECE_OF[m.group(3)]
                experts = layers[layer].mlp.experts
                if expert not in experts.held:  # another rank's expert: not even read
                    continue
                if piece == "down":
                    experts.set_expert("down_proj", expert, f.get_tensor(key).to(dtype))
                    continue
                halves = pending.setdefault((layer, expert), {})
                halves[piece] = f.get_tensor(key).to(dtype)
                if len(halves) == 2:  # gate rows first, then up: [w1; w3]
                    experts.set_expert("gate_up_proj", expert, torch.cat([halves["gate"], halves["up"]]))
                    del pending[(layer, expert)]
            elif m := FUSED_KEY.match(key):
                experts = layers[int(m.group(1))].mlp.experts
                stacked = f.get_slice(key)  # read one expert at a time, never the whole stack
                for e in experts.held:
                    experts.set_expert(m.group(2), e, stacked[e].to(dtype))
            elif m := ROUTER_KEY.match(key):
                _place(model, f"model.layers.{m.group(1)}.mlp.gate.weight", f.get_tensor(key), **place)
            else:
                _place(model, key, f.get_tensor(key), **place)

    release_freed_host_memory()
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.device(device):  # non-persistent buffers are not in the checkpoint: recompute them
        model.model.rotary_emb = MixtralRotaryEmbedding(config)
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if leftovers:
        raise UserError("some model tensors were not filled from the checkpoint", leftovers[:20])
    verify_quantized(model, quantization)
    keep_standard_cpu_layout(model)

    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    model.name_or_path = str(path)
    model.is_loaded_in_4bit = quantization in FOUR_BIT  # read by PEFT (bnb LoRA dispatch) and TRL
    model.is_loaded_in_8bit = quantization == "int8"
    model.eval()
    return model, build_report(model, quantization)
