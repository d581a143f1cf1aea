"""ExpertLoadTracker against a manual count from the router logits that transformers returns."""

from __future__ import annotations

import math

import pytest
import torch

from finetune.moe import ExpertLoadTracker, apply_lora, load_mixtral


@pytest.mark.parametrize("trainable_router", [False, True])
def test_tracker_counts_equal_manual_count_from_router_outputs(tiny_dir, trainable_router):
    model, _ = load_mixtral(tiny_dir, quantization="nf4", dtype=torch.float32)
    if trainable_router:  # the router then lives inside a PEFT ModulesToSaveWrapper
        model = apply_lora(model, attention_targets=["q_proj"], r=2, alpha=2, dropout=0.0, expert_targets=[],
                           expert_r=2, expert_alpha=2, train_router=True)  # fmt: skip
    tracker = ExpertLoadTracker(model)
    config = model.config
    batches = [torch.randint(0, 32000, (2, 11), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    counts = torch.zeros(config.num_hidden_layers, config.num_local_experts)
    entropy = torch.zeros(config.num_hidden_layers)
    tokens = 0
    with torch.no_grad():
        for ids in batches:
            out = model(input_ids=ids, output_router_logits=True)
            tokens += ids.numel()
            for layer, logits in enumerate(out.router_logits):
                probs = logits.float().softmax(-1)
                top = probs.topk(config.num_experts_per_tok, dim=-1).indices
                counts[layer] += torch.bincount(top.reshape(-1), minlength=config.num_local_experts).float()
                entropy[layer] += -(probs * probs.log()).sum()
    metrics = tracker.compute()
    assert counts.sum() == tokens * config.num_experts_per_tok * config.num_hidden_layers
    for layer in range(config.num_hidden_layers):
        load = counts[layer] / counts[layer].sum()
        for expert in range(config.num_local_experts):
            assert metrics[f"moe/layer{layer}/expert{expert}_load"] == pytest.approx(load[expert].item())
        assert metrics[f"moe/layer{layer}/imbalance"] == pytest.approx((load.max() / load.mean()).item())
        assert metrics[f"moe/layer{layer}/router_entropy"] == pytest.approx(entropy[layer].item() / tokens, rel=1e-5)
    assert 0 < metrics["moe/router_entropy_mean"] <= math.log(config.num_local_experts)
    assert metrics["moe/imbalance_mean"] >= 1.0
    assert tracker.compute() == {}  # reset after compute
    tracker.remove()
    with torch.no_grad():
        model(input_ids=batches[0])
    assert tracker.compute() == {}


def test_tracker_does_not_recount_during_backward_recompute(tiny_dir):
    model, _ = load_mixtral(tiny_dir, quantization="nf4", dtype=torch.float32)
    model = apply_lora(model, attention_targets=["q_proj"], r=2, alpha=2, dropout=0.0, expert_targets=["down_proj"],
                       expert_r=2, expert_alpha=2)  # fmt: skip
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    tracker = ExpertLoadTracker(model)
    ids = torch.randint(0, 32000, (1, 7), generator=torch.Generator().manual_seed(5))
    model(input_ids=ids, labels=ids).loss.backward()
    total = sum(t.sum().item() for t in tracker._counts.values())
    assert total == ids.numel() * model.config.num_experts_per_tok * model.config.num_hidden_layers


def test_tracker_leaves_padding_out(tiny_dir):
    model, _ = load_mixtral(tiny_dir, quantization="nf4", dtype=torch.float32)
    tracker = ExpertLoadTracker(model)
    ids = torch.randint(1, 32000, (2, 9), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # the second row is 5 real tokens + 4 padding
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    metrics = tracker.compute()
    keep = mask.reshape(-1).bool()
    k, experts = model.config.num_experts_per_tok, model.config.num_local_experts
    for layer, logits in enumerate(out.router_logits):
        top = logits.float().softmax(-1).topk(k, dim=-1).indices[keep]
        load = torch.bincount(top.reshape(-1), minlength=experts).double() / (keep.sum() * k)
        for expert in range(experts):
            assert metrics[f"moe/layer{layer}/expert{expert}_load"] == pytest.approx(load[expert].item())
