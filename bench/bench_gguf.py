"""GGUF benchmark: our f16 file through llama.cpp itself against transformers on the merged folder, and the peak
memory of `finetune export-gguf` against `finetune merge` + llama.cpp's converter on a Mixtral-shaped model.

llama.cpp's runtime is `llama-cpp-python`, built here from its pinned sdist (CPU only, a few minutes, once; cached in
~/.cache/finetune-bench/). Logits: max |llama.cpp - transformers| / max |transformers| per prompt on the tiny merged
model (f16 must be within 1e-2), and greedy generations token for token. Memory: each side in its own process, peak
(VmHWM) above its level after imports; the bound is 2 x (largest expert stack + adapter).

    python bench/bench_gguf.py                     # tiny logits + mini (hidden 1024, ffn 3584, 4 layers) memory
    python bench/bench_gguf.py --layers 2 --out bench/results/gguf.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import environment, fmt_bytes, markdown_table, write_json

LLAMA_CPP_PYTHON = "0.3.36"  # the same pin as tests/export/test_gguf_converter.py
SDISTS = Path.home() / ".cache" / "finetune-tests"
RUNTIME = Path.home() / ".cache" / "finetune-bench" / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["[INST] What is a mixture of experts? [/INST]", "The capital of France is", "def fibonacci(n):"]
NEW_TOKENS = 16

LLAMA_SIDE = """
import json, sys
import numpy as np
from llama_cpp import Llama
path, prompts, new, out = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
llm = Llama(model_path=path, logits_all=True, n_ctx=512, n_threads=2, verbose=False)
result, arrays = [], {}
for i, text in enumerate(prompts):
    ids = llm.tokenize(text.encode(), add_bos=True, special=True)
    llm.reset()
    llm.eval(ids)
    arrays[f"logits{i}"] = np.array(llm.scores[: len(ids)])
    greedy = []
    for _ in range(new):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        greedy.append(token)
        llm.eval([token])
    result.append({"ids": ids, "greedy": greedy})
np.savez(out, **arrays)
llm.close()
print(json.dumps(result))
"""

MEASURE = """
import json, runpy, sys, time
from pathlib import Path
import psutil

def hwm():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

side, args = sys.argv[1], sys.argv[2:]
import torch, transformers, numpy
if side == "export-gguf":
    from finetune.export.gguf_export import export_gguf
elif side == "merge":
    from finetune.export.merge import merge_shards
start, t0 = psutil.Process().memory_info().rss, time.perf_counter()
if side == "export-gguf":
    export_gguf(Path(args[0]), Path(args[1]), base=args[2], out_type="f16", echo=lambda *a: None)
elif side == "merge":
    Path(args[2]).mkdir()
    merge_shards(Path(args[0]), Path(args[1]), Path(args[2]))
