"""The recipe contract: every shipped recipe is valid, every kind of bad input is reported at once, by key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune.errors import UserError
from finetune.recipe.errors import explain
from finetune.recipe.schema import Recipe, apply_overrides, dump_recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def write(tmp_path: Path, data: dict | str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def minimal(tmp_path: Path) -> dict:
    data_file = tmp_path / "train.jsonl"
    data_file.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    return {
        "model": {"path": "tiny-random-mixtral"},
        "data": {"train": [{"path": str(data_file)}]},
        "output_dir": str(tmp_path / "out"),
    }


def problems_of(path: Path, overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(UserError) as info:
        load_recipe(path, overrides)
    return info.value.problems


@pytest.mark.parametrize("recipe_file", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_is_valid(recipe_file: Path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(recipe_file)
    assert recipe.output_dir
    header = recipe_file.read_text().splitlines()[:3]
    assert any("finetune run recipes/" in line for line in header), "header must give the launch command"


def test_shipped_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"tiny-mixtral-sft.yaml", "mixtral-8x7b-qlora-sft.yaml"} <= names


def test_real_recipe_is_qlora_on_attention_and_experts(monkeypatch):
    monkeypatch.chdir(ROOT)
    r = load_recipe(ROOT / "recipes" / "mixtral-8x7b-qlora-sft.yaml")
    assert r.model.quantization == "nf4" and r.model.double_quant
    assert set(r.lora.attention_targets) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(r.lora.expert_targets) == {"gate_up_proj", "down_proj"}
    assert r.data.max_length == 4096 and r.data.packing
    assert r.training.gradient_checkpointing and r.training.optimizer == "paged_adamw_8bit"
    assert r.training.lr_scheduler == "cosine"


def test_defaults_are_filled(tmp_path):
    r = load_recipe(write(tmp_path, minimal(tmp_path)))
    assert r.method == "sft" and r.model.quantization == "nf4" and r.moe.aux_loss_coef == 0.02
    assert r.lora.expert_targets == ["gate_up_proj", "down_proj"]
    # the dump is itself a valid recipe with the same content
    again = load_recipe(write(tmp_path, dump_recipe(r), "again.yaml"))
    assert again == r


def test_unknown_keys_suggest_the_closest(tmp_path):
    data = minimal(tmp_path)
    data["lora"] = {"alpah": 8}
    data["trainig"] = {}
    problems = problems_of(write(tmp_path, data))
    assert "lora.alpah: unknown key; did you mean lora.alpha?" in problems
    assert "trainig: unknown key; did you mean training?" in problems


def test_wrong_type_and_value_name_key_given_and_accepted(tmp_path):
    data = minimal(tmp_path)
    data["model"]["quantization"] = "nf5"
    data["model"]["dtype"] = "bf16"
    data["training"] = {"learning_rate": "fast", "batch_size": 0}
    problems = problems_of(write(tmp_path, data))
    assert any(p.startswith("model.quantization: got 'nf5'; accepted:") and "'nf4'" in p for p in problems)
    assert any(p.startswith("model.dtype: got 'bf16'") for p in problems)
    assert any(p.startswith("training.learning_rate: got 'fast'") for p in problems)
    assert any(p.startswith("training.batch_size: got 0") for p in problems)
    assert len(problems) == 4


def test_missing_paths_are_named(tmp_path):
    data = minimal(tmp_path)
    data["model"]["path"] = str(tmp_path / "no-model")
    data["data"]["train"].append({"path": "nowhere/train.jsonl"})
    problems = problems_of(write(tmp_path, data))
    assert any(p.startswith("model.path:") and "does not exist" in p for p in problems)
    assert any(p.startswith("data.train[1].path: 'nowhere/train.jsonl' does not exist") for p in problems)


def test_missing_required_keys(tmp_path):
    problems = problems_of(write(tmp_path, {"model": {}}))
    assert {"model.path: required key is missing", "data: required key is missing"} <= set(problems)
    assert "output_dir: required key is missing" in problems


def test_yaml_syntax_error_gives_line_and_column(tmp_path):
    path = write(tmp_path, "model:\n  path: x\n  bad: [1, 2\n")
    with pytest.raises(UserError) as info:
        load_recipe(path)
    assert f"{path}:4:1: YAML syntax error" in str(info.value)


def test_aux_loss_off_must_be_explicit(tmp_path):
    data = minimal(tmp_path)
    data["moe"] = {"aux_loss_coef": 0}
    problems = problems_of(write(tmp_path, data))
    assert any("moe.aux_loss: false" in p for p in problems)
    data["moe"] = {"aux_loss": False, "aux_loss_coef": 0}
    assert load_recipe(write(tmp_path, data)).moe.aux_loss is False


def test_extra_passthrough_is_checked_against_trl(tmp_path):
    data = minimal(tmp_path)
    data["training"] = {"extra": {"warmup_stepz": 3, "learning_rate": 1.0, "dataloader_pin_memory": False}}
    problems = problems_of(write(tmp_path, data))
    assert "training.extra.warmup_stepz: not an argument of trl.SFTConfig (did you mean warmup_steps?)" in problems
    assert "training.extra.learning_rate: set by the recipe; use training.learning_rate instead" in problems
    assert len(problems) == 2


def test_all_problems_reported_together(tmp_path):
    data = minimal(tmp_path)
    data["model"]["quantization"] = "q3"
    data["lora"] = {"rank": 4}
    data["data"]["train"][0]["path"] = "missing.jsonl"
    data["training"] = {"extra": {"nope": 1}}
    problems = problems_of(write(tmp_path, data))
    assert len(problems) == 4


def test_overrides_are_typed_by_the_schema(tmp_path):
    path = write(tmp_path, minimal(tmp_path))
    r = load_recipe(path, ["training.max_steps=7", "lora.router=trainable", "data.train.0.weight=2"])
    assert r.training.max_steps == 7 and r.lora.router == "trainable" and r.data.train[0].weight == 2.0
    problems = problems_of(path, ("training.max_steps=seven", "lora.rnak=4", "novalue"))
    assert any(p.startswith("training.max_steps: got 'seven'") for p in problems)
    assert "lora.rnak: unknown key; did you mean lora.r?" in problems or any("lora.rnak" in p for p in problems)
    assert any(p.startswith("--set 'novalue'") for p in problems)


def test_apply_overrides_reports_non_mapping():
    data = {"output_dir": "x"}
    assert apply_overrides(data, ["output_dir.sub=1"]) == ["--set output_dir.sub: output_dir is not a mapping"]


def test_every_field_is_described():
    rows = explain(Recipe)
    keys = {row[0] for row in rows}
    assert {"model.path", "lora.expert_r", "training.max_steps", "data.max_length", "output_dir"} <= keys
    assert all(row[3] for row in rows), [row[0] for row in rows if not row[3]]


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_cli_validate_bad_recipe_exits_2_without_traceback(tmp_path):
    data = minimal(tmp_path)
    data["lora"] = {"alpah": 8}
    out = run_cli("validate", str(write(tmp_path, data)))
    assert out.returncode == 2
    assert "lora.alpah: unknown key; did you mean lora.alpha?" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_cli_validate_prints_resolved_recipe_and_explain(tmp_path):
    # output_dir in tmp_path: the shipped one may hold a finished run, which validate (like run) refuses
    overrides = ("--set", "training.max_steps=3", "--set", f"output_dir={tmp_path / 'out'}")
    out = run_cli("validate", "recipes/tiny-mixtral-sft.yaml", *overrides, "--explain")
    assert out.returncode == 0, out.stderr
    assert "max_steps: 3" in out.stdout
    assert "lora.expert_r" in out.stdout and "LoRA rank of the expert adapters" in out.stdout


def test_duplicate_keys_are_refused_naming_both_lines(tmp_path):
    text = yaml.safe_dump(minimal(tmp_path), sort_keys=False) + "lora:\n  r: 4\nlora:\n  r: 8\n  r: 16\n"
    path = write(tmp_path, text)
    with pytest.raises(UserError) as info:
        load_recipe(path)
    lines = len(text.splitlines())
    assert info.value.problems == [
        f"{path}:{lines - 2}: duplicate key 'lora' (first at line {lines - 4})",
        f"{path}:{lines}: duplicate key 'lora.r' (first at line {lines - 1})",
    ]


@pytest.mark.parametrize(
    ("raw", "expect"),
    [
        (b"model:\n  path: \x1b[1mx\n", ":2:9: \\x1b (ESC, the start of a terminal colour code such as \\x1b[31m)"),
        ("model:\n  path: x\n".encode("utf-16"), ": the file is UTF-16 text; save it as UTF-8"),
        (b"model:\n  path: x\xff\n", ":2:10: byte 0xff is not UTF-8: text in another encoding"),
        (b"\x00\x01\x02\x03\xff\xfa", ":1:5: byte 0xff is not UTF-8: binary data, not text"),
    ],
    ids=["ansi", "utf16", "latin1", "binary"],
)
def test_recipe_files_that_are_not_utf8_text_name_the_place(tmp_path, raw, expect):
    path = tmp_path / "r.yaml"
    path.write_bytes(raw)
    with pytest.raises(UserError) as info:
        load_recipe(path)
    assert f"{path}{expect}" in str(info.value)


def test_a_utf8_byte_order_mark_is_fine(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + yaml.safe_dump(minimal(tmp_path)).encode())
    assert load_recipe(path).model.path == "tiny-random-mixtral"


def test_the_edges_of_every_range_are_accepted(tmp_path):
    path = write(tmp_path, minimal(tmp_path))
    edges = [
        "training.max_steps=1000000000",
        "training.learning_rate=1",
        "training.num_epochs=10000",
        "training.seed=4294967295",
        "data.max_length=1048576",
        "lora.r=65536",
        "training.batch_size=65536",
    ]
    r = load_recipe(path, edges)
    assert (r.training.max_steps, r.training.learning_rate, r.data.max_length, r.lora.r) == (10**9, 1, 2**20, 2**16)
    assert load_recipe(path, ["training.max_steps=-1"]).training.max_steps == -1
    assert load_recipe(path, ["training.max_steps=1"]).training.max_steps == 1


@pytest.mark.parametrize("value", ["0", "-5", "-2", "1000000001", ".inf"])
def test_max_steps_is_minus_one_or_a_step_count(tmp_path, value):
    problems = problems_of(write(tmp_path, minimal(tmp_path)), (f"training.max_steps={value}",))
    assert len(problems) == 1 and problems[0].startswith("training.max_steps: got ")


def test_empty_model_and_data_paths_name_the_key(tmp_path):
    data = minimal(tmp_path)
    data["model"]["path"] = ""
    data["data"]["train"][0]["path"] = " "
    problems = problems_of(write(tmp_path, data))
    assert problems == [
        "model.path: is empty; give a local folder, a hub id (org/name) or the built-in 'tiny-random-mixtral'",
        "data.train[0].path: is empty; give a data file or folder, a hub dataset id or builtin:tiny-chat",
    ]
