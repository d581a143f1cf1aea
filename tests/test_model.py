"""Model resolution and safety checks: non-Mixtral and pickle checkpoints are refused with a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune.errors import UserError
from finetune.model import check_model_dir, load_tokenizer, resolve_dtype, resolve_model_dir
from finetune.recipe import ModelSettings


def fake_model_dir(tmp_path: Path, config: dict, files: dict[str, bytes]) -> Path:
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    for name, content in files.items():
        (d / name).write_bytes(content)
    return d


def test_non_mixtral_architecture_is_named(tmp_path):
    d = fake_model_dir(tmp_path, {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, {"x.safetensors": b""})
    with pytest.raises(UserError, match=r"is a LlamaForCausalLM model; finetune trains Mixtral"):
        check_model_dir(d, ModelSettings(path=str(d)))


def test_pickle_checkpoints_are_refused_unless_allowed(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}))
    torch.save({"w": torch.ones(2, 2)}, d / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"only pickle checkpoints \(pytorch_model.bin\).*model.allow_pickle: true"):
        check_model_dir(d, ModelSettings(path=str(d)))
    assert not (d / "pytorch_model.safetensors").exists()
    check_model_dir(d, ModelSettings(path=str(d), allow_pickle=True))
    from safetensors.torch import load_file

    assert torch.equal(load_file(d / "pytorch_model.safetensors")["w"], torch.ones(2, 2))


def test_folder_without_config_or_weights(tmp_path):
    with pytest.raises(UserError, match=r"no config\.json"):
        check_model_dir(tmp_path, ModelSettings(path=str(tmp_path)))
    d = fake_model_dir(tmp_path, {"model_type": "mixtral"}, {})
    with pytest.raises(UserError, match=r"no \*.safetensors"):
        check_model_dir(d, ModelSettings(path=str(d)))


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(UserError, match="is a file"):
        resolve_model_dir(str(f))


def test_dtype_auto_is_fp32_on_cpu():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_tiny_model_tokenizer_pad_is_not_eos(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    assert len(tok) == 32000 and tok.eos_token_id == 2
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    check_model_dir(tiny_model_dir, ModelSettings(path=str(tiny_model_dir)))


def test_hub_ids_fetch_only_safe_files(tmp_path, monkeypatch):
    """A hub id goes through huggingface_hub's snapshot_download; pickles are only fetched when allowed."""
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_model_dir("mistralai/Mixtral-8x7B-v0.1", revision="main") == tmp_path
    assert resolve_model_dir("mistralai/Mixtral-8x7B-v0.1", allow_pickle=True) == tmp_path
    (repo, revision, safe), (_, _, with_pickle) = calls
    assert (repo, revision) == ("mistralai/Mixtral-8x7B-v0.1", "main")
    assert "*.safetensors" in safe and "tokenizer.model" in safe and not any(p.endswith(".bin") for p in safe)
    assert "*.bin" in with_pickle


def test_hub_failure_is_a_user_error(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError, match=r"model.path: could not fetch 'org/missing' from the hub: OSError: no network"):
        resolve_model_dir("org/missing")


def test_tokenizer_without_a_safe_pad_token_is_refused(tmp_path, tiny_model_dir):
    import shutil

    d = tmp_path / "tok"
    shutil.copytree(tiny_model_dir, d, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["unk_token"] = config.get("eos_token", "</s>")
    config.pop("pad_token", None)
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="no pad token and no unk token distinct from EOS"):
        load_tokenizer(d)
