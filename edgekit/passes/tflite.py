"""Export to TFLite: litert-torch converts the torch module, ai-edge-quantizer sets its precision.

litert-torch is the converter because it installs beside torch without TensorFlow (onnx2tf needs
TensorFlow 2.19 and pins onnx/onnxruntime/numpy below this stack's). Images go in NHWC, the
layout LiteRT, NNAPI and the Edge TPU expect, so the wrapper transposes at the input.

Precisions: `fp32`; `fp16` (fp16 weights, float compute); `int8-dynamic` (int8 weights, float
activations quantized on the fly); `int8` (int8 weights and activations, int8 input and output: the ONNX
path's range rules, each range then searched against the model's output, then every conv/FC layer refitted
on the integer model's own inputs: `litert_refit`). `Int8Fit` says which of those run and which ops a family
keeps in float (a detector's decode), whose outputs are then float.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekit.errors import StageError, first_line
from edgekit.passes.int8 import Calibration, stream_ranges
from edgekit.passes.litert_refit import HELD_OUT, Layer, layers_of, refit
from edgekit.runtimes.litert import LiteRtRunner, from_tensor, to_tensor

if TYPE_CHECKING:
    import torch

SIGNATURE = "serving_default"
RANGE_FACTORS = (0.6, 0.8, 0.9, 1.1, 1.25)  # each activation range's candidates, as multiples of its current one
RANGE_SWEEPS = 3  # MobileNetV2, held-out KL from the float model's predictions: 0.017, 0.012, 0.011 after 1, 2, 3


class ConverterFailed(StageError):
    """The converter's own reason on the first line; its full output travels in `log`."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(message)
        self.log = log


def convert_tflite(module: torch.nn.Module, input_shape: tuple[int, ...]) -> bytes:
    """`module` (NCHW) as a float TFLite flatbuffer with an NHWC input."""
    import litert_torch
    import torch

    batch, channels, height, width = input_shape
    log = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            warnings.simplefilter("ignore")
            wrapped = litert_torch.to_channel_last_io(module.eval(), args=[0]).eval()
            model = litert_torch.convert(wrapped, (torch.zeros(batch, height, width, channels),))
            return bytes(model.model_content())
    except Exception as err:  # the converter raises from torch.export, MLIR and flatbuffer layers alike
        raise ConverterFailed(f"TFLite conversion failed: {type(err).__name__}: {first_line(err)}",
                              f"{log.getvalue()}\n{type(err).__name__}: {err}") from err


@dataclass(frozen=True)
class Int8Fit:
    """How a full-integer model is fitted: the first activation ranges (`int8.stream_ranges`), the sweeps of the
    range search (0: none), whether each layer is refitted, and the ops (by output tensor name) left in float."""

    calibration: Calibration = "mse"
    range_sweeps: int = RANGE_SWEEPS
    refit: bool = True
    keep_float: tuple[str, ...] = ()


