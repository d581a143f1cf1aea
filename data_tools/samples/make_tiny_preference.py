"""Generate `tiny_preference.jsonl` (DPO pairs) and `tiny_unpaired.jsonl` (KTO records) for the tiny model.

Deterministic (fixed seed): `python -m data_tools.samples.make_tiny_preference` rewrites both files byte for byte.
The preference is one a tiny random model visibly learns in a couple of CPU minutes: the preferred answer always ends
with the sign-off "Have a nice day!", the other never does; otherwise both answers are the same correct reply. After
DPO/KTO the model signs off (check with `finetune generate`), and the reward margin/accuracy rise in the logs.
Prompts are short single questions, some multi-turn and some with a system prompt; most records are under 40 tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
PAIRS_OUT = HERE / "tiny_preference.jsonl"
UNPAIRED_OUT = HERE / "tiny_unpaired.jsonl"
SIGN_OFF = "Have a nice day!"
WORDS = ["cat", "dog", "sun", "tree", "book", "milk", "red", "blue", "fish", "star", "moon", "rain", "cake", "bird"]
SYSTEMS = ["Answer briefly.", "You are a friendly assistant."]


def make(rng: random.Random) -> tuple[list[dict[str, str]], str]:
    """(prompt messages ending with a user turn, the correct answer)."""
    kind = rng.choice(["add", "sub", "copy", "reverse", "sort", "count", "multi"])
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    words = rng.sample(WORDS, rng.randint(2, 4))
    if kind == "add":
        question, answer = f"What is {a} + {b}?", str(a + b)
    elif kind == "sub":
        a, b = max(a, b), min(a, b)
        question, answer = f"What is {a} - {b}?", str(a - b)
    elif kind == "copy":
        question, answer = f"Repeat: {' '.join(words)}", " ".join(words)
    elif kind == "reverse":
        question, answer = f"Reverse: {' '.join(words)}", " ".join(reversed(words))
    elif kind == "sort":
        question, answer = f"Sort: {' '.join(words)}", " ".join(sorted(words))
    elif kind == "count":
        question, answer = f"How many words: {' '.join(words)}", str(len(words))
    else:  # an earlier turn in the prompt
        c = rng.randint(0, 9)
        prompt = [
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": f"{a + b} {SIGN_OFF}"},
            {"role": "user", "content": f"And plus {c}?"},
        ]
        return prompt, str(a + b + c)
    prompt = [{"role": "user", "content": question}]
    if rng.random() < 0.15:
        prompt.insert(0, {"role": "system", "content": rng.choice(SYSTEMS)})
    return prompt, answer


def prompts(n: int, rng: random.Random) -> list[tuple[list[dict[str, str]], str]]:
    """n distinct prompts with their answers."""
    out, seen = [], set()
    while len(out) < n:
        prompt, answer = make(rng)
        key = json.dumps(prompt)
        if key not in seen:
            seen.add(key)
            out.append((prompt, answer))
    return out


def reply(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def write(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} records to {path}")


def main(n: int = 400, seed: int = 0) -> None:
    rng = random.Random(seed)
    pairs = [
        {"prompt": p, "chosen": reply(f"{answer} {SIGN_OFF}"), "rejected": reply(answer)}
        for p, answer in prompts(n, rng)
    ]
    write(PAIRS_OUT, pairs)
    # Unpaired: other prompts, exactly half desirable (KTO warns on an unbalanced set), shuffled.
    labels = [i % 2 == 0 for i in range(n)]
    rng.shuffle(labels)
    unpaired = [
        {"prompt": p, "completion": reply(f"{answer} {SIGN_OFF}" if good else answer), "label": good}
        for (p, answer), good in zip(prompts(n, random.Random(seed + 1)), labels, strict=True)
    ]
    write(UNPAIRED_OUT, unpaired)


if __name__ == "__main__":
    main()
