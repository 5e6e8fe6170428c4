"""A content-addressed cache of arrays: preprocessed inputs and reference outputs survive between builds.

A key is a JSON-able description of everything the arrays depend on (file hashes, preprocessing,
model fingerprint); its sha256 names the file. Writes are atomic, so an interrupted build never
leaves a half-written entry that a later build would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

Arrays = dict[str, np.ndarray]


def default_cache_dir() -> Path:
    return Path(os.environ.get("EDGEKIT_CACHE") or Path.home() / ".cache" / "edgekit")


class ArrayCache:
    def __init__(self, root: Path | None) -> None:
        self.root = root
        self.hits = 0
        self.misses = 0

    def get_or_compute(self, key: dict[str, Any], compute: Callable[[], Arrays]) -> Arrays:
        if self.root is None:
            return compute()
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        path = self.root / f"{name}.npz"
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as stored:
                    self.hits += 1
                    return {k: stored[k] for k in stored.files}
            except (OSError, ValueError):
                pass  # a damaged entry is recomputed and replaced
        arrays = compute()
        self.misses += 1
        self.root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.root, suffix=".tmp", delete=False) as handle:
            np.savez(handle, **arrays)
        os.replace(handle.name, path)
        return arrays

    def path(self, key: dict[str, Any], suffix: str) -> Path | None:
        """A file path for a cache entry another library writes itself; None when caching is off."""
        if self.root is None:
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest() + suffix)
