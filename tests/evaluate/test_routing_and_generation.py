"""Routing shift (exactly 0 for an adapter with zero B factors, positive for a trained one) and generation metrics
(equal to rouge-score and sacrebleu called directly on the saved outputs)."""

from __future__ import annotations

import json

import pytest
import sacrebleu
from eval_helpers import GENERATION_FILE, read_eval, runner
from rouge_score import rouge_scorer

from finetune.cli import app


def test_routing_shift_is_exactly_zero_for_zero_b_factors(tiny_model_dir, zero_adapter, chat_file, tmp_path):
    out = tmp_path / "out"
    args = ["eval", "--model", str(tiny_model_dir), "--adapter", str(zero_adapter), "--quantization", "none",
            "--data", str(chat_file), "--bootstrap", "0", "-o", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output[-3000:]
    evaluation = read_eval(out)
    routing = evaluation["routing"]
    assert routing["tokens"] > 0 and routing["layers"] == [0, 1]
    assert routing["kl"] == [0.0, 0.0] and routing["kl_mean"] == 0.0
    assert routing["top1_changed"] == [0.0, 0.0] and routing["top1_changed_mean"] == 0.0
    assert routing["base"]["load"] == routing["adapter"]["load"]
    part = evaluation["perplexity"]["heldout.jsonl"]
    assert part["base"]["nll"] == part["adapter"]["nll"]  # a zero delta computes exactly the base
    assert (out / "eval_routing.png").stat().st_size > 0


def test_routing_shift_is_positive_for_the_trained_adapter(eval_run):
    routing = read_eval(eval_run)["routing"]
    assert routing["kl_mean"] > 0 and routing["top1_changed_mean"] > 0
    assert all(0 <= share <= 1 for share in routing["top1_changed"])
    for column in ("base", "adapter"):
        assert all(sum(row) == pytest.approx(1.0) for row in routing[column]["load"])
    assert (eval_run / "eval_routing.png").is_file()


def test_generation_metrics_equal_the_libraries_on_the_saved_outputs(eval_run):
    part = read_eval(eval_run)["generation"][GENERATION_FILE.name]
    records = part["records"]
    references = [json.loads(line)["reference"] for line in GENERATION_FILE.read_text().splitlines()]
    assert sorted(r["reference"] for r in records) == sorted(references)
    agree = [r["agree"] for r in records]
    assert agree == sorted(agree)  # the records where base and adapter differ come first
    assert all(r["agree"] == (r["base"] == r["adapter"]) for r in records)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for column in ("base", "adapter"):
        outputs, refs = [r[column] for r in records], [r["reference"] for r in records]
        rouge = sum(scorer.score(ref, out)["rougeL"].fmeasure for out, ref in zip(outputs, refs, strict=True))
        assert part[column]["rougeL"] == pytest.approx(rouge / len(records), abs=1e-12)
        assert part[column]["chrf"] == pytest.approx(sacrebleu.corpus_chrf(outputs, [refs]).score, abs=1e-12)
        exact = sum(o.strip() == r.strip() for o, r in zip(outputs, refs, strict=True)) / len(records)
        assert part[column]["exact_match"] == exact
        assert part[column]["contains"] == sum(r.strip() in o for o, r in zip(outputs, refs, strict=True)) / len(refs)
    assert any(r["base"] for r in records)  # generation ran: the random base always says something
