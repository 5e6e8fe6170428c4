"""Runners: one interface for every place an artifact runs (see `base.Runner`)."""

from __future__ import annotations

from edgekit.runtimes.base import Runner


def runner_for(model: bytes, fmt: str, threads: int) -> Runner:
    """The runner of this host that takes `fmt`: LiteRT for TFLite, onnxruntime for ONNX."""
    if fmt == "tflite":
        from edgekit.runtimes.litert import LiteRtRunner

        return LiteRtRunner(model, threads)
    from edgekit.runtimes.onnxruntime import OnnxRuntimeRunner

    return OnnxRuntimeRunner(model, threads)
