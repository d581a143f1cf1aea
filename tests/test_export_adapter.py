"""`finetune export-adapter --layout per-expert`: stock PEFT on stock Mixtral gives the same logits as the original."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import MixtralForCausalLM
from typer.testing import CliRunner

from finetune.cli import app
from finetune.export.adapters import export_per_expert
from finetune.moe import apply_lora, load_mixtral, save_adapter

runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory, randomize_lora):
    """A run folder whose adapter has attention LoRA (r=4), expert LoRA (r=2, rsLoRA) and a trained router."""
    run = tmp_path_factory.mktemp("run")
    base, _ = load_mixtral(tiny_model_dir, quantization="none", dtype=torch.float32)
    model = apply_lora(base, attention_targets=["q_proj", "v_proj"], r=4, alpha=8, dropout=0.0,
                       expert_targets=["gate_up_proj", "down_proj"], expert_r=2, expert_alpha=6, train_router=True,
                       use_rslora=True)  # fmt: skip
    randomize_lora(model, seed=1)
    save_adapter(model, run / "adapter")
    return run


def stock_logits(model_dir, adapter_dir, ids) -> tuple[torch.Tensor, list[str], int]:
    """Logits of stock PEFT on stock transformers, the load warnings, and the number of LoRA parameters."""
    base = MixtralForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        logits = model(ids).logits
    key_warnings = [str(w.message) for w in caught if "missing" in str(w.message) or "unexpected" in str(w.message)]
    return logits, key_warnings, sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def test_per_expert_adapter_gives_stock_peft_the_same_logits(tiny_model_dir, run_dir, tmp_path):
    out = tmp_path / "per-expert"
    summary = export_per_expert(run_dir, out)
    assert (summary.layers, summary.experts, summary.expert_rank, summary.router) == (2, 8, 2, True)

    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj", "w1", "w2", "w3"]
    assert not config["target_parameters"] and not config["use_rslora"]
    assert config["modules_to_save"] == ["mlp.gate"]
    tensors = load_file(str(out / "adapter_model.safetensors"))
    fused = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.1.block_sparse_moe.experts.5"
    assert tensors[f"{prefix}.w1.lora_A.weight"].shape == (2, 64)  # [r, hidden]
    assert tensors[f"{prefix}.w1.lora_B.weight"].shape == (128, 2)  # [ffn, r]
    assert tensors[f"{prefix}.w2.lora_A.weight"].shape == (2, 128)
    assert tensors[f"{prefix}.w2.lora_B.weight"].shape == (64, 2)
    assert not any(".mlp.experts." in k for k in tensors)
    router = "base_model.model.model.layers.0.mlp.gate.weight"
    assert torch.equal(tensors[router], fused[router])  # router and attention LoRA copy across unchanged
    attention = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    assert torch.equal(tensors[attention], fused[attention])

    ids = torch.randint(0, 32000, (2, 11), generator=torch.Generator().manual_seed(4))
    original, original_warnings, _ = stock_logits(tiny_model_dir, run_dir / "adapter", ids)
    exported, exported_warnings, n_lora = stock_logits(tiny_model_dir, out, ids)
    assert not original_warnings and not exported_warnings, original_warnings + exported_warnings
    assert n_lora > 0
    base = MixtralForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (base(ids).logits - original).abs().max() > 1e-2  # the adapter matters, so agreement means something
    assert (exported - original).abs().max() < 1e-5


def test_cli_refuses_run_without_adapter_and_existing_output(run_dir, tmp_path):
    empty = tmp_path / "unfinished-run"
    empty.mkdir()
    out = tmp_path / "out"
    result = runner.invoke(app, ["export-adapter", str(empty), "-o", str(out)])
    assert result.exit_code == 2 and "holds no adapter" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["export-adapter", str(run_dir), "-o", str(out)])
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]

    result = runner.invoke(app, ["export-adapter", str(run_dir), "-o", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert "w1/w3/w2" in result.stdout and "vLLM refuses modules_to_save" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "unfinished-run"]  # no temp folder left beside

    result = runner.invoke(app, ["export-adapter", str(run_dir), "-o", str(out), "--layout", "fused", "--overwrite"])
    assert result.exit_code == 2 and "--layout" in result.stderr
    for inside in (run_dir / "adapter" / "x", run_dir):
        result = runner.invoke(app, ["export-adapter", str(run_dir), "-o", str(inside), "--overwrite"])
        assert result.exit_code == 2 and "being exported" in result.stderr
    assert sorted(p.name for p in (run_dir / "adapter").iterdir()) == sorted(p.name for p in out.iterdir())
