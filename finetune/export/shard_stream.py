"""Write safetensors shards tensor by tensor, so a merge holds one tensor at a time, not one shard.

`safetensors.torch.save_file` needs every tensor of a file in memory at once. A merge knows each output tensor's
name, dtype and shape before computing it (they are the base's, or the requested dtype), so the header can be
written first and each tensor's bytes written to its place as soon as it exists. The files are ordinary
safetensors files: the format is an 8-byte header length, a JSON header, then the raw tensor bytes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


class StreamingShard:
    """One output file whose header is fixed up front; `write` places each tensor, `close` checks all arrived."""

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        self.path, self.specs = path, {s.name: s for s in specs}
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        self.offsets: dict[str, int] = {}
        for spec in specs:
            header[spec.name] = {
                "dtype": DTYPE_NAMES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            self.offsets[spec.name] = offset
            offset += spec.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-(8 + len(text)) % 8)  # tensor data starts 8-byte aligned
        self.data_start = 8 + len(text)
        self.nbytes = offset
        self.pending = set(self.specs)
        self.file = open(path, "wb")  # noqa: SIM115  (closed in close(), after the last tensor)
        self.file.write(struct.pack("<Q", len(text)) + text)
        self.file.truncate(self.data_start + offset)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs[name]
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"{name}: expected {spec.dtype} {spec.shape}, got {tensor.dtype} {tuple(tensor.shape)}")
        self.file.seek(self.data_start + self.offsets[name])
        self.file.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
        self.pending.discard(name)

    def close(self) -> None:
        if self.pending:
            raise ValueError(
                f"{self.path.name}: {len(self.pending)} tensor(s) never written: {sorted(self.pending)[:5]}"
            )
        self.file.close()


def read_specs(shard: Path, dtype: torch.dtype | None = None) -> list[TensorSpec]:
    """Name, dtype and shape of every tensor in a safetensors file (header only), optionally re-typed."""
    with open(shard, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    ordered = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
    return [
        TensorSpec(name, dtype if dtype is not None and DTYPES[info["dtype"]].is_floating_point else DTYPES[info["dtype"]],
                   tuple(info["shape"]))
        for name, info in ordered
    ]  # fmt: skip
