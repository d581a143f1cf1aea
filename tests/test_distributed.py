"""Two CPU processes over gloo, through accelerate: DDP on one machine, and two simulated machines.

Runs are shared between assertions (module fixtures). The DDP run is compared with a single-process run of the same
global batch: two ranks x batch 1 x accumulation 2 against one process x batch 2 x accumulation 2. accelerate's
sampler shards the one shuffled order batch by batch (rank r takes batches r, r + 2, ...), so each optimizer step
sees the same 4 packed rows in both runs. The router's aux loss is off there: it is computed per forward over the
tokens in that forward, so it depends on how the rows are grouped into micro-batches (the LM loss does not).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny-mixtral-sft.yaml"
CPU_DDP = ROOT / "accelerate" / "cpu-ddp.yaml"
MULTI_NODE = ROOT / "accelerate" / "multi-node.yaml"
STEPS = 4  # as conftest.DISTRIBUTED_STEPS: the single-process reference's length


def sets(*settings: str) -> list[str]:
    return [arg for setting in settings for arg in ("--set", setting)]


def run(command: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {})}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


def common(settings, tiny_model_dir: Path, out: Path, steps: int = STEPS, aux_loss: bool = False) -> list[str]:
    """`settings` is conftest's `reference_settings`: what the single-process reference run uses."""
    return settings(tiny_model_dir, out, f"training.max_steps={steps}", f"moe.aux_loss={str(aux_loss).lower()}")


def train_rows(out: Path) -> list[dict]:
    return [row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_model_dir, reference_settings):
    out = tmp_path_factory.mktemp("ddp") / "out"
    args = ["run", str(TINY), *common(reference_settings, tiny_model_dir, out), *sets("training.batch_size=1")]
    launcher = ["--num-processes", "2", "--accelerate-config", str(CPU_DDP.relative_to(ROOT))]
    # a fresh datasets cache, and datasets' own log of what it computes and what it reads from its cache
    env = {"HF_DATASETS_CACHE": str(out.parent / "datasets"), "DATASETS_VERBOSITY": "info"}
    return out, run([sys.executable, "-m", "finetune", *args, *launcher], env), args


def test_ddp_prints_the_accelerate_command_it_runs(ddp_run):
    _, result, args = ddp_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    first = result.stdout.splitlines()[0]
    assert (
        first.startswith("launching: ") and " launch --config_file accelerate/cpu-ddp.yaml --num_processes 2 " in first
    )
    assert first.endswith(" -m finetune " + " ".join(args))  # every other argument, unchanged


def test_ddp_writes_outputs_once_and_ranks_end_with_identical_adapters(ddp_run):
    out, result, _ = ddp_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    both = result.stdout + result.stderr
    assert both.count("data: ") == 1 and both.count("first training record") == 1, "rank 1 printed the data"
    assert both.count(f"outputs in {out}/") == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == STEPS
    checksums = metrics["adapter_checksum_by_rank"]
    assert len(checksums) == 2 and checksums[0] == checksums[1], checksums
    assert metrics["tokens_per_second_per_device"] == pytest.approx(metrics["tokens_per_second"] / 2)
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(".mlp.experts." in k and "lora_B" in k and v.abs().max() > 0 for k, v in weights.items())
    assert [row["step"] for row in train_rows(out)] == list(range(1, STEPS + 1))  # one writer: no duplicate rows


def test_ddp_tokenises_once_and_the_other_rank_reads_the_cache(ddp_run):
    out, result, _ = ddp_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    both = result.stdout + result.stderr
    cache = out.parent / "datasets" / "finetune-data"
    (tokenised,) = cache.glob("tokenized-*.arrow")  # one file: rank 0 wrote it (before rank 1 started)
    assert both.count(f"Caching processed dataset at {tokenised}") == 1
    assert both.count(f"Loading cached processed dataset at {tokenised.with_suffix('')}") == 1  # rank 1 read it


