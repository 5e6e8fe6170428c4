"""Estimate artifacts for a target, and hold the device model against this host's measurements.

`host_profile` calibrates the device model for this CPU by microbenchmarks (cached per CPU,
runtime version and thread count); `validate` estimates each artifact with that profile, measures
it in its runtime, and reports the error per model and its median. Calibration and validation
share no model: the microbenchmarks are single kernels, the validated artifacts whole networks.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from edgekit import __version__
from edgekit.cache import ArrayCache, checked_json
from edgekit.errors import UsageError, first_line
from edgekit.passes.analyze import Analysis, analyze, analyze_tflite
from edgekit.runtimes import runner_for
from edgekit.runtimes.base import Runner
from edgekit.runtimes.litert import LiteRtRunner
from edgekit.runtimes.onnxruntime import OnnxRuntimeRunner
from edgekit.targets import Target
from edgekit.verify.estimate import estimate
from edgekit.verify.latency import host_description, steady_ms
from edgekit.verify.microbench import host_target, measure_host

FORMATS = {".onnx": "onnx", ".tflite": "tflite"}


def artifact_file(path: str | Path) -> Path:
    """The model file of an artifact: the file itself, or the model.onnx / model.tflite in a build folder."""
    path = Path(path)
    if path.is_dir():
        found = [path / f"model{suffix}" for suffix in FORMATS if (path / f"model{suffix}").is_file()]
        if not found:
            raise UsageError(f"{path} holds no model.onnx or model.tflite")
        return found[0]
    if not path.is_file():
        raise UsageError(f"artifact not found: {path}")
    if path.suffix not in FORMATS:
        raise UsageError(f"{path}: an artifact is an .onnx or .tflite file (or a build folder)")
    read_artifact(path)  # its content too, before any long work
    return path


def read_artifact(path: Path) -> Any:
    """The artifact as its format's parser reads it: an onnx.ModelProto, or the bytes of a flatbuffer LiteRT
    accepted; a file the parser refuses (damaged, truncated, another format) is a UsageError naming it."""
    fmt = FORMATS[path.suffix]
    data = path.read_bytes()
    try:
        if fmt == "tflite":
            from ai_edge_litert.interpreter import Interpreter

            Interpreter(model_content=data)
            return data
        import onnx

        model = onnx.load_from_string(data)
    except Exception as err:  # protobuf's DecodeError, LiteRT's ValueError, …
        raise UsageError(f"{path} is not a valid {fmt} model ({first_line(err)})") from None
    if not model.graph.node:
        raise UsageError(f"{path} is not a valid onnx model (it holds no graph)")
    return model


def analyze_artifact(path: Path) -> Analysis:
    model = read_artifact(path)
    return analyze_tflite(model) if isinstance(model, bytes) else analyze(model)


def host_profile(threads: int, cache: ArrayCache, refresh: bool = False,
                 progress: Callable[[list[Any]], Iterable[Any]] = iter) -> Target:
    """This host's device model, from microbenchmarks run once per CPU, onnxruntime version and thread count."""
    import onnxruntime

    key = {"kind": "host-microbenchmarks", "host": host_description(), "onnxruntime": onnxruntime.__version__,
           "threads": threads, "edgekit": __version__,
           "microbenchmarks": "profiled kernels, dequantized weights"}
    measured = checked_json(cache.path(key, ".json"), lambda: measure_host(threads, progress=progress), cache.note,
                            refresh)
    return host_target(measured)


def _sample(runner: Runner) -> np.ndarray:
    """A random single input (without the batch axis) in the layout the runner takes: NCHW for images."""
    if isinstance(runner, LiteRtRunner):
        shape = list(runner.input["shape"][1:])
        shape = [shape[-1], *shape[:-1]] if len(shape) == 3 else shape
    else:
        assert isinstance(runner, OnnxRuntimeRunner)  # runner_for makes one of the two
        shape = [d if isinstance(d, int) else 1 for d in runner.session.get_inputs()[0].shape[1:]]
    return np.random.default_rng(0).random(shape, dtype=np.float32)


def measure_artifact(path: Path, threads: int, runs: int = 30) -> float:
    """The median of `runs` timed inferences, in the artifact's runtime on this host."""
    fmt = FORMATS[path.suffix]
    runner = runner_for(path.read_bytes(), fmt, threads)
    sample = _sample(runner)
    return steady_ms(runner, sample, warmup=5, runs=runs, repeats=1)


def validate(paths: list[Path], profile: Target, threads: int, rounds: int = 3,
             progress: Callable[[list[int]], Iterable[int]] = iter) -> dict[str, Any]:
    """Estimate vs measurement for each artifact on this host, and the median absolute error. Each artifact is
    measured once per round and keeps its best, as the microbenchmarks do: a slow spell of a shared machine then
    skews neither side."""
    measured = {path: math.inf for path in paths}
    for _ in progress(list(range(rounds))):
        for path in paths:
            measured[path] = min(measured[path], measure_artifact(path, threads))
    rows = []
    for path in paths:
        estimated = estimate(analyze_artifact(path), profile)["ms"]
        rows.append({"artifact": str(path), "format": FORMATS[path.suffix], "estimated_ms": round(estimated, 4),
                     "measured_ms": round(measured[path], 4),
                     "error": round((estimated - measured[path]) / measured[path], 4)})
    return {
        "host": host_description(), "threads": threads, "profile": profile.description, "models": rows,
        "median_abs_error": round(statistics.median(abs(row["error"]) for row in rows), 4) if rows else None,
        "note": f"estimates use the host profile calibrated by onnxruntime microbenchmarks; measured: host, best of "
                f"{rounds} rounds",
    }


def profile_toml(target: Target) -> str:
    """A profile as a target file users can pass to `--target` and edit."""
    import tomli_w

    return tomli_w.dumps(target.model_dump(exclude_none=True, exclude={"sha256"}))
