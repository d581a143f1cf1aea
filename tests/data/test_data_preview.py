"""The mask preview shows exactly the trained tokens as trained, for plain and packed rows."""

from __future__ import annotations

from data_tools.preview import TRAINED_STYLE, first_sample, mask_text


def test_mask_text_highlights_exactly_the_trained_span(tokenizer):
    prompt = tokenizer("[INST] What is 2+2? [/INST]", add_special_tokens=False).input_ids
    answer = [*tokenizer("4", add_special_tokens=False).input_ids, tokenizer.eos_token_id]
    ids = [tokenizer.bos_token_id, *prompt, *answer]
    labels = [-100] * (1 + len(prompt)) + answer
    text = mask_text(ids, labels, tokenizer)
    trained = "".join(text.plain[s.start : s.end] for s in text.spans if s.style == TRAINED_STYLE)
    assert trained.strip() == "4</s>"
    assert text.plain == tokenizer.decode(ids)


def test_first_sample_of_a_packed_row():
    row = {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, -100, 4, 5], "seq_lengths": [2, 3]}
    assert first_sample(row) == ([1, 2], [-100, 2])
    assert first_sample({"input_ids": [7, 8], "labels": [7, 8]}) == ([7, 8], [7, 8])
