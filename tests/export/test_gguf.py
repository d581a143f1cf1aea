"""`finetune export-gguf`: the file read back holds stock PEFT's merged weights in llama.cpp's layout, within each
type's error; both base layouts give the same file; bad input is one line, exit 2, nothing written; a kill leaves
no FILE; K-quants go through llama-quantize."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from signals import start_paused_after_first_write
from transformers import MixtralForCausalLM
from typer.testing import CliRunner

from finetune.cli import app
from finetune.moe import apply_lora, load_mixtral, save_adapter

ROOT = Path(__file__).resolve().parents[2]
# the largest |dequant - merged| each type may show, per element: half an ulp for floats, one block step for blocks
STEP = {"Q8_0": 127, "Q4_0": 8}
ULP = {"F32": 0.0, "F16": 2.0**-11, "BF16": 2.0**-8}


def export(*args: str):
    return CliRunner().invoke(app, ["export-gguf", *args])


def make_adapter(base: Path, out: Path, randomize_lora, seed: int = 2) -> Path:
    """Attention (q, k, v, o) + both expert projections + a trained router, all non-zero."""
    model, _ = load_mixtral(base, quantization="nf4", dtype=torch.float32)
    model = apply_lora(model, attention_targets=["q_proj", "k_proj", "v_proj", "o_proj"], r=4, alpha=8, dropout=0.0,
                       expert_targets=["gate_up_proj", "down_proj"], expert_r=2, expert_alpha=4,
                       train_router=True)  # fmt: skip
    randomize_lora(model, seed=seed, std=0.2)
    save_adapter(model, out)
    return out


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir, randomize_lora) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("gguf-adapter") / "adapter", randomize_lora)


@pytest.fixture(scope="module")
def peft_merged(tiny_model_dir, adapter) -> dict[str, torch.Tensor]:
    """The reference merge: stock transformers + stock PEFT's merge_and_unload, no code of ours."""
    from peft import PeftModel

    model = MixtralForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().state_dict()


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's interleaved q/k rows back to HF's rotate-half order."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_tensors(sd: dict[str, torch.Tensor], config) -> dict[str, np.ndarray]:
    """llama.cpp's tensor names for a Mixtral, from the HF (v5, fused) state dict, q and k in HF order."""
    f = config.intermediate_size
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}  # fmt: skip
    for i in range(config.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        names = {"attn_norm": "input_layernorm.weight", "ffn_norm": "post_attention_layernorm.weight",
                 "attn_q": "self_attn.q_proj.weight", "attn_k": "self_attn.k_proj.weight",
                 "attn_v": "self_attn.v_proj.weight", "attn_output": "self_attn.o_proj.weight",
                 "ffn_gate_inp": "mlp.gate.weight", "ffn_down_exps": "mlp.experts.down_proj"}  # fmt: skip
        out |= {f"{b}{k}.weight": sd[p + v] for k, v in names.items()}
        out[f"{b}ffn_gate_exps.weight"] = sd[p + "mlp.experts.gate_up_proj"][:, :f]
        out[f"{b}ffn_up_exps.weight"] = sd[p + "mlp.experts.gate_up_proj"][:, f:]
    return {k: v.float().numpy() for k, v in out.items()}


def read(path: Path, config) -> dict[str, tuple[str, tuple[int, ...], np.ndarray]]:
    """name -> (type, numpy-order shape, dequantised values with q/k in HF order), by gguf's reader."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        if t.name.endswith("attn_q.weight"):
            values = unpermute(values, config.num_attention_heads)
        elif t.name.endswith("attn_k.weight"):
            values = unpermute(values, config.num_key_value_heads)
        out[t.name] = (t.tensor_type.name, tuple(reversed(t.shape.tolist())), values)
    return out


def within(got: np.ndarray, ref: np.ndarray, kind: str) -> bool:
    if kind in STEP:
        blocks = np.abs(ref).reshape(*ref.shape[:-1], -1, 32).max(axis=-1, keepdims=True) / STEP[kind]
        bound = np.broadcast_to(blocks * 1.01, (*ref.shape[:-1], ref.shape[-1] // 32, 32)).reshape(ref.shape)
    else:
        bound = np.maximum(np.abs(ref) * ULP[kind], 2.0**-25 if kind == "F16" else 0.0)
    return bool(np.all(np.abs(got - ref) <= bound))


@pytest.mark.parametrize("kind", ["f16", "bf16", "q8_0", "q4_0"])
def test_read_back_is_stock_peft_merge_in_llama_cpp_layout(kind, tiny_model_dir, adapter, peft_merged, tmp_path):
    out = tmp_path / "model.gguf"
    result = export(str(adapter), "-o", str(out), "--base", str(tiny_model_dir), "--type", kind)
    assert result.exit_code == 0, result.output[-3000:]
    assert "verify:" in result.output and ": ok" in result.output
    config = MixtralForCausalLM.config_class.from_pretrained(str(tiny_model_dir))
    expected = expected_tensors(peft_merged, config)
    found = read(out, config)
    assert set(found) == set(expected)
    for name, ref in expected.items():
        qtype, shape, values = found[name]
        assert shape == ref.shape, name
        high = ref.ndim == 1 or name.endswith("ffn_gate_inp.weight")  # norms and router stay F32, as in llama.cpp
        if kind == "q4_0" and (name == "output.weight" or name.split(".")[-2] in ("attn_k", "attn_v")):
            want = "Q8_0"  # llama-quantize's higher precision for output and, with 8 experts, attn_k / attn_v
        else:
            want = "F32" if high else kind.upper()
        assert qtype == want, (name, qtype)
        assert within(values, ref, qtype), (name, float(np.abs(values - ref).max()))
    modelfile = (tmp_path / "model.Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf\n") and "[/INST]" in modelfile and 'stop "</s>"' in modelfile
    fields = gguf.GGUFReader(out).fields
    assert fields["llama.expert_count"].contents() == 8 and fields["llama.expert_used_count"].contents() == 2
    assert "[INST]" in fields["tokenizer.chat_template"].contents()


@pytest.mark.parametrize(("kind", "name", "change"), [
    ("f16", "blk.0.attn_q.weight", "value"),  # one F16 element far off
    ("f16", "blk.1.attn_norm.weight", "ulp"),  # F32 must be exact: one ulp is a failure
    ("q8_0", "blk.0.ffn_down_exps.weight", "value"),  # one int8 level of a block two steps off
])  # fmt: skip
def test_read_back_fails_on_a_changed_value(kind, name, change, tiny_model_dir, adapter, tmp_path):
    """The verification a user trusts must fail when one stored value is off by more than its type allows."""
    from finetune.export.gguf_layout import Layout
    from finetune.export.gguf_write import read_back, tensor_infos
    from finetune.export.merge import MergeStream

    out = tmp_path / "model.gguf"
    assert export(str(adapter), "-o", str(out), "--base", str(tiny_model_dir), "--type", kind).exit_code == 0
    qtype, _, _, offset = tensor_infos(out)[name]
    with open(out, "r+b") as f:
        if qtype == gguf.GGMLQuantizationType.Q8_0:  # block: float16 scale, then 32 int8 levels
            f.seek(offset + 2 + 5)
            level = np.frombuffer(f.read(1), dtype=np.int8)[0]
            f.seek(offset + 2 + 5)
            f.write(np.int8(level - 2 if level > 0 else level + 2).tobytes())
        else:
            dtype = np.float16 if qtype == gguf.GGMLQuantizationType.F16 else np.float32
            f.seek(offset + 3 * np.dtype(dtype).itemsize)
            value = np.frombuffer(f.read(np.dtype(dtype).itemsize), dtype=dtype)[0]
            changed = np.nextafter(value, dtype(np.inf)) if change == "ulp" else value + dtype(0.5)
            f.seek(offset + 3 * np.dtype(dtype).itemsize)
            f.write(np.asarray(changed, dtype=dtype).tobytes())
    stream = MergeStream(tiny_model_dir, adapter)
    config = MixtralForCausalLM.config_class.from_pretrained(str(tiny_model_dir)).to_dict()
    layout = Layout(config, kind)
    planned = layout.plan([spec for shard in stream.shards for spec in stream.specs(shard)])
    check = read_back(out, planned, layout, stream)
    assert not check.passed and len(check.problems) == 1, check.problems
    assert check.problems[0].startswith(name) and "beyond" in check.problems[0]
    assert "FAILED" in check.describe()


def to_fused(per_expert: Path, fused: Path, experts: int) -> None:
    """The same weights in v5's on-disk layout: gate_up_proj = [w1; w3] per expert, down_proj = w2, router mlp.gate."""
    shutil.copytree(per_expert, fused)
    (fused / "model.safetensors").unlink()
    sd = load_file(str(per_expert / "model.safetensors"))
    out = {}
    for key, tensor in sd.items():
        if ".experts." not in key:
            out[key.replace("block_sparse_moe.gate.", "mlp.gate.")] = tensor
    layers = {int(k.split(".")[2]) for k in sd if ".experts." in k}
    for i in layers:
        p = f"model.layers.{i}.block_sparse_moe.experts"
        w = {n: torch.stack([sd[f"{p}.{e}.{n}.weight"] for e in range(experts)]) for n in ("w1", "w2", "w3")}
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([w["w1"], w["w3"]], dim=1).contiguous()
        out[f"model.layers.{i}.mlp.experts.down_proj"] = w["w2"]
    save_file(out, str(fused / "model.safetensors"))


def test_both_base_layouts_give_the_same_file(tiny_model_dir, adapter, tmp_path):
    assert any(".experts.0.w1." in k for k in load_file(str(tiny_model_dir / "model.safetensors")))
    to_fused(tiny_model_dir, tmp_path / "fused", 8)
    files = {}
    for layout, base in (("per_expert", tiny_model_dir), ("fused", tmp_path / "fused")):
        files[layout] = tmp_path / f"{layout}.gguf"
        result = export(str(adapter), "-o", str(files[layout]), "--base", str(base), "--type", "q8_0")
        assert result.exit_code == 0, result.output[-3000:]
    a, b = (gguf.GGUFReader(files[k]) for k in ("per_expert", "fused"))
    tb = {t.name: t for t in b.tensors}
    assert {t.name for t in a.tensors} == set(tb)
    for t in a.tensors:
        assert t.tensor_type == tb[t.name].tensor_type and np.array_equal(
            np.asarray(t.data), np.asarray(tb[t.name].data)
        )
    skip = {"general.name"}
    for key, field in a.fields.items():
        if not key.startswith("GGUF.") and key not in skip:
            assert field.contents() == b.fields[key].contents(), key


def test_merged_folder_and_adapter_give_the_same_tensors(tiny_model_dir, adapter, tmp_path):
    from finetune.export.merge_run import merge

    merge(adapter, tmp_path / "merged", base=str(tiny_model_dir), verify=False, echo=lambda *_: None)
    for source, extra in ((tmp_path / "merged", []), (adapter, ["--base", str(tiny_model_dir)])):
        result = export(str(source), "-o", str(tmp_path / f"{source.name}.gguf"), *extra)
        assert result.exit_code == 0, result.output[-3000:]
    a, b = (gguf.GGUFReader(tmp_path / f"{n}.gguf") for n in ("merged", "adapter"))
    tb = {t.name: t for t in b.tensors}
    assert {t.name for t in a.tensors} == set(tb)
    assert all(np.array_equal(np.asarray(t.data), np.asarray(tb[t.name].data)) for t in a.tensors)


BAD = {
    "existing-out": "--overwrite",
    "bad-type": "is not supported",
    "not-mixtral": "not 'mixtral'",
    "disk-full": "GB free",
    "k-quant-without-llama-quantize": "llama-quantize (llama.cpp) is not on PATH",
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tiny_model_dir, adapter, tmp_path, monkeypatch):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    out, args = tmp_path / "out" / "model.gguf", ["--type", "q8_0"]
    if case == "existing-out":
        out.parent.mkdir()
        out.write_text("mine")
    elif case == "bad-type":
        args = ["--type", "q5_1"]
    elif case == "not-mixtral":
        config = (base / "config.json").read_text().replace('"model_type": "mixtral"', '"model_type": "llama"')
        (base / "config.json").write_text(config)
    elif case == "disk-full":
        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=1_000_000))
    else:
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
        args = ["--type", "q4_k_m"]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    result = export(str(adapter), "-o", str(out), "--base", str(base), *args)
    assert result.exit_code == 2, result.output[-2000:]
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and BAD[case] in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    if case == "disk-full":
        assert "needs about" in errors[0]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing written, nothing removed


