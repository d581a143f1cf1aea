"""An FSDP2 rank loads only its own experts: the shard it allocates, reads and quantises is E/N experts, byte for byte
the rows a whole load gives those experts, and the report still describes the whole model.

The two-process check (sharding at load through accelerate, loss and gradients against the unsharded model) is
test_fsdp_load.py; these run in one process.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from finetune.moe import QuantizedExperts, load_mixtral
from finetune.moe import loading as loading_module
from finetune.moe.quantized import expert_shard


@pytest.fixture
def keys_read(monkeypatch):
    """Every checkpoint key the loader reads (get_tensor, get_slice)."""
    keys = []
    original = loading_module.safe_open

    @contextlib.contextmanager
    def recording(*args, **kwargs):
        with original(*args, **kwargs) as handle:
            yield SimpleNamespace(
                get_tensor=lambda key: keys.append(key) or handle.get_tensor(key),
                get_slice=lambda key: keys.append(key) or handle.get_slice(key),
            )

    monkeypatch.setattr(loading_module, "safe_open", recording)
    return keys


def test_expert_shard_is_torch_chunk_split():
    assert [expert_shard(8, r, 2) for r in range(2)] == [range(0, 4), range(4, 8)]
    assert [len(expert_shard(8, r, 3)) for r in range(3)] == [3, 3, 2]
    assert [len(expert_shard(8, r, 16)) for r in range(16)] == [1] * 8 + [0] * 8
    for world in (1, 2, 3, 4, 8, 16):  # the same split FSDP2's fully_shard makes of dim 0
        chunks = torch.arange(8).chunk(world)
        for r in range(world):
            expected = chunks[r].tolist() if r < len(chunks) else []
            assert list(expert_shard(8, r, world)) == expected


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_loads_and_keeps_only_its_experts(tiny_dir, keys_read, rank):
    whole, whole_report = load_mixtral(tiny_dir, quantization="nf4", dtype=torch.float32)
    keys_read.clear()
    shard, report = load_mixtral(tiny_dir, quantization="nf4", dtype=torch.float32, expert_shard=(rank, 2))
    held = range(4 * rank, 4 * rank + 4)
    read_experts = {int(k.split(".experts.")[1].split(".")[0]) for k in keys_read if ".experts." in k}
    assert read_experts == set(held)  # the other rank's expert tensors were never read
    for mine, full in zip(shard.model.layers, whole.model.layers, strict=True):
        ours, theirs = mine.mlp.experts, full.mlp.experts
        assert isinstance(ours, QuantizedExperts) and ours.held == held and ours.is_complete()
        for name, param in ours.named_parameters(recurse=False):
            reference = getattr(theirs, name)
            if "quant_map" in name:
                assert torch.equal(param, reference)
                continue
            assert param.shape == (4, *reference.shape[1:])  # E/N experts: half the bytes of the stack
            assert torch.equal(param, reference[held.start : held.stop])
        local = sum(p.numel() * p.element_size() for p in ours.parameters())
        stack = sum(p.numel() * p.element_size() for p in theirs.parameters())
        assert local < 0.51 * stack
        for e in held:
            assert torch.equal(ours.dequantize("down_proj", e), theirs.dequantize("down_proj", e))
    assert report.model_bytes == whole_report.model_bytes  # the report describes the whole model
    assert report.groups["experts"] == whole_report.groups["experts"]


def test_ranks_beyond_the_experts_hold_none(tiny_dir):
    model, _ = load_mixtral(tiny_dir, quantization="int8", dtype=torch.float32, expert_shard=(9, 10))
    experts = model.model.layers[0].mlp.experts
    assert len(experts.held) == 0 and experts.gate_up_proj_data.shape[0] == 0 and experts.is_complete()


def test_sharded_storage_refuses_a_shard_that_is_not_the_ranks():
    experts = QuantizedExperts(8, 16, 24, quantization="nf4", held=range(0, 4))
    with pytest.raises(ValueError, match="not rank 1's shard"):
        experts.sharded_storage(1, 2)
    with pytest.raises(ValueError, match="not held here"):
        experts.set_expert("down_proj", 5, torch.zeros(16, 24))
