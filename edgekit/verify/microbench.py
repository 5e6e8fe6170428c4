"""Calibrate the device model for this host: microbenchmarks of the kernels models are made of.

Single-op ONNX graphs run in onnxruntime with the thread count the estimate is for: convolutions
of the shapes mobile CNNs are built from (dense, pointwise, depthwise, grouped), matrix products
with many rows and with one (a weight-streaming GEMV), each in fp32, as INT8 (QLinearConv /
QLinearMatMul: the kernels onnxruntime runs for edgekit's QDQ artifacts) and in fp32 on int8 weights
dequantized at every run (what it runs for QDQ patterns it leaves unfused), a large elementwise
add for bandwidth and a chain of tiny convs for the per-op overhead. Their rates become a
target profile (`Target`) whose every number's source names the microbenchmark, the CPU and the
runtime, so `edgekit estimate --validate` can hold the device model against measured model
latencies on the same machine. The models being validated play no part in the calibration.
"""

from __future__ import annotations

import functools
import itertools
import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgekit.runtimes.onnxruntime import OnnxRuntimeRunner, profiled_runs
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
KERNEL_FORMS = ("fp32", "int8", "dequantized")  # see _kernel_graph
# onnxruntime's layout conversions at the edges of a one-op graph (NCHWc reorders, NHWC transposes): a model pays
# them once, not at every layer
LAYOUT_OPS = ("ReorderInput", "ReorderOutput", "Transpose")


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


def _kernel_graph(spec: Kernel, form: str) -> tuple[Any, tuple[int, ...], int]:
    """The kernel as one op: float (`fp32`), onnxruntime's int8 kernel (`int8`: QLinearConv / QLinearMatMul, as it
    runs edgekit's QDQ artifacts) or float on int8 weights dequantized at every run (`dequantized`: what it runs for
    a QDQ pattern it does not fuse); the input shape; the FLOPs (2 per multiply-accumulate)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    shape: tuple[int, ...]
    if spec.rows:
        shape, spatial = (1, spec.rows, spec.channels), spec.rows
        out: tuple[int, ...] = (1, spec.rows, spec.out_channels)
        weight_shape: tuple[int, ...] = (spec.channels, spec.out_channels)
        op, attrs, axis = "MatMul", {}, 1
    else:
        shape, out = (1, spec.channels, spec.size, spec.size), (1, spec.out_channels, spec.size, spec.size)
        spatial = spec.size * spec.size
        weight_shape = (spec.out_channels, spec.channels // spec.groups, spec.kernel, spec.kernel)
        op, attrs, axis = "Conv", {"group": spec.groups, "pads": [spec.kernel // 2] * 4}, 0
    flops = 2 * spatial * spec.channels * spec.out_channels * spec.kernel**2 // spec.groups
    channels = weight_shape[axis]
    codes = rng.integers(-100, 100, weight_shape).astype(np.int8)
    # per output channel weight scales (and an int32 bias for convs), as edgekit's artifacts have
    arrays: dict[str, np.ndarray] = {"w": codes, "ws": np.full(channels, 0.01, np.float32),
                                     "wz": np.zeros(channels, np.int8)}
    if form == "fp32":
        arrays = {"w": codes.astype(np.float32) * 0.01}
        nodes = [helper.make_node(op, ["x", "w"], ["y"], **attrs)]
    elif form == "dequantized":
        nodes = [helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wf"], axis=axis),
                 helper.make_node(op, ["x", "wf"], ["y"], **attrs)]
    elif spec.rows:  # QLinearMatMul takes one weight scale
        arrays |= {"s": np.array(0.02, np.float32), "z": np.array(128, np.uint8), "ws": np.array(0.01, np.float32),
                   "wz": np.array(0, np.int8)}
        nodes = [helper.make_node("QLinearMatMul", ["x", "s", "z", "w", "ws", "wz", "s", "z"], ["y"])]
    else:
        arrays |= {"s": np.array(0.02, np.float32), "z": np.array(128, np.uint8),
                   "b": np.zeros(channels, np.int32)}
        nodes = [helper.make_node("QLinearConv", ["x", "s", "z", "w", "ws", "wz", "s", "z", "b"], ["y"], **attrs)]
    elem = TensorProto.UINT8 if form == "int8" else TensorProto.FLOAT
    inputs, _ = _io(elem, shape, "y")
    return _model(nodes, inputs, [helper.make_tensor_value_info("y", elem, list(out))], arrays), shape, flops


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


def _sample(model: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A random input (without the batch axis) of the graph's input type: uint8 for int8 kernels, else float."""
    from onnx import TensorProto

    uint8 = model.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    return np.random.default_rng(0).integers(0, 255, shape[1:]).astype(np.uint8 if uint8 else np.float32)


def _milliseconds(model: Any, shape: tuple[int, ...], threads: int, runs: int) -> float:
    """A whole call's time, median of `runs`: the op's work and the runtime's dispatch."""
    runner = OnnxRuntimeRunner(model.SerializeToString(), threads)
    return steady_ms(runner, _sample(model, shape), warmup=3, runs=runs, repeats=1)


