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

    from edgekit.targets import Format


@dataclass
class LayerStats:
    """One node as a runtime runs it: its work, the bytes it moves, and the class of kernel it needs."""

    name: str
    op: str
    macs: int
    params: int
    output_shape: list[int]
    # conv, depthwise, grouped, gemm, gemv (one row: weight-streaming), elementwise, data, fused (no kernel)
    op_class: str = "elementwise"
    precision: str = "fp32"  # of its arithmetic: the stored weights' type, else its input's
    weight_bytes: int = 0
    activation_bytes: int = 0  # activations read and written, at the width the runtime stores them
    # onnxruntime runs this node as it stands: a Q/DQ it did not fold into an int8 kernel, or a weighted op whose
    # QDQ pattern its fusions refused, left in float (a float bias, a float graph output, ...)
    unfused_in_onnxruntime: bool = False


@dataclass
class Analysis:
    params: int
    macs: int
    weight_bytes: int
    activation_bytes: int = field(metadata={"doc": "every intermediate tensor, written once"})
    activation_peak_bytes: int = field(metadata={"doc": "most bytes alive at once in graph order"})
    layers: list[LayerStats]
    format: Format = "onnx"  # of the graph analysed: its runtime on a target is the one taking this format

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


_WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
_PRECISION = {1: "fp32", 10: "fp16", 16: "fp16", 3: "int8", 2: "int8"}  # onnx.TensorProto element types
# what every runtime edgekit targets folds into the producing conv/matmul/add: no kernel of its own
_FUSABLE = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh", "BatchNormalization"}
# ops QDQ-aware runtimes (onnxruntime, TensorRT) run in int8 or move without converting: Q/DQ beside them fold
_INT8_KERNELS = {"Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Mul", "Sigmoid", "LeakyRelu", "GlobalAveragePool",
                 "AveragePool", "MaxPool", "Concat", "Softmax", "Reshape", "Transpose", "Flatten", "Squeeze",
                 "Unsqueeze", "Split", "Slice", "Resize", "Gather", "Relu", "Clip", "QuantizeLinear",
                 "DequantizeLinear"}
_DATA = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Shape", "Gather", "Concat", "Slice",
         "ConstantOfShape", "Cast"}


def _op_class(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto], readers: dict[str, list[Any]],
              shapes: dict[str, list[int]]) -> str:
    """The kind of kernel a runtime runs for `node`, which sets how close to peak it gets."""
    op = node.op_type
    if op in ("QuantizeLinear", "DequantizeLinear"):
        # folded into the int8 kernel beside it; next to an op with no int8 kernel it converts a whole tensor
        partners = [producers.get(node.input[0])] if op == "QuantizeLinear" else readers.get(node.output[0], [])
        return "fused" if all(p is None or p.op_type in _INT8_KERNELS for p in partners) else "elementwise"
    if op in ("Conv", "ConvTranspose"):
        group = next((attr.i for attr in node.attribute if attr.name == "group"), 1)
        channels = (shapes.get(node.input[0]) or [0, 0])[1]
        return "conv" if group == 1 else "depthwise" if group == channels else "grouped"
    if op in ("Gemm", "MatMul"):
        return _matrix_class(shapes.get(node.output[0], []))
    if op in _FUSABLE and len(readers.get(node.input[0], [])) == 1:
        source = node.input[0]
        while source in producers and producers[source].op_type in ("QuantizeLinear", "DequantizeLinear"):
            source = producers[source].input[0]
        producer = producers.get(source)
        if producer is not None and producer.op_type in (*_WEIGHTED, "Add") and len(readers.get(source, [])) == 1:
            return "fused"
    if op in _DATA:
        return "data"
    return "elementwise"


def _matrix_class(output_shape: list[int]) -> str:
    """A product with one output row reads every weight once per row: it streams weights (gemv), not computes."""
    return "gemv" if output_shape and prod(output_shape[:-1]) == 1 else "gemm"


