"""YOLO label files, one object a line: `class cx cy w h` (a box) or `class x1 y1 x2 y2 x3 y3 ...` (a polygon's
points), all coordinates normalised to 0-1. Detectors read boxes (a polygon's own box), segmenters polygons.

A line that is neither is bad input: a UsageError naming the file and the line, never a silently wrong box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from edgekit.errors import UsageError


@dataclass(frozen=True)
class LabelLine:
    line: int  # 1-based, as an editor shows it
    cls: int
    coords: tuple[float, ...]  # 4 for a box (cx, cy, w, h); x, y pairs for a polygon

    @property
    def is_box(self) -> bool:
        return len(self.coords) == 4

    def box(self) -> tuple[float, float, float, float]:
        """(cx, cy, w, h): the line's box, or the box around its polygon."""
        if self.is_box:
            cx, cy, w, h = self.coords
            return cx, cy, w, h
        xs, ys = self.coords[::2], self.coords[1::2]
        return (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)


def read_labels(path: Path) -> list[LabelLine]:
    """Every object of a label file (blank lines skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: a YOLO label file is text, this is not UTF-8") from None
    except OSError as err:
        raise UsageError(f"{path}: cannot read the label file ({err.strerror or err})") from None
    return [_parse(path, number, fields)
            for number, line in enumerate(text.splitlines(), 1) if (fields := line.split())]


def _parse(path: Path, number: int, fields: list[str]) -> LabelLine:
    where = f"{path} line {number}"
    coords = fields[1:]
    if not coords or len(coords) % 2:
        raise UsageError(f"{where}: expected `class cx cy w h` or a polygon `class x1 y1 x2 y2 x3 y3 ...`, "
                         f"got {len(fields)} values")
    try:
        cls_value, values = float(fields[0]), tuple(float(v) for v in coords)
    except ValueError:
        bad = next(v for v in fields if not _is_number(v))
        raise UsageError(f"{where}: {_shown(bad)} is not a number") from None
    if not math.isfinite(cls_value) or cls_value != int(cls_value) or cls_value < 0:
        raise UsageError(f"{where}: the class must be a whole number of at least 0, got {_shown(fields[0])}")
    outside = next((v for v in values if not 0.0 <= v <= 1.0), None)  # NaN too
    if outside is not None:
        raise UsageError(f"{where}: coordinates are normalised to 0-1, got {outside:g}")
    return LabelLine(number, int(cls_value), values)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _shown(text: str) -> str:
    return repr(text if len(text) <= 20 else text[:20] + "…")
