"""FSDP2 sharding at load: two CPU ranks (accelerate/cpu-fsdp2.yaml) each quantise and keep only their own experts,
the model is sharded before the trainer exists, and it computes the loss and LoRA gradients of the unsharded model.

Runs tests/moe/fsdp_load_worker.py through `accelerate launch`, as `finetune run --num-processes 2` does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("fsdp_load_worker.py")
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate/cpu-fsdp2.yaml")]


@pytest.fixture(scope="module")
def ranks(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_load") / "result"
    run = subprocess.run(
        [*LAUNCH, str(WORKER), str(tiny_dir), "nf4", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]


def test_each_rank_quantised_and_holds_only_its_half_of_the_experts(ranks):
    for rank, result in enumerate(ranks):
        assert result["world"] == 2 and result["rank"] == rank
        for layer in result["experts"]:
            experts, packed = layer["full_shape"]
            assert layer["is_dtensor"] and layer["local_shape"] == [experts // 2, packed]
            half = list(range(rank * experts // 2, (rank + 1) * experts // 2))
            assert layer["quantised"] == half  # it never quantised the other rank's experts
        assert result["quantised_calls"] == 2 * 2 * experts // 2  # 2 layers x (gate_up, down) x its experts
        assert result["shards_equal_reference"]  # its shard holds the bytes a whole load gives those experts
    assert ranks[0]["experts"][0]["local_bytes"] == ranks[1]["experts"][0]["local_bytes"]


def test_sharded_at_load_the_model_computes_what_the_whole_one_does(ranks):
    for result in ranks:
        assert abs(result["loss"] - result["loss_ref"]) <= 1e-5 * abs(result["loss_ref"])
        assert result["max_grad_diff"] <= 1e-5 * result["grad_scale"]
        assert result["expert_grads"] == 8  # 2 layers x (gate_up, down) x (A, B)


def test_sizes_and_the_float32_router_unit(ranks):
    for result in ranks:
        assert result["model_bytes"] == result["reference_model_bytes"]  # the report is of the whole model
        assert result["local_bytes"] <= 0.55 * result["model_bytes"]
        assert result["router_is_own_unit"] and result["router_weight_dtype"] == "torch.float32"
        # the adapter in the dtype TRL's trainers give a quantised model's adapter, its local shards too: a cast
        # after sharding would leave them apart and fail the first optimizer step
        assert result["adapter_dtypes"] == result["adapter_local_dtypes"] == ["torch.bfloat16"]
        assert result["load_memory_added"] > 0
