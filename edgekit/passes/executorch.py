"""Lower a torch module to an ExecuTorch program (`model.pte`) whose graph the XNNPACK delegate runs.

torch.export captures the module at its static input shape; `to_edge_transform_and_lower` hands every part XNNPACK
takes to the delegate (the rest stays on ExecuTorch's portable kernels). INT8 is PyTorch's PT2E flow: the
XNNPACKQuantizer annotates the exported graph (weights int8 symmetric per output channel, activations int8 per
tensor), observers watch the build's calibration images under its range rule (`mean-minmax`: each image's min and
max, averaged; `minmax`: the extremes; any other: the quantizer's histogram search), and `convert_pt2e` folds the
ranges into quantize/dequantize pairs the delegate runs as int8 kernels. A family may keep some ops float (a
detector's decode): their annotations are dropped after the quantizer's, so the int8 ops before them hand over
dequantized values and XNNPACK runs them in float. ExecuTorch is an extra (`edgekit[executorch]`): its dependencies
(coremltools, pandas, hydra…) weigh about 250 MB.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edgekit.errors import StageError, UsageError, first_line

if TYPE_CHECKING:
    import numpy as np
    import torch

INSTALL = "pip install 'edgekit[executorch]'"
WEIGHTS = "int8, symmetric, per output channel"
ACTIVATIONS = "int8, asymmetric, per tensor"
HISTOGRAM = "histogram (the XNNPACKQuantizer's own), over the calibration images"
# an op of the exported graph as a family sees it: (node name, op, class of the innermost module that ran it)
GraphOp = tuple[str, str, str]


def require_executorch() -> None:
    """--format pte both builds and verifies in ExecuTorch: refuse the build up front where it is not installed."""
    if importlib.util.find_spec("executorch") is None:
        raise UsageError(f"--format pte lowers and verifies the model in ExecuTorch, which is not installed here: "
                         f"{INSTALL}")


def _minmax_observer() -> Any:
    from torchao.quantization.pt2e.observer import MinMaxObserver

    return MinMaxObserver


def _mean_minmax_observer() -> Any:
    import torch

    class MeanMinMax(_minmax_observer()):  # type: ignore[misc]
        """Each call's (one image's) min and max, averaged over the calls."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.numel():
                low, high = torch.aminmax(x.detach().float())
                self.calls += 1
                if self.calls == 1:
                    self.min_val.copy_(low)
                    self.max_val.copy_(high)
                else:
                    self.min_val.add_((low - self.min_val) / self.calls)
                    self.max_val.add_((high - self.max_val) / self.calls)
            return x

    return MeanMinMax


# the calibration rules with an observer of their own: what the report calls it, and the observer (imported late);
# any other rule keeps the quantizer's histogram
OBSERVERS: dict[str, tuple[str, Callable[[], Any]]] = {
    "mean-minmax": ("per-image min/max averaged", _mean_minmax_observer),
    "minmax": ("min/max over the calibration images", _minmax_observer),
}


def observer_of(rule: str) -> str:
    """What observes the activation ranges for a build's calibration rule."""
    return OBSERVERS[rule][0] if rule in OBSERVERS else HISTOGRAM


def to_pte(module: torch.nn.Module, input_shape: tuple[int, ...], calibration: np.ndarray | None = None,
           keep_float: Callable[[list[GraphOp]], list[str]] = lambda ops: [],
           rule: str | None = None) -> tuple[bytes, list[str]]:
    """The program of `module` at `input_shape`, XNNPACK-delegated, and the ops kept float: float, or int8 (PT2E)
    when `calibration` holds the images (model inputs) the activation ranges are observed on under `rule` (None:
    the quantizer's histogram), but for the ops `keep_float` names."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    example = (torch.zeros(input_shape),)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.export.export(module.eval(), example)
            kept: list[str] = []
            if calibration is not None:
                quantized, kept = _quantized(program.module(), calibration, keep_float, rule)
                program = torch.export.export(quantized, example)
            lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
            return bytes(lowered.to_executorch().buffer), kept
    except Exception as err:  # export and lowering raise many types; the first line names the op or the rule
        raise StageError(f"ExecuTorch lowering failed: {first_line(err)}") from err


def _quantized(graph: Any, calibration: np.ndarray, keep_float: Callable[[list[GraphOp]], list[str]],
               rule: str | None) -> tuple[Any, list[str]]:
    """The exported graph with int8 quantize/dequantize pairs at the ranges the calibration images give, and the
    names of the ops left float."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import Quantizer

    kept: list[str] = []

    class Keeping(Quantizer):
        """The XNNPACKQuantizer's annotations, less those of the ops the family keeps float."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = XNNPACKQuantizer().set_global(_with_observer(
                get_symmetric_quantization_config(is_per_channel=True), rule))

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            self.inner.annotate(model)
            nodes = {node.name: node for node in model.graph.nodes if node.op == "call_function"}
            kept.extend(keep_float([(node.name, str(node.target), _module_class(node)) for node in nodes.values()]))
            for name in kept:
                nodes[name].meta.pop("quantization_annotation", None)
            return model

        def validate(self, model: torch.fx.GraphModule) -> None:
            self.inner.validate(model)

    prepared = prepare_pt2e(graph, Keeping())
    for image in calibration:  # one at a time: the graph was exported at batch 1
        prepared(torch.from_numpy(image[None]))
    return convert_pt2e(prepared), kept


def _with_observer(config: Any, rule: str | None) -> Any:
    """The quantizer's config with its activation observer set by `rule` (the histogram kept for other rules)."""
    from dataclasses import replace

    if rule not in OBSERVERS:
        return config
    observer = OBSERVERS[rule][1]()
    activations = replace(config.input_activation, observer_or_fake_quant_ctr=observer.with_args(eps=2**-12))
    return replace(config, input_activation=activations, output_activation=activations)


def _module_class(node: Any) -> str:
    """The class name of the innermost module whose forward made `node` ("" for the model's own ops)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    kind = list(stack.values())[-1][1]
    return (kind if isinstance(kind, str) else kind.__name__).rsplit(".", 1)[-1]
