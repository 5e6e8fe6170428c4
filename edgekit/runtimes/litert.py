"""Run TFLite artifacts in LiteRT (ai-edge-litert) on this host, XNNPACK on, threads fixed.

Samples arrive NCHW float as everywhere in edgekit; this runner transposes them to the NHWC the
artifact takes, quantizes them when its input is integer and dequantizes integer outputs, the
same arithmetic an app does with the scale and zero point in the report.
"""

from __future__ import annotations

import numpy as np

from edgekit.errors import StageError, first_line
from edgekit.runtimes.base import time_calls


class LiteRtRunner:
    def __init__(self, model_bytes: bytes, threads: int, keep_tensors: bool = False) -> None:
        """`keep_tensors`: LiteRT keeps every intermediate tensor (for `tensors`), at the cost of its memory
        planning."""
        import ai_edge_litert
        from ai_edge_litert.interpreter import Interpreter

        try:
            self.interpreter = Interpreter(model_content=model_bytes, num_threads=threads,
                                           experimental_preserve_all_tensors=keep_tensors)
            self.interpreter.allocate_tensors()
        except Exception as err:  # LiteRT raises RuntimeError/ValueError for unloadable models
            raise StageError(f"LiteRT cannot load the artifact: {first_line(err)}") from err
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        version = getattr(ai_edge_litert, "__version__", "")
        self.description = f"LiteRT (ai-edge-litert {version}) XNNPACK, {threads} threads".replace(" )", ")")

    def _feed(self, sample: np.ndarray) -> np.ndarray:
        return to_tensor(sample[None].transpose(0, 2, 3, 1), self.input)

    def _invoke(self, data: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self.input["index"], data)
        self.interpreter.invoke()
        return from_tensor(self.interpreter.get_tensor(self.output["index"]), self.output).astype(np.float32)

    def run(self, inputs: np.ndarray) -> np.ndarray:
        return np.concatenate([self._invoke(self._feed(row)) for row in inputs])

    def tensors(self, sample: np.ndarray, details: dict[int, dict]) -> dict[int, np.ndarray]:
        """After one inference on `sample`, the tensors of `details` (index -> LiteRT's tensor detail) as real
        numbers; needs `keep_tensors`."""
        self._invoke(self._feed(sample))
        return {index: from_tensor(self.interpreter.get_tensor(index), detail).astype(np.float32)
                for index, detail in details.items()}

    def time(self, sample: np.ndarray, warmup: int, runs: int) -> list[float]:
        data = self._feed(sample)
        return time_calls(lambda: self._invoke(data), warmup, runs)


def to_tensor(data: np.ndarray, detail: dict) -> np.ndarray:
    """Float data in the tensor's dtype: quantized with its scale and zero point when the tensor is integer."""
    dtype = np.dtype(detail["dtype"])
    if dtype.kind not in "iu":
        return data.astype(dtype)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(data / scale + zero_point), info.min, info.max).astype(dtype)


def from_tensor(values: np.ndarray, detail: dict) -> np.ndarray:
    """A tensor's values as real numbers: dequantized when the tensor is integer."""
    if np.dtype(detail["dtype"]).kind not in "iu":
        return values
    scale, zero_point = detail["quantization"]
    return (values.astype(np.float32) - zero_point) * scale
