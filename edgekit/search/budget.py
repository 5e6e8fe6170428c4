"""A compression budget from one line of user text: `latency=6ms`, `size=4MB`, `macs=1.5G`, `bytes=90MB`,
`tokens_per_s=20`.

Every budget becomes an upper limit on one additive cost the search sums over its units (`latency_ms`,
`bytes`, `macs`): a throughput floor is a latency ceiling per token, an artifact size is bytes. The text the
user gave travels with it, so messages and reports quote it back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from edgekit.errors import UsageError

Metric = Literal["latency_ms", "bytes", "macs"]

_VALUE = re.compile(r"((?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([A-Za-z/]*)")
_BYTES = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
_COUNT = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_SECONDS = {"us": 1e-3, "ms": 1.0, "s": 1e3}  # to milliseconds
# kind -> (the cost it limits, the units it takes ("": a bare number), an example)
_KINDS: dict[str, tuple[Metric, dict[str, float], str]] = {
    "latency": ("latency_ms", _SECONDS, "latency=6ms"),
    "size": ("bytes", _BYTES, "size=4MB"),
    "bytes": ("bytes", _BYTES, "bytes=90MB"),
    "macs": ("macs", _COUNT, "macs=1.5G"),
    "tokens_per_s": ("latency_ms", {"": 1.0}, "tokens_per_s=20"),
}


@dataclass(frozen=True)
class Budget:
    """At most `limit` of `metric` (milliseconds, bytes or multiply-accumulates); `text` is what the user wrote."""

    kind: str
    metric: Metric
    limit: float
    text: str

    def allows(self, value: float) -> bool:
        return value <= self.limit

    def format(self, value: float) -> str:
        """A cost in the budget's own terms (a latency as tokens/s where the budget is a throughput)."""
        if self.kind == "tokens_per_s":
            return f"{1e3 / value:.3g} tokens/s" if value > 0 else "unbounded tokens/s"
        if self.metric == "latency_ms":
            return f"{value:.3f} ms"
        if self.metric == "bytes":
            return f"{value / 1e6:.3f} MB"
        return f"{value / 1e9:.4g} G MACs"


def parse_budget(text: str) -> Budget:
    """`kind=value[unit]`; anything else is a one-line UsageError naming what is accepted."""
    kind, _, value = text.strip().partition("=")
    kind = kind.strip().lower().replace("-", "_")
    if kind not in _KINDS or not value.strip():
        examples = ", ".join(example for *_, example in _KINDS.values())
        raise UsageError(f"budget {text!r}: expected kind=value, one of {examples}")
    metric, units, example = _KINDS[kind]
    match = _VALUE.fullmatch(value.strip())
    factors = {u.upper(): factor for u, factor in units.items()}
    unit = match.group(2).upper() if match else None
    if match is None or unit not in factors:
        named = ", ".join(u for u in units if u)
        takes = f"a number, plain or with {named}" if "" in units and named else "a plain number" if "" in units \
            else f"a number with a unit ({named})"
        raise UsageError(f"budget {text!r}: {kind} takes {takes}, e.g. {example}")
    number = float(match.group(1))
    if number <= 0:
        raise UsageError(f"budget {text!r}: the {kind} must be positive")
    limit = 1e3 / number if kind == "tokens_per_s" else number * factors[unit]
    return Budget(kind=kind, metric=metric, limit=limit, text=f"{kind}={value.strip()}")
