"""End to end: killed runs resume to the uninterrupted run's adapter; kills mid-save leave nothing resume would use.

The helpers take the launch command as a prefix (`python` by default), so the same kill-and-resume logic runs under
torchrun or accelerate (the FSDP2 variant passes its own launcher and --set overrides).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from safetensors.torch import load_file
from signals import at_gate, signal_gate
from typer.testing import CliRunner

from finetune.train.checkpoints import MARKER, scan, staging_dir

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny-mixtral-sft.yaml"
MAX_STEPS = 6
# fp32 on CPU (model.dtype auto), a checkpoint every 2 steps, no eval (it would only add time)
SETTINGS = (
    f"training.max_steps={MAX_STEPS}",
    "training.save_steps=2",
    "training.logging_steps=1",
    "data.eval_fraction=0",
)


def run_args(model_dir: Path, out: Path, settings: Sequence[str] = ()) -> list[str]:
    sets = [f"model.path={model_dir}", f"output_dir={out}", *SETTINGS, *settings]
    return ["run", str(TINY), *[arg for s in sets for arg in ("--set", s)]]


def start(args: list[str], launcher: Sequence[str] = (), script: Path | None = None) -> subprocess.Popen:
    """`finetune` in its own session (so a kill reaches every process a launcher started), output in files."""
    entry = [str(script)] if script else ["-m", "finetune.cli"]
    command = [*(launcher or [sys.executable]), *entry, *args]
    log = open(f"/tmp/finetune-resume-{os.getpid()}-{time.monotonic_ns()}.log", "w+")  # noqa: SIM115
    proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, timeout: float = 900) -> tuple[int, str]:
    """Wait for the process; its return code and its whole output."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
    proc.log.seek(0)  # type: ignore[attr-defined]
    output = proc.log.read()  # type: ignore[attr-defined]
    proc.log.close()  # type: ignore[attr-defined]
    os.unlink(proc.log.name)  # type: ignore[attr-defined]
    return code, output


def run(args: list[str], launcher: Sequence[str] = ()) -> tuple[int, str]:
    return finish(start(args, launcher))


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = 600) -> None:
    """Poll until `condition()`; fail (with the output) if the process ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
            code, output = finish(proc)
            pytest.fail(f"the condition never held (exit {code}):\n{output[-3000:]}")
        time.sleep(0.1)


def complete_checkpoint(out: Path, step: int) -> Callable[[], bool]:
    return lambda: (out / "checkpoints" / f"checkpoint-{step}" / MARKER).is_file()


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> tuple[int, str]:
    os.killpg(proc.pid, sig)
    return finish(proc)


def adapter_difference(reference: Path, other: Path) -> tuple[float, float]:
    """(max abs difference between two adapter folders' tensors, max abs of the reference: the adapter's scale)."""
    a = load_file(reference / "adapter_model.safetensors")
    b = load_file(other / "adapter_model.safetensors")
    assert set(a) == set(b) and a
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    scale = max(float(v.float().abs().max()) for v in a.values())
    return diff, scale


def assert_same_adapter(reference: Path, other: Path) -> None:
    diff, scale = adapter_difference(reference, other)
    assert scale > 0 and diff <= 1e-3 * scale, f"max abs diff {diff:.3g} vs adapter scale {scale:.3g}"


def kill_and_resume(
    model_dir: Path,
    out: Path,
    *,
    settings: Sequence[str] = (),
    launcher: Sequence[str] = (),
    when: Callable[[], bool] | None = None,
    script: Path | None = None,
) -> tuple[str, str]:
    """Start a run (through `script` if given), SIGKILL it once `when()` holds (default: checkpoint-2 is complete),
    then run the same command again; the killed and the resumed run's output."""
    args = run_args(model_dir, out, settings)
    proc = start(args, launcher, script)
    wait_for(when or complete_checkpoint(out, 2), proc)
    _, killed = kill(proc)
    code, resumed = run(args, launcher)
    assert code == 0, resumed[-3000:]
    return killed, resumed


# --- shared runs -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir) -> Path:
    """The uninterrupted run every resumed run must match."""
    out = tmp_path_factory.mktemp("reference") / "out"
    code, output = run(run_args(tiny_model_dir, out))
    assert code == 0, output[-3000:]
    return out


