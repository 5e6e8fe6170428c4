"""Run ONNX artifacts in onnxruntime on this host's CPU, with the thread count fixed and no spinning.

Spinning threads distort timings on a shared machine, and an unset thread count measures the
host rather than the target, so both are always set.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import StageError, first_line
from edgekit.runtimes.base import time_calls


def cpu_session(model: bytes | str, threads: int, profile_prefix: str | None = None) -> Any:
    """An onnxruntime CPU session over a graph's bytes, or its path where its weights lie in files beside it, with
    a fixed thread count and no spinning (profiling each node into files named `profile_prefix`*, where given); an
    unloadable graph is a StageError."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
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
        self.model_bytes, self.threads = model_bytes, threads

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

    def layer_times(self, sample: np.ndarray, runs: int) -> list[dict[str, Any]]:
        """Each node's milliseconds per inference, mean of `runs` after one untimed run, from onnxruntime's own
        profiler (its kernel times, on the graph as onnxruntime optimized it: fused nodes carry new names), slowest
        first."""
        total: dict[tuple[str, str], float] = defaultdict(float)
        for call in profiled_runs(self.model_bytes, self.threads, sample, warmup=1, runs=runs):
            for name, op, us in call:
                total[name, op] += us
        rows = [{"name": name, "op": op, "ms": round(us / 1000 / runs, 4)} for (name, op), us in total.items()]
        return sorted(rows, key=lambda row: -row["ms"])


def profiled_runs(model: bytes, threads: int, sample: np.ndarray, warmup: int,
                  runs: int) -> list[list[tuple[str, str, float]]]:
    """Each timed run's kernels as onnxruntime's profiler saw them: (node, op, microseconds), in order. The session
    is its own (profiling is set when a session is made)."""
    with tempfile.TemporaryDirectory(prefix="edgekit-profile-") as folder:
        session = cpu_session(model, threads, str(Path(folder) / "ort"))
        feed = {session.get_inputs()[0].name: sample[None]}
        for _ in range(warmup + runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    calls = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                   if e.get("cat") == "Session" and e["name"] == "model_run")[warmup:]
    kernels = sorted((e["ts"], e["name"].removesuffix("_kernel_time"), e["args"].get("op_name", ""), e["dur"])
                     for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"))
    return [[(name, op, us) for ts, name, op, us in kernels if start <= ts <= end] for start, end in calls]
