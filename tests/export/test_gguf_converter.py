"""Against llama.cpp's own converter: `finetune merge` + `convert_hf_to_gguf.py` on the merged folder, and our
`export-gguf` straight from the adapter, give the same tensors (bit for bit) and the same metadata values.

The converter is llama.cpp's, pinned to the copy vendored in one `llama-cpp-python` sdist from PyPI: the sdist is
fetched once into ~/.cache/finetune-tests/ (pip download, no build) and only the converter's files are unpacked.
It runs as a subprocess with its own vendored gguf-py, as llama.cpp's users run it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import gguf
import numpy as np
import pytest
from test_gguf import make_adapter  # the same adapter kind the layout tests export
from typer.testing import CliRunner

from finetune.cli import app

LLAMA_CPP_PYTHON = "0.3.36"  # vendors llama.cpp's converter (convert_hf_to_gguf.py + conversion/ + gguf-py)
CACHE = Path(os.environ.get("FINETUNE_TEST_CACHE", Path.home() / ".cache" / "finetune-tests"))
VENDOR = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/")
# keys that name the file, not the model: the converter takes general.name from the folder's name, and tags and
# base_model.* from the model card (README.md) that `finetune merge` writes; llama.cpp reads none of them to run
PROVENANCE = {"general.name"}
CARD = ("general.tags", "general.base_model.")


@pytest.fixture(scope="session")
def converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py from the pinned sdist, unpacked once and reused."""
    target = CACHE / f"llama-cpp-converter-{LLAMA_CPP_PYTHON}"
    if (target / "convert_hf_to_gguf.py").is_file():
        return target / "convert_hf_to_gguf.py"
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        fetch = [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "--no-deps",
                 "--no-binary", ":all:", "-d", str(CACHE)]  # fmt: skip
        result = subprocess.run(fetch, capture_output=True, text=True, timeout=600)
        assert sdist.is_file(), result.stdout[-2000:] + result.stderr[-2000:]
    partial = CACHE / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        wanted = [m for m in tar.getmembers() if m.name.removeprefix(VENDOR).startswith(MEMBERS) and m.isfile()]
        for member in wanted:
            member.name = member.name.removeprefix(VENDOR)
            tar.extract(member, partial, filter="data")
    os.replace(partial, target)
    return target / "convert_hf_to_gguf.py"


def convert(converter: Path, folder: Path, out: Path, kind: str) -> None:
    result = subprocess.run([sys.executable, str(converter), str(folder), "--outtype", kind, "--outfile", str(out)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def contents(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tiny_model_dir, randomize_lora) -> tuple[Path, Path, Path]:
    """(base with a chat template, an adapter for it, `finetune merge` of the two)."""
    from finetune.export.gguf_tokenizer import MIXTRAL_CHAT_TEMPLATE
    from finetune.export.merge_run import merge

    root = tmp_path_factory.mktemp("gguf-oracle")
    base = root / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "chat_template.jinja").write_text(MIXTRAL_CHAT_TEMPLATE)  # so both sides have one to carry over
    adapter = make_adapter(base, root / "adapter", randomize_lora, seed=5)
    merge(adapter, root / "merged", base=str(base), verify=False, echo=lambda *_: None)
    return base, adapter, root / "merged"


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_same_tensors_and_metadata_as_llama_cpp_converter(kind, converter, merged, tmp_path):
    base, adapter, merged_dir = merged
    theirs, ours = tmp_path / "converter.gguf", tmp_path / "ours.gguf"
    convert(converter, merged_dir, theirs, kind)
    result = CliRunner().invoke(
        app, ["export-gguf", str(adapter), "-o", str(ours), "--base", str(base), "--type", kind]
    )
    assert result.exit_code == 0, result.output[-3000:]

    their_fields, their_tensors = contents(theirs)
    our_fields, our_tensors = contents(ours)
    assert set(our_tensors) == set(their_tensors)
    for name, t in their_tensors.items():
        mine = our_tensors[name]
        assert (mine.tensor_type, mine.shape.tolist()) == (t.tensor_type, t.shape.tolist()), name
        assert np.asarray(mine.data).tobytes() == np.asarray(t.data).tobytes(), name  # bit for bit
    assert set(our_fields) == {key for key in their_fields if not key.startswith(CARD)}
    for key, value in their_fields.items():
        if key not in PROVENANCE and not key.startswith(CARD):
            assert our_fields[key] == value, key
    for key in ("llama.expert_count", "llama.expert_used_count", "tokenizer.chat_template", "tokenizer.ggml.tokens"):
        assert key in their_fields  # the comparison covered what llama.cpp reads for a Mixtral
