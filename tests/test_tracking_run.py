"""Tracking on real tiny runs: an offline W&B run read back from its files, and tracking that cannot start."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.recipe.schema import load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny-mixtral-sft.yaml"
FAKE_KEY = "fakekey" + "0123456789abcdef" * 2


def wandb_records(path: Path) -> list:
    """Records of a .wandb file: leveldb-log framing (7-byte file header, 32 KiB blocks, 7-byte record headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    pos, chunks, records = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("tracked") / "out"
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    env.update(WANDB_API_KEY=FAKE_KEY, WANDB_SILENT="true")
    settings = [f"model.path={tiny_model_dir}", f"output_dir={out}", "training.max_steps=3",
                "training.logging_steps=1", "training.eval_steps=2", "tracking.backend=wandb",
                "tracking.mode=offline", "tracking.group=g1", "tracking.notes=a note", "tracking.tags=[mine]",
                "tracking.sample_prompts=2", "tracking.sample_max_new_tokens=4", "lora.router=trainable",
                f"training.extra.hub_token={FAKE_KEY}"]  # fmt: skip
    args = [a for s in settings for a in ("--set", s)]
    result = subprocess.run([sys.executable, "-m", "finetune.cli", "run", str(TINY), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    return out, result, wandb_records(run_file)


def test_offline_run_holds_recipe_versions_and_environment(offline_run, tiny_model_dir):
    out, result, records = offline_run
    assert "wandb sync " + str(out / "wandb" / "offline-run-") in result.stdout
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["model"]["path"] == str(tiny_model_dir) and config["training"]["max_steps"] == 3
    assert {"torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets"} <= set(config["versions"])
    assert config["environment"]["device"] == "cpu" and config["environment"]["world_size"] == 1
    assert config["quantization_report"]["experts"]["bits_per_param"] < 5
    assert config["lora_summary"]["q_proj"] > 0 and config["lora_summary"]["total"] > 0
    assert config["training"]["extra"]["hub_token"] == "***"
    assert {"sft", "nf4", "mine"} <= set(run.tags) and run.run_group == "g1" and run.notes == "a note"


def test_offline_history_has_routing_per_layer_aux_loss_throughput_heatmap_and_samples(offline_run, tiny_model_dir):
    _out, _result, records = offline_run
    keys = set()
    for record in records:
        if record.WhichOneof("record_type") == "history":
            keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
    layers = json.loads((tiny_model_dir / "config.json").read_text())["num_hidden_layers"]
    for layer in range(layers):
        for section in ("moe_imbalance", "moe_entropy", "moe_drift"):
            assert f"{section}/layer{layer}" in keys, (section, layer)
    assert {"aux_loss", "perf/tokens_per_second", "perf/tokens_per_second_per_device", "perf/peak_memory_gb"} <= keys
    assert any(k.startswith("moe_load/heatmap") for k in keys) and any(k.startswith("moe_load/table") for k in keys)
    assert any(k.startswith("samples/generations") for k in keys)


def test_samples_and_metrics_are_written_locally(offline_run):
    out, _result, _records = offline_run
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {2, 3} and all(len(s["prompt"]) > 0 for s in samples)
    assert all(set(s) == {"step", "prompt", "reference", "generated"} for s in samples)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(len(r.get("moe/load", [])) > 0 for r in rows)


def test_no_file_the_run_writes_holds_the_api_key(offline_run):
    out, result, _records = offline_run
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 10 and any("wandb" in p.parts for p in files)
    for path in files:
        assert FAKE_KEY.encode() not in path.read_bytes(), path
    assert FAKE_KEY not in result.stdout + result.stderr


def test_a_run_whose_tracking_cannot_start_trains_to_the_end(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import wandb

    import finetune.train.run as train_mod

    def refuse(*args, **kwargs):
        raise wandb.errors.CommError("could not reach api.wandb.ai")

    monkeypatch.setattr(wandb, "init", refuse)
    out = tmp_path / "out"
    recipe = load_recipe(TINY, [f"model.path={tiny_model_dir}", f"output_dir={out}", "training.max_steps=2",
                                "training.logging_steps=1", "data.eval_fraction=0", "tracking.backend=wandb",
                                "tracking.mode=online", "tracking.sample_prompts=1",
                                "tracking.sample_max_new_tokens=2"])  # fmt: skip
    metrics = train_mod.run(recipe)
    assert metrics["steps"] == 2 and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "warning: could not start wandb (could not reach api.wandb.ai)" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
