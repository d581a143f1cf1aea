"""QuantizedExperts against stock Mixtral (forward) and a dense autograd reference (expert LoRA gradients)."""

from __future__ import annotations

import weakref

import pytest
import torch

from finetune.moe import QuantizedExperts, load_mixtral
from finetune.moe.quantized import ExpertLoraFactors


@pytest.mark.parametrize("quantization", ["none", "nf4", "fp4", "int8"])
def test_forward_matches_stock_mixtral_with_dequantized_weights(tiny_dir, stock_from, quantization):
    ours, report = load_mixtral(tiny_dir, quantization=quantization, dtype=torch.float32)
    stock = stock_from(ours)
    ids = torch.randint(0, 32000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = stock(ids).logits
        diff = (ours(ids).logits - reference).abs().max().item() / reference.abs().max().item()
    # int8 attention runs bitsandbytes' LLM.int8 matmul (activations quantised too), so only int8 is approximate
    tolerance = {"none": 1e-6, "nf4": 1e-5, "fp4": 1e-5, "int8": 2e-2}[quantization]
    assert diff < tolerance, f"{quantization}: max |logit diff| / max |logit| = {diff}"
    assert report.quantization == quantization
    assert (report.quantized_fraction > 0) == (quantization != "none")


def test_none_forward_equals_stock_from_pretrained(tiny_dir):
    from transformers import MixtralForCausalLM

    ours, _ = load_mixtral(tiny_dir, quantization="none", dtype=torch.float32)
    stock = MixtralForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 32000, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids).logits - stock(ids).logits).abs().max().item() < 1e-5


def _random_experts(quantization: str, seed: int = 0, e: int = 4, h: int = 32, f: int = 48) -> QuantizedExperts:
    g = torch.Generator().manual_seed(seed)
    module = QuantizedExperts(e, h, f, quantization=quantization, dtype=torch.float32)
    module.load_stacked("gate_up_proj", torch.randn(e, 2 * f, h, generator=g) * 0.1)
    module.load_stacked("down_proj", torch.randn(e, h, f, generator=g) * 0.1)
    return module


@pytest.mark.parametrize("quantization", ["nf4", "int8", "none"])
def test_expert_lora_gradients_match_dense_reference(quantization):
    e, h, f, r, k, t = 4, 32, 48, 3, 2, 10
    experts = _random_experts(quantization, e=e, h=h, f=f)
    g = torch.Generator().manual_seed(1)
    lora = {
        "gate_up_proj": (torch.randn(e * r, h, generator=g) * 0.1, torch.randn(2 * f, r * e, generator=g) * 0.1, 1.5),
        "down_proj": (torch.randn(e * r, f, generator=g) * 0.1, torch.randn(h, r * e, generator=g) * 0.1, 0.7),
    }
    x0 = torch.randn(t, h, generator=g)
    index = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    weights0 = torch.rand(t, k, generator=g)

    def leaves():
        params = {p: (a.clone().requires_grad_(), b.clone().requires_grad_(), s) for p, (a, b, s) in lora.items()}
        return x0.clone().requires_grad_(), weights0.clone().requires_grad_(), params

    # ours
    x, w, params = leaves()
    factors = {p: ExpertLoraFactors(a, b, s, e) for p, (a, b, s) in params.items()}
    out = experts(x, index, w, expert_lora=factors)
    upstream = torch.randn(out.shape, generator=g)
    (out * upstream).sum().backward()
    ours = [x.grad, w.grad] + [t.grad for p in params.values() for t in p[:2]]

    # dense reference: dequantised stack + explicit B_e @ A_e delta, plain per-token loop
    x, w, params = leaves()
    dense = {}
    for proj, (a, b, s) in params.items():
        a3 = a.reshape(e, r, -1)
        b3 = b.reshape(b.shape[0], r, e).permute(2, 0, 1)
        dense[proj] = experts.dequantized_stack(proj, torch.float32) + s * b3 @ a3
    rows = []
    for i in range(t):
        acc = torch.zeros(h)
        for j in range(k):
            ex = index[i, j]
            gate, up = (dense["gate_up_proj"][ex] @ x[i]).chunk(2)
            acc = acc + w[i, j] * (dense["down_proj"][ex] @ (torch.nn.functional.silu(gate) * up))
        rows.append(acc)
    ref_out = torch.stack(rows)
    (ref_out * upstream).sum().backward()
    reference = [x.grad, w.grad] + [t.grad for p in params.values() for t in p[:2]]

    assert (out - ref_out).abs().max().item() < 1e-5
    for name, a, b in zip(["x", "weights", "A_gu", "B_gu", "A_down", "B_down"], ours, reference, strict=True):
        assert b.abs().max() > 0, name
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), f"{name}: max diff {(a - b).abs().max()}"


