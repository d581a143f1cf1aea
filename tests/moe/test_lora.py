"""Expert LoRA: trainability, errors, and the acceptance test that stock PEFT loads our adapter and agrees."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from finetune.errors import UserError
from finetune.moe import ExpertLoraLayer, apply_lora, load_adapter, load_mixtral, lora_summary, save_adapter

RECIPE = dict(
    attention_targets=["q_proj", "v_proj"], r=4, alpha=8, dropout=0.1, expert_targets=["gate_up_proj", "down_proj"]
)

STOCK_PEFT = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    from peft import PeftModel
    from transformers import MixtralForCausalLM

    base_dir, adapter_dir, data = sys.argv[1:4]
    base = MixtralForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, adapter_dir).eval()
    ref = torch.load(data)
    with torch.no_grad():
        logits = model(ref["ids"]).logits
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    print(json.dumps({
        "diff": (logits - ref["logits"]).abs().max().item(),
        "warnings": [str(w.message) for w in caught],
        "lora_params": n_lora,
    }))
    """
)


def _stock_peft_logits(base_dir, adapter_dir, ids, logits, tmp_path) -> dict:
    data = tmp_path / "ref.pt"
    torch.save({"ids": ids, "logits": logits}, data)
    run = subprocess.run(
        [sys.executable, "-c", STOCK_PEFT, str(base_dir), str(adapter_dir), str(data)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _key_warnings(result: dict) -> list[str]:
    return [w for w in result["warnings"] if "missing" in w.lower() or "unexpected" in w.lower()]


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_stock_peft_loads_our_adapter_and_reproduces_logits(
    tiny_dir, tmp_path, stock_from, randomize_lora, quantization
):
    ours, _ = load_mixtral(tiny_dir, quantization=quantization, dtype=torch.float32)
    model = apply_lora(ours, **RECIPE, expert_r=2, expert_alpha=6, train_router=True)
    randomize_lora(model)
    model.eval()
    ids = torch.randint(0, 32000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    adapter = tmp_path / "adapter"
    save_adapter(model, adapter)

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert config["modules_to_save"] == ["mlp.gate"]
    # the experts' rank and alpha are the defaults, attention's are patterns (stock PEFT warns on expert keys)
    assert (config["r"], config["lora_alpha"]) == (2, 6)
    assert config["rank_pattern"] == {"q_proj": 4, "v_proj": 4}
    assert config["alpha_pattern"] == {"q_proj": 8, "v_proj": 8}
    assert config["lora_dropout"] == 0.0  # stock PEFT refuses target_parameters with dropout

    if quantization == "none":
        base_dir = tiny_dir
    else:  # the stock reference holds exactly the dequantised weights our 4-bit model computes with
        base_dir = tmp_path / "dequantized"
        stock_from(model).save_pretrained(base_dir)
    result = _stock_peft_logits(base_dir, adapter, ids, logits, tmp_path)
    assert not _key_warnings(result), result["warnings"]
    ours_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert result["lora_params"] == ours_lora
    assert result["diff"] < 1e-5 if quantization == "none" else result["diff"] < 1e-4, result


def test_expert_only_adapter_round_trips_through_load_adapter(tiny_dir, tmp_path, randomize_lora):
    ours, _ = load_mixtral(tiny_dir, quantization="nf4", dtype=torch.float32)
    model = apply_lora(ours, attention_targets=[], r=4, alpha=8, dropout=0.0, expert_targets=["down_proj"],
                       expert_r=3, expert_alpha=3, use_rslora=True)  # fmt: skip
    randomize_lora(model)
    ids = torch.randint(0, 32000, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(ids).logits
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_modules"] == [] and config["target_parameters"] == ["mlp.experts.down_proj"]

    again, _ = load_mixtral(tiny_dir, quantization="nf4", dtype=torch.float32)
    loaded = load_adapter(again, tmp_path / "a")
    layer = next(m for m in loaded.modules() if isinstance(m, ExpertLoraLayer))
    assert layer.scaling["default"] == pytest.approx(3 / 3**0.5)  # rsLoRA
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
    trainable = load_adapter(load_mixtral(tiny_dir, quantization="nf4", dtype=torch.float32)[0], tmp_path / "a",
                             is_trainable=True)  # fmt: skip
    assert any(p.requires_grad for p in trainable.parameters())


def test_only_lora_and_router_are_trainable(tiny_dir):
    ours, _ = load_mixtral(tiny_dir, quantization="nf4", dtype=torch.float32)
    model = apply_lora(ours, **RECIPE, expert_r=4, expert_alpha=8, train_router=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n or "mlp.gate.modules_to_save" in n for n in trainable)
    assert sum("experts" in n for n in trainable) == 2 * 2 * 2  # layers x projections x (A, B)
    assert sum("modules_to_save" in n for n in trainable) == 2
    lines = lora_summary(model)
    assert any("expert LoRA gate_up_proj: 2 layers x 8 experts" in line for line in lines), lines
    assert any("attention LoRA q_proj: 2 modules" in line for line in lines), lines


def test_disable_adapter_gives_the_base_model(tiny_dir, randomize_lora):
    ours, _ = load_mixtral(tiny_dir, quantization="nf4", dtype=torch.float32)
    ids = torch.randint(0, 32000, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = ours(ids).logits
    model = apply_lora(ours, **RECIPE, expert_r=2, expert_alpha=4)
    randomize_lora(model)
    with torch.no_grad():
        adapted = model(ids).logits
        with model.disable_adapter():
            disabled = model(ids).logits
    assert (adapted - base).abs().max() > 1e-3
    assert torch.equal(disabled, base)


def test_training_step_updates_lora_and_keeps_base_frozen(tiny_dir):
    ours, _ = load_mixtral(tiny_dir, quantization="nf4", dtype=torch.float32)
    model = apply_lora(ours, **RECIPE, expert_r=4, expert_alpha=8)
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "experts" in n and not p.requires_grad}
    assert frozen
    attn_before = {n: p.detach().clone() for n, p in model.named_parameters() if "q_proj.base_layer" in n}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 32000, (2, 16), generator=torch.Generator().manual_seed(4))
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    assert out.aux_loss is not None and torch.isfinite(out.aux_loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "experts" in n and "lora_B" in n)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "q_proj" in n and "lora_B" in n)  # through Linear4bit
    optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(torch.equal(p, attn_before[n]) for n, p in model.named_parameters() if n in attn_before)
    assert any(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if n in lora_before)


def test_targets_that_match_nothing_are_user_errors(tiny_dir):
    ours, _ = load_mixtral(tiny_dir, quantization="none", dtype=torch.float32)
    with pytest.raises(UserError, match="qkv_proj"):
        apply_lora(ours, **{**RECIPE, "attention_targets": ["q_proj", "qkv_proj"]}, expert_r=2, expert_alpha=2)
    with pytest.raises(UserError, match="w13"):
        apply_lora(ours, **{**RECIPE, "expert_targets": ["w13"]}, expert_r=2, expert_alpha=2)
    with pytest.raises(UserError, match="at least one target"):
        apply_lora(ours, **{**RECIPE, "attention_targets": [], "expert_targets": []}, expert_r=2, expert_alpha=2)


def test_attention_only_lora_on_stock_model_needs_no_quantized_experts(tiny_dir):
    from transformers import MixtralForCausalLM

    stock = MixtralForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    model = apply_lora(stock, **{**RECIPE, "expert_targets": []}, expert_r=2, expert_alpha=2)
    assert not any(isinstance(m, ExpertLoraLayer) for m in model.modules())
    with pytest.raises(UserError, match="QuantizedExperts"):
        apply_lora(MixtralForCausalLM.from_pretrained(tiny_dir), **RECIPE, expert_r=2, expert_alpha=2)
