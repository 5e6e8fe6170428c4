"""Lower a torch module to an ExecuTorch program (`model.pte`) whose graph the XNNPACK delegate runs.

torch.export captures the module at its static input shape; `to_edge_transform_and_lower` hands every part XNNPACK
takes to the delegate (the rest stays on ExecuTorch's portable kernels). INT8 is PyTorch's PT2E flow: the
XNNPACKQuantizer annotates the exported graph (weights int8 symmetric per output channel, activations int8 per
tensor), observers watch the build's calibration images, and `convert_pt2e` folds the ranges into
quantize/dequantize pairs the delegate runs as int8 kernels. ExecuTorch is an extra (`edgekit[executorch]`): its
dependencies (coremltools, pandas, hydra…) weigh about 250 MB.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import TYPE_CHECKING, Any

from edgekit.errors import StageError, UsageError, first_line

if TYPE_CHECKING:
    import numpy as np
    import torch

INSTALL = "pip install 'edgekit[executorch]'"
WEIGHTS = "int8, symmetric, per output channel"
ACTIVATIONS = "int8, asymmetric, per tensor"
OBSERVER = "histogram (the XNNPACKQuantizer's observer), over the calibration images"


def require_executorch() -> None:
    """--format pte both builds and verifies in ExecuTorch: refuse the build up front where it is not installed."""
    if importlib.util.find_spec("executorch") is None:
        raise UsageError(f"--format pte lowers and verifies the model in ExecuTorch, which is not installed here: "
                         f"{INSTALL}")


def to_pte(module: torch.nn.Module, input_shape: tuple[int, ...], calibration: np.ndarray | None = None) -> bytes:
    """The program of `module` at `input_shape`, XNNPACK-delegated: float, or int8 (PT2E) when `calibration` holds
    the images (model inputs) the activation ranges are observed on."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    example = (torch.zeros(input_shape),)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.export.export(module.eval(), example)
            if calibration is not None:
                program = torch.export.export(_quantized(program.module(), calibration), example)
            lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
            return bytes(lowered.to_executorch().buffer)
    except Exception as err:  # export and lowering raise many types; the first line names the op or the rule
        raise StageError(f"ExecuTorch lowering failed: {first_line(err)}") from err


def _quantized(graph: Any, calibration: np.ndarray) -> Any:
    """The exported graph with int8 quantize/dequantize pairs at the ranges the calibration images give."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(graph, quantizer)
    for image in calibration:  # one at a time: the graph was exported at batch 1
        prepared(torch.from_numpy(image[None]))
    return convert_pt2e(prepared)
