"""A GGUF file's tensor table (names, shapes, types) and block count, read from its header.

Why not llama.cpp or the `gguf` package: llama.cpp exposes no per-tensor types, and the
`gguf` package is an export extra, not a runtime dependency.  This reads only the header:
metadata values are skipped except `<arch>.block_count`; no tensor data is touched.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

# GGUF metadata value types with a fixed size (gguf.h): u8 i8 u16 i16 u32 i32 f32 bool u64 i64 f64
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_INTS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}


@dataclass(frozen=True)
class Tensor:
    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is a row's length, dims[1] the row count
    type: int  # ggml_type


@dataclass(frozen=True)
class TensorTable:
    tensors: tuple[Tensor, ...]
    n_layer: int | None  # `<arch>.block_count`, where the file says it


class _Reader:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.at = buf, 0

    def unpack(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self.buf, self.at)
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        text = bytes(self.buf[self.at:self.at + n]).decode("utf-8", errors="replace")
        self.at += n
        return text

    def skip_string(self) -> None:
        n = self.unpack("<Q")  # moves past the length first
        self.at += n

    def value(self, kind: int) -> int | None:
        """Reads a metadata value: integers are returned, everything else is skipped."""
        if kind in _INTS:
            return self.unpack(_INTS[kind])
        if kind in _FIXED:
            self.at += _FIXED[kind]
        elif kind == _STRING:
            self.skip_string()
        elif kind == _ARRAY:
            item, n = self.unpack("<I"), self.unpack("<Q")
            if item in _FIXED:
                self.at += _FIXED[item] * n
            else:
                for _ in range(n):
                    self.value(item)
        else:
            raise ValueError(f"unknown GGUF value type {kind}")
        return None


def read_tensor_table(path: str | Path) -> TensorTable:
    """The tensor table of a GGUF file (version 2 or 3).  Raises ValueError on a file
    that is not one, or is cut short."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        r = _Reader(buf)
        try:
            if bytes(buf[:4]) != b"GGUF":
                raise ValueError("not a GGUF file")
            r.at = 4
            if r.unpack("<I") not in (2, 3):
                raise ValueError("unsupported GGUF version")
            n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
            n_layer = None
            for _ in range(n_kv):
                key = r.string()
                got = r.value(r.unpack("<I"))
                if key.endswith(".block_count") and got is not None:
                    n_layer = got
            tensors = []
            for _ in range(n_tensors):
                name = r.string()
                dims = tuple(r.unpack("<Q") for _ in range(r.unpack("<I")))
                kind = r.unpack("<I")
                r.unpack("<Q")  # the data offset
                tensors.append(Tensor(name, dims, kind))
        except struct.error:
            raise ValueError("GGUF header cut short") from None
    return TensorTable(tuple(tensors), n_layer)
