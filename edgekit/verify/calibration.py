"""Calibration diagnostics: can the images an INT8 build calibrates on stand for what the model will see?

A quantizer fixes every activation's range from the calibration images; what the deployed model meets outside
those ranges is clipped. Three things predict trouble, and each is measured rather than assumed:
- too few images (a silent fallback to a handful is a known way to ship a broken INT8 model);
- near-duplicates (one photo cropped many times, a burst of frames from one clip): fewer images than it seems;
- coverage: the share of the held-out images' activation values that fall outside the range the calibration
  images span, tensor by tensor, on the float graph. It is a property of the two image sets, not of one
  quantizer's clipping rule, so it reads the same for ONNX and TFLite artifacts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

MIN_IMAGES = 32  # below this, a range rests on too few extremes
MAX_DUPLICATE_SHARE = 0.1  # a tenth of the set repeating another image
MAX_OUTSIDE = 0.01  # a tensor with 1% of its held-out values outside the calibrated range
HASH_SIDE = 8  # difference hash: 8 x 8 brightness gradients of a 9 x 8 thumbnail
NEAR = 4  # hashes this many bits apart (of 64) are the same picture
HELD_OUT = 64  # held-out images coverage reads, evenly spaced: every tensor of each is compared


def image_hashes(inputs: np.ndarray) -> np.ndarray:
    """A 64-bit difference hash per image (NCHW model inputs): signs of the horizontal brightness gradients of a
    9 x 8 thumbnail, which survive resizing, re-encoding and small shifts but not a different scene."""
    gray = inputs.mean(axis=1)
    rows = np.array_split(np.arange(gray.shape[1]), HASH_SIDE)
    cols = np.array_split(np.arange(gray.shape[2]), HASH_SIDE + 1)
    thumbs = np.empty((len(inputs), HASH_SIDE, HASH_SIDE + 1))
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            thumbs[:, i, j] = gray[:, r][:, :, c].mean(axis=(1, 2))
    return (np.diff(thumbs, axis=2) > 0).reshape(len(inputs), -1)


def near_duplicates(inputs: np.ndarray) -> int:
    """How many images repeat an earlier one of the set (hashes within NEAR bits)."""
    hashes = image_hashes(inputs)
    repeats = 0
    for i in range(1, len(hashes)):
        if (np.count_nonzero(hashes[:i] != hashes[i], axis=1) <= NEAR).any():
            repeats += 1
    return repeats


def coverage(graph: onnx.ModelProto, calibration: np.ndarray, held_out: np.ndarray, threads: int
             ) -> list[dict[str, Any]]:
    """For every float activation of `graph`: the share of its values over `held_out` outside the [min, max] it
    takes over `calibration`, worst first."""
    from edgekit.passes.int8 import stream_ranges, with_outputs
    from edgekit.runtimes.onnxruntime import OnnxRuntimeRunner

    names = sorted({out for node in graph.graph.node for out in node.output if out})
    runner = OnnxRuntimeRunner(with_outputs(graph, names), threads)
    first = runner.session.run(names, {runner.input_name: calibration[:1]})
    names = [name for name, value in zip(names, first, strict=True) if np.issubdtype(value.dtype, np.floating)]
    ranges = stream_ranges(runner.stream(calibration, names), "minmax", symmetric=False)
    outside = np.zeros(len(names))
    total = np.zeros(len(names))
    for tensors in runner.stream(held_out, names):
        for i, (tensor, (lo, hi)) in enumerate(zip(tensors, ranges, strict=True)):
            outside[i] += np.count_nonzero((tensor < lo) | (tensor > hi))
            total[i] += tensor.size
    rows = [{"tensor": name, "outside": float(o / t) if t else 0.0, "range": [lo, hi]}
            for name, o, t, (lo, hi) in zip(names, outside, total, ranges, strict=True)]
    return sorted(rows, key=lambda row: -row["outside"])


def diagnose(graph: onnx.ModelProto, calibration: np.ndarray, held_out: np.ndarray, threads: int,
             shipped: bool) -> dict[str, Any]:
    """The report's `calibration_diagnostics`: the numbers, and a warning for each that predicts trouble."""
    repeats = near_duplicates(calibration)
    held_out = held_out[:: max(1, len(held_out) // HELD_OUT)][:HELD_OUT]
    rows = coverage(graph, calibration, held_out, threads)
    shares = np.array([row["outside"] for row in rows])
    poor = [row for row in rows if row["outside"] > MAX_OUTSIDE]
    warnings = []
    if shipped:
        worst = f"{100 * rows[0]['outside']:.2g}% of {rows[0]['tensor']}'s" if rows else "no"
        warnings.append(f"calibrated on edgekit's shipped default images ({len(calibration)} crops of a few general "
                        f"photos, {repeats} near-duplicates; the {len(held_out)} held-out images put {worst} values "
                        "outside the calibrated range), not the deployment's: give --calib a few hundred of the "
                        "camera's own images")
    if len(calibration) < MIN_IMAGES:
        warnings.append(f"only {len(calibration)} calibration images (fewer than {MIN_IMAGES}): ranges rest on few "
                        "extremes")
    if repeats > MAX_DUPLICATE_SHARE * len(calibration):
        warnings.append(f"{repeats} of {len(calibration)} calibration images are near-duplicates of others")
    if poor:
        warnings.append(f"the {len(held_out)} held-out images put {100 * poor[0]['outside']:.1f}% of "
                        f"{poor[0]['tensor']}'s values outside the calibrated range ({len(poor)} of {len(rows)} "
                        f"tensors over {100 * MAX_OUTSIDE:g}%): the calibration images do not cover them")
    return {
        "images": len(calibration),
        "near_duplicates": repeats,
        "held_out_images": len(held_out),
        "tensors": len(rows),
        "outside_median": float(np.median(shares)) if len(shares) else 0.0,
        "outside_worst": rows[:5],
        "tensors_poorly_covered": len(poor),
        "method": "share of held-out activation values outside each float tensor's calibration [min, max]; "
                  f"near-duplicates: 64-bit difference hashes within {NEAR} bits",
        "warnings": warnings,
    }
