"""Static INT8 in QDQ form: onnxruntime's quantizer does the rounding; edgekit chooses, corrects and checks.

- Weights per channel, symmetric int8; activations calibrated on real images, as uint8 (what
  onnxruntime and LiteRT run fastest on CPUs) or symmetric int8 (what TensorRT requires).
- Activation ranges are clipped to the least squared quantization error (`mse`, the default), then
  computed once per (graph, images, method, scheme) and cached: every later quantization of the
  same graph (sensitivity probes, layers kept in float) reuses them.
- Empirical bias correction (Nagel et al., "Data-Free Quantization", §4.2): quantization shifts
  the mean of each layer's output; layer by layer, in graph order, the per-channel mean of the
  quantized output on calibration images is brought back to the float one through the bias.
- Sensitivity: each layer quantized alone, the output's noise-to-signal ratio against float.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from edgekit.cache import canonical_json, checked_json
from edgekit.passes.qdq_sharing import VALUE_MOVERS, hoist, share_ranges, sharing_groups
from edgekit.runtimes.onnxruntime import OnnxRuntimeRunner

if TYPE_CHECKING:
    import onnx

QUANTIZABLE = ("Conv", "Gemm", "MatMul", "ConvTranspose")
Calibration = Literal["mse", "mean-minmax", "minmax", "entropy", "percentile"]
SevenBitWeights = Literal["none", "saturating", "all"]
QDQ_MIN_OPSET = 13
OWN_RULES = ("mse", "mean-minmax", "minmax")  # `stream_ranges`; entropy and percentile are onnxruntime's
CLIP_GRID = np.linspace(0.2, 1.0, 17)  # fractions of the observed min/max a range may be clipped to


@dataclass(frozen=True)
class Int8Scheme:
    """`int8-symmetric` is TensorRT's form: zero points of 0 and float biases (its parser takes int8 Q/DQ only)."""

    activations: Literal["uint8", "int8-symmetric"]
    calibration: Calibration = "mse"
    bias_correction: bool = True
    # weights in 7 bits (-64..63) on no layer, on every layer, or on the layers whose full-range weights saturate
    # x86 kernels that add uint8 x int8 products in int16 pairs (int16_pairs.py)
    seven_bit_weights: SevenBitWeights = "none"
    # activations quantized only where a conv or matmul reads them, and their outputs left float (the next layer's
    # input is quantized after the activation function, not before it as well): OpenVINO fuses those into its int8
    # kernels and runs every other Q/DQ pair as ops of its own (YOLO11n: 90 ms with them, 73 ms without, the same
    # mAP); a second rounding of each conv's output before its SiLU cost YOLO11n 0.8 mAP50-95 points in OpenVINO.
    # The rounding moves above the ops that only move values, so OpenVINO runs those in int8 (qdq_sharing.py)
    weighted_inputs_only: bool = False

    @property
    def symmetric(self) -> bool:
        return self.activations == "int8-symmetric"

    @property
    def int32_bias(self) -> bool:
        return not self.symmetric

    def describe(self) -> dict[str, Any]:
        return {
            "format": "QDQ",
            "weights": "int8" + {"none": "", "all": " in 7 bits (-64..63)",
                                 "saturating": " (7 bits, -64..63, where 8 would saturate int16 pairs)"}[
                                     self.seven_bit_weights] + ", symmetric, per output channel",
            "activations": "int8, symmetric, per tensor" if self.symmetric else "uint8, asymmetric, per tensor",
            "bias": "int32" if self.int32_bias else "float",
            "calibration": self.calibration,
            "bias_correction": self.bias_correction,
            "quantized_ops": f"inputs of {', '.join(QUANTIZABLE)}, each value rounded once, above the "
            f"{', '.join(VALUE_MOVERS)} ops between (Resize: nearest only; one scale where they meet)"
            if self.weighted_inputs_only
            else "every op the quantizer takes",
            "engine": "onnxruntime.quantization",
        }


