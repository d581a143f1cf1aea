"""What `finetune run` prints with its output piped, as CI and a log file see it (issue 16, items 3, 4, 5, 6, 12).

One short run is shared by the assertions: a data file with one broken line (skipped), two sample generations at
the end, stdout and stderr both pipes. Then the pieces that need no run: the per-line tok/s, the summary's speed
line, the piped `chat` separator, the known DDP FutureWarning, the recipe's YAML and `--set` errors.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from transformers import PrinterCallback, ProgressCallback, TrainerControl, TrainerState, TrainingArguments

from finetune.errors import UserError
from finetune.recipe.schema import load_recipe
from finetune.tracking.console import ReadableProgress, speed_text, use_readable_progress

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny-mixtral-sft.yaml"
CPU_DDP = ROOT / "accelerate" / "cpu-ddp.yaml"
STEPS = 3


def cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """The command as a user runs it, stdout and stderr piped (not a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "finetune", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def sets(*settings: str) -> list[str]:
    return [arg for setting in settings for arg in ("--set", setting)]


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("piped")
    data = tmp / "chats.jsonl"
    lines = (ROOT / "data_tools" / "samples" / "tiny_chat.jsonl").read_text(encoding="utf-8").splitlines()[:80]
    data.write_text("\n".join([*lines[:40], "{not json", *lines[40:]]) + "\n", encoding="utf-8")
    out = tmp / "out"
    args = sets(
        f"model.path={tiny_model_dir}",
        f"output_dir={out}",
        f"data.train.0.path={data}",
        "data.skip_invalid=true",
        f"training.max_steps={STEPS}",
        "training.logging_steps=1",
        "tracking.sample_prompts=2",
        "tracking.sample_max_new_tokens=4",
    )
    result = cli("run", str(TINY), *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


def test_piped_run_prints_plain_lines_once_no_bar(piped_run):
    _, result = piped_run
    both = result.stdout + result.stderr
    assert "\r" not in both  # no tqdm frames (training, evaluation, tokenising, packing, saving)
    assert not re.search(r"\d+%\|", both) and "it/s]" not in both
    for step in range(1, STEPS + 1):
        assert len(re.findall(rf"^step {step}/{STEPS}  loss ", result.stdout, re.M)) == 1, result.stdout


def test_piped_run_marks_the_trained_tokens_in_text(piped_run):
    from data_tools.preview import PLAIN_LEGEND

    _, result = piped_run
    preview = result.stdout.split("first training record", 1)[1].split("\nquantization:", 1)[0]
    record = preview.splitlines()[1]
    assert record.startswith("<s> [INST]") and "[/INST] «" in record and record.endswith("</s>»"), preview
    assert PLAIN_LEGEND in preview and "trained  masked (-100)" not in preview


def test_summary_and_metrics_time_the_training_steps_apart_from_samples(piped_run):
    out, result = piped_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["step_seconds"] < metrics["train_seconds"] <= metrics["wall_seconds"]
    assert 0 < metrics["sample_seconds"] < metrics["train_seconds"]
    assert metrics["tokens_per_second"] == pytest.approx(metrics["tokens_trained"] / metrics["step_seconds"])
    # the generation is announced and each sample shows, before the summary
    text = result.stdout
    assert f"generating 2 samples at step {STEPS} (up to 4 new tokens each" in text
    assert re.search(r"^  sample 1/2: \d+ tokens in [\d.]+ s$", text, re.M)
    assert re.search(r"^  sample 2/2: \d+ tokens in [\d.]+ s$", text, re.M)
    assert text.index("sample 2/2") < text.index("done: ")
    speed = f"{metrics['tokens_per_second']:,.0f} tokens/s over "
    assert re.search(rf"^  {speed}\d+:\d\d of training steps", text, re.M), text


def test_resolved_recipe_says_what_sets_the_run_length(piped_run):
    out, _ = piped_run
    text = (out / "recipe.yaml").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["data"]["packed_rows"]
    batches = math.ceil(rows / 2)  # the tiny recipe: batch 2, accumulation 2, one process
    per_epoch = batches // 2 + (batches % 2 > 0)
    assert (
        f"  max_steps: {STEPS}  # sets the run's length (≈ {STEPS / per_epoch:.1f} epochs over {rows} packed rows)"
        in (text)
    )
    assert "  num_epochs: 1.0  # not used: max_steps is set" in text
    assert yaml.safe_load(text)["training"]["max_steps"] == STEPS  # still a plain, valid recipe
    load_recipe(out / "recipe.yaml")


def test_skipped_records_read_as_text(piped_run):
    _, result = piped_run
    data_line = next(line for line in result.stdout.splitlines() if line.startswith("data: "))
    assert "1 invalid record skipped (invalid JSON: 1)" in data_line and "{" not in data_line


def test_validate_shows_that_num_epochs_does_not_apply():
    result = cli("validate", str(TINY), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "  max_steps: 60  # sets the run's length\n" in result.stdout
    assert "  num_epochs: 1.0  # not used: max_steps is set\n" in result.stdout
    result = cli("validate", str(TINY), "--set", "training.max_steps=-1", timeout=300)
    assert "  num_epochs: 1.0  # sets the run's length\n" in result.stdout


# --- CPU DDP: one plan line, no known FutureWarning -----------------------------------------------------------------


def test_cpu_ddp_prints_the_plan_once_and_no_known_future_warning(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    args = sets(
        f"model.path={tiny_model_dir}",
        f"output_dir={out}",
        "training.max_steps=1",
        "training.batch_size=1",
        "data.eval_fraction=0",
        "tracking.sample_prompts=0",
    )
    launcher = ["--num-processes", "2", "--accelerate-config", str(CPU_DDP.relative_to(ROOT))]
    result = cli("run", str(TINY), *args, *launcher)
    both = result.stdout + result.stderr
    assert result.returncode == 0, both[-4000:]
    assert both.count("plan: ") == 1, both
    assert "FutureWarning" not in both, result.stderr


def test_the_ddp_buffers_warning_is_silenced_by_name_only():
    probe = textwrap.dedent(
        """
        import warnings
        import finetune.cli  # installs the filters, as every command does
        message = ("`broadcast_buffers` is deprecated. Use `forward_sync_buffers` instead. IMPORTANT: ...")
        warnings.warn_explicit(message, FutureWarning, "accelerator.py", 1, module="accelerate.accelerator")
        warnings.warn_explicit("another accelerate change", FutureWarning, "accelerator.py", 2,
                               module="accelerate.accelerator")
        warnings.warn_explicit(message, FutureWarning, "mine.py", 3, module="mine")
        """
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "accelerator.py:1" not in result.stderr
    assert "accelerator.py:2: FutureWarning: another accelerate change" in result.stderr
    assert "mine.py:3: FutureWarning: `broadcast_buffers`" in result.stderr  # the same text from elsewhere shows


# --- per-line rate and summary, without a run -----------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_line_rate_divides_by_step_time_not_by_evaluation_and_saving(monkeypatch, capsys):
    clock = Clock()
    monkeypatch.setattr("finetune.tracking.console.time.time", clock)
    monkeypatch.setattr("finetune.tracking.console.time.perf_counter", clock)
    progress = ReadableProgress()
    state = TrainerState(max_steps=4)
    args, control = TrainingArguments(output_dir="unused", report_to="none"), TrainerControl()
    progress.on_train_begin(args, state, control)
    for step in (1, 2):
        progress.on_step_begin(args, state, control)
        clock.now += 1.0  # a one-second step of 100 tokens
        state.global_step = step
        progress.on_step_end(args, state, control)
        progress.on_log(args, state, control, logs={"loss": 5.0, "num_tokens": 100.0 * step})
        clock.now += 9.0  # evaluation, a checkpoint and samples after it
    lines = capsys.readouterr().out.splitlines()
    assert "  100 tok/s  " in lines[1], lines  # not 10 tok/s: the 9 s after each step is not training
    assert lines[1].endswith("ETA 0:20")  # the ETA does count them: 10 s of wall time per step, 2 steps left
    assert progress.step_seconds == pytest.approx(2.0)


def test_stock_displays_are_replaced_by_the_one_readable_display():
    class FakeTrainer:
        def __init__(self, stock):
            self.callback_handler = type("Handler", (), {"callbacks": [stock()]})()

        def remove_callback(self, cls):
            self.callback_handler.callbacks = [c for c in self.callback_handler.callbacks if type(c) is not cls]

        def add_callback(self, callback):
            self.callback_handler.callbacks.append(callback)

    for stock in (ProgressCallback, PrinterCallback):  # disable_tqdm False or True (training.extra may set it)
        trainer = FakeTrainer(stock)
        progress = use_readable_progress(trainer)
        assert trainer.callback_handler.callbacks == [progress] and isinstance(progress, ReadableProgress)


def test_train_arguments_turn_the_tqdm_bar_off():
    import torch

    from finetune.train.arguments import trainer_arguments

    recipe = load_recipe(TINY)
    assert trainer_arguments(recipe, Path("unused"), torch.device("cpu"), torch.float32)["disable_tqdm"] is True


def test_speed_line_names_training_steps_and_where_the_rest_went():
    metrics = {"tokens_per_second": 15.2, "step_seconds": 8.0, "train_seconds": 43.0, "sample_seconds": 35.0}
    assert speed_text(metrics) == (
        "15 tokens/s over 0:08 of training steps; the loop's other 0:35: evaluation, checkpoints, samples 0:35"
    )


# --- piped chat -------------------------------------------------------------------------------------------------------


def test_piped_chat_separates_the_replies(monkeypatch):
    import io

    from finetune.export import generate

    answers = iter(["first reply\nover two lines", "second reply", "third"])

    def fake_reply(gen, messages, sampling, out):
        text = next(answers)
        out.write(text + "\n")
        return text, [1]

    monkeypatch.setattr(generate, "reply", fake_reply)
    out, err = io.StringIO(), io.StringIO()
    replies = generate.chat_loop(None, None, io.StringIO("a\nb\nc\n"), out, err)
    assert replies == ["first reply\nover two lines", "second reply", "third"]
    assert out.getvalue() == "first reply\nover two lines\n---\nsecond reply\n---\nthird\n"


# --- recipe errors in the user's words --------------------------------------------------------------------------------

GOOD_HEAD = "model:\n  path: tiny-random-mixtral\ndata:\n  train:\n    - path: builtin:tiny-chat\noutput_dir: out\n"


def error_of(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as info:
        load_recipe(path, overrides)
    return str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (  # a key indented less than the keys above it
            "model:\n    path: tiny-random-mixtral\n  quantization: nf4\n",
            ":3: bad indentation: `quantization` is indented 2 spaces but `path` on line 2 is indented 4",
        ),
        (  # a key indented more: YAML reads it as the rest of the value above
            GOOD_HEAD + "training:\n  max_steps: 10\n  learning_rate: 1e-3\n    batch_size: 2\n",
            ":10: bad indentation: `batch_size` is indented 4 spaces, more than `learning_rate` on line 9 (2)",
        ),
        (  # the second key of a list item out of line with the first
            "model:\n  path: x\ndata:\n  train:\n    - path: builtin:tiny-chat\n     weight: 1\n",
            ":6: bad indentation: `weight` is indented 5 spaces but `path` on line 5 is indented 6",
        ),
        ("model:\n\tpath: x\n", ":2: a tab character in the indentation; YAML indents with spaces only"),
        ('model:\n  path: "tiny-random-mixtral\noutput_dir: out\n', ":2:9: a quoted value is never closed"),
    ],
    ids=["less", "more", "list-item", "tab", "quote"],
)
def test_yaml_syntax_errors_speak_the_users_words(tmp_path, text, expected):
    message = error_of(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'recipe.yaml'}{expected}"), message
    assert "<block" not in message and "block end" not in message
    if "indentation:" in expected:
        assert message.endswith("keys of one section must line up, each indented by the same number of spaces")


def test_a_bad_set_value_names_the_flag_not_the_file(tmp_path):
    recipe = GOOD_HEAD + "training:\n  max_steps: 10\n"
    message = error_of(tmp_path, recipe, ("training.max_steps=abc",))
    first, *problems = message.splitlines()
    assert first.startswith("--set: 1 problem(s), all in values given with --set"), message
    assert problems[0].startswith("  - training.max_steps: got 'abc'")
    assert problems[0].endswith("(from --set training.max_steps=abc)")
    # a problem of the file itself stays the file's; one from a list index names its --set item
    message = error_of(tmp_path, recipe + "lora:\n  rr: 4\n", ("data.train.0.path=nowhere.jsonl",))
    assert message.splitlines()[0].startswith(f"{tmp_path / 'recipe.yaml'} and --set: 2 problem(s), 1 of them")
    lora = next(line for line in message.splitlines() if "lora.rr: unknown key" in line)
    assert "(from --set" not in lora
    assert (
        "'nowhere.jsonl' does not exist (paths are relative to the current folder) (from --set data.train.0.path="
        in (message)
    )


def test_recipe_launch_lines_use_the_readme_entry_point():
    """The recipe headers, the launch configs and the README start accelerate the same way: `-m finetune run`."""
    texts = {p.name: p.read_text() for p in [*ROOT.glob("recipes/*.yaml"), *ROOT.glob("accelerate/*.yaml")]}
    texts["README.md"] = (ROOT / "README.md").read_text()
    launches = {name: re.findall(r"accelerate launch [^\n`]*", text) for name, text in texts.items()}
    assert launches["mixtral-8x7b-qlora-sft.yaml"] and launches["README.md"]
    for name, commands in launches.items():
        for command in commands:
            if " -m " in command:
                assert " -m finetune run " in command, (name, command)
