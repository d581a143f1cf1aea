"""`finetune merge`: merged logits equal stock PEFT's (original) or our quantised forward's (dequantized), in both
on-disk layouts; memory bounded by a shard; a kill leaves no OUT; bad input is a one-line error."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from signals import start_paused_after_first_write
from transformers import MixtralConfig, MixtralForCausalLM

from finetune.moe import apply_lora, load_adapter, load_mixtral, save_adapter

ROOT = Path(__file__).resolve().parents[2]
IDS = torch.randint(3, 32000, (2, 20), generator=torch.Generator().manual_seed(11))


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finetune.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def keys(folder: Path) -> set[str]:
    names = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            names |= set(f.keys())
    return names


def stock_peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel

    model = MixtralForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    with torch.no_grad():
        return PeftModel.from_pretrained(model, str(adapter)).eval()(IDS).logits


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A real `finetune run`: attention + both expert projections at a different rank, and a trained router."""
    out = tmp_path_factory.mktemp("merge-run") / "run"
    settings = [
        f"model.path={tiny_model_dir}",
        f"output_dir={out}",
        "training.max_steps=3",
        "training.learning_rate=2e-2",
        "data.eval_fraction=0",
        "lora.expert_r=4",
        "lora.router=trainable",
    ]
    result = cli("run", str(ROOT / "recipes" / "tiny-mixtral-sft.yaml"), *[a for s in settings for a in ("--set", s)])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_original_merge_equals_stock_peft(run_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "merged"
    result = cli("merge", str(run_dir), "-o", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "verify:" in result.stdout and ": ok" in result.stdout
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["mlp.gate"] and config["rank_pattern"]  # router + a different expert rank
    assert keys(out) == keys(tiny_model_dir)  # the base's own per-expert layout and names

    merged, info = MixtralForCausalLM.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        merged_logits = merged.eval()(IDS).logits
    reference = stock_peft_logits(tiny_model_dir, run_dir / "adapter")
    assert relative(merged_logits, reference) < 1e-5
    with torch.no_grad():  # and the adapter does change the model: a merge that dropped deltas would fail above
        base_logits = MixtralForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)(IDS).logits
    assert relative(base_logits, reference) > 1e-3
    card = (out / "README.md").read_text()
    assert str(tiny_model_dir) in card and "sft" in card and "from_pretrained" in card


def test_dequantized_merge_equals_our_quantised_forward(run_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "merged-dq"
    result = cli("merge", str(run_dir), "-o", str(out), "--onto", "dequantized")
    assert result.returncode == 0, result.stderr[-3000:]
    ours, _ = load_mixtral(tiny_model_dir, quantization="nf4", dtype=torch.float32)
    ours = load_adapter(ours, run_dir / "adapter").eval()
    merged = MixtralForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        assert relative(merged(IDS).logits, ours(IDS).logits) < 1e-5


@pytest.mark.parametrize("layout", ["fused", "per_expert"])
def test_both_base_layouts_merge_in_their_own_layout(tmp_path, raw_writer, randomize_lora, layout):
    config = MixtralConfig(
        vocab_size=32000, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
    )  # fmt: skip
    base = raw_writer(tmp_path / "base", config, dtype=torch.float32, layout=layout, shards=2, seed=1)
    model, _ = load_mixtral(base, quantization="nf4", dtype=torch.float32)
    model = apply_lora(model, attention_targets=["q_proj", "o_proj"], r=4, alpha=8, dropout=0.0,
                       expert_targets=["gate_up_proj", "down_proj"], expert_r=2, expert_alpha=4)  # fmt: skip
    randomize_lora(model, seed=2, std=0.2)
    save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "merged"
    result = cli("merge", str(tmp_path / "adapter"), "-o", str(out), "--max-shard-size", "1MB")
    assert result.returncode == 0, result.stderr[-3000:]
    assert keys(out) == keys(base)
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    merged = MixtralForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        assert relative(merged(IDS).logits, stock_peft_logits(base, tmp_path / "adapter")) < 1e-5


MEASURE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import psutil, torch
    from finetune.export.merge import merge_shards
    from finetune.export.lora_deltas import read_adapter

    def high_water_mark():  # VmHWM belongs to this process image; ru_maxrss would carry the parent's from fork
        line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    base, adapter, out = map(Path, sys.argv[1:4])
    read_adapter(adapter, 8)  # warm every import and code path before the start level is taken
    start = psutil.Process().memory_info().rss
    assert high_water_mark() - start < 64 * 2**20, "the start level should be near the high-water mark"
    merge_shards(base, adapter, out)
    print(json.dumps({"peak_above_start": high_water_mark() - start}))
    """
)


@pytest.fixture(scope="module")
def mixtral_shaped(tmp_path_factory, raw_writer) -> tuple[Path, Path]:
    """A Mixtral-shaped bf16 checkpoint (hidden 1024, ffn 3584, 8 experts) in 4 shards, and an adapter for it."""
    from finetune.model.tiny import TinySpec, mixtral_config

    root = tmp_path_factory.mktemp("mixtral-shaped")
    spec = TinySpec(hidden_size=1024, intermediate_size=3584, layers=2, heads=8, kv_heads=2)
    base = raw_writer(root / "base", mixtral_config(spec), dtype=torch.bfloat16, shards=4)
    model, _ = load_mixtral(base, quantization="nf4", dtype=torch.float32)
    model = apply_lora(model, attention_targets=["q_proj", "v_proj"], r=8, alpha=16, dropout=0.0,
                       expert_targets=["gate_up_proj", "down_proj"], expert_r=8, expert_alpha=16)  # fmt: skip
    save_adapter(model, root / "adapter")
    return base, root / "adapter"


def test_merge_memory_is_bounded_by_a_shard(mixtral_shaped, tmp_path):
    base, adapter = mixtral_shaped
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(base), str(adapter), str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    peak = json.loads(result.stdout.strip().splitlines()[-1])["peak_above_start"]
    largest_shard = max(p.stat().st_size for p in base.glob("*.safetensors"))
    adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    total = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    assert peak < 1.5 * (largest_shard + adapter_bytes), (peak, largest_shard, adapter_bytes, total)
    assert peak < 0.6 * total  # and clearly less than the model


def test_a_kill_during_the_merge_leaves_no_out(mixtral_shaped, tmp_path):
    """SIGKILL while the first part is being written (the merge waits there: the kill cannot come after the end)."""
    base, adapter = mixtral_shaped
    out = tmp_path / "merged"
    proc = start_paused_after_first_write(
        "finetune.export.shard_stream:StreamingShard.write",
        ["merge", str(adapter), "-o", str(out), "--base", str(base)],
        tmp_path,
        ROOT,
    )
    assert any(tmp_path.glob(".merged.merging-*/part-*")), "the merge never started writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()


BAD = ["other-base", "missing-shard", "broken-index", "existing-out", "out-is-base", "bad-dtype", "no-adapter"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_a_one_line_error_and_writes_nothing(case, run_dir, tiny_model_dir, tmp_path, raw_writer):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    out, args, expect = tmp_path / "out", [], ""
    if case == "other-base":
        config = MixtralConfig(vocab_size=32000, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=8)  # fmt: skip
        shutil.rmtree(base)
        raw_writer(base, config, dtype=torch.float32)
        expect = "does not fit base tensor"
    elif case == "missing-shard":
        (base / "model.safetensors").rename(base / "model-00001-of-00001.safetensors")
        index = {"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}
        (base / "model.safetensors.index.json").write_text(json.dumps(index))
        expect = "missing: model-00001-of-00002.safetensors"
    elif case == "broken-index":
        (base / "model.safetensors.index.json").write_text('{"weight_map": ')
        expect = "not a valid safetensors index"
    elif case == "existing-out":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        expect = "--overwrite"
    elif case == "out-is-base":
        out = base
        expect = "base or adapter folder itself"
    elif case == "bad-dtype":
        args, expect = ["--dtype", "int4"], "cannot be written"
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    source = tmp_path if case == "no-adapter" else run_dir
    expect = expect or "holds no adapter"
    from typer.testing import CliRunner

    from finetune.cli import app

    result = CliRunner().invoke(app, ["merge", str(source), "-o", str(out), "--base", str(base), *args])
    assert result.exit_code == 2, result.output[-2000:]
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expect in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing written, nothing removed