SLOW_SAVE = """
import sys, time
from pathlib import Path
import transformers
import finetune.train.checkpoints as checkpoints

WINDOW, STEP = {window!r}, {step}

def pause(path):
    Path(path, "..", "..", "..", "SAVE_PAUSED").resolve().touch()  # in output_dir: the test kills now
    time.sleep(600)

real_rng = transformers.Trainer._save_rng_state
def slow_rng(self, output_dir):  # inside the Trainer's writes: optimizer and adapter written, trainer state not
    real_rng(self, output_dir)
    if WINDOW == "writing" and self.state.global_step == STEP:
        pause(output_dir)
transformers.Trainer._save_rng_state = slow_rng

real_fsync = checkpoints._fsync
def slow_fsync(path):  # the marker's temporary file: renamed into place, marker not yet written
    real_fsync(path)
    if WINDOW == "marker" and Path(path).name == ".COMPLETE.tmp" and Path(path).parent.name == f"checkpoint-{{STEP}}":
        pause(Path(path).parent / "x")
checkpoints._fsync = slow_fsync

from finetune.cli import main
sys.argv = ["finetune", *sys.argv[1:]]
main()
"""


def slow_save(tmp_path: Path, window: str, step: int = 4) -> Path:
    """A `finetune` entry script whose save of `step` pauses in `window` (writing: inside the Trainer's writes;
    marker: renamed into place, marker not written) and touches output_dir/SAVE_PAUSED."""
    script = tmp_path / f"slow_save_{window}.py"
    script.write_text(SLOW_SAVE.format(window=window, step=step))
    return script


def paused(out: Path) -> Callable[[], bool]:
    return lambda: (out / "SAVE_PAUSED").exists()


def output_so_far(proc: subprocess.Popen) -> str:
    return Path(proc.log.name).read_text()  # type: ignore[attr-defined]


FINISH_SIGNAL = """
import signal, sys, threading
import transformers
import finetune.moe.lora as lora

WHERE, COUNT = {where!r}, {count}

def sigterm():  # to the main thread, whose handler runs before pthread_kill returns: each one handled, in order
    for _ in range(COUNT):
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)

real_loop = transformers.Trainer.evaluation_loop
def evaluation_loop(self, *args, **kwargs):  # the final evaluation (no eval_steps: the only one)
    if WHERE == "eval":
        sigterm()
    return real_loop(self, *args, **kwargs)
transformers.Trainer.evaluation_loop = evaluation_loop

real_save = lora.save_adapter
def save_adapter(model, output_dir, *args, **kwargs):  # the final adapter: weights written, tokenizer and card not
    real_save(model, output_dir, *args, **kwargs)
    if WHERE == "write" and "checkpoint-" not in str(output_dir):
        sigterm()
lora.save_adapter = save_adapter

from finetune.cli import main
sys.argv = ["finetune", *sys.argv[1:]]
main()
"""


def finish_signal(tmp_path: Path, where: str, count: int) -> Path:
    """A `finetune` entry script that sends itself `count` SIGTERMs from inside the final evaluation (`eval`) or the
    final adapter write (`write`): the point is in the code, not in time."""
    script = tmp_path / f"finish_signal_{where}_{count}.py"
    script.write_text(FINISH_SIGNAL.format(where=where, count=count))
    return script


# --- tests -----------------------------------------------------------------------------------------------------


def test_kill_during_checkpoint_write_resumes_from_the_previous_one_to_the_same_adapter(
    tmp_path, tiny_model_dir, reference
):
    """SIGKILL while the Trainer writes checkpoint 4: none of it is a checkpoint; the rerun resumes from 2."""
    out = tmp_path / "writing"
    _, output = kill_and_resume(tiny_model_dir, out, script=slow_save(tmp_path, "writing"), when=paused(out))
    assert f"resuming from checkpoints/checkpoint-2 (step 2 of {MAX_STEPS})" in output
    assert f"removing unfinished checkpoint writes in {staging_dir(out)}" in output
    assert json.loads((out / "metrics.json").read_text())["steps"] == MAX_STEPS
    assert_same_adapter(reference / "adapter", out / "adapter")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, MAX_STEPS + 1))  # each step once, in order
    for _, folder in scan(out).complete:  # the standard adapter files directly in each, with our marker and recipe
        names = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", MARKER, "recipe.yaml"} <= names
    assert not staging_dir(out).exists()


def test_kill_between_rename_and_marker_leaves_no_checkpoint_resume_would_pick(tmp_path, tiny_model_dir):
    """SIGKILL after checkpoint-4 is renamed into place but before its marker: it is incomplete; --no-resume clears."""
    out = tmp_path / "marker"
    args = run_args(tiny_model_dir, out)
    proc = start(args, script=slow_save(tmp_path, "marker"))
    wait_for(paused(out), proc)
    kill(proc)
    found = scan(out)
    assert [p.name for p in found.incomplete] == ["checkpoint-4"] and found.latest[0] == 2

    code, output = run([*args, "--set", "training.max_steps=2", "--no-resume"])
    assert code == 0, output[-3000:]
    assert "resuming" not in output
    assert [step for step, _ in scan(out).complete] == [2] and scan(out).incomplete == []
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) <= 2  # the old run's log went with its checkpoints


