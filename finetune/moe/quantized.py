"""Mixtral experts stored in NF4/FP4 (or int8, or plain), run one routed expert at a time.

`from_pretrained(..., load_in_4bit=True)` only quantises `nn.Linear`, so Mixtral's fused 3-D experts (97% of the
parameters) stay 16-bit. `QuantizedExperts` replaces `MixtralExperts` with the same forward signature and keeps every
expert's gate_up [2F, H] and down [H, F] weights quantised with bitsandbytes' functional API. The forward pass sorts
the routed (token, expert) pairs once, runs only experts that received tokens, dequantises one projection of one
expert at a time, and the backward pass dequantises again instead of keeping 16-bit weights alive (`_DequantLinear`).
Memory above the resident weights is therefore about one expert's weights plus activations, never the layer stack.

Quantised data and quantisation statistics are frozen parameters of integer dtype (float statistics are kept as
their int32 bit patterns). As parameters, FSDP2 shards them like any weight (each rank holds 1/N of the experts and
gathers one layer at a time); as integers, mixed precision never casts them and `.to(dtype)` leaves them alone.
A bitsandbytes `QuantState` is rebuilt from them on every dequantisation.
`held` makes a module that stores only some experts (one FSDP2 rank's shard, loaded as such; see `expert_shard`).
Optional per-expert LoRA factors (see `finetune.moe.lora`) are applied split-style inside the routed forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import bitsandbytes.functional as bnbf
import torch
from bitsandbytes.functional import QuantState
from torch import nn
from transformers.activations import ACT2FN

QUANTIZATIONS = ("nf4", "fp4", "int8", "none")
FOUR_BIT = ("nf4", "fp4")
PROJECTIONS = ("gate_up_proj", "down_proj")
NESTED_BLOCKSIZE = 256  # bitsandbytes' block size for double-quantised absmax
SHARED_STATS = ("quant_map",)  # statistics shared by all experts: not indexed by expert, kept whole


def dim0_shard(size: int, rank: int, world: int) -> range:
    """The rows of a dim-0 size `size` that FSDP2 gives `rank` of `world`: torch.chunk's split, ceil(size/world)
    rows per rank, the last ranks fewer or none (FSDP2 pads them)."""
    step = math.ceil(size / world)
    return range(min(size, rank * step), min(size, (rank + 1) * step))


def expert_shard(num_experts: int, rank: int, world: int) -> range:
    """The experts one FSDP2 rank holds (dim 0 of every expert tensor is the expert index)."""
    return dim0_shard(num_experts, rank, world)


def int8_kernel_dtype(device: torch.device) -> torch.dtype:
    """The input dtype bitsandbytes' `int8_vectorwise_quant` gets: float16 wherever a device kernel runs (the CUDA
    kernel refuses anything else: "A must be float16"), float32 on the CPU, whose pure-torch kernel takes it."""
    return torch.float32 if device.type == "cpu" else torch.float16


def int8_quantize(w: torch.Tensor, kernel_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8 codes and float32 row scales of a [rows, cols] weight, through bitsandbytes' kernel.

    Each row is first divided by a power of two that brings its absmax into [1, 2). That is exact in binary floating
    point, so float32 codes are unchanged, and float16 neither overflows (above 65504) nor flushes small rows to zero.
    The row scale is the row's exact absmax (the kernel's own is float16-rounded on CUDA). Float16 rounds ~1% of
    the codes by one step against float32, well inside int8's own error.
    """
    kernel_dtype = kernel_dtype or int8_kernel_dtype(w.device)
    absmax = w.detach().abs().amax(dim=1, keepdim=True).float()
    pow2 = torch.exp2(torch.floor(torch.log2(absmax.clamp(min=torch.finfo(torch.float32).tiny))))
    data, _, _ = bnbf.int8_vectorwise_quant((w.float() / pow2).to(kernel_dtype).contiguous())
    return data, absmax.view(-1)


@dataclass
class ExpertLoraFactors:
    """One projection's LoRA in PEFT ParamWrapper layout: A (E*r, in) expert-slowest, B (out, r*E) expert-fastest."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    num_experts: int

    def per_expert(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """(A_e [r, in] for each e, B_e [out, r] for each e); `unbind` keeps the backward to one stacked gradient."""
        a = self.lora_A.reshape(self.num_experts, -1, self.lora_A.shape[-1])
        b = self.lora_B.reshape(self.lora_B.shape[0], -1, self.num_experts).permute(2, 0, 1)
        return a.unbind(0), b.unbind(0)


class _DequantLinear(torch.autograd.Function):
    """y = x @ W_e^T with W_e dequantised on the fly; the backward dequantises again rather than saving W_e."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, experts: QuantizedExperts, proj: str, expert: int) -> torch.Tensor:
        weight = experts.dequantize(proj, expert, dtype=x.dtype)
        ctx.experts, ctx.proj, ctx.expert = experts, proj, expert
        return x @ weight.t()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        weight = ctx.experts.dequantize(ctx.proj, ctx.expert, dtype=grad_out.dtype)
        if weight.device.type == "cpu" and weight.dtype != torch.float32:
            # CPU bf16/fp16 GEMMs against an untransposed weight take a path ~30x slower (1.7 s vs 55 ms measured
            # for [64, 7168] x [7168, 1024]); one transposed copy of one expert is far cheaper.
            return torch.nn.functional.linear(grad_out, weight.t().contiguous()), None, None, None
        return grad_out @ weight, None, None, None


