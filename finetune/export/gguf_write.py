"""Write a GGUF file tensor by tensor, and read it back against the merged weights.

`gguf.GGUFWriter` wants every tensor's data in hand before it writes any. Here it writes only what it is good at,
the header: metadata and every tensor's name, shape, type and offset (all known from the base's safetensors headers
before a weight is read). Each merged tensor, or each expert of a stack, is then quantised and written straight
into its place, so memory holds one tensor at a time; the file is an ordinary GGUF file that `gguf.GGUFReader` and
llama.cpp read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from finetune.export.gguf_layout import Layout, Planned, encode

Q = gguf.GGMLQuantizationType
# A block quantiser's largest error, in steps of its block's scale (amax / levels): rounding is half a step; Q4_0's
# clipped top level and the float16 scale add up to one step. float16 / bfloat16 round to half an ulp.
BLOCK_LEVELS = {Q.Q8_0: 127, Q.Q4_0: 8}
RELATIVE = {Q.F32: 0.0, Q.F16: 2.0**-11, Q.BF16: 2.0**-8}
# float32 rows per encode / compare. A few buffers of this size are alive at once, and glibc keeps freed ones of
# this size for reuse, so it sets the working set above the one tensor in hand: 4 MiB keeps it to a few tens of MiB.
CHUNK_BYTES = 4 * 2**20
TINY = {Q.F32: 0.0, Q.F16: 2.0**-25, Q.BF16: 2.0**-133}  # half the smallest subnormal


def row_chunks(data: torch.Tensor) -> Iterator[torch.Tensor]:
    """`data` in memory order as blocks of whole rows of at most ~CHUNK_BYTES in float32 (1-D: whole)."""
    if data.dim() <= 1:
        yield data
        return
    if data.dim() > 2:
        for part in data:
            yield from row_chunks(part)
        return
    step = max(1, CHUNK_BYTES // (4 * data.shape[1]))
    for start in range(0, data.shape[0], step):
        yield data[start : start + step]


class GGUFStream:
    """One GGUF file: header first (by GGUFWriter), then `write(name, slot, data)` into place; `close` checks all."""

    def __init__(self, path: Path, planned: list[Planned], add_metadata: Callable[[gguf.GGUFWriter], None]):
        self.path, self.planned = path, {p.name: p for p in planned}
        writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        for p in planned:  # a non-uint8 dtype: the shape given is the tensor's own, not a byte shape
            writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
        add_metadata(writer)  # after the tensor infos: the size label counts their parameters
        writer.write_header_to_file(path=path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        self.file = writer.fout[0]
        writer.write_padding(self.file, self.file.tell())
        self.offsets, offset = {}, self.file.tell()
        for p in planned:  # the offsets write_ti_data_to_file wrote: each tensor padded to the alignment
            self.offsets[p.name] = offset
            offset += gguf.GGUFWriter.ggml_pad(p.nbytes, writer.data_alignment)
        self.file.truncate(offset)
        self.nbytes = offset
        self.pending = {p.name: set(range(p.slots)) for p in planned}

    def write(self, name: str, slot: int, data: torch.Tensor) -> None:
        p = self.planned[name]
        want = p.shape if p.slots == 1 else p.shape[1:]
        if tuple(data.shape) != tuple(want) or slot not in self.pending[name]:
            raise ValueError(f"{name}[{slot}]: expected shape {want} once, got {tuple(data.shape)}")
        self.file.seek(self.offsets[name] + slot * (p.nbytes // p.slots))
        written = 0
        for rows in row_chunks(data):  # quantisation blocks lie within a row: chunks encode as the whole would
            raw = encode(rows, p.qtype).reshape(-1).view(np.uint8)
            self.file.write(raw.data)
            written += raw.nbytes
        if written * p.slots != p.nbytes:
            raise ValueError(f"{name}: {written} bytes per slot, expected {p.nbytes // p.slots}")
        self.pending[name].discard(slot)

    def abort(self) -> None:
        self.file.close()

    def close(self) -> None:
        missing = [name for name, slots in self.pending.items() if slots]
        self.file.close()
        if missing:
            raise ValueError(f"{self.path.name}: {len(missing)} tensor(s) never fully written: {missing[:5]}")


def error_bound(ref: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """The largest |dequant - ref| the type allows, element by element (block types: one value per block)."""
    if qtype in BLOCK_LEVELS:
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        blocks = np.abs(ref).reshape(*ref.shape[:-1], -1, block)
        return blocks.max(axis=-1, keepdims=True) * (1.01 / BLOCK_LEVELS[qtype])
    bound = np.abs(ref)
    bound *= RELATIVE[qtype]
    return np.maximum(bound, TINY[qtype], out=bound)


@dataclass
class ReadBack:
    """What reading the file back found: layout problems, and the worst error per type as a share of its bound."""

    problems: list[str] = field(default_factory=list)
    worst: dict[str, float] = field(default_factory=dict)  # type -> max |dequant - merged| / bound (<= 1 passes)
    max_abs: dict[str, float] = field(default_factory=dict)
    tensors: int = 0

    @property
    def passed(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        if self.problems:
            return f"verify: FAILED: {self.problems[0]}" + (
                f" (+{len(self.problems) - 1} more)" * (len(self.problems) > 1)
            )
        errors = ", ".join(f"{t} {self.max_abs[t]:.1e} ({self.worst[t]:.0%} of its bound)" for t in sorted(self.worst))
        return f"verify: {self.tensors} tensors read back as llama.cpp's layout; max |dequant - merged|: {errors}: ok"


def tensor_infos(path: Path) -> dict[str, tuple[gguf.GGMLQuantizationType, tuple[int, ...], int, int]]:
    """name -> (type, shape in torch order, bytes, data offset), as gguf's reader finds them. The reader itself is
    let go at once: it keeps a numpy view per vocabulary entry (~80 MiB for Mixtral's 32k tokens)."""
    reader = gguf.GGUFReader(path)
    infos = {t.name: (t.tensor_type, tuple(int(n) for n in reversed(t.shape)), int(t.n_bytes), int(t.data_offset))
             for t in reader.tensors}  # fmt: skip
    del reader
    return infos


def read_back(
    path: Path, planned: list[Planned], layout: Layout, merged: Iterable[tuple[str, torch.Tensor]]
) -> ReadBack:
    """Names, shapes and types against the plan; then every piece of `merged` (a second pass of the merge stream)
    against the file's dequantised bytes."""
    found = tensor_infos(path)
    result = ReadBack(tensors=len(found))
    if set(found) != {p.name for p in planned}:
        result.problems.append(
            f"tensor names differ from the plan: {sorted(set(found) ^ {p.name for p in planned})[:5]}"
        )
    for p in planned:
        info = found.get(p.name)
        if info is not None and info[:3] != (p.qtype, p.shape, p.nbytes):
            result.problems.append(f"{p.name}: {info[0].name} {info[1]}, expected {p.qtype.name} {p.shape}")
    if result.problems:
        return result
    by_name = {p.name: p for p in planned}
    with open(path, "rb") as f:  # plain reads: the reader's memory map would keep every page it touched resident
        for key, tensor in merged:
            _compare_tensor(result, f, layout, found, by_name, key, tensor)
            del tensor  # before the stream makes the next one: one merged tensor in memory at a time
    return result


def _compare_tensor(result: ReadBack, f, layout: Layout, found: dict, by_name: dict, key: str, tensor) -> None:
    for name, slot, data in layout.pieces(key, tensor):
        p = by_name[name]
        f.seek(found[name][3] + slot * (p.nbytes // p.slots))
        for rows in row_chunks(data):
            _compare(result, f"{name}[{slot}] ({key})", p.qtype, f, rows.float().numpy())


def _compare(result: ReadBack, where: str, qtype: gguf.GGMLQuantizationType, f, ref: np.ndarray) -> None:
    """One chunk of rows: the file's bytes dequantised against `ref`, in place (a few buffers of the chunk's size)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = bytearray(ref.size // block * size)  # writable: F32 "dequantises" to a view of these very bytes
    f.readinto(raw)
    err = gguf.quants.dequantize(np.frombuffer(raw, dtype=np.uint8).reshape(*ref.shape[:-1], -1), qtype)
    err = err.reshape(ref.shape)
    np.subtract(err, ref, out=err)
    np.abs(err, out=err)
    bound, kind = error_bound(ref, qtype), qtype.name
    if qtype in BLOCK_LEVELS:  # one bound per block: compare block by block
        err = err.reshape(*bound.shape[:-1], -1)
    worst, beyond = float(err.max()), bool(np.any(err > bound))
    np.divide(err, bound, out=err, where=bound > 0)  # a zero bound (F32, an all-zero block) keeps err: 0 if exact
    result.worst[kind] = max(result.worst.get(kind, 0.0), float(err.max()))
    result.max_abs[kind] = max(result.max_abs.get(kind, 0.0), worst)
    if beyond:
        result.problems.append(f"{where}: |dequant - merged| up to {worst:.2e}, beyond {kind}'s error")
