"""`finetune generate` and `finetune chat`: try a model the way it was trained, on base + adapter or a merged folder.

Prompts are built by the training formatter (data_tools.chat), so the model sees the ids it was trained on: for
chat_format mistral these are mistral-common's `encode_instruct` ids, never a re-tokenised string. The model loads
through our streaming loader, so a QLoRA adapter runs on the same NF4 base it was trained against.

Where things come from:
- `--model RUN_DIR` (a folder with recipe.yaml and adapter/): the base, quantisation and chat format of the recipe;
- `--model FOLDER|tiny-random-mixtral|hub-id [--adapter DIR]`: that base (or a merged folder), chat format mistral
  when the folder has mistral's tokenizer.model, else the tokenizer's own chat template.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from transformers import GenerationConfig, TextStreamer

from finetune.errors import UserError

QUANTIZATION_CHOICES = ("auto", "nf4", "fp4", "int8", "none")
CHAT_FORMATS = ("auto", "mistral", "chatml", "template")
RUN_RECIPE = "recipe.yaml"


@dataclass
class Source:
    """Everything needed to load a model for generation, resolved from the command line."""

    model_dir: Path
    adapter_dir: Path | None
    quantization: str
    chat_format: str
    system_prompt: str | None = None
    chat_template: str | None = None


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.95
    seed: int | None = None


@dataclass
class Generator:
    model: Any
    tokenizer: Any
    source: Source
    device: torch.device


def _looks_local(path: str) -> bool:
    """Hub ids are `org/name`; anything else (or ~, ./, `outputs/run` beside a folder `outputs`) is a local path."""
    from finetune.model.load import looks_like_path

    return looks_like_path(path)


def _check_adapter_dir(adapter: Path) -> Path:
    if not adapter.exists():
        raise UserError(f"--adapter: {adapter} does not exist")
    if not (adapter / "adapter_config.json").is_file() or not (adapter / "adapter_model.safetensors").is_file():
        raise UserError(
            f"--adapter: {adapter} is not a PEFT adapter folder (needs adapter_config.json and "
            "adapter_model.safetensors); give RUN_DIR/adapter of a finished run"
        )
    return adapter


def _from_run(run_dir: Path, quantization: str) -> Source:
    """Base, adapter, quantisation and chat format of a finished run, from its saved recipe.yaml."""
    from finetune.model.load import resolve_model_dir
    from finetune.recipe.schema import read_yaml

    recipe = read_yaml(run_dir / RUN_RECIPE)
    model = recipe.get("model") if isinstance(recipe.get("model"), dict) else {}
    data = recipe.get("data") if isinstance(recipe.get("data"), dict) else {}
    if not isinstance(model.get("path"), str):
        raise UserError(f"{run_dir / RUN_RECIPE}: model.path is missing; is this a run folder?")
    adapter = run_dir / "adapter"
    if not adapter.is_dir():
        raise UserError(f"--model: run folder {run_dir} has no adapter/ yet; wait for the run to finish")
    return Source(
        model_dir=resolve_model_dir(
            model["path"], revision=model.get("revision"), what=f"{run_dir / RUN_RECIPE}: model.path"
        ),
        adapter_dir=_check_adapter_dir(adapter),
        quantization=model.get("quantization", "nf4") if quantization == "auto" else quantization,
        chat_format=data.get("chat_format", "mistral"),
        system_prompt=data.get("system_prompt"),
        chat_template=data.get("chat_template"),
    )


def resolve_source(
    model: str,
    adapter: str | Path | None = None,
    quantization: str = "auto",
    chat_format: str = "auto",
    system: str | None = None,
) -> Source:
    """Where the weights, adapter and chat format come from (see module docstring); checks paths, loads nothing.

    quantization auto: the run's own setting for a run folder, nf4 with --adapter (a QLoRA adapter was trained on
    the NF4 base, so that is the model it knows), none for a plain folder (a merged export is meant as is).
    """
    if quantization not in QUANTIZATION_CHOICES:
        raise UserError(f"--quantization: {quantization!r} is not one of {', '.join(QUANTIZATION_CHOICES)}")
    if chat_format not in CHAT_FORMATS:
        raise UserError(f"--chat-format: {chat_format!r} is not one of {', '.join(CHAT_FORMATS)}")
    source = _resolve(model, adapter, quantization)
    if chat_format != "auto":
        source.chat_format = chat_format
    if system is not None:
        source.system_prompt = system
    return source


def _resolve(model: str, adapter: str | Path | None, quantization: str) -> Source:
    from finetune.model.load import resolve_model_dir

    local = Path(model).expanduser()
    if (local / RUN_RECIPE).is_file():
        if adapter is not None:
            raise UserError(f"--model {model} is a run folder, which brings its own adapter; drop --adapter")
        return _from_run(local, quantization)
    if not local.exists() and _looks_local(model) and model != "tiny-random-mixtral":
        raise UserError(f"--model: {model} does not exist; give a model folder, a run folder, or a hub id (org/name)")
    adapter_dir = _check_adapter_dir(Path(adapter).expanduser()) if adapter is not None else None
    model_dir = resolve_model_dir(model, what="--model")
    if quantization == "auto":
        quantization = "nf4" if adapter_dir else "none"
    names = {p.name for p in model_dir.iterdir()} if model_dir.is_dir() else set()
    chat_format = (
        "mistral" if "tokenizer.model" in names or any(n.startswith("tokenizer.model.v") for n in names) else "template"
    )
    return Source(model_dir, adapter_dir, quantization, chat_format)


def _one_line(error: UserError) -> UserError:
    if not error.problems:
        return error
    more = f" (and {len(error.problems) - 1} more)" if len(error.problems) > 1 else ""
    return UserError(f"{error.message}: {error.problems[0].strip()}{more}")


def load_generator(source: Source, *, dtype: str = "auto", device: str = "auto") -> Generator:
    """Load the base through our loader (quantised as asked), attach the adapter, load the tokenizer."""
    from finetune.model.load import load_tokenizer, model_dir_problems, resolve_device, resolve_dtype
    from finetune.moe.loading import load_mixtral
    from finetune.moe.lora import load_adapter
    from finetune.recipe.sections import ModelSettings

    problems = [
        p.replace("model.path: ", "--model: ", 1)
        for p in model_dir_problems(source.model_dir, ModelSettings(path=str(source.model_dir)))
    ]
    if problems:
        raise _one_line(UserError(problems[0], problems[1:]))
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    try:
        model, _ = load_mixtral(source.model_dir, quantization=source.quantization, dtype=torch_dtype, device=target)
        if source.adapter_dir is not None:
            model = load_adapter(model, source.adapter_dir)
    except UserError as e:
        raise _one_line(e) from None
    except RuntimeError as e:  # load_state_dict's size mismatch: an adapter trained on another model shape
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e).splitlines()[0])
        raise UserError(
            f"--adapter: {source.adapter_dir} was trained on a model of another shape than {source.model_dir} "
            f"({first}); use the base it was trained on"
        ) from None
    model.eval()
    tokenizer = load_tokenizer(source.model_dir)
    return Generator(model, tokenizer, source, target)


def _encoder(gen: Generator):
    """The training formatter for this source (data_tools keeps one per format spec and process)."""
    from data_tools.chat import FormatSpec, get_encoder, mistral_tokenizer_file, resolve_template

    src = gen.source
    if src.chat_format == "mistral":
        spec = FormatSpec("mistral", "assistant", src.system_prompt, str(mistral_tokenizer_file(src.model_dir)))
        return get_encoder(spec)
    template = resolve_template(src.chat_format, src.chat_template, gen.tokenizer)
    return get_encoder(FormatSpec(src.chat_format, "assistant", src.system_prompt, None, template), gen.tokenizer)


def prompt_ids(gen: Generator, messages: list[dict[str, str]]) -> list[int]:
    """Token ids for a conversation that ends with a user message, ready for the assistant's reply.

    mistral: exactly mistral-common's encode_instruct (the [/INST] ending is the generation prompt); template
    formats: the template's text with add_generation_prompt, tokenised without adding special tokens twice.
    """
    encoder = _encoder(gen)
    if gen.source.chat_format == "mistral":
        return encoder.encode(messages)[0]
    if gen.source.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": gen.source.system_prompt}, *messages]
    text = encoder.render([messages], True)[0]
    return gen.tokenizer(text, add_special_tokens=False)["input_ids"]


class StreamTo(TextStreamer):
    """transformers' TextStreamer, writing to a chosen stream (so tests and pipes can read it)."""

    def __init__(self, tokenizer, out: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


def reply(
    gen: Generator, messages: list[dict[str, str]], sampling: Sampling, out: TextIO | None = None
) -> tuple[str, list[int]]:
    """Generate the assistant's reply to `messages`, streaming it to `out`; returns its text and token ids."""
    ids = prompt_ids(gen, messages)
    tok = gen.tokenizer
    settings: dict[str, Any] = dict(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=sampling.temperature > 0,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    if sampling.temperature > 0:
        settings.update(temperature=sampling.temperature, top_p=sampling.top_p)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    input_ids = torch.tensor([ids], device=gen.device)
    streamer = StreamTo(tok, out) if out is not None else None
    with torch.no_grad():
        output = gen.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=GenerationConfig(**settings),
            streamer=streamer,
        )
    new = output[0, len(ids) :].tolist()
    return tok.decode(new, skip_special_tokens=True).strip(), new


REPLY_SEPARATOR = "---\n"  # between piped chat replies, as a line of its own


def chat_loop(gen: Generator, sampling: Sampling, lines: TextIO, out: TextIO, err: TextIO) -> list[str]:
    """Read user lines until EOF or /exit, keeping the conversation; /reset clears it. Returns the replies."""
    interactive = lines.isatty()
    history: list[dict[str, str]] = []
    replies: list[str] = []
    if interactive:
        err.write("chat: type a message; /reset clears the conversation, /exit (or Ctrl-D) ends\n")
    while True:
        if interactive:
            err.write("you> ")
            err.flush()
        line = lines.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history.clear()
            err.write("(conversation cleared)\n")
            continue
        history.append({"role": "user", "content": text})
        if replies and not interactive:  # piped: the replies are told apart in the output (no `you>` prompt between)
            out.write(REPLY_SEPARATOR)
        answer, _ = reply(gen, history, sampling, out)
        replies.append(answer)
        if not answer:  # an empty assistant turn can't be encoded (mistral-common refuses it): forget the question
            history.pop()
            err.write("(no reply; this turn is not kept)\n")
            continue
        history.append({"role": "assistant", "content": answer})
    return replies


def run_generate(source: Source, prompt: str, sampling: Sampling, *, dtype="auto", device="auto", out=None) -> str:
    """`finetune generate`: one prompt, the reply streamed to `out` (stdout)."""
    gen = load_generator(source, dtype=dtype, device=device)
    return reply(gen, [{"role": "user", "content": prompt}], sampling, out or sys.stdout)[0]


def run_chat(source: Source, sampling: Sampling, *, dtype="auto", device="auto", lines=None, out=None) -> list[str]:
    """`finetune chat`: the conversation loop on stdin/stdout; returns the replies."""
    gen = load_generator(source, dtype=dtype, device=device)
    return chat_loop(gen, sampling, lines or sys.stdin, out or sys.stdout, sys.stderr)
