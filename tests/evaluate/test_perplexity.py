"""Held-out perplexity: equal to stock transformers + stock PEFT on the same ids; the tiny run's adapter lowers it;
eval_loss in metrics.json is the language-model loss alone (TRL adds the aux loss to it)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from eval_helpers import read_eval, runner
from peft import PeftModel
from transformers import MixtralForCausalLM

from data_tools.config import DataConfig
from data_tools.pipeline import format_spec, tokenize_records
from data_tools.validate import load_source
from finetune.cli import app
from finetune.evaluate.perplexity import bootstrap_difference
from finetune.model.load import load_tokenizer


def stock_nll(model, ids: list[int], labels: list[int]) -> tuple[float, int]:
    """Summed NLL of the trained tokens from transformers' own loss (mean over the shifted labels x their count)."""
    n = sum(label != -100 for label in labels[1:])
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]), output_router_logits=False)
    return out.loss.double().item() * n, n


def test_perplexity_equals_stock_transformers_and_peft(tiny_model_dir, random_adapter, chat_file, tmp_path):
    out = tmp_path / "out"
    args = ["eval", "--model", str(tiny_model_dir), "--adapter", str(random_adapter), "--quantization", "none",
            "--data", str(chat_file), "--batch-size", "4", "--bootstrap", "0", "--no-routing", "-o", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output[-3000:]
    part = read_eval(out)["perplexity"]["heldout.jsonl"]

    tokenizer = load_tokenizer(tiny_model_dir)
    spec = format_spec(DataConfig(train=[{"path": "-"}]), tokenizer, tiny_model_dir)  # mistral, assistant turns
    rows = tokenize_records(load_source(str(chat_file)).records, spec, tokenizer, 2048)
    base = MixtralForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    expected = {"base": [stock_nll(base, r["input_ids"], r["labels"]) for r in rows]}
    adapted = PeftModel.from_pretrained(base, str(random_adapter)).eval()
    expected["adapter"] = [stock_nll(adapted, r["input_ids"], r["labels"]) for r in rows]

    assert [r["where"] for r in part["records"]] == list(rows["where"])
    for column, values in expected.items():
        nll = [v for v, _ in values]
        tokens = sum(n for _, n in values)
        assert [r["tokens"] for r in part["records"]] == [n for _, n in values]
        assert [r[f"{column}_nll"] for r in part["records"]] == pytest.approx(nll, rel=1e-5)
        assert part[column]["tokens"] == tokens
        assert part[column]["nll"] == pytest.approx(sum(nll) / tokens, rel=1e-5)
        assert part[column]["perplexity"] == pytest.approx(math.exp(sum(nll) / tokens), rel=1e-5)
    assert part["base"]["nll"] != pytest.approx(part["adapter"]["nll"], rel=1e-3)  # the adapter does something


def test_tiny_run_adapter_lowers_held_out_perplexity(eval_run):
    part = read_eval(eval_run)["perplexity"]["eval_split"]
    metrics = json.loads((eval_run / "metrics.json").read_text())
    assert part["base"]["records"] == metrics["data"]["eval_records"] > 0
    assert part["adapter"]["perplexity"] < part["base"]["perplexity"]
    low, high = part["difference"]["ci95"]
    assert 0 < low <= part["difference"]["nll"] <= high  # base - adapter: the interval excludes 0


def test_eval_loss_in_metrics_is_the_lm_loss_alone(eval_run):
    """metrics.json's eval_loss is TRL's batch-mean of the final adapter's loss on the eval split; rebuilt from the
    per-record LM-only NLLs of eval.json (same adapter, batches of training.batch_size in order) it must agree.
    TRL's own figure adds router_aux_loss_coef x aux (about 0.02 x 2.4 here), far beyond the tolerance."""
    metrics = json.loads((eval_run / "metrics.json").read_text())
    records = read_eval(eval_run)["perplexity"]["eval_split"]["records"]
    batch = 2  # the tiny recipe's training.batch_size, which is also the eval batch size
    losses, sizes = [], []
    for start in range(0, len(records), batch):
        group = records[start : start + batch]
        losses.append(sum(r["adapter_nll"] for r in group) / sum(r["tokens"] for r in group))
        sizes.append(len(group))
    assert metrics["aux_loss"] > 1.0
    assert metrics["eval_loss"] == pytest.approx(np.average(losses, weights=sizes), rel=1e-5)


def test_bootstrap_interval_is_paired_and_reproducible():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 20, size=50)
    base = tokens * 2.0 + rng.normal(0, 1, size=50)
    same = bootstrap_difference(base, base.copy(), tokens, 200, seed=1)
    assert same["nll"] == 0 and same["ci95"] == [0.0, 0.0]  # paired: identical columns never differ
    better = bootstrap_difference(base, base - tokens * 0.5, tokens, 200, seed=1)
    assert better["nll"] == pytest.approx(0.5) and better["ci95"] == pytest.approx([0.5, 0.5])
    adapter = base - rng.normal(0.5, 3, size=50)
    noisy = bootstrap_difference(base, adapter, tokens, 500, seed=3)
    assert noisy == bootstrap_difference(base, adapter, tokens, 500, seed=3)  # the seed fixes the interval
    low, high = noisy["ci95"]
    assert low < noisy["nll"] < high
    assert bootstrap_difference(base, base * 0.9, tokens, 0, seed=0)["ci95"] is None
