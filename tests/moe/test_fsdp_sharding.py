"""FSDP2 shards the quantised experts themselves, and the sharded model computes what the unsharded one does.

Two CPU processes over gloo run tests/moe/fsdp_worker.py: stock `fully_shard` on each decoder layer and the root.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from finetune.moe.quantized import QuantizedExperts

WORKER = Path(__file__).with_name("fsdp_worker.py")


def test_quantized_storage_is_frozen_integer_parameters():
    """Parameters (so FSDP2 shards them), frozen, and not floating point (so mixed precision never casts them)."""
    experts = QuantizedExperts(4, 32, 48, quantization="nf4", dtype=torch.bfloat16)
    params = dict(experts.named_parameters())
    assert params and not list(experts.buffers())
    assert all(not p.requires_grad and not p.is_floating_point() for p in params.values())
    assert all(p.shape[0] == 4 for n, p in params.items() if "quant_map" not in n)  # dim 0 is the expert: shardable


def test_fsdp2_shards_the_4bit_experts_and_keeps_the_math(tiny_dir, tmp_path):
    out = tmp_path / "result.json"
    torchrun = Path(sys.executable).with_name("torchrun")
    run = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", str(WORKER), str(tiny_dir), "nf4", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["is_dtensor"]
    experts, packed = result["full_shape"]
    assert result["local_shape"] == [experts // 2, packed]  # each rank holds half of the experts, still packed
    assert result["local_bytes"] <= 0.55 * result["model_bytes"]
    assert result["expert_grads"] == 8  # 2 layers x (gate_up, down) x (A, B)
    assert abs(result["loss"] - result["loss_ref"]) <= 1e-5 * abs(result["loss_ref"])
    assert result["max_grad_diff"] <= 1e-5 * result["grad_scale"]
