"""Experiment tracking: metrics.jsonl always; W&B, TensorBoard or MLflow when the recipe asks; never fatal.

One `Tracker` is handed to training; it fans out to its sinks. A failing sink is reported once and dropped, so a
W&B outage, a bad entity or a full disk never stops a run. Nothing secret is written: configs pass
`scrub_secrets` first. The per-step metrics (tokens/s, memory, routing) come from `TrackingCallback`.
"""

from __future__ import annotations

import contextlib
import json
import math
import netrc
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from finetune.recipe.secrets import scrub_argv, scrub_secrets

LOAD_KEY = "moe/load"


def wandb_logged_in() -> bool:
    """WANDB_API_KEY in the environment, or a netrc entry for the W&B host; never prompts."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    """auto → WANDB_MODE when set, else online when logged in, else offline."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env
    return "online" if wandb_logged_in() else "offline"


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}


class JsonlSink:
    """metrics.jsonl: one row per log call, scalars plus the `moe/load` matrix; samples.jsonl beside it."""

    def __init__(self, path: Path):
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": step, "time": round(time.time(), 3), **scalars(metrics)}
        if LOAD_KEY in metrics:
            row[LOAD_KEY] = [[round(x, 6) for x in r] for r in metrics[LOAD_KEY]]
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        with (self.path.parent / "samples.jsonl").open("a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self._file.close()


class WandbSink:
    """A W&B run in the output folder: scalars, the load heatmap (image + table), samples, the adapter artifact."""

    def __init__(self, settings: Any, *, name: str, tags: list[str], config: dict[str, Any], output_dir: Path):
        import wandb

        self._wandb = wandb
        self.mode = resolve_mode(settings.mode)
        self._samples: list[list[Any]] = []
        argv = sys.argv
        sys.argv = scrub_argv(argv)  # W&B records the command line (a `--set x.token=...` would leak): scrubbed copy
        try:
            self.run = self._init(settings, name=name, tags=tags, config=config, output_dir=output_dir)
        finally:
            sys.argv = argv

    def _init(self, settings: Any, *, name: str, tags: list[str], config: dict[str, Any], output_dir: Path):
        wandb = self._wandb
        return wandb.init(
            project=settings.project,
            entity=settings.entity,
            name=name,
            group=settings.group,
            notes=settings.notes,
            tags=tags,
            config=config,
            mode=self.mode,
            dir=str(output_dir),
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        data: dict[str, Any] = scalars(metrics)
        load = metrics.get(LOAD_KEY)
        if load:
            from finetune.tracking.routing_panels import figure_image, heatmap_figure, load_table_rows

            image = figure_image(heatmap_figure(load, title=f"expert load, step {step}"))
            data["moe_load/heatmap"] = self._wandb.Image(image, caption=f"layer x expert load, step {step}")
            rows = load_table_rows(load)
            data["moe_load/table"] = self._wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])
        self.run.log(data, step=step)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        columns = ["step", "prompt", "reference", "generated"]
        self._samples += [[r[c] for c in columns] for r in rows]  # one growing table: every step's rows
        self.run.log({"samples/generations": self._wandb.Table(columns=columns, data=self._samples)}, step=step)

    def log_artifact(self, path: Path) -> None:
        artifact = self._wandb.Artifact(name=f"adapter-{self.run.id}", type="model")
        artifact.add_dir(str(path))
        self.run.log_artifact(artifact)

    def close(self) -> None:
        run_dir = Path(self.run.dir).parent if self.mode == "offline" else None
        self.run.finish()
        if run_dir is not None:
            print(f"W&B run saved offline; upload it with: wandb sync {run_dir}")


class TensorBoardSink:
    """TensorBoard event files in OUTPUT/tensorboard/: the same scalars, the heatmap as a figure, samples as text."""

    def __init__(self, output_dir: Path, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for key, value in scalars(metrics).items():
            self.writer.add_scalar(key, value, step)
        if metrics.get(LOAD_KEY):
            from finetune.tracking.routing_panels import heatmap_figure

            self.writer.add_figure("moe_load/heatmap", heatmap_figure(metrics[LOAD_KEY]), step)
        self.writer.flush()

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        text = "\n\n".join(f"**prompt** {r['prompt']}\n\n**generated** {r['generated']}" for r in rows)
        self.writer.add_text("samples", text, step)

    def close(self) -> None:
        self.writer.close()


class MlflowSink:
    """An MLflow run (tracking URI from MLFLOW_TRACKING_URI, else OUTPUT/mlruns): scalars, config, samples."""

    def __init__(self, settings: Any, *, name: str, tags: list[str], config: dict[str, Any], output_dir: Path):
        import mlflow

        self._mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri((output_dir / "mlruns").resolve().as_uri())
        mlflow.set_experiment(settings.project)
        mlflow.start_run(run_name=name, tags=dict.fromkeys(tags, "true"))
        mlflow.log_dict(config, "config.json")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._mlflow.log_metrics(scalars(metrics), step=step)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        self._mlflow.log_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), f"samples/step{step}.jsonl")

    def close(self) -> None:
        self._mlflow.end_run()


