"""`finetune export-adapter` says only what it copied: attention LoRA, and the router only when it was trained."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from finetune.cli import app
from finetune.moe import apply_lora, load_mixtral, save_adapter

runner = CliRunner()


def adapter_run(tmp_path, model_dir, *, train_router: bool):
    run = tmp_path / ("router" if train_router else "frozen")
    base, _ = load_mixtral(model_dir, quantization="none", dtype=torch.float32)
    model = apply_lora(base, attention_targets=["q_proj", "v_proj"], r=4, alpha=8, dropout=0.0,
                       expert_targets=["gate_up_proj", "down_proj"], expert_r=2, expert_alpha=4,
                       train_router=train_router)  # fmt: skip
    save_adapter(model, run / "adapter")
    return run


@pytest.mark.parametrize("train_router", [False, True], ids=["router-frozen", "router-trained"])
def test_export_summary_names_only_what_was_copied(tmp_path, tiny_model_dir, train_router):
    run = adapter_run(tmp_path, tiny_model_dir, train_router=train_router)
    result = runner.invoke(app, ["export-adapter", str(run), "-o", str(tmp_path / "out"), "--layout", "per-expert"])
    assert result.exit_code == 0, result.output
    copied = next(line for line in result.output.splitlines() if line.startswith("copied unchanged: "))
    # 2 layers x q/v x lora_A/B; the router is one weight per layer
    if train_router:
        assert copied == "copied unchanged: 8 attention LoRA tensors, 2 router tensors (trained, modules_to_save)"
    else:
        assert copied == "copied unchanged: 8 attention LoRA tensors"
