"""4-bit linears stay on bitsandbytes' standard layout on every CPU, so an evaluation never corrupts training.

On CPUs with AVX512-BF16, bitsandbytes repacks a `Linear4bit` weight in place on its first eval-mode forward without
grad; afterwards dequantisation is wrong and the training backward loses its input gradient. These tests run twice:
on this machine's own CPU path, and with bitsandbytes told the CPU has AVX512-BF16 (as it is on such machines), so
they fail without the guard on every machine, not only on the ones that have the instruction set.
"""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch

from finetune.moe import apply_lora, load_mixtral

IDS = torch.randint(0, 32000, (2, 12), generator=torch.Generator().manual_seed(7))


@pytest.fixture(params=["this-cpu", "avx512bf16-cpu"])
def cpu_kind(request, monkeypatch):
    if request.param == "avx512bf16-cpu":
        import bitsandbytes.nn.modules as bnb_modules

        monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    return request.param


def _four_bit_linears(model) -> list[bnb.nn.Linear4bit]:
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def _adapted(tiny_dir, quantization, randomize_lora):
    base, _ = load_mixtral(tiny_dir, quantization=quantization, dtype=torch.float32)
    torch.manual_seed(0)
    model = apply_lora(
        base, attention_targets=["q_proj", "k_proj", "v_proj", "o_proj"], r=4, alpha=8, dropout=0.0,
        expert_targets=["gate_up_proj", "down_proj"], expert_r=4, expert_alpha=8,
    )  # fmt: skip
    randomize_lora(model, seed=1)
    return model


@pytest.mark.parametrize("quantization", ["nf4", "fp4"])
def test_eval_forward_keeps_the_standard_layout(tiny_dir, cpu_kind, quantization, randomize_lora):
    model = _adapted(tiny_dir, quantization, randomize_lora)
    linears = _four_bit_linears(model)
    assert len(linears) == 2 * 4  # q/k/v/o in both layers
    before = [(m.weight.shape, bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state)) for m in linears]
    model.eval()
    with torch.no_grad():
        model(IDS)
    for module, (shape, weight) in zip(linears, before, strict=True):
        assert module.weight.shape == shape
        assert not getattr(module.weight.quant_state, "packing_format_for_cpu", False)
        assert torch.equal(bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state), weight)


def _train_step(model) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Train-mode logits, the gradient at the input embeddings, and every LoRA gradient of one step."""
    model.train()
    model.zero_grad()
    embeds = model.get_input_embeddings()(IDS).detach().requires_grad_()
    out = model(inputs_embeds=embeds, labels=IDS)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), embeds.grad, grads


@pytest.mark.parametrize("quantization", ["nf4", "fp4"])
def test_eval_then_train_equals_never_evaluated(tiny_dir, cpu_kind, quantization, randomize_lora, stock_from):
    fresh = _adapted(tiny_dir, quantization, randomize_lora)
    evaluated = _adapted(tiny_dir, quantization, randomize_lora)
    evaluated.eval()
    with torch.no_grad():
        eval_logits = evaluated(IDS).logits

    logits, input_grad, grads = _train_step(evaluated)
    ref_logits, ref_input_grad, ref_grads = _train_step(fresh)

    assert input_grad is not None, "no input gradient after an eval pass"
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(input_grad, ref_input_grad, rtol=0, atol=1e-7)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)

    # and the eval pass itself is the exact function: stock Mixtral with the dequantised weights, merged LoRA off
    with torch.no_grad(), evaluated.disable_adapter():
        evaluated.eval()
        base_logits = evaluated(IDS).logits
        stock_logits = stock_from(evaluated)(IDS).logits
    scale = stock_logits.abs().max().item()
    assert (base_logits - stock_logits).abs().max().item() / scale < 1e-5
    assert torch.isfinite(eval_logits).all()
