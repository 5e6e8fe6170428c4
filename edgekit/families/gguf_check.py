"""A GGUF file checked before transformers reads it: one line of bad input for a truncated or damaged file.

The header is walked here with every count and length held to the file's size: gguf's own reader (which
transformers uses) trusts them, and an array whose count was damaged to 2^60 keeps it looping for hours. The walk
reads no weight: under a second for SmolLM2-135M's 49k-token vocabulary, where gguf's reader takes eight.
"""

from __future__ import annotations

import mmap
import struct
from math import prod
from pathlib import Path

from edgekit.errors import UsageError

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # what gguf's reader reads
FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # metadata value type -> bytes
STRING, ARRAY, UINT32 = 8, 9, 4
MAX_NESTING = 8  # arrays of arrays; real files nest one deep at most
MAX_RANK = 8  # ggml tensors have at most 4 dimensions
DEFAULT_ALIGNMENT = 32


class _Damaged(Exception):
    """Where the walk found the file cannot be what its header says."""


class _Walker:
    def __init__(self, data: mmap.mmap | bytes, order: str) -> None:
        self.data, self.order, self.at = data, order, 0

    def take(self, size: int, what: str) -> bytes:
        if self.at + size > len(self.data):
            raise _Damaged(f"{what} at byte {self.at} runs past the end of the file ({len(self.data)} bytes)")
        chunk = self.data[self.at : self.at + size]
        self.at += size
        return chunk

    def u32(self, what: str) -> int:
        return struct.unpack(self.order + "I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack(self.order + "Q", self.take(8, what))[0]

    def string(self, what: str) -> bytes:
        return self.take(self.u64(f"{what}'s length"), what)

    def value(self, kind: int, what: str, depth: int = 0) -> bytes | None:
        """Step over one metadata value; a fixed-size one's bytes are returned (general.alignment is a uint32)."""
        if kind in FIXED:
            return self.take(FIXED[kind], what)
        if kind == STRING:
            self.string(what)
        elif kind == ARRAY:
            if depth >= MAX_NESTING:
                raise _Damaged(f"{what} nests arrays more than {MAX_NESTING} deep")
            items, count = self.u32(f"{what}'s element type"), self.u64(f"{what}'s length")
            if items in FIXED:
                self.take(count * FIXED[items], what)
            elif items in (STRING, ARRAY):
                smallest = 8 if items == STRING else 12
                if count * smallest > len(self.data) - self.at:  # before looping over a damaged count
                    raise _Damaged(f"{what} at byte {self.at} claims {count} elements, more than the file holds")
                for _ in range(count):
                    self.value(items, what, depth + 1)
            else:
                raise _Damaged(f"{what} has elements of unknown type {items}")
        else:
            raise _Damaged(f"{what} has unknown type {kind}")
        return None


def check_gguf(path: Path) -> None:
    """Raise a UsageError naming `path` unless it is a GGUF file whose metadata, tensor table and tensor data all lie
    within it."""
    try:
        with path.open("rb") as handle:
            if handle.read(4) != MAGIC:
                raise UsageError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                _walk(data)
    except _Damaged as err:
        raise UsageError(f"{path}: truncated or damaged GGUF file ({err})") from None
    except OSError as err:
        raise UsageError(f"{path}: cannot read the GGUF file ({err.strerror or err})") from None


def _walk(data: mmap.mmap) -> None:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    version = struct.unpack("<I", data[4:8])[0] if len(data) >= 8 else 0
    order = ">" if version and not version & 0xFFFF else "<"  # a file written on a big-endian machine
    walker = _Walker(data, order)
    walker.take(4, "magic")
    version = walker.u32("version")
    if version not in VERSIONS:
        raise _Damaged(f"version {version}, not {' or '.join(map(str, VERSIONS))}")
    tensors, keys = walker.u64("tensor count"), walker.u64("metadata count")
    alignment = DEFAULT_ALIGNMENT
    for index in range(keys):
        key = walker.string(f"metadata key {index}")
        kind = walker.u32(f"metadata {_shown(key)}'s type")
        raw = walker.value(kind, f"metadata {_shown(key)}")
        if key == b"general.alignment" and kind == UINT32 and raw is not None:
            alignment = struct.unpack(order + "I", raw)[0]
    if alignment == 0 or alignment & (alignment - 1):
        raise _Damaged(f"general.alignment is {alignment}, not a power of two")
    table = []
    for index in range(tensors):
        label = _shown(walker.string(f"tensor {index}'s name"))
        rank = walker.u32(f"tensor {label}'s rank")
        if rank > MAX_RANK:
            raise _Damaged(f"tensor {label} has rank {rank}")
        dims = [walker.u64(f"tensor {label}'s shape") for _ in range(rank)]
        kind, offset = walker.u32(f"tensor {label}'s type"), walker.u64(f"tensor {label}'s offset")
        try:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise _Damaged(f"tensor {label} has unknown type {kind}") from None
        table.append((label, offset, prod(dims) * size // block))
    start = -(-walker.at // alignment) * alignment  # tensor data begins at the next multiple of the alignment
    for label, offset, size in table:
        if start + offset + size > len(data):
            raise _Damaged(f"tensor {label}'s data ends at byte {start + offset + size}, past the end of the file "
                           f"({len(data)} bytes)")


def _shown(name: bytes) -> str:
    """A name from the file, short and on one line whatever its bytes."""
    return repr(name[:40].decode("utf-8", "replace"))[1:-1]
