"""Figures of eval.json for `finetune report` (and the routing PNG beside eval.json): base against adapter bars per
metric, and the routing-shift heatmap (adapter load - base load, layer x expert). Bare matplotlib Figures (Agg)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from finetune.tracking.eval_table import rows

EVAL_FILE = "eval.json"


def read_eval(run_dir: Path) -> dict[str, Any] | None:
    """The run's eval.json, or None when there is none (or it cannot be read: the report then leaves it out)."""
    path = Path(run_dir) / EVAL_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def metric_bars_figure(result: dict[str, Any]) -> Figure | None:
    """One small panel per metric (their scales differ), a base bar and an adapter bar in each."""
    pairs = [(what, base, adapter) for what, base, adapter, _ in rows(result) if base is not None]
    pairs = [(w, b, a) for w, b, a in pairs if math.isfinite(b) and (a is None or math.isfinite(a))]
    if not pairs:
        return None
    cols = min(4, len(pairs))
    lines = math.ceil(len(pairs) / cols)
    figure = Figure(figsize=(3.2 * cols, 2.6 * lines), dpi=100)
    for i, (what, base, adapter) in enumerate(pairs):
        ax = figure.add_subplot(lines, cols, i + 1)
        names, values = ["base"], [base]
        if adapter is not None:
            names.append("adapter")
            values.append(adapter)
        ax.bar(names, values, color=["#8c8c8c", "#1f77b4"][: len(values)])
        if "perplexity" in what and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
        ax.set_title(what, fontsize=8)
        ax.tick_params(labelsize=7)
        for x, v in enumerate(values):
            ax.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=7)
    figure.suptitle("base vs adapter", fontsize=10)
    figure.tight_layout()
    return figure


def routing_shift_figure(routing: dict[str, Any]) -> Figure:
    """Layer x expert heatmap of adapter load - base load (share of top-k assignments), centred on 0; each layer
    labelled with its KL(adapter || base) and the share of tokens whose top-1 expert changed."""
    base, adapter = routing["base"]["load"], routing["adapter"]["load"]
    diff = [[a - b for a, b in zip(ra, rb, strict=True)] for ra, rb in zip(adapter, base, strict=True)]
    experts = len(diff[0]) if diff else 0
    figure = Figure(figsize=(3.5 + 0.5 * experts, 1.6 + 0.35 * len(diff)), dpi=100)
    ax = figure.add_subplot()
    scale = max((abs(v) for row in diff for v in row), default=0.0) or 1e-3
    image = ax.imshow(diff, cmap="RdBu_r", vmin=-scale, vmax=scale, aspect="auto", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_xticks(range(experts))
    ax.set_yticks(range(len(diff)))
    ax.set_yticklabels(
        [
            f"layer {layer}: KL {kl:.2g}, top-1 {changed:.0%}"
            for layer, kl, changed in zip(routing["layers"], routing["kl"], routing["top1_changed"], strict=True)
        ],
        fontsize=7,
    )
    ax.set_title(f"routing shift: adapter - base expert load ({routing['tokens']} tokens)", fontsize=9)
    figure.colorbar(image, ax=ax, label="load difference")
    figure.tight_layout()
    return figure


def eval_section(run_dir: Path, out_dir: Path, suffix: str = "") -> list[str]:
    """report.md lines for the run's eval.json (the table and both figures, saved into out_dir as
    eval_metrics{suffix}.png, eval_routing{suffix}.png); [] without one."""
    from finetune.tracking.eval_table import render

    result = read_eval(run_dir)
    if result is None:
        return []
    name = Path(run_dir).name
    lines = [f"## evaluation of {name} (eval.json)", "", "```", *render(result), "```", ""]
    figures = [("eval_metrics", "base vs adapter", metric_bars_figure(result))]
    if result.get("routing"):
        figures.append(("eval_routing", "routing shift", routing_shift_figure(result["routing"])))
    for stem, caption, figure in figures:
        if figure is not None:
            figure.savefig(Path(out_dir) / f"{stem}{suffix}.png")
            lines += [f"![{caption}]({stem}{suffix}.png)", ""]
    return lines
