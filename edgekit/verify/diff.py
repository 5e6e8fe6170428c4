"""Where an exported artifact starts to differ from the original torch model, layer by layer.

The original runs in torch with a hook on every container module (a block, a conv-norm-activation, a stage); the
artifact runs in its runtime with every intermediate tensor kept: onnxruntime with the tensors made graph outputs,
LiteRT with all tensors preserved (integer ones dequantized, NHWC ones read as NCHW). Both exporters name each op
by the module scope it came from (ONNX: `/features/features.3/conv/...`; litert-torch: the chain of
`<class>_<attribute>` of the modules around it, the op's own location first where ops were fused), so a module's
output is the output of the last op inside its scope. Leaf modules are not compared: a batch norm folded into its
convolution exists only in torch. Where the shapes differ (channels a search or pruning removed inside a block) the
module is skipped; a block's boundary keeps its shape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx
    import torch

    from edgekit.runtimes.remote import RemoteDevice

DEPARTS = 0.1  # relative error from which a layer's output counts as departed from the original's

Op = tuple[str, Any]  # where an op came from (its scope or location) and the tensor it writes first


def layer_diff(module: torch.nn.Module, artifact: bytes, fmt: str, inputs: np.ndarray, threads: int,
               device: RemoteDevice | None = None) -> list[dict[str, Any]]:
    """For each container module whose output the artifact (`fmt`: onnx or tflite) computes too, with the same
    shape, in the artifact's order: its name, class, shape, the relative error ‖a − o‖ / ‖o‖ and cosine of the
    artifact's tensor `a` against the original's `o` over all `inputs` (one model input each). With `device` (an
    ONNX artifact) the artifact runs there, through its agent."""
    import torch

    from edgekit.passes.reconstruct import forward_calls

    containers = {name: layer for name, layer in module.named_modules() if name and any(True for _ in layer.children())}
    ops, inside, run = _onnx(artifact, threads, device) if fmt == "onnx" else _tflite(artifact, module, threads)
    last: dict[str, tuple[int, Any]] = {}  # module -> (op index, the tensor its last op writes)
    for index, (where, tensor) in enumerate(ops):
        for name in containers:
            if inside(name, where):
                last[name] = (index, tensor)
    tensors: dict[Any, str] = {}
    for name, (_, tensor) in sorted(last.items(), key=lambda item: item[1][0]):
        tensors.setdefault(tensor, name)  # the outermost module that ends in this tensor names it
    artifact_values: dict[Any, list[np.ndarray]] = {tensor: [] for tensor in tensors}
    for values in run(inputs, list(tensors)):
        for tensor, value in values.items():
            artifact_values[tensor].append(value)
    original: dict[str, list[np.ndarray]] = {name: [] for name in tensors.values()}
    layers = {containers[name]: name for name in original}
    for x in inputs:
        for name, out in forward_calls(module, torch.from_numpy(x[None]), layers):
            if isinstance(out, torch.Tensor):
                original[name].append(out.float().numpy())
    rows = []
    for tensor, name in tensors.items():
        ours, theirs = original[name], [_as_torch_layout(v, o.shape) for v, o in
                                        zip(artifact_values[tensor], original[name], strict=False)]
        if not ours or len(ours) != len(theirs) or any(a.shape != b.shape for a, b in zip(ours, theirs, strict=True)):
            continue  # not computed, called more than once per pass, or pruned inside: not the same tensor
        o, a = np.concatenate([x.ravel() for x in ours]), np.concatenate([x.ravel() for x in theirs])
        norm = float(np.linalg.norm(o))
        rows.append({"layer": name, "module": type(containers[name]).__name__, "shape": list(ours[0].shape),
                     "rel_error": float(np.linalg.norm(a - o)) / norm if norm else float(np.linalg.norm(a)),
                     "cosine": min(1.0, float(a @ o) / (float(np.linalg.norm(a)) * norm)) if norm and a.any()
                     else 0.0})
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The first layer whose relative error reaches `DEPARTS` and the worst one (None where there are no rows)."""
    first = next((row["layer"] for row in rows if row["rel_error"] >= DEPARTS), None)
    worst = max(rows, key=lambda row: row["rel_error"])["layer"] if rows else None
    return {"layers": len(rows), "departs_at": DEPARTS, "first_departure": first, "worst": worst}


Run = Callable[[np.ndarray, list[Any]], Iterator[dict[Any, np.ndarray]]]


