"""The shipped local lm-eval task runs offline through `finetune eval`; its scores equal lm-eval's own
`simple_evaluate` on the same model built with stock transformers (and stock PEFT for the adapter column)."""

from __future__ import annotations

import pytest
import torch
from eval_helpers import SAMPLES, TASK, read_eval, runner
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from peft import PeftModel
from transformers import AutoTokenizer, MixtralForCausalLM

from finetune.cli import app
from finetune.evaluate.lm_eval_tasks import metrics_of, resolve_tasks

BATCH = 4


def stock_scores(model, tokenizer) -> dict[str, float]:
    """lm-eval on its own: HFLM over the model object, the shipped task folder as include_path."""
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=BATCH)
    out = simple_evaluate(
        model=lm, tasks=[TASK], task_manager=TaskManager(include_path=str(SAMPLES)), log_samples=False
    )
    return metrics_of(out["results"][TASK])


def test_local_task_scores_equal_lm_evals_own_run(tiny_model_dir, random_adapter, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = ["eval", "--model", str(tiny_model_dir), "--adapter", str(random_adapter), "--quantization", "none",
            "--tasks", str(SAMPLES / f"{TASK}.yaml"), "--batch-size", str(BATCH), "-o", str(out)]  # fmt: skip
    monkeypatch.chdir(tmp_path)  # the task's relative data_files are found from its own folder, not from here
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output[-3000:]
    assert f"{TASK}: acc " in result.stdout
    ours = read_eval(out)["tasks"][TASK]
    assert set(ours) == {"base", "adapter"} and {"acc", "acc_norm"} <= set(ours["base"])

    monkeypatch.chdir(SAMPLES)  # stock lm-eval reads relative data_files from the working directory
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    base = MixtralForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    expected_base = stock_scores(base, tokenizer)
    expected_adapter = stock_scores(PeftModel.from_pretrained(base, str(random_adapter)).eval(), tokenizer)
    for metric in ("acc", "acc_norm", "acc_stderr"):
        assert ours["base"][metric] == pytest.approx(expected_base[metric], abs=1e-12), metric
        assert ours["adapter"][metric] == pytest.approx(expected_adapter[metric], abs=1e-12), metric


def test_the_tiny_run_evaluates_the_task_after_training(eval_run):
    scores = read_eval(eval_run)["tasks"][TASK]
    for column in ("base", "adapter"):
        assert 0 <= scores[column]["acc"] <= 1 and 0 <= scores[column]["acc_norm"] <= 1


def test_shipped_task_is_known_by_name_and_by_path():
    by_name, problems = resolve_tasks([TASK])
    assert not problems and by_name[0].folder == SAMPLES.resolve() and not by_name[0].builtin
    by_path, problems = resolve_tasks([str(SAMPLES)])  # a folder: every task file in it
    assert not problems and [s.spec for s in by_path] == [by_name[0].spec]


def test_generator_reproduces_the_shipped_eval_samples(tmp_path, monkeypatch):
    from data_tools.samples import make_tiny_eval

    monkeypatch.setattr(make_tiny_eval, "HERE", tmp_path)
    make_tiny_eval.main()
    for name in ("tiny_arith_mc.jsonl", "tiny_generation.jsonl"):
        assert (tmp_path / name).read_bytes() == (SAMPLES / name).read_bytes(), name
