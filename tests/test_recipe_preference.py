"""The `dpo:` and `kto:` recipe sections: TRL is the oracle for names and defaults, and every value TRL would refuse
after the model has loaded is refused by the recipe first, naming the key."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import trl
import yaml

from finetune.errors import UserError
from finetune.recipe.preference import DPO_LOSSES, DpoSettings, KtoSettings
from finetune.recipe.schema import (
    dump_recipe,
    load_recipe,
    method_config_arguments,
    method_settings,
    trainer_config_fields,
)

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"dpo": (DpoSettings, trl.DPOConfig), "kto": (KtoSettings, trl.KTOConfig)}
DATA = {"sft": "builtin:tiny-chat", "dpo": "builtin:tiny-preference", "kto": "builtin:tiny-unpaired"}


def trl_field(config_cls: type, name: str) -> dataclasses.Field:
    return {f.name: f for f in dataclasses.fields(config_cls)}[name]


def trl_default(config_cls: type, name: str):
    f = trl_field(config_cls, name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def recipe_file(tmp_path: Path, method: str, **sections) -> Path:
    data = {
        "model": {"path": "tiny-random-mixtral"},
        "data": {"train": [{"path": DATA[method]}]},
        "method": method,
        "training": {"batch_size": 2},
        "output_dir": str(tmp_path / "out"),
        **sections,
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def problems_of(path: Path, *overrides: str) -> list[str]:
    with pytest.raises(UserError) as info:
        load_recipe(path, overrides)
    return info.value.problems


# --- TRL as the oracle ---------------------------------------------------------------------------------------------


def test_dpo_loss_names_are_exactly_those_trl_accepts():
    """A TRL upgrade that adds or drops a loss fails here, so the Literal is updated with it."""
    help_text = trl_field(trl.DPOConfig, "loss_type").metadata["help"]
    assert set(DPO_LOSSES) == set(re.findall(r"`'(\w+)'`", help_text))
    annotation = DpoSettings.model_fields["loss_type"].annotation
    assert set(typing.get_args(typing.get_args(annotation)[0])) == set(DPO_LOSSES)


def test_kto_loss_names_are_exactly_those_trl_accepts():
    choices = trl_field(trl.KTOConfig, "loss_type").metadata["choices"]
    assert set(typing.get_args(KtoSettings.model_fields["loss_type"].annotation)) == set(choices)


@pytest.mark.parametrize("method", sorted(SECTIONS))
def test_section_keys_are_trl_arguments_with_trl_defaults(method):
    settings_cls, config_cls = SECTIONS[method]
    fields = trainer_config_fields(method)
    for name in settings_cls.model_fields:
        if name == "init_adapter":  # ours: the adapter to start from, not a TRL argument
            continue
        assert name in fields, name
        assert getattr(settings_cls(), name) == trl_default(config_cls, name), name


@pytest.mark.parametrize("method", sorted(SECTIONS))
def test_method_config_arguments_build_the_trl_config(tmp_path, method):
    written = {"beta": 0.25}
    if method == "dpo":
        written.update(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], label_smoothing=0.1)
    else:
        written.update(loss_type="apo_zero_unpaired", desirable_weight=1.5)
    recipe = load_recipe(recipe_file(tmp_path, method, **{method: written}))
    arguments = method_config_arguments(recipe)
    assert "init_adapter" not in arguments
    config = SECTIONS[method][1](output_dir=str(tmp_path / "trl"), use_cpu=True, **arguments)
    for name, value in written.items():
        assert getattr(config, name) == value, name


# --- accepted recipes ------------------------------------------------------------------------------------------------


def test_a_single_loss_name_becomes_a_list(tmp_path):
    recipe = load_recipe(recipe_file(tmp_path, "dpo", dpo={"loss_type": "ipo"}))
    assert recipe.dpo.loss_type == ["ipo"]
    combined = load_recipe(
        recipe_file(tmp_path, "dpo", dpo={"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1]})
    )
    assert combined.dpo.loss_type == ["sigmoid", "bco_pair", "sft"] and combined.dpo.loss_weights == [0.8, 0.2, 1.0]


def test_method_settings_is_the_methods_section_with_defaults(tmp_path):
    assert method_settings(load_recipe(recipe_file(tmp_path, "sft"))) is None
    dpo = load_recipe(recipe_file(tmp_path, "dpo"))
    assert method_settings(dpo) == DpoSettings() and isinstance(method_settings(dpo), DpoSettings)
    kto = load_recipe(recipe_file(tmp_path, "kto", kto={"desirable_weight": 2.0}))
    assert method_settings(kto) == KtoSettings(desirable_weight=2.0)


@pytest.mark.parametrize("method", ["sft", "dpo", "kto"])
def test_the_dump_holds_only_the_methods_section_and_loads_again(tmp_path, method):
    recipe = load_recipe(recipe_file(tmp_path, method))
    dumped = yaml.safe_load(dump_recipe(recipe))
    assert {"dpo", "kto"} & set(dumped) == ({method} - {"sft"})
    again = tmp_path / "again.yaml"
    again.write_text(dump_recipe(recipe))
    assert load_recipe(again) == recipe


def test_kto_takes_preference_pairs_too(tmp_path):
    path = recipe_file(tmp_path, "kto")
    result = cli("validate", str(path), "--set", "data.train.0.path=builtin:tiny-preference")
    assert result.returncode == 0, result.stderr


def test_init_adapter_accepts_an_adapter_folder_or_a_run_folder(tmp_path):
    run = tmp_path / "sft-run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 8)
    for folder in (run, run / "adapter"):
        result = cli("validate", str(recipe_file(tmp_path, "dpo", dpo={"init_adapter": str(folder)})))
        assert result.returncode == 0, result.stderr


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune.cli", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_validate_accepts_a_preference_recipe_on_builtin_data(tmp_path, method):
    result = cli("validate", str(recipe_file(tmp_path, method)))
    assert result.returncode == 0, result.stderr
    assert f"method: {method}" in result.stdout and f"\n{method}:\n  beta: 0.1" in result.stdout


def test_explain_describes_both_sections(tmp_path):
    result = cli("validate", "recipes/tiny-mixtral-dpo.yaml", "--set", f"output_dir={tmp_path / 'o'}", "--explain")
    assert result.returncode == 0, result.stderr
    flat = " ".join(result.stdout.split())
    for key in ("dpo.beta", "dpo.loss_type", "dpo.init_adapter", "kto.desirable_weight", "kto.loss_type"):
        assert key in result.stdout, key
    assert "list, each one of: sigmoid, hinge" in flat
    assert "the reference is base + this adapter, frozen" in flat


# --- refused values: the key and the fix in one line -----------------------------------------------------------------

BAD_DPO = [
    ({"beta": 0}, "dpo.beta: got 0; input should be greater than 0"),
    ({"beta": "high"}, "dpo.beta: got 'high'"),
    ({"beta": float("inf")}, "dpo.beta: got inf"),
    ({"beta": 1000}, "dpo.beta: got 1000; input should be less than or equal to 100"),
    ({"loss_type": "sigmod"}, "dpo.loss_type: unknown loss 'sigmod'; did you mean sigmoid? accepted: sigmoid,"),
    ({"loss_type": ["sigmoid", "hinj"]}, "dpo.loss_type: unknown loss 'hinj'; did you mean hinge?"),
    ({"loss_type": []}, "dpo.loss_type: is empty"),
    ({"loss_type": 3}, "dpo.loss_type: got 3"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "dpo.loss_weights: has 1 weight(s) for 2 loss_type(s)"),
    ({"loss_weights": [-0.5]}, "dpo.loss_weights: got [-0.5]; every weight must be >= 0"),
    ({"loss_weights": [float("nan")]}, "dpo.loss_weights[0]: got nan"),
    ({"loss_weights": "1.0"}, "dpo.loss_weights: got '1.0'"),
    ({"label_smoothing": 0.5}, "dpo.label_smoothing: got 0.5; input should be less than 0.5"),
    ({"loss_type": "robust", "label_smoothing": -0.1}, "dpo.label_smoothing: got -0.1"),
    ({"loss_type": "exo_pair"}, "dpo.label_smoothing: must be > 0 for the exo_pair loss"),
    ({"loss_type": "apo_zero", "f_divergence_type": "js_divergence"}, "dpo.f_divergence_type: js_divergence does"),
    ({"f_divergence_type": "kl"}, "dpo.f_divergence_type: got 'kl'; accepted: 'reverse_kl'"),
    ({"loss_type": "aot", "use_weighting": True}, "dpo.use_weighting: does not work with the aot/aot_unpaired"),
    ({"f_alpha_divergence_coef": 0.3}, "dpo.f_alpha_divergence_coef: 0.3 has no effect unless"),
    ({"discopop_tau": 0.1}, "dpo.discopop_tau: 0.1 has no effect unless loss_type includes discopop"),
    ({"ld_alpha": 1.5}, "dpo.ld_alpha: got 1.5"),
    ({"precompute_ref_log_probs": "sometimes"}, "dpo.precompute_ref_log_probs: got 'sometimes'"),
    ({"init_adapter": 5}, "dpo.init_adapter: got 5"),
    ({"betta": 0.2}, "dpo.betta: unknown key; did you mean dpo.beta?"),
]


@pytest.mark.parametrize(
    ("section", "expect"), BAD_DPO, ids=[e.split(":")[0] + str(i) for i, (_, e) in enumerate(BAD_DPO)]
)
def test_bad_dpo_values_name_the_key(tmp_path, section, expect):
    problems = problems_of(recipe_file(tmp_path, "dpo", dpo=section))
    assert len(problems) == 1 and problems[0].startswith(expect), problems


BAD_KTO = [
    ({"beta": -1}, "kto.beta: got -1"),
    ({"loss_type": "sigmoid"}, "kto.loss_type: got 'sigmoid'; accepted: 'kto' or 'apo_zero_unpaired'"),
    ({"desirable_weight": 0}, "kto.desirable_weight: got 0"),
    ({"undesirable_weight": float("inf")}, "kto.undesirable_weight: got inf"),
    ({"undesirable_weight": 101}, "kto.undesirable_weight: got 101"),
    ({"init_adapter": ["a"]}, "kto.init_adapter: got ['a']"),
]


@pytest.mark.parametrize(
    ("section", "expect"), BAD_KTO, ids=[e.split(":")[0] + str(i) for i, (_, e) in enumerate(BAD_KTO)]
)
def test_bad_kto_values_name_the_key(tmp_path, section, expect):
    problems = problems_of(recipe_file(tmp_path, "kto", kto=section))
    assert len(problems) == 1 and problems[0].startswith(expect), problems


@pytest.mark.parametrize(
    ("method", "overrides", "expect"),
    [
        ("sft", ["dpo.beta=0.2"], "dpo: section given but method is sft; set method: dpo or remove it"),
        ("dpo", ["kto.beta=0.2"], "kto: section given but method is dpo; set method: kto or remove it"),
        ("kto", ["dpo.loss_type=ipo"], "dpo: section given but method is kto"),
        ("kto", ["training.batch_size=1"], "training.batch_size: got 1; the kto loss needs >= 2"),
        ("kto", ["training.extra.train_sampling_strategy=random"], "training.extra.train_sampling_strategy: got"),
        ("dpo", ["training.extra.sync_ref_model=true"], "training.extra.sync_ref_model: TRL cannot sync"),
        ("kto", ["training.extra.sync_ref_model=true"], "training.extra.sync_ref_model: TRL cannot sync"),
        ("dpo", ["training.extra.beta=0.2"], "training.extra.beta: set by the recipe; use dpo.beta instead"),
        ("dpo", ["training.extra.loss_type=ipo"], "training.extra.loss_type: set by the recipe; use dpo.loss_type"),
        ("dpo", ["training.extra.precompute_ref_log_probs=true"], "use dpo.precompute_ref_log_probs instead"),
        ("kto", ["training.extra.desirable_weight=2"], "use kto.desirable_weight instead"),
        ("kto", ["training.extra.beta=0.2"], "training.extra.beta: set by the recipe; use kto.beta instead"),
        ("sft", ["training.extra.activation_checkpointing=true"], "use training.gradient_checkpointing instead"),
        ("sft", ["training.extra.beta=0.2"], "training.extra.beta: not an argument of trl.SFTConfig"),
        (
            "kto",
            ["training.extra.label_smoothing=0.1"],
            "training.extra.label_smoothing: not an argument of trl.KTOConfig",
        ),
        (
            "dpo",
            ["training.extra.desirable_weight=2"],
            "training.extra.desirable_weight: not an argument of trl.DPOConfig",
        ),
    ],
)
def test_method_cross_checks_name_the_key(tmp_path, method, overrides, expect):
    problems = problems_of(recipe_file(tmp_path, method), *overrides)
    key = overrides[0].split("=")[0] if expect.startswith("use ") else expect.split(":")[0]
    assert len(problems) == 1 and problems[0].startswith(key) and expect in problems[0], problems


def test_trl_extra_arguments_of_the_method_pass_through(tmp_path):
    path = recipe_file(tmp_path, "dpo")
    recipe = load_recipe(path, ["training.extra.precompute_ref_batch_size=4", "training.extra.disable_dropout=false"])
    assert recipe.training.extra == {"precompute_ref_batch_size": 4, "disable_dropout": False}


def test_cross_problems_are_reported_together(tmp_path):
    problems = problems_of(recipe_file(tmp_path, "kto"), "dpo.beta=0.2", "training.batch_size=1")
    assert [p.split(":")[0] for p in problems] == ["dpo", "training.batch_size"]
