"""FSDP2 through accelerate (accelerate/cpu-fsdp2.yaml: two CPU processes over gloo) shards the 4-bit model.

Each rank keeps about half of the base, the quantised experts included; the run trains the same adapter as one
process with the same global batch (2 ranks x 1 row x 2 accumulation steps = 1 process x 2 rows x 2 steps), and the
adapter, gathered whole on rank 0, is a standard PEFT adapter.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_resume import assert_same_adapter, at_gate, finish, run, signal_gate, start, wait_for

from finetune.train.checkpoints import MARKER, scan

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny-mixtral-sft.yaml"
CPU_FSDP2 = ROOT / "accelerate" / "cpu-fsdp2.yaml"
STEPS = 4  # as conftest.DISTRIBUTED_STEPS
SHARDED = ("training.batch_size=1", "training.save_steps=2")  # two ranks x 1 row x 2 accumulation steps
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_FSDP2)]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*LAUNCH, "-m", "finetune", "run", str(TINY), *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )


def _finished(result: subprocess.CompletedProcess, out: Path) -> dict:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def single(single_process_run):
    """conftest's single-process reference: batch 2 x accumulation 2, aux loss off."""
    return single_process_run, json.loads((single_process_run / "metrics.json").read_text())


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tiny_model_dir, reference_settings):
    out = tmp_path_factory.mktemp("fsdp") / "out"
    result = _run(reference_settings(tiny_model_dir, out, *SHARDED))
    return out, _finished(result, out), result


def test_every_rank_holds_half_of_the_4bit_base(single, sharded):
    _, one = single
    _, two, _ = sharded
    assert two["world_size"] == 2 and two["quantization"] == "nf4"
    assert two["model_bytes"] == one["model_bytes"]
    assert two["model_bytes_per_rank"] <= 0.6 * one["model_bytes"]
    whole, mine = one["model_bytes_per_rank_by_group"], two["model_bytes_per_rank_by_group"]
    for group in ("experts", "attention", "embeddings", "lm_head"):  # the packed 4-bit experts themselves too
        assert 0.4 * whole[group] <= mine[group] <= 0.6 * whole[group], group
    assert one["load_memory_added"] > 0 and two["load_memory_added"] > 0  # host RSS the loading phase added


