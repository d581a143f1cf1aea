"""DPO and KTO runs killed with SIGKILL resume to the uninterrupted run's adapter, as SFT does (tests/test_resume.py).

The kill comes at the signal gate (tests/signals.py): step 3 waits there, so checkpoint-2 is complete and
checkpoint-4 cannot be, however loaded the machine (a kill sent once checkpoint-2 appears could land after the end).

Preference runs keep the reference policy as a second, frozen adapter ("ref") in the same model; resuming must give
back the trained adapter, its optimizer and the data order, and leave the reference as the starting adapter. The
resumed run's metrics.json and console summary say which steps its tokens/s covers (it measured only its own).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from signals import at_gate, signal_gate
from test_resume import assert_same_adapter, complete_checkpoint, kill, run, start, wait_for

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"dpo": "tiny-mixtral-dpo.yaml", "kto": "tiny-mixtral-kto.yaml"}
MAX_STEPS = 4
# a checkpoint every 2 steps, small batches, no eval or samples (they would only add time)
SETTINGS = (
    f"training.max_steps={MAX_STEPS}",
    "training.save_steps=2",
    "training.logging_steps=1",
    "training.batch_size=2",
    "data.eval_fraction=0",
    "tracking.sample_prompts=0",
)


def run_args(method: str, model_dir: Path, out: Path) -> list[str]:
    sets = [f"model.path={model_dir}", f"output_dir={out}", *SETTINGS]
    return ["run", str(ROOT / "recipes" / RECIPES[method]), *[arg for s in sets for arg in ("--set", s)]]


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_killed_preference_run_resumes_to_the_uninterrupted_adapter(tmp_path, tiny_model_dir, method):
    reference = tmp_path / "reference"
    code, output = run(run_args(method, tiny_model_dir, reference))
    assert code == 0, output[-3000:]
    covers = json.loads((reference / "metrics.json").read_text())["tokens_per_second_covers"]
    assert covers == {"from_step": 0, "to_step": MAX_STEPS}
    assert "resumed at" not in output

    out = tmp_path / "killed"
    args = run_args(method, tiny_model_dir, out)
    proc = start(args, script=signal_gate(tmp_path))  # step 3 waits there (for a signal that never comes)
    wait_for(at_gate(out), proc)
    assert complete_checkpoint(out, 2)() and not (out / "checkpoints" / "checkpoint-4").exists()
    kill(proc)
    assert not (out / "adapter").exists()
    code, resumed = run(args)
    assert code == 0, resumed[-3000:]
    found = re.search(rf"resuming from checkpoints/checkpoint-(\d+) \(step \d+ of {MAX_STEPS}\)", resumed)
    assert found, resumed[-3000:]
    step = int(found.group(1))
    assert 2 <= step < MAX_STEPS

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["steps"] == MAX_STEPS
    assert_same_adapter(reference / "adapter", out / "adapter")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, MAX_STEPS + 1))  # each step once, in order
    assert metrics["tokens_per_second_covers"] == {"from_step": step, "to_step": MAX_STEPS}
    assert f"of training steps {step + 1}-{MAX_STEPS} (resumed at step {step})" in resumed, resumed[-2000:]
    assert "Traceback" not in resumed
