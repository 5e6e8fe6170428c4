"""Layer-wise refit of a full-integer TFLite model on its own integer inputs, patched into the flatbuffer.

Per-tensor int8 activations lose the most where one scale covers channels of very different ranges (the
wide ReLU6 tensors of inverted-residual blocks); each layer then sees an input that differs from the float
model's, and the error compounds. In graph order, every conv / depthwise conv / fully-connected layer is
refitted to the float layer's pre-activation output *from the integer model's dequantized input* as LiteRT
computes it (so each layer also corrects the drift of the layers before it):

1. least squares from `Σ x̂ x̂ᵀ` and `Σ x̂ xᵀ` over calibration positions (x̂ integer input, x float input), pulled
   towards the float weights by a ridge that held-out calibration images choose;
2. GPTQ rounding (Frantar et al., 2022) to per-channel symmetric int8 under the integer input's Hessian, the
   bias last and unrounded, so it absorbs what the weights' rounding moved;
3. the int8 codes, weight scales and int32 bias (at input scale × weight scale, as TFLite kernels assume)
   rewritten in place: the model's layout, tensors and activation ranges do not change;
4. the refit is kept only if the whole model's output on the held-out images moves closer to the float's.

Depthwise layers are the same problem per channel (a k×k+1 Hessian each), so one batched solve serves both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

LAYERS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
RIDGES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # pulls towards the float weights, of the mean input energy
HELD_OUT = 5  # every 5th calibration image checks the fit instead of making it
DAMP = 0.01  # GPTQ's dampening, of the mean input energy


@dataclass(frozen=True)
class Layer:
    """One conv / depthwise conv / fully-connected op of the integer model, as the refit needs it."""

    kind: str
    input: str
    output: str
    weight: int  # tensor indices in subgraph 0
    bias: int
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    same_padding: bool = False

    @property
    def depthwise(self) -> bool:
        return self.kind == "DEPTHWISE_CONV_2D"


def layers_of(model: bytes | bytearray, tensor_names: dict[int, str], ops: list[dict[str, Any]]) -> list[Layer]:
    """The model's refittable layers in graph order, with the convolution options read from the flatbuffer: those
    with a bias and, when quantized, one weight scale per output channel (depthwise: one output per input
    channel)."""
    from ai_edge_litert import schema_py_generated as schema

    graph = schema.Model.GetRootAs(model, 0).Subgraphs(0)
    found = []
    for op in ops:
        if op["op_name"] not in LAYERS or len(op["inputs"]) < 3 or op["inputs"][2] < 0:
            continue
        source, weight, bias = op["inputs"][:3]
        depthwise = op["op_name"] == "DEPTHWISE_CONV_2D"
        shape = graph.Tensors(weight).ShapeAsNumpy()
        outputs = shape[-1] if depthwise else shape[0]
        quantization = graph.Tensors(weight).Quantization()
        if ((quantization is not None and quantization.ScaleLength() not in (0, outputs))  # float weights pass
                or (depthwise and graph.Tensors(source).ShapeAsNumpy()[-1] != outputs)):
            continue
        options: dict[str, Any] = {}
        if op["op_name"] != "FULLY_CONNECTED":
            table = graph.Operators(op["index"]).BuiltinOptions()
            conv = (schema.DepthwiseConv2DOptions if depthwise else schema.Conv2DOptions)()
            conv.Init(table.Bytes, table.Pos)
            options = {"stride": (conv.StrideH(), conv.StrideW()),
                       "dilation": (conv.DilationHFactor(), conv.DilationWFactor()),
                       "same_padding": conv.Padding() == schema.Padding.SAME}
        found.append(Layer(op["op_name"], tensor_names[source], tensor_names[op["outputs"][0]], weight, bias,
                           **options))
    return found


def patches(layer: Layer, array: np.ndarray, kernel: tuple[int, int]) -> torch.Tensor:
    """The layer's NHWC input as the rows its weights multiply: `[rows, groups, width]`, one group for a dense
    layer (width kh·kw·cin, TFLite's weight order), one per channel for a depthwise layer (width kh·kw)."""
    x = torch.from_numpy(np.ascontiguousarray(array)).double()
    if layer.kind == "FULLY_CONNECTED":
        return x.reshape(-1, 1, x.shape[-1])
    x = x.permute(0, 3, 1, 2)
    if layer.same_padding:
        pads = []
        for size, k, s, d in zip(x.shape[:1:-1], kernel[::-1], layer.stride[::-1], layer.dilation[::-1],
                                 strict=True):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        x = torch.nn.functional.pad(x, pads)
    columns = torch.nn.functional.unfold(x, kernel, layer.dilation, 0, layer.stride)  # [n, cin·kh·kw, positions]
    n, channels = x.shape[:2]
    columns = columns.reshape(n, channels, kernel[0] * kernel[1], -1).permute(0, 3, 2, 1)  # [n, pos, k, cin]
    if layer.depthwise:
        return columns.permute(0, 1, 3, 2).reshape(-1, channels, kernel[0] * kernel[1])
    return columns.reshape(-1, 1, kernel[0] * kernel[1] * channels)


def moments(integer: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """`Σ x̂ x̂ᵀ` and `Σ x̂ xᵀ` per group over the rows of one image's (integer, float) patches, each row extended
    by a constant 1 for the bias: `[2, groups, width+1, width+1]`."""
    ones = torch.ones(*integer.shape[:2], 1, dtype=integer.dtype)
    integer, real = torch.cat([integer, ones], 2), torch.cat([real, ones], 2)
    return torch.stack([torch.einsum("rgi,rgj->gij", integer, integer), torch.einsum("rgi,rgj->gij", integer, real)])


def solve(sums: torch.Tensor, target: torch.Tensor, ridge: float) -> torch.Tensor:
    """Weights `[rows, width+1]` (bias last) whose output on the integer inputs best matches the float weights'
    (`target`) on the float inputs, in least squares pulled towards `target` by `ridge` (of the mean input
    energy): where the images do not pin a weight down, it stays the float model's. Row r uses group r's sums
    (one group: all rows share them)."""
    gram, cross = sums
    energy = gram.diagonal(dim1=1, dim2=2)[:, :-1].mean(1)
    pull = ridge * torch.where(energy > 0, energy, energy.mean())[:, None, None]  # a dead channel takes the mean
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype)
    regular, towards = gram + pull * eye, cross + pull * eye
    if gram.shape[0] == 1:
        return torch.linalg.solve(regular[0], towards[0] @ target.T).T
    return torch.linalg.solve(regular, towards @ target[:, :, None])[:, :, 0]


def validated_solve(train: torch.Tensor, held_out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`solve` on all the sums with the ridge from `RIDGES` that fits the held-out images best: a 1×1 conv over
    960 channels at 7×7, or a classifier over 1280 features, has about as many weights as calibration rows,
    and an unchecked fit would learn the calibration images' noise."""

    def quadratic(left: torch.Tensor, matrix: torch.Tensor, right: torch.Tensor) -> float:
        pattern = "oi,ij,oj->" if matrix.shape[0] == 1 else "gi,gij,gj->"
        return float(torch.einsum(pattern, left, matrix[0] if matrix.shape[0] == 1 else matrix, right))

    def held_out_error(weights: torch.Tensor) -> float:  # Σ‖x̂ᵀw − xᵀt‖² without the constant Σ‖xᵀt‖²
        gram, cross = held_out
        return quadratic(weights, gram, weights) - 2 * quadratic(weights, cross, target)

    best = min(RIDGES, key=lambda ridge: held_out_error(solve(train, target, ridge)))
    return solve(train + held_out, target, best)


def round_int8(weights: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ to symmetric int8 codes in [−127, 127] with one scale per row; the last column (the bias) is left
    unrounded and absorbs the rounding error of the others. Returns codes, scales and the compensated bias."""
    weights = weights.clone()
    width = weights.shape[1] - 1
    scales = (weights[:, :width].abs().amax(1) / 127).clamp(min=1e-12)
    hessian = gram.clone()
    dead = hessian.diagonal(dim1=1, dim2=2) == 0  # inputs that never fire: any weight does
    hessian.diagonal(dim1=1, dim2=2)[dead] = 1
    mean = hessian.diagonal(dim1=1, dim2=2).mean(1)
    hessian += DAMP * mean[:, None, None] * torch.eye(width + 1, dtype=hessian.dtype)
    factor = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    codes = torch.empty(weights.shape[0], width, dtype=torch.int8)
    for i in range(width):
        code = torch.clamp(torch.round(weights[:, i] / scales), -127, 127)
        codes[:, i] = code.to(torch.int8)
        error = (weights[:, i] - code * scales) / factor[:, i, i]
        weights[:, i:] -= error[:, None] * factor[:, i, i:]
    return codes, scales, weights[:, width]


def refit(buffer: bytearray, float_weights: Callable[[Layer], tuple[np.ndarray, np.ndarray]],
          pairs: Callable[[Layer], Iterable[tuple[np.ndarray, np.ndarray]]], layers: list[Layer],
          input_scale: Callable[[Layer], float], output_error: Callable[[bytes], float],
          progress: Callable[[list[Layer]], Iterable[Layer]] = iter) -> int:
    """Refit `layers` of the integer model in `buffer` one after another, in place. `float_weights` gives a
    layer's float weights (TFLite layout) and bias; `pairs` its (integer-model, float-model) input per image,
    read from `buffer` as refitted so far. A refit is kept only if it brings the model's outputs closer to the
    float model's (`output_error`, on images the fits do not use): a layer's own error is not the model's, and
    past ReLU6 or a per-tensor scale a locally better layer can be worse downstream. Returns the refits kept."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(buffer, 0)
    graph = model.Subgraphs(0)
    error, kept = output_error(bytes(buffer)), 0
    for layer in progress(layers):
        before = bytes(buffer)
        weight, bias = float_weights(layer)
        kernel = (1, 1) if layer.kind == "FULLY_CONNECTED" else tuple(weight.shape[1:3])
        rows = weight.reshape(weight.shape[0], -1) if not layer.depthwise else weight.reshape(-1, weight.shape[-1]).T
        target = torch.cat([torch.from_numpy(rows).double(), torch.from_numpy(bias).double()[:, None]], 1)
        sums = torch.zeros(2, 2, 1 if not layer.depthwise else rows.shape[0], rows.shape[1] + 1, rows.shape[1] + 1,
                           dtype=torch.float64)
        for image, (integer, real) in enumerate(pairs(layer)):
            sums[int(image % HELD_OUT == HELD_OUT - 1)] += moments(patches(layer, integer, kernel),
                                                                   patches(layer, real, kernel))
        codes, scales, compensated = round_int8(validated_solve(sums[0], sums[1], target), sums.sum(0)[0])
        weight_tensor, bias_tensor = graph.Tensors(layer.weight), graph.Tensors(layer.bias)
        stored = buffer_view(buffer, model.Buffers(weight_tensor.Buffer()), np.int8)
        stored[:] = (codes.T if layer.depthwise else codes).reshape(-1).numpy()
        weight_tensor.Quantization().ScaleAsNumpy()[:] = scales.numpy()
        bias_scales = input_scale(layer) * scales.double()
        bias_tensor.Quantization().ScaleAsNumpy()[:] = bias_scales.numpy()
        buffer_view(buffer, model.Buffers(bias_tensor.Buffer()), np.int32)[:] = torch.clamp(
            torch.round(compensated / bias_scales), -(2**31), 2**31 - 1).to(torch.int64).numpy()
        refitted = output_error(bytes(buffer))
        if refitted < error:
            error, kept = refitted, kept + 1
        else:
            buffer[:] = before
    return kept


def buffer_view(buffer: bytearray, stored: Any, dtype: type) -> np.ndarray:
    """A writable view of one flatbuffer buffer: inline data, or data placed after the flatbuffer (offset and
    size), as large models and some quantizers write it."""
    if stored.DataLength():
        return stored.DataAsNumpy().view(dtype)
    return np.frombuffer(buffer, dtype=dtype, count=stored.Size() // np.dtype(dtype).itemsize,
                         offset=stored.Offset())
