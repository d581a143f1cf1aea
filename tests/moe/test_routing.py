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
    assert len(metrics["moe/load"]) == config.num_hidden_layers  # one heatmap row per layer
    for layer in range(config.num_hidden_layers):
        load = counts[layer] / counts[layer].sum()
        assert metrics["moe/load"][layer] == pytest.approx(load.tolist())
        assert metrics[f"moe_imbalance/layer{layer}"] == pytest.approx((load.max() / load.mean()).item())
        assert metrics[f"moe_entropy/layer{layer}"] == pytest.approx(entropy[layer].item() / tokens, rel=1e-5)
    assert 0 < metrics["moe_entropy/mean"] <= math.log(config.num_local_experts)
    assert metrics["moe_imbalance/mean"] >= 1.0
    assert metrics["moe/routed_tokens"] == tokens
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
        assert metrics["moe/load"][layer] == pytest.approx(load.tolist())
    assert metrics["moe/routed_tokens"] == keep.sum().item()


def test_tracker_counts_on_device_without_host_syncs(tiny_dir):
    """The hooks leave every accumulator a tensor (no .item() per forward); compute() reads them once."""
    model, _ = load_mixtral(tiny_dir, quantization="nf4", dtype=torch.float32)
    tracker = ExpertLoadTracker(model)
    ids = torch.randint(0, 32000, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(input_ids=ids)
    assert all(isinstance(t, torch.Tensor) for t in tracker._tokens.values())
    assert all(isinstance(t, torch.Tensor) for t in tracker._entropy_sum.values())
    assert tracker.compute()["moe/routed_tokens"] == ids.numel()


def test_train_only_and_paused_forwards_are_not_counted(tiny_dir):
    model, _ = load_mixtral(tiny_dir, quantization="nf4", dtype=torch.float32)
    tracker = ExpertLoadTracker(model, train_only=True)
    ids = torch.randint(0, 32000, (1, 5), generator=torch.Generator().manual_seed(4))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert tracker.compute() == {}  # an eval-mode forward (evaluation, generation) is not training load
    model.train()
    with torch.no_grad(), tracker.paused():
        model(input_ids=ids)
    assert tracker.compute() == {}
    with torch.no_grad():
        model(input_ids=ids)
    assert tracker.compute()["moe/routed_tokens"] == ids.numel()


def test_drift_is_the_fraction_of_probe_tokens_whose_top1_changed(tiny_dir):
    model, _ = load_mixtral(tiny_dir, quantization="nf4", dtype=torch.float32)
    tracker = ExpertLoadTracker(model)
    probe = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(8))
    assert tracker.drift(model, probe) == {}  # the first probe sets the baseline
    assert tracker.compute() == {}  # probes are not counted as load
    unchanged = tracker.drift(model, probe)
    assert unchanged["moe_drift/mean"] == 0.0
    routers = [m for m in model.modules() if type(m).__name__.endswith("Router")]
    with torch.no_grad():
        routers[0].weight.neg_()  # layer 0's top-1 becomes its former last choice for every token
    out = model(input_ids=probe, output_router_logits=True)
    top1 = out.router_logits[0].argmax(-1)
    with torch.no_grad():
        routers[0].weight.neg_()
    before = model(input_ids=probe, output_router_logits=True).router_logits[0].argmax(-1)
    with torch.no_grad():
        routers[0].weight.neg_()
    changed = tracker.drift(model, probe)
    assert changed["moe_drift/layer0"] == pytest.approx((top1 != before).double().mean().item())
    assert changed["moe_drift/layer0"] > 0.5
