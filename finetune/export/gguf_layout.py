"""llama.cpp's Mixtral layout: tensor names, stacked experts, q/k permutation, tensor types and model metadata.

Learned from llama.cpp's own converter (`convert_hf_to_gguf.py`, `conversion/llama.py`), which writes Mixtral as the
`llama` architecture; tests/export/test_gguf_converter.py holds our file against that converter's, tensor by tensor
and key by key. Names come from the `gguf` package's own name map; only the expert stacks are ours to build: each
expert's w1 / w3 / w2 (or a slice of v5's fused gate_up_proj / down_proj) goes into its slot of
`blk.N.ffn_gate_exps` / `ffn_up_exps` / `ffn_down_exps` ([experts, rows, cols], expert slowest).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch

from finetune.errors import UserError
from finetune.export.shard_stream import TensorSpec
from finetune.moe.loading import FUSED_KEY, PER_EXPERT_KEY, PIECE_OF

Q = gguf.GGMLQuantizationType
TYPES = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}  # what gguf's numpy quantisers write
FILE_TYPES = {
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}
# K-quants: llama.cpp's llama-quantize writes them from our f16 file (its type names, as its CLI takes them)
K_QUANTS = {
    t: t.upper() for t in ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
}
EXPERT_TENSOR = {"gate": gguf.MODEL_TENSOR.FFN_GATE_EXP, "up": gguf.MODEL_TENSOR.FFN_UP_EXP,
                 "down": gguf.MODEL_TENSOR.FFN_DOWN_EXP}  # fmt: skip
ROUTER_SUFFIX = "." + gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.FFN_GATE_INP].rpartition(".")[2] + ".weight"  # F32 always


@dataclass(frozen=True)
class Planned:
    """One GGUF tensor: numpy-order shape (ggml reverses it on disk), its ggml type, and how many slots fill it."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    slots: int  # experts for a stack written one expert at a time, else 1

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) // block * size


def check_mixtral(config: dict, where: str) -> None:
    if config.get("model_type") != "mixtral":
        raise UserError(
            f"{where}: model_type is {config.get('model_type')!r}, not 'mixtral'; export-gguf writes "
            "Mixtral-architecture models only"
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise UserError(
            f"{where}: rope type {rope.get('rope_type')!r} is not supported by export-gguf (Mixtral: default)"
        )


class Layout:
    """Maps each merged HF tensor to its GGUF tensor(s), and chooses each GGUF tensor's type, for one config."""

    def __init__(self, config: dict, out_type: str):
        self.config, self.out_type = config, out_type
        self.layers, self.experts = config["num_hidden_layers"], config["num_local_experts"]
        self.heads, self.kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
        self.ffn = config["intermediate_size"]
        self.names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, self.layers)

    def _expert_name(self, layer: int, piece: str) -> str:
        return gguf.TENSOR_NAMES[EXPERT_TENSOR[piece]].format(bid=layer) + ".weight"

    def _plain_name(self, key: str) -> str:
        name = self.names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"tensor {key} has no place in llama.cpp's Mixtral layout; is this a Mixtral checkpoint?")
        return name

    def targets(self, spec: TensorSpec) -> list[tuple[str, tuple[int, ...], int]]:
        """(GGUF name, full numpy shape, slots) of what this HF tensor fills."""
        if m := PER_EXPERT_KEY.match(spec.name):
            return [
                (self._expert_name(int(m.group(1)), PIECE_OF[m.group(3)]), (self.experts, *spec.shape), self.experts)
            ]
        if m := FUSED_KEY.match(spec.name):
            layer, (e, rows, cols) = int(m.group(1)), spec.shape
            if m.group(2) == "down_proj":
                return [(self._expert_name(layer, "down"), (e, rows, cols), 1)]
            return [(self._expert_name(layer, p), (e, rows // 2, cols), 1) for p in ("gate", "up")]
        return [(self._plain_name(spec.name), spec.shape, 1)]

    def plan(self, specs: list[TensorSpec]) -> list[Planned]:
        """Every GGUF tensor of the file, in the order the base first mentions it."""
        planned: dict[str, Planned] = {}
        for spec in specs:
            for name, shape, slots in self.targets(spec):
                if name not in planned:
                    planned[name] = Planned(name, shape, self.qtype(name, shape), slots)
        return list(planned.values())

    def qtype(self, name: str, shape: tuple[int, ...]) -> gguf.GGMLQuantizationType:
        """The converter's rule: 1-D tensors, norms and the router stay F32; q4_0 keeps output, attn_k/v higher."""
        if len(shape) <= 1 or name.endswith("_norm.weight"):
            return Q.F32
        if name.endswith(ROUTER_SUFFIX):
            return Q.F32
        qtype = TYPES[self.out_type]
        higher = name == "output.weight" or (self.experts == 8 and name.split(".")[-2] in ("attn_k", "attn_v"))
        if self.out_type == "q4_0" and higher:  # as llama-quantize does for Q4_0 (output: Q6_K there, gguf has none)
            qtype = Q.Q8_0
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        return qtype if shape[-1] % block == 0 else Q.F16  # the converter's fallback when rows do not fill blocks

    def pieces(self, key: str, tensor: torch.Tensor) -> list[tuple[str, int, torch.Tensor]]:
        """(GGUF name, slot, data) for one merged HF tensor: q and k permuted, fused gate_up split into gate and up."""
        if m := PER_EXPERT_KEY.match(key):
            return [(self._expert_name(int(m.group(1)), PIECE_OF[m.group(3)]), int(m.group(2)), tensor)]
        if m := FUSED_KEY.match(key):
            layer = int(m.group(1))
            if m.group(2) == "down_proj":
                return [(self._expert_name(layer, "down"), 0, tensor)]
            half = tensor.shape[1] // 2  # rows are [gate; up], as transformers fuses w1 and w3
            return [(self._expert_name(layer, "gate"), 0, tensor[:, :half]),
                    (self._expert_name(layer, "up"), 0, tensor[:, half:])]  # fmt: skip
        name = self._plain_name(key)
        if key.endswith("self_attn.q_proj.weight"):
            tensor = permute(tensor, self.heads)
        elif key.endswith("self_attn.k_proj.weight"):
            tensor = permute(tensor, self.kv_heads)
        return [(name, 0, tensor)]


def permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotate-half q/k rows to llama.cpp's interleaved RoPE order: per head, (2, d/2) -> (d/2, 2)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def encode(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """The bytes of one tensor in `qtype`, by gguf's numpy quantisers, from float32 (or float16 as it is)."""
    if tensor.dtype not in (torch.float16, torch.float32):  # the converter's own rule: bf16 goes through float32
        tensor = tensor.float()
    return gguf.quants.quantize(tensor.contiguous().numpy(), qtype)


def add_metadata(writer: gguf.GGUFWriter, config: dict, out_type: str, name: str) -> None:
    """The hyperparameters llama.cpp reads for the `llama` architecture, with the converter's keys and types."""
    head_dim = config.get("head_dim")
    rope = config.get("rope_parameters") or {}
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_size_label(gguf.size_label(*writer.get_total_parameter_count()))
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 1e6)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_expert_count(config["num_local_experts"])
    writer.add_expert_used_count(config["num_experts_per_tok"])
    if head_dim is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(FILE_TYPES[out_type])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim or config["hidden_size"] // config["num_attention_heads"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
