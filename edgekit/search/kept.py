"""Outputs one candidate computed that another can reuse: a search's children share most of their parent's levels,
and every part of a model upstream of the first level that differs computes exactly what it did for the parent."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

KEPT_BYTES = 2 << 30  # what a search keeps at most; the least recently used goes first


class KeptOutputs:
    """Tensors by key (the levels upstream of where they were computed, and which inputs), least recently used
    dropped beyond `limit` bytes. A request for fewer rows (inputs) than kept takes the first ones. Both ways the
    tensor is copied, so a later in-place operation on it changes nothing kept."""

    def __init__(self, limit: int = KEPT_BYTES) -> None:
        self.limit = limit
        self.kept: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def get(self, key: Hashable, rows: int) -> torch.Tensor | None:
        kept = self.kept.get(key)
        if kept is None or len(kept) < rows:
            self.misses += 1
            return None
        self.kept.move_to_end(key)
        self.hits += 1
        return kept[:rows].clone()

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        if key in self.kept:
            self.bytes -= self.kept.pop(key).nbytes
        self.kept[key] = value.clone()
        self.bytes += value.nbytes
        while self.bytes > self.limit and len(self.kept) > 1:
            self.bytes -= self.kept.popitem(last=False)[1].nbytes
