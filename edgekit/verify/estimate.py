"""A first latency estimate for the target: a roofline over the whole graph.

Compute time is 2·MACs over the target's peak at the artifact's precision; memory time is the
bytes moved (weights read once, every activation written and read once) over its bandwidth;
the estimate is the larger. It ignores per-op efficiency and overheads, so it is a lower bound
that says which resource bounds the model, and the report labels it `estimated`.
"""

from __future__ import annotations

from typing import Any

from edgekit.passes.analyze import Analysis
from edgekit.targets import Target


def roofline(analysis: Analysis, target: Target, precision: str) -> dict[str, Any]:
    peak_precision = precision
    peak = target.compute.peak_gops(precision)
    if peak is None:  # the device has no fast path at this precision: it runs at its fp32 rate
        peak_precision, peak = "fp32", target.compute.fp32_gflops
    if peak is None:
        return {"label": "estimated", "ms": None, "reason": f"{target.name} lists no {precision} or fp32 peak"}
    bytes_moved = analysis.weight_bytes + 2 * analysis.activation_bytes
    compute_ms = 2 * analysis.macs / (peak * 1e9) * 1e3
    memory_ms = bytes_moved / (target.memory.bandwidth_gbps * 1e9) * 1e3
    return {
        "label": "estimated",
        "ms": round(max(compute_ms, memory_ms), 4),
        "bound": "compute" if compute_ms >= memory_ms else "memory",
        "compute_ms": round(compute_ms, 4),
        "memory_ms": round(memory_ms, 4),
        "peak_gops": peak,
        "peak_precision": peak_precision,
        "bandwidth_gbps": target.memory.bandwidth_gbps,
        "method": "roofline: max(2*MACs/peak, (weight bytes + 2*activation bytes)/bandwidth), no op efficiency",
    }
