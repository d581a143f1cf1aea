"""Shared fixtures for the MoE core tests: tiny checkpoints and stock-Mixtral references built from our weights."""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from finetune.model.tiny import TinySpec, write_tiny_model
from finetune.moe import QuantizedExperts

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


@pytest.fixture
def stock_from():
    return stock_model_from
