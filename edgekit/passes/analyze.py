"""Analyze a model as the runtime sees it: the ONNX graph, with shapes inferred.

One analysis serves every source (torch models are read through their exported graph, ONNX
inputs directly), so parameters, MACs, weight bytes and activation memory are counted the
same way for the reference and for the artifact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from math import prod
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx


@dataclass
class LayerStats:
    name: str
    op: str
    macs: int
    params: int
    output_shape: list[int]


@dataclass
class Analysis:
    params: int
    macs: int
    weight_bytes: int
    activation_bytes: int = field(metadata={"doc": "every intermediate tensor, written once"})
    activation_peak_bytes: int = field(metadata={"doc": "most bytes alive at once in graph order"})
    layers: list[LayerStats]

    def to_dict(self, layers: bool = True) -> dict[str, Any]:
        data = asdict(self)
        if not layers:
            data.pop("layers")
        return data


def _itemsize(elem_type: int) -> int:
    import onnx

    return onnx.helper.tensor_dtype_to_np_dtype(elem_type).itemsize


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers and Constant-node tensors: the graph's stored weights."""
    tensors = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    tensors[node.output[0]] = attr.t
    return tensors


def _node_macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    out = shapes.get(node.output[0])
    if not out:
        return 0
    if node.op_type in ("Conv", "ConvTranspose"):
        weight = shapes.get(node.input[1])
        if not weight:
            return 0
        if node.op_type == "Conv":  # weight [Cout, Cin/g, k...]: each output element is one dot product
            return prod(out) * prod(weight[1:])
        source = shapes.get(node.input[0])  # weight [Cin, Cout/g, k...]: each input element is scattered
        return prod(source) * prod(weight[1:]) if source else 0
    if node.op_type in ("Gemm", "MatMul"):
        a = shapes.get(node.input[0])
        if not a:
            return 0
        trans_a = any(attr.name == "transA" and attr.i for attr in node.attribute)
        k = a[-2] if trans_a else a[-1]
        return prod(out) * k
    return 0


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shapes of every tensor. onnxruntime's symbolic inference also folds the Shape/Slice/Concat chains
    exporters emit for padding computed at run time, where onnx's own inference stops."""
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # it refuses some graphs (unknown custom ops); onnx's inference is the fallback
        return onnx.shape_inference.infer_shapes(model)


def analyze(model: onnx.ModelProto) -> Analysis:
    """Parameters, MACs, weight bytes and activation memory of an ONNX graph, with a per-node table."""
    import onnx

    inferred = _infer_shapes(model)
    weights = _constants(inferred)
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                   onnx.TensorProto.DOUBLE, onnx.TensorProto.INT8, onnx.TensorProto.UINT8,
                   onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
    shapes: dict[str, list[int]] = {name: list(t.dims) for name, t in weights.items()}
    sizes: dict[str, int] = {}
    graph = inferred.graph
    for value in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = value.type.tensor_type
        dims = [d.dim_value for d in tensor_type.shape.dim]
        if dims and all(d > 0 for d in dims):
            shapes[value.name] = dims
            sizes[value.name] = prod(dims) * _itemsize(tensor_type.elem_type)

    def params_of(name: str) -> int:
        tensor = weights.get(name)
        return prod(tensor.dims) if tensor is not None and tensor.data_type in float_types else 0

    layers = []
    for node in graph.node:
        if node.op_type == "Constant":
            continue
        layers.append(LayerStats(
            name=node.name or node.output[0], op=node.op_type, macs=_node_macs(node, shapes),
            params=sum(params_of(name) for name in node.input), output_shape=shapes.get(node.output[0], []),
        ))

    for name in _fused_by_qdq(graph):
        sizes[name] = 0
    weight_bytes = sum(prod(t.dims) * _itemsize(t.data_type) for t in weights.values())
    params = sum(params_of(name) for name in weights)
    produced = [o for node in graph.node if node.op_type != "Constant" for o in node.output if o in sizes]
    return Analysis(
        params=params, macs=sum(layer.macs for layer in layers), weight_bytes=weight_bytes,
        activation_bytes=sum(sizes[name] for name in produced),
        activation_peak_bytes=_activation_peak(graph, sizes, set(weights)), layers=layers,
    )


def _fused_by_qdq(graph: onnx.GraphProto) -> set[str]:
    """Float tensors a QDQ graph never materialises on an INT8 runtime: DequantizeLinear outputs (fused into
    their consumers) and tensors read only by QuantizeLinear (fused into their producers)."""
    readers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    fused = {o for node in graph.node if node.op_type == "DequantizeLinear" for o in node.output}
    fused |= {name for name, ops in readers.items() if set(ops) == {"QuantizeLinear"}}
    return fused


def _activation_peak(graph: onnx.GraphProto, sizes: dict[str, int], constants: set[str]) -> int:
    """Most activation bytes alive at once when nodes run in graph order (a tensor lives until its last reader)."""
    nodes = [n for n in graph.node if n.op_type != "Constant"]
    last_use: dict[str, int] = {}
    for step, node in enumerate(nodes):
        for name in node.input:
            last_use[name] = step
    for value in graph.output:
        last_use[value.name] = len(nodes)
    live = {v.name: sizes.get(v.name, 0) for v in graph.input if v.name not in constants}
    peak = sum(live.values())
    for step, node in enumerate(nodes):
        for name in node.output:
            live[name] = sizes.get(name, 0)
        peak = max(peak, sum(live.values()))
        live = {name: size for name, size in live.items() if last_use.get(name, -1) > step}
    return peak