class Int8Quantizer:
    """One graph, one calibration set, one scheme: quantizations that differ only in which layers stay float."""

    def __init__(self, model: onnx.ModelProto, calibration: np.ndarray, scheme: Int8Scheme, ranges: Path | None,
                 threads: int, bias_images: int | None = None) -> None:
        """`ranges`: the cache entry of the calibration ranges across builds (checked when read, recomputed if it is
        not intact); None keeps them for this quantizer only.
        `bias_images`: the first this many calibration images serve bias correction (default: all)."""
        import onnx

        self.prepared = _prepare(model)
        self._scratch = tempfile.TemporaryDirectory()  # removed with the quantizer
        self._source = Path(self._scratch.name) / "prepared.onnx"
        onnx.save(self.prepared, str(self._source))  # once: every quantization and the calibration read it
        self.calibration = calibration
        self.scheme = scheme
        self.ranges = ranges
        self._checked_ranges = Path(self._scratch.name) / "ranges.json"  # what onnxruntime reads: verified ranges
        self.ranges_digest: str | None = None  # sha256 of the ranges every quantization used, once calibrated
        self.threads = threads
        self.always_float: tuple[str, ...] = ()
        self.bias_images = bias_images or len(calibration)
        self.int16_pairs: list[dict[str, Any]] | None = None  # the emulation's rows, once run

    def keep_float(self, names: list[str]) -> None:
        """Nodes (of `prepared`) no quantization of this graph touches: the family's known INT8 breakers."""
        self.always_float = tuple(names)

    def layers(self) -> list[str]:
        return [node.name for node in self.prepared.graph.node
                if node.op_type in QUANTIZABLE and node.name not in self.always_float]

    def quantize(self, exclude: tuple[str, ...] = (), only: tuple[str, ...] | None = None,
                 progress: Callable[[list[Any]], Any] = iter) -> onnx.ModelProto:
        """The QDQ graph with `exclude` kept float (or only `only` quantized), bias-corrected if the scheme says."""
        from edgekit.passes.int16_pairs import with_weights_of

        self._calibrate()
        quantized = self._quantize(exclude, only, self.scheme.seven_bit_weights == "all")
        seven = self.seven_bit_layers() & set(self.layers() if only is None else only)
        if seven:
            with_weights_of(quantized, self._quantize(exclude, only, True), seven)
        if self.scheme.bias_correction and only is None:
            correct_bias(quantized, self.prepared, self.calibration[: self.bias_images], self.threads, progress)
        return quantized

    def seven_bit_layers(self) -> set[str]:
        """The layers that take 7-bit weights under the `saturating` scheme: emulated once, on two calibration
        images (int16_pairs.py)."""
        if self.scheme.seven_bit_weights != "saturating":
            return set()
        if self.int16_pairs is None:
            from edgekit.passes.int16_pairs import saturating_layers

            self._calibrate()
            self.int16_pairs = saturating_layers(self.prepared, self._quantize((), None, False),
                                                 self._quantize((), None, True), self.calibration[:2], self.threads)
        return {row["layer"] for row in self.int16_pairs if row["seven_bit"]}

    def _quantize(self, exclude: tuple[str, ...], only: tuple[str, ...] | None, seven_bit: bool) -> onnx.ModelProto:
        """onnxruntime's QDQ graph over the checked ranges, graph outputs left float."""
        import onnx
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        symmetric = self.scheme.symmetric
        weighted_only = list(QUANTIZABLE) if self.scheme.weighted_inputs_only else None
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "out.onnx"
            logging.disable(logging.WARNING)  # the quantizer logs advice on every call; the report says what ran
            try:
                quantize_static(
                    str(self._source), str(target), _Reader(self.prepared.graph.input[0].name, self.calibration),
                    quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                    calibrate_method=self._method(),
                    nodes_to_quantize=list(only) if only is not None else None,
                    op_types_to_quantize=weighted_only,
                    nodes_to_exclude=[*self.always_float, *exclude], reduce_range=seven_bit,
                    calibration_cache_path=str(self._checked_ranges),
                    extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True,
                                   "QuantizeBias": self.scheme.int32_bias,
                                   "OpTypesToExcludeOutputQuantization": weighted_only or []},
                )
            finally:
                logging.disable(logging.NOTSET)
            quantized = onnx.load(str(target))
        _float_outputs(quantized)
        if self.scheme.weighted_inputs_only:
            hoist(quantized)
        return quantized

    def _method(self) -> Any:
        from onnxruntime.quantization import CalibrationMethod

        return {"mse": CalibrationMethod.MinMax, "mean-minmax": CalibrationMethod.MinMax,
                "minmax": CalibrationMethod.MinMax,
                "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile,
                }[self.scheme.calibration]

    def _calibrate(self) -> None:
        """Activation ranges, computed once and stored where onnxruntime's quantizer reads its cache.

        `mse` clips each tensor's range to the one that minimises the mean squared quantization
        error over a sample of its calibration values; `mean-minmax` averages each tensor's
        per-image min and max. Both stop a few outliers from stretching a range every value pays for.
        Those and `minmax` are edgekit's own (`stream_ranges`); `entropy` and `percentile` onnxruntime's.
        Cached ranges are used only if intact: onnxruntime reads a private copy of what was checked."""
        if self.ranges_digest is not None:
            return
        ranges = checked_json(self.ranges, self._compute_ranges)
        if self.scheme.weighted_inputs_only:
            ranges = share_ranges(ranges, sharing_groups(self.prepared, QUANTIZABLE, self.always_float))
        canonical = canonical_json(ranges)
        self._checked_ranges.write_bytes(canonical)
        self.ranges_digest = hashlib.sha256(canonical).hexdigest()

    def _compute_ranges(self) -> dict[str, Any]:
        """The ranges in onnxruntime's calibration-cache form (`save_tensors_data`), as JSON."""
        from onnxruntime.quantization import TensorsData, create_calibrator, save_tensors_data
        from onnxruntime.quantization.calibrate import MinMaxCalibrater

        with tempfile.TemporaryDirectory() as tmp:
            if self.scheme.calibration in OWN_RULES:  # streamed image by image: a 1024 px ViT's every tensor for
                plain = MinMaxCalibrater(self._source)  # 16 images, as onnxruntime's calibrators hold them, is 24 GB+
                # sorted: onnxruntime's order varies between processes; the samples must not
                names = sorted(plain.select_tensors_to_calibrate(plain.model)[0])
                runner = OnnxRuntimeRunner(with_outputs(self.prepared, names), self.threads)
                per_tensor = stream_ranges(runner.stream(self.calibration, names), self.scheme.calibration,
                                           self.scheme.symmetric)
                ranges = TensorsData(self._method(), {
                    name: (np.array([min(lo, 0.0)], np.float32), np.array([max(hi, 0.0)], np.float32))
                    for name, (lo, hi) in zip(names, per_tensor, strict=True)
                })
            else:
                calibrator = create_calibrator(self._source, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                               calibrate_method=self._method())
                calibrator.collect_data(_Reader(self.prepared.graph.input[0].name, self.calibration))
                ranges = calibrator.compute_data()
            saved = Path(tmp) / "ranges.json"
            save_tensors_data(ranges, saved)
            return json.loads(saved.read_text())

    def sensitivity(self, inputs: np.ndarray, progress: Callable[[list[str]], Any] = iter) -> list[dict[str, Any]]:
        """Each layer quantized alone: the output's noise-to-signal ratio (and top-1 changes for score vectors),
        worst first."""
        ops = {node.name: node.op_type for node in self.prepared.graph.node}
        reference = OnnxRuntimeRunner(self.prepared.SerializeToString(), self.threads).run(inputs)
        rows = []
        for name in progress(self.layers()):
            model = self.quantize(only=(name,))
            outputs = OnnxRuntimeRunner(model.SerializeToString(), self.threads).run(inputs)
            row = {"layer": name, "op": ops[name], "nsr": noise_to_signal(reference, outputs)}
            if reference.ndim == 2:  # one score vector per sample: how often the top class moves
                row["top1_changed"] = float((outputs.argmax(1) != reference.argmax(1)).mean())
            rows.append(row)
        return sorted(rows, key=lambda row: -row["nsr"])


