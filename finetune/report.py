"""`finetune report RUN_DIR [RUN_B] [-o DIR]`: the dashboard as PNGs and a one-page report.md, without W&B.

Everything comes from the run folder's metrics.jsonl (and metrics.json, samples.jsonl when present); two runs
overlay their curves. Figures are bare matplotlib `Figure`s (Agg), so nothing needs a display.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from finetune.errors import UserError
from finetune.routing_panels import heatmap_figure

CURVES = [  # (file stem, title, [(metrics key, label)])
    ("loss", "loss", [("loss", "train"), ("eval_loss", "eval")]),
    ("learning_rate", "learning rate", [("learning_rate", "lr")]),
    ("grad_norm", "gradient norm", [("grad_norm", "grad norm")]),
    ("aux_loss", "router aux loss", [("aux_loss", "train"), ("eval_aux_loss", "eval")]),
    ("rewards", "DPO/KTO reward margin", [("rewards/margins", "train"), ("eval_rewards/margins", "eval")]),
    ("accuracy", "DPO reward accuracy", [("rewards/accuracies", "train"), ("eval_rewards/accuracies", "eval")]),
    ("tokens_per_second", "throughput", [("perf/tokens_per_second", "tokens/s")]),
]
SUMMARY_KEYS = ("steps", "first_loss", "final_train_loss", "eval_loss", "aux_loss", "tokens_per_second", "peak_memory")


def read_run(run_dir: Path) -> dict[str, Any]:
    """The run's log rows, summary and samples; a missing or unreadable metrics.jsonl is a UserError."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: not found; give a run's output folder (it holds metrics.jsonl)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: not a JSON line ({e.msg}); fix or remove the line") from None
    summary_path, samples_path = run_dir / "metrics.json", run_dir / "samples.jsonl"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    samples = []
    if samples_path.is_file():
        samples = [json.loads(x) for x in samples_path.read_text(encoding="utf-8").splitlines() if x.strip()]
    return {"name": run_dir.name, "rows": rows, "summary": summary, "samples": samples}


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def curve_figure(runs: list[dict[str, Any]], title: str, keys: list[tuple[str, str]]) -> Figure | None:
    """One panel, every run x key as a line; None when no run logged any of the keys."""
    figure = Figure(figsize=(6, 3.6), dpi=100)
    ax = figure.add_subplot()
    drawn = 0
    for run in runs:
        for key, label in keys:
            steps, values = series(run["rows"], key)
            if steps:
                name = f"{run['name']}: {label}" if len(runs) > 1 else label
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=name)
                drawn += 1
    if not drawn:
        return None
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def load_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("moe/load")]


def heatmaps_figure(run: dict[str, Any]) -> Figure | None:
    """Expert load at the first and the last logging step, side by side, one row per layer."""
    logged = load_rows(run["rows"])
    if not logged:
        return None
    first, last = logged[0], logged[-1]
    layers, experts = len(first["moe/load"]), len(first["moe/load"][0])
    figure = Figure(figsize=(3 + 0.9 * experts, 2.2 + 0.3 * layers), dpi=100)
    for i, row in enumerate((first, last)):
        heatmap_figure(row["moe/load"], title=f"{run['name']}: step {row['step']}", ax=figure.add_subplot(1, 2, i + 1))
    figure.tight_layout()
    return figure


def imbalance_figure(runs: list[dict[str, Any]]) -> Figure | None:
    """max/mean expert load per layer over the steps (1 = balanced), the mean in bold."""
    figure = Figure(figsize=(6, 3.6), dpi=100)
    ax = figure.add_subplot()
    drawn = 0
    for run in runs:
        prefix = f"{run['name']}: " if len(runs) > 1 else ""
        layer_keys = sorted(
            {k for r in run["rows"] for k in r if k.startswith("moe_imbalance/layer")}, key=lambda k: int(k[19:])
        )
        for key in layer_keys:
            steps, values = series(run["rows"], key)
            ax.plot(steps, values, linewidth=0.8, alpha=0.6, label=f"{prefix}{key.rpartition('/')[2]}")
            drawn += 1
        steps, values = series(run["rows"], "moe_imbalance/mean")
        if steps:
            ax.plot(steps, values, linewidth=2.5, color="black" if len(runs) == 1 else None, label=f"{prefix}mean")
    if not drawn:
        return None
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set_title("expert-load imbalance per layer (max / mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("max / mean load")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if drawn > 8 else 1)
    figure.tight_layout()
    return figure


def summary_table(runs: list[dict[str, Any]]) -> list[str]:
    lines = ["| | " + " | ".join(r["name"] for r in runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for key in SUMMARY_KEYS:
        values = [r["summary"].get(key) for r in runs]
        if any(v is not None for v in values):
            text = [f"{v:.4g}" if isinstance(v, float) else str(v if v is not None else "") for v in values]
            lines.append(f"| {key} | " + " | ".join(text) + " |")
    return lines


def write_report(run_dirs: list[Path], out_dir: Path | None = None) -> Path:
    """Render every figure the runs have data for into out_dir (default RUN_A/report) and write report.md."""
    runs = [read_run(Path(d)) for d in run_dirs]
    if len({r["name"] for r in runs}) < len(runs):
        for run, path in zip(runs, run_dirs, strict=True):
            run["name"] = str(path)
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dirs[0]) / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, str, Figure | None]] = [
        (stem, title, curve_figure(runs, title, keys)) for stem, title, keys in CURVES
    ]
    figures.append(("imbalance", "expert-load imbalance", imbalance_figure(runs)))
    figures += [(f"expert_load_{i}" if len(runs) > 1 else "expert_load", "expert load, first and last logging step",
                 heatmaps_figure(run)) for i, run in enumerate(runs)]  # fmt: skip
    title = " vs ".join(r["name"] for r in runs)
    lines = [f"# Run report: {title}", "", *summary_table(runs), ""]
    for stem, caption, figure in figures:
        if figure is None:
            continue
        figure.savefig(out_dir / f"{stem}.png")
        lines += [f"## {caption}", "", f"![{caption}]({stem}.png)", ""]
    for run in runs:
        if run["samples"]:
            last_step = run["samples"][-1]["step"]
            lines += [f"## samples of {run['name']} at step {last_step}", ""]
            for sample in (s for s in run["samples"] if s["step"] == last_step):
                lines += [f"- **prompt** `{one_line(sample['prompt'])}`",
                          f"  **reference** `{one_line(sample['reference'])}`",
                          f"  **generated** `{one_line(sample['generated'])}`"]  # fmt: skip
            lines.append("")
    (out_dir / "report.md").write_text("\n".join(lines), encoding="utf-8")
    return out_dir


def one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split()).replace("`", "'")
    return text if len(text) <= limit else text[: limit - 1] + "…"
