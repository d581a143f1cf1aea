"""A model path meant as a local folder that does not exist is a missing folder (exit 2, naming the path), never a
hub lookup: `generate`, `chat`, `merge --base`, `plan`, `validate` and `run` (the recipe's model.path)."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
from typer.testing import CliRunner

from finetune.cli import app

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny-mixtral-sft.yaml"
runner = CliRunner()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working folder with an outputs/ folder (as after a first run), where any hub lookup fails the test."""
    (tmp_path / "outputs").mkdir()
    monkeypatch.chdir(tmp_path)
    lookups: list[str] = []

    def no_hub(repo_id, *args, **kwargs):
        lookups.append(repo_id)
        raise OSError(f"the hub was asked for {repo_id}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    return tmp_path, lookups


def an_adapter(folder: Path, base: str) -> Path:
    """An adapter folder as a run writes it (only its config is read before the base is resolved)."""
    folder.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "base_model_name_or_path": base, "target_modules": []}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return folder


def assert_missing(result, path: str, lookups: list[str]) -> None:
    assert result.exit_code == 2, result.output
    assert f"{path} does not exist" in result.output, result.output
    assert "hub:" not in result.output and "Traceback" not in result.output, result.output
    assert lookups == []


@pytest.mark.parametrize("path", ["outputs/nonexistent", "./outputs/nonexistent", "nonexistent-model"])
def test_generate_and_chat_name_the_missing_folder(workdir, path):
    _, lookups = workdir
    assert_missing(runner.invoke(app, ["generate", "--model", path, "--prompt", "hi"]), path, lookups)
    assert_missing(runner.invoke(app, ["chat", "--model", path], input="hi\n"), path, lookups)


def test_generate_with_an_absolute_missing_path(workdir):
    tmp_path, lookups = workdir
    path = str(tmp_path / "gone" / "model")
    assert_missing(runner.invoke(app, ["generate", "--model", path, "--prompt", "hi"]), path, lookups)


def test_merge_names_the_missing_base(workdir):
    tmp_path, lookups = workdir
    adapter = an_adapter(tmp_path / "adapter", "outputs/base-model")
    result = runner.invoke(app, ["merge", str(adapter), "-o", "merged", "--base", "outputs/nonexistent"])
    assert_missing(result, "outputs/nonexistent", lookups)
    assert "--base" in result.output
    result = runner.invoke(app, ["merge", str(adapter), "-o", "merged"])  # the adapter's own base_model_name_or_path
    assert_missing(result, "outputs/base-model", lookups)
    assert "base_model_name_or_path" in result.output
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("command", ["plan", "validate", "run"])
def test_recipe_model_path_names_the_missing_folder(workdir, command):
    tmp_path, lookups = workdir
    sets = ["--set", "model.path=outputs/nonexistent", "--set", f"output_dir={tmp_path / 'out'}"]
    result = runner.invoke(app, [command, str(TINY), *sets])
    assert_missing(result, "outputs/nonexistent", lookups)
    assert "model.path" in result.output
    assert not (tmp_path / "out").exists()


def test_a_hub_id_is_still_looked_up(workdir):
    """`org/name` with no local `org` folder is a hub id: the hub is asked (and its failure reported)."""
    _, lookups = workdir
    result = runner.invoke(app, ["generate", "--model", "mistralai/not-a-model", "--prompt", "hi"])
    assert result.exit_code == 2 and "could not fetch 'mistralai/not-a-model' from the hub" in result.output
    assert lookups == ["mistralai/not-a-model"]
