"""Family adapters: the one place that knows a model family. `resolve` picks the adapter for a source."""

from __future__ import annotations

from pathlib import Path

from edgekit.errors import UsageError
from edgekit.families.base import Family, LoadedModel, LoadOptions, Samples
from edgekit.families.classifier import ClassifierFamily
from edgekit.families.detector import DetectorFamily
from edgekit.families.llm_adapter import LanguageModelFamily
from edgekit.families.segmenter_adapter import SegmenterFamily

# in the order they are asked: an Ultralytics .pt is a detector before it is a classifier's state dict
FAMILIES: dict[str, Family] = {"llm": LanguageModelFamily(), "segmenter": SegmenterFamily(),
                               "detector": DetectorFamily(), "classifier": ClassifierFamily()}

__all__ = ["FAMILIES", "Family", "LoadOptions", "LoadedModel", "Samples", "resolve"]


def resolve(source: object, options: LoadOptions, family: str | None = None) -> Family:
    """The adapter named by `family`, else the first that recognises the source."""
    if family is not None:
        if family not in FAMILIES:
            raise UsageError(f"unknown family {family!r} (known: {', '.join(FAMILIES)})")
        return FAMILIES[family]
    for adapter in FAMILIES.values():
        if adapter.claims(source, options):
            return adapter
    if isinstance(source, (str, Path)) and not Path(source).exists():
        raise UsageError(f"model not found: {source} (a file, a folder, or a known name such as mobilenet_v2)")
    raise UsageError(f"no model family recognises {source!r}")
