"""Folders of images given as calibration or evaluation data: listing, hashing, the held-out split."""

from __future__ import annotations

import hashlib
import warnings
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekit.errors import UsageError, first_line

if TYPE_CHECKING:
    from PIL import Image

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


class ImageReader:
    """Reads a data folder's images as 8-bit RGB and keeps what the report should say of them: the files no decoder
    could read (skipped, so one damaged file does not stop a build) and the 16-bit files reduced to 8 bits."""

    def __init__(self) -> None:
        self.skipped: list[tuple[Path, str]] = []
        self.reduced: list[Path] = []

    def rgb(self, path: Path) -> Image.Image | None:
        """The image, decoded, as 8-bit RGB; None (and a note) when it cannot be read."""
        from PIL import Image

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a large photo is still a photo; damaged metadata is no news
                with Image.open(path) as image:
                    sixteen = _sixteen_bit(image)
                    rgb = to_rgb8(image)
        except Exception as err:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError, … here
            self.skipped.append((path, first_line(err)))
            return None
        if sixteen:
            self.reduced.append(path)
        return rgb

    def notes(self, total: int) -> list[str]:
        notes = []
        if self.skipped:
            path, reason = self.skipped[0]
            notes.append(f"warning: {len(self.skipped)} of {total} images could not be read and were skipped "
                         f"(first: {path}: {reason})")
        if self.reduced:
            notes.append(f"{len(self.reduced)} of {total} images have 16 bits a channel: reduced to 8 (the high "
                         f"byte), the 0-255 pixels the model takes (first: {self.reduced[0]})")
        return notes

    def none_read(self, total: int) -> UsageError:
        first = f" (first: {self.skipped[0][0]}: {self.skipped[0][1]})" if self.skipped else ""
        return UsageError(f"none of the {total} images could be read{first}")


def _sixteen_bit(image: Image.Image) -> bool:
    """Whether a just-opened image stores 16 bits a channel: Pillow opens such grayscale as I;16 and such colour
    as 8-bit RGB(A) from a `;16` raw mode, which only its (not yet loaded) tiles still show."""
    return image.mode.startswith("I;16") or any(";16" in str(tile.args) for tile in image.tile)


def to_rgb8(image: Image.Image) -> Image.Image:
    """8-bit RGB; 16-bit grayscale keeps its high byte, where Pillow's own conversion would clip it at 255."""
    from PIL import Image

    if image.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


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
