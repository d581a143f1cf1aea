"""A corpus of realistic mistakes, each run through both `finetune validate` and `finetune run`.

Every case must end the same way in both commands: exit code 2, no traceback, the key or `FILE:LINE` named,
nothing written, and (for run) nothing loaded: run's own loading steps are replaced by guards that fail the test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from finetune.cli import app

ROOT = Path(__file__).resolve().parents[1]
GOOD_RECORD = '{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}\n'


class ReachedLoading(Exception):
    """Raised by the guards: `run` got past every check and began to load something."""


@pytest.fixture(autouse=True)
def no_loading(monkeypatch):
    """Every step of `run` that reads weights, builds the tiny model or tokenises data raises ReachedLoading."""
    import data_tools.prepare
    import finetune.model.load
    import finetune.moe.loading
    import finetune.train.run

    def guard(*args, **kwargs):
        raise ReachedLoading()

    for module, name in [
        (finetune.train.run, "resolve_model_dir"),
        (finetune.train.run, "check_model_dir"),
        (finetune.train.run, "load_tokenizer"),
        (finetune.train.run, "load_model"),
        (finetune.moe.loading, "load_mixtral"),
        (finetune.model.load, "materialize_builtin"),
        (data_tools.prepare, "prepare_sft_data"),
    ]:
        monkeypatch.setattr(module, name, guard)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the device cases mean "a machine without CUDA"


@dataclass
class Setup:
    """A recipe file plus --set overrides, the text the error must contain, and the folder that must stay as it is."""

    recipe: Path
    overrides: list[str]
    expect: list[str]
    output_dir: Path
    extra_args: list[str] = field(default_factory=list)


def recipe_dict(tmp: Path, model: str = "tiny-random-mixtral") -> dict:
    return {
        "model": {"path": model},
        "data": {"train": [{"path": str(tmp / "train.jsonl")}], "max_length": 64},
        "training": {"max_steps": 2},
        "output_dir": str(tmp / "out"),
    }


def base_recipe(tmp: Path, model: str = "tiny-random-mixtral") -> dict:
    """A recipe that passes every check (with its small data file written), for one mistake to be added to."""
    (tmp / "train.jsonl").write_text(GOOD_RECORD * 3)
    return recipe_dict(tmp, model)


def write_recipe(tmp: Path, recipe: dict | str | bytes, name: str = "recipe.yaml") -> Path:
    path = tmp / name
    if isinstance(recipe, bytes):
        path.write_bytes(recipe)
    else:
        path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    return path


def snapshot(path: Path) -> object:
    """Everything under `path` (names and bytes), or what it is when not a folder; equal means untouched."""
    if not path.exists():
        return None
    if not path.is_dir():
        return ("file", path.read_bytes())
    return sorted((str(p.relative_to(path)), p.read_bytes() if p.is_file() else b"") for p in path.rglob("*"))


def invoke(command: str, setup: Setup):
    args = [command, str(setup.recipe), *setup.extra_args]
    for setting in setup.overrides:
        args += ["--set", setting]
    return CliRunner().invoke(app, args)


def assert_refused_by_both(setup: Setup) -> dict[str, str]:
    """validate and run both exit 2 with the expected text, no traceback, nothing written; returns their stderr."""
    before = snapshot(setup.output_dir)
    outputs = {}
    for command in ("validate", "run"):
        result = invoke(command, setup)
        shown = f"{command}: exit {result.exit_code}, {result.exception!r}\n{result.output}"
        assert result.exit_code == 2, shown
        assert not isinstance(result.exception, ReachedLoading), shown
        assert "Traceback" not in result.output, shown
        assert result.output.startswith("error: "), shown
        for text in setup.expect:
            assert text in result.output, shown
        assert snapshot(setup.output_dir) == before, f"{command} wrote into {setup.output_dir}"
        outputs[command] = result.stderr
        if command == "validate" and result.stdout:  # a refused recipe that loaded is still printed, resolved
            assert result.stdout.startswith(f"# {setup.recipe}: refused (see the error)"), shown
    # one place decides: both commands report the very same problems
    assert outputs["validate"] == outputs["run"]
    return outputs


def recipe_setup(tmp: Path, recipe: dict | str | bytes, expect: list[str], overrides: list[str] = ()) -> Setup:
    path = write_recipe(tmp, recipe)
    return Setup(path, list(overrides), [e.replace("RECIPE", str(path)) for e in expect], tmp / "out")


# --- recipe files that are not UTF-8 YAML text -------------------------------------------------------------------

GOOD_TEXT = yaml.safe_dump(recipe_dict(Path("/nonexistent")), sort_keys=False)

ENCODING_CASES = {
    "utf16-le-bom": ("\ufeff" + GOOD_TEXT).encode("utf-16-le"),
    "utf16-be-bom": ("\ufeff" + GOOD_TEXT).encode("utf-16-be"),
    "utf16-no-bom": GOOD_TEXT.encode("utf-16-le"),
    "utf16-python-default": GOOD_TEXT.encode("utf-16"),
    "png-image": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10",
    "gzip-file": b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xcb\x48\xcd",
    "zip-file": b"PK\x03\x04\x14\x00\x00\x00\x08\x00\xb7\x9a",
    "nul-in-text": b"model:\n  path: tiny\x00-random-mixtral\n",
    "latin1-accent": "model:\n  path: caf\u00e9\n".encode("latin-1"),
    "cp1252-smart-quotes": "output_dir: \u201cout\u201d\n".encode("cp1252"),
    "ansi-colour-in-value": b"model:\n  path: \x1b[31mtiny-random-mixtral\x1b[0m\n",
    "ansi-colour-whole-line": b"\x1b[1;32mmodel:\x1b[0m\n  path: x\n",
    "ansi-reset-at-end": GOOD_TEXT.encode() + b"\x1b[0m\n",
    "bell-character": b"model:\n  path: x\x07\n",
    "backspace": b"output_dir: ou\x08t\n",
    "form-feed": b"model:\n\x0c  path: x\n",
    "escape-sequence-only": b"\x1b[2J\x1b[H",
}

ENCODING_EXPECT = {
    "utf16-le-bom": "RECIPE: the file is UTF-16 text; save it as UTF-8",
    "utf16-be-bom": "RECIPE: the file is UTF-16 text; save it as UTF-8",
    "utf16-no-bom": "RECIPE: the file is UTF-16 text; save it as UTF-8",
    "utf16-python-default": "RECIPE: the file is UTF-16 text; save it as UTF-8",
    "png-image": "RECIPE:1:1: byte 0x89 is not UTF-8: binary data",
    "gzip-file": "RECIPE:1:2: byte 0x8b is not UTF-8: binary data",
    "zip-file": "RECIPE:1:11: byte 0xb7 is not UTF-8: binary data",
    "nul-in-text": "RECIPE:2:13: \\x00 (a control character); delete it",
    "latin1-accent": "RECIPE:2:12: byte 0xe9 is not UTF-8: text in another encoding",
    "cp1252-smart-quotes": "RECIPE:1:13: byte 0x93 is not UTF-8",
    "ansi-colour-in-value": "RECIPE:2:9: \\x1b (ESC, the start of a terminal colour code",
    "ansi-colour-whole-line": "RECIPE:1:1: \\x1b (ESC",
    "ansi-reset-at-end": f"RECIPE:{GOOD_TEXT.count(chr(10)) + 1}:1: \\x1b (ESC",
    "bell-character": "RECIPE:2:10: \\x07 (a control character)",
    "backspace": "RECIPE:1:15: \\x08 (a control character)",
    "form-feed": "RECIPE:2:1: \\x0c (a control character)",
    "escape-sequence-only": "RECIPE:1:5: \\x1b (ESC",
}


@pytest.mark.parametrize("case", sorted(ENCODING_CASES))
def test_recipe_files_that_are_not_utf8_text(tmp_path, case):
    assert_refused_by_both(recipe_setup(tmp_path, ENCODING_CASES[case], [ENCODING_EXPECT[case]]))


# --- duplicate keys ------------------------------------------------------------------------------------------------

DUPLICATE_CASES = {
    "second-lora-section": (
        "model:\n  path: tiny-random-mixtral\nlora:\n  r: 4\ndata:\n  train:\n    - path: TRAIN\n"
        "lora:\n  r: 64\noutput_dir: OUT\n",
        ["RECIPE:8: duplicate key 'lora' (first at line 3)"],
    ),
    "nested-key-twice": (
        "model:\n  path: tiny-random-mixtral\n  quantization: nf4\n  quantization: none\n"
        "data:\n  train:\n    - path: TRAIN\noutput_dir: OUT\n",
        ["RECIPE:4: duplicate key 'model.quantization' (first at line 3)"],
    ),
    "key-in-a-list-item": (
        "model:\n  path: tiny-random-mixtral\ndata:\n  train:\n    - path: TRAIN\n      path: other.jsonl\n"
        "output_dir: OUT\n",
        ["RECIPE:6: duplicate key 'data.train[0].path' (first at line 5)"],
    ),
    "output-dir-twice": (
        "model:\n  path: tiny-random-mixtral\ndata:\n  train:\n    - path: TRAIN\noutput_dir: OUT\noutput_dir: OUT\n",
        ["RECIPE:7: duplicate key 'output_dir' (first at line 6)"],
    ),
    "three-times-all-named": (
        "model:\n  path: tiny-random-mixtral\ndata:\n  train:\n    - path: TRAIN\ntraining:\n  max_steps: 1\n"
        "  max_steps: 2\n  max_steps: 3\noutput_dir: OUT\n",
        [
            "RECIPE:8: duplicate key 'training.max_steps' (first at line 7)",
            "RECIPE:9: duplicate key 'training.max_steps' (first at line 7)",
        ],
    ),
    "flow-mapping": (
        "model: {path: tiny-random-mixtral, path: x}\ndata:\n  train:\n    - path: TRAIN\noutput_dir: OUT\n",
        ["RECIPE:1: duplicate key 'model.path' (first at line 1)"],
    ),
    "quoted-and-plain": (
        'model:\n  path: tiny-random-mixtral\n"model":\n  path: x\ndata:\n  train:\n    - path: TRAIN\noutput_dir: OUT\n',
        ["RECIPE:3: duplicate key 'model' (first at line 1)"],
    ),
    "duplicates-in-two-sections": (
        "model:\n  path: tiny-random-mixtral\n  dtype: auto\n  dtype: float32\ndata:\n  train:\n    - path: TRAIN\n"
        "  max_length: 64\n  max_length: 128\noutput_dir: OUT\n",
        [
            "RECIPE:4: duplicate key 'model.dtype' (first at line 3)",
            "RECIPE:9: duplicate key 'data.max_length' (first at line 8)",
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(DUPLICATE_CASES))
def test_duplicate_keys_name_both_lines(tmp_path, case):
    text, expect = DUPLICATE_CASES[case]
    (tmp_path / "train.jsonl").write_text(GOOD_RECORD)
    text = text.replace("TRAIN", str(tmp_path / "train.jsonl")).replace("OUT", str(tmp_path / "out"))
    assert_refused_by_both(recipe_setup(tmp_path, text, expect))


def test_merge_keys_are_not_duplicates(tmp_path):
    """A YAML merge (`<<: *base`) overridden by an explicit key is intended, not a duplicate."""
    (tmp_path / "train.jsonl").write_text(GOOD_RECORD)
    text = (
        "defaults: &base {r: 4, alpha: 8}\n"
        f"model:\n  path: tiny-random-mixtral\ndata:\n  train:\n    - path: {tmp_path / 'train.jsonl'}\n"
        f"lora:\n  <<: *base\n  r: 8\noutput_dir: {tmp_path / 'out'}\n"
    )
    result = CliRunner().invoke(app, ["validate", str(write_recipe(tmp_path, text))])
    assert result.exit_code == 2 and "duplicate" not in result.output
    assert "defaults: unknown key" in result.output  # the anchor holder itself is an unknown key, as it should be


# --- numbers out of range or not finite ----------------------------------------------------------------------------

NUMBER_CASES = [
    ("training.max_steps=0", "training.max_steps: got 0; use -1"),
    ("training.max_steps=-5", "training.max_steps: got -5; use -1"),
    ("training.max_steps=-2", "training.max_steps: got -2"),
    ("training.max_steps=1e26", "training.max_steps: got '1e26'"),
    ("training.max_steps=100000000000000000000000000", "training.max_steps: got 100000000000000000000000000"),
    ("training.max_steps=1000000001", "training.max_steps: got 1000000001"),
    ("training.max_steps=.inf", "training.max_steps: got inf"),
    ("training.max_steps=2.5", "training.max_steps: got 2.5"),
    ("training.learning_rate=1.0e+999", "training.learning_rate: got inf; input should be a finite number"),
    ("training.learning_rate=.inf", "training.learning_rate: got inf"),
    ("training.learning_rate=-.inf", "training.learning_rate: got -inf"),
    ("training.learning_rate=.nan", "training.learning_rate: got nan"),
    ("training.learning_rate=0", "training.learning_rate: got 0"),
    ("training.learning_rate=-1e-4", "training.learning_rate: got '-1e-4'; input should be greater than 0"),
    ("training.learning_rate=3", "training.learning_rate: got 3"),
    ("training.num_epochs=.inf", "training.num_epochs: got inf"),
    ("training.num_epochs=.nan", "training.num_epochs: got nan"),
    ("training.num_epochs=0", "training.num_epochs: got 0"),
    ("training.num_epochs=100000", "training.num_epochs: got 100000"),
    ("data.max_length=1e20", "data.max_length: got '1e20'"),
    ("data.max_length=100000000000000000000", "data.max_length: got 100000000000000000000"),
    ("data.max_length=0", "data.max_length: got 0"),
    ("data.max_length=2097152", "data.max_length: got 2097152"),
    ("data.max_length=.inf", "data.max_length: got inf"),
    ("training.batch_size=0", "training.batch_size: got 0"),
    ("training.batch_size=1000000", "training.batch_size: got 1000000"),
    ("training.gradient_accumulation_steps=0", "training.gradient_accumulation_steps: got 0"),
    ("training.gradient_accumulation_steps=10000000", "training.gradient_accumulation_steps: got 10000000"),
    ("training.logging_steps=0", "training.logging_steps: got 0"),
    ("training.logging_steps=1e12", "training.logging_steps: got '1e12'"),
    ("training.eval_steps=-3", "training.eval_steps: got -3"),
    ("training.save_steps=10000000000", "training.save_steps: got 10000000000"),
    ("training.save_total_limit=0", "training.save_total_limit: got 0"),
    ("training.warmup_ratio=1.5", "training.warmup_ratio: got 1.5"),
    ("training.warmup_ratio=.nan", "training.warmup_ratio: got nan"),
    ("training.weight_decay=.nan", "training.weight_decay: got nan"),
    ("training.weight_decay=-0.1", "training.weight_decay: got -0.1"),
    ("training.max_grad_norm=.inf", "training.max_grad_norm: got inf"),
    ("training.max_grad_norm=-1", "training.max_grad_norm: got -1"),
    ("training.seed=-1", "training.seed: got -1"),
    ("training.seed=1099511627776", "training.seed: got 1099511627776"),
    ("training.extra.adam_epsilon=.inf", "training.extra.adam_epsilon: got inf; give a finite number"),
    ("lora.r=0", "lora.r: got 0"),
    ("lora.r=1000000", "lora.r: got 1000000"),
    ("lora.alpha=.inf", "lora.alpha: got inf"),
    ("lora.alpha=0", "lora.alpha: got 0"),
    ("lora.expert_r=-1", "lora.expert_r: got -1"),
    ("lora.expert_alpha=.nan", "lora.expert_alpha: got nan"),
    ("lora.dropout=1.0", "lora.dropout: got 1.0"),
    ("lora.dropout=.nan", "lora.dropout: got nan"),
    ("moe.aux_loss_coef=.inf", "moe.aux_loss_coef: got inf"),
    ("moe.aux_loss_coef=1000", "moe.aux_loss_coef: got 1000"),
    ("data.train.0.weight=.inf", "data.train[0].weight: got inf"),
    ("data.train.0.weight=0", "data.train[0].weight: got 0"),
    ("data.train.0.samples=0", "data.train[0].samples: got 0"),
    ("data.train.0.samples=100000000000", "data.train[0].samples: got 100000000000"),
    ("data.eval_fraction=.nan", "data.eval_fraction: got nan"),
    ("data.eval_fraction=1", "data.eval_fraction: got 1"),
    ("data.num_proc=100000", "data.num_proc: got 100000"),
    ("data.shuffle_seed=-1", "data.shuffle_seed: got -1"),
]


@pytest.mark.parametrize(("setting", "expect"), NUMBER_CASES, ids=[c[0] for c in NUMBER_CASES])
def test_numbers_out_of_range_or_not_finite(tmp_path, setting, expect):
    assert_refused_by_both(recipe_setup(tmp_path, base_recipe(tmp_path), [f"  - {expect}"], [setting]))


def test_non_finite_numbers_written_in_the_file(tmp_path):
    recipe = base_recipe(tmp_path)
    recipe["training"] = {"learning_rate": float("inf"), "num_epochs": float("nan")}
    setup = recipe_setup(tmp_path, recipe, ["training.learning_rate: got inf", "training.num_epochs: got nan"])
    assert "learning_rate: .inf" in setup.recipe.read_text()  # written as YAML's infinity
    assert_refused_by_both(setup)


# --- paths: empty strings, missing files, folders without data, wrong extensions ------------------------------------


def path_case(tmp: Path, case: str) -> tuple[list[str], list[str]]:
    """(overrides, expected texts) for one path mistake; files are made in tmp as the case needs."""
    (tmp / "empty-folder").mkdir()
    (tmp / "notes.txt").write_text("2+2=4\n")
    (tmp / "txt-only").mkdir()
    (tmp / "txt-only" / "a.txt").write_text("hello\n")
    (tmp / "empty.jsonl").write_text("")
    (tmp / "blank.jsonl").write_text("\n  \n")
    (tmp / "latin1.jsonl").write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    (tmp / "a-file").write_text("x")
    cases = {
        "model-path-empty": (["model.path="], ["model.path: is empty"]),
        "model-path-blank": (["model.path='  '"], ["model.path: is empty"]),
        "model-path-missing": ([f"model.path={tmp / 'no-model'}"], ["model.path:", "does not exist"]),
        "model-path-relative-missing": (["model.path=./models/mixtral"], ["model.path: './models/mixtral' does not"]),
        "model-path-is-a-file": ([f"model.path={tmp / 'a-file'}"], ["model.path:", "is a file"]),
        "data-path-empty": (["data.train.0.path="], ["data.train[0].path: is empty"]),
        "eval-path-empty": (["data.eval.path="], ["data.eval.path: is empty"]),
        "data-path-missing": ([f"data.train.0.path={tmp / 'nope.jsonl'}"], ["data.train[0].path:", "does not exist"]),
        "data-folder-empty": ([f"data.train.0.path={tmp / 'empty-folder'}"], ["data.train[0].path:", "empty-folder"]),
        "data-txt-file": ([f"data.train.0.path={tmp / 'notes.txt'}"], ["data.train[0].path:", "'.txt'"]),
        "data-folder-of-txt": ([f"data.train.0.path={tmp / 'txt-only'}"], ["data.train[0].path:", "txt-only"]),
        "data-file-empty": ([f"data.train.0.path={tmp / 'empty.jsonl'}"], ["data.train[0].path:", "empty.jsonl"]),
        "data-file-blank": ([f"data.train.0.path={tmp / 'blank.jsonl'}"], ["data.train[0].path:", "blank.jsonl"]),
        "data-file-not-utf8": ([f"data.train.0.path={tmp / 'latin1.jsonl'}"], ["data.train[0].path:", "latin1"]),
        "eval-folder-empty": ([f"data.eval.path={tmp / 'empty-folder'}"], ["data.eval.path:", "empty-folder"]),
        "second-source-txt": (
            [f"data.train.1.path={tmp / 'notes.txt'}"],
            ["data.train[1].path:", "notes.txt"],
        ),
        "unknown-builtin": (["data.train.0.path=builtin:tiny-chats"], ["data.train[0].path:", "builtin:tiny-chat"]),
    }
    return cases[case]


PATH_CASES = [
    "model-path-empty",
    "model-path-blank",
    "model-path-missing",
    "model-path-relative-missing",
    "model-path-is-a-file",
    "data-path-empty",
    "eval-path-empty",
    "data-path-missing",
    "data-folder-empty",
    "data-txt-file",
    "data-folder-of-txt",
    "data-file-empty",
    "data-file-blank",
    "data-file-not-utf8",
    "eval-folder-empty",
    "second-source-txt",
    "unknown-builtin",
]


@pytest.mark.parametrize("case", PATH_CASES)
def test_paths_that_point_at_no_usable_data_or_model(tmp_path, case):
    overrides, expect = path_case(tmp_path, case)
    recipe = base_recipe(tmp_path)
    if case == "second-source-txt":
        recipe["data"]["train"].append({"path": "placeholder.jsonl"})
    assert_refused_by_both(recipe_setup(tmp_path, recipe, expect, overrides))


# --- model folders ---------------------------------------------------------------------------------------------------


def model_folder(tmp: Path, tiny: Path, replace: dict[str, bytes | None]) -> Path:
    """A model folder whose files link to the tiny model's, except those replaced (bytes) or left out (None)."""
    folder = tmp / "model"
    folder.mkdir()
    for source in tiny.iterdir():
        if source.name not in replace:
            (folder / source.name).symlink_to(source)
    for name, content in replace.items():
        if content is not None:
            (folder / name).write_bytes(content)
    return folder


