"""The device model: a latency estimate for the target, op by op, from the exported graph.

Each op costs a fixed launch overhead plus the larger of its compute time (2·MACs over the
target's peak at the op's precision, scaled by how efficiently that kind of kernel reaches it)
and its memory time (weights and activations moved, over the achievable bandwidth), plus, where the target has
one, a fixed cost per inference (a USB accelerator's round trip). Ops a
runtime folds into their neighbours (activations after a conv, QDQ pairs, constant subgraphs)
cost nothing. Every number comes from the target's TOML (`[compute]`, `[memory]`, `[latency]`),
so the same code estimates a Jetson, a Coral and this host, and `edgekit estimate --validate`
checks it against measurements here. The result is labelled `estimated`.
"""

from __future__ import annotations

from dataclasses import replace
from math import log, prod
from typing import Any

from edgekit.passes.analyze import Analysis, LayerStats
from edgekit.targets import Target


def estimate(analysis: Analysis, target: Target, top: int | None = None) -> dict[str, Any]:
    """Estimated milliseconds for one inference on `target`, with every layer's (or the `top` slowest; `index`: its
    position in `analysis.layers`, so estimates of graphs with the same ops can be compared op by op), as the
    target's runtime for the graph's format runs it.

    Compute classes (conv, depthwise, grouped, gemm, gemv) scale the compute peak by their efficiency;
    elementwise ops, which compute next to nothing, scale the bandwidth by theirs; both times the runtime's
    factor (`runtime_efficiency`)."""
    model = target.latency
    bandwidth = target.memory.bandwidth_gbps * 1e9 * (model.memory_efficiency if model else 1.0)
    resident = (model.on_chip_weights_mb or 0) * 1e6 if model else 0.0
    reason = unrunnable(analysis, target)
    if reason:
        return {"label": "estimated", "ms": None, "reason": reason}
    engine = runtime_of(analysis, target)
    onnxruntime = engine == "onnxruntime"
    speed = model.runtime_efficiency.get(engine, 1.0) if model and engine else 1.0
    rows: list[dict[str, Any]] = []
    compute_total, memory_total = 0.0, 0.0
    for index, stored in enumerate(analysis.layers):
        layer = _as_onnxruntime_runs(stored) if onnxruntime else stored
        if layer.op_class == "fused":
            continue
        peak_precision, peak = _peak(target, layer.precision)
        assert peak is not None or layer.op_class == "data"  # unrunnable() found none missing
        efficiency = _efficiency(target, layer, dequantized=layer.precision != stored.precision) * speed
        compute_s = 2 * layer.macs / (peak * 1e9 * efficiency) if layer.macs and peak else 0.0
        streamed = max(0.0, layer.weight_bytes - resident)
        resident = max(0.0, resident - layer.weight_bytes)  # the accelerator caches weights in graph order
        moved = streamed + (0 if model and model.activations_on_chip else layer.activation_bytes)
        memory_s = moved / (bandwidth * (efficiency if layer.op_class == "elementwise" else 1.0))
        overhead_s = (model.node_overhead_us if model else 0.0) * 1e-6
        compute_total += compute_s
        memory_total += memory_s
        rows.append({"index": index, "name": layer.name, "op": layer.op, "class": layer.op_class,
                     "precision": peak_precision, "ms": (overhead_s + max(compute_s, memory_s)) * 1e3,
                     "bound": "compute" if compute_s >= memory_s else "memory"})
    if model and model.activations_on_chip and analysis.layers:  # the graph's input and output cross the link
        io = analysis.layers[0].activation_bytes + analysis.layers[-1].activation_bytes
        rows.append({"index": None, "name": "graph input and output", "op": "transfer", "class": "io", "precision": "-",
                     "ms": io / bandwidth * 1e3, "bound": "memory"})
    if model and model.invoke_overhead_us:
        rows.append({"index": None, "name": "invocation", "op": "invoke", "class": "io", "precision": "-",
                     "ms": model.invoke_overhead_us * 1e-3, "bound": "overhead"})
    total = sum(row["ms"] for row in rows)
    slowest = sorted(rows, key=lambda row: -row["ms"])[:top]  # None: all
    return {
        "label": "estimated",
        "ms": round(total, 4),
        "bound": "compute" if compute_total >= memory_total else "memory",
        "compute_ms": round(compute_total * 1e3, 4),
        "memory_ms": round(memory_total * 1e3, 4),
        "ops": len(rows),
        "layers": [{**row, "ms": round(row["ms"], 6)} for row in slowest],
        "method": ("per op: overhead + max(2*MACs / (peak * class efficiency), bytes moved / bandwidth), summed "
                   "(elementwise ops: bytes / (bandwidth * their efficiency)); "
                   f"numbers from {target.name}'s profile" if model else
                   f"roofline per op (no [latency] section in {target.name}'s profile: no efficiencies, no overhead)"),
    }


