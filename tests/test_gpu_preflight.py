"""Refusals and plans for GPU setups, checked before loading: TRL's Triton kernel without a C compiler, and a
bitsandbytes optimizer under FSDP2 (refused by `validate`, and never suggested or assumed by `finetune plan`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from finetune.cli import app
from finetune.plan.estimate import make_plan
from finetune.plan.gpus import find_gpu
from finetune.plan.render import render
from finetune.recipe.schema import load_recipe
from finetune.train.methods import kernels

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny-mixtral-sft.yaml"
MIXTRAL = ROOT / "recipes" / "mixtral-8x7b-qlora-sft.yaml"
MIXTRAL_CONFIG = ROOT / "bench" / "configs" / "mixtral-8x7b"


@pytest.fixture
def cuda_with_triton(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "triton_available", lambda: True)


@pytest.fixture
def no_compiler(monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(kernels.shutil, "which", lambda name: None)


def test_cuda_without_a_c_compiler_is_refused_before_loading(cuda_with_triton, no_compiler, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["validate", str(TINY), "--set", f"output_dir={out}"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "Triton kernel" in text and "a C compiler" in text and "apt-get install gcc" in text
    assert "Traceback" not in result.output and not out.exists()


def test_missing_python_headers_are_named(cuda_with_triton, monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "c_compiler", lambda: "/usr/bin/gcc")
    monkeypatch.setattr(kernels, "python_headers", lambda: tmp_path / "include" / "Python.h")
    (problem,) = kernels.fused_lm_head_problems("auto")
    assert "Python's development headers" in problem and "$CC is unset" not in problem


def test_a_compiler_and_headers_let_it_through(cuda_with_triton, monkeypatch, tmp_path):
    headers = tmp_path / "Python.h"
    headers.write_text("")
    monkeypatch.setenv("CC", "/usr/bin/cc")
    monkeypatch.setattr(kernels, "python_headers", lambda: headers)
    assert kernels.fused_lm_head_problems("auto") == []


def test_cpu_runs_need_no_compiler(cuda_with_triton, no_compiler):
    """On CPU (or without Triton) TRL folds the tiles with torch ops: nothing to compile."""
    assert kernels.fused_lm_head_problems("cpu") == []


def test_compiler_is_found_as_triton_looks_for_it(monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(kernels.shutil, "which", lambda name: f"/opt/bin/{name}" if name == "clang" else None)
    assert kernels.c_compiler() == "/opt/bin/clang"
    monkeypatch.setenv("CC", "/my/cc")
    assert kernels.c_compiler() == "/my/cc"


FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "false"}


def test_bnb_optimizer_under_fsdp2_is_refused_with_the_alternative(monkeypatch, tmp_path):
    for key, value in FSDP_ENV.items():
        monkeypatch.setenv(key, value)
    sets = ["--set", f"output_dir={tmp_path / 'out'}", "--set", "training.optimizer=paged_adamw_8bit"]
    result = CliRunner().invoke(app, ["validate", str(TINY), *sets])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "training.optimizer: paged_adamw_8bit is a bitsandbytes optimizer" in text
    assert "set training.optimizer: adamw_torch" in text


def test_bnb_optimizer_without_fsdp_is_fine(monkeypatch):
    from finetune.distributed.sharding import launch_problems

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert launch_problems(load_recipe(TINY, ["training.optimizer=paged_adamw_8bit"])) == []


def mixtral():
    return load_recipe(MIXTRAL, [f"model.path={MIXTRAL_CONFIG}"])  # its optimizer is paged_adamw_8bit


def test_plan_never_suggests_or_assumes_a_bnb_optimizer_under_fsdp2():
    one = make_plan(mixtral(), find_gpu("RTX 4090"), read_data=False)
    sharded = [x["change"] for x in one["suggestions"] if "FSDP2" in x["change"]]
    assert sharded and all("--set training.optimizer=adamw_torch" in change for change in sharded)
    two = make_plan(mixtral(), find_gpu("RTX 4090"), num_gpus=2, read_data=False)
    assert two["settings"]["optimizer"] == "adamw_torch"
    assert "paged_adamw_8bit" in two["optimizer_note"] and "refused under FSDP2" in two["optimizer_note"]
    assert not any("8bit" in line for line in two["lines"])


def test_plan_reports_host_ram_per_machine_below_one_copy_of_the_experts():
    experts = make_plan(mixtral(), find_gpu("H100"), read_data=False)["groups"]["experts"]
    for n in (1, 2, 8):
        plan = make_plan(mixtral(), find_gpu("H100"), num_gpus=n, read_data=False)
        host = plan["host_ram"]
        assert host["processes"] == n and host["per_machine_bytes"] == n * host["per_process_bytes"]
        assert 0 < host["per_machine_bytes"] < experts  # not N copies of the 4-bit experts: under one
        assert "host RAM while loading" in render(plan)
