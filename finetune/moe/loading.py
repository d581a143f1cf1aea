"""Streaming Mixtral load that quantises tensor by tensor, so no 16-bit copy of the model ever exists.

The skeleton is built on the meta device; `mlp.experts` becomes a `QuantizedExperts` (allocated at its quantised size
on the target device), attention q/k/v/o become bitsandbytes `Linear4bit`/`Linear8bitLt` (so PEFT applies its bnb
LoRA layers), and the router becomes a `Float32Router`. Then every safetensors tensor is read with `safe_open` and
placed (and quantised) as it arrives. Per-expert w1/w3 halves are joined and quantised as soon as both are there.
Embeddings, lm_head and norms stay in `dtype`; the router stays float32.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import bitsandbytes as bnb
import torch
from safetensors import safe_open
from torch import nn
from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM
from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding, MixtralTopKRouter

from finetune.errors import UserError
from finetune.moe.quantized import FOUR_BIT, QUANTIZATIONS, QuantizedExperts

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
GROUPS = ("attention", "experts", "router", "embeddings", "norms", "lm_head")

PER_EXPERT_KEY = re.compile(
    r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
FUSED_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
ROUTER_KEY = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate\.weight$")
PIECE_OF = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


class Float32Router(MixtralTopKRouter):
    """Mixtral's router with its weight kept in float32 while the model runs in bf16 (routing is precision-sensitive).

    A subclass, so transformers' router-logit recorder (aux loss) and our `ExpertLoadTracker` still find it by type.
    """

    def forward(self, hidden_states):
        return super().forward(hidden_states.to(self.weight.dtype))


@dataclass
class LoadReport:
    quantization: str
    groups: dict[str, dict[str, int]] = field(default_factory=dict)
    model_bytes: int = 0
    quantized_fraction: float = 0.0

    def summary_lines(self) -> list[str]:
        total = sum(g["params"] for g in self.groups.values())
        lines = [
            f"quantization: {self.quantization}; {total / 1e6:.2f}M base parameters, "
            f"{self.quantized_fraction:.1%} stored quantised; resident {self.model_bytes / 2**20:.1f} MiB"
        ]
        for name in GROUPS:
            g = self.groups.get(name)
            if not g or not g["params"]:
                continue
            state = "quantised" if g["quantized_params"] == g["params"] else "full precision"
            if 0 < g["quantized_params"] < g["params"]:
                state = f"{g['quantized_params'] / g['params']:.0%} quantised"
            lines.append(
                f"  {name:<10} {g['params'] / 1e6:9.2f}M params  {g['bytes'] / 2**20:9.1f} MiB  "
                f"({8 * g['bytes'] / g['params']:.2f} bits/param, {state})"
            )
        return lines


def _quant_state_tensors(param: torch.Tensor) -> list[torch.Tensor]:
    """Tensors a bitsandbytes parameter keeps outside its data: 4-bit QuantState, or int8 row scales."""
    out = _state_tensors(getattr(param, "quant_state", None))
    scb = getattr(param, "SCB", None)
    if isinstance(scb, torch.Tensor):
        out.append(scb)
    return out


def _state_tensors(state) -> list[torch.Tensor]:
    """The tensors of a 4-bit QuantState and its nested (double-quantisation) state."""
    out = []
    while state is not None:
        out += [t for t in (state.absmax, state.code, state.offset) if isinstance(t, torch.Tensor)]
        state = state.state2
    return out


def is_adapter_tensor(name: str) -> bool:
    return ".lora_" in name or "modules_to_save." in name


def model_bytes(model: nn.Module, *, local: bool = False) -> int:
    """Bytes of the base model's parameters and buffers, including bitsandbytes quant states (adapters excluded).

    `local`: under FSDP2, count only this rank's shard of each sharded parameter (the bytes it keeps resident).
    """
    from torch.distributed.tensor import DTensor

    seen: set[int] = set()
    total = 0
    tensors = [(n, t) for n, t in model.named_parameters()] + [(n, t) for n, t in model.named_buffers()]
    for name, module in model.named_modules():
        # Linear8bitLt moves its row scales into module.state on first use; a sharded Linear4bit keeps its
        # quant state on the module only (the sharded parameter is no longer a Params4bit)
        scb = getattr(getattr(module, "state", None), "SCB", None)
        if isinstance(module, bnb.nn.Linear8bitLt) and isinstance(scb, torch.Tensor):
            tensors.append((name, scb))
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module.weight, "quant_state", None) is None:
            tensors += [(name, x) for x in _state_tensors(getattr(module, "quant_state", None))]
    for name, t in tensors:
        if is_adapter_tensor(name):
            continue
        if isinstance(t, DTensor):
            if not local:  # the whole parameter's size, without gathering it
                total += t.numel() * t.element_size()
                continue
            t = t.to_local()
        for x in [t, *_quant_state_tensors(t)]:
            key = x.untyped_storage().data_ptr() if x.device.type != "meta" else id(x)
            if key in seen:
                continue
            seen.add(key)
            total += x.numel() * x.element_size()
    return total


def group_of(name: str) -> str | None:
    if ".self_attn." in name:
        return "attention"
    if ".experts." in name or name.endswith(".experts"):
        return "experts"
    if ".gate." in name and ".mlp." in name:
        return "router"
    if "embed_tokens" in name:
        return "embeddings"
    if name.startswith("lm_head"):
        return "lm_head"
    if "norm" in name:
        return "norms"
    return None


def build_report(model: nn.Module, quantization: str) -> LoadReport:
    """Count logical parameters, quantised parameters and resident bytes per group of a loaded model."""
    groups = {g: {"params": 0, "quantized_params": 0, "bytes": 0} for g in GROUPS}
    for mod_name, module in model.named_modules():
        if is_adapter_tensor(mod_name + "."):
            continue
        if isinstance(module, QuantizedExperts):
            g = groups["experts"]
            g["params"] += module.num_base_params
            g["quantized_params"] += module.num_base_params if module.quantization != "none" else 0
            g["bytes"] += sum(t.numel() * t.element_size() for t in module.parameters())
            continue
        for p_name, param in module.named_parameters(recurse=False):
            group = group_of(f"{mod_name}.{p_name}")
            if group is None:
                continue
            # a 4-bit weight may be packed into a float `quant_storage` (for FSDP), so ask bitsandbytes, not the dtype
            quantized = (isinstance(param, bnb.nn.Params4bit) and param.bnb_quantized) or (
                isinstance(param, bnb.nn.Int8Params) and param.dtype == torch.int8
            )
            n = module.in_features * module.out_features if quantized else param.numel()
            g = groups[group]
            g["params"] += n
            g["quantized_params"] += n if quantized else 0
            g["bytes"] += sum(t.numel() * t.element_size() for t in [param, *_quant_state_tensors(param)])
    total = sum(g["params"] for g in groups.values())
    quantized = sum(g["quantized_params"] for g in groups.values())
    return LoadReport(
        quantization=quantization,
        groups=groups,
        model_bytes=model_bytes(model),
        quantized_fraction=quantized / total if total else 0.0,
    )


def verify_quantized(model: nn.Module, quantization: str) -> None:
    """Fail loudly if a quantised recipe left any expert weight in 16/32-bit (the silent transformers trap)."""
    if quantization == "none":
        return
    problems = []
    for name, module in model.named_modules():
        if name.endswith("mlp.experts") and not isinstance(module, QuantizedExperts):
            problems.append(f"{name} is {type(module).__name__}, not QuantizedExperts")
        elif isinstance(module, QuantizedExperts):
            if module.quantization != quantization:
                problems.append(f"{name} stores {module.quantization}, recipe asked for {quantization}")
            if not module.is_complete():
                problems.append(f"{name} has unfilled expert slots: {', '.join(module.missing()[:8])}")
    for name, tensor in model.named_parameters():
        if ".experts." in name and tensor.is_floating_point() and not is_adapter_tensor(name):
            problems.append(f"{name} is still {tensor.dtype} {tuple(tensor.shape)}")
    if problems:
        raise UserError(f"expert weights are not stored in {quantization} as the recipe asked", problems[:20])


# ---- checkpoint reading ------------------------------------------------------------------------------------------


def _read_config(path: Path) -> MixtralConfig:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"no config.json in model folder {path}")
    raw = json.loads(config_file.read_text())
    model_type, archs = raw.get("model_type"), raw.get("architectures") or []
    if model_type != "mixtral":
        raise UserError(
            f"{path} is not a Mixtral model: found model_type={model_type!r}, architectures={archs}",
            ["finetune trains Mixtral-architecture MoE models (model_type 'mixtral', MixtralForCausalLM)"],
        )
    return MixtralConfig.from_pretrained(str(path))


def shard_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files, in order; a broken index or a missing shard is a UserError naming it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        missing = [name for name in names if not (path / name).is_file()]
        if missing:
            raise UserError(f"{index} lists shard(s) that are missing: {', '.join(missing)}")
        return [path / name for name in names]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"no *.safetensors weights in {path}")
    return files


def _layer_of(key: str) -> int:
    """The decoder layer a checkpoint key belongs to (-1 for embeddings, norm, lm_head)."""
    m = re.match(r"^model\.layers\.(\d+)\.", key)
    return int(m.group(1)) if m else -1


def keys_of(file: Path) -> list[str]:
    with safe_open(str(file), framework="pt") as f:
        return list(f.keys())


def _check_keys(keys: list[str], model: MixtralForCausalLM, config: MixtralConfig) -> None:
    """Every parameter must be filled exactly: report all missing and unexpected checkpoint keys at once."""
    n_layers, n_experts = config.num_hidden_layers, config.num_local_experts
    plain = {
        n
        for n, _ in model.named_parameters()
        if ".mlp.experts." not in n and ".mlp.gate." not in n and not n.endswith(".mlp.experts")
    }
    if config.tie_word_embeddings:
        plain.discard("lm_head.weight")
    pieces: dict[tuple[int, int], set[str]] = defaultdict(set)
    seen_plain, routers, unexpected = set(), set(), []
    for key in keys:
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if m := PER_EXPERT_KEY.match(key):
            layer, expert = int(m.group(1)), int(m.group(2))
            if layer >= n_layers or expert >= n_experts:
                unexpected.append(key)
            pieces[(layer, expert)].add(PIECE_OF[m.group(3)])
        elif m := FUSED_KEY.match(key):
            layer = int(m.group(1))
            if layer >= n_layers:
                unexpected.append(key)
            for e in range(n_experts):
                pieces[(layer, e)].update(("gate", "up") if m.group(2) == "gate_up_proj" else ("down",))
        elif m := ROUTER_KEY.match(key):
            routers.add(int(m.group(1)))
        elif key in plain:
            seen_plain.add(key)
        else:
            unexpected.append(key)
    missing = sorted(plain - seen_plain)
    missing += [f"router of layer {layer}" for layer in range(n_layers) if layer not in routers]
    for layer in range(n_layers):
        for e in range(n_experts):
            lacking = {"gate", "up", "down"} - pieces.get((layer, e), set())
            if lacking:
                missing.append(f"layer {layer} expert {e}: {'/'.join(sorted(lacking))} weights")
    if missing or unexpected:
        problems = [f"missing: {k}" for k in missing[:20]] + [f"unexpected: {k}" for k in unexpected[:20]]
        raise UserError(
            f"checkpoint does not match the Mixtral config ({len(missing)} missing, {len(unexpected)} unexpected)",
            problems,
        )


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
    config: MixtralConfig, quantization, dtype, device, double_quant, blocksize, storage=torch.uint8, expert_device=None
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
) -> tuple[MixtralForCausalLM, LoadReport]:
    """Load a local Mixtral checkpoint with its experts (and attention) quantised as each tensor streams in.

    `num_layers` keeps only the first decoder layers (a truncated model, for checks that cannot hold the whole one).
    `quant_storage` is the dtype the 4-bit attention weights are packed into: FSDP2 shards only floating-point
    `Params4bit` (accelerate leaves uint8 ones whole on every rank), so sharded runs pack them into the compute dtype.
    `expert_device` stages the experts elsewhere (host memory, under FSDP2 on GPUs): FSDP2 then moves each layer's
    shard to the GPU as it shards it, so no GPU ever holds the whole 4-bit expert stack.
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
    model = _build_skeleton(config, quantization, dtype, device, double_quant, blocksize, quant_storage, expert_device)
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
    for file, key in [(shard, key) for shard in files for key in keys_of(shard) if key in wanted]:
        if key.endswith("rotary_emb.inv_freq"):
            continue
        # One short-lived handle per tensor: the file mapping (which counts as resident memory) is dropped as soon
        # as the tensor is placed, so loading never holds more than one checkpoint tensor.
        with safe_open(str(file), framework="pt") as f:
            if m := PER_EXPERT_KEY.match(key):
                layer, expert, piece = int(m.group(1)), int(m.group(2)), PIECE_OF[m.group(3)]
                experts = layers[layer].mlp.experts
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
                for e in range(experts.num_experts):
                    experts.set_expert(m.group(2), e, stacked[e].to(dtype))
            elif m := ROUTER_KEY.match(key):
                _place(model, f"model.layers.{m.group(1)}.mlp.gate.weight", f.get_tensor(key), **place)
            else:
                _place(model, key, f.get_tensor(key), **place)

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
