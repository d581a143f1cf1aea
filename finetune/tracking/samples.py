"""Sample generations during training: a few eval prompts, greedy, adapter on, at each evaluation and at the end.

The prompts come from the prepared dataset, whatever the method: SFT rows carry input_ids/labels (the prompt is
every token before the first trained label, the reference the trained tokens after it); DPO rows carry
prompt_ids/chosen_ids and KTO rows prompt_ids/completion_ids. Rows go to the tracker (a W&B table, samples.jsonl).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import GenerationConfig, TrainerCallback

from finetune.distributed.ranks import is_main_process
from finetune.distributed.sharding import is_sharded

IGNORE = -100
REFERENCE_KEYS = ("chosen_ids", "completion_ids")


def sft_prompt(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]] | None:
    """Tokens before the first trained label, and the run of trained tokens that follows (None: no prompt)."""
    start = next((i for i, label in enumerate(labels) if label != IGNORE), None)
    if not start:  # no trained token, or nothing before it to prompt with
        return None
    end = next((i for i in range(start, len(labels)) if labels[i] == IGNORE), len(labels))
    return list(input_ids[:start]), list(input_ids[start:end])


def prompt_rows(dataset: Any, n: int, max_prompt_tokens: int = 512) -> list[tuple[list[int], list[int]]]:
    """Up to n (prompt_ids, reference_ids) pairs from the first rows of a prepared dataset; long prompts keep
    their last tokens (the turn being answered)."""
    if dataset is None or n <= 0:
        return []
    columns = set(dataset.column_names)
    pairs = []
    for row in dataset.select(range(min(len(dataset), 8 * n))):
        if {"input_ids", "labels"} <= columns:
            pair = sft_prompt(row["input_ids"], row["labels"])
        elif "prompt_ids" in columns:
            key = next((k for k in REFERENCE_KEYS if k in columns), None)
            pair = (list(row["prompt_ids"]), list(row[key]) if key else [])
        else:
            return []
        if pair and pair[0] and pair not in pairs:
            pairs.append((pair[0][-max_prompt_tokens:], pair[1]))
        if len(pairs) == n:
            break
    return pairs


@torch.no_grad()
def generate_rows(
    model,
    tokenizer,
    pairs,
    *,
    step: int,
    max_new_tokens: int,
    progress: Callable[[int, int, float], None] | None = None,
) -> list[dict[str, Any]]:
    """Greedy continuations of each prompt with the model as it is now (adapter on), as table rows.

    `progress(done, new_tokens, seconds)` is called after each one."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    synced = is_sharded(model)  # FSDP2: every rank generates in lockstep until all have finished
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    rows = []
    try:
        for prompt, reference in pairs:
            started = time.perf_counter()
            ids = torch.tensor([prompt], device=device)
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config, synced_gpus=synced
            )
            rows.append(
                {
                    "step": step,
                    "prompt": tokenizer.decode(prompt, skip_special_tokens=False),
                    "reference": tokenizer.decode(reference, skip_special_tokens=True),
                    "generated": tokenizer.decode(out[0, len(prompt) :].tolist(), skip_special_tokens=True),
                }
            )
            if progress is not None:
                progress(len(rows), out.shape[1] - len(prompt), time.perf_counter() - started)
    finally:
        model.train(was_training)
    return rows


class SamplesCallback(TrainerCallback):
    """Generates the samples after each evaluation and at the end of training (once per step).

    Generation can take longer than a short run's training, so it is never silent: rank 0 says when it starts and
    prints a line per sample; `seconds` (their total) lets the summary keep it apart from the training steps."""

    def __init__(self, tracker, model, tokenizer, pairs, *, max_new_tokens: int, expert_load: Any = None, echo=None):
        self.tracker = tracker
        self.model = model
        self.tokenizer = tokenizer
        self.pairs = pairs
        self.max_new_tokens = max_new_tokens
        self.expert_load = expert_load
        self.seconds = 0.0
        self.echo = echo if echo is not None else (print_now if is_main_process() else lambda *_: None)
        self._done_steps: set[int] = set()

    def sample(self, step: int) -> None:
        if not self.pairs or step in self._done_steps:
            return
        started = time.perf_counter()
        self._done_steps.add(step)
        n = len(self.pairs)
        self.echo(
            f"generating {n} sample{'s' if n != 1 else ''} at step {step} (up to {self.max_new_tokens} new tokens "
            "each; tracking.sample_prompts: 0 turns this off)"
        )

        def progress(done: int, new_tokens: int, seconds: float) -> None:
            self.echo(f"  sample {done}/{n}: {new_tokens} tokens in {seconds:.1f} s")

        paused = self.expert_load.paused() if self.expert_load is not None else contextlib.nullcontext()
        try:
            with paused:
                rows = generate_rows(
                    self.model,
                    self.tokenizer,
                    self.pairs,
                    step=step,
                    max_new_tokens=self.max_new_tokens,
                    progress=progress,
                )
        except Exception as e:  # samples are a view on training, never a reason to stop it
            print(f"warning: sample generation failed at step {step} ({e}); training continues", flush=True)
            self.pairs = []
            return
        finally:
            self.seconds += time.perf_counter() - started
        self.tracker.log_samples(rows, step)

    def on_evaluate(self, args, state, control, **kwargs):
        self.sample(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.sample(state.global_step)


def print_now(line: str) -> None:
    print(line, flush=True)
