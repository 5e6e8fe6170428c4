"""One interface for every place an artifact runs: this host's runtime now, a remote device later."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np


class Runner(Protocol):
    description: str  # e.g. "onnxruntime 1.32.0 CPUExecutionProvider, 2 threads"

    def run(self, inputs: np.ndarray) -> np.ndarray:
        """Outputs for a batch of samples (rows of `inputs`), stacked in the same order."""

    def time(self, sample: np.ndarray, warmup: int, runs: int) -> list[float]:
        """Milliseconds of `runs` single-sample inferences after `warmup` untimed ones."""


def time_calls(call: Callable[[], Any], warmup: int, runs: int) -> list[float]:
    """Milliseconds of each of `runs` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        timings.append((time.perf_counter() - start) * 1000)
    return timings
