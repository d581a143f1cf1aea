"""When to save and when to stop, decided identically on every rank; SIGTERM/SIGINT as preemptible clusters send them.

A save that only some ranks enter deadlocks a distributed run, and so does a stop. So every optimizer step each
rank contributes two flags, "a timed save is due" (rank 0's clock only) and "a signal arrived" (any rank), and one
tiny all-reduce (max) on the process group's device gives all ranks the same answer at the same step. A single
process skips the collective. The Trainer then saves at the end of that step (into checkpoints/.partial, see
checkpoints.py); `on_save` waits for every rank to finish writing and rank 0 publishes the checkpoint.

The first SIGTERM or SIGINT asks for a checkpoint at the end of the current step and a clean stop; the run then
raises `Interrupted` (exit code 128 + the signal number: 143 for SIGTERM, 130 for SIGINT, as a shell reports a
process the signal ended, so a scheduler requeues it rather than counting it a success). A second signal sent after
the first one's message has appeared exits at once (128 + its number), without a checkpoint; two that arrive before
the first is handled count as one (see StopOnSignal). After the last step (final evaluation, adapter write) the
first signal lets the run finish, and a second one exits before adapter/ and metrics.json appear, so the same
command resumes: the folder is finished or resumable, never a half-written adapter (run.py writes both under
temporary names and renames them inside `StopOnSignal.deferring_exit`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import TrainOutput

from finetune.train.checkpoints import publish, rotate

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """A run stopped by a signal after saving a checkpoint; the CLI prints the message and exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class AlreadyTrained(Exception):
    """A resume from the last step's checkpoint (a run killed while finishing): raised by CheckpointControl as training
    begins, with the checkpoint loaded, so the run goes straight to the final evaluation (`nothing_left_to_train`)."""


