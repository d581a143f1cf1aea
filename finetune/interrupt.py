"""When to save and when to stop, decided identically on every rank; SIGTERM/SIGINT as preemptible clusters send them.

A save that only some ranks enter deadlocks a distributed run, and so does a stop. So every optimizer step each
rank contributes two flags, "a timed save is due" (rank 0's clock only) and "a signal arrived" (any rank), and one
tiny all-reduce (max) on the process group's device gives all ranks the same answer at the same step. A single
process skips the collective. The Trainer then saves at the end of that step (into checkpoints/.partial, see
checkpoints.py); `on_save` waits for every rank to finish writing and rank 0 publishes the checkpoint.

The first SIGTERM or SIGINT asks for a checkpoint at the end of the current step and a clean stop; the run then
raises `Interrupted` (exit code 128 + the signal number: 143 for SIGTERM, 130 for SIGINT, as a shell reports a
process the signal ended, so a scheduler requeues it rather than counting it a success). A second signal exits at
once, without a checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from finetune.checkpoints import publish, rotate

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """A run stopped by a signal after saving a checkpoint; the CLI prints the message and exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopOnSignal:
    """Context manager: the first SIGTERM/SIGINT is recorded (`signum`), a second one exits the process at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        import threading

        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            print(f"\n{name} again: exiting now, without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        if int(os.environ.get("RANK", "0")) == 0:
            print(
                f"\n{name} received: saving a checkpoint at the end of this step, then stopping "
                f"(send it again to exit at once)",
                file=sys.stderr,
                flush=True,
            )


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
