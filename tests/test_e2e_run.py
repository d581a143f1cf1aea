"""End to end: `finetune run` on the tiny recipe, through the CLI, and the training contract in process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from finetune.model.tiny import TinySpec
from finetune.recipe.schema import load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny-mixtral-sft.yaml"


def sets(*settings: str) -> list[str]:
    """`--set` arguments for each `key=value`."""
    return [arg for setting in settings for arg in ("--set", setting)]


def cli(*args: str) -> subprocess.CompletedProcess:
    """The command in its own process, as a user runs it (the real run, whose stdout the contract tests read)."""
    return subprocess.run(
        [sys.executable, "-m", "finetune.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )


def cli_in_process(*args: str) -> subprocess.CompletedProcess:
    """The same command through typer's runner, for refusals that exit before training (no ~8 s of imports)."""
    from typer.testing import CliRunner

    from finetune.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("run") / "out"
    result = cli(
        "run",
        str(TINY),
        *sets(
            f"model.path={tiny_model_dir}",
            f"output_dir={out}",
            "training.max_steps=12",
            "training.logging_steps=2",
            "training.save_steps=6",
        ),
    )
    return out, result


def test_run_writes_the_output_contract(finished_run):
    out, result = finished_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"outputs in {out}/" in result.stdout and "adapter/" in result.stdout  # the end-of-run summary
    assert "first training record" in result.stdout and "[/INST]" in result.stdout  # the mask preview
    adapter = out / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (adapter / name).exists(), name
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"} <= set(config["target_parameters"])
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert resolved["training"]["max_steps"] == 12 and resolved["output_dir"] == str(out)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "final_train_loss",
        "first_loss",
        "eval_loss",
        "steps",
        "tokens_trained",
        "tokens_per_second",
        "peak_memory",
        "wall_seconds",
        "versions",
        "model_bytes",
        "quantized_fraction",
        "load_peak_memory",
        "aux_loss",
    ):
        assert metrics.get(key) is not None, key
    assert metrics["steps"] == 12 and metrics["tokens_trained"] > 0
    assert metrics["versions"]["transformers"].startswith("5.")
    spec = TinySpec()
    head_dim = spec.hidden_size // spec.heads
    attention = spec.layers * 2 * spec.hidden_size * head_dim * (spec.heads + spec.kv_heads)
    experts = spec.layers * spec.experts * 3 * spec.hidden_size * spec.intermediate_size
    other = 2 * 32000 * spec.hidden_size + spec.layers * (spec.experts + 2) * spec.hidden_size + spec.hidden_size
    assert metrics["quantized_fraction"] == pytest.approx((attention + experts) / (attention + experts + other))
    # trainer checkpoints hold the same standard adapter, experts included
    checkpoint = load_file(out / "checkpoints" / "checkpoint-12" / "adapter_model.safetensors")
    assert any(".mlp.experts.base_layer.lora_A." in k for k in checkpoint)
    assert set(checkpoint) == set(load_file(out / "adapter" / "adapter_model.safetensors"))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in row for row in lines)
    assert any(any(k.startswith("moe/") for k in row) for row in lines), "expert-load metrics are logged"


def test_run_loss_drops_and_adapter_trained(finished_run):
    out, result = finished_run
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final_train_loss"] < metrics["first_loss"] - 0.5, metrics
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    b_weights = {k: v for k, v in weights.items() if "lora_B" in k}
    expert_b = [v for k, v in b_weights.items() if ".mlp.experts." in k]
    attention_b = [v for k, v in b_weights.items() if ".self_attn." in k]
    assert expert_b and attention_b
    # lora_B starts at zero: every one of them moved, on the experts as on attention
    assert all(v.abs().max() > 0 for v in expert_b + attention_b)


