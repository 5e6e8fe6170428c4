"""Gates: the limits an artifact must meet. Each result says what it was checked against, or why it was not."""

from __future__ import annotations

from typing import Any

from edgekit.targets import Budgets


def check_gates(gates: Budgets, report: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per set gate: status passed, failed or not_checked (with the reason)."""
    latency = report["latency_ms"]
    on_device = latency.get("measured_device")
    latency_value, latency_basis = (
        (on_device["p50"], on_device["label"]) if on_device
        else (latency["estimated_target"].get("ms"), f"estimated: {report['target']['name']}")
    )
    checks = {
        "max_top1_drop_pt": (report.get("top1_drop_pt"), "held-out labels", "no labels in the held-out set"),
        "min_top1_agreement": (report.get("top1_agreement"), "held-out images vs the original", ""),
        "max_size_mb": (report["size_bytes"] / 1e6, "artifact file", ""),
        "max_latency_ms": (latency_value, latency_basis, "no latency figure for the target"),
    }
    results = []
    for name, limit in gates.model_dump().items():
        if limit is None:
            continue
        value, basis, missing = checks[name]
        entry: dict[str, Any] = {"name": name, "limit": limit, "value": value, "basis": basis}
        if value is None:
            entry.update(status="not_checked", reason=missing)
        else:
            passed = value >= limit if name.startswith("min_") else value <= limit
            entry["status"] = "passed" if passed else "failed"
        results.append(entry)
    return results