def test_only_routed_experts_run_and_one_expert_is_dequantised_at_a_time():
    """Counting hook on dequantise (deterministic, unlike CPU RSS): forward and backward each dequantise every routed
    expert's two projections once, and at most one projection is alive at any moment (never the layer stack)."""
    e, h, f = 8, 64, 96
    experts = _random_experts("nf4", e=e, h=h, f=f)
    live, stats = set(), {"calls": 0, "max_live_bytes": 0}
    original = experts.dequantize

    def counting(proj, expert, dtype=None):
        weight = original(proj, expert, dtype)
        stats["calls"] += 1
        key = id(weight)
        live.add((key, weight.numel() * weight.element_size()))
        weakref.finalize(weight, live.discard, (key, weight.numel() * weight.element_size()))
        stats["max_live_bytes"] = max(stats["max_live_bytes"], sum(b for _, b in live))
        return weight

    experts.dequantize = counting
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, h, generator=g, requires_grad=True)
    index = torch.tensor([[0, 2]] * 6 + [[2, 5]] * 6)  # experts 0, 2, 5 routed; 5 others idle
    out = experts(x, index, torch.full((12, 2), 0.5))
    assert stats["calls"] == 2 * 3
    out.sum().backward()
    assert stats["calls"] == 4 * 3
    one_expert_bytes = max(r * c for r, c in experts.shapes.values()) * 4
    stack_bytes = e * sum(r * c for r, c in experts.shapes.values()) * 4
    assert 0 < stats["max_live_bytes"] <= one_expert_bytes < stack_bytes / 8
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_storage_moves_and_rebuilds_quant_state():
    experts = _random_experts("nf4")
    before = experts.dequantize("down_proj", 1)
    clone = QuantizedExperts(4, 32, 48, quantization="nf4", dtype=torch.float32)
    clone.load_state_dict(experts.state_dict())
    assert torch.equal(clone.dequantize("down_proj", 1), before)
    assert clone.is_complete()
    names = dict(experts.named_parameters())
    assert names["gate_up_proj_data"].dtype == torch.uint8 and names["gate_up_proj_data"].shape == (4, 48 * 32)
    # frozen integer parameters: FSDP2 shards them, mixed precision and `.to(dtype)` never cast them
    assert not any(p.requires_grad or p.is_floating_point() for p in experts.parameters())
    assert not list(experts.buffers())
    experts.to(torch.bfloat16)
    assert torch.equal(experts.dequantize("down_proj", 1), before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input_gradient_matches_float32(dtype):
    """The CPU half-precision backward takes a transposed-copy path; it must compute the same gradient."""
    experts = _random_experts("nf4", e=2, h=64, f=96)
    g = torch.Generator().manual_seed(3)
    x32 = torch.randn(5, 64, generator=g)
    index = torch.zeros(5, 1, dtype=torch.long)
    weights = torch.ones(5, 1)
    grads = {}
    for name, dt in (("half", dtype), ("fp32", torch.float32)):
        x = x32.to(dt).requires_grad_()
        experts(x, index, weights.to(dt)).float().sum().backward()
        grads[name] = x.grad.float()
    rel = (grads["half"] - grads["fp32"]).norm() / grads["fp32"].norm()
    assert rel < 2e-2, rel