def _onnx(artifact: bytes, threads: int, device: RemoteDevice | None
          ) -> tuple[list[Op], Callable[[str, str], bool], Run]:
    """The graph's nodes by module scope, and a run that reads any node output (every one made a graph output),
    here or on `device`."""
    import onnx

    from edgekit.passes.export import module_path
    from edgekit.runtimes.onnxruntime import OnnxRuntimeRunner

    graph = onnx.shape_inference.infer_shapes(onnx.load_from_string(artifact))
    ops = [(module_path(node.name), node.output[0]) for node in graph.graph.node if node.output]
    known = {value.name: value for value in graph.graph.value_info}

    def run(inputs: np.ndarray, tensors: list[Any]) -> Iterator[dict[Any, np.ndarray]]:
        wanted = [tensor for tensor in tensors if tensor in known]
        if device is not None:
            yield from _on_device(graph, [known[tensor] for tensor in wanted], inputs, threads, device)
            return
        graph.graph.output.extend(known[tensor] for tensor in wanted)
        for values in OnnxRuntimeRunner(graph.SerializeToString(), threads).stream(inputs, wanted):
            yield {tensor: np.asarray(value, np.float32) for tensor, value in zip(wanted, values, strict=True)}

    return ops, lambda name, scope: scope == name or scope.startswith(name + "."), run


def _on_device(graph: onnx.ModelProto, values: list[Any], inputs: np.ndarray, threads: int, device: RemoteDevice
               ) -> Iterator[dict[Any, np.ndarray]]:
    """The tensors `values` (of static shape) for each input, computed on the device: an agent returns a graph's
    one output, so the graph sent there ends in all of them, cast to float, flattened and concatenated."""
    import onnx
    from onnx import TensorProto, helper

    from edgekit.agent.protocol import Job

    shapes = {value.name: [dim.dim_value for dim in value.type.tensor_type.shape.dim] for value in values}
    names = [name for name, shape in shapes.items() if shape and all(shape)]
    probe = onnx.ModelProto()
    probe.CopyFrom(graph)
    for i, name in enumerate(names):
        probe.graph.node.extend([helper.make_node("Cast", [name], [f"edgekit_diff/{i}"], to=TensorProto.FLOAT),
                                 helper.make_node("Flatten", [f"edgekit_diff/{i}"], [f"edgekit_diff/{i}/flat"])])
    probe.graph.node.append(helper.make_node("Concat", [f"edgekit_diff/{i}/flat" for i in range(len(names))],
                                             ["edgekit_diff"], axis=1))
    sizes = [int(np.prod(shapes[name])) for name in names]
    del probe.graph.output[:]
    probe.graph.output.append(helper.make_tensor_value_info("edgekit_diff", TensorProto.FLOAT, [1, sum(sizes)]))
    answer, _ = device.run(Job("run", "onnx", threads, 0, 1, [probe.SerializeToString()], {"inputs": inputs}))
    for row in answer["outputs"]:
        parts = np.split(row, np.cumsum(sizes)[:-1])
        yield {name: part.reshape(shapes[name]) for name, part in zip(names, parts, strict=True)}


def _tflite(artifact: bytes, module: torch.nn.Module, threads: int
            ) -> tuple[list[Op], Callable[[str, str], bool], Run]:
    """The flatbuffer's ops by location (the op's own, first of a fused op's), each module's location chain, and a
    run that keeps every tensor (dequantized where integer)."""
    from edgekit.passes.tflite import location_segment
    from edgekit.runtimes.litert import LiteRtRunner

    runner = LiteRtRunner(artifact, threads, keep_tensors=True)
    details = {t["index"]: t for t in runner.interpreter.get_tensor_details()}
    ops = [(details[op["outputs"][0]]["name"].split(";")[0] + "/", op["outputs"][0])
           for op in runner.interpreter._get_ops_details() if len(op["outputs"])]
    chains = {"": ""}
    for name, layer in module.named_modules():
        if name:
            parent, _, attribute = name.rpartition(".")
            chains[name] = f"{chains[parent]}/{location_segment(layer, attribute)}"

    def run(inputs: np.ndarray, tensors: list[Any]) -> Iterator[dict[Any, np.ndarray]]:
        for x in inputs:
            yield runner.tensors(x, {index: details[index] for index in tensors})

    return ops, lambda name, location: chains[name] + "/" in location, run


def _as_torch_layout(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A channels-last 4-D tensor read as torch's channels-first where that gives torch's shape."""
    if value.shape != shape and value.ndim == 4 and value.transpose(0, 3, 1, 2).shape == shape:
        return value.transpose(0, 3, 1, 2)
    return value
