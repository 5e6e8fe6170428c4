"""Change the numeric precision of an exported graph.

FP16 uses onnxruntime's own float16 converter with float32 inputs and outputs kept, so an app
feeds the same tensors whatever the precision inside. INT8 (calibrated, per-channel QDQ) plugs in
here as another precision of the same function.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgekit.errors import UsageError

if TYPE_CHECKING:
    import onnx

SUPPORTED = ("fp32", "fp16")


def to_precision(model: onnx.ModelProto, precision: str) -> onnx.ModelProto:
    """The graph at `precision`; fp32 returns the graph unchanged."""
    if precision == "fp32":
        return model
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        return convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    raise UsageError(f"precision {precision} is not supported by this edgekit (supported: {', '.join(SUPPORTED)})")
