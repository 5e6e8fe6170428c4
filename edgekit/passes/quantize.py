"""Change the numeric precision of an exported graph.

FP16 uses onnxruntime's own float16 converter with float32 inputs and outputs kept, so an app
feeds the same tensors whatever the precision inside. INT8 needs calibration data and lives in
`int8.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

SUPPORTED = ("fp32", "fp16", "int8")


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """FP16 weights and arithmetic inside, float32 inputs and outputs outside."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
