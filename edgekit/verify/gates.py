"""Gates: the limits an artifact must meet. Each result says what it was checked against, or why it was not."""

from __future__ import annotations

from typing import Any

from edgekit.targets import Budgets

# accuracy gate -> (the family metric it reads, what that metric is measured on, why it can be missing);
# each family adapter names its own (`Family.accuracy_gates`)
AccuracyGates = dict[str, tuple[str, str, str]]


def check_gates(gates: Budgets, accuracy_gates: AccuracyGates, metrics: dict[str, Any], *,
                size_bytes: int | None = None, latency_ms: float | None = None, latency_basis: str = "",
                fallback_ops: int | None = None) -> list[dict[str, Any]]:
    """One entry per set gate: status passed, failed or not_checked (with the reason). An accuracy gate of
    another family (top-1 for a detector, set by the target's budgets for every family) is left out."""
    checks = {name: (metrics.get(key), basis, missing) for name, (key, basis, missing) in accuracy_gates.items()}
    checks |= {
        "max_size_mb": (None if size_bytes is None else size_bytes / 1e6, "artifact file", "no artifact size"),
        "max_latency_ms": (latency_ms, latency_basis, "no latency figure for the target"),
        "on_cpu_fallback": (fallback_ops, "ops outside the target's op rules", "no op check for this format"),
    }
    results = []
    for name, limit in gates.model_dump().items():
        if limit is None or name not in checks:
            continue
        value, basis, missing = checks[name]
        entry: dict[str, Any] = {"name": name, "limit": limit, "value": value, "basis": basis}
        if value is None:
            entry.update(status="not_checked", reason=missing)
        elif name == "on_cpu_fallback":
            entry["status"] = "passed" if value == 0 else "failed" if limit == "fail" else "warned"
        else:
            passed = value >= limit if name.startswith("min_") else value <= limit
            entry["status"] = "passed" if passed else "failed"
        results.append(entry)
    return results


def accuracy_shortfall(gates: Budgets, accuracy_gates: AccuracyGates, metrics: dict[str, Any]) -> float:
    """How far `metrics` miss the accuracy gates, in points summed over the gates (0: they all hold or cannot be
    checked; size and latency are not judged). Agreement counts in percentage points."""
    accuracy_only = Budgets(**{k: v for k, v in gates.model_dump().items() if k in accuracy_gates})
    missed = [r for r in check_gates(accuracy_only, accuracy_gates, metrics) if r["status"] == "failed"]
    return sum(abs(r["value"] - r["limit"]) * (100 if r["name"].startswith("min_") else 1) for r in missed)
