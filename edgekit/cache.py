"""A content-addressed cache of arrays and JSON values: preprocessed inputs, reference outputs and INT8 ranges
survive between builds.

A key is a JSON-able description of everything an entry depends on (file hashes, preprocessing,
model fingerprint); its sha256 names the file. Writes are atomic, so an interrupted build never
leaves a half-written entry. Nothing read back is trusted: each entry carries its key and a sha256
of its content, and an entry that is unreadable, altered or filed under another key is recomputed
and replaced, with a one-line note, never a crash and never a wrong answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

Arrays = dict[str, np.ndarray]
Note = Callable[[str], None]
_KEY, _DIGEST = "__edgekit_key__", "__edgekit_sha256__"  # stored beside the arrays in each .npz


def default_cache_dir() -> Path:
    return Path(os.environ.get("EDGEKIT_CACHE") or Path.home() / ".cache" / "edgekit")


def note_on_stderr(message: str) -> None:
    print(f"edgekit: {message}", file=sys.stderr, flush=True)


def canonical_json(value: Any) -> bytes:
    """The one byte form of a JSON value that its digest is taken over."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def arrays_sha256(arrays: Arrays) -> str:
    """A digest of names, dtypes, shapes and bytes: any change to a stored array changes it."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(canonical_json([name, array.dtype.str, list(array.shape)]))
        digest.update(array.tobytes())
    return digest.hexdigest()


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
        write(handle)
    os.replace(handle.name, path)


def read_checked_json(path: Path) -> Any:
    """The value stored by `write_checked_json` at `path`; ValueError if it is not intact or was filed under
    another name (the name is its key's sha256); OSError if it cannot be read."""
    entry = json.loads(path.read_bytes())
    if not isinstance(entry, dict) or entry.keys() != {"entry", "sha256", "value"}:
        raise ValueError("not an edgekit cache entry")
    if entry["entry"] != path.stem:
        raise ValueError(f"it belongs to entry {str(entry['entry'])[:16]}")
    if hashlib.sha256(canonical_json(entry["value"])).hexdigest() != entry["sha256"]:
        raise ValueError("its content does not match its sha256")
    return entry["value"]


def write_checked_json(path: Path, value: Any) -> None:
    entry = {"entry": path.stem, "sha256": hashlib.sha256(canonical_json(value)).hexdigest(), "value": value}
    _atomic_write(path, lambda handle: handle.write(json.dumps(entry).encode()))


def checked_json(path: Path | None, compute: Callable[[], Any], note: Note = note_on_stderr,
                 refresh: bool = False) -> Any:
    """Get-or-compute for a JSON value kept at `path` (None: always compute, keep nothing). An entry that is
    not intact is recomputed and replaced, with a note."""
    if path is not None and path.exists() and not refresh:
        try:
            return read_checked_json(path)
        except (OSError, ValueError) as err:  # ValueError covers bad JSON and bad UTF-8 too
            note(f"cache entry {path} is damaged or altered ({err}); recomputing it")
    value = compute()
    if path is not None:
        write_checked_json(path, value)
    return value


class ArrayCache:
    def __init__(self, root: Path | None, note: Note = note_on_stderr) -> None:
        self.root = root
        self.note = note
        self.hits = 0
        self.misses = 0

    def get_or_compute(self, key: dict[str, Any], compute: Callable[[], Arrays]) -> Arrays:
        if self.root is None:
            return compute()
        key_json = canonical_json(key).decode()
        path = self.root / f"{hashlib.sha256(key_json.encode()).hexdigest()}.npz"
        if path.is_file():
            try:
                arrays = self._read(path, key_json)
                self.hits += 1
                return arrays
            except Exception as err:  # a damaged zip raises zipfile's, zlib's, OS and value errors alike
                self.note(f"cache entry {path} is damaged or altered ({type(err).__name__}: {err}); recomputing it")
        arrays = compute()
        self.misses += 1
        stored = {**arrays, _KEY: np.array(key_json), _DIGEST: np.array(arrays_sha256(arrays))}
        _atomic_write(path, lambda handle: np.savez(handle, **stored))
        return arrays

    @staticmethod
    def _read(path: Path, key_json: str) -> Arrays:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
        if str(arrays.pop(_KEY, "")) != key_json:
            raise ValueError("it was stored under another key")
        if str(arrays.pop(_DIGEST, "")) != arrays_sha256(arrays):
            raise ValueError("its arrays do not match their sha256")
        return arrays

    def path(self, key: dict[str, Any], suffix: str) -> Path | None:
        """Where the entry for `key` lives (None when caching is off); read and write it with `checked_json`."""
        if self.root is None:
            return None
        return self.root / (hashlib.sha256(canonical_json(key)).hexdigest() + suffix)
