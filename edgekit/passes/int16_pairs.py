"""Which layers' int8 weights saturate x86 integer kernels that add products in int16 pairs, by emulation.

x86 CPUs without VNNI multiply uint8 activations by int8 weights with `vpmaddubsw`, which adds each
pair of neighbouring products into a saturating int16 (onnxruntime's MLAS and OpenVINO's CPU plugin both
do). A pair of large codes meeting two large weights of one sign (255 x 127 x 2 = 64,770 > 32,767) is
clipped. On YOLO11n the first conv, reading the image's 0-255 pixels in R,G,B pairs, loses its output
to it outright. Weights in 7 bits (-64..63) cannot saturate, at four times the weight rounding noise.

So each layer is emulated on real calibration patches: the raw uint8 codes it reads, in the
kernel's order (kernel row, kernel column, input channel: the NHWC im2col the int8 conv packs),
multiplied by its 8-bit weights with every pair clipped to int16. What clipping takes from the
output is weighed against what 7-bit weights would change in it (their rounding against the 8-bit
ones'); a layer takes 7-bit weights where clipping costs more. The emulation
needs no x86 kernel, so a build on a VNNI machine (or an Arm one) decides as this host would.
Grouped convolutions (depthwise) are left at 8 bits: their int8 kernels accumulate in int32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from edgekit.runtimes.onnxruntime import OnnxRuntimeRunner

if TYPE_CHECKING:
    import onnx

INT16 = (-32768, 32767)


def pair_errors(codes: np.ndarray, zero: int, scale: float, eight: np.ndarray, eight_scales: np.ndarray,
                seven: np.ndarray, seven_scales: np.ndarray) -> tuple[float, float, float]:
    """For input codes (K, P) in the kernel's order and weight codes (Cout, K) in 8 and 7 bits with per-row
    scales: the squared output error that int16 pair clipping adds to the 8-bit layer, the squared change 7-bit
    weights make to its unclipped output, and the share of pairs clipped."""
    if codes.shape[0] % 2:  # the kernels pad K with zeros
        codes = np.vstack([codes, np.full((1, codes.shape[1]), zero, codes.dtype)])
        eight, seven = (np.pad(w, ((0, 0), (0, 1))) for w in (eight, seven))
    raw: np.ndarray = codes.astype(np.int32)
    error8 = error7 = 0.0
    clipped_pairs = 0
    for rows in np.array_split(np.arange(len(eight)), max(1, len(eight) // 16)):  # bounded memory per chunk
        products = eight[rows].astype(np.int32)[:, :, None] * raw[None]  # (rows, K, P)
        pairs = products.reshape(len(rows), -1, 2, raw.shape[1]).sum(axis=2)
        clipped = np.clip(pairs, *INT16)
        clipped_pairs += int((clipped != pairs).sum())
        lost = (clipped - pairs).sum(axis=1)  # what clipping takes from each raw-code accumulation
        out8 = eight_scales[rows, None] * (eight[rows].astype(np.int64) @ (raw - zero)) * scale
        out7 = seven_scales[rows, None] * (seven[rows].astype(np.int64) @ (raw - zero)) * scale
        error8 += float(((eight_scales[rows, None] * lost * scale) ** 2).sum())
        error7 += float(((out7 - out8) ** 2).sum())
    return error8, error7, clipped_pairs / (len(eight) * raw.shape[0] / 2 * raw.shape[1])


def saturating_layers(prepared: onnx.ModelProto, eight: onnx.ModelProto, seven: onnx.ModelProto, images: np.ndarray,
                      threads: int, positions: int = 256) -> list[dict[str, Any]]:
    """Each int8 conv (one group) and MatMul with uint8 inputs of the QDQ graph `eight` (8-bit weights), emulated
    on `positions` output positions of each image (its input as the float graph `prepared` computes it) against
    the same layer in `seven` (7-bit weights): the two errors, the share of pairs clipped, and whether it takes
    7-bit weights."""
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in eight.graph.initializer}
    sevens = {t.name: numpy_helper.to_array(t) for t in seven.graph.initializer}
    producers = {out: node for node in eight.graph.node for out in node.output}
    layers = []
    for node in eight.graph.node:
        if node.op_type not in ("Conv", "MatMul") or len(node.input) < 2:
            continue
        read, weight = producers.get(node.input[0]), producers.get(node.input[1])
        if read is None or weight is None or read.op_type != "DequantizeLinear" or weight.op_type != \
                "DequantizeLinear" or weight.input[0] not in values or values.get(read.input[2], np.int8(0)).dtype \
                != np.uint8:
            continue
        attributes = {a.name: a for a in node.attribute}
        if node.op_type == "Conv" and "group" in attributes and attributes["group"].i != 1:
            continue
        quantized = producers.get(read.input[0])
        if quantized is None or quantized.op_type != "QuantizeLinear":
            continue
        layers.append((node, quantized.input[0], read, weight, attributes))
    if not layers:
        return []
    from edgekit.passes.int8 import with_outputs

    names = sorted({source for _, source, *_ in layers})
    runner = OnnxRuntimeRunner(with_outputs(prepared, names), threads)
    rng = np.random.default_rng(0)
    totals: dict[str, list[float]] = {node.name: [0.0, 0.0, 0.0] for node, *_ in layers}
    for tensors in runner.stream(images, names):
        found = dict(zip(names, tensors, strict=True))
        for node, source, read, weight, attributes in layers:
            scale, zero = float(values[read.input[1]]), int(values[read.input[2]])
            codes = np.clip(np.round(found[source] / scale) + zero, 0, 255)
            w8, s8 = values[weight.input[0]], values[weight.input[1]]
            w7, s7 = sevens[weight.input[0]], sevens[weight.input[1]]
            if node.op_type == "Conv":
                patches = _patches(codes, zero, w8.shape, attributes)
                flat = [np.moveaxis(w, 1, -1).reshape(len(w), -1) for w in (w8, w7)]  # (Cout, kh, kw, Cin)
            else:  # MatMul: activations (..., K) by weights (K, N); pairs along K
                patches = codes.reshape(-1, codes.shape[-1]).T
                flat = [w8.T, w7.T]
                s8, s7 = np.broadcast_to(s8, (w8.shape[1],)), np.broadcast_to(s7, (w8.shape[1],))
            chosen = rng.choice(patches.shape[1], min(positions, patches.shape[1]), replace=False)
            errors = pair_errors(patches[:, chosen], zero, scale, flat[0], np.reshape(s8, -1), flat[1],
                                 np.reshape(s7, -1))
            totals[node.name] = [a + b for a, b in zip(totals[node.name], errors, strict=True)]
    count = len(images)
    return [{"layer": name, "error_8bit": e8, "error_7bit": e7, "pairs_clipped": clipped / count,
             "seven_bit": e8 > e7} for name, (e8, e7, clipped) in totals.items()]


def _patches(codes: np.ndarray, zero: int, shape: tuple[int, ...], attributes: dict[str, Any]) -> np.ndarray:
    """A conv's input codes (1, C, H, W) as columns (kh * kw * C, positions), each ordered kernel row, kernel
    column, channel; padding reads the zero point (real 0)."""
    import torch

    kh, kw = shape[2], shape[3]
    pads = list(attributes["pads"].ints) if "pads" in attributes else [0, 0, 0, 0]
    strides = list(attributes["strides"].ints) if "strides" in attributes else [1, 1]
    dilations = list(attributes["dilations"].ints) if "dilations" in attributes else [1, 1]
    padded = np.pad(codes[0], ((0, 0), (pads[0], pads[2]), (pads[1], pads[3])), constant_values=zero)
    columns = torch.nn.functional.unfold(torch.from_numpy(padded[None].astype(np.float32)), (kh, kw),
                                         dilation=dilations, stride=strides)[0].numpy()
    channels = codes.shape[1]
    return columns.reshape(channels, kh, kw, -1).transpose(1, 2, 0, 3).reshape(kh * kw * channels, -1)


def with_weights_of(model: onnx.ModelProto, other: onnx.ModelProto, layers: set[str]) -> None:
    """`model` in place with the weights and biases of `layers` (their dequantized inputs' codes, scales and zero
    points) taken from `other`, a quantization of the same graph and ranges."""
    producers = {out: node for node in model.graph.node for out in node.output}
    names = {name for node in model.graph.node if node.name in layers for read in node.input[1:]
             if (dq := producers.get(read)) is not None and dq.op_type == "DequantizeLinear" for name in dq.input}
    replacements = {t.name: t for t in other.graph.initializer if t.name in names}
    for tensor in model.graph.initializer:
        if tensor.name in replacements:
            tensor.CopyFrom(replacements[tensor.name])
