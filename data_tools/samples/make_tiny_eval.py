"""Generate the tiny evaluation samples that `finetune eval`, its tests and the README use.

- `tiny_arith_mc.jsonl` (+ the hand-written task file `tiny_arith_mc.yaml`): a local lm-evaluation-harness
  multiple-choice task, read offline (`dataset_path: json`), in the tasks of `tiny_chat.jsonl`;
- `tiny_generation.jsonl`: `{prompt, reference}` records for the generation metrics.

Deterministic (fixed seed, a different one than tiny_chat's): `python -m data_tools.samples.make_tiny_eval` rewrites
the same files byte for byte.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
WORDS = ["cat", "dog", "sun", "tree", "book", "milk", "red", "blue", "fish", "star", "moon", "rain", "cake", "bird"]


def arithmetic_choice(rng: random.Random) -> dict:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    answer = a + b
    wrong = rng.sample([n for n in range(0, 41) if n != answer], 3)
    choices = [str(n) for n in [answer, *wrong]]
    rng.shuffle(choices)
    return {"question": f"What is {a} + {b}?", "choices": choices, "answer": choices.index(str(answer))}


def generation_record(rng: random.Random) -> dict:
    kind = rng.choice(["add", "copy", "reverse", "sort"])
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    words = rng.sample(WORDS, rng.randint(2, 4))
    if kind == "add":
        return {"prompt": f"What is {a} + {b}?", "reference": str(a + b)}
    if kind == "copy":
        return {"prompt": f"Repeat: {' '.join(words)}", "reference": " ".join(words)}
    if kind == "reverse":
        return {"prompt": f"Reverse: {' '.join(words)}", "reference": " ".join(reversed(words))}
    return {"prompt": f"Sort: {' '.join(words)}", "reference": " ".join(sorted(words))}


def write(name: str, rows: list[dict]) -> None:
    with (HERE / name).open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} records to {HERE / name}")


def unique(make, rng: random.Random, n: int) -> list[dict]:
    rows, seen = [], set()
    while len(rows) < n:
        row = make(rng)
        key = json.dumps(row, sort_keys=True)
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def main(seed: int = 1) -> None:
    rng = random.Random(seed)
    write("tiny_arith_mc.jsonl", unique(arithmetic_choice, rng, 40))
    write("tiny_generation.jsonl", unique(generation_record, rng, 24))


if __name__ == "__main__":
    main()
