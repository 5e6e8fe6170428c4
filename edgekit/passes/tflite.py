"""Export to TFLite: litert-torch converts the torch module, ai-edge-quantizer sets its precision.

litert-torch is the converter because it installs beside torch without TensorFlow (onnx2tf needs
TensorFlow 2.19 and pins onnx/onnxruntime/numpy below this stack's). Images go in NHWC, the
layout LiteRT, NNAPI and the Edge TPU expect, so the wrapper transposes at the input.

Precisions: `fp32`; `fp16` (fp16 weights, float compute); `int8-dynamic` (int8 weights, float
activations quantized on the fly); `int8` (full integer: int8 weights and activations, int8 input
and output, with the ONNX path's MSE-clipped ranges and empirical bias correction).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekit.errors import StageError, first_line
from edgekit.runtimes.litert import from_tensor, to_tensor

if TYPE_CHECKING:
    import torch

SIGNATURE = "serving_default"


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


def tflite_precision(float_model: bytes, precision: str, calibration: np.ndarray | None = None) -> bytes:
    """The float model at `precision` (fp32, fp16, int8-dynamic, int8); int8 needs NCHW calibration images."""
    if precision == "fp32":
        return float_model
    from ai_edge_quantizer import algorithm_manager, qtyping, quantizer, recipe

    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if precision == "int8-dynamic":
            engine = quantizer.Quantizer(float_model, recipe.dynamic_wi8_afp32())
            return bytes(engine.quantize().quantized_model)
        if precision == "fp16":
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
        engine = quantizer.Quantizer(float_model, recipe.static_wi8_ai8())
        images = calibration.transpose(0, 2, 3, 1)
        ranges = engine.calibrate({SIGNATURE: [{_input_name(float_model): images[:1]}]})
        for tensor, (low, high) in _mse_ranges(float_model, list(ranges), images).items():
            ranges[tensor]["min"] = np.full_like(ranges[tensor]["min"], low)
            ranges[tensor]["max"] = np.full_like(ranges[tensor]["max"], high)
        return _correct_bias(bytes(engine.quantize(ranges).quantized_model), float_model, images)


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


def _mse_ranges(model: bytes, names: list[str], images: np.ndarray, per_image: int = 512) -> dict[str, tuple]:
    """MSE-optimal clipped range of each named activation over the calibration images (the ONNX path's rule)."""
    from edgekit.passes.int8 import draw_values, mse_clip

    known = {t["name"] for t in _every_tensor(model).get_tensor_details()}
    wanted = sorted(name for name in names if name in known)  # a fixed order: the same draws every build
    samples = draw_values(_tensor_stream(model, wanted, images), per_image)
    return {name: mse_clip(values, symmetric=False) for name, values in zip(wanted, samples, strict=True)}


def _correct_bias(quantized: bytes, float_model: bytes, images: np.ndarray) -> bytes:
    """Empirical bias correction of a full-integer model, as on the ONNX path: layer by layer in graph order,
    the per-channel mean of each conv/FC output is brought back to the float model's through its int32 bias
    (patched in place in the flatbuffer; the model's layout does not change)."""
    from ai_edge_litert import schema_py_generated as schema

    from edgekit.passes.int8 import stream_channel_means

    buffer = bytearray(quantized)
    graph_model = schema.Model.GetRootAs(buffer, 0)
    graph = graph_model.Subgraphs(0)
    probe = _every_tensor(quantized)
    names = {t["index"]: t["name"] for t in probe.get_tensor_details()}
    layers = [op for op in probe._get_ops_details()  # LiteRT's only Python listing of a model's ops
              if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
              and len(op["inputs"]) > 2 and op["inputs"][2] >= 0]
    outputs = [names[op["outputs"][0]] for op in layers]
    targets = stream_channel_means(_tensor_stream(float_model, outputs, images), axis=-1)
    for op, name, target in zip(layers, outputs, targets, strict=True):
        (current,) = stream_channel_means(_tensor_stream(bytes(buffer), [name], images), axis=-1)
        bias = graph.Tensors(op["inputs"][2])
        scale = bias.Quantization().ScaleAsNumpy().astype(np.float64)
        values = _int32_view(buffer, graph_model.Buffers(bias.Buffer()))
        steps = np.round((target - current) / scale).astype(np.int64)
        values[:] = np.clip(values.astype(np.int64) + steps, -(2**31), 2**31 - 1)
    return bytes(buffer)


def _int32_view(buffer: bytearray, stored: Any) -> np.ndarray:
    """A writable int32 view of one flatbuffer buffer: inline data, or data placed after the flatbuffer
    (offset and size), as large models and some quantizers write it."""
    if stored.DataLength():
        return stored.DataAsNumpy().view(np.int32)
    return np.frombuffer(buffer, dtype=np.int32, count=stored.Size() // 4, offset=stored.Offset())


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