else:  # llama.cpp's converter, as its own script (it imports its vendored gguf-py itself)
    sys.argv = [args[0], args[1], "--outtype", "f16", "--outfile", args[2]]
    sys.path.insert(0, str(Path(args[0]).parent))
    runpy.run_path(args[0], run_name="__main__")
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_above_start": hwm() - start}))
"""


def sdist() -> Path:
    path = SDISTS / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not path.is_file():
        SDISTS.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "--no-deps",
                        "--no-binary", ":all:", "-d", str(SDISTS)], check=True)  # fmt: skip
    return path


def converter() -> Path:
    """The converter files of the pinned sdist (unpacked as the test fixture does, or here)."""
    target = SDISTS / f"llama-cpp-converter-{LLAMA_CPP_PYTHON}"
    if not (target / "convert_hf_to_gguf.py").is_file():
        import tarfile

        vendor = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        with tarfile.open(sdist()) as tar:
            for m in tar.getmembers():
                name = m.name.removeprefix(vendor)
                if m.isfile() and name.startswith(("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/")):
                    m.name = name
                    tar.extract(m, target, filter="data")
    return target / "convert_hf_to_gguf.py"


def build_runtime() -> Path:
    """llama-cpp-python built from the sdist into RUNTIME (CPU only); reused when it imports."""
    env = {**os.environ, "PYTHONPATH": str(RUNTIME)}
    if subprocess.run([sys.executable, "-c", "import llama_cpp"], env=env, capture_output=True).returncode == 0:
        return RUNTIME
    cmake = "-DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF " \
            "-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF"  # fmt: skip
    print(f"building llama-cpp-python {LLAMA_CPP_PYTHON} from its sdist (CPU, -j2; several minutes) ...")
    build_env = {**os.environ, "CMAKE_ARGS": cmake, "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(RUNTIME)]
    subprocess.run([*pip, "--no-cache-dir", str(sdist())], env=build_env, check=True)
    subprocess.run([*pip, "diskcache>=5.6.1"], check=True)  # its one dependency the venv lacks
    return RUNTIME


def make_adapter(base: Path, out: Path, r: int, expert_r: int, std: float) -> Path:
    from finetune.moe import apply_lora, load_mixtral, save_adapter
    from tests.conftest import random_lora_

    model, _ = load_mixtral(base, quantization="nf4", dtype=torch.float32)
    model = apply_lora(model, attention_targets=["q_proj", "k_proj", "v_proj", "o_proj"], r=r, alpha=2 * r,
                       dropout=0.0, expert_targets=["gate_up_proj", "down_proj"], expert_r=expert_r,
                       expert_alpha=2 * expert_r, train_router=True)  # fmt: skip
    random_lora_(model, seed=0, std=std)
    save_adapter(model, out)
    return out


def logits_check(root: Path) -> dict:
    from transformers import AutoTokenizer, MixtralForCausalLM

    from finetune.export.gguf_export import export_gguf
    from finetune.export.merge_run import merge
    from finetune.model.tiny import TinySpec, write_tiny_model

    base = write_tiny_model(root / "tiny", TinySpec())
    adapter = make_adapter(base, root / "tiny-adapter", r=4, expert_r=2, std=0.05)
    merge(adapter, root / "tiny-merged", base=str(base), echo=lambda *_: None)
    model = MixtralForCausalLM.from_pretrained(str(root / "tiny-merged"), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(root / "tiny-merged"))
    runtime, out = build_runtime(), {}
    for kind in ("f16", "q8_0"):
        path = root / f"tiny-{kind}.gguf"
        export_gguf(adapter, path, base=str(base), out_type=kind, echo=lambda *_: None)
        arrays = root / f"llama-{kind}.npz"
        result = subprocess.run([sys.executable, "-c", LLAMA_SIDE, str(path), json.dumps(PROMPTS), str(NEW_TOKENS),
                                 str(arrays)], env={**os.environ, "PYTHONPATH": str(runtime)}, capture_output=True,
                                text=True, timeout=600)  # fmt: skip
        if result.returncode != 0:
            raise SystemExit(f"llama.cpp side failed:\n{result.stderr[-3000:]}")
        llama, saved, rows = json.loads(result.stdout.strip().splitlines()[-1]), np.load(arrays), []
        for i, (text, side) in enumerate(zip(PROMPTS, llama, strict=True)):
            hf_ids = tokenizer(text)["input_ids"]
            ids = torch.tensor([side["ids"]])
            with torch.no_grad():
                ref = model(ids).logits[0].numpy()
                greedy = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
            greedy = greedy[0, ids.shape[1] :].tolist()
            diff = float(np.abs(saved[f"logits{i}"] - ref).max() / np.abs(ref).max())
            rows.append({"prompt": text, "tokens": len(side["ids"]), "same_token_ids_as_hf_tokenizer":
                         side["ids"] == hf_ids, "max_relative_logit_difference": diff,
                         "greedy_tokens_matching": sum(a == b for a, b in zip(greedy, side["greedy"], strict=True)),
                         "greedy_tokens": NEW_TOKENS})  # fmt: skip
        out[kind] = rows
    return out


def memory_check(root: Path, layers: int) -> dict:
    from finetune.model.tiny import TinySpec, mistral_v1_tokenizer_file, mixtral_config
    from tests.conftest import write_raw_mixtral

    spec = TinySpec(hidden_size=1024, intermediate_size=3584, layers=layers, heads=8, kv_heads=2)
    base = write_raw_mixtral(root / "mini", mixtral_config(spec), dtype=torch.bfloat16, shards=layers * 2)
    (base / "tokenizer.model").write_bytes(mistral_v1_tokenizer_file().read_bytes())
    adapter = make_adapter(base, root / "mini-adapter", r=16, expert_r=8, std=0.02)
    sides = {
        "export-gguf": [str(adapter), str(root / "ours.gguf"), str(base)],
        "merge": [str(base), str(adapter), str(root / "merged")],
    }
    results = {name: run(name, args) for name, args in sides.items()}
    for name in ("tokenizer.model",):  # the converter reads the tokenizer from the merged folder
        (root / "merged" / name).write_bytes((base / name).read_bytes())
    config = json.loads((base / "config.json").read_text())  # the converter picks its model class from architectures
    (root / "merged" / "config.json").write_text(json.dumps({**config, "architectures": ["MixtralForCausalLM"]}))
    results["converter"] = run("converter", [str(converter()), str(root / "merged"), str(root / "theirs.gguf")])
    stack = spec.experts * spec.intermediate_size * spec.hidden_size * 2  # one [E, ffn, hidden] bf16 stack
    adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    return {
        "shape": {"hidden": 1024, "ffn": 3584, "layers": layers, "experts": 8, "dtype": "bfloat16"},
        "checkpoint_bytes": sum(p.stat().st_size for p in base.glob("*.safetensors")),
        "largest_expert_stack_bytes": stack,
        "adapter_bytes": adapter_bytes,
        "bound_bytes": 2 * (stack + adapter_bytes),
        "gguf_bytes": (root / "ours.gguf").stat().st_size,
        "results": results,
    }


def run(side: str, args: list[str]) -> dict:
    result = subprocess.run([sys.executable, "-c", MEASURE, side, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=3600)  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"{side} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def sizes(root: Path) -> dict:
    from finetune.export.gguf_export import export_gguf

    out = {}
    for kind in ("f16", "bf16", "q8_0", "q4_0"):
        path = root / f"mini-{kind}.gguf"
        export_gguf(root / "mini-adapter", path, base=str(root / "mini"), out_type=kind, echo=lambda *_: None)
        out[kind] = path.stat().st_size
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "gguf.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        logits = logits_check(root)
        memory = memory_check(root, args.layers)
        memory["file_bytes_by_type"] = sizes(root)
    rows = [[kind, r["prompt"][:32], f"{r['max_relative_logit_difference']:.2e}",
             f"{r['greedy_tokens_matching']}/{r['greedy_tokens']}", str(r["same_token_ids_as_hf_tokenizer"])]
            for kind, table in logits.items() for r in table]  # fmt: skip
    print(markdown_table(["gguf", "prompt", "max rel logit diff", "greedy match", "same ids"], rows))
    res = memory["results"]
    print(markdown_table(["process", "peak above start", "wall time"], [
        [name, fmt_bytes(r["peak_above_start"]), f"{r['seconds']:.1f} s"] for name, r in res.items()
    ]))  # fmt: skip
    print(f"bound 2 x (expert stack {fmt_bytes(memory['largest_expert_stack_bytes'])} + adapter "
          f"{fmt_bytes(memory['adapter_bytes'])}) = {fmt_bytes(memory['bound_bytes'])}")  # fmt: skip
    print("file sizes:", {k: fmt_bytes(v) for k, v in memory["file_bytes_by_type"].items()})
    f16_ok = all(r["max_relative_logit_difference"] <= 1e-2 for r in logits["f16"])
    greedy_ok = all(r["greedy_tokens_matching"] == r["greedy_tokens"] for r in logits["f16"])
    memory_ok = res["export-gguf"]["peak_above_start"] <= memory["bound_bytes"]
    payload = {
        "command": "python bench/bench_gguf.py " + " ".join(sys.argv[1:]),
        "llama_cpp_python": LLAMA_CPP_PYTHON,
        "logits": logits,
        "memory": memory,
        "passed": {
            "f16_logits_within_1e-2": f16_ok,
            "f16_greedy_identical": greedy_ok,
            "memory_within_bound": memory_ok,
        },
        "measured_at": time.strftime("%Y-%m-%d %H:%M"),
        "environment": environment(),
    }
    write_json(args.out, payload)
    print(f"wrote {args.out}; passed: {payload['passed']}")
    if not (f16_ok and memory_ok):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
