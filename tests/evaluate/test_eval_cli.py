"""`finetune eval` through the CLI: a run folder gives the figures `finetune run` wrote; bad input exits 2 with one
line and writes nothing; `finetune validate` checks a recipe's `evaluation:` section; `finetune report` draws it."""

from __future__ import annotations

import json
import shutil
import sys
from types import SimpleNamespace

import pytest
from eval_helpers import GENERATION_FILE, TASK, TINY_RECIPE, read_eval, runner, sets

from finetune.cli import app
from finetune.evaluate.run_eval import publish_wandb
from finetune.model.tiny import TinySpec, write_tiny_model


def test_eval_of_a_run_folder_repeats_the_figures_of_the_run(eval_run, tmp_path):
    """`finetune eval RUN_DIR` loads base + adapter/ from the run folder; `finetune run` evaluated the trained model
    in memory. Same weights, same records: the same per-record NLL, up to the adapter's dtype: TRL keeps a QLoRA
    adapter in bf16 during training, the reload computes it in fp32 (bf16 rounding of the LoRA term, ~1e-4)."""
    out = tmp_path / "again"
    result = runner.invoke(app, ["eval", str(eval_run), "--limit", "8", "-o", str(out)])
    assert result.exit_code == 0, result.output[-3000:]
    assert "eval_split: perplexity" in result.stdout and "routing: top-1 expert changed" in result.stdout
    ran, again = read_eval(eval_run), read_eval(out)
    assert set(again) >= {"perplexity", "generation", "tasks", "routing"}  # the run recipe's evaluation section
    first = {r["where"]: r for r in ran["perplexity"]["eval_split"]["records"]}
    records = again["perplexity"]["eval_split"]["records"]
    assert len(records) == 8
    for record in records:
        for column in ("base", "adapter"):
            assert record[f"{column}_nll"] == pytest.approx(first[record["where"]][f"{column}_nll"], rel=1e-3)
    assert len(again["generation"][GENERATION_FILE.name]["records"]) == 8
    refused = runner.invoke(app, ["eval", str(eval_run)])  # eval.json is there: never replaced silently
    assert refused.exit_code == 2 and "--overwrite" in refused.stderr


@pytest.fixture(scope="module")
def other_shape_model(tmp_path_factory):
    """A tiny Mixtral of another hidden size: no adapter of the default tiny model fits it."""
    spec = TinySpec(hidden_size=32, intermediate_size=64)
    return write_tiny_model(tmp_path_factory.mktemp("other-shape"), spec)


def test_bad_input_exits_2_with_one_line_and_writes_nothing(tiny_model_dir, random_adapter, other_shape_model,
                                                            tmp_path, monkeypatch):  # fmt: skip
    bad_yaml = tmp_path / "broken.yaml"
    bad_yaml.write_text("task: broken\ndataset_path: json\n  output_type: [multiple_choice\n")
    no_reference = tmp_path / "no_reference.jsonl"
    no_reference.write_text('{"prompt": "What is 1 + 1?", "reference": "2"}\n{"prompt": "What is 2 + 2?"}\n')
    cases = [  # (flags, what the one line says, model folder, lm-eval importable)
        (["--tasks", "no_such_task_anywhere"], "lm-eval knows no task 'no_such_task_anywhere'", tiny_model_dir, True),
        (["--tasks", str(bad_yaml)], f"{bad_yaml}:3: the task file is not valid YAML", tiny_model_dir, True),
        (["--generation", str(no_reference)], f"{no_reference}:2: no 'reference'", tiny_model_dir, True),
        (["--tasks", TASK], "pip install 'finetune[eval]'", tiny_model_dir, False),
        (["--data", "builtin:tiny-chat"], "was trained on", other_shape_model, True),  # the base it names
        (["--data", "builtin:tiny-chat"], "reads 64 features", other_shape_model, True),  # its weights' shapes
    ]
    unnamed = tmp_path / "unnamed-adapter"  # the same adapter, without the name of its base
    shutil.copytree(random_adapter, unnamed)
    config = json.loads((unnamed / "adapter_config.json").read_text())
    (unnamed / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    for i, (flags, message, model, lm_eval_installed) in enumerate(cases):
        adapter = unnamed if i == len(cases) - 1 else random_adapter
        out = tmp_path / "out"
        with monkeypatch.context() as patch:
            if not lm_eval_installed:
                patch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError, as when absent
            args = ["eval", "--model", str(model), "--adapter", str(adapter), *flags, "-o", str(out)]
            result = runner.invoke(app, args)
        assert result.exit_code == 2, (flags, result.output[-2000:])
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (flags, result.stderr)
        assert "Traceback" not in result.output
        assert not out.exists(), flags  # nothing written (and nothing loaded: the checks come first)


def test_validate_checks_the_evaluation_section(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    good = sets(f"model.path={tiny_model_dir}", f"output_dir={out}", f"evaluation.tasks=[{TASK}]",
                f"evaluation.generation=[{GENERATION_FILE}]")  # fmt: skip
    result = runner.invoke(app, ["validate", str(TINY_RECIPE), *good])
    assert result.exit_code == 0, result.output[-2000:]
    assert "evaluation:" in result.stdout and TASK in result.stdout
    missing = tmp_path / "missing.jsonl"
    bad = sets(f"model.path={tiny_model_dir}", f"output_dir={out}", f"evaluation.data=[{missing}]",
               "evaluation.tasks=[no_such_task_anywhere]")  # fmt: skip
    result = runner.invoke(app, ["validate", str(TINY_RECIPE), *bad])
    assert result.exit_code == 2
    assert "evaluation.data[0]" in result.stderr and "evaluation.tasks: lm-eval knows no task" in result.stderr
    typo = runner.invoke(app, ["validate", str(TINY_RECIPE), *sets(f"model.path={tiny_model_dir}",
                                                                  "evaluation.taks=[x]")])  # fmt: skip
    assert typo.exit_code == 2 and "evaluation.taks" in typo.stderr
    assert not out.exists()


def test_report_draws_the_evaluation(eval_run, tmp_path):
    result = runner.invoke(app, ["report", str(eval_run), "-o", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output[-2000:]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## evaluation of out (eval.json)" in report and "eval_split: perplexity" in report
    for png in ("eval_metrics.png", "eval_routing.png"):
        assert (tmp_path / "report" / png).stat().st_size > 0 and f"]({png})" in report


def test_the_figures_go_to_the_runs_wandb_summary(tmp_path, monkeypatch):
    calls = {}

    class Run:
        summary = SimpleNamespace(update=lambda values: calls.setdefault("summary", values))

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(init=init, Settings=lambda **kw: kw))
    (tmp_path / "wandb" / "offline-run-20260101_000000-abc123").mkdir(parents=True)
    (tmp_path / "wandb" / "run-20260102_000000-def456").mkdir()
    tracking = SimpleNamespace(backend="wandb", project="p", entity=None, mode="offline")
    assert publish_wandb(SimpleNamespace(tracking=tracking), tmp_path, {"eval/x": 1.0}, echo=print)
    assert calls["init"]["id"] == "def456" and calls["init"]["resume"] == "allow" and calls["finished"]
    assert calls["summary"] == {"eval/x": 1.0}
    none = SimpleNamespace(tracking=SimpleNamespace(backend="none"))
    assert not publish_wandb(none, tmp_path, {"eval/x": 1.0})
    assert json.dumps(calls["summary"])  # plain numbers only
