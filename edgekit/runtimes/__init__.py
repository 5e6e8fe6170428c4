"""Runners: one interface for every place an artifact runs (see `base.Runner`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgekit.runtimes.base import Runner

if TYPE_CHECKING:
    from edgekit.runtimes.onnx_lm import KeyValueDecoder


def runner_for(model: bytes, fmt: str, threads: int, weights: bytes = b"") -> Runner:
    """The runner of this host that takes `fmt`: LiteRT for TFLite, OpenVINO for its IR (`model` the XML,
    `weights` the .bin), ExecuTorch for its programs (.pte), onnxruntime for ONNX."""
    if fmt == "tflite":
        from edgekit.runtimes.litert import LiteRtRunner

        return LiteRtRunner(model, threads)
    if fmt == "openvino":
        from edgekit.runtimes.openvino import OpenVinoRunner

        return OpenVinoRunner(model, weights, threads)
    if fmt == "pte":
        from edgekit.runtimes.executorch import ExecuTorchRunner

        return ExecuTorchRunner(model, threads)
    from edgekit.runtimes.onnxruntime import OnnxRuntimeRunner

    return OnnxRuntimeRunner(model, threads)


def files_runner(files: dict[str, bytes], fmt: str, threads: int) -> Runner:
    """The runner of an artifact's files, the model first (an OpenVINO IR's weights in `model.bin` beside it)."""
    return runner_for(next(iter(files.values())), fmt, threads, files.get("model.bin", b""))


def lm_runner(files: list[bytes], fmt: str, threads: int) -> KeyValueDecoder:
    """A language model's decoder graph stepped through its cache by the runtime `fmt` names: OpenVINO for its IR
    (`files`: the XML, then its weights), onnxruntime for ONNX. Here and on a board alike."""
    if fmt == "openvino":
        from edgekit.runtimes.openvino import OpenVinoCausalLM

        return OpenVinoCausalLM(files[0], files[1], threads)
    from edgekit.runtimes.onnx_lm import OnnxCausalLM

    return OnnxCausalLM(files[0], threads)
