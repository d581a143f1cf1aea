"""TRL 1.16's DPOTrainer and KTOTrainer train on our pre-tokenised preference data as it is.

TRL always re-tokenises in `_prepare_dataset`, so the trainer builders replace that one method with
`data_tools.preference.trl_ready` (as below). These tests build real trainers on a tiny Mixtral and check that the
ids the model is fed, and the completion masks the losses use, are ours.
"""

from __future__ import annotations

import pytest
import torch

from data_tools.config import DataConfig
from data_tools.preference import trl_ready
from data_tools.prepare import prepare_data


def trainer_class(base):
    class Pretokenized(base):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return trl_ready(dataset, args)

    return Pretokenized


def build(method, prepared, tokenizer, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    seen: list[dict] = []

    def capture(_module, _args, kwargs):
        seen.append({k: kwargs[k].clone() for k in ("input_ids", "attention_mask") if k in kwargs})

    model.register_forward_pre_hook(capture, with_kwargs=True)
    config_cls, trainer_cls = (DPOConfig, DPOTrainer) if method == "dpo" else (KTOConfig, KTOTrainer)
    args = config_cls(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-4,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        **prepared.trainer_kwargs,
    )
    trainer = trainer_class(trainer_cls)(
        model=model, args=args, train_dataset=prepared.train, eval_dataset=prepared.eval, processing_class=tokenizer
    )
    return trainer, seen


def rows_of(batch) -> list[list[int]]:
    """The unpadded sequences of a batch (attention mask), as lists."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]


def test_dpo_trainer_trains_on_our_ids(tokenizer, tiny_model_dir, tmp_path):
    cfg = DataConfig(train=[{"path": "builtin:tiny-preference", "samples": 16}], eval_fraction=0.2, max_length=64)
    prepared = prepare_data(cfg, tokenizer, model_dir=tiny_model_dir, seed=0, method="dpo")
    trainer, seen = build("dpo", prepared, tokenizer, tiny_model_dir, tmp_path)
    ours = prepared.train
    assert trainer.train_dataset["prompt_ids"] == ours["prompt_ids"]  # not re-tokenised, same order
    assert trainer.train_dataset["chosen_ids"] == ours["chosen_ids"]
    assert trainer.eval_dataset["rejected_ids"] == prepared.eval["rejected_ids"]
    # the collator's sequences and completion masks (which select the tokens the DPO loss scores) are ours
    batch = trainer.data_collator([ours[i] for i in range(4)])
    n = 4
    for i in range(n):
        row = ours[i]
        for half, side in ((0, "chosen"), (n, "rejected")):
            ids = row["prompt_ids"] + row[f"{side}_ids"]
            assert rows_of(batch)[half + i] == ids
            mask = batch["completion_mask"][half + i][: len(ids)].tolist()
            assert mask == [0] * len(row["prompt_ids"]) + [1] * len(row[f"{side}_ids"])
    trainer.train()
    expected = {tuple(r["prompt_ids"] + r[f"{s}_ids"]) for r in ours for s in ("chosen", "rejected")}
    fed = [tuple(r) for b in seen for r in rows_of(b)]
    assert fed and set(fed) <= expected


@pytest.mark.parametrize("source", ["builtin:tiny-unpaired", "builtin:tiny-preference"])
def test_kto_trainer_trains_on_our_ids(source, tokenizer, tiny_model_dir, tmp_path):
    cfg = DataConfig(train=[{"path": source, "samples": 16}], max_length=64)
    prepared = prepare_data(cfg, tokenizer, model_dir=tiny_model_dir, seed=0, method="kto")
    trainer, seen = build("kto", prepared, tokenizer, tiny_model_dir, tmp_path)
    ours = prepared.train
    prepared_by_trl = trainer.train_dataset
    assert prepared_by_trl["prompt_ids"] == ours["prompt_ids"]
    assert prepared_by_trl["completion_ids"] == ours["completion_ids"]
    assert prepared_by_trl["label"] == ours["label"]
    # KL completions as TRL builds them: each batch of 4 rotated by one
    completions = ours["completion_ids"]
    for start in range(0, len(ours), 4):
        chunk = completions[start : start + 4]
        assert prepared_by_trl["KL_completion_ids"][start : start + 4] == [chunk[-1], *chunk[:-1]]
    batch = trainer.data_collator([prepared_by_trl[i] for i in range(4)])
    for i in range(4):
        row = ours[i]
        ids = row["prompt_ids"] + row["completion_ids"]
        assert rows_of(batch)[i] == ids
        assert batch["completion_mask"][i][: len(ids)].tolist() == [0] * len(row["prompt_ids"]) + [1] * len(
            row["completion_ids"]
        )
        assert bool(batch["label"][i]) is row["label"]
    trainer.train()
    allowed = {tuple(p + c) for p in ours["prompt_ids"] for c in completions}  # KL pairs mix prompts
    fed = [tuple(r) for b in seen for r in rows_of(b)]
    assert fed and set(fed) <= allowed
    assert {tuple(r["prompt_ids"] + r["completion_ids"]) for r in ours.select(range(4))} <= set(fed)
