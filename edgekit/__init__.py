"""edgekit: a trained model in, a small, fast, verified artifact for one edge device out.

The Python API is what the `edgekit` command calls: `build`, `inspect`, `load_target`.
Heavy libraries (torch, onnx, onnxruntime) load only inside the functions that need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from edgekit.pipeline import BuildResult, build, inspect
    from edgekit.targets import load_target

__all__ = ["BuildResult", "__version__", "build", "inspect", "load_target"]


def __getattr__(name: str) -> Any:
    if name in ("build", "inspect", "BuildResult"):
        from edgekit import pipeline

        return getattr(pipeline, name)
    if name == "load_target":
        from edgekit.targets import load_target

        return load_target
    raise AttributeError(name)
