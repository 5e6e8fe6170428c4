"""Where an exported graph starts to differ from the original torch model, layer by layer.

The original runs in torch with a hook on every container module (a block, a conv-norm-activation, a stage);
the artifact runs in onnxruntime with every tensor a container's last node writes made a graph output. The
exporter names each node by the module scope it came from (`/features/features.3/conv/...`), so a module's
output is the output of the last node inside its scope. Leaf modules are not compared: the exporter folds a
batch norm into the convolution before it, whose own output then exists only in torch. Where the shapes differ
(channels a search or pruning removed inside a block) the module is skipped; a block's boundary keeps its shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx
    import torch

DEPARTS = 0.1  # relative error from which a layer's output counts as departed from the original's


def layer_diff(module: torch.nn.Module, graph: onnx.ModelProto, inputs: np.ndarray, threads: int
               ) -> list[dict[str, Any]]:
    """For each container module whose output the graph computes too (same shape), in the graph's order: its
    name, class, shape, the relative error ‖a − o‖ / ‖o‖ and cosine of the artifact's tensor `a` against the
    original's `o` over all `inputs` (one model input each)."""
    import onnx
    import torch

    from edgekit.passes.export import module_path
    from edgekit.passes.reconstruct import forward_calls
    from edgekit.runtimes.onnxruntime import OnnxRuntimeRunner

    containers = {name: layer for name, layer in module.named_modules() if name and any(True for _ in layer.children())}
    last: dict[str, tuple[int, str]] = {}  # module -> (node index, the tensor its last node writes)
    for index, node in enumerate(graph.graph.node):
        path = module_path(node.name)
        for name in containers:
            if node.output and (path == name or path.startswith(name + ".")):
                last[name] = (index, node.output[0])
    tensors: dict[str, str] = {}
    for name, (_, tensor) in sorted(last.items(), key=lambda item: item[1][0]):
        tensors.setdefault(tensor, name)  # the outermost module that ends in this tensor names it
    probed = onnx.shape_inference.infer_shapes(graph)
    known = {value.name: value for value in probed.graph.value_info}
    outputs = [known[tensor] for tensor in tensors if tensor in known]
    probed.graph.output.extend(outputs)

    names = [value.name for value in outputs]
    artifact: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for values in OnnxRuntimeRunner(probed.SerializeToString(), threads).stream(inputs, names):
        for name, value in zip(names, values, strict=True):
            artifact[name].append(np.asarray(value, np.float32))
    original: dict[str, list[np.ndarray]] = {tensors[name]: [] for name in names}
    layers = {containers[name]: name for name in original}
    for x in inputs:
        for name, out in forward_calls(module, torch.from_numpy(x[None]), layers):
            if isinstance(out, torch.Tensor):
                original[name].append(out.float().numpy())
    rows = []
    for tensor in names:
        name = tensors[tensor]
        ours, theirs = original[name], artifact[tensor]
        if len(ours) != len(theirs) or any(a.shape != b.shape for a, b in zip(ours, theirs, strict=True)):
            continue  # called more than once per pass, or pruned inside: not the same tensor
        o, a = np.concatenate([x.ravel() for x in ours]), np.concatenate([x.ravel() for x in theirs])
        norm = float(np.linalg.norm(o))
        rows.append({"layer": name, "module": type(containers[name]).__name__, "shape": list(ours[0].shape),
                     "rel_error": float(np.linalg.norm(a - o)) / norm if norm else float(np.linalg.norm(a)),
                     "cosine": min(1.0, float(a @ o) / (float(np.linalg.norm(a)) * norm)) if norm and a.any() else 0.0})
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The first layer whose relative error reaches `DEPARTS` and the worst one (None where there are no rows)."""
    first = next((row["layer"] for row in rows if row["rel_error"] >= DEPARTS), None)
    worst = max(rows, key=lambda row: row["rel_error"])["layer"] if rows else None
    return {"layers": len(rows), "departs_at": DEPARTS, "first_departure": first, "worst": worst}
