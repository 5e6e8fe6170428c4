"""Run OpenVINO IR artifacts (model.xml + model.bin) in OpenVINO's CPU plugin on this host: image models, and
language models through their key/value cache.

Threads are fixed, the latency hint asks for one stream, and one inference request serves every call: the setting
a camera box runs one frame at a time in. The model is read from bytes, never from a path.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekit.errors import StageError, first_line
from edgekit.runtimes.base import time_calls
from edgekit.runtimes.onnx_lm import KeyValueDecoder


def compiled(xml: bytes, weights: bytes, threads: int, profile: bool = False) -> Any:
    """The IR compiled for this CPU with `threads` threads, the latency hint and one stream (`profile`: with
    OpenVINO's per-layer counters on); an unloadable IR is a StageError."""
    import openvino as ov

    core = ov.Core()
    try:
        model = core.read_model(xml.decode(), ov.Tensor(np.frombuffer(weights, dtype=np.uint8)))
        return core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                                 "NUM_STREAMS": 1, "PERF_COUNT": profile})
    except Exception as err:  # OpenVINO raises RuntimeError for malformed or unsupported IR
        raise StageError(f"OpenVINO cannot load the artifact: {first_line(err)}") from err


def describe(model: Any, threads: int) -> str:
    """The runtime as the report names it, with the precision the CPU plugin chose for float ops on this CPU (bf16
    on x86 CPUs with bf16 instructions, f16 on Arm, else f32): another board may compute the same IR otherwise."""
    import openvino as ov

    precision = model.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    return f"OpenVINO {ov.get_version().split('-')[0]} CPU plugin, {threads} threads, {precision} float ops"


class OpenVinoRunner:
    def __init__(self, xml: bytes, weights: bytes, threads: int) -> None:
        self.model = compiled(xml, weights, threads)
        self.request = self.model.create_infer_request()
        self.xml, self.weights, self.threads = xml, weights, threads
        self.description = describe(self.model, threads)

    def _infer(self, request: Any, sample: np.ndarray) -> np.ndarray:
        return np.array(request.infer({0: sample[None]}, share_inputs=False)[0], dtype=np.float32)

    def io(self) -> dict[str, list[dict[str, Any]]]:
        """The compiled model's inputs and outputs: name, shape, dtype (as the report's artifact block lists them)."""
        def spec(ports: list[Any]) -> list[dict[str, Any]]:
            return [{"name": port.get_any_name(), "shape": list(port.get_shape()),
                     "dtype": port.get_element_type().to_dtype().name} for port in ports]

        return {"inputs": spec(self.model.inputs), "outputs": spec(self.model.outputs)}

    def run(self, inputs: np.ndarray) -> np.ndarray:
        return np.concatenate([self._infer(self.request, row) for row in inputs])

    def time(self, sample: np.ndarray, warmup: int, runs: int) -> list[float]:
        return time_calls(lambda: self.request.infer({0: sample[None]}), warmup, runs)

    def layer_times(self, sample: np.ndarray, runs: int) -> list[dict[str, Any]]:
        """Each executed layer's milliseconds per inference, mean of `runs` after one untimed run, from OpenVINO's
        own counters (PERF_COUNT, on the graph as the CPU plugin fused it: a fused layer carries the time of the
        ops folded into it), slowest first."""
        request = compiled(self.xml, self.weights, self.threads, profile=True).create_infer_request()
        self._infer(request, sample)
        total: dict[tuple[str, str], float] = {}
        for _ in range(runs):
            request.infer({0: sample[None]})
            for layer in request.profiling_info:  # the last inference's counters
                if layer.status.name == "EXECUTED":
                    key = (layer.node_name, layer.node_type)
                    total[key] = total.get(key, 0.0) + layer.real_time.total_seconds() * 1000
        rows = [{"name": name, "op": op, "ms": round(ms / runs, 4)} for (name, op), ms in total.items()]
        return sorted(rows, key=lambda row: -row["ms"])


class OpenVinoCausalLM(KeyValueDecoder):
    """A language model's IR (edgekit's decoder graph converted, MatMulNBits weights included) stepped through its
    cache by one inference request: the past length changes every step, which the CPU plugin's dynamic shapes take."""

    def __init__(self, xml: bytes, weights: bytes, threads: int) -> None:
        model = compiled(xml, weights, threads)
        self.request = model.create_infer_request()
        self.past_shapes = {port.get_any_name(): [dim.get_length() if dim.is_static else None
                                                  for dim in port.get_partial_shape()]
                            for port in self.request.model_inputs if port.get_any_name().startswith("past_")}
        self.description = describe(model, threads)

    def run(self, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        # the cache is read in place (infer is synchronous) and the outputs come back as copies already: copying
        # either again cost a third of a decode step on SmolLM2-135M
        result = self.request.infer(feed, share_inputs=True)
        logits, *presents = (np.asarray(result[name]) for name in self.outputs)
        return logits, presents
