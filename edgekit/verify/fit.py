"""The device model held to public measurements: fit a target's `[latency]` numbers to the latencies its maker
and peer tools publish, and say how well the fit predicts a model it has not seen.

`targets/measurements/<target>.csv` lists published latencies (model, precision, runtime, input size, the
source and the words around the number). Each row's model is built here with random weights (latency
depends on the graph, not the weights), exported at the row's input size and precision the way a build
for that target would make it (FP16 by onnxruntime's converter, INT8 as a QDQ graph in the target's
activation scheme), and analysed once (cached). The fit moves the kernel-class efficiencies, the per-op
overhead and the memory efficiency in log space to minimise the squared log ratio estimate/published,
with a weak pull towards the current numbers so that a handful of rows cannot push an unconstrained
number anywhere. Leave-one-model-out: each model's rows are estimated by a fit made without them.
"""

from __future__ import annotations

import csv
import statistics
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from math import exp, log
from pathlib import Path
from typing import Any

from edgekit.cache import ArrayCache, checked_json
from edgekit.errors import UsageError
from edgekit.passes.analyze import Analysis, LayerStats
from edgekit.resources import resource_dir
from edgekit.targets import RUNTIME_FORMATS, Target
from edgekit.verify.estimate import estimate, runtime_of

COLUMNS = ["model", "precision", "runtime", "input", "latency_ms", "source", "quote"]
CLASSIFIERS = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_lite0", "resnet18", "resnet50",
               "googlenet", "vgg16", "vgg19")
DETECTORS = ("yolo11n", "yolo11s", "yolo11m", "yolo11l", "yolo11x", "yolov8n")
MODELS = (*CLASSIFIERS, *DETECTORS)
PRIOR_WEIGHT = 0.25  # residual per log-unit a number moves from its current value: a 2x move costs like a 17% miss
BOUNDS = {"node_overhead_us": (0.1, 2000.0), "invoke_overhead_us": (1.0, 1e5), "memory_efficiency": (1e-3, 1.0),
          "runtime_efficiency": (0.1, 10.0)}
EFFICIENCY_BOUNDS = (1e-4, 1.0)
LOG_STEP = 0.01  # the fit's finite-difference step on log numbers: a 1% move


@dataclass(frozen=True)
class Measurement:
    """One published latency: what ran, where the number was read and the words around it."""

    model: str
    precision: str
    runtime: str
    input: int
    latency_ms: float
    source: str
    quote: str


def measurements_file(target: Target) -> Path:
    return resource_dir("targets") / "measurements" / f"{target.name}.csv"


def read_measurements(path: Path) -> list[Measurement]:
    """The rows of a measurement table; a missing file or a bad row is a UsageError naming the file and line."""
    if not path.is_file():
        raise UsageError(f"no published measurements for {path.stem} ({path} does not exist)")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames != COLUMNS:
            raise UsageError(f"{path}: the columns must be {','.join(COLUMNS)}")
        rows = []
        for line, row in enumerate(reader, start=2):
            try:
                measured = Measurement(row["model"], row["precision"], row["runtime"], int(row["input"]),
                                       float(row["latency_ms"]), row["source"], row["quote"])
            except (TypeError, ValueError) as err:
                raise UsageError(f"{path}:{line}: {err}") from None
            problem = (f"model {measured.model!r} is not one edgekit builds here ({', '.join(MODELS)})"
                       if measured.model not in MODELS else
                       f"precision {measured.precision!r} is not fp32, fp16 or int8"
                       if measured.precision not in ("fp32", "fp16", "int8") else
                       "latency_ms and input must be positive" if measured.latency_ms <= 0 or measured.input <= 0
                       else "source must be a link (http...)" if not measured.source.startswith("http")
                       else "quote is empty" if not measured.quote.strip() else None)
            if problem:
                raise UsageError(f"{path}:{line}: {problem}")
            rows.append(measured)
    if not rows:
        raise UsageError(f"{path} holds no measurements")
    return rows


