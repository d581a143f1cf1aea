"""Streaming load: layouts, errors, the 4-bit check, resident size and load-time peak memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import MixtralConfig, MixtralForCausalLM

from finetune.errors import UserError
from finetune.moe import QuantizedExperts, load_mixtral, model_bytes, verify_quantized


def _fused_copy(src, dst, shards: int = 2):
    """Rewrite a per-expert checkpoint in the fused layout (mlp.experts.gate_up_proj / down_proj), sharded."""
    dst.mkdir()
    for name in ("config.json", "generation_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    tensors = load_file(str(src / "model.safetensors"))
    config = MixtralConfig.from_pretrained(str(src))
    fused = {k: v for k, v in tensors.items() if ".experts." not in k}
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}.block_sparse_moe.experts"
        e = range(config.num_local_experts)
        fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([tensors[f"{p}.{x}.w1.weight"], tensors[f"{p}.{x}.w3.weight"]]) for x in e]
        )
        fused[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack([tensors[f"{p}.{x}.w2.weight"] for x in e])
    keys = sorted(fused)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: fused[k].contiguous() for k in keys[i::shards]}
        save_file(part, str(dst / name))
        weight_map.update(dict.fromkeys(part, name))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return dst


def test_fused_sharded_layout_loads_the_same_as_per_expert(tiny_dir, tmp_path):
    fused_dir = _fused_copy(tiny_dir, tmp_path / "fused")
    a, _ = load_mixtral(tiny_dir, quantization="nf4", dtype=torch.float32)
    b, _ = load_mixtral(fused_dir, quantization="nf4", dtype=torch.float32)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    ids = torch.randint(0, 32000, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_loaded_model_layout_and_report(tiny_dir):
    model, report = load_mixtral(tiny_dir, quantization="nf4", dtype=torch.bfloat16)
    layer = model.model.layers[0]
    assert isinstance(layer.mlp.experts, QuantizedExperts)
    assert layer.mlp.gate.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert layer.self_attn.q_proj.weight.dtype == torch.uint8
    assert model.is_loaded_in_4bit and not model.is_loaded_in_8bit
    stock_rotary = MixtralForCausalLM(MixtralConfig.from_pretrained(tiny_dir)).model.rotary_emb.inv_freq
    assert torch.equal(model.model.rotary_emb.inv_freq, stock_rotary)
    assert report.groups["experts"]["quantized_params"] == report.groups["experts"]["params"] > 0
    assert report.groups["embeddings"]["quantized_params"] == 0
    assert report.model_bytes == model_bytes(model)
    assert any("experts" in line for line in report.summary_lines())
    ids = torch.randint(0, 32000, (1, 6))
    with torch.no_grad():
        assert model(ids).logits.dtype == torch.bfloat16


def test_check_fails_when_experts_stay_16_bit(tiny_dir):
    stock = MixtralForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    with pytest.raises(UserError, match="not stored in nf4") as error:
        verify_quantized(stock, "nf4")
    assert any("gate_up_proj" in p for p in error.value.problems)


def test_not_a_mixtral_config_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(UserError, match="LlamaForCausalLM"):
        load_mixtral(tmp_path)


def test_missing_and_unexpected_keys_are_user_errors(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(tiny_dir / "config.json", broken / "config.json")
    tensors = load_file(str(tiny_dir / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
    tensors["model.layers.0.mlp.surprise.weight"] = torch.zeros(2)
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(UserError) as error:
        load_mixtral(broken)
    text = str(error.value)
    assert "layer 1 expert 5: up" in text and "unexpected: model.layers.0.mlp.surprise.weight" in text


def test_resident_bytes_of_a_mixtral_shaped_model_are_near_the_nf4_floor(tmp_path, raw_writer):
    config = MixtralConfig(vocab_size=32000, hidden_size=256, intermediate_size=896, num_hidden_layers=2,
                           num_attention_heads=8, num_key_value_heads=2, num_local_experts=8)  # fmt: skip
    path = raw_writer(tmp_path / "m", config, dtype=torch.bfloat16)
    _, report = load_mixtral(path, quantization="nf4", dtype=torch.bfloat16)
    quantized = sum(g["quantized_params"] for g in report.groups.values())
    other = sum(g["params"] - g["quantized_params"] for g in report.groups.values())
    assert quantized == report.groups["experts"]["params"] + report.groups["attention"]["params"]
    floor = 0.52 * quantized + 2 * other
    assert report.model_bytes <= 1.05 * floor, (report.model_bytes, floor)
    assert report.groups["experts"]["bytes"] <= 0.52 * report.groups["experts"]["params"]


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from finetune.memory import PeakMemory
    from finetune.moe import load_mixtral
    load_mixtral(sys.argv[2], quantization="nf4")  # warm-up: lazy imports and kernels load outside the measurement
    with PeakMemory() as peak:
        model, report = load_mixtral(sys.argv[1], quantization="nf4", dtype=torch.bfloat16)
    print(json.dumps({"delta": peak.delta, "model_bytes": report.model_bytes,
                      "expert_params": report.groups["experts"]["params"]}))
    """
)


def test_load_peak_memory_has_no_16_bit_materialisation(tmp_path, raw_writer, tiny_dir):
    """Experts of 38M params (75 MB in bf16), loaded in a fresh process whose glibc returns freed memory at once
    (MALLOC_MMAP_THRESHOLD_), so RSS shows what the load really holds rather than the test process's old heap.

    On CPU the peak is the final size plus bitsandbytes' quantise temporaries for one tensor (about 8x its bf16
    size, from the pure-torch CPU kernel); a 16-bit expert stack would add 75 MB."""
    config = MixtralConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                           num_attention_heads=8, num_key_value_heads=2, num_local_experts=16)  # fmt: skip
    path = raw_writer(tmp_path / "big", config, dtype=torch.bfloat16, shards=3)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path), str(tiny_dir)], capture_output=True,
                         text=True, timeout=300, env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    expert_bf16 = 2 * result["expert_params"]
    assert result["delta"] < 0.5 * expert_bf16, result
    assert result["delta"] < result["model_bytes"] + 32 * 2**20, result
