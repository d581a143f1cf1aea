"""The signal gate: a `finetune` entry script whose run waits at a known step for the test's signal.

A signal sent "once some file appears" lands wherever the run happens to be by then: on a loaded machine it can be
steps later, or after the end. Behind the gate the run cannot move past step `gate` until a signal has been handled,
so the test waits for the file the gate writes (AT_GATE, no time window), signals, and knows the step it stopped at.
Under `finetune run --num-processes N` the ranks run the same script (the launch command is rewritten to start it
instead of `-m finetune`), so every rank waits at the gate until its signal, passed on by the launcher, arrives.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

SIGNAL_GATE = """
import sys, time
from pathlib import Path
import finetune.train.interrupt as interrupt
import finetune.train.launch as launch

GATE, HOLD = {gate}, {hold!r}

def wait(condition):  # polled, so the signal handler runs within milliseconds; 600 s only bounds a hang
    deadline = time.monotonic() + 600
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)

real_step_end = interrupt.CheckpointControl.on_step_end
def gated_step_end(self, args, state, control, **kwargs):  # the end of step GATE waits for the test's signal
    if state.global_step == GATE:
        Path(args.output_dir).parents[1].joinpath("AT_GATE").touch()  # in output_dir: the test signals now
        wait(lambda: self.stop.signum is not None)
    return real_step_end(self, args, state, control, **kwargs)
interrupt.CheckpointControl.on_step_end = gated_step_end

real_publish = interrupt.publish
def held_publish(staged, step, *args, **kwargs):  # HOLD: the signal's checkpoint never completes (a slow disk)
    if HOLD and step == GATE:
        wait(lambda: False)
    return real_publish(staged, step, *args, **kwargs)
interrupt.publish = held_publish

real_command = launch.launch_command
def gated_command(*args, **kwargs):  # --num-processes: the ranks run this script (so the gate) too
    command = real_command(*args, **kwargs)
    at = next(i for i in range(len(command)) if command[i : i + 2] == ["-m", "finetune"])
    return [*command[:at], __file__, *command[at + 2 :]]
launch.launch_command = gated_command

from finetune.cli import main
sys.argv = ["finetune", *sys.argv[1:]]
main()
"""


def signal_gate(tmp_path: Path, gate: int = 3, hold: bool = False) -> Path:
    """A `finetune` entry script whose step `gate` ends only once a signal has arrived (it touches output_dir/AT_GATE
    first), so the signal lands at a known step however loaded the machine; `hold`: that step's checkpoint is then
    never published (the run can only end by a second signal). SIGKILL at the gate: checkpoints up to step
    `gate - 1` are complete and none after can be."""
    script = tmp_path / f"signal_gate_{gate}_{hold}.py"
    script.write_text(SIGNAL_GATE.format(gate=gate, hold=hold))
    return script


def at_gate(out: Path) -> Callable[[], bool]:
    return lambda: (out / "AT_GATE").exists()


PAUSE_AFTER_FIRST_WRITE = """
import importlib, sys, time
from pathlib import Path

module, cls, method, paused = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
owner = getattr(importlib.import_module(module), cls)
real = getattr(owner, method)
def paused_write(self, *args, **kwargs):  # the first write is done: say so, and wait for the kill
    real(self, *args, **kwargs)
    paused.touch()
    time.sleep(600)  # a bound on a hang only: the test kills as soon as it sees the file
setattr(owner, method, paused_write)

from finetune.cli import main
sys.argv = ["finetune", *sys.argv[5:]]
main()
"""


def start_paused_after_first_write(writer: str, args: list[str], tmp_path: Path, cwd: Path) -> subprocess.Popen:
    """Start `finetune ARGS` with `writer` ('module:Class.method') pausing for good right after its first call, and
    return once it has (the PAUSED file exists), so the test's kill lands mid-write however loaded the machine."""
    module, _, qualname = writer.partition(":")
    cls, method = qualname.split(".")
    paused, log = tmp_path / "PAUSED", tmp_path / "paused.log"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-c", PAUSE_AFTER_FIRST_WRITE, module, cls, method, str(paused), *args],
                                cwd=cwd, stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
    deadline = time.monotonic() + 600  # bounds a hang only
    while time.monotonic() < deadline and proc.poll() is None and not paused.exists():
        time.sleep(0.02)
    if not paused.exists():
        proc.kill()
        proc.wait()
        pytest.fail(f"{writer} was never called:\n{log.read_text()[-3000:]}")
    return proc
