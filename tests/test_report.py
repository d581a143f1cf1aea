"""`finetune report`: PNGs and report.md from a run's metrics.jsonl, one or two runs, readable figures."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from finetune.tracking.report import heatmaps_figure, read_run, write_report

ROOT = Path(__file__).resolve().parents[1]


def fake_run(folder: Path, layers: int, experts: int, seed: int, dpo: bool = False) -> Path:
    """A run folder as training writes it: a metrics.jsonl row per logging step, samples and metrics.json."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for step in range(1, 11):
        load = torch.rand(layers, experts, generator=g).softmax(-1)
        row = {"step": step, "loss": 3.0 / step, "learning_rate": 1e-3, "grad_norm": 1.0 + step, "aux_loss": 0.1}
        row["moe/load"] = load.tolist()
        row.update({f"moe_imbalance/layer{i}": (load[i].max() / load[i].mean()).item() for i in range(layers)})
        row["moe_imbalance/mean"] = (load.max(-1).values / load.mean(-1)).mean().item()
        if dpo:
            row.update({"rewards/margins": 0.1 * step, "rewards/accuracies": 0.5 + 0.04 * step})
        rows.append(row)
        if step % 5 == 0:
            rows.append({"step": step, "eval_loss": 3.5 / step})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "samples.jsonl").write_text(json.dumps({"step": 10, "prompt": "p", "reference": "r", "generated": "g"}))
    (folder / "metrics.json").write_text(json.dumps({"steps": 10, "final_train_loss": 0.3}))
    return folder


def test_report_writes_the_pngs_and_a_page_that_embeds_them(tmp_path):
    run = fake_run(tmp_path / "run", layers=4, experts=8, seed=0)
    result = subprocess.run([sys.executable, "-m", "finetune.cli", "report", str(run)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = run / "report"
    for stem in ("loss", "learning_rate", "grad_norm", "aux_loss", "imbalance", "expert_load"):
        assert (out / f"{stem}.png").stat().st_size > 1000, stem
        assert f"({stem}.png)" in (out / "report.md").read_text()
    assert not (out / "rewards.png").exists()  # no DPO figures for an SFT run
    assert "| final_train_loss | 0.3 |" in (out / "report.md").read_text()


def test_heatmaps_have_one_row_per_layer_and_labelled_axes(tmp_path):
    run = read_run(fake_run(tmp_path / "run", layers=5, experts=4, seed=1))
    figure = heatmaps_figure(run)
    heatmaps = [ax for ax in figure.axes if ax.get_images()]
    assert len(heatmaps) == 2  # start and end of the run
    first, last = (ax.get_images()[0].get_array() for ax in heatmaps)
    assert first.shape == last.shape == (5, 4)
    logged = [r["moe/load"] for r in run["rows"] if "moe/load" in r]
    assert np.allclose(first, logged[0]) and np.allclose(last, logged[-1])
    for ax in heatmaps:
        assert ax.get_xlabel() == "expert" and ax.get_ylabel() == "layer"


def test_two_runs_overlay_and_dpo_runs_get_reward_figures(tmp_path):
    a = fake_run(tmp_path / "a", layers=2, experts=4, seed=2, dpo=True)
    b = fake_run(tmp_path / "b", layers=2, experts=4, seed=3, dpo=True)
    out = write_report([a, b], tmp_path / "cmp")
    for stem in ("rewards", "accuracy", "expert_load_0", "expert_load_1"):
        assert (out / f"{stem}.png").is_file(), stem
    assert "# Run report: a vs b" in (out / "report.md").read_text()


def test_report_on_a_folder_without_metrics_is_a_clean_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "finetune.cli", "report", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 2 and "metrics.jsonl: not found" in result.stderr and "Traceback" not in result.stderr


def test_heatmap_scale_reaches_the_busiest_expert(tmp_path):
    run = read_run(fake_run(tmp_path / "run", layers=3, experts=8, seed=4))
    hot = [[0.34, 0.22] + [0.44 / 6] * 6] * 3  # the busiest expert gets 0.34, beyond 2/E = 0.25
    rows = [r for r in run["rows"] if "moe/load" in r]
    rows[-1]["moe/load"] = hot
    images = [ax.get_images()[0] for ax in heatmaps_figure(run).axes if ax.get_images()]
    assert len(images) == 2
    for image in images:  # both panels on one scale that holds every cell, white still at the even load
        assert image.norm.vmax >= 0.34 and image.norm.vmin == 0.0
        assert image.norm.vmax == images[0].norm.vmax and abs(image.norm.vcenter - 1 / 8) < 1e-12


def test_report_page_reads_for_people(tmp_path):
    run = fake_run(tmp_path / "run", layers=2, experts=4, seed=5)
    summary = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**summary, "method": "sft", "peak_memory": 1229737984}))
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 10, "perf/tokens_per_second": 15.5}) + "\n")
    page = (write_report([run], tmp_path / "out") / "report.md").read_text()
    assert "| peak_memory | 1.23 GB |" in page and "1229737984" not in page
    assert "| method | sft |" in page and "## loss (sft: token cross-entropy)" in page
    assert "## throughput (tokens/s)" in page


def test_two_runs_name_their_heatmaps_and_split_losses_of_different_methods(tmp_path):
    a = fake_run(tmp_path / "a", layers=2, experts=4, seed=6)
    b = fake_run(tmp_path / "b", layers=2, experts=4, seed=7, dpo=True)
    (a / "recipe.yaml").write_text("method: sft\n")  # the method from the resolved recipe when metrics.json lacks it
    (b / "recipe.yaml").write_text("method: dpo\n")
    out = write_report([a, b], tmp_path / "cmp")
    page = (out / "report.md").read_text()
    assert "## expert load of a, first and last logging step" in page
    assert "## expert load of b, first and last logging step" in page
    assert "different objectives (a: sft, b: dpo)" in page
    assert (out / "loss_sft.png").is_file() and (out / "loss_dpo.png").is_file() and not (out / "loss.png").exists()
    copy = shutil.copytree(a, tmp_path / "a2")
    same = write_report([a, copy], tmp_path / "same")  # one method: one shared chart
    assert (same / "loss.png").is_file() and "different objectives" not in (same / "report.md").read_text()
