"""Stock PEFT loads every adapter kind we write with no warning, and gives the ranks and scalings the recipe asked for.

Kinds: an SFT run's adapter, a DPO run's adapter with a trained router (modules_to_save), and the per-expert export
(`finetune export-adapter`) of each. Loaded by `PeftModel.from_pretrained` onto stock `MixtralForCausalLM` in a fresh
interpreter that never imports finetune, under `warnings.simplefilter("error")` with no exception (PEFT 0.21 warned
falsely about the per-expert layout's fused key and read a deprecated transformers property; 0.22 does neither).
Our own readers (load_adapter, merge, export-adapter) still read configs written before the expert rank moved.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from finetune.cli import app
from finetune.export.adapters import per_expert_config
from finetune.export.lora_deltas import read_adapter
from finetune.moe import ExpertLoraLayer, load_adapter, load_mixtral

ROOT = Path(__file__).resolve().parents[1]

STOCK = textwrap.dedent(
    r"""
    import json, sys, warnings
    import torch
    from peft import PeftModel
    from transformers import MixtralForCausalLM

    base_dir, jobs = sys.argv[1], json.loads(sys.argv[2])
    out = {}
    for name, adapter_dir, per_expert in jobs:
        base = MixtralForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                model = PeftModel.from_pretrained(base, adapter_dir)
            except Exception as e:
                out[name] = {"error": f"{type(e).__name__}: {e}"}
                continue
        layers = {}
        for module_name, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "r", {}):
                key = module_name.removeprefix("base_model.model.").replace(".base_layer", "")
                key += "." + module.parameter_name if hasattr(module, "parameter_name") else ""
                layers[key] = [module.r["default"], module.scaling["default"]]
        saved = [n for n, _ in model.named_modules() if n.endswith("mlp.gate.modules_to_save.default")]
        out[name] = {"error": None, "layers": layers, "router_modules": len(saved)}
    out["finetune_imported"] = any(m == "finetune" or m.startswith("finetune.") for m in sys.modules)
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def dpo_router_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A short DPO run that trains the router, with an expert scale (24/8) unlike attention's (32/16)."""
    out = tmp_path_factory.mktemp("dpo-router") / "out"
    settings = [f"model.path={tiny_model_dir}", f"output_dir={out}", "training.max_steps=2", "training.batch_size=2",
                "training.logging_steps=1", "data.eval_fraction=0", "tracking.sample_prompts=0",
                "lora.router=trainable", "lora.expert_alpha=24"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "finetune", "run", str(ROOT / "recipes" / "tiny-mixtral-dpo.yaml"),
         *[a for s in settings for a in ("--set", s)]],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def expected(run_dir: Path, per_expert: bool) -> tuple[dict[str, tuple[int, float]], int]:
    """From the run's own resolved recipe: (rank, scaling) per adapted module name suffix, and router modules."""
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    lora = recipe["lora"]
    assert not lora["use_rslora"]
    r, alpha = lora["r"], lora["alpha"]
    er, ea = lora["expert_r"] or r, lora["expert_alpha"] or alpha
    want = {f"self_attn.{t}": (r, alpha / r) for t in lora["attention_targets"]}
    for proj in lora["expert_targets"]:  # the per-expert layout comes back fused: w1+w3 at twice the rank, same scale
        rank = 2 * er if per_expert and proj == "gate_up_proj" else er
        want[f"mlp.experts.{proj}"] = (rank, ea / er)
    return want, (2 if lora["router"] == "trainable" else 0)  # the tiny model has 2 layers


def test_stock_peft_loads_every_adapter_kind_without_warnings(single_process_run, dpo_router_run, tiny_model_dir,
                                                              tmp_path):  # fmt: skip
    runs = {"sft": single_process_run, "dpo-router": dpo_router_run}
    jobs = []
    for name, run_dir in runs.items():
        jobs.append((name, str(run_dir / "adapter"), False))
        exported = tmp_path / f"{name}-per-expert"
        result = CliRunner().invoke(app, ["export-adapter", str(run_dir), "-o", str(exported)])
        assert result.exit_code == 0, result.output
        jobs.append((f"{name}-per-expert", str(exported), True))
    result = subprocess.run(
        [sys.executable, "-c", STOCK, str(tiny_model_dir), json.dumps(jobs)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded.pop("finetune_imported") is False
    assert "did not match" not in result.stderr, result.stderr[-3000:]
    for name, _, per_expert in jobs:
        got = loaded[name]
        assert got["error"] is None, f"{name}: {got['error']}"
        want, router = expected(runs[name.removesuffix("-per-expert")], per_expert)
        for suffix, (rank, scaling) in want.items():
            matches = [v for k, v in got["layers"].items() if k.endswith(suffix)]
            assert len(matches) == 2, (name, suffix, sorted(got["layers"]))  # one per layer
            for r, s in matches:
                assert (r, s) == (rank, pytest.approx(scaling)), (name, suffix, r, s)
        assert len(got["layers"]) == 2 * len(want), (name, sorted(got["layers"]))
        assert got["router_modules"] == router, name


def old_form(config: dict) -> dict:
    """The adapter_config.json as written before: attention's r/alpha as defaults, the experts' as pattern keys."""
    old = dict(config)
    ranks, alphas = dict(config["rank_pattern"]), dict(config["alpha_pattern"])
    attention = sorted(config["target_modules"])
    old["r"], old["lora_alpha"] = ranks[attention[0]], alphas[attention[0]]
    old["rank_pattern"] = {p: config["r"] for p in config["target_parameters"]}
    old["alpha_pattern"] = {p: config["lora_alpha"] for p in config["target_parameters"]}
    return old


def test_our_readers_take_the_old_and_the_new_config_alike(dpo_router_run, tiny_model_dir, tmp_path):
    new = dpo_router_run / "adapter"
    config = json.loads((new / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 24  # the experts' (recipe expert_r, expert_alpha)
    assert not any(k.startswith("mlp.experts.") for k in [*config["rank_pattern"], *config["alpha_pattern"]])
    old = tmp_path / "old"
    shutil.copytree(new, old)
    (old / "adapter_config.json").write_text(json.dumps(old_form(config)))

    def layers(adapter: Path) -> dict[str, tuple[int, float]]:
        base, _ = load_mixtral(tiny_model_dir, quantization="nf4", dtype=torch.float32)
        model = load_adapter(base, adapter)
        out = {}
        for name, module in model.named_modules():
            if isinstance(module, ExpertLoraLayer):
                out[f"{name}:{module.parameter_name}"] = (module.r["default"], module.scaling["default"])
            elif hasattr(module, "lora_A") and "default" in getattr(module, "r", {}):
                out[name] = (module.r["default"], module.scaling["default"])
        return out

    ours_new, ours_old = layers(new), layers(old)
    assert ours_new == ours_old
    assert {v for k, v in ours_new.items() if ":" in k} == {(8, 3.0)}  # experts
    assert {v for k, v in ours_new.items() if "self_attn" in k} == {(16, 2.0)}  # attention

    merge_new, merge_old = read_adapter(new, num_experts=8), read_adapter(old, num_experts=8)
    assert {k: d.scaling for k, d in merge_new.experts.items()} == {k: d.scaling for k, d in merge_old.experts.items()}
    assert {k: d.scaling for k, d in merge_new.linear.items()} == {k: d.scaling for k, d in merge_old.linear.items()}
    assert set(d.scaling for d in merge_new.experts.values()) == {3.0}

    exported_new, exported_old = per_expert_config(config, new), per_expert_config(old_form(config), old)
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules"):
        assert exported_new[key] == exported_old[key], key