def test_run_adapter_names_the_given_base_and_has_a_card(finished_run, tiny_model_dir):
    out, result = finished_run
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert checkpoints, "save_steps=6 should have written checkpoints"
    for checkpoint in checkpoints:  # the adapter files sit directly in each checkpoint (the README says so)
        saved = json.loads((checkpoint / "adapter_config.json").read_text())
        assert saved["base_model_name_or_path"] == str(tiny_model_dir)
        assert (checkpoint / "adapter_model.safetensors").is_file()

    card = (adapter / "README.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"base_model: {tiny_model_dir}" in card
    assert "`sft`" in card and "builtin:tiny-chat" in card
    assert f"{metrics['final_train_loss']:.4f}" in card and f"{metrics['eval_loss']:.4f}" in card
    assert "PeftModel.from_pretrained" in card and "../recipe.yaml" in card
    assert "[More Information Needed]" not in card  # PEFT's template is gone


def test_run_refuses_to_overwrite_a_finished_run(finished_run, tiny_model_dir):
    out, _ = finished_run
    before = (out / "metrics.json").read_bytes()
    result = cli_in_process("run", str(TINY), *sets(f"model.path={tiny_model_dir}", f"output_dir={out}"))
    assert result.returncode == 2
    assert "already holds a finished run" in result.stderr and "--overwrite" in result.stderr
    assert "Traceback" not in result.stderr
    assert (out / "metrics.json").read_bytes() == before


def test_run_with_bad_recipe_touches_nothing(tmp_path):
    out = tmp_path / "never"
    result = cli_in_process("run", str(TINY), *sets(f"output_dir={out}", "lora.rank=4", "model.dtype=fp8"))
    assert result.returncode == 2
    assert "lora.rank: unknown key; did you mean lora.r?" in result.stderr
    assert "model.dtype: got 'fp8'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_training_leaves_base_weights_unchanged(tmp_path, tiny_model_dir):
    """In process: every base tensor after training equals a fresh load; only LoRA tensors changed."""
    import finetune.train.run as train_mod
    from finetune.moe.loading import load_mixtral

    recipe = load_recipe(
        TINY,
        [
            f"model.path={tiny_model_dir}",
            f"output_dir={tmp_path / 'out'}",
            "training.max_steps=3",
            "data.packing=false",
        ],
    )
    captured = {}
    real_load_model = train_mod.load_model

    def capture(*args, **kwargs):
        captured["loaded"] = real_load_model(*args, **kwargs)
        captured["lora_before"] = {
            n: p.detach().clone() for n, p in captured["loaded"].model.named_parameters() if p.requires_grad
        }
        return captured["loaded"]

    train_mod.load_model = capture
    try:
        train_mod.run(recipe)
    finally:
        train_mod.load_model = real_load_model
    model = captured["loaded"].model
    fresh, _ = load_mixtral(tiny_model_dir, quantization="nf4", dtype=torch.float32, device="cpu")
    fresh_state = {**dict(fresh.named_parameters()), **dict(fresh.named_buffers())}
    trained = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    compared = 0
    for name, tensor in trained.items():
        if "lora_" in name:
            continue
        base_name = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
        if base_name in fresh_state:
            assert torch.equal(tensor.detach().cpu(), fresh_state[base_name].detach().cpu()), name
            compared += 1
    assert compared > 20
    changed = [n for n, before in captured["lora_before"].items() if not torch.equal(before, model.get_parameter(n))]
    assert any(".mlp.experts." in n for n in changed) and any(".self_attn." in n for n in changed)


def test_run_with_bad_data_reports_file_and_line_and_touches_nothing(tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    good = '{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}'
    data.write_text(f"{good}\n{{not json\n{good}\n")
    out = tmp_path / "out"
    result = cli_in_process(
        "run",
        str(TINY),
        *sets(f"model.path={tiny_model_dir}", f"output_dir={out}", f"data.train.0.path={data}", "data.eval_fraction=0"),
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"{data}:2:" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_tiny_model_command_writes_a_loadable_mixtral(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    out = tmp_path / "tiny"
    result = cli_in_process(
        "tiny-model", "--output", str(out), "--hidden-size", "32", "--layers", "1", "--experts", "4"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    config = AutoConfig.from_pretrained(out)
    assert (config.model_type, config.hidden_size, config.num_local_experts, config.num_experts_per_tok) == (
        "mixtral",
        32,
        4,
        2,
    )
    assert len(AutoTokenizer.from_pretrained(out)) == 32000
    again = cli_in_process("tiny-model", "--output", str(out))
    assert again.returncode == 2 and "already holds a model" in again.stderr


@pytest.mark.parametrize("quantization", ["none", "fp4", "int8"])
def test_every_quantization_setting_trains(tmp_path, tiny_model_dir, quantization):
    out = tmp_path / quantization
    result = cli(
        "run",
        str(TINY),
        *sets(
            f"model.path={tiny_model_dir}",
            f"output_dir={out}",
            f"model.quantization={quantization}",
            "training.max_steps=2",
            "training.logging_steps=1",
            "data.eval_fraction=0",
        ),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["quantization"] == quantization and metrics["steps"] == 2
    assert (metrics["quantized_fraction"] == 0) == (quantization == "none")
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(".mlp.experts." in k and "lora_B" in k and v.abs().max() > 0 for k, v in weights.items())