def noise_to_signal(reference: np.ndarray, outputs: np.ndarray) -> float:
    """Squared error over squared signal. For outputs with channels along axis 1 and positions after it (a
    detector's boxes in pixels beside scores in 0-1), each channel's ratio is taken alone and averaged, so a
    channel with small values counts as much as one with large."""
    noise = (outputs.astype(np.float64) - reference) ** 2
    signal: np.ndarray = reference.astype(np.float64) ** 2
    if reference.ndim < 3:
        return float(noise.sum() / signal.sum())
    axes = tuple(i for i in range(reference.ndim) if i != 1)
    return float(np.mean(noise.sum(axis=axes) / np.maximum(signal.sum(axis=axes), 1e-12)))


def stream_ranges(stream: Iterable[list[np.ndarray]], method: Calibration, symmetric: bool,
                  per_image: int = 2000) -> list[tuple[float, float]]:
    """Each tensor's range over a stream of per-image tensor lists: `mse` clips it to the least squared 8-bit
    error on a seeded sample of `per_image` values from each image (the same images give the same ranges),
    `mean-minmax` averages the per-image extremes, `minmax` takes the extremes."""
    if method == "mse":
        return [mse_clip(values, symmetric) for values in draw_values(stream, per_image)]
    extremes = np.array([[(o.min(), o.max()) for o in tensors] for tensors in stream])
    if method == "mean-minmax":
        return [(float(lo), float(hi)) for lo, hi in extremes.mean(axis=0)]
    if method == "minmax":
        return [(float(lo), float(hi)) for lo, hi in np.stack([extremes[:, :, 0].min(0), extremes[:, :, 1].max(0)], 1)]
    raise ValueError(f"calibration {method} has no range rule of edgekit's")


