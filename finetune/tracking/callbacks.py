"""The run's tracking callbacks: logged rows with tokens/s, peak memory and router statistics, and samples."""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import TrainerCallback

from finetune.memory import current_rss
from finetune.tracking.sinks import Tracker


def peak_memory_bytes(device: torch.device | None) -> int:
    """Peak so far: torch's allocator on CUDA, the process's max resident set on CPU."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        import resource

        return max(current_rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB
    except ImportError:  # Windows
        return current_rss()


class TrackingCallback(TrainerCallback):
    """Sends the trainer's logs to the tracker, with tokens/s, peak memory and router statistics added.

    It also remembers the first and last logged train loss for metrics.json. `drift_probe` (1 x T input ids) turns
    on router drift: the probe is routed at each logging step and compared with the previous one.
    """

    def __init__(self, tracker: Tracker, expert_load: Any | None = None, *, model: Any = None,
                 drift_probe: torch.Tensor | None = None, device: torch.device | None = None):  # fmt: skip
        self.tracker = tracker
        self.expert_load = expert_load
        self.model = model
        self.drift_probe = drift_probe
        self.device = device
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.last_aux_loss: float | None = None
        self.eval_loss: float | None = None
        self.num_tokens: float | None = None
        self.last_logs: dict[str, Any] = {}  # the latest value of every train-time key (rewards/…, accuracy, …)
        self.eval_logs: dict[str, Any] = {}
        self._rate_mark: tuple[float, float] | None = None  # (time, tokens) at the previous train log
        self._routed_tokens = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._rate_mark = (time.perf_counter(), 0.0)
        if self.expert_load is not None and self.drift_probe is not None and self.model is not None:
            with self.expert_load.paused():
                self.expert_load.drift(self.model, self.drift_probe)  # the baseline for the first drift figure

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        self.remember(logs)
        if "loss" in logs:
            logs.update(self.step_metrics(args))
        self.tracker.log(logs, step=state.global_step)

    def remember(self, logs: dict[str, Any]) -> None:
        """Keep the figures metrics.json reports from one logged row (also replayed from a checkpoint's history)."""
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

    def step_metrics(self, args) -> dict[str, Any]:
        """Throughput, memory and routing since the previous logging step (one host read of the router counts)."""
        metrics: dict[str, Any] = {}
        if self.expert_load is not None:
            metrics.update(self.expert_load.compute(reset=True))
            self._routed_tokens += metrics.get("moe/routed_tokens", 0.0)
            if self.drift_probe is not None and self.model is not None:
                metrics.update(self.expert_load.drift(self.model, self.drift_probe))
        world = max(1, getattr(args, "world_size", 1))
        tokens = self.num_tokens if self.num_tokens is not None else self._routed_tokens * world
        now = time.perf_counter()
        if self._rate_mark is not None and tokens:
            seconds, before = now - self._rate_mark[0], self._rate_mark[1]
            if seconds > 0 and tokens > before:
                metrics["perf/tokens_per_second"] = (tokens - before) / seconds
                metrics["perf/tokens_per_second_per_device"] = (tokens - before) / seconds / world
        self._rate_mark = (now, tokens or 0.0)
        metrics["perf/peak_memory_gb"] = peak_memory_bytes(self.device) / 2**30
        return metrics


def tracking_callbacks(recipe: Any, tracker: Tracker, loaded: Any, tokenizer: Any, prepared: Any, main_process: bool):
    """(TrackingCallback, SamplesCallback, ExpertLoadTracker or None) for a run, from the recipe's settings.

    Router drift is on for runs that train the router or tune preferences; samples use the eval prompts (the
    train prompts when there is no eval split). Only the main process generates or probes, except under FSDP2:
    there every forward gathers the layers collectively, so all ranks generate and probe and only rank 0 logs.
    """
    from finetune.distributed.sharding import fsdp_launch
    from finetune.moe.routing import ExpertLoadTracker
    from finetune.tracking.samples import SamplesCallback, prompt_rows

    generates = main_process or fsdp_launch()

    model = loaded.model
    expert_load = ExpertLoadTracker(model, train_only=True) if recipe.moe.track_expert_load else None
    n = recipe.tracking.sample_prompts if generates else 0
    pairs = prompt_rows(prepared.eval if prepared.eval is not None else prepared.train, max(n, 1))
    probe = None
    wants_drift = recipe.lora.router == "trainable" or recipe.method in ("dpo", "kto")
    if expert_load is not None and generates and wants_drift and pairs:
        prompt, reference = pairs[0]
        probe = torch.tensor([(prompt + reference)[-128:]])
    callback = TrackingCallback(tracker, expert_load, model=model, drift_probe=probe, device=loaded.device)
    samples = SamplesCallback(
        tracker,
        model,
        tokenizer,
        pairs[:n],
        max_new_tokens=recipe.tracking.sample_max_new_tokens,
        expert_load=expert_load,
    )
    return callback, samples, expert_load