def _module(model: str, size: int) -> Any:
    """The torch module a build of `model` exports, random-initialised (detectors in their export form)."""
    from edgekit.families import FAMILIES, LoadedModel, LoadOptions

    options = LoadOptions(input_size=size)
    if model in DETECTORS:
        import contextlib
        import io
        import os

        os.environ.setdefault("YOLO_OFFLINE", "1")
        from ultralytics.nn.tasks import DetectionModel

        with contextlib.redirect_stdout(io.StringIO()):
            source = DetectionModel(f"{model}.yaml", verbose=False)
        loaded = FAMILIES["detector"].load(source, options)
    elif model == "efficientnet_lite0":  # its weights ship in a pip package: no download
        loaded = FAMILIES["classifier"].load(model, options)
    else:
        import torchvision

        loaded = FAMILIES["classifier"].load(torchvision.models.get_model(model, weights=None), options)
    assert isinstance(loaded, LoadedModel)  # image families load torch modules
    return loaded.module


def build_graph(model: str, precision: str, size: int, int8_activations: str) -> Any:
    """The ONNX graph a build for the target makes of `model` at `precision` and input `size`."""
    import numpy as np
    import torch

    from edgekit.passes.export import export_onnx
    from edgekit.passes.int8 import Int8Quantizer, Int8Scheme
    from edgekit.passes.quantize import to_fp16

    torch.manual_seed(0)
    graph = export_onnx(_module(model, size), (1, 3, size, size), 17)
    if precision == "fp16":
        return to_fp16(graph)
    if precision == "int8":
        calibration = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
        return Int8Quantizer(graph, calibration, Int8Scheme(int8_activations, "minmax", False),  # type: ignore[arg-type]
                             None, 1).quantize()
    return graph


def row_analysis(row: Measurement, target: Target, cache: ArrayCache) -> Analysis:
    """The analysis of the graph `row` names, from the cache when it holds it."""
    import onnx
    import torch

    from edgekit import __version__
    from edgekit.passes.analyze import analyze

    activations = next((r.int8_activations for r in target.runtimes if "int8" in r.precisions), "uint8")
    key = {"kind": "published-model-analysis", "model": row.model, "precision": row.precision, "input": row.input,
           "int8_activations": activations if row.precision == "int8" else None, "edgekit": __version__,
           "torch": torch.__version__, "onnx": onnx.__version__}
    data = checked_json(cache.path(key, ".json"), lambda: analyze(build_graph(
        row.model, row.precision, row.input, activations)).to_dict(), cache.note)
    fmt = RUNTIME_FORMATS.get(row.runtime, row.runtime)  # a row names an engine, or a format ("tflite")
    return Analysis(**{**data, "layers": [LayerStats(**layer) for layer in data["layers"]], "format": fmt})


def parameters(target: Target, graphs: list[Analysis]) -> dict[str, float]:
    """The `[latency]` numbers these graphs' estimates depend on, at their current values (a per-inference overhead
    only where the profile has one). INT8 kernels get their own efficiencies (`int8_efficiency`) when float rows are
    fitted too; otherwise they are the device's only ones. Where rows were measured in several of the device's
    runtimes, each but the most measured gets a speed factor (`runtime_efficiency`): the same graph ran 2x apart
    in two engines on one board."""
    model = target.latency
    if model is None:
        raise UsageError(f"{target.name} has no [latency] section to fit")
    used = {(layer.op_class, layer.precision) for graph in graphs for layer in graph.layers
            if layer.op_class not in ("fused", "data") and (layer.macs or layer.op_class == "elementwise")}
    separate_int8 = any(precision != "int8" for _, precision in used)
    values = {"node_overhead_us": model.node_overhead_us, "memory_efficiency": model.memory_efficiency}
    if model.invoke_overhead_us is not None:
        values["invoke_overhead_us"] = model.invoke_overhead_us
    engines = Counter(name for graph in graphs if (name := runtime_of(graph, target)))
    order = [runtime.name for runtime in target.runtimes]
    for name in sorted(engines, key=lambda name: (-engines[name], order.index(name)))[1:]:  # vs the most measured
        values[f"runtime_efficiency.{name}"] = model.runtime_efficiency.get(name, 1.0)
    for op_class, precision in sorted(used):
        if precision == "int8" and separate_int8:
            values[f"int8_efficiency.{op_class}"] = model.int8_efficiency.get(  # type: ignore[call-overload]
                op_class, model.efficiency.get(op_class, 1.0))  # type: ignore[call-overload]
        else:
            values[f"efficiency.{op_class}"] = model.efficiency.get(op_class, 1.0)  # type: ignore[call-overload]
    return values


