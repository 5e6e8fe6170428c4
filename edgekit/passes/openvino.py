"""Convert edgekit's ONNX graph (FP32, or its INT8 QDQ graph) to OpenVINO IR: `model.xml` + `model.bin`.

OpenVINO's ONNX frontend reads the graph from memory; QuantizeLinear/DequantizeLinear pairs become its own
FakeQuantize and int8 weights, so an INT8 build keeps edgekit's ranges, bias correction and float layers, and an
FP16 graph keeps its fp16 weights (the CPU plugin computes at its own inference precision: fp32 on most x86, fp16 on
ARM). Nothing is compressed further on the way out.

Same graph, same bytes: OpenVINO names the nodes it creates from a process-wide counter (`Reshape_15` in one
conversion, `Reshape_2711` in the next), so such names are replaced by ones counted in graph order.
"""

from __future__ import annotations

import io
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgekit.errors import StageError, first_line

if TYPE_CHECKING:
    import onnx

XML, BIN = "model.xml", "model.bin"
GENERATED_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*_\d+")  # OpenVINO's `<op type>_<instance counter>`


def graph_files(graph: onnx.ModelProto, fmt: str) -> dict[str, bytes]:
    """An ONNX artifact graph as the files of its format: the graph itself, or (openvino) its IR, model.xml first."""
    if fmt == "openvino":
        return to_openvino(graph)
    return {"model.onnx": graph.SerializeToString(deterministic=True)}


def graph_details(files: dict[str, bytes], opset: int) -> dict[str, Any]:
    """What the report says of `graph_files`: the graph's opset, or where the IR came from and its weights file
    (which verification on a board and `edgekit verify` send beside the XML)."""
    if BIN not in files:
        return {"opset": opset}
    return {"converted_from": f"ONNX opset {opset}", "weights_file": BIN, "weights_size_bytes": len(files[BIN])}


def to_openvino(graph: onnx.ModelProto) -> dict[str, bytes]:
    """The IR of `graph` as {model.xml: …, model.bin: …}; the graph's metadata_props (edgekit's preprocessing,
    quantization) go into the IR's rt_info under `edgekit`, where OpenVINO apps read them."""
    import openvino as ov

    try:
        model = ov.convert_model(io.BytesIO(graph.SerializeToString()))
    except Exception as err:  # the frontend raises its own types for unconvertible graphs
        raise StageError(f"OpenVINO cannot convert the ONNX graph: {first_line(err)}") from err
    stable_names(model, graph)
    for prop in graph.metadata_props:
        model.set_rt_info(prop.value, ["edgekit", prop.key.removeprefix("edgekit.")])
    with tempfile.TemporaryDirectory(prefix="edgekit-openvino-") as folder:
        ov.save_model(model, str(Path(folder) / XML), compress_to_fp16=False)
        return {XML: (Path(folder) / XML).read_bytes(), BIN: (Path(folder) / BIN).read_bytes()}


def stable_names(model: Any, graph: onnx.ModelProto) -> None:
    """Rename the nodes OpenVINO named from its instance counter (not from the ONNX graph) by their place in
    topological order, so two conversions of one graph write the same XML."""
    onnx_names = {n.name for n in graph.graph.node} | {o for n in graph.graph.node for o in n.output}
    onnx_names |= {t.name for t in graph.graph.initializer} | {v.name for v in graph.graph.input}
    for index, node in enumerate(model.get_ordered_ops()):
        name = node.get_friendly_name()
        if GENERATED_NAME.fullmatch(name) and name not in onnx_names:
            node.set_friendly_name(f"{name.rsplit('_', 1)[0]}_ov{index}")
