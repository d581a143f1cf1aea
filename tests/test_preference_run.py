"""DPO and KTO end to end on the tiny Mixtral: learning shows in metrics, the aux loss is on, one base model in memory,
the reference is base + the starting adapter, and the adapter loads in stock PEFT."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from finetune.moe import QuantizedExperts, apply_lora, load_adapter, load_mixtral, save_adapter
from finetune.recipe.schema import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finetune.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=1200
    )


def run_recipe(name: str, out: Path, model_dir: Path, *settings: str) -> subprocess.CompletedProcess:
    base = [f"model.path={model_dir}", f"output_dir={out}", *settings]
    return cli("run", str(ROOT / "recipes" / name), *[a for s in base for a in ("--set", s)])


def logged(out: Path, key: str) -> list[float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [line[key] for line in lines if key in line]


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_model_dir) -> Path:
    out = tmp_path_factory.mktemp("dpo") / "out"
    result = run_recipe(
        "tiny-mixtral-dpo.yaml", out, tiny_model_dir, "training.max_steps=16", "training.logging_steps=2"
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def test_dpo_learns_the_preference(dpo_run):
    metrics = json.loads((dpo_run / "metrics.json").read_text())
    assert metrics["method"] == "dpo"
    accuracies, margins = logged(dpo_run, "rewards/accuracies"), logged(dpo_run, "rewards/margins")
    assert len(margins) >= 6
    # the final figures, not a single step: the last three logging steps prefer the chosen answers
    assert sum(accuracies[-3:]) / 3 > 0.5, accuracies
    assert sum(margins[-3:]) / 3 > sum(margins[:3]) / 3, margins
    assert metrics["rewards/accuracies"] == accuracies[-1]
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert metrics.get(key) is not None, key
    assert metrics.get("eval_rewards/accuracies") is not None


@pytest.mark.parametrize("key", ["aux_loss"])
def test_dpo_keeps_the_router_aux_loss(dpo_run, key):
    values = logged(dpo_run, key)
    assert values and all(v > 0 for v in values)
    assert json.loads((dpo_run / "metrics.json").read_text())["aux_loss"] == values[-1]


def test_dpo_adapter_loads_in_stock_peft_without_key_warnings(dpo_run, tiny_model_dir):
    script = (
        "import sys, warnings, torch\n"
        "from peft import PeftModel\n"
        "from transformers import MixtralForCausalLM\n"
        "base = MixtralForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    model = PeftModel.from_pretrained(base, sys.argv[2])\n"
        "bad = [str(w.message) for w in caught if 'missing' in str(w.message).lower() or 'unexpected' in str(w.message).lower()]\n"
        "print('BAD' if bad else 'OK', bad)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tiny_model_dir), str(dpo_run / "adapter")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("OK"), result.stdout


def test_kto_trains_with_aux_loss_and_rewards(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    result = run_recipe(
        "tiny-mixtral-kto.yaml", out, tiny_model_dir, "training.max_steps=6", "training.logging_steps=2"
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "kto" and metrics["steps"] == 6
    assert logged(out, "aux_loss") and all(v > 0 for v in logged(out, "aux_loss"))
    assert any(key.startswith("rewards/") for key in metrics), sorted(metrics)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def _completion_logp(model, prompt: list[int], completion: list[int]) -> float:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits.float()
    logps = torch.log_softmax(logits[0, :-1], dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return logps[len(prompt) - 1 :].sum().item()


def test_dpo_from_an_sft_adapter_one_base_model_and_its_reference(tmp_path, tiny_model_dir, randomize_lora):
    """Start from an SFT adapter: the trainable copy starts equal to it, the reference log-probs are those of
    base + SFT adapter, and the process holds one model's quantised experts throughout."""
    import finetune.train.methods.dpo as dpo_module
    import finetune.train.run as train_mod

    sft = tmp_path / "sft-adapter"
    base, _ = load_mixtral(tiny_model_dir, quantization="nf4", dtype=torch.float32)
    model = apply_lora(base, attention_targets=["q_proj", "v_proj"], r=4, alpha=8, dropout=0.0,
                       expert_targets=["gate_up_proj", "down_proj"], expert_r=2, expert_alpha=4)  # fmt: skip
    randomize_lora(model, seed=9)
    save_adapter(model, sft)
    sft_weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    del model, base
    gc.collect()

    seen: dict = {}

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["experts"] = sum(isinstance(o, QuantizedExperts) for o in gc.get_objects())
            seen["start"] = {n.replace(".default.", "."): p.detach().clone()
                             for n, p in model.named_parameters() if ".default." in n}  # fmt: skip

        def on_step_end(self, args, state, control, **kwargs):
            seen["experts_in_training"] = sum(isinstance(o, QuantizedExperts) for o in gc.get_objects())

    real_build = dpo_module.build_trainer

    def build_with_spy(*args, **kwargs):
        trainer = real_build(*args, **kwargs)
        trainer.add_callback(Spy())
        seen["trainer"] = trainer
        return trainer

    recipe = load_recipe(
        ROOT / "recipes" / "tiny-mixtral-dpo.yaml",
        [f"model.path={tiny_model_dir}", f"output_dir={tmp_path / 'out'}", "training.max_steps=2",
         "data.eval_fraction=0", f"dpo.init_adapter={sft}", "dpo.precompute_ref_log_probs=true"],
    )  # fmt: skip
    dpo_module.build_trainer = build_with_spy
    try:
        train_mod.run(recipe)
    finally:
        dpo_module.build_trainer = real_build

    layers = 2
    assert seen["experts"] == layers and seen["experts_in_training"] == layers  # one base model, never a copy
    start = {n.replace("base_model.model.", ""): t for n, t in seen["start"].items()}
    expected = {n.replace("base_model.model.", "").replace(".default.", "."): t for n, t in sft_weights.items()}
    assert start.keys() == expected.keys()
    # the trainable copy starts as the SFT adapter, in the bf16 TRL stores QLoRA adapters in (the reference
    # copy is taken before that cast, so it is the SFT adapter exactly: checked through the log-probs below)
    assert all(torch.equal(start[n], expected[n].to(start[n].dtype)) for n in start)

    row = seen["trainer"].train_dataset[0]
    fresh, _ = load_mixtral(tiny_model_dir, quantization="nf4", dtype=torch.float32)
    reference = load_adapter(fresh, sft).eval()
    for side in ("chosen", "rejected"):
        ours = _completion_logp(reference, row["prompt_ids"], row[f"{side}_ids"])
        assert abs(row[f"ref_{side}_logps"] - ours) < 1e-3 * max(1.0, abs(ours)), (side, row[f"ref_{side}_logps"], ours)
