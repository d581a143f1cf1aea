"""`finetune export-gguf`: a run, an adapter or a merged folder, streamed into one GGUF file for llama.cpp / Ollama.

The merge is `finetune merge`'s own stream (MergeStream): the base is read tensor by tensor, the adapter applied as
the merge applies it, and each result quantised into its place in the file. Every check on the input (type, output,
architecture, tokenizer, disk space) runs before a byte is written; the file is written under a hidden name beside
FILE, read back and compared with a second pass of the merge, and only then renamed, so a bad input, a failed check
or a kill leaves no FILE. K-quants are llama.cpp's own `llama-quantize` run on the verified f16 file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import gguf

from finetune.errors import UserError
from finetune.export.gguf_layout import K_QUANTS, TYPES, Layout, add_metadata, check_mixtral
from finetune.export.gguf_tokenizer import add_tokenizer, modelfile, tokenizer_folder
from finetune.export.gguf_write import GGUFStream, read_back
from finetune.export.merge import ONTO, MergeStream, Quantization

HEADER_ALLOWANCE = 4 * 2**20  # metadata: the vocabulary (~1 MB for 32k tokens), tensor infos, alignment
LLAMA_QUANTIZE_HELP = (
    "llama-quantize (llama.cpp) is not on PATH; build it with `git clone https://github.com/ggml-org/llama.cpp && "
    "cmake -S llama.cpp -B llama.cpp/build && cmake --build llama.cpp/build --target llama-quantize` and put "
    "llama.cpp/build/bin on PATH, or choose --type q8_0 / q4_0, which need no llama.cpp"
)


class GGUFVerificationError(RuntimeError):
    """The file read back does not hold the merged weights: exit 1 (not the user's input), FILE not written."""


def _inputs(source: Path, base: str | None, onto: str) -> tuple[Path, Path | None, Quantization, str]:
    """(base folder, adapter folder or None, quantisation for --onto dequantized, the name of the model)."""
    from finetune.export.merge_run import resolve_inputs, run_quantization

    is_adapter = (source / "adapter" / "adapter_config.json").is_file() or (source / "adapter_config.json").is_file()
    if not is_adapter and (source / "config.json").is_file():  # a merged (or any plain) Mixtral folder
        if base is not None or onto != "original":
            raise UserError(f"{source} is a model folder with no adapter; --base and --onto apply to runs and adapters")
        return source, None, Quantization(), source.name
    inputs = resolve_inputs(source, base)
    quantization = run_quantization(inputs) if onto == "dequantized" else Quantization()
    return inputs.base_dir, inputs.adapter_dir, quantization, f"{Path(inputs.base_name).name}-finetune"


def _check_output(out: Path, side: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise UserError(f"-o {out}: is a folder; give a file path such as model.gguf")
    for path in (out, side):
        if path.exists() and not overwrite:
            raise UserError(f"-o {out}: {path} already exists; pass --overwrite to replace it, or choose another name")


def _check_disk(out: Path, need: int) -> None:
    folder = out.parent.resolve()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if need > free:
        raise UserError(
            f"-o {out}: writing it needs about {need / 1e9:.2f} GB but {folder} has {free / 1e9:.2f} GB free; "
            "free some space or write to another disk"
        )


def _llama_quantize(tool: str, src: Path, dst: Path, kind: str, echo) -> None:
    echo(f"export-gguf: running llama.cpp's {tool} {src.name} -> {K_QUANTS[kind]}")
    result = subprocess.run([tool, str(src), str(dst), K_QUANTS[kind]], capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise GGUFVerificationError(f"llama-quantize failed ({result.returncode}): {tail[0]}")


def export_gguf(source: Path, out: Path, *, out_type: str = "f16", base: str | None = None, onto: str = "original",
                overwrite: bool = False, verify: bool = True, echo=print) -> dict:  # fmt: skip
    """Merge, write, verify and publish FILE (and FILE's Modelfile); returns a summary. UserError: nothing written."""
    source, out, kind = Path(source), Path(out), out_type.lower()
    if kind not in TYPES and kind not in K_QUANTS:
        raise UserError(f"--type {out_type!r} is not supported; use one of {', '.join([*TYPES, *K_QUANTS])}")
    if onto not in ONTO:
        raise UserError(f"--onto: {onto!r}; use one of {', '.join(ONTO)}")
    tool = None
    if kind in K_QUANTS and (tool := shutil.which("llama-quantize")) is None:
        raise UserError(f"--type {kind}: {LLAMA_QUANTIZE_HELP}")
    side = out.with_suffix(".Modelfile")
    _check_output(out, side, overwrite)
    if not source.exists():
        raise UserError(f"{source}: no such run, adapter or model folder")
    base_dir, adapter_dir, quantization, name = _inputs(source, base, onto)
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    check_mixtral(config, str(base_dir / "config.json"))
    tokenizer_dir = tokenizer_folder(adapter_dir, base_dir)
    write_type = "f16" if kind in K_QUANTS else kind
    stream = MergeStream(base_dir, adapter_dir, onto=onto, quantization=quantization)
    layout = Layout(config, write_type)
    planned = layout.plan([spec for shard in stream.shards for spec in stream.specs(shard)])
    size = sum(p.nbytes for p in planned) + HEADER_ALLOWANCE
    _check_disk(out, size * (2 if tool else 1))  # a K-quant needs the f16 file beside it while it runs

    echo(f"export-gguf: {adapter_dir or base_dir} onto {onto} {base_dir} -> {out} ({write_type}, ~{size / 1e9:.2f} GB)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.writing-{os.getpid()}"
    quantized = out.parent / f".{out.name}.{kind}-{os.getpid()}"
    try:
        added_template = []

        def metadata(writer: gguf.GGUFWriter) -> None:
            add_metadata(writer, config, write_type, name)
            added_template.append(add_tokenizer(writer, tokenizer_dir, config["vocab_size"]))

        file = GGUFStream(tmp, planned, metadata)
        try:
            for key, tensor in stream:
                for gguf_name, slot, data in layout.pieces(key, tensor):
                    file.write(gguf_name, slot, data)
                del tensor, data  # before the stream makes the next one: one merged tensor in memory at a time
            stream.finish()
        except BaseException:
            file.abort()
            raise
        file.close()
        if added_template[0]:
            echo("export-gguf: the tokenizer has no chat template; wrote Mixtral-8x7B-Instruct's")
        summary = {"file": str(out), "type": kind, "bytes": file.nbytes, "tensors": len(planned)}
        if verify:
            again = MergeStream(base_dir, adapter_dir, onto=onto, quantization=quantization)
            check = read_back(tmp, planned, layout, again)
            echo(check.describe())
            summary["verification"] = {"worst_share_of_bound": check.worst, "max_abs": check.max_abs}
            if not check.passed:
                raise GGUFVerificationError(check.describe() + f"; nothing was written to {out}")
        if tool is not None:
            _llama_quantize(tool, tmp, quantized, kind, echo)
            os.replace(quantized, tmp)
            summary["bytes"] = tmp.stat().st_size
        os.replace(tmp, out)
    finally:
        for leftover in (tmp, quantized):
            leftover.unlink(missing_ok=True)
    side.write_text(modelfile(out.name), encoding="utf-8")
    echo(f"wrote {out} ({summary['bytes'] / 1e9:.3f} GB) and {side.name}: ollama create NAME -f {side}")
    return summary
