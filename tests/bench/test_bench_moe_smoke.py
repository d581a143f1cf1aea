"""The MoE benchmark's quick run: it must detect the silent traps it exists to measure (not a timed test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_counts_what_each_variant_trains(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "bench/bench_moe.py", "--quick", "--work-dir", str(tmp_path / "work"), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {row["variant"]: row for row in json.loads(out.read_text())["results"]}
    assert set(rows) == {"ours", "stock", "dequant", "dequant-naive"}
    # the trap: PEFT target_parameters on bnb-parametrized experts attaches no LoRA, silently; it is refused
    assert rows["dequant-naive"]["status"] == "refused"
    assert rows["dequant-naive"]["trainable_expert_lora"] == 0
    for variant in ("ours", "stock", "dequant"):
        row = rows[variant]
        assert row["status"] == "ok", row
        assert row["trainable_expert_lora"] > 0
        assert row["expert_lora_with_grad"] == row["trainable_expert_lora"]
    # stock bitsandbytes 4-bit leaves every expert weight in 16-bit; ours and (b) leave none
    assert rows["stock"]["expert_params_16_32bit"] > 0
    assert rows["ours"]["expert_params_16_32bit"] == 0 and rows["dequant"]["expert_params_16_32bit"] == 0
    assert rows["ours"]["resident_bytes"] < rows["stock"]["resident_bytes"]
