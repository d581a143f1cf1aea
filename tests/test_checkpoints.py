"""Checkpoint files and the resume decision, on plain folders: selection, publication, rotation, the recipe check."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from transformers import TrainerControl
from typer.testing import CliRunner

from finetune.errors import UserError
from finetune.recipe.schema import load_recipe
from finetune.train.checkpoints import (
    MARKER,
    RECIPE,
    clean_leftovers,
    clear_checkpoints,
    first_logged_loss,
    publish,
    recipe_differences,
    resolved_recipe,
    resume_problems,
    rotate,
    scan,
    staging_dir,
    trim_log,
    world_size_problem,
)
from finetune.train.interrupt import CheckpointControl, StopOnSignal, interrupted

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny-mixtral-sft.yaml"


def stage(output_dir: Path, step: int, payload: bytes = b"weights") -> Path:
    """What the Trainer leaves in the staging folder for one save."""
    staged = staging_dir(output_dir) / f"checkpoint-{step}"
    staged.mkdir(parents=True)
    (staged.parent / "README.md").write_text("TRL writes a model card into its output_dir on each save")
    (staged / "adapter_model.safetensors").write_bytes(payload)
    (staged / "adapter_config.json").write_text("{}")
    return staged


def complete(output_dir: Path, step: int, recipe_text: str = "seed: 1\n") -> Path:
    return publish(stage(output_dir, step), step, recipe_text)


def test_scan_sorts_complete_incomplete_staging_and_ignores_other_names(tmp_path):
    for step in (9, 10, 2):
        complete(tmp_path, step)
    root = tmp_path / "checkpoints"
    (root / "checkpoint-12").mkdir()  # killed after the rename, before the marker
    (root / "checkpoint-11").mkdir()
    (root / "checkpoint-11" / MARKER).write_text(json.dumps({"step": 3}))  # a marker for another step
    (root / "checkpoint-13").mkdir()
    (root / "checkpoint-13" / MARKER).write_text("{cut sho")  # unreadable
    (root / "checkpoint-best").mkdir()
    (root / "checkpoint-7.bak").mkdir()
    (root / "checkpoint-5").write_text("a file, not a folder")
    stage(tmp_path, 14)  # being written

    found = scan(tmp_path)
    assert [step for step, _ in found.complete] == [2, 9, 10]  # numeric order, not name order
    assert found.latest == (10, root / "checkpoint-10")
    assert [p.name for p in found.incomplete] == ["checkpoint-11", "checkpoint-12", "checkpoint-13"]
    assert found.staging == root / ".partial"
    assert scan(tmp_path / "nothing-here").latest is None


def test_publish_renames_into_place_and_writes_the_marker_last(tmp_path):
    stale = tmp_path / "checkpoints" / "checkpoint-4"
    stale.mkdir(parents=True)
    (stale / "optimizer.pt").write_bytes(b"from a killed run")
    final = complete(tmp_path, 4, recipe_text="training:\n  seed: 7\n")
    assert final == stale and not (final / "optimizer.pt").exists()  # the incomplete one was replaced whole
    assert json.loads((final / MARKER).read_text())["step"] == 4
    assert yaml.safe_load((final / RECIPE).read_text()) == {"training": {"seed": 7}}
    assert (final / "adapter_model.safetensors").read_bytes() == b"weights"  # the adapter stays at the top level
    assert not staging_dir(tmp_path).exists()
    assert scan(tmp_path).latest == (4, final)


def test_rotation_keeps_the_newest_complete_checkpoints_only(tmp_path):
    for step in (2, 4, 6, 8):
        complete(tmp_path, step)
    incomplete = tmp_path / "checkpoints" / "checkpoint-10"
    incomplete.mkdir()
    removed = rotate(tmp_path, 2)
    assert sorted(p.name for p in removed) == ["checkpoint-2", "checkpoint-4"]
    assert [step for step, _ in scan(tmp_path).complete] == [6, 8]
    assert incomplete.exists()  # never counted as one of the kept, never the reason a complete one goes
    assert rotate(tmp_path, None) == [] and len(scan(tmp_path).complete) == 2


def test_clean_leftovers_names_what_it_removes(tmp_path):
    complete(tmp_path, 3)
    (tmp_path / "checkpoints" / "checkpoint-6").mkdir()
    stage(tmp_path, 9)
    lines = clean_leftovers(scan(tmp_path))
    assert any("incomplete checkpoint" in line and "checkpoint-6" in line for line in lines)
    assert any(".partial" in line for line in lines)
    after = scan(tmp_path)
    assert after.incomplete == [] and after.staging is None and after.latest[0] == 3


def test_resume_needs_the_world_size_that_wrote_the_checkpoint(tmp_path):
    folder = publish(stage(tmp_path, 4), 4, "", world_size=2)
    assert world_size_problem(folder, 2) is None
    problem = world_size_problem(folder, 1)
    assert "written by 2 process(es) and this run has 1" in problem and "--no-resume" in problem


def test_clear_checkpoints_removes_every_checkpoint(tmp_path):
    complete(tmp_path, 3)
    stage(tmp_path, 5)
    clear_checkpoints(tmp_path)
    assert not (tmp_path / "checkpoints").exists()
    clear_checkpoints(tmp_path)  # nothing to clear is fine


def test_trim_log_and_first_loss_of_a_resumed_run(tmp_path):
    log = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 10.5}, {"step": 2, "loss": 9.0}, {"step": 4, "loss": 8.0}, {"step": 5, "loss": 7.0}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')  # the kill cut the last line
    trim_log(log, 4)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 4]
    assert first_logged_loss(log) == 10.5
    assert first_logged_loss(tmp_path / "missing.jsonl") is None


# --- the recipe check -------------------------------------------------------------------------------------------


def tiny(tmp_path: Path, *settings: str):
    return load_recipe(TINY, [f"output_dir={tmp_path / 'out'}", *settings])


def interrupted_run(tmp_path: Path, step: int = 4, *settings: str):
    """An output_dir as a killed run leaves it: a complete checkpoint of `settings`, no finished run."""
    recipe = tiny(tmp_path, *settings)
    complete(Path(recipe.output_dir), step, resolved_recipe(recipe))
    return recipe


@pytest.mark.parametrize(
    "change",
    [
        "model.path=mistralai/Mixtral-8x7B-v0.1",
        "model.quantization=fp4",
        "lora.r=8",
        "lora.expert_targets=[down_proj]",
        "data.max_length=128",
        "data.packing=false",
        "data.train.0.weight=2",
        "training.seed=1",
        "training.batch_size=4",
        "training.gradient_accumulation_steps=1",
        "training.learning_rate=1e-3",
        "training.lr_scheduler=linear",
        "moe.aux_loss_coef=0.05",
    ],
)
def test_resume_refuses_a_recipe_that_changes_the_result(tmp_path, change):
    interrupted_run(tmp_path)
    key = change.split("=")[0]
    problems = resume_problems(tiny(tmp_path, change))
    assert len(problems) == 1, problems
    assert f"{key}" in problems[0] and "--no-resume" in problems[0] and "checkpoint-4" in problems[0]
    assert resume_problems(tiny(tmp_path, change), resume=False) == []  # --no-resume starts over instead


@pytest.mark.parametrize(
    "change",
    [
        "training.max_steps=200",
        "training.logging_steps=1",
        "training.eval_steps=5",
        "training.save_steps=3",
        "training.save_minutes=5",
        "training.save_total_limit=4",
        "tracking.project=elsewhere",
        "tracking.sample_prompts=0",
    ],
)
def test_resume_accepts_changes_that_do_not_change_the_result(tmp_path, change):
    interrupted_run(tmp_path)
    assert resume_problems(tiny(tmp_path, change)) == []


def test_resume_refuses_max_steps_below_the_checkpoint(tmp_path):
    interrupted_run(tmp_path, 40)
    problems = resume_problems(tiny(tmp_path, "training.max_steps=30"))
    assert len(problems) == 1 and problems[0].startswith("training.max_steps: 30 is below step 40")


def test_method_change_is_a_difference():
    assert recipe_differences({"method": "sft", "training": {"seed": 1}}, {"method": "dpo", "training": {"seed": 1}})
    assert recipe_differences({"dpo": {"beta": 0.1}}, {"dpo": {"beta": 0.2}}) == [
        "dpo.beta: checkpoint 0.1, recipe 0.2"
    ]
    assert recipe_differences({"training": {"max_steps": 10}}, {"training": {"max_steps": 20}}) == []


def test_no_check_over_a_finished_run_or_without_checkpoints(tmp_path):
    assert resume_problems(tiny(tmp_path, "lora.r=8")) == []  # nothing to resume
    recipe = interrupted_run(tmp_path)
    (Path(recipe.output_dir) / "metrics.json").write_text("{}")  # finished: output_dir's own check says it
    assert resume_problems(tiny(tmp_path, "lora.r=8")) == []


def test_validate_reports_the_resume_mismatch(tmp_path):
    from finetune.cli import app

    interrupted_run(tmp_path)
    args = ["validate", str(TINY), "--set", f"output_dir={tmp_path / 'out'}"]
    result = CliRunner().invoke(app, [*args, "--set", "lora.r=8"])
    assert result.exit_code == 2, result.output
    assert "lora.r: checkpoint 16, recipe 8" in result.output and "--no-resume" in result.output
    assert "Traceback" not in result.output
    assert CliRunner().invoke(app, [*args, "--set", "training.max_steps=100"]).exit_code == 0


def test_extra_resume_from_checkpoint_is_refused_with_a_pointer(tmp_path):
    with pytest.raises(UserError) as error:
        tiny(tmp_path, "training.extra.resume_from_checkpoint=true")
    assert "training.extra.resume_from_checkpoint" in str(error.value) and "automatic resume" in str(error.value)


# --- the step decision and signals --------------------------------------------------------------------------------


def step_end(callback: CheckpointControl, step: int) -> TrainerControl:
    args = SimpleNamespace(device="cpu", output_dir="unused", world_size=1)
    state = SimpleNamespace(global_step=step, max_steps=10, is_world_process_zero=True)
    return callback.on_step_end(args, state, TrainerControl())


def test_step_end_saves_on_time_and_stops_on_a_signal():
    stop = StopOnSignal()
    timed = CheckpointControl(stop, save_minutes=1, save_total_limit=2, recipe_text="")
    control = step_end(timed, 3)
    assert not control.should_save and not control.should_training_stop
    timed.last_save -= 61
    assert step_end(timed, 4).should_save
    stop.signum = signal.SIGTERM
    control = step_end(timed, 5)
    assert control.should_save and control.should_training_stop and timed.stopped_at == 5
    error = interrupted(timed, stop, Path("out"), 10)
    assert error.exit_code == 143
    assert "step 5 of 10" in str(error) and "out/checkpoints/checkpoint-5" in str(error)
    assert "run the same command to resume" in str(error)
    assert interrupted(timed, stop, Path("out"), 5) is None  # stopped at the last step: the run is finished


def deliver(sig: int) -> None:
    """Send `sig` to the main thread, where Python runs its handlers (os.kill lets any thread of a process that
    imported torch take it, and the handler then runs whenever the main thread next checks)."""
    signal.pthread_kill(threading.main_thread().ident, sig)


def wait_until(condition, seconds: float = 60) -> bool:
    """Poll `condition` (a bound on a hang only: it holds within microseconds when the code is right)."""
    deadline = time.monotonic() + seconds
    while not (held := condition()) and time.monotonic() < deadline:
        time.sleep(0.001)
    return held


# The child reports each step on stderr; it sends the second signal only once the first was handled.
TWO_SIGNALS = """
import signal, sys, threading, time
from finetune.train.interrupt import StopOnSignal
main = threading.main_thread().ident
with StopOnSignal() as stop:
    signal.pthread_kill(main, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while stop.signum is None and time.monotonic() < deadline:
        time.sleep(0.001)
    print(f"first handled: {stop.signum}", file=sys.stderr, flush=True)
    signal.pthread_kill(main, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the second signal's handler exits the process
        time.sleep(0.001)
print("still running: the second signal was not acted on", file=sys.stderr, flush=True)
"""


def test_signals_first_is_recorded_second_exits_at_once():
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN when pytest was started with `&`
    with StopOnSignal() as stop:
        deliver(signal.SIGINT)
        assert wait_until(lambda: stop.signum is not None)
        assert stop.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before  # restored
    result = subprocess.run([sys.executable, "-c", TWO_SIGNALS], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert f"first handled: {int(signal.SIGTERM)}" in result.stderr, result.stderr[-3000:]
    assert result.returncode == 143, result.stderr[-3000:]
    assert "SIGTERM received" in result.stderr and "exiting now, without a checkpoint" in result.stderr


def test_a_second_signal_inside_deferring_exit_exits_after_the_block(monkeypatch, capsys):
    """The renames that publish a finished run are not cut in two: the exit waits for the block's end."""
    exits: list[int] = []
    monkeypatch.setattr(os, "_exit", exits.append)  # the handler's exit, recorded instead of ending pytest
    with StopOnSignal() as stop:
        stop.finishing = True
        deliver(signal.SIGTERM)
        assert wait_until(lambda: stop.signum is not None)
        with stop.deferring_exit():
            deliver(signal.SIGTERM)
            assert wait_until(lambda: "exiting once the finished run is in place" in capsys.readouterr().err)
            assert exits == []  # not inside the block
        assert exits == [143]  # right after it
        deliver(signal.SIGTERM)  # outside the block: at once
        assert wait_until(lambda: exits == [143, 143])
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_restores_signals_puts_back_the_handlers_however_the_function_ends():
    from finetune.train.interrupt import restores_signals

    @restores_signals
    def train_then_fail():
        StopOnSignal().install()  # as train.run: kept past training, never restored by itself
        raise RuntimeError("evaluation failed")

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)  # SIGINT is SIG_IGN under `&`
    with pytest.raises(RuntimeError):
        train_then_fail()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_after_the_last_step_the_first_signal_says_the_run_finishes(capsys):
    stop = StopOnSignal()
    control = CheckpointControl(stop, save_minutes=None, save_total_limit=None, recipe_text="")
    args = SimpleNamespace(device="cpu", output_dir="unused", world_size=1)
    state = SimpleNamespace(global_step=10, max_steps=10, is_world_process_zero=True)
    control.on_step_end(args, state, TrainerControl())
    assert stop.finishing
    with stop:
        deliver(signal.SIGTERM)
        assert wait_until(lambda: stop.signum is not None)
    err = capsys.readouterr().err
    assert "SIGTERM received after the last step: finishing the final evaluation and the adapter first" in err
    assert "saving a checkpoint" not in err


def test_a_resume_from_the_last_steps_checkpoint_trains_nothing_and_keeps_the_logged_values():
    """HF Trainer would take one optimizer step past max_steps; the run instead goes straight to finishing."""
    from finetune.train.interrupt import AlreadyTrained, nothing_left_to_train

    args = SimpleNamespace(device="cpu", output_dir="unused", world_size=1)
    control = CheckpointControl(StopOnSignal(), save_minutes=None, save_total_limit=None, recipe_text="", resume_step=6)
    control.on_train_begin(args, SimpleNamespace(global_step=6, max_steps=10, is_world_process_zero=True), None)
    with pytest.raises(AlreadyTrained):
        control.on_train_begin(args, SimpleNamespace(global_step=6, max_steps=6, is_world_process_zero=True), None)
    assert control.stop.finishing

    history = [
        {"loss": 9.0, "num_tokens": 100.0, "step": 5},
        {"eval_loss": 8.5, "step": 5},
        {"loss": 8.0, "aux_loss": 0.1, "num_tokens": 200.0, "rewards/margins": 0.3, "step": 6},
    ]
    trainer = SimpleNamespace(state=SimpleNamespace(log_history=history, global_step=6))
    from finetune.tracking.callbacks import TrackingCallback
    from finetune.tracking.sinks import Tracker

    tracking = TrackingCallback(Tracker([]))  # the run's own callback, as the checkpoint's first run left it
    tracking.first_loss = 10.0
    result = nothing_left_to_train(trainer, tracking)
    assert result.global_step == 6 and result.training_loss is None
    assert (tracking.first_loss, tracking.last_loss, tracking.last_aux_loss, tracking.num_tokens) == (
        10.0,
        8.0,
        0.1,
        200,
    )
    assert tracking.last_logs["rewards/margins"] == 0.3 and "eval_loss" not in tracking.last_logs
