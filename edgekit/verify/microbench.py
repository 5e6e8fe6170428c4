"""Calibrate the device model for this host: microbenchmarks of the kernels models are made of.

Single-op ONNX graphs run in onnxruntime with the thread count the estimate is for: convolutions
of the shapes mobile CNNs are built from (dense, pointwise, depthwise, grouped), matrix products
with many rows and with one (a weight-streaming GEMV), each in fp32 and as INT8 (QLinearConv /
QLinearMatMul: the kernels onnxruntime runs for edgekit's QDQ artifacts), a large elementwise
add for bandwidth and a chain of tiny convs for the per-op overhead. Their rates become a
target profile (`Target`) whose every number's source names the microbenchmark, the CPU and the
runtime, so `edgekit estimate --validate` can hold the device model against measured model
latencies on the same machine. The models being validated play no part in the calibration.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgekit.runtimes.onnxruntime import OnnxRuntimeRunner
from edgekit.targets import Target
from edgekit.verify.latency import host_description, steady_ms


@dataclass(frozen=True)
class Kernel:
    op_class: str
    channels: int
    size: int  # square input side
    out_channels: int
    kernel: int = 1
    groups: int = 1
    rows: int = 0  # matrix products: rows of the input; convs: 0

    @property
    def outputs(self) -> int:
        return self.out_channels * (self.rows or self.size * self.size)

    @property
    def reduction(self) -> int:
        return self.channels // self.groups * self.kernel**2

    @property
    def name(self) -> str:
        if self.rows:
            return f"{self.op_class} {self.rows}x{self.channels} . {self.channels}x{self.out_channels}"
        return f"{self.op_class} {self.channels}->{self.out_channels} k{self.kernel} g{self.groups} @{self.size}"


# layers as they occur in mobile and residual CNNs, from the 112 px stem to the 7 px head
KERNELS = [
    Kernel("conv", 3, 112, 32, kernel=3), Kernel("conv", 16, 112, 96), Kernel("conv", 64, 56, 128),
    Kernel("conv", 192, 28, 64), Kernel("conv", 384, 14, 384), Kernel("conv", 960, 7, 160),
    Kernel("conv", 64, 56, 256), Kernel("conv", 256, 56, 64), Kernel("conv", 1024, 14, 256),
    Kernel("conv", 2048, 7, 512), Kernel("conv", 64, 56, 64, kernel=3), Kernel("conv", 128, 28, 128, kernel=3),
    Kernel("conv", 256, 14, 256, kernel=3), Kernel("conv", 512, 7, 512, kernel=3),
    Kernel("depthwise", 32, 112, 32, kernel=3, groups=32), Kernel("depthwise", 240, 28, 240, kernel=5, groups=240),
    Kernel("depthwise", 96, 112, 96, kernel=3, groups=96), Kernel("depthwise", 144, 56, 144, kernel=3, groups=144),
    Kernel("depthwise", 384, 14, 384, kernel=3, groups=384), Kernel("depthwise", 672, 14, 672, kernel=5, groups=672),
    Kernel("depthwise", 960, 7, 960, kernel=3, groups=960),
    Kernel("grouped", 48, 56, 48, kernel=3, groups=6), Kernel("grouped", 208, 14, 208, kernel=3, groups=26),
    Kernel("gemm", 512, 0, 512, rows=64), Kernel("gemm", 768, 0, 768, rows=128),
    Kernel("gemv", 1280, 0, 1000, rows=1), Kernel("gemv", 576, 0, 1024, rows=1),
]
# (op, input shape, second operand's shape or transpose permutation): the elementwise work of mobile CNNs
ELEMENTWISE = [("Mul", (1, 96, 56, 56), (1, 96, 1, 1)), ("Sigmoid", (1, 144, 56, 56), None),
               ("Add", (1, 64, 56, 56), (1, 64, 56, 56)), ("Transpose", (1, 2, 58, 28, 28), (0, 2, 1, 3, 4))]
STREAM = (1, 64, 112, 112)  # an elementwise add over tensors larger than a core's L2 cache
CHAIN = 64  # tiny convs in a row: what remains per op is the runtime's per-op overhead


def _model(nodes: list[Any], inputs: list[Any], outputs: list[Any], arrays: dict[str, np.ndarray],
           domains: tuple[str, ...] = ()) -> Any:
    from onnx import helper, numpy_helper

    graph = helper.make_graph(nodes, "microbenchmark", inputs, outputs,
                              [numpy_helper.from_array(value, name) for name, value in arrays.items()])
    opsets = [helper.make_opsetid("", 17), *[helper.make_opsetid(domain, 1) for domain in domains]]
    return helper.make_model(graph, opset_imports=opsets)


def _io(elem: int, shape: tuple[int, ...], last: str) -> tuple[list[Any], list[Any]]:
    from onnx import helper

    return [helper.make_tensor_value_info("x", elem, list(shape))], [helper.make_tensor_value_info(last, elem,
                                                                                                   list(shape))]


def _kernel_graph(spec: Kernel, int8: bool, ops: int = 1) -> tuple[Any, tuple[int, ...], int]:
    """The kernel, then its mirror (out_channels back to channels, the same MACs), alternating for `ops` ops;
    the input shape; the FLOPs of one op (2 per multiply-accumulate)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    elem = TensorProto.UINT8 if int8 else TensorProto.FLOAT
    shape: tuple[int, ...]
    if spec.rows:
        shape, spatial = (1, spec.rows, spec.channels), spec.rows
        out: tuple[int, ...] = (1, spec.rows, spec.out_channels)
        weight_shapes: list[tuple[int, ...]] = [(spec.channels, spec.out_channels), (spec.out_channels, spec.channels)]
    else:
        shape, spatial = (1, spec.channels, spec.size, spec.size), spec.size * spec.size
        out = (1, spec.out_channels, spec.size, spec.size)
        weight_shapes = [(spec.out_channels, spec.channels // spec.groups, spec.kernel, spec.kernel),
                         (spec.channels, spec.out_channels // spec.groups, spec.kernel, spec.kernel)]
    flops = 2 * spatial * spec.channels * spec.out_channels * spec.kernel**2 // spec.groups
    attrs = {} if spec.rows else {"group": spec.groups, "pads": [spec.kernel // 2] * 4}
    names = ["x", *[f"t{i}" for i in range(ops)]]
    arrays: dict[str, np.ndarray] = {}
    if int8:
        arrays |= {"s": np.array(0.02, np.float32), "z": np.array(128, np.uint8), "wz": np.array(0, np.int8)}
    nodes = []
    for side, weight_shape in enumerate(weight_shapes):
        if int8:
            arrays[f"w{side}"] = rng.integers(-100, 100, weight_shape).astype(np.int8)
            if not spec.rows:  # per output channel weight scales and an int32 bias, as edgekit's artifacts have
                width = weight_shape[0]
                arrays |= {f"ws{side}": np.full(width, 0.01, np.float32), f"wz{side}": np.zeros(width, np.int8),
                           f"b{side}": np.zeros(width, np.int32)}
        else:
            arrays[f"w{side}"] = rng.normal(0, 0.1, weight_shape).astype(np.float32)
    for i in range(ops):
        side, source, target = i % 2, names[i], names[i + 1]
        if not int8:
            nodes.append(helper.make_node("MatMul" if spec.rows else "Conv", [source, f"w{side}"], [target], **attrs))
        elif spec.rows:
            nodes.append(helper.make_node("QLinearMatMul", [source, "s", "z", f"w{side}", "s", "wz", "s", "z"],
                                          [target]))
        else:
            nodes.append(helper.make_node("QLinearConv", [source, "s", "z", f"w{side}", f"ws{side}", f"wz{side}",
                                                          "s", "z", f"b{side}"], [target], **attrs))
    inputs, _ = _io(elem, shape, names[-1])
    outputs = [helper.make_tensor_value_info(names[-1], elem, list(out if ops % 2 else shape))]
    return _model(nodes, inputs, outputs, arrays), shape, flops


def _elementwise_graph(op: str, shape: tuple[int, ...], other: tuple[int, ...] | None, int8: bool,
                       length: int) -> tuple[Any, tuple[int, ...], int]:
    """A chain of `length` elementwise ops (in the int8 form onnxruntime runs for QDQ graphs), the input shape,
    and the bytes one op moves. The transposes' permutation is its own inverse, so a chain keeps its shape."""
    from onnx import TensorProto, helper

    elem, width = (TensorProto.UINT8, 1) if int8 else (TensorProto.FLOAT, 4)
    names = ["x", *[f"t{i}" for i in range(length)]]
    arrays: dict[str, np.ndarray] = {}
    if int8:
        arrays = {"s": np.array(0.02, np.float32), "z": np.array(128, np.uint8)}
    if other and op != "Transpose":
        arrays["c"] = np.full(other, 150, np.uint8) if int8 else np.full(other, 0.5, np.float32)
    nodes = []
    for source, target in itertools.pairwise(names):
        if op == "Transpose":
            assert other is not None  # ELEMENTWISE gives each transpose its permutation
            nodes.append(helper.make_node("Transpose", [source], [target], perm=list(other)))
        elif not int8:
            nodes.append(helper.make_node(op, [source, "c"] if other else [source], [target]))
        else:
            operands = [source, "s", "z", *(["c", "s", "z"] if other else [])]
            nodes.append(helper.make_node(f"QLinear{op}", [*operands, "s", "z"], [target], domain="com.microsoft"))
    moved = width * (2 * int(np.prod(shape)) + (int(np.prod(other)) if other and op != "Transpose" else 0))
    return _model(nodes, *_io(elem, shape, names[-1]), arrays, ("com.microsoft",)), shape, moved


def _chain_graph(length: int, shape: tuple[int, ...] = (1, 8, 4, 4)) -> tuple[Any, tuple[int, ...]]:
    from onnx import TensorProto, helper

    names = ["x", *[f"t{i}" for i in range(length)]]
    nodes = [helper.make_node("Conv", [names[i], "w"], [names[i + 1]]) for i in range(length)]
    weight: np.ndarray = np.full((shape[1], shape[1], 1, 1), 0.1, np.float32)
    return _model(nodes, *_io(TensorProto.FLOAT, shape, names[-1]), {"w": weight}), shape


def _milliseconds(model: Any, shape: tuple[int, ...], threads: int, runs: int) -> float:
    runner = OnnxRuntimeRunner(model.SerializeToString(), threads)
    dtype = np.uint8 if runner.session.get_inputs()[0].type == "tensor(uint8)" else np.float32
    sample = np.random.default_rng(0).integers(0, 255, shape[1:]).astype(dtype)
    return steady_ms(runner, sample, warmup=3, runs=runs)


def measure_host(threads: int, runs: int = 20,
                 progress: Callable[[list[Kernel]], Iterable[Kernel]] = iter) -> dict[str, Any]:
    """Milliseconds of every one-op microbenchmark on this host's onnxruntime, with its FLOPs or bytes.

    Each is timed as a whole call, as a layer costs inside a model: its input arriving from memory, its
    output leaving, the runtime's dispatch. The per-op overhead is what a tiny conv adds to a chain."""
    import onnxruntime

    def kernel(spec: Kernel, precision: str) -> dict[str, Any]:
        model, shape, flops = _kernel_graph(spec, precision == "int8")
        return {"class": spec.op_class, "name": spec.name, "precision": precision, "flops": flops,
                "reduction": spec.reduction, "outputs": spec.outputs, "ms": _milliseconds(model, shape, threads, runs)}

    def elementwise(op: str, shape: tuple[int, ...], other: Any, precision: str) -> dict[str, Any]:
        model, shape, moved = _elementwise_graph(op, shape, other, precision == "int8", 1)
        return {"op": op, "precision": precision, "bytes": moved, "ms": _milliseconds(model, shape, threads, runs)}

    chain = [_milliseconds(*_chain_graph(length), threads, runs) for length in (1, CHAIN)]
    return {
        "host": host_description(), "runtime": f"onnxruntime {onnxruntime.__version__}", "threads": threads,
        "kernels": [kernel(spec, precision) for spec in progress(KERNELS) for precision in ("fp32", "int8")],
        "elementwise": [elementwise(*case, precision) for case in ELEMENTWISE for precision in ("fp32", "int8")],
        "stream": {"bytes": 3 * 4 * int(np.prod(STREAM)),  # two tensors read, one written
                   "ms": _milliseconds(*_elementwise_graph("Add", STREAM, STREAM, False, 1)[:2], threads, runs)},
        "chain": {"ops": CHAIN - 1, "ms": chain[1] - chain[0]},
    }


def host_target(measured: dict[str, Any]) -> Target:
    """A target profile of this host from its microbenchmarks: the fastest conv's rate is the peak, and every
    kernel's rate over it is that kernel's efficiency (a layer takes the nearest kernel's), each class's median
    its fallback; the large add's rate is the bandwidth, the elementwise ops' median rate over it their
    efficiency; a tiny op's time in a chain is the per-op overhead."""
    kernels = [{**k, "rate": k["flops"] / k["ms"] / 1e6} for k in measured["kernels"]]
    precisions = ("fp32", "int8")
    peaks = {p: max(k["rate"] for k in kernels if k["class"] == "conv" and k["precision"] == p) for p in precisions}
    bandwidth = measured["stream"]["bytes"] / measured["stream"]["ms"] / 1e6
    overhead = measured["chain"]["ms"] / measured["chain"]["ops"]
    classes = sorted({spec.op_class for spec in KERNELS})

    def efficiencies(precision: str) -> dict[str, float]:
        elementwise = statistics.median(e["bytes"] / e["ms"] / 1e6 for e in measured["elementwise"]
                                        if e["precision"] == precision)
        table = {c: statistics.median(k["rate"] for k in kernels if k["class"] == c and k["precision"] == precision)
                 / peaks[precision] for c in classes} | {"elementwise": elementwise / bandwidth}
        return {c: round(min(1.0, value), 4) for c, value in table.items()}

    where = f"on {measured['host']}, {measured['runtime']}, {measured['threads']} threads"
    counts = {k: sum(spec.op_class == k for spec in KERNELS) for k in classes}
    return Target.model_validate({
        "name": "host-measured", "description": f"this host, calibrated by microbenchmarks {where}", "kind": "cpu",
        "runtimes": [{"name": "onnxruntime", "format": "onnx", "precisions": ["fp32", "int8"]}],
        "compute": {"cores": measured["threads"], "threads": measured["threads"],
                    "fp32_gflops": round(peaks["fp32"], 1), "int8_gops": round(peaks["int8"], 1)},
        "memory": {"bandwidth_gbps": round(bandwidth, 1), "ram_mb": 1024},
        "constraints": {"static_shapes": False},
        "latency": {"node_overhead_us": round(overhead * 1e3, 3), "memory_efficiency": 1.0,
                    "efficiency": efficiencies("fp32"), "int8_efficiency": efficiencies("int8"),
                    "kernels": [{"op_class": k["class"], "precision": k["precision"], "reduction": k["reduction"],
                                 "outputs": k["outputs"],
                                 "efficiency": round(min(1.0, k["rate"] / peaks[k["precision"]]), 4)}
                                for k in kernels]},
        "sources": {
            "compute.cores": "the threads the estimate is for",
            "compute.threads": "the threads the estimate is for",
            "compute.fp32_gflops": f"measured: fastest of {counts['conv']} fp32 conv microbenchmarks {where}",
            "compute.int8_gops": f"measured: fastest of {counts['conv']} QLinearConv microbenchmarks {where}",
            "latency.kernels": f"measured: every microbenchmark kernel's rate over the peak {where}",
            "memory.bandwidth_gbps": f"measured: elementwise add over {'x'.join(map(str, STREAM))} fp32 {where}",
            "memory.ram_mb": "not used by the estimate",
            "latency.node_overhead_us": f"measured: a tiny conv's time in a chain of {CHAIN} {where}",
            "latency.memory_efficiency": "1: the bandwidth is itself the measured streaming rate",
            **{f"latency.{table}.{k}": f"measured: median rate of {counts[k]} {k} microbenchmarks over the peak "
               f"({precision}) {where}" for table, precision in (("efficiency", "fp32"),
                                                                     ("int8_efficiency", "int8")) for k in classes},
            **{f"latency.{table}.elementwise": f"measured: median bytes/s of {len(ELEMENTWISE)} elementwise "
               f"microbenchmarks ({', '.join(op for op, _, _ in ELEMENTWISE)}; {precision}) over the bandwidth {where}"
               for table, precision in (("efficiency", "fp32"), ("int8_efficiency", "int8"))},
        },
    })
