"""DDP's initial broadcast leaves out the frozen 4-bit base (every rank loads it identically) and syncs the adapter.

DDP broadcasts every parameter and buffer from rank 0 when it wraps the model. A one-process gloo group runs the
same construction path; a spy on the broadcast records which tensors it was asked to send.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from finetune.distributed.ranks import ddp_ignore_frozen
from finetune.model.tiny import TinySpec, write_tiny_model
from finetune.moe import apply_lora, load_mixtral


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    spec = TinySpec(hidden_size=32, intermediate_size=48, layers=1, experts=4, heads=4, kv_heads=2, seed=5)
    return write_tiny_model(tmp_path_factory.mktemp("ddp") / "model", spec, dtype=torch.float32)


@pytest.fixture
def gloo_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def broadcast(monkeypatch):
    """The storages of every tensor DDP's initial sync broadcasts."""
    sent: set[int] = set()
    original = dist._broadcast_coalesced

    def spy(process_group, tensors, bucket_size, src):
        sent.update(t.untyped_storage().data_ptr() for t in tensors)
        return original(process_group, tensors, bucket_size, src)

    monkeypatch.setattr(dist, "_broadcast_coalesced", spy)
    return sent


def _model(tiny_dir):
    base, _ = load_mixtral(tiny_dir, quantization="nf4", dtype=torch.float32)
    return apply_lora(base, attention_targets=["q_proj", "v_proj"], r=2, alpha=4, dropout=0.0,
                      expert_targets=["gate_up_proj", "down_proj"], expert_r=2, expert_alpha=4)  # fmt: skip


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_frozen_base_is_not_broadcast_and_the_adapter_is(tiny_dir, gloo_group, broadcast):
    model = _model(tiny_dir)
    ignored = ddp_ignore_frozen(model)
    DistributedDataParallel(model)
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(".experts." in n and not p.is_floating_point() for n, p in frozen.items())  # the 4-bit storage
    assert set(frozen) <= set(ignored)
    assert not {_ptr(p) for p in frozen.values()} & broadcast
    assert not {_ptr(b) for b in model.buffers()} & broadcast
    assert {_ptr(p) for p in trainable.values()} <= broadcast  # the adapter still starts equal on every rank
    assert any(".experts." in n for n in trainable)


def test_without_it_ddp_would_broadcast_the_quantised_experts(tiny_dir, gloo_group, broadcast):
    """The spy sees what the fix removes: stock DDP sends the frozen expert storage too."""
    model = _model(tiny_dir)
    DistributedDataParallel(model)
    experts = [p for n, p in model.named_parameters() if ".experts." in n and not p.requires_grad]
    assert experts and {_ptr(p) for p in experts} <= broadcast


def test_ddp_with_the_runs_find_unused_setting_steps_without_its_warning(tiny_dir, gloo_group, capfd):
    """The run's DDP `find_unused_parameters` (trainer_arguments; transformers' default for a PEFT model is True)
    is False and right: two steps go through (DDP would stop at the second if a trainable parameter got no
    gradient), every trainable parameter has one, and the reducer's C++ "did not find any unused parameters"
    warning, printed to stderr once per rank, has no cause."""
    from pathlib import Path

    from finetune.recipe.schema import load_recipe
    from finetune.train.arguments import trainer_arguments

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "tiny-mixtral-sft.yaml")
    args = trainer_arguments(recipe, Path("unused"), torch.device("cpu"), torch.float32)
    find_unused = args.get("ddp_find_unused_parameters")
    find_unused = True if find_unused is None else find_unused  # what transformers' Trainer does with None
    base, _ = load_mixtral(tiny_dir, quantization="nf4", dtype=torch.float32)
    model = apply_lora(base, attention_targets=["q_proj", "v_proj"], r=2, alpha=4, dropout=0.0,
                       expert_targets=["gate_up_proj", "down_proj"], expert_r=2, expert_alpha=4,
                       train_router=True)  # fmt: skip
    ddp_ignore_frozen(model)
    wrapped = DistributedDataParallel(model, find_unused_parameters=find_unused)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29], [2, 6, 10, 14, 18, 22, 26, 30]])
    for _ in range(2):
        model.zero_grad()
        wrapped(input_ids=ids, labels=ids).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(".experts." in n for n in trainable) and any("mlp.gate" in n for n in trainable)
    assert not [n for n, p in trainable.items() if p.grad is None]
    err = capfd.readouterr().err
    assert "find_unused_parameters" not in err, err[-2000:]
