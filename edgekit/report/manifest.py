"""manifest.json: what went in (hashes), what came out (hashes), and the software that did it.

Nothing time-dependent goes here, so two builds of the same inputs give the same manifest
apart from what differs in the environment itself.
"""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from edgekit.data import file_sha256

PACKAGES = ("edgekit", "torch", "torchvision", "onnx", "onnxruntime", "openvino", "litert-torch", "ai-edge-litert",
            "ai-edge-quantizer", "executorch", "torchao", "numpy", "pillow", "pydantic")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def output_hashes(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {
        name: {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
        for name in names
    }