def draw_values(stream: Iterable[list[np.ndarray]], per_image: int) -> list[np.ndarray]:
    """A seeded sample of `per_image` values of each tensor from each image's list of tensors, joined per tensor."""
    rng = np.random.default_rng(0)
    drawn: list[list[np.ndarray]] = []
    for tensors in stream:
        drawn = drawn or [[] for _ in tensors]
        for values, tensor in zip(drawn, tensors, strict=True):
            flat = tensor.ravel()
            values.append(flat[rng.integers(0, flat.size, per_image)])
    return [np.concatenate(values).astype(np.float64) for values in drawn]


def mse_clip(values: np.ndarray, symmetric: bool) -> tuple[float, float]:
    """The (low, high) range, clipped from the values' extremes by a factor on CLIP_GRID, whose 8-bit
    quantize-dequantize round trip has the least mean squared error on `values`."""
    low, high = min(float(values.min()), 0.0), max(float(values.max()), 0.0)

    def error(lo: float, hi: float) -> float:
        levels = 254 if symmetric else 255  # int8 symmetric uses -127..127
        scale = (hi - lo) / levels or 1e-12
        zero = np.round(-lo / scale)
        restored = (np.clip(np.round(values / scale) + zero, 0, levels) - zero) * scale
        return float(np.mean((restored - values) ** 2))

    if symmetric:
        bound = max(-low, high)
        best = min(CLIP_GRID, key=lambda c: error(-c * bound, c * bound))
        return -best * bound, best * bound
    a, b = min(((a, b) for a in CLIP_GRID for b in CLIP_GRID), key=lambda ab: error(ab[0] * low, ab[1] * high))
    return a * low, b * high


def _float_outputs(model: onnx.ModelProto) -> None:
    """Drop the Quantize/Dequantize pair the quantizer puts on graph outputs: rounding the logits to 8 bits
    only breaks near-ties, and every runtime returns float outputs anyway."""
    producers = {out: node for node in model.graph.node for out in node.output}
    for output in model.graph.output:
        dequantize = producers.get(output.name)
        if dequantize is None or dequantize.op_type != "DequantizeLinear":
            continue
        quantize = producers.get(dequantize.input[0])
        if quantize is None or quantize.op_type != "QuantizeLinear":
            continue
        source = producers.get(quantize.input[0])
        if source is None:
            continue
        source.output[list(source.output).index(quantize.input[0])] = output.name
        model.graph.node.remove(dequantize)
        model.graph.node.remove(quantize)
    used = {name for node in model.graph.node for name in node.input}
    for tensor in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(tensor)  # the pair's scale and zero point


def _prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's pre-processing (shape inference, graph optimisation) that its quantizer expects, at opset 13
    at least: per-channel Q/DQ nodes carry an `axis` that opset 12 does not define."""
    import onnx
    from onnxruntime.quantization import quant_pre_process

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    if opset < QDQ_MIN_OPSET:
        model = onnx.version_converter.convert_version(model, QDQ_MIN_OPSET)
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(model, str(source))
        quant_pre_process(str(source), str(target))
        return onnx.load(str(target))


class _Reader:
    """Feeds calibration samples one by one, as onnxruntime's calibrators read them."""

    def __init__(self, input_name: str, inputs: np.ndarray) -> None:
        self.rows = iter([{input_name: row[None]} for row in inputs])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.rows, None)


def with_outputs(model: onnx.ModelProto, names: list[str]) -> bytes:
    """`model` serialised with `names` (any intermediate tensors) as its outputs."""
    import onnx
    from onnx import helper

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.output[:]
    copy.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in names)
    return copy.SerializeToString()


def channel_means(model: onnx.ModelProto, names: list[str], inputs: np.ndarray, threads: int) -> list[np.ndarray]:
    """Per-channel (axis 1, NCHW) mean of each named tensor of an ONNX graph over `inputs`."""
    runner = OnnxRuntimeRunner(with_outputs(model, names), threads)
    return stream_channel_means(runner.stream(inputs, names), axis=1)


