"""One rounding per value in OpenVINO's int8 graphs: Q/DQ pairs moved above the ops that only move values.

onnxruntime's quantizer rounds a value where a conv reads it. After a YOLO C3k2 block's split, each part
is then rounded on its own and the concatenation once more, so OpenVINO splits in float and runs a
requantization per part (YOLO11n: 33 of them, a twentieth of its int8 time). NNCF, OpenVINO's own
quantizer, rounds the value once before the split and gives everything that meets at a concatenation one
scale, so split and concat run on int8 values.

Rounding commutes with ops that only select, copy or take maxima of values (Concat, Split, Slice,
MaxPool, nearest Resize). A pair moved from such an op's outputs to its inputs therefore changes no
number, provided every one of those inputs and outputs is rounded with the same scale: `sharing_groups`
names the tensors that meet that way, `share_ranges` gives each group the union of its ranges (before
onnxruntime quantizes), and `hoist` moves the pairs (after).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx

VALUE_MOVERS = ("Concat", "Split", "Slice", "MaxPool", "Resize")


def _moves_values(node: onnx.NodeProto) -> bool:
    if node.op_type == "Resize":  # only nearest neighbour copies values; linear interpolation makes new ones
        mode = next((a.s for a in node.attribute if a.name == "mode"), b"nearest")
        return mode == b"nearest"
    return node.op_type in VALUE_MOVERS


def _data_inputs(node: onnx.NodeProto) -> list[str]:
    """The inputs whose values the op moves: all of a Concat's, the first of the others (the rest say how)."""
    return list(node.input) if node.op_type == "Concat" else [node.input[0]]


def _readers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def sharing_groups(model: onnx.ModelProto, quantized_ops: Iterable[str], keep_float: Iterable[str]
                   ) -> list[set[str]]:
    """Sets of tensors of the float graph `model` that should share one quantization range.

    A value mover joins its data inputs and outputs to one set when each of its outputs is quantized
    (read by a layer of `quantized_ops` not in `keep_float`: the quantizer then rounds it for every
    reader) or read only by other such movers."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    outputs = {output.name for output in model.graph.output}
    kept = set(keep_float)
    readers = _readers(model)
    quantized = {name for node in model.graph.node if node.op_type in quantized_ops and node.name not in kept
                 for name in (node.input if node.op_type == "MatMul" else node.input[:1])
                 if name not in initializers}
    joining: set[str] = set()
    for node in reversed(model.graph.node):  # readers first, so a mover's readers are decided before it
        if node.name in kept or not _moves_values(node):
            continue
        if all(name not in outputs and (name in quantized or (
                readers.get(name) and all(reader.name in joining for reader in readers[name])))
               for name in node.output):
            joining.add(node.name)
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.setdefault(name, name) != name:
            name = parent[name]
        return name

    for node in model.graph.node:
        if node.name in joining:
            for name in [*_data_inputs(node), *node.output]:
                parent[root(name)] = root(node.output[0])
    groups: dict[str, set[str]] = {}
    for name in parent:
        groups.setdefault(root(name), set()).add(name)
    return [group for group in groups.values() if len(group) > 1]


def share_ranges(ranges: dict[str, Any], groups: list[set[str]]) -> dict[str, Any]:
    """onnxruntime's calibration cache (`save_tensors_data` JSON) with each group's tensors given the group's
    widest range, so the quantizer gives them one scale and zero point."""
    data = ranges["data"]
    for group in groups:
        present = [name for name in group if name in data]
        if not present:
            continue
        lowest = min(data[name]["lowest"]["data"][0] for name in present)
        highest = max(data[name]["highest"]["data"][0] for name in present)
        for name in present:
            data[name]["lowest"]["data"] = [lowest]
            data[name]["highest"]["data"] = [highest]
    return ranges


def hoist(model: onnx.ModelProto) -> int:
    """Moves Q/DQ pairs from value movers' outputs to their data inputs, in place, wherever every output is
    read only by pairs of one scale and zero point (so no number changes). Returns how many movers now
    run on quantized values."""
    from onnx import numpy_helper

    values = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    outputs = {output.name for output in model.graph.output}

    def params(node: onnx.NodeProto) -> tuple[tuple[str, bytes], ...]:
        """What a Q or DQ node rounds with: scale and zero point by value (names differ between pairs)."""
        return tuple((values[name].dtype.str, values[name].tobytes()) for name in node.input[1:3])

    moved = 0
    for mover in reversed(list(model.graph.node)):  # readers first: a concat's pairs move up before its split's
        if not _moves_values(mover):
            continue
        readers = _readers(model)
        rounders = [q for name in mover.output for q in readers.get(name, [])]
        pairs = [(q, dq) for q in rounders for dq in readers.get(q.output[0], [])]
        if (not rounders or any(q.op_type != "QuantizeLinear" for q in rounders)
                or len({params(q) for q in rounders}) != 1
                or any(dq.op_type != "DequantizeLinear" or params(dq) != params(q) or dq.output[0] in outputs
                       for q, dq in pairs)):
            continue
        for position, name in enumerate(mover.input):
            if name in _data_inputs(mover):
                mover.input[position] = _rounded(model, name, rounders[0], mover, params)
        for q, dq in pairs:  # their readers now read the mover's output, already on the grid
            for reader in _readers(model).get(dq.output[0], []):
                reader.input[:] = [q.input[0] if name == dq.output[0] else name for name in reader.input]
            model.graph.node.remove(dq)
        for q in rounders:
            model.graph.node.remove(q)
        moved += 1
    return moved


def _rounded(model: onnx.ModelProto, name: str, like: onnx.NodeProto, before: onnx.NodeProto,
             params: Callable[[onnx.NodeProto], Any]) -> str:
    """`name` rounded as the Q node `like` rounds: an existing pair's output if there is one, else a new pair's,
    inserted before `before`."""
    from onnx import helper

    nodes = list(model.graph.node)
    producer = next((node for node in nodes if name in node.output), None)
    if producer is not None and producer.op_type == "DequantizeLinear" and params(producer) == params(like):
        return name
    readers = _readers(model)
    for q in readers.get(name, []):
        if q.op_type == "QuantizeLinear" and params(q) == params(like):
            for dq in readers.get(q.output[0], []):
                if dq.op_type == "DequantizeLinear":
                    return dq.output[0]
    index, taken = nodes.index(before), {output for node in nodes for output in node.output}
    stem = next(f"{name}_shared{n or ''}" for n in range(len(nodes) + 1) if f"{name}_shared{n or ''}_Q" not in taken)
    scale, zero = like.input[1:3]
    model.graph.node.insert(index, helper.make_node("DequantizeLinear", [f"{stem}_Q", scale, zero], [f"{stem}_DQ"],
                                                    name=f"{stem}_DequantizeLinear"))
    model.graph.node.insert(index, helper.make_node("QuantizeLinear", [name, scale, zero], [f"{stem}_Q"],
                                                    name=f"{stem}_QuantizeLinear"))
    return f"{stem}_DQ"