def test_ddp_loss_curve_matches_one_process_with_the_same_global_batch(ddp_run, single_process_run):
    out, result, _ = ddp_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ddp, single = train_rows(out), train_rows(single_process_run)
    # the same rows each step: TRL's token count, gathered over the ranks, is exactly the one process's
    assert [r["num_tokens"] for r in ddp] == [r["num_tokens"] for r in single]
    assert [r["loss"] for r in ddp] == pytest.approx([r["loss"] for r in single], rel=3e-4)
    assert ddp[-1]["loss"] < ddp[0]["loss"]  # it trained
    assert json.loads((out / "metrics.json").read_text())["tokens_trained"] == int(single[-1]["num_tokens"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_machines(tmp_path_factory, tiny_model_dir, reference_settings):
    """accelerate/multi-node.yaml as the two machines would edit it, on this one machine over gloo."""
    tmp = tmp_path_factory.mktemp("nodes")
    out = tmp / "out"
    shipped = yaml.safe_load(MULTI_NODE.read_text())
    port = free_port()
    launches = []
    for rank in (0, 1):
        config = tmp / f"machine-{rank}.yaml"
        settings = {"machine_rank": rank, "main_process_ip": "127.0.0.1", "main_process_port": port,
                    "num_processes": 2, "use_cpu": True, "mixed_precision": "no"}  # fmt: skip
        config.write_text(yaml.safe_dump({**shipped, **settings}))
        env = {**os.environ, "HF_DATASETS_CACHE": str(tmp / f"datasets-{rank}")}  # each machine has its own disk
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m",
                   "finetune", "run", str(TINY), *common(reference_settings, tiny_model_dir, out, 2, aux_loss=True)]  # fmt: skip
        launches.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True))  # fmt: skip
    outputs = [p.communicate(timeout=900)[0] for p in launches]
    return out, [p.returncode for p in launches], outputs


def test_two_machines_train_to_the_end_and_only_rank_0_writes(two_machines):
    out, codes, outputs = two_machines
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    main, other = outputs
    assert "data: " in main and "data: " not in other
    assert f"outputs in {out}/" in main and "outputs in" not in other
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 2
    assert metrics["aux_loss"] is not None  # the router's aux loss stays on across machines
    checksums = metrics["adapter_checksum_by_rank"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_sigterm_stops_every_rank_at_one_step_and_the_rerun_ends_with_the_ddp_adapter(
    tmp_path, tiny_model_dir, reference_settings, ddp_run
):
    """SIGTERM to `finetune run --num-processes 2` reaches both ranks through accelerate; they agree on one step,
    save one checkpoint and exit 143; the same command again resumes and ends with the uninterrupted DDP adapter.
    The ranks wait at the signal gate (tests/signals.py) at step 3 until the signal is in: it cannot land late."""
    from signals import at_gate, signal_gate
    from test_resume import assert_same_adapter, finish, start, wait_for
    from test_resume import run as run_resumable

    from finetune.train.checkpoints import scan

    reference, _, _ = ddp_run
    out = tmp_path / "term"
    args = ["run", str(TINY), *common(reference_settings, tiny_model_dir, out), *sets("training.batch_size=1")]
    args += ["--num-processes", "2", "--accelerate-config", str(CPU_DDP.relative_to(ROOT))]
    proc = start(args, script=signal_gate(tmp_path))  # the launcher and both ranks run the gate script
    wait_for(at_gate(out), proc)  # a rank is at the end of step 3, waiting for its signal
    proc.send_signal(signal.SIGTERM)  # the launcher only, as a scheduler or Ctrl-C would: it passes it on
    code, output = finish(proc)
    assert code == 128 + signal.SIGTERM, output[-3000:]
    stopped = scan(out).latest
    assert stopped is not None and stopped[0] < STEPS, output[-3000:]
    assert stopped[0] == 3, output[-3000:]  # the gate's step, on both ranks (one checkpoint, agreed)
    assert f"stopped by SIGTERM at step {stopped[0]} of {STEPS}" in output
    assert not (out / "metrics.json").exists()

    code, output = run_resumable(args)
    assert code == 0, output[-3000:]
    assert f"resuming from checkpoints/checkpoint-{stopped[0]} (step {stopped[0]} of {STEPS})" in output
    assert_same_adapter(reference / "adapter", out / "adapter")
