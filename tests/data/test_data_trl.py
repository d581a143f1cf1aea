"""TRL 1.16's SFTTrainer consumes our datasets as they are: the labels reaching the model are ours, unchanged."""

from __future__ import annotations

import pytest
import torch

from data_tools.config import DataConfig
from data_tools.pipeline import prepare_sft_data


@pytest.mark.parametrize("packing", [False, True])
def test_sft_trainer_uses_our_labels(packing, tiny_model_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    cfg = DataConfig(train=[{"path": "builtin:tiny-chat", "samples": 24}], packing=packing, max_length=128)
    prepared = prepare_sft_data(cfg, tokenizer, model_dir=tiny_model_dir, seed=0, cache_dir=tmp_path / "cache")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    seen = []

    def capture(_module, _args, kwargs):
        seen.append({k: kwargs[k].clone() for k in ("input_ids", "labels") if k in kwargs})
        if "position_ids" in kwargs:
            seen[-1]["position_ids"] = kwargs["position_ids"].clone()

    model.register_forward_pre_hook(capture, with_kwargs=True)
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        bf16=False,
        **prepared.trainer_kwargs,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=prepared.train, processing_class=tokenizer)
    trainer.train()
    assert len(seen) == 2
    rows = {tuple(r["input_ids"]): r for r in prepared.train}
    for batch in seen:
        ids, labels = batch["input_ids"], batch["labels"]
        if packing:  # padding-free: the batch's packed rows are flattened into one row
            assert ids.shape[0] == 1 and "position_ids" in batch
            flat_ids, flat_labels = ids[0].tolist(), labels[0].tolist()
            start = 0
            while start < len(flat_ids):
                match = next(r for k, r in rows.items() if tuple(flat_ids[start : start + len(k)]) == k)
                n = len(match["input_ids"])
                # TRL masks the first token of each record (a BOS, already -100 in ours); the rest is ours as is
                assert flat_labels[start : start + n] == match["labels"]
                start += n
        else:
            for row_ids, row_labels in zip(ids.tolist(), labels.tolist(), strict=True):
                key = tuple(t for t in row_ids)
                match = next(r for k, r in rows.items() if key[: len(k)] == k)
                n = len(match["input_ids"])
                assert row_labels[:n] == match["labels"]
                assert all(x == -100 for x in row_labels[n:])  # padding never carries loss
                assert match["labels"][-1] == tokenizer.eos_token_id  # the closing EOS is trained