def _onnxruntime_unfused(model: onnx.ModelProto) -> set[str]:
    """Of a QDQ graph, the Q/DQ and weighted nodes onnxruntime's CPU graph optimiser leaves as they are rather than
    folding into its int8 kernels (QLinearConv, QGemm, ...): asked of onnxruntime itself, since whether a pattern
    fuses turns on details (a bias reached through an Identity and left float) no rule list here would follow."""
    import tempfile
    from pathlib import Path

    import onnx
    import onnxruntime as ort

    if not any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in model.graph.node):
        return set()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # QDQ fusions; no layouts
    options.log_severity_level = 3  # its notes on unused initializers are not the user's business
    with tempfile.TemporaryDirectory() as work:
        options.optimized_model_filepath = str(Path(work) / "optimized.onnx")
        try:
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception:  # a graph onnxruntime cannot load: no fusion to report
            return set()
        optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
    return {node.name.split("/duplicated")[0] for node in optimized.graph.node
            if node.op_type in ("QuantizeLinear", "DequantizeLinear", *_WEIGHTED)}


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shapes of every tensor, at batch one: a symbolic input dimension (a dynamic batch) is read as 1, else
    every tensor downstream of it has no size and no MACs. onnxruntime's symbolic inference also folds the
    Shape/Slice/Concat chains exporters emit for padding computed at run time, where onnx's own inference stops."""
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = copy_with_fixed_inputs(model)
    try:
        return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # it refuses some graphs (unknown custom ops); onnx's inference is the fallback
        return onnx.shape_inference.infer_shapes(model)


