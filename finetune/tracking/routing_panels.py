"""Figures of the router's state, shared by the W&B panels and `finetune report`.

Input is the `moe/load` matrix that `ExpertLoadTracker.compute` logs: one row per layer, one column per expert,
each row the fraction of that layer's top-k assignments each expert received.
"""

from __future__ import annotations

import io
from typing import Any

from matplotlib.figure import Figure  # a bare Figure renders with Agg: no pyplot, no display, no global state


def heatmap_figure(
    load: list[list[float]], title: str = "expert load", ax: Any = None, vmax: float | None = None
) -> Figure:
    """Layer x expert heatmap; white is the balanced load 1/E, so a collapse stands out. The scale reaches the
    busiest expert (at least 2/E), so no cell is clipped; pass `vmax` to give several heatmaps one scale."""
    from matplotlib.colors import TwoSlopeNorm

    rows, experts = len(load), len(load[0]) if load else 0
    figure = ax.figure if ax is not None else Figure(figsize=(1.2 + 0.45 * experts, 1.2 + 0.3 * rows), dpi=100)
    ax = ax if ax is not None else figure.add_subplot()
    balanced = 1.0 / max(experts, 1)
    top = max([2 * balanced, vmax or 0.0, *(v for row in load for v in row)])
    norm = TwoSlopeNorm(vmin=0.0, vcenter=balanced, vmax=top)
    image = ax.imshow(load, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(experts))
    ax.set_yticks(range(rows))
    ax.set_title(title, fontsize=10)
    figure.colorbar(image, ax=ax, label=f"token share (even: {balanced:.3g})")
    figure.tight_layout()
    return figure


def figure_image(figure: Figure):
    """The figure as a PIL image (what wandb.Image takes without touching pyplot)."""
    from PIL import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def load_table_rows(load: list[list[float]]) -> list[dict[str, Any]]:
    """The same matrix as table rows: layer, expert0 … expertN (a wandb.Table, sortable in the UI)."""
    return [{"layer": i, **{f"expert{e}": round(v, 6) for e, v in enumerate(row)}} for i, row in enumerate(load)]


def imbalance(load_row: list[float]) -> float:
    """max / mean load of one layer (1.0 = perfectly balanced, E = every token on one expert)."""
    mean = sum(load_row) / len(load_row)
    return max(load_row) / mean if mean else float("nan")
