"""Experiment tracking: metrics.jsonl always, W&B when the recipe asks, never fatal.

One `Tracker` is handed to training; it fans out to its sinks. A failing sink is reported once and
dropped, so a W&B outage never stops a run.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback


class JsonlSink:
    def __init__(self, path: Path):
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": step, "time": round(time.time(), 3), **metrics}
        self._file.write(json.dumps(row, default=float) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class WandbSink:
    def __init__(self, *, project: str, entity: str | None, name: str, tags: list[str], config: dict[str, Any]):
        import wandb

        self._wandb = wandb
        self.run = wandb.init(project=project, entity=entity, name=name, tags=tags, config=config)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class Tracker:
    """Fans metrics out to sinks; a sink that raises is disabled with one warning."""

    def __init__(self, sinks: list[Any]):
        self.sinks = sinks

    def log(self, metrics: dict[str, Any], step: int) -> None:
        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        for sink in list(self.sinks):
            try:
                sink.log(clean, step)
            except Exception as e:
                print(f"warning: tracking to {type(sink).__name__} failed ({e}); continuing without it")
                self.sinks.remove(sink)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:
                print(f"warning: closing {type(sink).__name__} failed ({e})")


def make_tracker(settings: Any, output_dir: Path, config: dict[str, Any]) -> Tracker:
    """Build the tracker for a run; W&B failing to start is a warning, not an error."""
    sinks: list[Any] = [JsonlSink(output_dir / "metrics.jsonl")]
    if settings.backend == "wandb":
        try:
            sinks.append(
                WandbSink(
                    project=settings.project,
                    entity=settings.entity,
                    name=settings.run_name or output_dir.name,
                    tags=list(settings.tags),
                    config=config,
                )
            )
        except Exception as e:
            print(f"warning: could not start W&B ({e}); metrics still go to {output_dir / 'metrics.jsonl'}")
    return Tracker(sinks)


class TrackingCallback(TrainerCallback):
    """Sends the trainer's logs, plus per-layer expert load when a load tracker is given, to the tracker.

    It also remembers the first and last logged train loss for metrics.json.
    """

    def __init__(self, tracker: Tracker, expert_load: Any | None = None):
        self.tracker = tracker
        self.expert_load = expert_load
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.last_aux_loss: float | None = None
        self.eval_loss: float | None = None
        self.num_tokens: float | None = None
        self.last_logs: dict[str, Any] = {}  # the latest value of every train-time key (rewards/…, accuracy, …)
        self.eval_logs: dict[str, Any] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        (self.eval_logs if any(k.startswith("eval_") for k in logs) else self.last_logs).update(logs)
        if "loss" in logs:
            self.first_loss = logs["loss"] if self.first_loss is None else self.first_loss
            self.last_loss = logs["loss"]
        if "aux_loss" in logs:
            self.last_aux_loss = logs["aux_loss"]
        if "eval_loss" in logs:
            self.eval_loss = logs["eval_loss"]
        if "num_tokens" in logs:
            self.num_tokens = logs["num_tokens"]
        if self.expert_load is not None and "loss" in logs:
            logs.update(self.expert_load.compute(reset=True))
        self.tracker.log(logs, step=state.global_step)
