"""The device model for language models: decode is memory-bound, prefill compute-bound.

Generating one token reads every weight once (the embedding table: one row) plus the key/value cache
so far, and does 2 FLOPs per weight; prefilling P tokens reads the weights once and does 2·P FLOPs per
weight. Each takes the larger of its memory and compute time on the target's streaming bandwidth and
peak (the `[latency]` section's memory and gemv/gemm efficiencies where the profile has them), plus
one launch overhead per kernel of the graph. All figures are labelled estimated.
"""

from __future__ import annotations

from typing import Any

from edgekit.targets import Target

# ops that only compute shapes or relabel a tensor's layout: no kernel launch worth counting
METADATA_OPS = frozenset({"Constant", "Shape", "Unsqueeze", "Squeeze", "Reshape", "Range", "ConstantOfShape", "Equal"})


def kernels(graph: Any) -> int:
    """Nodes of an ONNX graph that move tensor data on every step (each pays a launch overhead)."""
    return sum(node.op_type not in METADATA_OPS for node in graph.graph.node)


def estimate_lm(target: Target, *, weight_bytes: int, embedding_bytes: int, vocab: int, params: int,
                kv_bytes_per_token: int, prompt_tokens: int, context: int, nodes: int,
                int8_compute: bool) -> dict[str, Any]:
    """Estimated prefill ms for `prompt_tokens` and decode ms per token at `context` cached tokens, for a graph of
    `nodes` kernels (each pays the profile's launch overhead once per step). `int8_compute`: the integer weights
    meet int8 activations (MatMulNBits accuracy level 4), so the int8 peak and efficiencies apply."""
    model = target.latency
    memory = target.memory
    bandwidth = (memory.streaming_bandwidth_gbps or memory.bandwidth_gbps) * 1e9 * (
        model.memory_efficiency if model else 1.0)
    overhead = nodes * (model.node_overhead_us if model else 0.0) * 1e-6
    compute = target.compute
    float_peak = (compute.fp16_gflops if target.kind == "gpu" else None) or compute.fp32_gflops
    peak = (int8_compute and compute.int8_gops) or float_peak
    if peak is None:
        return {"label": "estimated", "ms": None, "reason": f"{target.name} lists no floating-point peak"}
    int8 = bool(int8_compute and compute.int8_gops)
    efficiency = ({**model.efficiency, **model.int8_efficiency} if int8 else model.efficiency) if model else {}
    streamed = weight_bytes - embedding_bytes + embedding_bytes / vocab  # one embedding row per token
    decode_memory = (streamed + kv_bytes_per_token * context) / bandwidth
    decode_compute = 2 * params / (peak * 1e9 * efficiency.get("gemv", 1.0))
    prefill_memory = (streamed + kv_bytes_per_token * prompt_tokens) / bandwidth
    prefill_compute = 2 * params * prompt_tokens / (peak * 1e9 * efficiency.get("gemm", 1.0))
    decode_ms = (overhead + max(decode_memory, decode_compute)) * 1e3
    return {
        "label": "estimated",
        "ms": round(decode_ms, 4),
        "decode_ms_per_token": round(decode_ms, 4),
        "tokens_per_s": round(1e3 / decode_ms, 2),
        "decode_bound": "memory" if decode_memory >= decode_compute else "compute",
        "prefill_ms": round((overhead + max(prefill_memory, prefill_compute)) * 1e3, 4),
        "prefill_tokens": prompt_tokens,
        "context": context,
        "bytes_per_token": int(streamed + kv_bytes_per_token * context),
        "kv_cache_bytes_per_token": kv_bytes_per_token,
        "overhead_ms": round(overhead * 1e3, 4),
        "compute_precision": "int8" if int8 else "float",
        "method": ("decode: kernels × launch overhead + max(bytes read per token / streaming bandwidth, "
                   "2·params / peak·gemv efficiency); prefill: the same with 2·params·tokens / peak·gemm efficiency; "
                   f"{target.name}'s profile"),
    }
