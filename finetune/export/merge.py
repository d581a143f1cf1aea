"""`finetune merge`: add a run's LoRA deltas to the base checkpoint, shard by shard, in the base's own layout.

The base is read one tensor at a time and each merged tensor is written straight into its place in an output shard
(planned from the input shard's header), so peak memory is about one tensor plus the adapter, never the model. A fused gate_up delta is split back into each expert's
w1 (gate rows first) and w3; down_proj goes to w2; a trained router replaces the base router. Every adapter tensor
must land exactly once, or the merge stops naming it. With `onto="dequantized"` the delta is added to
dequant(quant(W)) under the run's own quantisation settings: exactly the function QLoRA trained.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bitsandbytes.functional as bnbf
import torch
from safetensors import safe_open

from finetune.errors import UserError
from finetune.export.lora_deltas import AdapterDeltas, canonical_key, read_adapter
from finetune.export.shard_stream import StreamingShard, TensorSpec, read_specs
from finetune.moe.loading import ATTENTION_PROJECTIONS, FUSED_KEY, PER_EXPERT_KEY, PIECE_OF, keys_of, shard_files
from finetune.moe.quantized import FOUR_BIT, QuantizedExperts

ONTO = ("original", "dequantized")


@dataclass(frozen=True)
class Quantization:
    """How the run stored the base (read from its recipe and metrics), for `onto="dequantized"`."""

    kind: str = "nf4"  # nf4 | fp4 | int8 | none
    double_quant: bool = True
    blocksize: int = 64
    dtype: torch.dtype = torch.float32  # the run's compute dtype: weights were cast to it before quantising


class Requantizer:
    """dequant(quant(W)) exactly as the loader quantised W: experts through QuantizedExperts, attention through bnb."""

    def __init__(self, q: Quantization, hidden: int, ffn: int):
        self.q = q
        self.experts = QuantizedExperts(
            1, hidden, ffn, quantization=q.kind, dtype=q.dtype, blocksize=q.blocksize, double_quant=q.double_quant
        )

    def expert(self, proj: str, weight: torch.Tensor) -> torch.Tensor:
        self.experts.set_expert(proj, 0, weight.to(self.q.dtype))
        return self.experts.dequantize(proj, 0, self.q.dtype).float()

    def attention(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.to(self.q.dtype).contiguous()
        if self.q.kind in FOUR_BIT:
            packed, state = bnbf.quantize_4bit(
                w, blocksize=self.q.blocksize, compress_statistics=self.q.double_quant, quant_type=self.q.kind
            )
            return bnbf.dequantize_4bit(packed, state).float()
        if self.q.kind == "int8":  # as bitsandbytes' Int8Params stores it: fp16, then per-row absmax int8
            data, scale, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16))
            return bnbf.int8_vectorwise_dequant(data, scale).float()
        return w.float()


class ShardWriter:
    """Output shards planned from each input shard's header (split at `max_bytes`), filled tensor by tensor."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.parts: list[StreamingShard] = []
        self.open: dict[str, StreamingShard] = {}
        self.planned: set[str] = set()
        self.total = 0

    def plan(self, specs: list[TensorSpec]) -> None:
        chunk: list[TensorSpec] = []
        size = 0
        for spec in specs:
            if spec.name in self.planned:
                raise UserError(f"the base checkpoint holds tensor {spec.name} twice (in two shards)")
            self.planned.add(spec.name)
            if chunk and size + spec.nbytes > self.max_bytes:
                self._start(chunk)
                chunk, size = [], 0
            chunk.append(spec)
            size += spec.nbytes
        if chunk:
            self._start(chunk)

    def _start(self, specs: list[TensorSpec]) -> None:
        shard = StreamingShard(self.folder / f"part-{len(self.parts):05d}.safetensors", specs)
        self.parts.append(shard)
        self.open.update({spec.name: shard for spec in specs})
        self.total += shard.nbytes

    def add(self, name: str, tensor: torch.Tensor) -> None:
        shard = self.open.pop(name)
        shard.write(name, tensor)
        if not shard.pending:
            shard.close()

    def finish(self) -> list[str]:
        """Name the shards as transformers does and write the index (when there is more than one)."""
        if self.open:
            raise UserError(f"the merge did not produce {len(self.open)} tensor(s): {sorted(self.open)[:5]}")
        if len(self.parts) == 1:
            self.parts[0].path.rename(self.folder / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for i, shard in enumerate(self.parts):
            name = f"model-{i + 1:05d}-of-{len(self.parts):05d}.safetensors"
            shard.path.rename(self.folder / name)
            weight_map.update(dict.fromkeys(shard.specs, name))
            names.append(name)
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        return names


class DeltaApplier:
    """Turns each base tensor into its merged form, counting every use of every adapter tensor."""

    def __init__(self, deltas: AdapterDeltas, config: dict, onto: str, q: Quantization, dtype: torch.dtype | None):
        self.deltas, self.onto, self.dtype = deltas, onto, dtype
        self.ffn, self.num_experts = config["intermediate_size"], config["num_local_experts"]
        self.requant = Requantizer(q, config["hidden_size"], self.ffn) if onto == "dequantized" else None
        self.quantized_attention = onto == "dequantized" and q.kind != "none"
        self.used: dict[object, str] = {}
        self.pending: dict[tuple[int, int], dict[str, tuple[str, torch.Tensor]]] = {}

    def _use(self, item: object, base_key: str) -> None:
        if item in self.used:
            raise UserError(
                f"adapter tensor {self._name(item)} would be applied twice ({self.used[item]} and {base_key}); "
                "the base checkpoint holds that weight twice"
            )
        self.used[item] = base_key

    def _name(self, item: object) -> str:
        key = item[:2] if isinstance(item, tuple) and len(item) == 4 else item
        return self.deltas.source.get(key, str(item))

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.dtype) if self.dtype is not None and tensor.is_floating_point() else tensor

    def _out(self, merged: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return merged.to(self.dtype or like.dtype)

    def _fit(self, base_key: str, base: torch.Tensor, delta: torch.Tensor, item: object) -> torch.Tensor:
        if tuple(delta.shape) != tuple(base.shape):
            raise UserError(
                f"adapter tensor {self._name(item)} does not fit base tensor {base_key}: delta {tuple(delta.shape)} "
                f"vs base {tuple(base.shape)}; was the adapter trained for another base model?"
            )
        return delta

    def apply(self, key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The output tensors for one base tensor: usually one, none while a w1 waits for its w3, two when it comes."""
        ckey = canonical_key(key)
        if m := PER_EXPERT_KEY.match(key):
            return self._per_expert(key, tensor, int(m.group(1)), int(m.group(2)), PIECE_OF[m.group(3)])
        if m := FUSED_KEY.match(key):
            return [(key, self._fused(key, tensor, int(m.group(1)), m.group(2)))]
        if ckey in self.deltas.replaced:
            new = self.deltas.replaced[ckey]
            self._use(ckey, key)
            return [(key, self._out(self._fit(key, tensor, new, ckey), tensor))]
        # dequantized: every tensor the run quantised becomes dequant(quant(W)), adapted or not
        requantize = self.quantized_attention and any(f".self_attn.{p}." in key for p in ATTENTION_PROJECTIONS)
        if ckey in self.deltas.linear:
            self._use(ckey, key)
            delta = self._fit(key, tensor, self.deltas.linear[ckey].delta(), ckey)
            base = self.requant.attention(tensor) if requantize else tensor
            return [(key, self._out(delta.add_(base), tensor))]  # into the fresh delta: no float32 copy of W
        if requantize:
            return [(key, self._out(self.requant.attention(tensor), tensor))]
        return [(key, self._cast(tensor))]

    def _expert_weight(self, proj: str, weight: torch.Tensor) -> torch.Tensor:
        return self.requant.expert(proj, weight) if self.requant is not None else weight.float()

    def _expert_delta(self, layer: int, proj: str, expert: int, piece: str, key: str) -> torch.Tensor | None:
        d = self.deltas.experts.get((layer, proj))
        if d is None:
            return None
        self._use((layer, proj, expert, piece), key)
        # gate_up rows are [gate; up], as transformers fuses w1 and w3
        rows = {"gate": slice(None, self.ffn), "up": slice(self.ffn, None)}.get(piece, slice(None))
        return d.delta(expert, rows)

    def _per_expert(self, key, tensor, layer, expert, piece) -> list[tuple[str, torch.Tensor]]:
        if piece == "down":
            delta = self._expert_delta(layer, "down_proj", expert, "down", key)
            if delta is None and self.requant is None:
                return [(key, self._cast(tensor))]
            base = self._expert_weight("down_proj", tensor)
            merged = base if delta is None else self._fit(key, base, delta, (layer, "down_proj")).add_(base)
            return [(key, self._out(merged, tensor))]
        if self.requant is None:  # each half on its own: no need to wait for the other
            delta = self._expert_delta(layer, "gate_up_proj", expert, piece, key)
            if delta is None:
                return [(key, self._cast(tensor))]
            return [(key, self._out(self._fit(key, tensor, delta, (layer, "gate_up_proj")).add_(tensor), tensor))]
        # dequantized: the loader quantised [w1; w3] as one tensor, so requantise them together
        halves = self.pending.setdefault((layer, expert), {})
        halves[piece] = (key, tensor)
        if len(halves) < 2:
            return []
        del self.pending[(layer, expert)]
        (gate_key, gate), (up_key, up) = halves["gate"], halves["up"]
        both = self._expert_weight("gate_up_proj", torch.cat([gate, up]))
        out = []
        for name, piece_key, original, rows in (
            ("gate", gate_key, gate, both[: self.ffn]),
            ("up", up_key, up, both[self.ffn :]),
        ):
            delta = self._expert_delta(layer, "gate_up_proj", expert, name, piece_key)
            merged = rows if delta is None else self._fit(piece_key, rows, delta, (layer, "gate_up_proj")).add_(rows)
            out.append((piece_key, self._out(merged, original)))
        return out

    def _fused(self, key: str, stacked: torch.Tensor, layer: int, proj: str) -> torch.Tensor:
        pieces = ("gate", "up") if proj == "gate_up_proj" else ("down",)
        out = torch.empty(stacked.shape, dtype=self.dtype or stacked.dtype)
        for e in range(stacked.shape[0]):  # one expert at a time: never the whole stack in float32
            base = self._expert_weight(proj, stacked[e])
            d = self.deltas.experts.get((layer, proj))
            if d is not None:
                for piece in pieces:
                    self._use((layer, proj, e, piece), key)
                base = self._fit(f"{key}[{e}]", base, d.delta(e), (layer, proj)).add_(base)
            out[e] = base.to(out.dtype)
        return out

    def unused(self) -> list[str]:
        """Adapter tensors (or expert slices of them) that matched nothing in the base."""
        expected: set[object] = set(self.deltas.linear) | set(self.deltas.replaced)
        for layer, proj in self.deltas.experts:
            pieces = ("gate", "up") if proj == "gate_up_proj" else ("down",)
            expected |= {(layer, proj, e, p) for e in range(self.num_experts) for p in pieces}
        missing = expected - set(self.used)
        return sorted({self._name(item) for item in missing})


class MergeStream:
    """The merged tensors of base + adapter, base shard by base shard: the one merge that every writer consumes.

    `finetune merge` writes them into safetensors shards, `finetune export-gguf` into a GGUF file; both iterate
    `tensors(shard)` for each of `shards` and call `finish()`, which fails if any adapter tensor found no place.
    With no adapter (a merged folder) every tensor passes through unchanged.
    """

    def __init__(self, base_dir: Path, adapter_dir: Path | None, *, onto: str = "original",
                 dtype: torch.dtype | None = None, quantization: Quantization = Quantization()):  # fmt: skip
        if onto not in ONTO:
            raise UserError(f"--onto must be one of {', '.join(ONTO)}, got {onto!r}")
        self.base_dir, self.dtype = base_dir, dtype
        self.config = json.loads((base_dir / "config.json").read_text())
        num_experts = self.config["num_local_experts"]
        self.deltas = read_adapter(adapter_dir, num_experts) if adapter_dir is not None else AdapterDeltas()
        self.applier = DeltaApplier(self.deltas, self.config, onto, quantization, dtype)
        self.shards = shard_files(base_dir)

    def specs(self, shard: Path) -> list[TensorSpec]:
        """Name, dtype and shape of each merged tensor of `shard`, from its header alone."""
        return read_specs(shard, self.dtype)

    def tensors(self, shard: Path) -> Iterator[tuple[str, torch.Tensor]]:
        for key in keys_of(shard):
            with safe_open(str(shard), framework="pt") as f:  # one short-lived mapping per tensor
                tensor = f.get_tensor(key)
            yield from self.applier.apply(key, tensor)
            del tensor  # one base tensor (and its merged form) in memory at a time

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for shard in self.shards:
            yield from self.tensors(shard)

    def finish(self) -> None:
        applier = self.applier
        if applier.pending:
            layer, expert = next(iter(applier.pending))
            raise UserError(f"base checkpoint has only one of w1/w3 for layer {layer} expert {expert}")
        unused = applier.unused()
        if unused:
            raise UserError(
                f"{len(unused)} adapter tensor(s) match nothing in the base {self.base_dir}; "
                "was it trained for another model?",
                unused[:20],
            )


def merge_shards(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    *,
    onto: str = "original",
    dtype: torch.dtype | None = None,
    quantization: Quantization = Quantization(),
    max_shard_bytes: int = 5 * 10**9,
) -> dict:
    """Write the merged weights of base + adapter into `out_dir` (an empty folder); returns a summary."""
    stream = MergeStream(base_dir, adapter_dir, onto=onto, dtype=dtype, quantization=quantization)
    writer = ShardWriter(out_dir, max_shard_bytes)
    for shard in stream.shards:
        writer.plan(stream.specs(shard))
        for name, merged in stream.tensors(shard):
            writer.add(name, merged)
            del merged  # before the stream makes the next one: one merged tensor in memory at a time
    stream.finish()
    shards = writer.finish()
    return {"shards": shards, "bytes": writer.total, "adapter_tensors": len(stream.applier.used)}
