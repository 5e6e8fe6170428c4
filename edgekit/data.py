"""Folders of images given as calibration or evaluation data: listing, hashing, the held-out split."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any

from edgekit.errors import UsageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def list_images(folder: Path, role: str) -> list[Path]:
    """Every image below `folder`, sorted; an unusable folder is a UsageError naming the role."""
    if not folder.exists():
        raise UsageError(f"{role} folder not found: {folder}")
    if not folder.is_dir():
        raise UsageError(f"{role} path is not a folder: {folder}")
    try:
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    except PermissionError as err:
        raise UsageError(f"{role} folder is not readable: {err.filename}") from None
    if not files:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise UsageError(f"{role} folder {folder} holds no images ({suffixes})")
    return files


def split_held_out(files: list[Path], every: int = 4) -> tuple[list[Path], list[Path]]:
    """Calibration and held-out parts of one folder, disjoint and stable: every `every`-th file is held out."""
    held = files[every - 1 :: every]
    held_set = set(held)
    return [f for f in files if f not in held_set], held


def files_digest(files: list[Path], root: Path) -> str:
    """One sha256 over the paths (relative to `root`: class folders matter) and bytes of a file set."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root)).encode())
        digest.update(bytes.fromhex(file_sha256(path)))
    return digest.hexdigest()


def files_record(files: list[Path], root: Path) -> dict[str, Any]:
    """How reports and manifests name a set of images: how many, their digest, and the folder."""
    return {"images": len(files), "sha256": files_digest(files, root), "path": str(root)}


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes; a build hashes its data folders for cache keys, the report and the manifest,
    so each unchanged file (same size and modification time) is read once per process."""
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=65536)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