class StopOnSignal:
    """Context manager: the first SIGTERM/SIGINT is recorded (`signum`), a second one exits the process at once.

    What holds, exactly:
    - The handler runs in the main thread, between two Python bytecodes (CPython runs Python-level handlers only
      there, whichever thread the kernel gave the signal to), so a signal is acted on as soon as the main thread
      next runs Python code: within a training step's Python work, later only if it sits in one long C call.
    - A second signal sent after the first one's message has appeared exits at once with 128 + its number
      (`os._exit`, no checkpoint), except inside `deferring_exit()` (the two renames that publish a finished run),
      where it exits as soon as that block ends.
    - Two signals that reach the process before the handler has run once count as one: the kernel keeps one
      pending instance of a standard signal, and CPython calls the handler once per pending signal number. So
      "send it again" means after the message.
    - Handlers can only be installed from the main thread; elsewhere this does nothing (signum stays None).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.finishing = False  # past the last step: the final evaluation and the adapter write (CheckpointControl)
        self._previous: dict[int, object] = {}
        self._deferring = False
        self._deferred_exit: int | None = None

    def __enter__(self) -> StopOnSignal:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def install(self) -> None:
        """Take over SIGTERM/SIGINT until `restore` (train.run keeps them past training; `restores_signals`)."""
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in SIGNALS:
                self._previous.setdefault(sig, signal.signal(sig, self._handle))

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @contextlib.contextmanager
    def deferring_exit(self) -> Iterator[None]:
        """A second signal inside this block exits once it ends: for the few renames that publish a finished run."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
            if self._deferred_exit is not None:
                os._exit(self._deferred_exit)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            if self._deferring:
                print(f"\n{name} again: exiting once the finished run is in place", file=sys.stderr, flush=True)
                self._deferred_exit = 128 + signum
                return
            lost = (
                "before the adapter is in place; the same command resumes" if self.finishing else "without a checkpoint"
            )
            print(f"\n{name} again: exiting now, {lost}", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        if int(os.environ.get("RANK", "0")) != 0:
            return
        if self.finishing:
            message = (
                f"\n{name} received after the last step: finishing the final evaluation and the adapter first "
                "(send it again to exit at once; the same command then resumes)"
            )
        else:
            message = (
                f"\n{name} received: saving a checkpoint at the end of this step, then stopping "
                "(send it again to exit at once)"
            )
        print(message, file=sys.stderr, flush=True)


def restores_signals(function: Callable) -> Callable:
    """Decorator: SIGTERM/SIGINT handlers as they were before `function` ran, however it ends (train.run installs
    StopOnSignal when training starts and keeps it through the final evaluation and the adapter write)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        main = threading.current_thread() is threading.main_thread()
        saved = {sig: signal.getsignal(sig) for sig in SIGNALS} if main else {}
        try:
            return function(*args, **kwargs)
        finally:
            for sig, handler in saved.items():
                if handler is not None:  # None: set outside Python, nothing to put back
                    signal.signal(sig, handler)

    return wrapper


def _distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def agree(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag true on every rank when it is true on any rank (all-reduce max); the flags as given alone."""
    if not _distributed():
        return flags
    if torch.distributed.get_backend() != "nccl":
        device = torch.device("cpu")  # gloo reduces CPU tensors
    tensor = torch.tensor([float(f) for f in flags], device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def barrier() -> None:
    if _distributed():
        torch.distributed.barrier()


class CheckpointControl(TrainerCallback):
    """Timed saves and signal stops, agreed across ranks at step ends; publishes each checkpoint atomically."""

    def __init__(
        self, stop: StopOnSignal, *, save_minutes: float | None, save_total_limit: int | None, recipe_text: str,
        resume_step: int | None = None,
    ) -> None:  # fmt: skip
        self.stop = stop
        self.save_seconds = save_minutes * 60 if save_minutes else None
        self.save_total_limit = save_total_limit
        self.recipe_text = recipe_text
        self.resume_step = resume_step
        self.last_save = time.monotonic()
        self.stopped_at: int | None = None  # the step a signal stopped training at
        self.last_checkpoint: Path | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_save = time.monotonic()
        if self.resume_step is not None and state.is_world_process_zero:
            print(
                f"resuming from checkpoints/checkpoint-{self.resume_step} (step {state.global_step} of {state.max_steps})"
            )
        if self.resume_step is not None and state.global_step >= state.max_steps:
            self.stop.finishing = True
            raise AlreadyTrained  # the Trainer checks max_steps only at step ends: it would take one step more

    def on_step_end(self, args, state, control, **kwargs):
        due = (
            self.save_seconds is not None
            and state.is_world_process_zero
            and time.monotonic() - self.last_save >= self.save_seconds
        )
        save, stop = agree([due, self.stop.signum is not None], args.device)
        if save:
            control.should_save = True
        if stop:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        if state.global_step >= state.max_steps:
            self.stop.finishing = True  # a signal from here on lets the run finish (see StopOnSignal)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.stop.finishing = True
        return control

    def on_save(self, args, state, control, **kwargs):
        barrier()  # every rank has written its part (optimizer shards, RNG state) into the staging folder
        if state.is_world_process_zero:
            staged = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            self.last_checkpoint = publish(staged, state.global_step, self.recipe_text, args.world_size)
            rotate(staged.parent.parent.parent, self.save_total_limit)
        barrier()  # no rank leaves (or exits on a signal) before the checkpoint is published
        self.last_save = time.monotonic()
        return control


def nothing_left_to_train(trainer, tracking) -> TrainOutput:
    """The training result after `AlreadyTrained`: the tracking callback takes the last train-time values (loss, aux
    loss, tokens, method metrics) from the checkpoint's log history, as it saw them when it trained those steps.
    The mean train loss covers the steps trained by one `train()` call: none here, so None."""
    for row in trainer.state.log_history:
        if any(key.startswith("eval_") for key in row):
            continue
        tracking.remember(row)
    return TrainOutput(trainer.state.global_step, None, {})  # type: ignore[arg-type]


def interrupted(control: CheckpointControl, stop: StopOnSignal, output_dir: Path, max_steps: int) -> Interrupted | None:
    """The exception to raise when a signal stopped training before its last step, else None."""
    if stop.signum is None or control.stopped_at is None or control.stopped_at >= max_steps:
        return None
    where = f"{output_dir}/checkpoints/checkpoint-{control.stopped_at}"
    name = signal.Signals(stop.signum).name
    return Interrupted(
        f"stopped by {name} at step {control.stopped_at} of {max_steps}; checkpoint saved in {where}; "
        "run the same command to resume",
        128 + stop.signum,
    )
