"""What the user sees: readable training lines, the end-of-run summary, `--explain` at any width, no known noise."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from finetune.recipe.schema import Recipe, load_recipe
from finetune.tracking.console import (
    NEXT_STEPS,
    ReadableProgress,
    eval_line,
    explain_rows,
    next_commands,
    summary_lines,
    train_line,
    user_type,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny-mixtral-sft.yaml"
RESULT = ROOT / "bench" / "results" / "tiny_run.json"

# The exact messages the issue names; each must be gone from every command's output.
KNOWN_NOISE = (
    "Failed to load CPU gemm_4bit_forward from kernels-community",
    "`gradient_checkpointing` is deprecated",
    "`gradient_checkpointing_kwargs` is deprecated",
    "`is_gradient_checkpointing` is deprecated",
)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finetune.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **(env or {})},
    )


# --- per-step lines -----------------------------------------------------------------------------------------------


def test_train_line_reads_as_numbers_with_units():
    logs = {"loss": 10.08123, "learning_rate": 0.00375, "grad_norm": 1.656, "aux_loss": 2.342, "num_tokens": 5042.0}
    line = train_line(logs, step=5, max_steps=60, tokens_per_s=1010.4, eta_s=185)
    assert line.startswith("step  5/60")
    for part in ("loss 10.0812", "lr 3.75e-03", "grad norm 1.66", "aux 2.3420", "1,010 tok/s", "ETA 3:05"):
        assert part in line, (part, line)
    assert "{" not in line and "'" not in line
    last = train_line({"loss": 7.5}, step=60, max_steps=60, tokens_per_s=None, eta_s=0)
    assert last == "step 60/60  loss 7.5000"  # nothing is invented when the trainer did not log it; no ETA at the end


def test_eval_line():
    logs = {"eval_loss": 7.6012, "eval_mean_token_accuracy": 0.125, "eval_runtime": 9.2, "eval_aux_loss": 2.25}
    assert eval_line(logs, step=60, max_steps=60) == "eval  step 60/60  loss 7.6012  accuracy 12.5%  aux 2.2500  9 s"


def progress_run(logs_seq: list[tuple[int, dict]], capsys) -> list[str]:
    """Drive ReadableProgress as the trainer does: begin, log at the given steps, end."""
    callback = ReadableProgress()
    state = TrainerState(max_steps=10)
    args, control = TrainingArguments(output_dir="unused", report_to="none"), TrainerControl()
    callback.on_train_begin(args, state, control)
    for step, logs in logs_seq:
        state.global_step = step
        callback.on_step_end(args, state, control)
        callback.on_log(args, state, control, logs=logs)
    callback.on_train_end(args, state, control)
    callback.on_log(args, state, control, logs={"eval_loss": 1.5})  # evaluate() after training: no bar any more
    return capsys.readouterr().out.splitlines()


def test_readable_progress_writes_one_line_per_log(capsys):
    lines = progress_run(
        [
            (1, {"loss": 10.5, "learning_rate": 0.0, "num_tokens": 100.0}),
            (5, {"loss": 9.25, "learning_rate": 1e-3, "grad_norm": 1.5, "num_tokens": 500.0}),
            (10, {"train_runtime": 12.0, "train_loss": 9.5}),  # the end-of-training record: the summary covers it
        ],
        capsys,
    )
    assert [line.split("  loss")[0] for line in lines] == ["step  1/10", "step  5/10", "eval  step 10/10"]
    assert "loss 9.2500" in lines[1] and "grad norm 1.5" in lines[1] and "tok/s" in lines[1] and "ETA" in lines[1]
    assert not any("train_runtime" in line or "{" in line for line in lines)


# --- end-of-run summary -------------------------------------------------------------------------------------------


def fake_metrics() -> dict:
    return {
        "first_loss": 10.659,
        "final_train_loss": 7.512,
        "eval_loss": 7.6,
        "steps": 60,
        "tokens_per_second": 1234.5,
        "train_seconds": 120.0,
        "wall_seconds": 150.0,
        "peak_memory": 1.5e9,
        "peak_memory_kind": "process_rss",
        "train_memory_added": 900e6,
    }


def test_summary_says_results_outputs_and_next_commands(tmp_path):
    out = tmp_path / "my run"  # a space: every printed command must still be one shell word per path
    (out / "adapter").mkdir(parents=True)
    (out / "metrics.json").write_text("{}")
    recipe = load_recipe(TINY, [f"output_dir={out}"])
    text = "\n".join(summary_lines(fake_metrics(), recipe))
    assert "60 steps in 2:30, loss 10.6590 -> 7.5120, eval loss 7.6000" in text
    assert (
        "1,234 tokens/s" in text
        and "peak memory 1.50 GB (whole process, resident, of which training added 900 MB)" in text
    )
    assert f"outputs in {out}/" in text and "adapter/" in text and "metrics.json" in text
    assert "recipe.yaml " not in text  # only outputs that exist are listed
    commands = [
        line.strip() for line in text.splitlines() if line.startswith("  ") and not line.strip().startswith("#")
    ]
    assert "finetune data preview builtin:tiny-chat --recipe" in text
    assert "finetune merge" in text and "finetune generate" in text and "finetune report" in text
    from finetune.cli import app

    registered = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
    registered |= {g.name for g in app.registered_groups}
    named = {line.split()[1] for line in commands if line.startswith("finetune ")}
    assert named and named <= registered, named - registered  # every suggested command exists
    for command in commands[-len(NEXT_STEPS) :]:
        shlex.split(command)  # each parses as a shell command


def test_next_commands_quote_paths_and_load_with_stock_peft(tmp_path):
    out = tmp_path / "a b"
    commands = dict(next_commands(out, "/models/base dir", "data/my file.jsonl"))
    preview = shlex.split(commands["what was trained on, with the loss mask"])
    assert preview[:4] == ["finetune", "data", "preview", "data/my file.jsonl"]
    assert preview[5] == str(out / "recipe.yaml")
    python = shlex.split(commands["load the adapter with stock PEFT"])
    assert python[:2] == ["python", "-c"]
    compile(python[2], "<next command>", "exec")  # valid Python, paths as string literals
    assert json.dumps(str(out / "adapter")) in python[2] and '"/models/base dir"' in python[2]
    assert "finetune" not in python[2]  # stock PEFT and transformers only
    assert len(next_commands(out, "base", None)) == len(NEXT_STEPS) - 1  # no data source: that step is left out


# --- validate --explain -------------------------------------------------------------------------------------------


def test_user_type_speaks_in_recipe_terms():
    fields = {key: field for key, field in Recipe.model_fields.items()}
    data_fields = fields["data"].annotation.model_fields
    training_fields = fields["training"].annotation.model_fields
    assert user_type(data_fields["train"].annotation) == "list of sources"
    assert user_type(fields["method"].annotation) == "one of: sft, dpo, kto"
    assert user_type(training_fields["learning_rate"].annotation) == "number"
    assert user_type(training_fields["eval_steps"].annotation) == "integer or none"
    assert user_type(data_fields["eval"].annotation) == "source or none"
    assert user_type(training_fields["gradient_checkpointing"].annotation) == "true or false"


def test_explain_rows_have_no_python_type_names():
    rows = explain_rows(Recipe)
    assert {row[0] for row in rows} >= {"model.path", "data.train[].path", "training.extra", "output_dir"}
    for key, type_text, default, _ in rows:
        assert not re.search(r"typing|data_tools|Optional|Literal|\bNone\b|\bint\b|\bstr\b|\|", type_text), (
            key,
            type_text,
        )
        assert not re.search(r"^'|\bNone\b|\bTrue\b|\bFalse\b", default), (key, default)


@pytest.mark.parametrize("columns", [80, 200])
def test_validate_explain_fits_the_terminal(columns):
    result = cli("validate", str(TINY), "--explain", env={"COLUMNS": str(columns)})
    assert result.returncode == 0, result.stderr[-2000:]
    explain = result.stdout.split("\nmodel:\n")[0]  # the recipe dump follows the description of the keys
    lines = explain.splitlines()
    assert len(lines) > 60 and max(len(line) for line in lines) <= columns
    assert "list of sources" in explain and "data_tools.config" not in explain
    for noise in KNOWN_NOISE:
        assert noise not in result.stderr + result.stdout


# --- known library noise ------------------------------------------------------------------------------------------

QUIET_PROBE = """
import logging, warnings
import finetune.cli  # installs the filters, as every command does
import bitsandbytes  # on AVX512-BF16 CPUs this import logs the kernels-community message itself
from finetune.model.tiny import TinySpec, mixtral_config
from transformers import MixtralForCausalLM

