"""The evaluation as one table on the console (base | adapter | change), and as flat scalars for W&B's summary."""

from __future__ import annotations

import math
from typing import Any

COLUMNS = ("base", "adapter")


def rows(result: dict[str, Any]) -> list[tuple[str, float | None, float | None, str]]:
    """(what, base, adapter, note) for every figure of eval.json, in the order the sections ran."""
    out: list[tuple[str, float | None, float | None, str]] = []
    for name, part in result.get("perplexity", {}).items():
        diff = part.get("difference") or {}
        ci = diff.get("ci95")
        note = f"base-adapter NLL {diff['nll']:+.4g}" if "nll" in diff else ""
        if ci:
            note += f", 95% CI [{ci[0]:+.4g}, {ci[1]:+.4g}]"
        tokens = part["base"]["tokens"]
        out.append((f"{name}: perplexity", *_pair(part, "perplexity"), note))
        out.append((f"{name}: NLL/token", *_pair(part, "nll"), f"{part['base']['records']} records, {tokens} tokens"))
    for name, part in result.get("generation", {}).items():
        records = part.get("records", [])
        disagree = sum(not r["agree"] for r in records)
        for metric in ("exact_match", "contains", "rougeL", "chrf"):
            note = f"{len(records)} records, {disagree} differ" if metric == "exact_match" and "adapter" in part else ""
            out.append((f"{name}: {metric}", *_pair(part, metric), note))
    for task, part in result.get("tasks", {}).items():
        for metric in part.get("base", {}):
            if metric.endswith("_stderr") or "_stderr," in metric:
                continue
            stderr = part["base"].get(f"{metric}_stderr")
            out.append((f"{task}: {metric}", *_pair(part, metric), f"stderr {stderr:.3g}" if stderr else ""))
    routing = result.get("routing")
    if routing:
        n = routing["tokens"]
        out.append(("routing: top-1 expert changed", None, routing["top1_changed_mean"], f"mean of layers, {n} tokens"))
        out.append(("routing: KL(adapter||base) load", None, routing["kl_mean"], "mean of layers, nats"))
    return out


def _pair(part: dict[str, Any], metric: str) -> tuple[float | None, float | None]:
    return part.get("base", {}).get(metric), part.get("adapter", {}).get(metric)


def number(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.4e}"


def render(result: dict[str, Any]) -> list[str]:
    """Aligned lines: what | base | adapter | change | note (change = adapter - base)."""
    table = [("", "base", "adapter", "change", "")]
    for what, base, adapter, note in rows(result):
        change = adapter - base if base is not None and adapter is not None else None
        change_text = "-" if change is None else ("+" if change >= 0 else "") + number(change)
        table.append((what, number(base), number(adapter), change_text, note))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    return [
        f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]:>{widths[3]}}  {row[4]}".rstrip()
        for row in table
    ]


def flat_scalars(result: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """eval/<section>/<name>/<column>/<metric> → value, for a tracker's summary (finite numbers only)."""
    flat: dict[str, float] = {}
    for section in ("perplexity", "generation", "tasks"):
        for name, part in result.get(section, {}).items():
            for column in COLUMNS:
                for metric, value in part.get(column, {}).items():
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        flat[f"{prefix}/{section}/{name}/{column}/{metric}"] = float(value)
            diff = (part.get("difference") or {}).get("nll")
            if diff is not None:
                flat[f"{prefix}/{section}/{name}/nll_base_minus_adapter"] = float(diff)
    routing = result.get("routing")
    if routing:
        flat[f"{prefix}/routing/top1_changed_mean"] = float(routing["top1_changed_mean"])
        flat[f"{prefix}/routing/kl_mean"] = float(routing["kl_mean"])
    return flat