def copy_with_fixed_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose symbolic input dimensions are 1."""
    import onnx

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if not dim.dim_value:
                dim.dim_value = 1
    return fixed


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

    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}
    types.update({name: t.data_type for name, t in weights.items()})
    producers = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    def stored(name: str) -> str:
        """The tensor a runtime actually holds for `name`: QDQ pairs fold into their neighbours, so a
        DequantizeLinear output is its quantized input, and a tensor only QuantizeLinear reads is written
        quantized."""
        node = producers.get(name)
        if node is not None and node.op_type == "DequantizeLinear":
            return node.input[0]
        quantizers = readers.get(name, [])
        if quantizers and all(n.op_type == "QuantizeLinear" for n in quantizers):
            return quantizers[0].output[0]
        return name

    unfused = _onnxruntime_unfused(model)
    layers = []
    for node in graph.node:
        if node.op_type == "Constant":
            continue
        sources = [stored(name) for name in node.input if name]
        held = [name for name in sources if name in weights]
        moved = [name for name in sources if name not in weights] + [stored(name) for name in node.output]
        if node.name in unfused and node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            moved = [name for name in (node.input[0], node.output[0]) if name not in weights]  # a whole conversion
        arithmetic = held[0] if held and node.op_type in _WEIGHTED else (sources[0] if sources else "")
        layers.append(LayerStats(
            name=node.name or node.output[0], op=node.op_type, macs=_node_macs(node, shapes),
            params=sum(params_of(name) for name in node.input), output_shape=shapes.get(node.output[0], []),
            op_class="fused" if len(held) == len(sources) else _op_class(node, producers, readers, shapes),
            precision=_PRECISION.get(types.get(arithmetic, 0), "fp32"),
            weight_bytes=sum(prod(weights[name].dims) * _itemsize(weights[name].data_type) for name in held),
            activation_bytes=sum(sizes.get(name, 0) for name in moved),
            unfused_in_onnxruntime=node.name in unfused,
        ))

    for name in [name for name in sizes if stored(name) != name]:  # float tensors an INT8 runtime never holds
        sizes[name] = 0
    nodes = [node for node in graph.node if node.op_type != "Constant"]
    return Analysis(
        params=sum(params_of(name) for name in weights), macs=sum(layer.macs for layer in layers),
        weight_bytes=sum(prod(t.dims) * _itemsize(t.data_type) for t in weights.values()),
        activation_bytes=sum(sizes.get(o, 0) for node in nodes for o in node.output),
        activation_peak_bytes=_activation_peak([(n.input, n.output) for n in nodes],
                                               [v.name for v in graph.input if v.name not in weights],
                                               [v.name for v in graph.output], sizes),
        layers=layers,
    )


_TFLITE_CLASS = {"CONV_2D": "conv", "TRANSPOSE_CONV": "conv", "DEPTHWISE_CONV_2D": "depthwise",
                 "RESHAPE": "data", "SQUEEZE": "data", "EXPAND_DIMS": "data"}


def analyze_tflite(model: bytes) -> Analysis:
    """The same analysis for a TFLite flatbuffer, read through LiteRT: activations are fused into their ops
    already, and a DEQUANTIZE of stored weights (fp16 models) is folded when the interpreter is prepared."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()  # LiteRT's only Python listing of a model's ops
    inputs = [d["index"] for d in interpreter.get_input_details()]
    produced = {i for op in ops for i in op["outputs"]}
    weights = {i for op in ops for i in op["inputs"] if i >= 0 and i not in produced and i not in inputs}
    shapes = {i: [int(d) for d in t["shape"]] for i, t in tensors.items()}
    sizes = {i: prod(shapes[i]) * np.dtype(t["dtype"]).itemsize for i, t in tensors.items()}
    folded = {op["outputs"][0]: op["inputs"][0] for op in ops
              if op["op_name"] == "DEQUANTIZE" and op["inputs"][0] in weights}

    layers = []
    for op in ops:
        name, ins = op["op_name"], [i for i in op["inputs"] if i >= 0]
        held = [folded.get(i, i) for i in ins if i in weights or i in folded]
        out = shapes[op["outputs"][0]]
        macs = 0
        if held and name in ("CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL"):
            macs = prod(out) * prod(shapes[held[0]][1:] if name == "CONV_2D" else shapes[held[0]][-1:])
        elif held and name == "DEPTHWISE_CONV_2D":
            macs = prod(out) * prod(shapes[held[0]][1:3])
        elif held and name == "TRANSPOSE_CONV":
            macs = prod(shapes[ins[-1]]) * prod(shapes[held[0]][:3])
        arithmetic = held[0] if held else (ins[0] if ins else None)
        dtype = np.dtype(tensors[arithmetic]["dtype"]).name if arithmetic is not None else "float32"
        layers.append(LayerStats(
            name=tensors[op["outputs"][0]]["name"], op=name, macs=macs,
            params=sum(prod(shapes[i]) for i in held), output_shape=out,
            op_class="fused" if op["outputs"][0] in folded else _matrix_class(out)
            if name in ("FULLY_CONNECTED", "BATCH_MATMUL") else _TFLITE_CLASS.get(name, "elementwise"),
            precision={"int8": "int8", "uint8": "int8", "float16": "fp16"}.get(dtype, "fp32"),
            weight_bytes=sum(sizes[i] for i in held),
            activation_bytes=sum(sizes[i] for i in [*ins, *op["outputs"]] if i not in weights and i not in folded),
        ))
    for index in folded:
        sizes[index] = 0
    return Analysis(
        params=sum(prod(shapes[i]) for i in weights if np.dtype(tensors[i]["dtype"]).kind in "fiu"),
        macs=sum(layer.macs for layer in layers), weight_bytes=sum(sizes[i] for i in weights),
        activation_bytes=sum(sizes[i] for i in produced),
        activation_peak_bytes=_activation_peak([(op["inputs"], op["outputs"]) for op in ops], inputs,
                                               [d["index"] for d in interpreter.get_output_details()], sizes),
        layers=layers, format="tflite",
    )


def _activation_peak(steps: list[tuple[Any, Any]], inputs: list[Any], outputs: list[Any],
                     sizes: dict[Any, int]) -> int:
    """Most activation bytes alive at once when (inputs, outputs) steps run in order (a tensor lives until its
    last reader); constants are not in `inputs` and are never produced, so they never count."""
    last_use: dict[Any, int] = {}
    for step, (reads, _) in enumerate(steps):
        for name in reads:
            last_use[name] = step
    for name in outputs:
        last_use[name] = len(steps)
    live = {name: sizes.get(name, 0) for name in inputs}
    peak = sum(live.values())
    for step, (_, writes) in enumerate(steps):
        for name in writes:
            live[name] = sizes.get(name, 0)
        peak = max(peak, sum(live.values()))
        live = {name: size for name, size in live.items() if last_use.get(name, -1) > step}
    return peak