def tflite_precision(float_model: bytes, precision: str, calibration: np.ndarray | None = None,
                     fit: Int8Fit = Int8Fit(),
                     progress: Callable[[list[Any], str], Iterable[Any]] = lambda items, _what: items) -> bytes:
    """The float model at `precision` (fp32, fp16, int8-dynamic, int8); int8 needs NCHW calibration images, and
    reports its range search and layer refit through `progress(items, what)`."""
    if precision == "fp32":
        return float_model
    from ai_edge_quantizer import algorithm_manager, qtyping, quantizer, recipe

    if precision == "int8-dynamic":
        with _quiet():
            return bytes(quantizer.Quantizer(float_model, recipe.dynamic_wi8_afp32()).quantize().quantized_model)
    if precision == "fp16":
        with _quiet():
            engine = quantizer.Quantizer(float_model)
            engine.update_quantization_recipe(
                regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                algorithm_key=algorithm_manager.AlgorithmName.FLOAT_CASTING,
                op_config=qtyping.OpQuantizationConfig(
                    weight_tensor_config=qtyping.TensorQuantizationConfig(
                        num_bits=16, dtype=qtyping.TensorDataType.FLOAT),
                    compute_precision=qtyping.ComputePrecision.FLOAT, explicit_dequantize=True),
            )
            return bytes(engine.quantize().quantized_model)
    if precision != "int8" or calibration is None:
        raise ValueError(f"no TFLite recipe for {precision}")
    images = calibration.transpose(0, 2, 3, 1)
    with _quiet():
        engine = quantizer.Quantizer(float_model, recipe.static_wi8_ai8())
        for name in fit.keep_float:  # an op's scope is its output names and a ";"; later entries override ".*"
            engine.update_quantization_recipe(regex=re.escape(name) + ";$",
                                              operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                                              algorithm_key=algorithm_manager.AlgorithmName.NO_QUANTIZE)
        ranges = engine.calibrate({SIGNATURE: [{_input_name(float_model): images[:1]}]})

    def quantize(bounds: dict[str, tuple[float, float]]) -> bytes:
        for tensor, (low, high) in bounds.items():
            ranges[tensor]["min"] = np.full_like(ranges[tensor]["min"], low)
            ranges[tensor]["max"] = np.full_like(ranges[tensor]["max"], high)
        with _quiet():
            return bytes(engine.quantize(ranges).quantized_model)

    bounds = _activation_ranges(float_model, list(ranges), images, fit.calibration)
    if fit.range_sweeps:
        bounds = _searched_ranges(quantize, bounds, _output_error(float_model, calibration), fit.range_sweeps,
                                  progress)
    if not fit.refit:
        return quantize(bounds)
    return _refit(quantize(bounds), float_model, images,
                  _output_error(float_model, calibration[HELD_OUT - 1 :: HELD_OUT]),
                  lambda items: progress(items, "layers refitted"))


def int8_scheme(fit: Int8Fit, dynamic: bool) -> dict[str, Any]:
    """The report's scheme of a TFLite int8 artifact quantized by `tflite_precision` with `fit`."""
    searched = f", each range then searched against the model's output ({fit.range_sweeps} sweeps at most)"
    return {"format": "TFLite", "engine": "ai-edge-quantizer", "weights": "int8, symmetric, per output channel",
            "activations": "float, quantized at run time per tensor" if dynamic else "int8, asymmetric, per tensor",
            "calibration": None if dynamic else fit.calibration + (searched if fit.range_sweeps else ""),
            "weights_fit": "layer-wise least squares on the integer model's inputs, GPTQ rounding"
            if fit.refit and not dynamic else None}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The quantizer prints its progress and warnings; the build shows its own."""
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _output_error(float_model: bytes, images: np.ndarray) -> Callable[[bytes], float]:
    """How far a model's outputs on `images` (NCHW) are from the float model's: their mean squared difference."""
    expected = LiteRtRunner(float_model, 1).run(images)
    return lambda model: float(np.mean((LiteRtRunner(model, 1).run(images) - expected) ** 2))


def _searched_ranges(quantize: Callable[[dict[str, tuple[float, float]]], bytes],
                     bounds: dict[str, tuple[float, float]], output_error: Callable[[bytes], float], sweeps: int,
                     progress: Callable[[list[str], str], Iterable[str]]) -> dict[str, tuple[float, float]]:
    """Each activation range in turn scaled by the factor of `RANGE_FACTORS` that brings the model's output
    closest to the float model's, in up to `sweeps` sweeps (each starts from the ranges the last one
    chose): the MSE clip is best for each tensor alone, but what a coarser or finer step costs depends on the
    layers after it (the network-loss view of loss-aware PTQ, Nahshan et al., 2019, searched greedily).
    Quantizing with given ranges takes milliseconds, so each candidate is a real model."""
    best = output_error(quantize(bounds))
    for sweep in range(sweeps):
        start = best
        for tensor in progress(list(bounds), f"activation ranges searched, sweep {sweep + 1} of {sweeps}"):
            low, high = bounds[tensor]
            for factor in RANGE_FACTORS:
                trial = {**bounds, tensor: (low * factor, high * factor)}
                error = output_error(quantize(trial))
                if error < best:
                    best, bounds = error, trial
        if best == start:
            break
    return bounds


def _every_tensor(model: bytes) -> Any:
    """An interpreter that keeps every intermediate tensor readable: no delegate, which would fuse them away."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(model_content=model, experimental_preserve_all_tensors=True,
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    return interpreter