def test_k_quant_runs_llama_quantize_on_the_verified_f16_file(tiny_model_dir, adapter, tmp_path, monkeypatch):
    """A stand-in llama-quantize on PATH records its arguments; the real one is exercised by bench/bench_gguf.py."""
    tool = tmp_path / "bin" / "llama-quantize"
    tool.parent.mkdir()
    tool.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\ncp "$1" "$2"\n')
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tool.parent}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "model-q4km.gguf"
    result = export(str(adapter), "-o", str(out), "--base", str(tiny_model_dir), "--type", "q4_k_m")
    assert result.exit_code == 0, result.output[-3000:]
    assert "llama-quantize" in result.output and "Q4_K_M" in result.output
    src, dst, kind = (tmp_path / "args").read_text().split()
    assert kind == "Q4_K_M" and Path(dst).name.startswith(".model-q4km.gguf") and not Path(src).exists()
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model-q4km")]


def test_a_kill_midway_leaves_no_file(tmp_path, raw_writer):
    """SIGKILL after the first tensor is in the hidden file (the export waits there: the kill cannot come late)."""
    from finetune.model.tiny import TinySpec, mixtral_config

    spec = TinySpec(hidden_size=512, intermediate_size=1792, layers=4, heads=8, kv_heads=2)
    base = raw_writer(tmp_path / "base", mixtral_config(spec), dtype=torch.float32, shards=2)
    shutil.copyfile(tiny_tokenizer(), base / "tokenizer.model")
    out = tmp_path / "model.gguf"
    proc = start_paused_after_first_write(
        "finetune.export.gguf_write:GGUFStream.write",
        ["export-gguf", str(base), "-o", str(out), "--type", "q4_0"],
        tmp_path,
        ROOT,
    )
    assert list(tmp_path.glob(".model.gguf.writing-*"))  # the hidden file, with a tensor in it
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and not (tmp_path / "model.Modelfile").exists()


def tiny_tokenizer() -> Path:
    from finetune.model.tiny import mistral_v1_tokenizer_file

    return mistral_v1_tokenizer_file()
