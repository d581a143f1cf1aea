"""The `finetune plan` table: the plan dict of `finetune.plan.estimate.make_plan` as the lines a person reads."""

from __future__ import annotations

from typing import Any

from finetune.plan.gpus import GIB
from finetune.plan.timing import duration_text


def _gib(n: int) -> str:
    return f"{n / GIB:6.2f} GiB"


def render(plan: dict[str, Any]) -> str:
    s = plan["settings"]
    where = f"{plan['num_gpus']} x {plan['gpu']}" if plan["num_gpus"] > 1 else plan["gpu"]
    out = [
        f"plan: {plan['model']} ({plan['quantization']}, {plan['dtype']}) on {where}, {_gib(plan['gpu_memory_bytes']).strip()} "
        f"per GPU; max_length {s['max_length']}, batch {s['batch_size']}, checkpointing "
        f"{'on' if s['gradient_checkpointing'] else 'off'}, {s['optimizer']}",
        *([f"  GPU: {plan['gpu_note']}"] if plan.get("gpu_note") else []),
        "memory per GPU:",
    ]
    out += [f"  {name:<52} {_gib(v)}" for name, v in plan["lines"].items()]
    out.append(f"  {'total (predicted peak)':<52} {_gib(plan['total_bytes'])}")
    if plan["fsdp_note"]:
        out.append(f"  note: {plan['fsdp_note']}")
    if plan.get("optimizer_note"):
        out.append(f"  note: {plan['optimizer_note']}")
    if host := plan.get("host_ram"):
        out.append(
            f"host RAM while loading: {_gib(host['per_machine_bytes']).strip()} per machine "
            f"({host['processes']} process{'es' if host['processes'] > 1 else ''} x "
            f"{_gib(host['per_process_bytes']).strip()}: {host['what']}; "
            "libraries not counted)"
        )
    if plan["fits"]:
        out.append(f"verdict: fits, {_gib(plan['headroom_bytes']).strip()} headroom")
    else:
        out.append(f"verdict: does not fit, over by {_gib(-plan['headroom_bytes']).strip()}")
    if plan["largest_max_length"]:
        out.append(f"largest max_length that fits at batch {s['batch_size']}: {plan['largest_max_length']}")
    if plan["suggestions"]:
        out.append("what to change (new total per GPU):")
        for x in plan["suggestions"]:
            mark = "fits" if x["fits"] else "still too big"
            note = f"; {x['note']}" if x["note"] else ""
            out.append(f"  {x['change']}: {_gib(x['total_bytes']).strip()}, {mark}{note}")
    out += time_lines(plan, where)
    return "\n".join(out)


SMALL_MODEL_PARAMS = 100e6  # below this, step time is overheads, not FLOPs


def count(n: float, unit: str = "") -> str:
    """12.9B, 350.2M, 81.0 GFLOP ...: a count in the SI prefix that reads best."""
    for scale, prefix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "K" if unit else "k")):
        if n >= scale:
            return f"{n / scale:.1f}{prefix if not unit else ' ' + prefix}{unit}"
    return f"{n:.0f} {unit}".strip()


def time_lines(plan: dict[str, Any], where: str) -> list[str]:
    """FLOPs and throughput, then the run's steps and total time, or why the total is unknown."""
    t = plan["time"]
    head = f"time: {count(t['flops_per_token'], 'FLOP')}/token ({count(t['active_params'])} active params)"
    if t["tokens_per_second"] is None:
        return [
            f"{head}; throughput unknown: {where} is known by its memory alone; name the card with --gpu NAME "
            "(e.g. --gpu L40S, with --gpu-memory to change its memory) for a time estimate",
            f"  tokens: {plan['tokens_source']}",
        ]
    out = [f"{head}, utilisation {t['hfu_source']}: ~{t['tokens_per_second']:,.0f} tokens/s on {where}"]
    if "seconds" in t:
        about = "" if t["seconds"] < 1 else "at most " if t["upper_bound"] else "about "
        steps = f"{t['steps']:,} step{'s' if t['steps'] != 1 else ''}"
        out.append(f"  {steps} of up to {t['tokens_per_step']:,} tokens: {about}{duration_text(t['seconds'])}")
        if t["active_params"] < SMALL_MODEL_PARAMS:
            out.append("  note: a model this small is bound by per-step overheads (kernel launches, optimizer, data), "
                       "not FLOPs, and runs far slower than this; the FLOP model is meant for billion-parameter models")  # fmt: skip
    else:
        out.append("  total time unknown: the data was not read (below); set training.max_steps for an estimate")
    out.append(f"  tokens: {plan['tokens_source']}")
    return out