def _tensor_stream(model: bytes, names: list[str], images: np.ndarray) -> Iterator[list[np.ndarray]]:
    """The named tensors (dequantized when integer) for each NHWC image in turn."""
    interpreter = _every_tensor(model)
    details = {t["name"]: t for t in interpreter.get_tensor_details()}
    source = interpreter.get_input_details()[0]
    for image in images:
        interpreter.set_tensor(source["index"], to_tensor(image[None], source))
        interpreter.invoke()
        yield [from_tensor(interpreter.get_tensor(details[name]["index"]), details[name]) for name in names]


def _activation_ranges(model: bytes, names: list[str], images: np.ndarray, method: Calibration,
                       per_image: int = 512) -> dict[str, tuple[float, float]]:
    """Each named activation's range over the calibration images by the ONNX path's rule (`int8.stream_ranges`;
    asymmetric: TFLite's int8 activations carry a zero point), in graph order."""
    asked = set(names)
    # graph order: fixed, so every build draws the same values, and the order the range search visits them in
    wanted = [t["name"] for t in sorted(_every_tensor(model).get_tensor_details(), key=lambda t: t["index"])
              if t["name"] in asked]
    found = stream_ranges(_tensor_stream(model, wanted, images), method, symmetric=False, per_image=per_image)
    return dict(zip(wanted, found, strict=True))


def _refit(quantized: bytes, float_model: bytes, images: np.ndarray, output_error: Callable[[bytes], float],
           progress: Callable[[list[Layer]], Iterable[Layer]]) -> bytes:
    """Every int8 conv/FC layer of the model refitted on its own integer inputs (NHWC `images`), each refit
    judged by `output_error` (`litert_refit`)."""
    buffer = bytearray(quantized)
    probe, reference = _every_tensor(quantized), _every_tensor(float_model)
    details = {t["index"]: t for t in probe.get_tensor_details()}
    by_name = {d["name"]: d for d in details.values()}
    names = {t["index"]: t["name"] for t in reference.get_tensor_details()}
    float_ops = {names[op["outputs"][0]]: op for op in reference._get_ops_details()}
    layers = [layer for layer in layers_of(buffer, {i: d["name"] for i, d in details.items()}, probe._get_ops_details())
              if details[layer.weight]["dtype"] == np.int8]  # layers kept in float (`Int8Fit.keep_float`) stay

    def float_weights(layer: Layer) -> tuple[np.ndarray, np.ndarray]:
        op = float_ops[layer.output]
        return reference.get_tensor(op["inputs"][1]), reference.get_tensor(op["inputs"][2])

    def pairs(layer: Layer) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        integer = _tensor_stream(bytes(buffer), [layer.input], images)
        real = _tensor_stream(float_model, [layer.input], images)
        return ((a[0], b[0]) for a, b in zip(integer, real, strict=True))

    refit(buffer, float_weights, pairs, layers, lambda layer: float(by_name[layer.input]["quantization"][0]),
          output_error, progress)
    return bytes(buffer)


def location_segment(layer: object, attribute: str) -> str:
    """How litert-torch names the module `layer`, held by its parent as `attribute`, in an op's location (a chain of
    these, outermost first): `torchvision.models.mobilenetv2.InvertedResidual_3`."""
    return f"{type(layer).__module__}.{type(layer).__qualname__}_{attribute}"


def op_outputs(model: bytes) -> list[tuple[str, str]]:
    """Each op of the model as (op type, its first output's name), in graph order: what `Int8Fit.keep_float`
    names ops by."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model)
    names = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
    return [(op["op_name"], names[op["outputs"][0]]) for op in interpreter._get_ops_details()]


def _input_name(model: bytes) -> str:
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_content=model).get_signature_list()[SIGNATURE]["inputs"][0]


def io_details(model: bytes) -> dict[str, list[dict[str, Any]]]:
    """Names, shapes, dtypes and quantization of the model's inputs and outputs: what an app needs to call it."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model)

    def describe(details: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rows = []
        for d in details:
            scale, zero_point = d["quantization"]
            row = {"name": d["name"], "shape": [int(x) for x in d["shape"]], "dtype": np.dtype(d["dtype"]).name}
            if scale:
                row["quantization"] = {"scale": float(scale), "zero_point": int(zero_point)}
            rows.append(row)
        return rows

    return {"inputs": describe(interpreter.get_input_details()),
            "outputs": describe(interpreter.get_output_details())}
