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


def measure(runner: Runner, sample: np.ndarray, warmup: int, runs: int) -> dict[str, Any]:
    timings = np.array(runner.time(sample, warmup=warmup, runs=runs))
    return {
        "label": "measured: host",
        "p50": round(float(np.percentile(timings, 50)), 4),
        "p90": round(float(np.percentile(timings, 90)), 4),
        "min": round(float(timings.min()), 4),
        "runs": runs,
        "warmup": warmup,
        "runtime": runner.description,
        "host": host_description(),
    }


def steady_ms(runner: Runner, sample: np.ndarray, warmup: int, runs: int, repeats: int = 3) -> float:
    """Best of `repeats` medians of `runs` timed inferences: the steadiest figure a shared machine gives."""
    return min(float(np.median(runner.time(sample, warmup=warmup, runs=runs))) for _ in range(repeats))