def runtime_of(analysis: Analysis, target: Target) -> str | None:
    """The name of the target's runtime (its first) for the analysed graph's format."""
    runtime = target.runtime_for(analysis.format)
    return runtime.name if runtime else None


def _as_onnxruntime_runs(layer: LayerStats) -> LayerStats:
    """A node as onnxruntime runs it where its fusions left it alone: a Q/DQ converts a whole tensor, and a weighted
    op computes in float on dequantized weights."""
    if not layer.unfused_in_onnxruntime:
        return layer
    if layer.op in ("QuantizeLinear", "DequantizeLinear"):
        return replace(layer, op_class="elementwise")
    return replace(layer, precision="fp32")


def unrunnable(analysis: Analysis, target: Target) -> str | None:
    """Why the target cannot run this graph, or None: ops at a precision it has no peak for (nor an fp32 one to fall
    back to), such as the fp32 ops of a float model on an integer-only accelerator. Data movement (the Casts at the
    float32 inputs and outputs of an FP16 build, reshapes) computes nothing and needs no peak."""
    stranded = [layer for layer in analysis.layers if layer.op_class not in ("fused", "data")
                and _peak(target, layer.precision)[1] is None]
    if not stranded:
        return None
    precisions = "/".join(sorted({layer.precision for layer in stranded}))
    ops = ", ".join(sorted({layer.op for layer in stranded})[:4])
    runs = [p for p in ("fp32", "fp16", "int8") if target.compute.peak_gops(p) is not None]
    device = (f"{target.name} is an integer-only accelerator" if target.integer_only
              else f"{target.name} has no peak for {precisions} (it runs {', '.join(runs)})")
    return (f"{device} and cannot run its {len(stranded)} {precisions} ops ({ops}); build it for "
            f"{target.name} with --precision {' or '.join(runs)}")


def _peak(target: Target, precision: str) -> tuple[str, float | None]:
    """The peak an op of this precision runs at: the device's rate for it, else its fp32 rate."""
    peak = target.compute.peak_gops(precision)
    return (precision, peak) if peak is not None else ("fp32", target.compute.fp32_gflops)


def _efficiency(target: Target, layer: LayerStats, dequantized: bool = False) -> float:
    """The nearest measured kernel's efficiency (in reduction depth and output size, on log scales), else the
    class's. A float layer on `dequantized` int8 weights takes the kernels measured that way where the profile has
    them (onnxruntime's depthwise convs run several times slower so)."""
    model = target.latency
    if model is None:
        return 1.0
    outputs = prod(layer.output_shape) if layer.output_shape else 0
    alike = [k for k in model.kernels if k.op_class == layer.op_class and k.precision == layer.precision]
    measured = [k for k in alike if k.weights == "dequantized"] if dequantized else []
    measured = measured or [k for k in alike if k.weights == "constant"]
    if measured and layer.macs and outputs:
        reduction = layer.macs / outputs
        nearest = min(measured, key=lambda k: abs(log(k.reduction / reduction)) + abs(log(k.outputs / outputs)))
        return nearest.efficiency
    table: dict[str, float] = dict(model.efficiency.items())  # looked up by any op class ("data" has no entry)
    if layer.precision == "int8":
        table.update(model.int8_efficiency.items())
    return table.get(layer.op_class, 1.0)
