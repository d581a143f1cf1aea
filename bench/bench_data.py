"""Data pipeline throughput: ours (`prepare_sft_data`) vs TRL's own SFTTrainer dataset preparation, same data.

    python bench/bench_data.py                   # 30k generated conversations (~2.5 min on 2 cores)
    python bench/bench_data.py --records 100000  # the full 100k (~9 min on 2 busy cores, most of it TRL's side)

Both sides start from the same generated conversations and produce input_ids + assistant-only labels:
- ours, chat_format=mistral: read JSONL, validate, format with mistral-common, mask, batched parallel `map`;
- ours, chat_format=chatml: same, through the HF fast tokenizer and a ChatML Jinja template;
- TRL: `SFTTrainer._prepare_dataset` on the in-memory conversational dataset with the same ChatML template
  (with `{% generation %}` markers, `assistant_only_loss=True`), `dataset_num_proc` = our worker count.
Ours also reads and validates the file, which TRL does not. The ratio is from this one run. Caches are fresh.
Prints a markdown table and writes bench/results/bench_data.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sun",
    "tree",
    "book",
    "milk",
    "red",
    "blue",
    "fish",
    "star",
    "moon",
    "rain",
    "cake",
    "bird",
    "river",
    "stone",
    "light",
    "code",
    "data",
]
JA = ["ねこ", "いぬ", "そら", "やま", "みず", "東京", "日本語", "こんにちは"]
CHATML_TRAINING = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' + '\\n' }}{% endgeneration %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS if rng.random() < 0.9 else JA) for _ in range(n))


def generate(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs = []
        if rng.random() < 0.2:
            msgs.append({"role": "system", "content": sentence(rng, rng.randint(3, 10))})
        for _ in range(rng.choice([1, 1, 2, 3])):
            msgs.append({"role": "user", "content": sentence(rng, rng.randint(5, 40))})
            msgs.append({"role": "assistant", "content": sentence(rng, rng.randint(5, 60))})
        out.append({"messages": msgs})
    return out


def token_stats(ds) -> tuple[int, int]:
    from data_tools.packing import total_tokens, trained_tokens

    return total_tokens(ds), trained_tokens(ds)


def bench_ours(path: Path, tokenizer, model_dir: Path, chat_format: str, num_proc: int, packing: bool) -> dict:
    from data_tools.config import DataConfig
    from data_tools.pipeline import prepare_sft_data

    cfg = DataConfig(
        train=[{"path": str(path)}], chat_format=chat_format, max_length=4096, num_proc=num_proc, packing=packing
    )
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        prepared = prepare_sft_data(cfg, tokenizer, model_dir=model_dir, seed=0, cache_dir=Path(cache))
        seconds = time.perf_counter() - t
    s = prepared.stats
    return {
        "seconds": seconds,
        "records": s["records_total"],
        "tokens": s["train_tokens"],
        "trained_tokens": s["trained_tokens"],
        "packing_efficiency": s["packing_efficiency"],
    }


def bench_trl(records: list[dict], tokenizer, model_dir: Path, num_proc: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    tok = tokenizer.__class__.from_pretrained(str(model_dir))
    tok.pad_token = tok.unk_token
    tok.chat_template = CHATML_TRAINING
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out,
            report_to="none",
            use_cpu=True,
            bf16=False,
            max_length=4096,
            assistant_only_loss=True,
            dataset_num_proc=num_proc,
            shuffle_dataset=False,
        )
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        small = Dataset.from_list(records[:8])
        trainer = SFTTrainer(model=model, args=args, train_dataset=small, processing_class=tok)
        ds = Dataset.from_list(records)
        t = time.perf_counter()
        prepared = trainer._prepare_dataset(ds, tok, args, False, None, "bench")
        seconds = time.perf_counter() - t
    tokens, trained = token_stats(prepared)
    return {"seconds": seconds, "records": len(prepared), "tokens": tokens, "trained_tokens": trained}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--records",
        type=int,
        default=30_000,
        help="conversations to generate (default 30000; 100000 takes ~9 min on 2 loaded cores)",
    )
    parser.add_argument("--num-proc", type=int, default=min(os.cpu_count() or 1, 8), help="worker processes")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bench_data.json")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from finetune.model.tiny import TinySpec, write_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    model_dir = write_tiny_model(work / "model", TinySpec(hidden_size=32, intermediate_size=64, layers=1))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.pad_token = tokenizer.unk_token
    records = generate(args.records)
    path = work / "data.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")

    results = {
        "ours (mistral, mistral-common)": bench_ours(path, tokenizer, model_dir, "mistral", args.num_proc, False),
        "ours (chatml, HF fast tokenizer)": bench_ours(path, tokenizer, model_dir, "chatml", args.num_proc, False),
        "ours (mistral + packing)": bench_ours(path, tokenizer, model_dir, "mistral", args.num_proc, True),
        "TRL SFTTrainer._prepare_dataset (chatml)": bench_trl(records, tokenizer, model_dir, args.num_proc),
    }
    base = results["TRL SFTTrainer._prepare_dataset (chatml)"]
    for r in results.values():
        r["records_per_s"] = r["records"] / r["seconds"]
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["speedup_vs_trl"] = base["seconds"] / r["seconds"]

    print(f"\n{args.records} conversations, {args.num_proc} worker(s), {os.cpu_count()} CPU(s)\n")
    print("| pipeline | seconds | records/s | tokens/s | trained tokens | vs TRL |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {r['seconds']:.1f} | {r['records_per_s']:,.0f} | {r['tokens_per_s']:,.0f} | "
            f"{r['trained_tokens']:,} | {r['speedup_vs_trl']:.2f}x |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "records": args.records,
        "num_proc": args.num_proc,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