log = logging.getLogger("bitsandbytes.backends.cpu.ops")
# the record bitsandbytes emits on AVX512-BF16 CPUs, exactly as it emits it (so the test holds on every CPU)
log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
            "`pip install kernels` and the kernels >= 0.11.1", ImportError("No module named 'kernels'"))
log.warning("a genuine bitsandbytes warning")
model = MixtralForCausalLM(mixtral_config(TinySpec(layers=1)))
model.is_gradient_checkpointing  # transformers' own deprecation FutureWarning, as PEFT triggers it
warnings.warn("a genuine future warning", FutureWarning)
"""


def test_known_noise_is_silenced_and_real_warnings_still_show():
    result = subprocess.run([sys.executable, "-c", QUIET_PROBE], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    for noise in KNOWN_NOISE:
        assert noise not in result.stderr
    assert "a genuine bitsandbytes warning" in result.stderr
    assert "FutureWarning: a genuine future warning" in result.stderr


def test_short_run_is_quiet_and_readable(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    sets = [f"model.path={tiny_model_dir}", f"output_dir={out}", "training.max_steps=2", "training.logging_steps=1"]
    result = cli("run", str(TINY), *[arg for s in sets for arg in ("--set", s)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for noise in KNOWN_NOISE:
        assert noise not in result.stdout + result.stderr
    assert re.search(r"^step 1/2  loss \d+\.\d{4}  lr ", result.stdout, re.M)
    assert re.search(r"^step 2/2  loss \d+\.\d{4}", result.stdout, re.M)
    assert re.search(r"^eval  step 2/2  loss \d+\.\d{4}", result.stdout, re.M)
    assert "{'loss'" not in result.stdout and "'eval_loss'" not in result.stdout
    assert f"outputs in {out}/" in result.stdout and "next:" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"loss {metrics['first_loss']:.4f} -> {metrics['final_train_loss']:.4f}" in result.stdout


# --- figures quoted in the tiny recipe ----------------------------------------------------------------------------


def test_tiny_recipe_header_quotes_the_result_file():
    header = "\n".join(line for line in TINY.read_text().splitlines() if line.startswith("#"))
    result = json.loads(RESULT.read_text())
    assert str(RESULT.relative_to(ROOT)) in header
    quoted_peak = re.search(r"([\d.]+) GB peak memory", header)
    quoted_time = re.search(r"about ([\d.]+) minutes", header)
    assert quoted_peak and quoted_time, header
    assert float(quoted_peak.group(1)) == round(result["peak_rss_bytes"] / 1e9, 1)
    assert float(quoted_time.group(1)) == round(result["wall_seconds"] / 60, 1)
    assert f"{result['first_loss']:.1f} -> {result['final_train_loss']:.1f}" in header