def test_sigterm_saves_exits_with_the_message_and_the_rerun_finishes_the_same(tmp_path, tiny_model_dir, reference):
    out = tmp_path / "term"
    args = run_args(tiny_model_dir, out)
    proc = start(args, script=signal_gate(tmp_path))  # step 3 ends once the signal is in: it cannot run to the end
    wait_for(at_gate(out), proc)
    code, output = kill(proc, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, output[-3000:]
    assert "SIGTERM received: saving a checkpoint at the end of this step" in output
    stopped = scan(out).latest
    assert stopped is not None and 2 < stopped[0] < MAX_STEPS, output[-3000:]
    assert f"stopped by SIGTERM at step {stopped[0]} of {MAX_STEPS}; checkpoint saved in {stopped[1]}" in output
    assert "run the same command to resume" in output and "Traceback" not in output
    assert not (out / "metrics.json").exists() and not (out / "adapter").exists()

    code, output = run(args)
    assert code == 0, output[-3000:]
    assert f"resuming from checkpoints/checkpoint-{stopped[0]} (step {stopped[0]} of {MAX_STEPS})" in output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == MAX_STEPS and metrics["first_loss"] > metrics["final_train_loss"]
    assert_same_adapter(reference / "adapter", out / "adapter")

    # a finished run is never overwritten, checkpoints present or not
    from finetune.cli import app

    before = (out / "metrics.json").read_bytes()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "already holds a finished run" in result.output
    assert (out / "metrics.json").read_bytes() == before and scan(out).latest is not None


def test_a_second_sigterm_after_the_message_exits_at_once(tmp_path, tiny_model_dir):
    """The promise "send it again to exit at once", as a scheduler sends it (to the process, not a thread): SIGTERM,
    wait for the message, SIGTERM again, exit 143 within seconds. The first signal's checkpoint is held unpublished,
    so only the second signal can end the run, whatever the load."""
    out = tmp_path / "twice"
    proc = start(run_args(tiny_model_dir, out), script=signal_gate(tmp_path, hold=True))
    wait_for(at_gate(out), proc)
    os.killpg(proc.pid, signal.SIGTERM)
    wait_for(lambda: "SIGTERM received: saving a checkpoint at the end of this step" in output_so_far(proc), proc)
    os.killpg(proc.pid, signal.SIGTERM)
    code, output = finish(proc, timeout=60)  # a bound on a hang: the exit takes milliseconds
    assert code == 128 + signal.SIGTERM, output[-3000:]
    assert "SIGTERM again: exiting now, without a checkpoint" in output
    assert scan(out).latest[0] == 2 and not (out / "adapter").exists() and not (out / "metrics.json").exists()


def test_sigterm_during_the_final_evaluation_lets_the_run_finish(tmp_path, tiny_model_dir):
    out = tmp_path / "eval"
    args = run_args(tiny_model_dir, out, ["data.eval_fraction=0.05"])
    code, output = finish(start(args, script=finish_signal(tmp_path, "eval", 1)))
    assert code == 0, output[-3000:]
    assert "SIGTERM received after the last step: finishing the final evaluation and the adapter first" in output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == MAX_STEPS and metrics["eval_loss"] is not None  # the evaluation ran to its end
    names = {p.name for p in (out / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer_config.json"} <= names
    assert not (out / ".adapter.partial").exists() and "Traceback" not in output


def test_two_sigterms_during_the_adapter_write_leave_a_resumable_folder(tmp_path, tiny_model_dir, reference):
    """The second signal exits before adapter/ and metrics.json appear: no half-written adapter, nothing that reads
    as a finished run; the same command resumes from the last checkpoint and ends with the uninterrupted adapter."""
    out = tmp_path / "write"
    args = run_args(tiny_model_dir, out)
    code, output = finish(start(args, script=finish_signal(tmp_path, "write", 2)))
    assert code == 128 + signal.SIGTERM, output[-3000:]
    assert "SIGTERM again: exiting now, before the adapter is in place; the same command resumes" in output
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()
    assert scan(out).latest[0] == MAX_STEPS

    code, output = run(args)
    assert code == 0, output[-3000:]
    assert f"resuming from checkpoints/checkpoint-{MAX_STEPS} (step {MAX_STEPS} of {MAX_STEPS})" in output
    assert json.loads((out / "metrics.json").read_text())["steps"] == MAX_STEPS
    assert_same_adapter(reference / "adapter", out / "adapter")
    assert not (out / ".adapter.partial").exists()
