"""The GPU job's summary: one row per stage (status, seconds, key figure) as a table and as $OUT/summary.json.

gpu_run.sh calls it after every stage (so summary.json is current if the job is cut short) and prints the table at
the end. Standard library only: it must work when nothing else installed.

    python3 bench/gpu_summary.py --stages WORK/stages.jsonl --out OUT [--install WORK/install.json] [--print]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def fmt_gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def figure_install(data: dict) -> str:
    if not data.get("ok") and "installed" not in data:
        return data.get("reason", "failed")
    failed = ", ".join(data.get("failed", {})) or "none"
    return f"{len(data.get('installed', []))} installed, {len(data.get('from_image', {}))} from image, failed: {failed}"


def figure_env(data: dict) -> str:
    t = data.get("torch", {})
    table = t.get("table") or {}
    gpu = t.get("gpu") or "no GPU"
    peak = f", table {table.get('bf16_tflops')} TFLOP/s" if table else ""
    measured = t.get("measured_bf16_matmul_tflops")
    triton = data.get("triton_kernel", {}).get("ok")
    bnb = data.get("bitsandbytes_diagnostics", {}).get("ok")
    imports = data.get("project_imports", {})
    failed = ", ".join(imports.get("failed", {}))
    return (
        f"{gpu}{peak}{f', matmul {measured}' if measured else ''}; torch {t.get('torch')} "
        f"CUDA {t.get('cuda')}; triton {triton}; bnb {bnb}; imports {'ok' if imports.get('ok') else failed}"
    )


def figure_cuda_check(data: dict) -> str:
    items = data.get("items", [])
    failed = [i["name"] for i in items if i.get("ok") is False]
    na = sum(1 for i in items if i.get("ok") is None)
    ok = sum(1 for i in items if i.get("ok") is True)
    return f"{ok} ok, {len(failed)} failed, {na} n/a" + (f": {', '.join(failed)}" if failed else "")


def figure_gpu_check(data: dict) -> str:
    parts = []
    for r in data.get("results", []):
        if r.get("status") != "ok":
            parts.append(f"{r.get('variant')} {r.get('status')}")
            continue
        mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else ""
        parts.append(
            f"{r['variant']} {r.get('tokens_per_s', 0):,.0f} tok/s{mfu}, peak {fmt_gib(r.get('train_peak_bytes'))}"
        )
    return "; ".join(parts) or "no variant finished"


def figure_plan_check(data: dict) -> str:
    parts = []
    for r in data.get("results", []):
        if r.get("status", "ok") != "ok":
            parts.append(f"seq {r['seq']}: {r.get('status')}")
        else:
            parts.append(
                f"seq {r['seq']} ckpt {'on' if r['grad_ckpt'] else 'off'}: predicted "
                f"{fmt_gib(r['predicted_bytes'])} / measured {fmt_gib(r['measured_bytes'])} = {r['ratio']:.2f}"
            )
    return "; ".join(parts) or "no setting finished"


def figure_run(data: dict) -> str:
    rate = data.get("tokens_per_second")
    return (
        f"loss {data.get('first_loss')} -> {data.get('final_train_loss')}, {data.get('steps')} steps, "
        f"{f'{rate:,.0f}' if rate else '?'} tok/s, peak {fmt_gib(data.get('peak_memory'))} ({data.get('device')})"
    )


FIGURES = {
    "env.json": figure_env,
    "cuda_check.json": figure_cuda_check,
    "cuda_check_cpu.json": figure_cuda_check,
    "gpu_check.json": figure_gpu_check,
    "gpu_check_baselines.json": figure_gpu_check,
    "plan_check.json": figure_plan_check,
    "fsdp2_one_gpu.json": figure_run,
    "tiny_run.json": figure_run,
}


def summarise(stages: list[dict], out: Path, install: Path | None) -> dict[str, Any]:
    rows = []
    for stage in stages:
        row = dict(stage)
        result = stage.get("result")
        data = load(out / result) if result else None
        if stage["stage"] == "install" and install is not None:
            data = load(install)
            if data is not None:
                row["install"] = data
                row["figure"] = figure_install(data)
        elif data is not None and result in FIGURES:
            try:
                row["figure"] = FIGURES[result](data)
            except Exception as exc:  # a figure that cannot be read is said so; the row stays
                row["figure"] = f"unreadable {result}: {type(exc).__name__}: {exc}"
        rows.append(row)
    return {"stages": rows}


def table(summary: dict[str, Any]) -> str:
    lines = ["| stage | status | seconds | key figure |", "|---|---|---:|---|"]
    for r in summary["stages"]:
        figure = r.get("figure") or r.get("reason") or ""
        lines.append(f"| {r['stage']} | {r['status']} | {r.get('seconds', 0)} | {figure[:160]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=Path, required=True, help="one JSON object per line, one line per stage")
    p.add_argument("--out", type=Path, required=True, help="the folder holding each stage's JSON")
    p.add_argument("--install", type=Path, default=None)
    p.add_argument("--meta", default="{}", help="a JSON object stored beside the stages (mode, deadline, ...)")
    p.add_argument("--print", action="store_true", help="print the table")
    args = p.parse_args(argv)
    stages = [json.loads(line) for line in args.stages.read_text().splitlines() if line.strip()]
    summary = {**json.loads(args.meta), **summarise(stages, args.out, args.install)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.print:
        print(table(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
