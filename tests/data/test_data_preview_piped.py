"""The loss-mask preview keeps its meaning without colour (piped, NO_COLOR): trained spans are marked « » in the text,
and the legend says what the marks mean; on a colour terminal the highlight stays (issue 16, item 4)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from typer.testing import CliRunner

from data_tools.preview import LEGEND, PLAIN_LEGEND, mask_text, preference_view
from finetune.cli_data import app

runner = CliRunner()


def printed(renderable, **console_options) -> str:
    out = io.StringIO()
    Console(file=out, width=120, **console_options).print(renderable)
    return out.getvalue()


@pytest.fixture
def record(tokenizer):
    prompt = tokenizer("[INST] What is 2+2? [/INST]", add_special_tokens=False).input_ids
    answer = [*tokenizer("4", add_special_tokens=False).input_ids, tokenizer.eos_token_id]
    ids = [tokenizer.bos_token_id, *prompt, *answer]
    return ids, [-100] * (1 + len(prompt)) + answer


def test_without_colour_the_trained_span_is_marked(tokenizer, record):
    text = mask_text(*record, tokenizer)
    for options in ({}, {"force_terminal": True, "no_color": True}):  # a pipe; a terminal with NO_COLOR
        shown = printed(text, **options)
        assert "[/INST] «4</s>»" in shown, (options, shown)  # the space before the answer stays outside
        assert "\x1b[1;30;42m" not in shown
        assert PLAIN_LEGEND in printed(LEGEND, **options)


def test_with_colour_the_highlight_stays_and_no_marks_are_added(tokenizer, record):
    shown = printed(mask_text(*record, tokenizer), force_terminal=True, color_system="truecolor")
    assert "«" not in shown and "»" not in shown and "4</s>" in shown
    assert "\x1b[1;30;42m" in shown  # bold black on green
    legend = printed(LEGEND, force_terminal=True, color_system="truecolor")
    assert "trained" in legend and "masked (-100)" in legend and PLAIN_LEGEND not in legend


def test_preference_completions_are_marked_prompt_is_not(tokenizer):
    prompt = [tokenizer.bos_token_id, *tokenizer("[INST] Hi [/INST]", add_special_tokens=False).input_ids]
    row = {
        "prompt_ids": prompt,
        "chosen_ids": tokenizer("Hello there", add_special_tokens=False).input_ids,
        "rejected_ids": tokenizer("No", add_special_tokens=False).input_ids,
    }
    shown = printed(preference_view(row, tokenizer))
    assert "«Hello there»" in shown and "«No»" in shown
    assert "[INST] Hi [/INST]" in shown and "«<s>" not in shown and "«[INST]" not in shown


def test_piped_data_preview_marks_trained_tokens(tmp_path, tokenizer_dir, write_recipe):
    data = {"train": [{"path": "builtin:tiny-chat"}], "chat_format": "mistral", "max_length": 64}
    recipe = write_recipe(tmp_path / "r.yaml", tokenizer_dir, data)
    result = runner.invoke(app, ["preview", "builtin:tiny-chat", "--recipe", str(recipe), "-n", "2"])
    assert result.exit_code == 0, result.output
    records = [line for line in result.output.splitlines() if line.startswith("<s> [INST]")]
    assert len(records) == 2 and all("[/INST] «" in line and line.endswith("</s>»") for line in records), records
    assert result.output.rstrip().endswith(PLAIN_LEGEND)
    assert "trained  masked (-100)" not in result.output


@pytest.mark.parametrize("method", ["sft", "dpo", "kto"])
def test_piped_first_training_record_has_marks_and_the_plain_legend(method, tokenizer, record, capsys):
    """The run's first-record display (train/methods/*.show_first_record), piped: DPO and KTO print the « » legend
    and a header in words, as SFT does, never "dim"/"highlighted", which mean nothing without colour."""
    from finetune.train.methods import dpo, kto, sft

    ids, labels = record
    prompt = ids[: labels.index(next(x for x in labels if x != -100))]
    rows = {
        "sft": {"input_ids": ids, "labels": labels},
        "dpo": {"prompt_ids": prompt, "chosen_ids": ids[len(prompt) :], "rejected_ids": [tokenizer.eos_token_id]},
        "kto": {"prompt_ids": prompt, "completion_ids": ids[len(prompt) :], "label": True},
    }
    {"sft": sft, "dpo": dpo, "kto": kto}[method].show_first_record([rows[method]], tokenizer)
    out = capsys.readouterr().out
    assert out.startswith("first training record (") and "«4</s>»" in out, out
    assert out.rstrip().endswith(PLAIN_LEGEND), out
    assert "highlighted" not in out and "dim" not in out, out