def _kernel_ms(model: Any, shape: tuple[int, ...], threads: int, runs: int, skip: Iterable[str] = ()) -> float:
    """The graph's kernels' time as onnxruntime's profiler reports it, without the `skip` ops, median of `runs`."""
    calls = profiled_runs(model.SerializeToString(), threads, _sample(model, shape), warmup=3, runs=runs)
    return statistics.median(sum(us for _, op, us in call if op not in skip) / 1e3 for call in calls)


def measure_host(threads: int, runs: int = 20, rounds: int = 3,
                 progress: Callable[[list[int]], Iterable[int]] = iter) -> dict[str, Any]:
    """Milliseconds of every one-op microbenchmark on this host's onnxruntime, with its FLOPs or bytes.

    Kernels are timed as onnxruntime's profiler sees them inside a graph: their input arriving from memory, their
    output leaving; the per-op overhead (dispatch, a thread pool's wake-up) is what a tiny conv adds to a
    chain's whole call. Every microbenchmark runs once per round and keeps its best round: a shared machine's
    slow spells last seconds, so rounds apart see past them where repeats in a row would not."""
    import onnxruntime

    timed: list[tuple[dict[str, Any], Callable[[], float]]] = []
    for spec, form in itertools.product(KERNELS, KERNEL_FORMS):
        model, shape, flops = _kernel_graph(spec, form)
        timed.append(({"class": spec.op_class, "name": spec.name, "precision": "int8" if form == "int8" else "fp32",
                       "weights": "dequantized" if form == "dequantized" else "constant", "flops": flops,
                       "reduction": spec.reduction, "outputs": spec.outputs},
                      functools.partial(_kernel_ms, model, shape, threads, runs, LAYOUT_OPS)))
    for (op, shape, other), precision in itertools.product(ELEMENTWISE, ("fp32", "int8")):
        model, shape, moved = _elementwise_graph(op, shape, other, precision == "int8", 1)
        timed.append(({"op": op, "precision": precision, "bytes": moved},
                      functools.partial(_kernel_ms, model, shape, threads, runs)))
    stream = {"bytes": 3 * 4 * int(np.prod(STREAM))}  # two tensors read, one written
    timed.append((stream, functools.partial(_kernel_ms, *_elementwise_graph("Add", STREAM, STREAM, False, 1)[:2],
                                            threads, runs)))
    chain = [{"ops": length} for length in (1, CHAIN)]
    timed += [(row, functools.partial(_milliseconds, *_chain_graph(row["ops"]), threads, runs)) for row in chain]
    for _ in progress(list(range(rounds))):
        for row, measure in timed:
            row["ms"] = min(row.get("ms", math.inf), measure())
    return {
        "host": host_description(), "runtime": f"onnxruntime {onnxruntime.__version__}", "threads": threads,
        "rounds": rounds, "kernels": [row for row, _ in timed if "class" in row],
        "elementwise": [row for row, _ in timed if "op" in row], "stream": stream,
        "chain": {"ops": CHAIN - 1, "ms": chain[1]["ms"] - chain[0]["ms"]},
    }


def host_target(measured: dict[str, Any]) -> Target:
    """A target profile of this host from its microbenchmarks: the fastest conv's rate is the peak, and every
    kernel's rate over it is that kernel's efficiency (a layer takes the nearest kernel's), each class's median
    its fallback; the large add's rate is the bandwidth, the elementwise ops' median rate over it their
    efficiency; a tiny op's time in a chain is the per-op overhead. Kernels on dequantized weights keep their own
    rates (over the fp32 peak) for the layers onnxruntime runs that way."""
    kernels = [{**k, "rate": k["flops"] / k["ms"] / 1e6} for k in measured["kernels"]]
    constant = [k for k in kernels if k["weights"] == "constant"]
    precisions = ("fp32", "int8")
    peaks = {p: max(k["rate"] for k in constant if k["class"] == "conv" and k["precision"] == p) for p in precisions}
    bandwidth = measured["stream"]["bytes"] / measured["stream"]["ms"] / 1e6
    overhead = measured["chain"]["ms"] / measured["chain"]["ops"]
    classes = sorted({spec.op_class for spec in KERNELS})

    def efficiencies(precision: str) -> dict[str, float]:
        elementwise = statistics.median(e["bytes"] / e["ms"] / 1e6 for e in measured["elementwise"]
                                        if e["precision"] == precision)
        table = {c: statistics.median(k["rate"] for k in constant if k["class"] == c and k["precision"] == precision)
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
                    "kernels": [{"op_class": k["class"], "precision": k["precision"], "weights": k["weights"],
                                 "reduction": k["reduction"], "outputs": k["outputs"],
                                 "efficiency": round(min(1.0, k["rate"] / peaks[k["precision"]]), 4)}
                                for k in kernels]},
        "sources": {
            "compute.cores": "the threads the estimate is for",
            "compute.threads": "the threads the estimate is for",
            "compute.fp32_gflops": f"measured: fastest of {counts['conv']} fp32 conv microbenchmarks {where}",
            "compute.int8_gops": f"measured: fastest of {counts['conv']} QLinearConv microbenchmarks {where}",
            "latency.kernels": f"measured: every microbenchmark kernel's rate over the peak {where} (fp32, int8, "
                               "and fp32 on int8 weights dequantized at each run)",
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
