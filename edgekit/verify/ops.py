"""Where each op of a TFLite artifact will run on the target: checked against the target's op rules.

The rules are data in `targets/*.toml` (`[constraints]`): an op allow-list for the accelerator or
delegate, a tensor-rank limit, static shapes. An op outside them falls back to the CPU. On an Edge
TPU the compiler maps only the graph before the first fallback, so every op after it runs on the
CPU too; the report says where that happens.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekit.targets import Target


def op_placement(model: bytes, target: Target) -> dict[str, Any]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    rules = target.constraints
    allowed = set(rules.op_allowlist)
    placed, first = [], None
    for op in interpreter._get_ops_details():  # the only public listing of a model's ops in LiteRT's Python API
        reasons = []
        if allowed and op["op_name"] not in allowed:
            reasons.append("op not supported by the accelerator")
        used = [tensors[i] for i in [*op["inputs"], *op["outputs"]] if i in tensors]
        if rules.max_tensor_rank and any(len(t["shape"]) > rules.max_tensor_rank for t in used):
            reasons.append(f"tensor rank above {rules.max_tensor_rank}")
        if rules.static_shapes and any(np.any(np.asarray(t.get("shape_signature", [])) < 0) for t in used):
            reasons.append("dynamic shape")
        if first is None and reasons:
            first = {"index": op["index"], "op": op["op_name"], "reasons": reasons}
        where = "cpu" if reasons else ("cpu (after the first fallback)" if first and target.kind == "tpu" else
                                       "accelerator" if allowed else "cpu")
        placed.append({"index": op["index"], "op": op["op_name"], "placement": where, "reasons": reasons})
    fallbacks = [p for p in placed if p["reasons"]]
    return {
        "checked_against": f"{target.name} [constraints]",
        "ops": len(placed),
        "fallback_ops": sorted({p["op"] for p in fallbacks}),
        "fallback_count": len(fallbacks),
        "first_fallback": first,
        "on_accelerator": sum(p["placement"] == "accelerator" for p in placed),
        "placement": placed,
    }