def with_values(target: Target, values: dict[str, float]) -> Target:
    """`target` with these `[latency]` numbers (keys as `parameters` names them)."""
    assert target.latency is not None
    update: dict[str, Any] = {"efficiency": dict(target.latency.efficiency),
                              "int8_efficiency": dict(target.latency.int8_efficiency),
                              "runtime_efficiency": dict(target.latency.runtime_efficiency)}
    for key, value in values.items():
        table, _, name = key.partition(".")
        if name:
            update[table][name] = value
        else:
            update[key] = value
    return target.model_copy(update={"latency": target.latency.model_copy(update=update)})


def _bounds(key: str) -> tuple[float, float]:
    return BOUNDS.get(key, BOUNDS.get(key.partition(".")[0], EFFICIENCY_BOUNDS))


def fit(target: Target, graphs: list[Analysis], published: list[float], prior: dict[str, float],
        prior_weight: float = PRIOR_WEIGHT) -> dict[str, float]:
    """The `[latency]` numbers that minimise the squared log ratio estimate/published over the rows, plus a weak
    pull towards `prior`, within physical bounds (0 < efficiency <= 1)."""
    import numpy as np
    from scipy.optimize import least_squares

    keys = list(prior)
    low = np.log([_bounds(k)[0] for k in keys])
    high = np.log([_bounds(k)[1] for k in keys])
    start = np.clip(np.log([prior[k] for k in keys]), low + 0.01, high - 0.01)  # inside: the solver stalls on a bound

    def residuals(x: np.ndarray) -> np.ndarray:
        device = with_values(target, dict(zip(keys, np.exp(x).tolist(), strict=True)))
        misses = [log(estimate(graph, device, top=0)["ms"] / ms) for graph, ms in zip(graphs, published, strict=True)]
        return np.concatenate([misses, prior_weight * (x - start)])

    def jacobian(x: np.ndarray) -> np.ndarray:
        """Forward differences of 0.01 in log space (backward at an upper bound). The solver's own relative steps
        vanish where a number is 1.0 (log 0), and the estimate's rounding then hides its slope."""
        base = residuals(x)
        steps = np.where(x + LOG_STEP <= high, LOG_STEP, -LOG_STEP)
        return np.stack([(residuals(x + step * np.eye(len(x))[i]) - base) / step for i, step in enumerate(steps)], 1)

    result = least_squares(residuals, start, jac=jacobian, bounds=(low, high))
    return {key: float(exp(value)) for key, value in zip(keys, result.x, strict=True)}


def _error(estimated: float, published: float) -> float:
    return (estimated - published) / published


def fit_published(target: Target, cache: ArrayCache,
                  progress: Callable[[list[Measurement]], Iterable[Measurement]] = iter) -> dict[str, Any]:
    """Each published row's estimate with the current numbers, with numbers fitted to all rows, and with numbers
    fitted without that row's model (leave-one-model-out); the fitted numbers and the median errors."""
    path = measurements_file(target)
    rows = read_measurements(path)
    graphs = [row_analysis(row, target, cache) for row in progress(rows)]
    published = [row.latency_ms for row in rows]
    current = parameters(target, graphs)
    fitted = fit(target, graphs, published, current)
    held_out: dict[int, float] = {}
    for model in sorted({row.model for row in rows}):
        seen = [i for i, row in enumerate(rows) if row.model != model]
        if not seen:  # one model only: nothing to fit it on
            continue
        values = fit(target, [graphs[i] for i in seen], [published[i] for i in seen], current)
        device = with_values(target, values)
        for i, row in enumerate(rows):
            if row.model == model:
                held_out[i] = estimate(graphs[i], device, top=0)["ms"]
    before = [estimate(graph, target, top=0)["ms"] for graph in graphs]
    after = [estimate(graph, with_values(target, fitted), top=0)["ms"] for graph in graphs]
    table = [{"model": row.model, "precision": row.precision, "runtime": row.runtime, "input": row.input,
              "published_ms": row.latency_ms, "before_ms": round(before[i], 4), "after_ms": round(after[i], 4),
              "held_out_ms": round(held_out[i], 4) if i in held_out else None,
              "held_out_ratio": round(held_out[i] / row.latency_ms, 3) if i in held_out else None}
             for i, row in enumerate(rows)]

    def median_error(estimates: Iterable[tuple[int, float]]) -> float | None:
        errors = [abs(_error(ms, published[i])) for i, ms in estimates]
        return round(statistics.median(errors), 4) if errors else None

    return {
        "target": target.name, "file": str(path), "rows": table, "models": sorted({row.model for row in rows}),
        "current": current, "fitted": {key: _rounded(value) for key, value in fitted.items()},
        "median_error_before": median_error(enumerate(before)),
        "median_error_after": median_error(enumerate(after)),
        "held_out_median_error": median_error(held_out.items()),
        "label": "estimated (device model) vs published (measured on the device by the source)",
    }