def stream_channel_means(stream: Iterable[list[np.ndarray]], axis: int) -> list[np.ndarray]:
    """Per-channel mean (channels on `axis`) of each tensor, over every sample of the stream."""
    totals: list[np.ndarray] = []
    count = 0
    for tensors in stream:
        means = [np.moveaxis(t, axis, -1).reshape(-1, t.shape[axis]).mean(axis=0, dtype=np.float64) for t in tensors]
        totals = means if not totals else [a + b for a, b in zip(totals, means, strict=True)]
        count += 1
    return [t / count for t in totals]


def correct_bias(quantized: onnx.ModelProto, prepared: onnx.ModelProto, inputs: np.ndarray, threads: int,
                 progress: Callable[[list[Any]], Any] = iter) -> int:
    """Empirical bias correction in place, layer by layer in graph order; returns the layers corrected.

    The mean is compared where the next layer reads it: after the output's Quantize/Dequantize
    (which also applies any ReLU/clip the quantizer folded into its range) against the float graph's
    tensor of the same name (after that activation)."""
    from onnx import numpy_helper

    producers = {out: node for node in quantized.graph.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in quantized.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    initializers = {t.name: t for t in quantized.graph.initializer}
    float_tensors = {out for node in prepared.graph.node for out in node.output}

    def as_read(name: str) -> str:
        """The tensor the next layer reads: through QuantizeLinear -> DequantizeLinear where there is one."""
        for op in ("QuantizeLinear", "DequantizeLinear"):
            follower = next((n for n in readers.get(name, []) if n.op_type == op), None)
            if follower is None:
                return name
            name = follower.output[0]
        return name

    def quantized_weights(node: onnx.NodeProto) -> bool:
        return getattr(producers.get(node.input[1]), "op_type", None) == "DequantizeLinear"

    def bias_of(node: onnx.NodeProto) -> tuple[onnx.TensorProto, np.ndarray | None] | None:
        """The bias tensor and, when it is int32 behind a DequantizeLinear, its scale."""
        if len(node.input) < 3:
            return None
        if node.input[2] in initializers:
            return initializers[node.input[2]], None
        dequantize = producers.get(node.input[2])
        if dequantize is None or dequantize.op_type != "DequantizeLinear":
            return None
        return initializers[dequantize.input[0]], numpy_helper.to_array(initializers[dequantize.input[1]])

    layers = [
        node for node in quantized.graph.node
        if node.op_type in QUANTIZABLE and quantized_weights(node) and bias_of(node) is not None
        and node.output[0] in float_tensors
    ]
    if not layers:
        return 0
    targets = channel_means(prepared, [node.output[0] for node in layers], inputs, threads)
    for node, target in progress(list(zip(layers, targets, strict=True))):
        (current,) = channel_means(quantized, [as_read(node.output[0])], inputs, threads)
        found = bias_of(node)
        assert found is not None  # `layers` keeps only nodes with a bias
        bias, scale = found
        values = numpy_helper.to_array(bias)
        if scale is None:
            corrected = (values + (target - current)).astype(values.dtype)
        else:
            steps = np.round((target - current) / scale.astype(np.float64)).astype(np.int64)
            corrected = np.clip(values.astype(np.int64) + steps, -(2**31), 2**31 - 1).astype(np.int32)
        bias.CopyFrom(numpy_helper.from_array(corrected, bias.name))
    return len(layers)


def accuracy_aware(quantizer: Int8Quantizer, order: list[str], evaluate: Callable[[onnx.ModelProto], dict[str, Any]],
                   shortfall: Callable[[dict[str, Any]], float], bound: int,
                   progress: Callable[[list[Any]], Any] = iter) -> tuple[onnx.ModelProto, list[dict[str, Any]], int]:
    """Quantize everything; while the accuracy gates fail, keep the next most sensitive layer in float,
    up to `bound` layers. Returns the first model that meets the gates, else the one that misses them by
    least (the earliest of equals), every step's layers and metrics, and the chosen step's index."""
    kept: list[str] = []
    steps: list[dict[str, Any]] = []
    best: tuple[float, int, onnx.ModelProto] | None = None
    while True:
        model = quantizer.quantize(exclude=tuple(kept), progress=progress)
        metrics = evaluate(model)
        steps.append({"kept_float": list(kept), **metrics})
        missed = shortfall(metrics)
        if best is None or missed < best[0]:
            best = (missed, len(steps) - 1, model)
        if missed == 0 or len(kept) >= min(bound, len(order)):
            return best[2], steps, best[1]
        kept.append(order[len(kept)])
