"""Model resolution and safety checks: non-Mixtral and pickle checkpoints are refused with a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune.errors import UserError
from finetune.model.load import (
    check_model_dir,
    load_tokenizer,
    model_dir_problems,
    resolve_dtype,
    resolve_model_dir,
    safetensors_problem,
)
from finetune.recipe.sections import ModelSettings


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
    (d / "tokenizer.json").write_text("{}")
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


TEXTS = ["Hello world", "The capital of France is", "[INST] What is 2 + 2? [/INST]", "x\n\ny = 1", "é😀 café"]


def test_tiny_model_tokenizer_encodes_as_mistral_common(tiny_model_dir):
    """What a user's `AutoTokenizer(text)` gives equals Mixtral's reference tokenizer: BOS first, no EOS.

    Runs of spaces are left out: transformers v5's LlamaTokenizer (a Metaspace pre-tokenizer over its own merges)
    splits them unlike SentencePiece ("a  b": '▁▁','b' against '▁','▁b'), for Mixtral's hub tokenizer too. The
    data tools tokenize chat_format mistral with mistral-common, which is SentencePiece itself."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from transformers import AutoTokenizer

    from finetune.model.tiny import mistral_v1_tokenizer_file

    reference = MistralTokenizer.from_file(str(mistral_v1_tokenizer_file())).instruct_tokenizer.tokenizer
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    for text in TEXTS:
        assert tok(text)["input_ids"] == reference.encode(text, bos=True, eos=False), text


def test_a_cached_builtin_of_an_older_build_is_written_again(tmp_path, monkeypatch):
    from finetune.model import tiny

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    folder = tiny.materialize_builtin()
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "tiny_build.txt").unlink()  # as a cache written before builds were recorded
    (folder / "tokenizer.json").write_text("{}")
    again = tiny.materialize_builtin()
    assert again == folder and (folder / "tiny_build.txt").read_text().strip() == tiny.BUILD
    assert (folder / "model.safetensors").read_bytes() == weights  # the same seed: the same model
    assert load_tokenizer(folder)("Hi")["input_ids"][0] == 1
    mtime = (folder / "tokenizer.json").stat().st_mtime_ns
    tiny.materialize_builtin()  # current: left as it is
    assert (folder / "tokenizer.json").stat().st_mtime_ns == mtime


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


def copy_model(tmp_path: Path, tiny_model_dir: Path, skip: tuple[str, ...] = ()) -> Path:
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, d, ignore=shutil.ignore_patterns(*skip))
    return d


def test_a_complete_tiny_model_folder_has_no_problems(tiny_model_dir):
    assert model_dir_problems(tiny_model_dir, ModelSettings(path=str(tiny_model_dir))) == []


def test_missing_tokenizer_files_are_named(tmp_path, tiny_model_dir):
    d = copy_model(tmp_path, tiny_model_dir, skip=("tokenizer*", "special_tokens_map.json"))
    problems = model_dir_problems(d, ModelSettings(path=str(d)))
    assert problems == [
        f"model.path: {d} has no tokenizer files (tokenizer.json or tokenizer.model); copy them from the base "
        "model's folder"
    ]


@pytest.mark.parametrize("keep", [0, 7, 100, -1000, -1])
def test_truncated_safetensors_are_found_from_the_header(tmp_path, tiny_model_dir, keep):
    d = copy_model(tmp_path, tiny_model_dir)
    shard = d / "model.safetensors"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:keep])
    problem = safetensors_problem(shard)
    assert problem is not None and problem.startswith(f"model.path: {shard} is ") and "re-download" in problem
    assert model_dir_problems(d, ModelSettings(path=str(d))) == [problem]


def test_safetensors_with_a_garbage_header_are_named(tmp_path):
    shard = tmp_path / "model.safetensors"
    header = b"{not json"
    shard.write_bytes(len(header).to_bytes(8, "little") + header)
    assert "is not a readable safetensors file (JSONDecodeError" in safetensors_problem(shard)


def test_a_shard_named_in_the_index_but_missing(tmp_path, tiny_model_dir):
    d = copy_model(tmp_path, tiny_model_dir)
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    problems = model_dir_problems(d, ModelSettings(path=str(d)))
    assert problems == [
        f"model.path: {d / 'model-00002-of-00002.safetensors'} is named in model.safetensors.index.json but "
        "missing; re-download it"
    ]


@pytest.mark.parametrize("content", [b"{broken", b"\xff\xfe{}", b"[1, 2]"])
def test_unreadable_config_json_is_named(tmp_path, tiny_model_dir, content):
    d = copy_model(tmp_path, tiny_model_dir)
    (d / "config.json").write_bytes(content)
    problems = model_dir_problems(d, ModelSettings(path=str(d)))
    assert len(problems) == 1 and problems[0].startswith(f"model.path: {d / 'config.json'}")
    with pytest.raises(UserError, match=r"config\.json"):
        check_model_dir(d, ModelSettings(path=str(d)))


@pytest.mark.parametrize("content", [b"", b"garbage" * 100, b"PK\x03\x04 truncated zip"])
def test_corrupt_allowed_pickle_is_refused_and_nothing_is_written(tmp_path, content):
    d = fake_model_dir(tmp_path, {"model_type": "mixtral"}, {"pytorch_model.bin": content, "tokenizer.json": b"{}"})
    settings = ModelSettings(path=str(d), allow_pickle=True)
    problems = model_dir_problems(d, settings)
    assert problems == [
        f"model.path: {d / 'pytorch_model.bin'} is not a readable PyTorch checkpoint (not a torch.save zip archive: "
        "truncated, corrupt or an old format); re-download it or convert it to safetensors"
    ]
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        check_model_dir(d, settings)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "pytorch_model.bin", "tokenizer.json"]


def test_pickle_that_is_not_a_state_dict_is_refused(tmp_path):
    d = fake_model_dir(tmp_path, {"model_type": "mixtral"}, {"tokenizer.json": b"{}"})
    torch.save([torch.ones(2)], d / "pytorch_model.bin")
    with pytest.raises(UserError, match="is not a flat state dict of tensors"):
        check_model_dir(d, ModelSettings(path=str(d), allow_pickle=True))
    assert not list(d.glob("*.safetensors*"))


def test_corrupt_tokenizer_file_is_a_user_error(tmp_path, tiny_model_dir):
    d = copy_model(tmp_path, tiny_model_dir, skip=("*.safetensors", "tokenizer.model"))
    (d / "tokenizer.json").write_text("{ not json")
    with pytest.raises(UserError, match=r"model.path: cannot load the tokenizer in .*copy"):
        load_tokenizer(d)


def test_zip_pickle_with_garbage_inside_is_a_user_error_and_leaves_no_file(tmp_path):
    import zipfile

    d = fake_model_dir(tmp_path, {"model_type": "mixtral"}, {"tokenizer.json": b"{}"})
    with zipfile.ZipFile(d / "pytorch_model.bin", "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02garbage that is not a pickle")
    settings = ModelSettings(path=str(d), allow_pickle=True)
    assert model_dir_problems(d, settings) == []  # looks like torch.save's format from the outside
    with pytest.raises(UserError, match=r"model.path: cannot read .*pytorch_model\.bin: "):
        check_model_dir(d, settings)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "pytorch_model.bin", "tokenizer.json"]