def _rounded(value: float) -> float:
    """Three significant figures: the fit does not know its numbers better."""
    return float(f"{value:.3g}")


def write_fit(target_file: Path, result: dict[str, Any]) -> list[str]:
    """Write the fitted numbers the fit moved into the target's TOML, each with a `[sources]` entry naming the rows it
    was fitted to (a number the rows left where it was keeps its own source); line edits, so the file's comments
    and layout stay. Returns the keys written."""
    from edgekit.targets import load_target_file

    models = ", ".join(result["models"])
    note = (f"fitted to {len(result['rows'])} published rows of targets/measurements/{Path(result['file']).name}: "
            f"models {models}; leave-one-model-out median error {result['held_out_median_error'] * 100:.0f}% "
            f"(was {result['median_error_before'] * 100:.0f}% with the assumed numbers)")
    lines = target_file.read_text().splitlines()
    moved = {key: value for key, value in result["fitted"].items() if value != _rounded(result["current"][key])}
    for key, value in moved.items():
        table, _, name = key.rpartition(".")
        _set(lines, "latency" + (f".{table}" if table else ""), name, repr(value))
        _set(lines, "sources", f'"latency.{key}"', '"' + note + '"')
    target_file.write_text("\n".join(lines) + "\n")
    load_target_file(target_file)  # still a valid profile, every number with its source
    return list(moved)


def record_published(target_file: Path, result: dict[str, Any], written: bool) -> None:
    """Write the `[published]` table: the rows, and the median errors of the profile's numbers as they now stand (the
    fitted ones when `written`) and of the fit left one model out."""
    import json

    from edgekit.targets import load_target_file

    lines = target_file.read_text().splitlines()
    error = result["median_error_after" if written else "median_error_before"]
    values = {"rows": str(len(result["rows"])), "models": json.dumps(result["models"]), "median_error": repr(error)}
    if result["held_out_median_error"] is not None:
        values["held_out_median_error"] = repr(result["held_out_median_error"])
    for key, value in values.items():
        _set(lines, "published", key, value)
    target_file.write_text("\n".join(lines) + "\n")
    load_target_file(target_file)


def _set(lines: list[str], section: str, key: str, value: str) -> None:
    """Set `key = value` in `[section]` of a TOML file's lines, adding the key (or the section, after its parent's
    block) where missing."""
    header = f"[{section}]"
    starts = [i for i, line in enumerate(lines) if line.strip().startswith("[")]
    if header not in (lines[i].strip() for i in starts):
        parent = f"[{section.rpartition('.')[0]}"
        after = max(i for i in starts if lines[i].strip().startswith(parent))
        end = next((i for i in starts if i > after), len(lines))
        while end > 0 and not lines[end - 1].strip():
            end -= 1
        lines[end:end] = ["", header, f"{key} = {value}"]
        return
    start = next(i for i in starts if lines[i].strip() == header)
    end = next((i for i in starts if i > start), len(lines))
    for i in range(start + 1, end):
        if lines[i].split("=", 1)[0].strip() == key:
            lines[i] = f"{key} = {value}"
            return
    last = max((i for i in range(start + 1, end) if lines[i].strip()), default=start)
    lines.insert(last + 1, f"{key} = {value}")
