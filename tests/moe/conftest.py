"""Shared fixtures for the MoE core tests: tiny checkpoints and stock-Mixtral references built from our weights."""

from __future__ import annotations

import json
import math

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
from safetensors.torch import save_file
from transformers import MixtralConfig, MixtralForCausalLM

from finetune.moe import QuantizedExperts
from finetune.tiny import TinySpec, write_tiny_model

TINY = TinySpec(hidden_size=64, intermediate_size=96, layers=2, experts=8, top_k=2, heads=4, kv_heads=2, seed=3)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A seeded fp32 tiny Mixtral on disk in the per-expert (w1/w2/w3) layout, with the real tokenizer."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", TINY, dtype=torch.float32)


def _dequantized_linear(module: torch.nn.Module) -> torch.Tensor:
    if isinstance(module, bnb.nn.Linear4bit):
        return bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    if isinstance(module, bnb.nn.Linear8bitLt):
        scb = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
        return bnbf.int8_vectorwise_dequant(module.weight.data, scb).float()
    return module.weight.detach().float()


def stock_model_from(ours) -> MixtralForCausalLM:
    """A stock fp32 MixtralForCausalLM holding exactly the (dequantised) weights our model computes with."""
    base = ours.get_base_model() if hasattr(ours, "get_base_model") else ours
    config = MixtralConfig.from_dict(base.config.to_dict())
    config.dtype = torch.float32
    stock = MixtralForCausalLM(config).float().eval()
    with torch.no_grad():
        stock.model.embed_tokens.weight.copy_(base.model.embed_tokens.weight.float())
        stock.model.norm.weight.copy_(base.model.norm.weight.float())
        stock.lm_head.weight.copy_(base.lm_head.weight.float())
        for ours_layer, layer in zip(base.model.layers, stock.model.layers, strict=True):
            for name in ("input_layernorm", "post_attention_layernorm"):
                getattr(layer, name).weight.copy_(getattr(ours_layer, name).weight.float())
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                module = getattr(ours_layer.self_attn, proj)
                module = module.get_base_layer() if hasattr(module, "get_base_layer") else module
                getattr(layer.self_attn, proj).weight.copy_(_dequantized_linear(module))
            gate = ours_layer.mlp.gate
            gate = getattr(gate, "original_module", gate)
            layer.mlp.gate.weight.copy_(gate.weight.float())
            experts = ours_layer.mlp.experts
            experts = experts.get_base_layer() if hasattr(experts, "get_base_layer") else experts
            assert isinstance(experts, QuantizedExperts)
            layer.mlp.experts.gate_up_proj.copy_(experts.dequantized_stack("gate_up_proj", torch.float32))
            layer.mlp.experts.down_proj.copy_(experts.dequantized_stack("down_proj", torch.float32))
    return stock


def write_raw_mixtral(path, config: MixtralConfig, *, dtype=torch.bfloat16, layout="per_expert", shards=1, seed=0):
    """Write a random Mixtral checkpoint tensor by tensor (fast for big experts); layout per_expert or fused."""
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(path))
    g = torch.Generator().manual_seed(seed)
    h, f, e = config.hidden_size, config.intermediate_size, config.num_local_experts
    hd = h // config.num_attention_heads
    kv = config.num_key_value_heads * hd

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    tensors = {"model.embed_tokens.weight": rnd(config.vocab_size, h), "model.norm.weight": torch.ones(h, dtype=dtype)}
    tensors["lm_head.weight"] = rnd(config.vocab_size, h)
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}"
        tensors[f"{p}.input_layernorm.weight"] = torch.ones(h, dtype=dtype)
        tensors[f"{p}.post_attention_layernorm.weight"] = torch.ones(h, dtype=dtype)
        for proj, shape in {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h)}.items():
            tensors[f"{p}.self_attn.{proj}.weight"] = rnd(*shape)
        tensors[f"{p}.block_sparse_moe.gate.weight"] = rnd(e, h)
        if layout == "fused":
            tensors[f"{p}.mlp.experts.gate_up_proj"] = rnd(e, 2 * f, h)
            tensors[f"{p}.mlp.experts.down_proj"] = rnd(e, h, f)
        else:
            for x in range(e):
                for w, shape in {"w1": (f, h), "w2": (h, f), "w3": (f, h)}.items():
                    tensors[f"{p}.block_sparse_moe.experts.{x}.{w}.weight"] = rnd(*shape)
    keys = list(tensors)
    per_shard = math.ceil(len(keys) / shards)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"))
        return path
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i * per_shard : (i + 1) * per_shard]}
        save_file(part, str(path / name))
        weight_map.update(dict.fromkeys(part, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@pytest.fixture
def stock_from():
    return stock_model_from


@pytest.fixture
def raw_writer():
    return write_raw_mixtral


def random_lora_(model, seed: int = 0, std: float = 0.05) -> None:
    """Give every trainable LoRA / router weight non-zero random values (zero B would prove nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g) * std
                p.copy_((p.float() + noise if "gate" in name and "lora" not in name else noise).to(p.dtype))


@pytest.fixture
def randomize_lora():
    return random_lora_