def test_sharded_run_trains_the_single_process_adapter(single, sharded):
    (one_dir, one), (two_dir, two, _) = single, sharded
    assert two["steps"] == one["steps"] == STEPS
    ours = load_file(two_dir / "adapter" / "adapter_model.safetensors")
    reference = load_file(one_dir / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == reference.keys()
    assert any(".mlp.experts." in k for k in ours)
    # Same rows per optimizer step; only the order of the gradient sums differs. Adam turns that into updates of
    # up to ~lr on weights whose gradient is near zero, so compare the whole adapter (and the B factors, which start
    # at zero and hold what was learned) by relative norm, and the loss at every step.
    for part in ("lora_", "lora_B"):
        keys = [k for k in reference if part in k]
        diff = sum((ours[k].float() - reference[k].float()).square().sum() for k in keys).sqrt()
        norm = sum(reference[k].float().square().sum() for k in keys).sqrt()
        assert diff <= 0.03 * norm, (part, diff.item(), norm.item())
    assert _losses(two_dir) == pytest.approx(_losses(one_dir), rel=3e-4)


def _losses(out: Path) -> list[float]:
    return [row["loss"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


def test_sharded_run_writes_once_and_samples_on_every_rank(sharded):
    out, _, result = sharded
    assert result.stdout.count("done: ") == 1  # one end-of-run summary, from rank 0
    assert (out / "samples.jsonl").read_text().strip()  # generation ran (all ranks in lockstep), rank 0 logged it
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for row in rows if "loss" in row) == STEPS  # one log line per step, not one per rank


STOCK_PEFT = textwrap.dedent(
    """
    import json, sys, warnings
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, sys.argv[2])
    print(json.dumps({
        "warnings": [str(w.message) for w in caught if "missing" in str(w.message).lower()
                     or "unexpected" in str(w.message).lower()],
        "lora_params": sum(p.numel() for n, p in model.named_parameters() if "lora_" in n),
    }))
    """
)


def test_gathered_adapter_loads_in_stock_peft(sharded, tiny_model_dir):
    out, _, _ = sharded
    run = subprocess.run(
        [sys.executable, "-c", STOCK_PEFT, str(tiny_model_dir), str(out / "adapter")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert not result["warnings"]
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert result["lora_params"] == sum(t.numel() for k, t in saved.items() if "lora_" in k)


def test_sixteen_bit_lora_is_sharded_too(tmp_path, tiny_model_dir, reference_settings):
    """quantization: none, e.g. 16-bit LoRA of 8x7B spread over several 80 GB GPUs."""
    out = tmp_path / "none"
    extra = ("training.batch_size=1", "model.quantization=none", "training.max_steps=2")
    metrics = _finished(_run(reference_settings(tiny_model_dir, out, *extra)), out)
    assert metrics["quantized_fraction"] == 0 and metrics["world_size"] == 2
    assert metrics["model_bytes_per_rank"] <= 0.6 * metrics["model_bytes"]
    assert metrics["model_bytes_per_rank_by_group"]["experts"] > 0
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(".mlp.experts." in k and "lora_B" in k and v.abs().max() > 0 for k, v in weights.items())


def test_sharded_checkpoints_are_complete_standard_adapters(sharded):
    out, _, _ = sharded
    found = scan(out)
    assert [step for step, _ in found.complete] == [2, 4] and not found.incomplete
    for _, folder in found.complete:  # gathered on rank 0: the adapter files directly, beside the optimizer state
        names = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", MARKER} <= names
    # the last checkpoint (step 4, the last step) holds exactly the adapter the run ended with: gathered alone, whole
    last = load_file(found.complete[-1][1] / "adapter_model.safetensors")
    final = load_file(out / "adapter" / "adapter_model.safetensors")
    assert last.keys() == final.keys() and all(last[k].equal(final[k]) for k in final)


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it, as a cluster ends a job (torchrun starts its ranks in their
    own sessions, so killing the launcher's process group would leave them training)."""
    import psutil

    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    finish(proc)


def test_killed_sharded_run_resumes_to_the_uninterrupted_adapter(tmp_path, tiny_model_dir, reference_settings, sharded):
    """SIGKILL every process once checkpoint-2 is complete; the same command again ends where the uninterrupted
    FSDP2 run ended (optimizer state, scheduler, RNG and data position restored across both ranks)."""
    reference, _, _ = sharded
    out = tmp_path / "killed"
    args = ["run", str(TINY), *reference_settings(tiny_model_dir, out, *SHARDED)]
    proc = start(args, LAUNCH, signal_gate(tmp_path))  # step 3 waits there (for a signal that never comes)
    wait_for(at_gate(out), proc)  # checkpoint-2 is complete and checkpoint-4 cannot be, however loaded the machine
    kill_all(proc)
    code, output = run(args, LAUNCH)
    assert code == 0, output[-3000:]
    assert f"resuming from checkpoints/checkpoint-2 (step 2 of {STEPS})" in output
    assert json.loads((out / "metrics.json").read_text())["steps"] == STEPS
    assert_same_adapter(reference / "adapter", out / "adapter")


FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "false"}


@pytest.mark.parametrize(
    ("env", "settings", "message"),
    [
        ({}, ["model.quantization=int8"], "model.quantization: int8 cannot be sharded by FSDP2"),
        ({"FSDP_VERSION": "1"}, [], "fsdp_version 1 is not supported; set fsdp_config.fsdp_version: 2"),
        ({"FSDP_OFFLOAD_PARAMS": "true"}, [], "fsdp_offload_params with a 4-bit model is not supported"),
        ({}, ["training.optimizer=paged_adamw_8bit"], "set training.optimizer: adamw_torch"),
        ({"FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}, [], "set fsdp_cpu_ram_efficient_loading: false"),
    ],
)
def test_what_fsdp2_cannot_shard_is_refused_before_loading(monkeypatch, tmp_path, env, settings, message):
    """Inside an FSDP launch (accelerate exports its config as FSDP_* variables), by `validate` as by `run`."""
    from typer.testing import CliRunner

    from finetune.cli import app

    for key, value in {**FSDP_ENV, **env}.items():
        monkeypatch.setenv(key, value)
    sets = [arg for s in (f"output_dir={tmp_path / 'out'}", *settings) for arg in ("--set", s)]
    for command in ("validate", "run"):
        result = CliRunner().invoke(app, [command, str(TINY), *sets])
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_sharding_at_load_is_the_default_and_can_be_turned_off(monkeypatch):
    """FSDP2 launches shard while loading unless FINETUNE_SHARD_AT_LOAD=0: then every rank loads whole (on GPUs the
    experts staged in host memory) and the Trainer shards through accelerate, as before sharding at load."""
    import torch

    from finetune.distributed.sharding import expert_staging_device, load_sharding, shard_at_load

    for key, value in FSDP_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("FINETUNE_SHARD_AT_LOAD", raising=False)
    assert shard_at_load()
    monkeypatch.setenv("FINETUNE_SHARD_AT_LOAD", "0")
    assert not shard_at_load()
    assert load_sharding(torch.device("cpu"), torch.bfloat16) is None  # before any process group is needed
    assert expert_staging_device(torch.device("cuda", 0)) == torch.device("cpu")


def test_ddp_launch_accepts_int8(monkeypatch):
    from finetune.distributed.sharding import launch_problems
    from finetune.recipe.schema import load_recipe

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert launch_problems(load_recipe(TINY, ["model.quantization=int8"])) == []
