"""What the artifact does to a few real held-out inputs, beside what the original does: for report.html.

Each example carries its own small thumbnail (JPEG, base64) so that the page stays one self-contained file rendered
from report.json alone, and so that `edgekit report` can redraw it without the images.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np

COUNT = 4  # held-out inputs shown
SIDE = 192  # thumbnail's longer side, pixels
MIN_SCORE = 0.25  # boxes drawn: the score a detector's own prediction mode keeps by default
MAX_BOXES = 20


def thumbnail(sample: np.ndarray) -> dict[str, Any]:
    """A model input (channels first) as a JPEG thumbnail: the pixels as the model sees them, each image stretched
    from its own minimum to maximum (preprocessing scales and shifts channels; this undoes it up to the colours'
    balance)."""
    from PIL import Image

    pixels = np.asarray(sample, dtype=np.float32).transpose(1, 2, 0)
    low, high = float(pixels.min()), float(pixels.max())
    pixels = (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
    image = Image.fromarray(np.round(pixels * 255).astype(np.uint8))
    image.thumbnail((SIDE, SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return {"image": base64.b64encode(buffer.getvalue()).decode("ascii"), "width": image.width,
            "height": image.height}


def mask_overlay(original: np.ndarray, artifact: np.ndarray, width: int, height: int) -> str:
    """Two boolean masks (of the image's own size) as one translucent PNG of `width` x `height` to lay over its
    thumbnail: blue where both cover the pixel, green where only the original does, orange where only the
    artifact does (base64)."""
    from PIL import Image

    colours = np.zeros((*original.shape, 4), np.uint8)
    colours[original & artifact] = (64, 98, 187, 120)
    colours[original & ~artifact] = (26, 127, 55, 170)
    colours[~original & artifact] = (224, 138, 30, 170)
    image = Image.fromarray(colours, "RGBA").resize((width, height), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def top_classes(scores: np.ndarray, names: list[str] | None, count: int = 5) -> list[dict[str, Any]]:
    """The `count` most probable classes of one output row (softmax of logits; probabilities stay as they are)."""
    row = np.asarray(scores, dtype=np.float64)
    probabilities = row if row.min() >= 0 and abs(row.sum() - 1) < 1e-3 else np.exp(row - row.max())
    probabilities = probabilities / probabilities.sum()
    best = np.argsort(-probabilities, kind="stable")[:count]
    return [{**named(int(c), names), "p": round(float(probabilities[c]), 4)} for c in best]


def shown_boxes(found: np.ndarray, size: tuple[int, int], names: list[str] | None) -> list[dict[str, Any]]:
    """A detector's boxes (rows of x1, y1, x2, y2, score, class in input pixels) worth drawing: score at least
    MIN_SCORE, the MAX_BOXES best, corners as shares of the input's width and height."""
    height, width = size
    rows = sorted((row for row in found if row[4] >= MIN_SCORE), key=lambda row: -row[4])[:MAX_BOXES]
    return [{"box": [round(float(row[0]) / width, 4), round(float(row[1]) / height, 4),
                     round(float(row[2]) / width, 4), round(float(row[3]) / height, 4)],
             "score": round(float(row[4]), 3), **named(int(row[5]), names)} for row in rows]


def named(index: int, names: list[str] | None) -> dict[str, Any]:
    """A class index and its name, where the model or the data names its classes."""
    return {"class": index, "name": names[index] if names and index < len(names) else None}


def file_name(path: str | None) -> str | None:
    return Path(path).name if path else None
