"""The reference policy of DPO/KTO is a second adapter in the same model, experts included (TRL's "ref" copy)."""

from __future__ import annotations

import torch
from trl.trainer.utils import use_adapter

from finetune.moe import ExpertLoraLayer, apply_lora, load_mixtral

IDS = torch.randint(3, 32000, (2, 12), generator=torch.Generator().manual_seed(5))


def test_trl_reference_adapter_covers_the_experts_and_stays_frozen(tiny_dir, randomize_lora):
    base, _ = load_mixtral(tiny_dir, quantization="nf4", dtype=torch.float32)
    model = apply_lora(base, attention_targets=["q_proj", "v_proj"], r=4, alpha=8, dropout=0.0,
                       expert_targets=["gate_up_proj", "down_proj"], expert_r=2, expert_alpha=4,
                       train_router=True)  # fmt: skip
    randomize_lora(model, seed=3)  # stands for an SFT adapter we start DPO from
    model.eval()
    with torch.no_grad():
        initial = model(IDS).logits
        with model.disable_adapter():
            base_logits = model(IDS).logits

    # exactly what TRL's DPOTrainer/KTOTrainer do with a PEFT model and no ref_model
    model.add_adapter("ref", model.peft_config["default"])
    for name, param in model.named_parameters():
        if ".default." in name:
            model.get_parameter(name.replace(".default.", ".ref.")).data.copy_(param.data)
    experts = [m for m in model.modules() if isinstance(m, ExpertLoraLayer)]
    assert experts and all("ref" in m.lora_A for m in experts)
    assert all(m.r["ref"] == 2 for m in experts)  # the expert rank, not the attention rank

    with torch.no_grad():  # train the policy a little: only "default" moves
        for name, param in model.named_parameters():
            if ".default." in name and param.requires_grad:
                param.add_(0.05)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".ref." in n)
    with torch.no_grad():
        policy = model(IDS).logits
        with use_adapter(model, "ref"):
            reference = model(IDS).logits
            assert all(m.active_adapters == ["ref"] for m in experts)
        with use_adapter(model, None):
            disabled = model(IDS).logits
    assert torch.allclose(reference, initial, atol=1e-5)  # base + the starting adapter
    assert (policy - initial).abs().max() > 1e-3
    assert torch.allclose(disabled, base_logits, atol=1e-6)
    assert all(m.active_adapters == ["default"] for m in experts)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".ref." in n)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".default." in n)