def model_case(tmp: Path, tiny: Path, case: str) -> tuple[Path, list[str]]:
    weights = (tiny / "model.safetensors").read_bytes()
    config = json.loads((tiny / "config.json").read_text())
    no_tokenizer = {n: None for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")}
    pickled = tmp / "pickled.bin"
    torch.save({"w": torch.ones(2)}, pickled)
    tok_config = json.loads((tiny / "tokenizer_config.json").read_text())
    cases = {
        "no-config": ({"config.json": None}, ["has no config.json"]),
        "config-not-json": ({"config.json": b"{ model_type: mixtral"}, ["config.json:1:", "not valid JSON"]),
        "config-is-utf16": ({"config.json": json.dumps(config).encode("utf-16")}, ["config.json", "not valid JSON"]),
        "config-llama": (
            {"config.json": json.dumps({**config, "model_type": "llama", "architectures": ["LlamaForCausalLM"]})},
            ["is a LlamaForCausalLM model"],
        ),
        "config-no-model-type": ({"config.json": json.dumps({"hidden_size": 64})}, ["is a unknown model"]),
        "no-tokenizer-files": (no_tokenizer, ["has no tokenizer files (tokenizer.json or tokenizer.model)"]),
        "tokenizer-json-corrupt": (
            {"tokenizer.json": b"{ not json", "tokenizer.model": None},
            ["cannot load the tokenizer in"],
        ),
        "tokenizer-without-pad": (
            {"tokenizer_config.json": json.dumps({**tok_config, "unk_token": "</s>", "pad_token": None})},
            ["no pad token and no unk token distinct from EOS"],
        ),
        "safetensors-truncated-half": ({"model.safetensors": weights[: len(weights) // 2]}, ["is truncated"]),
        "safetensors-truncated-by-one": ({"model.safetensors": weights[:-1]}, ["is truncated"]),
        "safetensors-header-only": ({"model.safetensors": weights[:4000]}, ["model.safetensors is "]),
        "safetensors-empty": ({"model.safetensors": b""}, ["is truncated or not a safetensors file (0 bytes)"]),
        "safetensors-html-error-page": (
            {"model.safetensors": b"<html><body>403 Forbidden</body></html>"},
            ["is truncated or not a safetensors file"],
        ),
        "safetensors-extra-bytes": ({"model.safetensors": weights + b"\0" * 10}, ["longer than its header says"]),
        "index-names-missing-shard": (
            {
                "model.safetensors.index.json": json.dumps(
                    {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}
                ).encode()
            },
            ["model-00002-of-00002.safetensors is named in model.safetensors.index.json but missing"],
        ),
        "no-weights": ({"model.safetensors": None}, ["has no *.safetensors weights"]),
        "pickle-only-not-allowed": (
            {"model.safetensors": None, "pytorch_model.bin": pickled.read_bytes()},
            ["holds only pickle checkpoints (pytorch_model.bin)", "model.allow_pickle: true"],
        ),
        "pickle-allowed-garbage": (
            {"model.safetensors": None, "pytorch_model.bin": b"\x80\x04garbage" * 20},
            ["pytorch_model.bin is not a readable PyTorch checkpoint"],
        ),
        "pickle-allowed-truncated": (
            {"model.safetensors": None, "pytorch_model.bin": pickled.read_bytes()[:100]},
            ["pytorch_model.bin is not a readable PyTorch checkpoint"],
        ),
        "mistral-format-without-tokenizer-model": (
            {"tokenizer.model": None},
            ["data.chat_format: mistral needs the model's mistral tokenizer file (tokenizer.model)"],
        ),
        "empty-folder": (
            {p.name: None for p in tiny.iterdir()},
            ["has no config.json", "has no tokenizer files", "has no *.safetensors weights"],
        ),
    }
    replace, expect = cases[case]
    replace = {k: v.encode() if isinstance(v, str) else v for k, v in replace.items()}
    return model_folder(tmp, tiny, replace), expect


MODEL_CASES = [
    "no-config",
    "config-not-json",
    "config-is-utf16",
    "config-llama",
    "config-no-model-type",
    "no-tokenizer-files",
    "tokenizer-json-corrupt",
    "tokenizer-without-pad",
    "safetensors-truncated-half",
    "safetensors-truncated-by-one",
    "safetensors-header-only",
    "safetensors-empty",
    "safetensors-html-error-page",
    "safetensors-extra-bytes",
    "index-names-missing-shard",
    "no-weights",
    "pickle-only-not-allowed",
    "pickle-allowed-garbage",
    "pickle-allowed-truncated",
    "mistral-format-without-tokenizer-model",
    "empty-folder",
]


@pytest.mark.parametrize("case", MODEL_CASES)
def test_broken_model_folders(tmp_path, tiny_model_dir, case):
    folder, expect = model_case(tmp_path, tiny_model_dir, case)
    before = snapshot(folder)
    overrides = [f"model.path={folder}"]
    if case.startswith("pickle-allowed"):
        overrides.append("model.allow_pickle=true")
    key = "data.chat_format: " if case.startswith("mistral-format") else "model.path: "
    assert_refused_by_both(recipe_setup(tmp_path, base_recipe(tmp_path), [key, *expect], overrides))
    assert snapshot(folder) == before  # nothing converted or written into the model folder


def test_a_complete_model_folder_gets_to_loading(tmp_path, tiny_model_dir):
    """The same folder with nothing removed passes every check: the cases above fail for their one mistake."""
    folder = model_folder(tmp_path, tiny_model_dir, {})
    setup = recipe_setup(tmp_path, base_recipe(tmp_path, model=str(folder)), [])
    assert CliRunner().invoke(app, ["validate", str(setup.recipe)]).exit_code == 0
    assert isinstance(invoke("run", setup).exception, ReachedLoading)


# --- chat templates --------------------------------------------------------------------------------------------------

TEMPLATE_CASES = {
    "unclosed-expression": ("{% for m in messages %}\n{{ m.content }\n{% endfor %}\n", "FILE:2: Jinja syntax error"),
    "missing-endfor": ("{% for m in messages %}\n{{ m.content }}\n", "FILE:2: Jinja syntax error"),
    "unknown-tag": ("{{ bos_token }}\n\n{% foreach m in messages %}{% endforeach %}\n", "FILE:3: Jinja syntax error"),
    "endif-without-if": ("{% for m in messages %}{{ m.content }}{% endfor %}\n{% endif %}\n", "FILE:2: Jinja syntax"),
    "bad-filter-syntax": ("{% for m in messages %}\n\n\n{{ m.content | }}{% endfor %}\n", "FILE:4: Jinja syntax error"),
    "unbalanced-parenthesis": ("{{ (messages[0]['content'] }}\n", "FILE:1: Jinja syntax error"),
}


@pytest.mark.parametrize("case", sorted(TEMPLATE_CASES))
def test_chat_template_file_with_a_jinja_syntax_error(tmp_path, case):
    text, expect = TEMPLATE_CASES[case]
    template = tmp_path / "chat.jinja"
    template.write_text(text)
    overrides = ["data.chat_format=template", f"data.chat_template={template}"]
    expect = "data.chat_template: " + expect.replace("FILE", str(template))
    assert_refused_by_both(recipe_setup(tmp_path, base_recipe(tmp_path), [expect], overrides))


@pytest.mark.parametrize(
    ("value", "expect"),
    [
        ("{% for m in messages %}{{ m.content }", "data.chat_template: line 1 of the template text: Jinja syntax"),
        ("templates/missing.jinja", "data.chat_template: file not found: templates/missing.jinja"),
        ("TMP/latin1.jinja", "data.chat_template: TMP/latin1.jinja cannot be read as UTF-8"),
        ("TMP/a-folder", "data.chat_template: file not found: TMP/a-folder"),
    ],
    ids=["inline-text", "missing-file", "not-utf8", "folder"],
)
def test_chat_template_values_that_cannot_be_used(tmp_path, value, expect):
    (tmp_path / "latin1.jinja").write_bytes("{{ 'caf\u00e9' }}".encode("latin-1"))
    (tmp_path / "a-folder").mkdir()
    value, expect = value.replace("TMP", str(tmp_path)), expect.replace("TMP", str(tmp_path))
    overrides = ["data.chat_format=template", f"data.chat_template={value}"]
    assert_refused_by_both(recipe_setup(tmp_path, base_recipe(tmp_path), [expect], overrides))


def test_template_format_without_any_template(tmp_path, tiny_model_dir):
    """The tiny model's tokenizer has no chat template of its own, so `template` needs data.chat_template."""
    recipe = base_recipe(tmp_path, model=str(tiny_model_dir))
    expect = ["data.chat_template: chat_format is template but it is not set and the tokenizer has no chat template"]
    assert_refused_by_both(recipe_setup(tmp_path, recipe, expect, ["data.chat_format=template"]))


# --- output_dir --------------------------------------------------------------------------------------------------------

OUTPUT_CASES = {
    "existing-file": ("TMP/a-file", "output_dir: TMP/a-file is an existing file"),
    "under-a-file": ("TMP/a-file/run", "output_dir: TMP/a-file/run cannot be created: TMP/a-file is a file"),
    "deep-under-a-file": ("TMP/a-file/x/y/z", "cannot be created: TMP/a-file is a file"),
    "in-proc": ("/proc/finetune-out/run", "output_dir: /proc/finetune-out/run cannot be created"),
    "in-sys": ("/sys/finetune-out", "output_dir: /sys/finetune-out cannot be created"),
    "empty": ("", "output_dir: is empty"),
    "blank": ("'   '", "output_dir: is empty"),
    "finished-run": ("TMP/finished", "output_dir: TMP/finished already holds a finished run (metrics.json, adapter)"),
}


@pytest.mark.parametrize("case", sorted(OUTPUT_CASES))
def test_output_dir_that_cannot_be_used(tmp_path, case):
    (tmp_path / "a-file").write_text("keep me")
    finished = tmp_path / "finished"
    (finished / "adapter").mkdir(parents=True)
    (finished / "metrics.json").write_text('{"steps": 3}')
    value, expect = (s.replace("TMP", str(tmp_path)) for s in OUTPUT_CASES[case])
    setup = recipe_setup(tmp_path, base_recipe(tmp_path), [expect], [f"output_dir={value}"])
    setup.output_dir = Path(value.strip("' ")) if value.strip("' ") else tmp_path
    before = snapshot(tmp_path)
    assert_refused_by_both(setup)
    assert snapshot(tmp_path) == before  # a file is not replaced, a finished run not lost, no probe left behind


def test_finished_run_markers_are_those_run_writes():
    import finetune.train.preflight
    import finetune.train.run

    assert finetune.train.preflight.FINISHED_MARKERS == finetune.train.run.FINISHED_MARKERS


def test_finished_run_is_accepted_by_both_with_overwrite(tmp_path):
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "metrics.json").write_text("{}")
    setup = recipe_setup(tmp_path, base_recipe(tmp_path), [], [f"output_dir={finished}"])
    setup.extra_args = ["--overwrite"]
    assert invoke("validate", setup).exit_code == 0
    assert isinstance(invoke("run", setup).exception, ReachedLoading)
    assert (finished / "metrics.json").read_text() == "{}"


# --- device --------------------------------------------------------------------------------------------------------------

DEVICE_CASES = {
    "builtin-model": ([], ["model.device: 'cuda' was asked for but no CUDA GPU is visible"]),
    "local-model": (["model.path=LOCAL"], ["model.device: 'cuda' was asked for"]),
    "with-cpu-dtype-settings": (["model.dtype=bfloat16", "model.quantization=none"], ["model.device: 'cuda'"]),
    "with-another-problem": (["output_dir=TMP/a-file"], ["model.device: 'cuda'", "output_dir: TMP/a-file is an"]),
}


@pytest.mark.parametrize("case", sorted(DEVICE_CASES))
def test_cuda_device_on_a_machine_without_cuda(tmp_path, tiny_model_dir, case):
    (tmp_path / "a-file").write_text("x")
    overrides, expect = DEVICE_CASES[case]
    overrides = ["model.device=cuda", *(o.replace("LOCAL", str(tiny_model_dir)) for o in overrides)]
    overrides = [o.replace("TMP", str(tmp_path)) for o in overrides]
    expect = [e.replace("TMP", str(tmp_path)) for e in expect]
    assert_refused_by_both(recipe_setup(tmp_path, base_recipe(tmp_path), expect, overrides))


# --- method, and the contract itself ---------------------------------------------------------------------------------


def test_unavailable_method_is_refused_by_both(tmp_path, monkeypatch):
    """A method the schema knows but this build cannot train (the gate a new method passes through)."""
    import finetune.train.preflight

    monkeypatch.setattr(finetune.train.preflight, "AVAILABLE_METHODS", ("sft",))
    overrides = ["method=dpo", "data.train.0.path=builtin:tiny-preference"]
    setup = recipe_setup(tmp_path, base_recipe(tmp_path), ["method: 'dpo' is not available yet"], overrides)
    assert_refused_by_both(setup)


# --- preference methods (dpo, kto): their sections, their data, their starting adapter ---------------------------

PAIRS, UNPAIRED = "data.train.0.path=builtin:tiny-preference", "data.train.0.path=builtin:tiny-unpaired"
DPO, KTO = ["method=dpo", PAIRS], ["method=kto", UNPAIRED, "training.batch_size=2"]  # the kto loss needs 2+

PREFERENCE_CASES = {
    "dpo-beta-zero": ([*DPO, "dpo.beta=0"], ["dpo.beta: got 0; input should be greater than 0"]),
    "dpo-beta-text": ([*DPO, "dpo.beta=strong"], ["dpo.beta: got 'strong'"]),
    "dpo-beta-inf": ([*DPO, "dpo.beta=.inf"], ["dpo.beta: got inf"]),
    "dpo-beta-huge": ([*DPO, "dpo.beta=1e6"], ["dpo.beta: got '1e6'"]),
    "dpo-loss-typo": ([*DPO, "dpo.loss_type=sigmod"], ["dpo.loss_type: unknown loss 'sigmod'; did you mean sigmoid?"]),
    "dpo-loss-typo-in-list": ([*DPO, "dpo.loss_type=[sigmoid, ipoo]"], ["dpo.loss_type: unknown loss 'ipoo'"]),
    "dpo-loss-weights-length": (
        [*DPO, "dpo.loss_type=[sigmoid, sft]", "dpo.loss_weights=[1.0, 0.5, 0.2]"],
        ["dpo.loss_weights: has 3 weight(s) for 2 loss_type(s)"],
    ),
    "dpo-loss-weight-negative": ([*DPO, "dpo.loss_weights=[-1]"], ["dpo.loss_weights: got [-1.0]"]),
    "dpo-loss-weight-nan": ([*DPO, "dpo.loss_weights=[.nan]"], ["dpo.loss_weights[0]: got nan"]),
    "dpo-robust-label-smoothing": (
        [*DPO, "dpo.loss_type=robust", "dpo.label_smoothing=0.6"],
        ["dpo.label_smoothing: got 0.6; input should be less than 0.5"],
    ),
    "dpo-exo-without-label-smoothing": ([*DPO, "dpo.loss_type=exo_pair"], ["dpo.label_smoothing: must be > 0"]),
    "dpo-f-divergence-loss": (
        [*DPO, "dpo.loss_type=nca_pair", "dpo.f_divergence_type=forward_kl"],
        ["dpo.f_divergence_type: forward_kl does not apply to loss nca_pair"],
    ),
    "dpo-weighting-aot": ([*DPO, "dpo.loss_type=aot", "dpo.use_weighting=true"], ["dpo.use_weighting: does not"]),
    "dpo-ld-alpha-range": ([*DPO, "dpo.ld_alpha=2"], ["dpo.ld_alpha: got 2"]),
    "kto-beta-negative": ([*KTO, "kto.beta=-0.1"], ["kto.beta: got -0.1"]),
    "kto-loss-unknown": ([*KTO, "kto.loss_type=sigmoid"], ["kto.loss_type: got 'sigmoid'; accepted: 'kto'"]),
    "kto-weight-zero": ([*KTO, "kto.desirable_weight=0"], ["kto.desirable_weight: got 0"]),
    "kto-weight-inf": ([*KTO, "kto.undesirable_weight=.inf"], ["kto.undesirable_weight: got inf"]),
    "kto-batch-of-one": ([*KTO, "training.batch_size=1"], ["training.batch_size: got 1; the kto loss needs >= 2"]),
    "dpo-section-with-sft": (["dpo.beta=0.2"], ["dpo: section given but method is sft; set method: dpo or remove"]),
    "kto-section-with-dpo": ([*DPO, "kto.beta=0.2"], ["kto: section given but method is dpo"]),
    "extra-owned-by-dpo": ([*DPO, "training.extra.beta=0.5"], ["training.extra.beta: set by the recipe; use dpo.beta"]),
    "extra-owned-by-kto": ([*KTO, "training.extra.undesirable_weight=2"], ["use kto.undesirable_weight instead"]),
    "extra-activation-checkpointing": (
        ["training.extra.activation_checkpointing=true"],
        ["training.extra.activation_checkpointing: set by the recipe; use training.gradient_checkpointing"],
    ),
    "extra-not-in-kto-config": ([*KTO, "training.extra.loss_weights=[1]"], ["not an argument of trl.KTOConfig"]),
    "extra-sync-ref-model": ([*DPO, "training.extra.sync_ref_model=true"], ["training.extra.sync_ref_model: TRL"]),
    "dpo-on-chat-data": (
        ["method=dpo", "data.train.0.path=builtin:tiny-chat"],
        ["data.train[0]: builtin:tiny-chat is in messages format", "method: dpo needs preference pairs"],
    ),
    "dpo-on-local-chat-file": (["method=dpo"], ["data.train[0]: ", "train.jsonl is in messages format"]),
    "sft-on-preference-data": ([PAIRS], ["data.train[0]: builtin:tiny-preference is in preference format"]),
    "kto-on-chat-data": ([*KTO, "data.train.0.path=builtin:tiny-chat"], ["method: kto needs unpaired"]),
    "dpo-on-unpaired-data": (["method=dpo", UNPAIRED], ["builtin:tiny-unpaired is in unpaired format"]),
}


@pytest.mark.parametrize("case", sorted(PREFERENCE_CASES))
def test_preference_settings_and_data_that_cannot_train(tmp_path, case):
    overrides, expect = PREFERENCE_CASES[case]
    assert_refused_by_both(recipe_setup(tmp_path, base_recipe(tmp_path), expect, overrides))


def init_adapter_case(tmp: Path, case: str) -> tuple[str, list[str]]:
    """(init_adapter value, expected texts): folders that are not a finished run's adapter."""
    run = tmp / "sft-run"
    (run / "adapter").mkdir(parents=True)
    (run / "metrics.json").write_text("{}")
    (tmp / "a-file").write_text("x")
    cases = {
        "missing": (str(tmp / "no-such-run"), ["dpo.init_adapter: ", "no-such-run' does not exist"]),
        "empty": ("' '", ["dpo.init_adapter: is empty"]),
        "a-file": (str(tmp / "a-file"), ["dpo.init_adapter: ", "a-file' is a file"]),
        "run-without-adapter-files": (
            str(run),
            [f"dpo.init_adapter: {run / 'adapter'} has no adapter_config.json and no adapter_model.safetensors"],
        ),
        "adapter-without-weights": (str(run / "adapter"), ["has no adapter_model.safetensors"]),
        "config-not-json": (str(run / "adapter"), ["adapter_config.json is not readable JSON"]),
        "not-lora": (str(run), ["is not a LoRA adapter config (peft_type IA3)"]),
    }
    if case in ("adapter-without-weights", "config-not-json", "not-lora"):
        (run / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    if case in ("config-not-json", "not-lora"):
        (run / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 8)
    if case == "config-not-json":
        (run / "adapter" / "adapter_config.json").write_text("{ r: 4")
    if case == "not-lora":
        (run / "adapter" / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    return cases[case]


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "empty",
        "a-file",
        "run-without-adapter-files",
        "adapter-without-weights",
        "config-not-json",
        "not-lora",
    ],
)
def test_init_adapter_that_is_not_an_adapter(tmp_path, case):
    value, expect = init_adapter_case(tmp_path, case)
    before = snapshot(tmp_path / "sft-run")
    overrides = [*DPO, f"dpo.init_adapter={value}"]
    assert_refused_by_both(recipe_setup(tmp_path, base_recipe(tmp_path), expect, overrides))
    assert snapshot(tmp_path / "sft-run") == before


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_preference_recipes_get_to_loading(tmp_path, method):
    """The cases above fail for their one mistake: the same recipe without it passes validate and reaches loading."""
    run = tmp_path / "sft-run" / "adapter"
    run.mkdir(parents=True)
    (run / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (run / "adapter_model.safetensors").write_bytes(b"\0" * 8)
    overrides = [*(DPO if method == "dpo" else KTO), f"{method}.init_adapter={run.parent}"]
    setup = recipe_setup(tmp_path, base_recipe(tmp_path), [], overrides)
    result = invoke("validate", setup)
    assert result.exit_code == 0, result.output
    assert isinstance(invoke("run", setup).exception, ReachedLoading)


def test_validate_and_run_agree_on_a_good_recipe(tmp_path, tiny_model_dir):
    """The contract's other half: what validate accepts, run takes up to loading, building nothing before it."""
    for model in ("tiny-random-mixtral", str(tiny_model_dir)):
        setup = recipe_setup(tmp_path, base_recipe(tmp_path, model=model), [])
        result = invoke("validate", setup)
        assert result.exit_code == 0, result.output
        assert isinstance(invoke("run", setup).exception, ReachedLoading)
        assert not (tmp_path / "out").exists()


EVALUATION_CASES = {
    "missing data file": ("evaluation.data", ["TMP/absent.jsonl"], "evaluation.data[0]"),
    "generation file without references": ("evaluation.generation", ["TMP/noref.jsonl"], "evaluation.generation[0]"),
    "task file that does not parse": (
        "evaluation.tasks",
        ["TMP/broken.yaml"],
        "broken.yaml:2: the task file is not valid YAML",
    ),
}


@pytest.mark.parametrize("case", sorted(EVALUATION_CASES))
def test_evaluation_section_that_cannot_run(tmp_path, case):
    """The `evaluation:` section's files and tasks are refused up front by both commands, naming the entry."""
    (tmp_path / "noref.jsonl").write_text('{"prompt": "2+2="}\n')
    (tmp_path / "broken.yaml").write_text("task: [unclosed\n")
    key, value, expect = EVALUATION_CASES[case]
    recipe = base_recipe(tmp_path)
    recipe["evaluation"] = {key.split(".")[1]: [v.replace("TMP", str(tmp_path)) for v in value]}
    setup = recipe_setup(tmp_path, recipe, [expect])
    before = snapshot(tmp_path)
    assert_refused_by_both(setup)
    assert snapshot(tmp_path) == before


def test_every_preflight_refusal_is_covered_by_the_corpus():
    """Each kind of check in finetune.train.preflight has cases here, so a new refusal cannot skip the contract."""
    import inspect

    import finetune.train.preflight as preflight

    checks = {
        name
        for name, fn in inspect.getmembers(preflight, inspect.isfunction)
        if fn.__module__ == preflight.__name__ and name.endswith("_problems")
    }
    covered = {
        "method_problems": test_unavailable_method_is_refused_by_both,
        "data_kind_problems": test_preference_settings_and_data_that_cannot_train,
        "init_adapter_problems": test_init_adapter_that_is_not_an_adapter,
        "output_dir_problems": test_output_dir_that_cannot_be_used,
        "data_problems": test_paths_that_point_at_no_usable_data_or_model,
        "chat_format_problems": test_broken_model_folders,  # mistral format without tokenizer.model
        "template_problems": test_chat_template_file_with_a_jinja_syntax_error,
        "evaluation_problems": test_evaluation_section_that_cannot_run,
    }
    assert checks == set(covered), f"add corpus cases for {checks - set(covered)}"


# --- the real command line -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("ansi", lambda tmp: (b"model:\n  path: \x1b[31mx\x1b[0m\n", ":2:9: \\x1b (ESC")),
        ("inf", lambda tmp: (yaml.safe_dump(base_recipe(tmp)) + "method: sft\n", None)),
    ],
    ids=["ansi", "good-file-bad-set"],
)
def test_real_cli_exits_2_without_traceback(tmp_path, name, make: Callable):
    content, expect = make(tmp_path)
    recipe = write_recipe(tmp_path, content)
    extra = ["--set", "training.learning_rate=1.0e+999"] if expect is None else []
    expect = expect or "training.learning_rate: got inf"
    result = subprocess.run(
        [sys.executable, "-m", "finetune.cli", "run", str(recipe), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    assert expect in result.stderr
    assert not (tmp_path / "out").exists()
