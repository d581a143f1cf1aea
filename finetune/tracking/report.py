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
from finetune.tracking.routing_panels import heatmap_figure

CURVES = [  # (file stem, title, [(metrics key, label)])
    ("loss", "loss", [("loss", "train"), ("eval_loss", "eval")]),
    ("learning_rate", "learning rate", [("learning_rate", "lr")]),
    ("grad_norm", "gradient norm", [("grad_norm", "grad norm")]),
    ("aux_loss", "router aux loss", [("aux_loss", "train"), ("eval_aux_loss", "eval")]),
    ("rewards", "DPO/KTO reward margin", [("rewards/margins", "train"), ("eval_rewards/margins", "eval")]),
    ("accuracy", "DPO reward accuracy", [("rewards/accuracies", "train"), ("eval_rewards/accuracies", "eval")]),
    ("tokens_per_second", "throughput (tokens/s)", [("perf/tokens_per_second", "tokens/s")]),
]
SUMMARY_KEYS = ("method", "steps", "first_loss", "final_train_loss", "eval_loss", "aux_loss", "tokens_per_second",
                "peak_memory")  # fmt: skip
BYTES_KEYS = ("peak_memory",)
LOSS_NAMES = {"sft": "token cross-entropy", "dpo": "DPO preference loss", "kto": "KTO loss"}  # what `loss` is


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
    return {"name": run_dir.name, "rows": rows, "summary": summary, "samples": samples,
            "method": summary.get("method") or recipe_method(run_dir)}  # fmt: skip


def recipe_method(run_dir: Path) -> str | None:
    """The method in the run's resolved recipe.yaml (an unfinished run has no metrics.json to say it)."""
    import yaml

    try:
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return recipe.get("method", "sft") if isinstance(recipe, dict) else None


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
    busiest = max(v for row in (first, last) for layer in row["moe/load"] for v in layer)  # one scale for both
    for i, row in enumerate((first, last)):
        title, ax = f"{run['name']}: step {row['step']}", figure.add_subplot(1, 2, i + 1)
        heatmap_figure(row["moe/load"], title=title, ax=ax, vmax=busiest)
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
        values = [r["method"] if key == "method" else r["summary"].get(key) for r in runs]
        if any(v is not None for v in values):
            text = [cell(key, v) for v in values]
            lines.append(f"| {key} | " + " | ".join(text) + " |")
    return lines


def cell(key: str, value: Any) -> str:
    """A summary value as a person reads it: bytes in GB/MB (decimal, as the run's summary prints them)."""
    if value is None:
        return ""
    if key in BYTES_KEYS and isinstance(value, (int, float)):
        return f"{value / 1e9:.2f} GB" if value >= 1e9 else f"{value / 1e6:.0f} MB"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def loss_figures(runs: list[dict[str, Any]]) -> tuple[list[tuple[str, str, Figure | None]], list[str]]:
    """The loss chart, or one per method when the runs train different objectives (their losses are different
    quantities), with the note that says so."""
    keys = CURVES[0][2]
    methods = list(dict.fromkeys(r["method"] for r in runs))
    if len(methods) == 1:
        title = f"loss ({methods[0]}: {LOSS_NAMES[methods[0]]})" if methods[0] in LOSS_NAMES else "loss"
        return [("loss", title, curve_figure(runs, title, keys))], []
    figures = []
    for method in methods:
        group = [r for r in runs if r["method"] == method]
        names = ", ".join(r["name"] for r in group)
        what = f"{method}: {LOSS_NAMES[method]}" if method in LOSS_NAMES else method or "method unknown"
        title = f"loss of {names} ({what})"
        figures.append((f"loss_{method or 'unknown'}", title, curve_figure(group, title, keys)))
    which = ", ".join(f"{r['name']}: {r['method'] or 'unknown'}" for r in runs)
    return figures, [f"The runs train different objectives ({which}); their losses measure different things, so "
                     "each method has its own loss chart.", ""]  # fmt: skip


def write_report(run_dirs: list[Path], out_dir: Path | None = None) -> Path:
    """Render every figure the runs have data for into out_dir (default RUN_A/report) and write report.md."""
    runs = [read_run(Path(d)) for d in run_dirs]
    if len({r["name"] for r in runs}) < len(runs):
        for run, path in zip(runs, run_dirs, strict=True):
            run["name"] = str(path)
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dirs[0]) / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    figures, note = loss_figures(runs)
    figures += [(stem, title, curve_figure(runs, title, keys)) for stem, title, keys in CURVES[1:]]
    figures.append(("imbalance", "expert-load imbalance", imbalance_figure(runs)))
    for i, run in enumerate(runs):
        of = f" of {run['name']}" if len(runs) > 1 else ""
        figures.append((f"expert_load_{i}" if len(runs) > 1 else "expert_load",
                        f"expert load{of}, first and last logging step", heatmaps_figure(run)))  # fmt: skip
    title = " vs ".join(r["name"] for r in runs)
    lines = [f"# Run report: {title}", "", *summary_table(runs), "", *note]
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
    from finetune.tracking.report_eval import eval_section  # eval.json of `finetune eval`, when the run has one

    for i, path in enumerate(run_dirs):
        lines += eval_section(Path(path), out_dir, suffix=f"_{i}" if len(run_dirs) > 1 else "")
    (out_dir / "report.md").write_text("\n".join(lines), encoding="utf-8")
    return out_dir


def one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split()).replace("`", "'")
    return text if len(text) <= limit else text[: limit - 1] + "…"
