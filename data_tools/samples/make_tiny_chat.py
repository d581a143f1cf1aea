"""Generate `tiny_chat.jsonl`: short, learnable conversations (English and Japanese) for the tiny model.

Deterministic (fixed seed): `python -m data_tools.samples.make_tiny_chat` rewrites the same file byte for byte.
Tasks a tiny random model can pick up in a couple of CPU minutes: arithmetic, copying, reversing and sorting
words, counting; plus a few handwritten conversations. Most records are well under 100 tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).with_name("tiny_chat.jsonl")
WORDS = ["cat", "dog", "sun", "tree", "book", "milk", "red", "blue", "fish", "star", "moon", "rain", "cake", "bird"]
JA_WORDS = ["ねこ", "いぬ", "そら", "やま", "みず", "はな", "ほし", "つき", "あめ", "とり"]

HANDWRITTEN = [
    [("user", "Hello!"), ("assistant", "Hello! How can I help you?")],
    [("user", "What is your name?"), ("assistant", "I am a tiny assistant.")],
    [("user", "Say yes."), ("assistant", "yes")],
    [("user", "Say no."), ("assistant", "no")],
    [("user", "What color is the sky?"), ("assistant", "The sky is blue.")],
    [("user", "What do cats say?"), ("assistant", "Cats say meow.")],
    [("user", "What do dogs say?"), ("assistant", "Dogs say woof.")],
    [("user", "Thank you!"), ("assistant", "You are welcome.")],
    [("user", "Goodbye."), ("assistant", "Goodbye! Have a nice day.")],
    [("user", "How many legs does a cat have?"), ("assistant", "A cat has 4 legs.")],
    [("user", "こんにちは"), ("assistant", "こんにちは!")],
    [("user", "ありがとう"), ("assistant", "どういたしまして。")],
    [("user", "おはよう"), ("assistant", "おはようございます。")],
    [("user", "さようなら"), ("assistant", "さようなら!")],
    [("user", "あなたは誰ですか?"), ("assistant", "小さなアシスタントです。")],
    [("system", "Answer in one word."), ("user", "Opposite of hot?"), ("assistant", "cold")],
    [("system", "Answer in one word."), ("user", "Opposite of up?"), ("assistant", "down")],
    [("user", "Hi"), ("assistant", "Hi!"), ("user", "How are you?"), ("assistant", "I am fine, thank you.")],
    [("user", "Count to three."), ("assistant", "1, 2, 3")],
    [("user", "Spell cat."), ("assistant", "c-a-t")],
]


def make(rng: random.Random) -> list[tuple[str, str]]:
    kind = rng.choice(["add", "sub", "copy", "reverse", "sort", "count", "ja_add", "ja_copy", "multi"])
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    words = rng.sample(WORDS, rng.randint(2, 4))
    if kind == "add":
        return [("user", f"What is {a} + {b}?"), ("assistant", str(a + b))]
    if kind == "sub":
        a, b = max(a, b), min(a, b)
        return [("user", f"What is {a} - {b}?"), ("assistant", str(a - b))]
    if kind == "copy":
        return [("user", f"Repeat: {' '.join(words)}"), ("assistant", " ".join(words))]
    if kind == "reverse":
        return [("user", f"Reverse: {' '.join(words)}"), ("assistant", " ".join(reversed(words)))]
    if kind == "sort":
        return [("user", f"Sort: {' '.join(words)}"), ("assistant", " ".join(sorted(words)))]
    if kind == "count":
        return [("user", f"How many words: {' '.join(words)}"), ("assistant", str(len(words)))]
    if kind == "ja_add":
        return [("user", f"{a} たす {b} は?"), ("assistant", f"{a + b} です。")]
    if kind == "ja_copy":
        jw = rng.sample(JA_WORDS, rng.randint(2, 3))
        return [("user", f"くりかえして: {' '.join(jw)}"), ("assistant", " ".join(jw))]
    c = rng.randint(0, 9)
    return [
        ("user", f"What is {a} + {b}?"),
        ("assistant", str(a + b)),
        ("user", f"And plus {c}?"),
        ("assistant", str(a + b + c)),
    ]


def main(n: int = 480, seed: int = 0) -> None:
    rng = random.Random(seed)
    convs, seen = list(HANDWRITTEN), {str(c) for c in HANDWRITTEN}
    while len(convs) < n:  # no exact duplicates
        conv = make(rng)
        if str(conv) not in seen:
            seen.add(str(conv))
            convs.append(conv)
    rng.shuffle(convs)
    with OUT.open("w", encoding="utf-8") as f:
        for conv in convs:
            f.write(json.dumps({"messages": [{"role": r, "content": c} for r, c in conv]}, ensure_ascii=False) + "\n")
    print(f"wrote {len(convs)} conversations to {OUT}")


if __name__ == "__main__":
    main()
