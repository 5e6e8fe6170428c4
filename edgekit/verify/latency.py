"""Latency measured on this host: warm up, time single inferences, report percentiles with their conditions."""

from __future__ import annotations

import os
import platform
from functools import cache
from typing import Any

import numpy as np

from edgekit.runtimes.base import Runner


@cache
def host_description() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"


PROFILED_RUNS = 5  # inferences the runtime's profiler averages per-layer times over


def measure(runner: Runner, sample: np.ndarray, warmup: int, runs: int, layers: bool = False) -> dict[str, Any]:
    """Percentiles of `runs` timed inferences; with `layers`, where the runtime has a profiler (onnxruntime), each
    layer's time too, from a separate profiled session (profiling slows the run it watches, so it times none of the
    above)."""
    timings = np.array(runner.time(sample, warmup=warmup, runs=runs))
    measured = {
        "label": "measured: host",
        "p50": round(float(np.percentile(timings, 50)), 4),
        "p90": round(float(np.percentile(timings, 90)), 4),
        "min": round(float(timings.min()), 4),
        "runs": runs,
        "warmup": warmup,
        "runtime": runner.description,
        "host": host_description(),
    }
    layer_times = getattr(runner, "layer_times", None)
    if not layers:
        return measured
    if layer_times is None:
        return {**measured, "layers_note": f"{runner.description.split(',')[0]} has no per-layer profiler here"}
    profiled = min(runs, PROFILED_RUNS)
    return {**measured, "layers": layer_times(sample, profiled), "layers_profiled_runs": profiled}


def steady_ms(runner: Runner, sample: np.ndarray, warmup: int, runs: int, repeats: int = 3) -> float:
    """Best of `repeats` medians of `runs` timed inferences: the steadiest figure a shared machine gives."""
    return min(float(np.median(runner.time(sample, warmup=warmup, runs=runs))) for _ in range(repeats))
