"""Run ONNX artifacts in onnxruntime on this host's CPU, with the thread count fixed and no spinning.

Spinning threads distort timings on a shared machine, and an unset thread count measures the
host rather than the target, so both are always set.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from edgekit.errors import StageError, first_line
from edgekit.runtimes.base import time_calls


def cpu_session(model_bytes: bytes, threads: int) -> Any:
    """An onnxruntime CPU session with a fixed thread count and no spinning; an unloadable graph is a StageError."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for unloadable graphs
        raise StageError(f"onnxruntime cannot load the artifact: {first_line(err)}") from err


def describe(threads: int) -> str:
    import onnxruntime as ort

    return f"onnxruntime {ort.__version__} CPUExecutionProvider, {threads} threads"


class OnnxRuntimeRunner:
    def __init__(self, model_bytes: bytes, threads: int) -> None:
        self.session = cpu_session(model_bytes, threads)
        self.input_name = self.session.get_inputs()[0].name
        self.description = describe(threads)

    def run(self, inputs: np.ndarray) -> np.ndarray:
        rows = [self.session.run(None, {self.input_name: row[None]})[0] for row in inputs]
        return np.concatenate(rows).astype(np.float32)

    def stream(self, inputs: np.ndarray, names: list[str]) -> Iterator[list[np.ndarray]]:
        """The named output tensors for each sample in turn (for statistics too large to stack)."""
        for row in inputs:
            yield self.session.run(names, {self.input_name: row[None]})

    def time(self, sample: np.ndarray, warmup: int, runs: int) -> list[float]:
        feed = {self.input_name: sample[None]}
        return time_calls(lambda: self.session.run(None, feed), warmup, runs)
