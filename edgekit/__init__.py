"""edgekit: a trained model in, a small, fast, verified artifact for one edge device out.

The Python API (`edgekit.api`) is what the `edgekit` command calls: `build`, `verify`, `inspect`, `generate`,
`estimate`, and `load_target`.
Heavy libraries (torch, onnx, onnxruntime) load only inside the functions that need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from edgekit.api import build, estimate, generate, inspect, verify
    from edgekit.pipeline import BuildResult
    from edgekit.targets import load_target

__all__ = ["BuildResult", "__version__", "build", "estimate", "generate", "inspect", "load_target", "verify"]


def __getattr__(name: str) -> Any:
    if name in ("build", "verify", "inspect", "generate", "estimate"):
        from edgekit import api

        return getattr(api, name)
    if name == "BuildResult":
        from edgekit.pipeline import BuildResult

        return BuildResult
    if name == "load_target":
        from edgekit.targets import load_target

        return load_target
    raise AttributeError(name)
