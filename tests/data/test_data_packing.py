"""Packed rows: no attention across records (logits of a packed record equal the record alone), efficiency stat."""

from __future__ import annotations

import pytest
import torch

from data_tools.config import DataConfig
from data_tools.pipeline import prepare_sft_data


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)  # default attention (sdpa)
    return m.eval()


def test_packed_logits_equal_single_record_logits(model, tiny_model_dir, tokenizer, tmp_path, write_jsonl):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Question {i}: " + "word " * (3 * i)},
                {"role": "assistant", "content": f"Answer {i}"},
            ]
        }
        for i in range(1, 9)
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(train=[{"path": str(path)}], packing=True, max_length=96)
    prepared = prepare_sft_data(cfg, tokenizer, model_dir=tiny_model_dir, seed=0, cache_dir=tmp_path / "cache")
    assert prepared.trainer_kwargs["padding_free"] is True
    packed = next(r for r in prepared.train if len(r["seq_lengths"]) >= 3)
    eff = prepared.stats["packing_efficiency"]
    assert eff == pytest.approx(prepared.stats["train_tokens"] / (len(prepared.train) * 96))
    assert 0.5 < eff <= 1.0

    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    batch = collator([packed])
    assert batch["position_ids"][0].tolist() == [p for n in packed["seq_lengths"] for p in range(n)]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        packed_logits = model(**inputs, use_cache=False).logits[0]
        arange_logits = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
        start = 0
        differs = False
        for n in packed["seq_lengths"]:
            ids = torch.tensor([packed["input_ids"][start : start + n]])
            alone = model(input_ids=ids, use_cache=False).logits[0]
            torch.testing.assert_close(packed_logits[start : start + n], alone, rtol=1e-4, atol=1e-5)
            if start > 0:  # negative control: one long sequence attends across records and differs
                differs |= not torch.allclose(arange_logits[start : start + n], alone, atol=1e-3)
            start += n
    assert differs