class Tracker:
    """Fans metrics out to sinks; a sink that raises is dropped with one warning, and training carries on."""

    def __init__(self, sinks: list[Any]):
        self.sinks = sinks

    def _each(self, method: str, *args: Any) -> None:
        for sink in list(self.sinks):
            call = getattr(sink, method, None)
            if call is None:
                continue
            try:
                call(*args)
            except Exception as e:
                print(f"warning: tracking to {type(sink).__name__} failed ({e}); continuing without it")
                self.sinks.remove(sink)
                with contextlib.suppress(Exception):
                    sink.close()

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._each("log", metrics, step)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        self._each("log_samples", rows, step)

    def log_artifact(self, path: Path) -> None:
        self._each("log_artifact", path)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:
                print(f"warning: closing {type(sink).__name__} failed ({e})")
        self.sinks = []


def default_tags(recipe: Any) -> list[str]:
    """Tags naming the method, the quantisation and the model, then the recipe's own."""
    model = Path(str(recipe.model.path).rstrip("/")).name or str(recipe.model.path)
    tags = [recipe.method, recipe.model.quantization, model[:64], *recipe.tracking.tags]
    return list(dict.fromkeys(tags))


def make_tracker(recipe: Any, output_dir: Path, config: dict[str, Any]) -> Tracker:
    """Build the tracker for a run; a backend failing to start is one warning, not an error."""
    settings = recipe.tracking
    config = scrub_secrets(config)
    sinks: list[Any] = []
    try:
        sinks.append(JsonlSink(output_dir / "metrics.jsonl"))
    except OSError as e:
        print(f"warning: cannot write {output_dir / 'metrics.jsonl'} ({e}); continuing without it")
    name = settings.run_name or output_dir.name
    try:
        if settings.backend == "wandb":
            sinks.append(
                WandbSink(settings, name=name, tags=default_tags(recipe), config=config, output_dir=output_dir)
            )
        elif settings.backend == "tensorboard":
            sinks.append(TensorBoardSink(output_dir, config))
        elif settings.backend == "mlflow":
            sinks.append(
                MlflowSink(settings, name=name, tags=default_tags(recipe), config=config, output_dir=output_dir)
            )
    except Exception as e:
        print(f"warning: could not start {settings.backend} ({e}); metrics still go to {output_dir / 'metrics.jsonl'}")
    return Tracker(sinks)


def lora_by_target(model: torch.nn.Module) -> dict[str, int]:
    """Trainable parameters per LoRA target (q_proj, gate_up_proj, ...) and per fully trained module."""
    totals: dict[str, int] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        parts = name.split(".")
        marker = next((i for i, p in enumerate(parts) if p.startswith("lora_") or p == "modules_to_save"), None)
        target = parts[marker - 1] if marker else parts[-2] if len(parts) > 1 else name
        if marker and target == "experts":  # expert LoRA: name the fused parameter it adapts
            target = getattr(model.get_submodule(".".join(parts[:marker])), "parameter_name", None) or target
        totals[target] = totals.get(target, 0) + param.numel()
    return totals


def run_config(recipe_data: dict[str, Any], loaded: Any, versions: dict[str, str]) -> dict[str, Any]:
    """What a dashboard shows about a run: the resolved recipe, library versions, hardware, quantisation, LoRA."""
    device = loaded.device
    cuda = device.type == "cuda" and torch.cuda.is_available()
    groups = getattr(loaded.report, "groups", {}) or {}
    return {
        **recipe_data,
        "versions": versions,
        "environment": {
            "device": str(device),
            "gpu_name": torch.cuda.get_device_name(device) if cuda else None,
            "gpu_count": torch.cuda.device_count() if cuda else 0,
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        },
        "quantization_report": {
            name: {**g, "bits_per_param": round(8 * g["bytes"] / g["params"], 3) if g.get("params") else None}
            for name, g in groups.items()
        },
        "lora_summary": {
            **lora_by_target(loaded.model),
            "total": sum(p.numel() for p in loaded.model.parameters() if p.requires_grad),
        },
    }
