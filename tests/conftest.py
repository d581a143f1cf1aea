"""Shared fixtures: tiny Mixtral models are built here, offline, once per session."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import MixtralConfig

from finetune.model.tiny import TinySpec, write_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The default tiny Mixtral (8 experts, top-2) with the real Mixtral v1 tokenizer."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-mixtral"), TinySpec())


# The single-process reference for the multi-process runs (tests/test_distributed.py, tests/test_fsdp.py): the tiny
# recipe for DISTRIBUTED_STEPS steps at batch 2 x accumulation 2, aux loss off (it depends on how rows are grouped
# into micro-batches, the LM loss does not). Two ranks x batch 1 x accumulation 2 see the same rows per step.
DISTRIBUTED_STEPS = 4


def distributed_settings(model_dir: Path, out: Path, *extra: str) -> list[str]:
    """`--set` arguments shared by the single-process reference and the multi-process runs compared with it."""
    settings = (
        f"model.path={model_dir}",
        f"output_dir={out}",
        f"training.max_steps={DISTRIBUTED_STEPS}",
        "training.logging_steps=1",
        "training.gradient_accumulation_steps=2",
        "data.eval_fraction=0",
        "moe.aux_loss=false",
        *extra,
    )
    return [arg for setting in settings for arg in ("--set", setting)]


@pytest.fixture(scope="session")
def reference_settings():
    """`distributed_settings`, for the test files that compare a multi-process run with `single_process_run`."""
    return distributed_settings


@pytest.fixture(scope="session")
def single_process_run(tmp_path_factory, tiny_model_dir) -> Path:
    """The output folder of the single-process reference run (see DISTRIBUTED_STEPS)."""
    out = tmp_path_factory.mktemp("single") / "out"
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny-mixtral-sft.yaml"
    args = distributed_settings(tiny_model_dir, out, "training.batch_size=2", "tracking.sample_prompts=0")
    result = subprocess.run(
        [sys.executable, "-m", "finetune", "run", str(recipe), *args], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Built-in models and dataset caches go to a per-session temp folder, never the user's home."""
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path_factory.getbasetemp() / "finetune-cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")


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


@pytest.fixture(scope="session")
def raw_writer():
    """`write_raw_mixtral(path, config, dtype=, layout=per_expert|fused, shards=, seed=)`."""
    return write_raw_mixtral


def random_lora_(model, seed: int = 0, std: float = 0.05) -> None:
    """Give every trainable LoRA / router weight non-zero random values (zero B would prove nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g) * std
                p.copy_((p.float() + noise if "gate" in name and "lora" not in name else noise).to(p.dtype))


@pytest.fixture(scope="session")
def randomize_lora():
    return random_lora_
