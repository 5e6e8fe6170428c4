"""Run a Segment-Anything pair (image encoder, then prompt encoder + mask decoder) on box prompts.

Only numpy and the runtimes: the same code computes masks here and on a board through `edgekit agent`, so a
device's masks differ from the host's only by what its runtime computes. The encoder's frame is built from
the image already resized to the longest side (8-bit RGB), which is what a request carries: a quarter of the
float frame's bytes, normalised on the board with the same arithmetic as here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekit.runtimes.base import time_calls

ENCODER_SIZE = 1024  # the longest side the encoder sees; the rest is zero padding (bottom, right)
PIXEL_MEAN = np.array([123.675, 116.28, 103.53], np.float32)  # SAM's normalisation, on 0-255 RGB
PIXEL_STD = np.array([58.395, 57.12, 57.375], np.float32)
BOX_LABELS = (2.0, 3.0)  # SAM's point labels for a box's top-left and bottom-right corners
LOW_RES = 256  # the decoder's mask-input side

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in original pixels


def encoder_frame(resized: np.ndarray) -> np.ndarray:
    """The encoder's input (1x3x1024x1024) of an 8-bit RGB image whose longest side is already 1024: SAM-normalised,
    zero padded at the bottom and right."""
    frame: np.ndarray = np.zeros((ENCODER_SIZE, ENCODER_SIZE, 3), np.float32)
    frame[: resized.shape[0], : resized.shape[1]] = (resized.astype(np.float32) - PIXEL_MEAN) / PIXEL_STD
    return frame.transpose(2, 0, 1)[None]


def box_prompt(embedding: np.ndarray, box: Box, scale: float,
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


def box_masks(encoder: Any, decoder: Any, x: np.ndarray, boxes: list[Box],
              scale: float, height: int, width: int) -> list[np.ndarray]:
    """The pair's mask (original size, boolean) for each box on one image: the encoder runs once, the decoder
    (an onnxruntime session) once per box."""
    if not boxes:
        return []
    embedding = encoder.run(x)
    return [decoder.run(["masks"], box_prompt(embedding, box, scale, height, width))[0][0, 0] > 0 for box in boxes]


def pair_outputs(encoder: Any, decoder: Any, arrays: dict[str, np.ndarray], warmup: int, runs: int
                 ) -> tuple[dict[str, np.ndarray], list[float]]:
    """A `segment` job: every box's mask, bit-packed and joined in box order (each image's masks at its original
    size, `shapes[:, :2]`; its resized frame is `frames[i, :shapes[i, 2], :shapes[i, 3]]`), the decoder's timings
    on the first box, and the encoder's timings on the first frame."""
    frames, shapes, scales, boxes, image_of = (arrays[k] for k in ("frames", "shapes", "scales", "boxes", "image_of"))
    if not (len(frames) == len(shapes) == len(scales) and shapes.shape[1] == 4 and boxes.shape[1] == 4
            and len(boxes) == len(image_of) > 0 and 0 <= image_of.min() <= image_of.max() < len(frames)):
        raise ValueError("frames, shapes (4 columns) and scales take one row per image, boxes (4 columns) and "
                         "image_of one per box, at least one box")
    packed = []
    for index, (frame, (height, width, rows, cols), scale) in enumerate(zip(frames, shapes, scales, strict=True)):
        mine = [_box(row) for row in boxes[image_of == index]]
        packed += [np.packbits(mask) for mask in box_masks(encoder, decoder, encoder_frame(frame[:rows, :cols]),
                                                           mine, float(scale), int(height), int(width))]
    first = int(image_of[0])
    x = encoder_frame(frames[first, :shapes[first, 2], :shapes[first, 3]])
    feeds = box_prompt(encoder.run(x), _box(boxes[0]), float(scales[first]),
                       int(shapes[first, 0]), int(shapes[first, 1]))
    decoder_ms = time_calls(lambda: decoder.run(["masks"], feeds), warmup, runs)
    return {"masks": np.concatenate(packed), "decoder_ms": np.array(decoder_ms)}, encoder.time(x[0], warmup, runs)


def unpack_masks(packed: np.ndarray, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """`pair_outputs`' joined masks back as boolean masks of the given (height, width), in order."""
    masks: list[np.ndarray] = []
    at = 0
    for height, width in sizes:
        count = height * width
        length = (count + 7) // 8
        masks.append(np.unpackbits(packed[at:at + length], count=count).astype(bool).reshape(height, width))
        at += length
    return masks


def _box(row: np.ndarray) -> Box:
    x1, y1, x2, y2 = (float(value) for value in row)
    return x1, y1, x2, y2