class QuantizedExperts(nn.Module):
    """Drop-in replacement for `MixtralExperts`: forward(hidden [T,H], top_k_index [T,k], top_k_weights [T,k]) -> [T,H].

    `quantization`: "nf4"/"fp4" (4-bit blockwise, optional double quantisation), "int8" (per-row absmax), or "none"
    (plain weights in `dtype`, same module and LoRA path). Weights are filled expert by expert with `set_expert`
    (or all at once with `load_stacked`); `is_complete()` says whether every slot was filled.

    `held` (default: all) is the range of experts this module stores: one FSDP2 rank's shard (`expert_shard`), so a
    rank never holds, reads or quantises the others. Such a module only computes once `finetune.distributed.sharding` has turned
    its storage into FSDP2 parameters of the full shape (`sharded_storage` / `adopt_sharded`).
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        quantization: str = "nf4",
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        blocksize: int = 64,
        double_quant: bool = True,
        hidden_act: str = "silu",
        held: range | None = None,
    ):
        super().__init__()
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
        self.num_experts = num_experts
        self.hidden_dim = hidden_size
        self.intermediate_dim = intermediate_size
        self.quantization = quantization
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.dtype = dtype
        self.act_fn = ACT2FN[hidden_act]
        self.shapes = {
            "gate_up_proj": (2 * intermediate_size, hidden_size),
            "down_proj": (hidden_size, intermediate_size),
        }
        self.held = range(num_experts) if held is None else held
        if self.held.step != 1 or self.held.start < 0 or self.held.stop > num_experts:
            raise ValueError(f"held must be a contiguous range of experts within 0..{num_experts}, got {self.held}")
        self._filled = {proj: [False] * len(self.held) for proj in PROJECTIONS}
        for proj in PROJECTIONS:
            self._allocate(proj, torch.device(device))

    # ---- storage -------------------------------------------------------------------------------------------------

    def _allocate(self, proj: str, device: torch.device) -> None:
        rows, cols = self.shapes[proj]
        n, e = rows * cols, len(self.held)

        def buf(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
            if dtype == torch.float32 and self.quantization != "none":  # statistics: bit patterns, see `_stat`
                dtype = torch.int32
            storage = torch.zeros(shape, dtype=dtype, device=device)
            self.register_parameter(f"{proj}_{name}", nn.Parameter(storage, requires_grad=False))

        if self.quantization in FOUR_BIT:
            blocks = math.ceil(n / self.blocksize)
            buf("data", (e, math.ceil(n / 2)), torch.uint8)
            buf("quant_map", (16,), torch.float32)
            if self.double_quant:
                buf("absmax", (e, blocks), torch.uint8)
                buf("nested_absmax", (e, math.ceil(blocks / NESTED_BLOCKSIZE)), torch.float32)
                buf("nested_code", (e, 256), torch.float32)
                buf("offset", (e,), torch.float32)
            else:
                buf("absmax", (e, blocks), torch.float32)
        elif self.quantization == "int8":
            buf("data", (e, rows, cols), torch.int8)
            buf("scale", (e, rows), torch.float32)
        else:
            buf("weight", (e, rows, cols), self.dtype)

    def set_expert(self, proj: str, expert: int, weight: torch.Tensor) -> None:
        """Quantise one expert's [out, in] weight into its slot (on this module's device); `expert` is its global index."""
        rows, cols = self.shapes[proj]
        if tuple(weight.shape) != (rows, cols):
            raise ValueError(f"{proj} of expert {expert}: expected shape {(rows, cols)}, got {tuple(weight.shape)}")
        if expert not in self.held:
            raise ValueError(f"{proj}: expert {expert} is not held here (this module stores experts {self.held})")
        slot = expert - self.held.start
        device = self._storage(proj, "data" if self.quantization != "none" else "weight").device
        w = weight.to(device)
        with torch.no_grad():
            if self.quantization in FOUR_BIT:
                packed, state = bnbf.quantize_4bit(
                    w.contiguous(),
                    blocksize=self.blocksize,
                    compress_statistics=self.double_quant,
                    quant_type=self.quantization,
                )
                self._storage(proj, "data")[slot].copy_(packed.view(-1))
                self._stat(proj, "quant_map").copy_(state.code)
                self._absmax(proj)[slot].copy_(state.absmax)
                if self.double_quant:
                    self._stat(proj, "nested_absmax")[slot].copy_(state.state2.absmax)
                    self._stat(proj, "nested_code")[slot].copy_(state.state2.code)
                    self._stat(proj, "offset")[slot].copy_(state.offset)
            elif self.quantization == "int8":
                data, scale = int8_quantize(w)
                self._storage(proj, "data")[slot].copy_(data)
                self._stat(proj, "scale")[slot].copy_(scale)
            else:
                self._storage(proj, "weight")[slot].copy_(w)
        self._filled[proj][slot] = True

    def load_stacked(self, proj: str, stacked: torch.Tensor) -> None:
        """Fill the held experts of `proj` from a fused [E, out, in] tensor, one expert at a time."""
        if stacked.shape[0] != self.num_experts:
            raise ValueError(f"{proj}: expected {self.num_experts} experts, got {stacked.shape[0]}")
        for e in self.held:
            self.set_expert(proj, e, stacked[e])

    def is_complete(self) -> bool:
        """Every held slot filled (under FSDP2 each rank checks its own shard)."""
        return all(all(flags) for flags in self._filled.values())

    def missing(self) -> list[str]:
        start = self.held.start
        return [f"{proj}[{start + e}]" for proj, flags in self._filled.items() for e, ok in enumerate(flags) if not ok]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        for proj in PROJECTIONS:
            if f"{prefix}{proj}_{'weight' if self.quantization == 'none' else 'data'}" in state_dict:
                self._filled[proj] = [True] * len(self.held)

    def full_nbytes(self) -> list[tuple[torch.Tensor, int]]:
        """(storage parameter, bytes it has with all experts): the whole stack's size, also from one rank's shard."""
        out = []
        for name, param in self.named_parameters(recurse=False):
            n = param.numel() * param.element_size()  # a DTensor's numel is already the full one
            shared = name.removeprefix("gate_up_proj_").removeprefix("down_proj_") in SHARED_STATS
            if not shared and not hasattr(param, "to_local"):
                n = math.prod(param.shape[1:]) * self.num_experts * param.element_size()
            out.append((param, n))
        return out

    # ---- FSDP2: a rank's shard loaded as such ------------------------------------------------------------------

    def sharded_storage(self, rank: int, world: int) -> dict[str, torch.Tensor]:
        """Hand this module's storage over for FSDP2 sharding without ever forming the full expert stack.

        Every storage parameter is replaced by a meta tensor of the full [E, ...] shape (what `fully_shard` shards:
        meta stays meta), and the returned tensors are this rank's dim-0 chunk of each, as `fully_shard` will lay
        them out: the held experts, and the rank's slice of the shared statistics. `adopt_sharded` puts them back.
        """
        if self.held != expert_shard(self.num_experts, rank, world):
            raise ValueError(f"experts {self.held} are not rank {rank}'s shard of {self.num_experts} over {world}")
        local = {}
        for name, param in list(self.named_parameters(recurse=False)):
            shared = name.removeprefix("gate_up_proj_").removeprefix("down_proj_") in SHARED_STATS
            full = param.shape if shared else (self.num_experts, *param.shape[1:])
            rows = dim0_shard(param.shape[0], rank, world)
            local[name] = param.data[rows.start : rows.stop] if shared else param.data
            meta = torch.empty(full, dtype=param.dtype, device="meta")
            self.register_parameter(name, nn.Parameter(meta, requires_grad=False))
        self.held = range(self.num_experts)  # from here on the module computes on FSDP2's gathered full storage
        return local

    def adopt_sharded(self, local: dict[str, torch.Tensor]) -> None:
        """After `fully_shard`: materialise this rank's shard of each (meta) DTensor parameter and fill it with the
        quantised data from `sharded_storage` (FSDP2's documented meta-device initialisation: `to_empty`, then
        write each local shard)."""
        device = next(iter(local.values())).device
        self.to_empty(device=device, recurse=False)
        with torch.no_grad():
            for name, tensor in local.items():
                target = getattr(self, name)
                target = target.to_local() if hasattr(target, "to_local") else target
                if tuple(target.shape) != tuple(tensor.shape):
                    raise RuntimeError(f"{name}: FSDP2's shard is {tuple(target.shape)}, ours {tuple(tensor.shape)}")
                target.copy_(tensor)
        self._filled = {proj: [True] * self.num_experts for proj in PROJECTIONS}

    def _storage(self, proj: str, name: str) -> torch.Tensor:
        return getattr(self, f"{proj}_{name}")

    def _absmax(self, proj: str) -> torch.Tensor:
        """Block absmax: uint8 codes under double quantisation, else float32 (stored as int32)."""
        return self._storage(proj, "absmax") if self.double_quant else self._stat(proj, "absmax")

    def _stat(self, proj: str, name: str) -> torch.Tensor:
        """A float32 statistic, viewed back from its int32 storage (writes through the view land in the storage)."""
        return self._storage(proj, name).view(torch.float32)

    def dequantize(self, proj: str, expert: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One expert's [out, in] weight in `dtype` (default: the module dtype). Allocates only that expert."""
        dtype = dtype or self.dtype
        rows, cols = self.shapes[proj]
        expert -= self.held.start  # the storage holds experts `held` (all of them once gathered by FSDP2)
        if self.quantization in FOUR_BIT:
            state2 = None
            offset = None
            if self.double_quant:
                state2 = QuantState(
                    absmax=self._stat(proj, "nested_absmax")[expert],
                    code=self._stat(proj, "nested_code")[expert],
                    blocksize=NESTED_BLOCKSIZE,
                    dtype=torch.float32,
                )
                offset = self._stat(proj, "offset")[expert]
            state = QuantState(
                absmax=self._absmax(proj)[expert],
                shape=torch.Size((rows, cols)),
                code=self._stat(proj, "quant_map"),
                blocksize=self.blocksize,
                quant_type=self.quantization,
                dtype=dtype,
                offset=offset,
                state2=state2,
            )
            return bnbf.dequantize_4bit(self._storage(proj, "data")[expert], state)
        if self.quantization == "int8":
            data, scale = self._storage(proj, "data")[expert], self._stat(proj, "scale")[expert]
            return bnbf.int8_vectorwise_dequant(data, scale).to(dtype)
        return self._storage(proj, "weight")[expert].to(dtype)

    def dequantized_stack(self, proj: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The [E, out, in] stack of the held experts (for references, tests and merges only; never in training)."""
        return torch.stack([self.dequantize(proj, e, dtype) for e in self.held])

    @property
    def num_base_params(self) -> int:
        return self.num_experts * sum(r * c for r, c in self.shapes.values())

    # ---- compute -------------------------------------------------------------------------------------------------

    def _linear(self, x: torch.Tensor, proj: str, expert: int) -> torch.Tensor:
        if self.quantization == "none":
            # buffer weight: autograd keeps a reference (no copy) and computes only the input gradient
            return x @ self._storage(proj, "weight")[expert].to(x.dtype).t()
        return _DequantLinear.apply(x, self, proj, expert)

    @staticmethod
    def _lora(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        """Split-style LoRA (x·A_e^T)·B_e^T·s, computed in the adapter dtype like PEFT, never forming B·A."""
        xa = x.to(a.dtype) @ a.t()
        return ((xa @ b.t()) * scaling).to(x.dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        expert_lora: dict[str, ExpertLoraFactors] | None = None,
    ) -> torch.Tensor:
        top_k = top_k_index.shape[1]
        flat_expert = top_k_index.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        token_idx = order // top_k
        counts = torch.bincount(flat_expert, minlength=self.num_experts).tolist()  # the one host sync
        x_sorted = hidden_states[token_idx]
        weights_sorted = top_k_weights.reshape(-1)[order]

        lora = {}
        for proj, factors in (expert_lora or {}).items():
            lora[proj] = (*factors.per_expert(), factors.scaling)

        outputs = []
        start = 0
        for expert, count in enumerate(counts[: self.num_experts]):
            if count == 0:
                continue
            x = x_sorted[start : start + count]
            start += count
            gate_up = self._linear(x, "gate_up_proj", expert)
            if "gate_up_proj" in lora:
                a, b, s = lora["gate_up_proj"]
                gate_up = gate_up + self._lora(x, a[expert], b[expert], s)
            gate, up = gate_up.chunk(2, dim=-1)
            h = self.act_fn(gate) * up
            y = self._linear(h, "down_proj", expert)
            if "down_proj" in lora:
                a, b, s = lora["down_proj"]
                y = y + self._lora(h, a[expert], b[expert], s)
            outputs.append(y)
        if not outputs:
            return torch.zeros_like(hidden_states)
        routed = sum(counts[: self.num_experts])  # index == num_experts marks a dropped slot, sorted last
        y_sorted = (torch.cat(outputs) * weights_sorted[:routed, None]).to(hidden_states.dtype)
        return torch.zeros_like(hidden_states).index_add(0, token_idx[:routed], y_sorted)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden={self.hidden_dim}, ffn={self.intermediate_dim}, "
            f"quantization={self.quantization}, blocksize={self.blocksize}, double_quant={self.double_quant}"
            + (f", held={self.held.start}..{self.held.stop - 1}" if len(self.held) != self.num_experts else "")
        )
