"""What every family adapter provides: the only family-aware code in edgekit lives behind this interface."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    import onnx
    import torch


@dataclass
class LoadOptions:
    """What the user said about the model beyond its path (`--arch`, `--num-classes`, `--input-size`)."""

    arch: str | None = None
    num_classes: int | None = None
    input_size: int | None = None


@dataclass
class LoadedModel:
    """A model ready for the pipeline: a torch module, or an ONNX graph when the input was ONNX."""

    name: str
    family: str
    source: str
    input_shape: tuple[int, ...]
    preprocess: dict[str, Any]
    fingerprint: str = field(repr=False)
    module: torch.nn.Module | None = field(default=None, repr=False)
    onnx_model: onnx.ModelProto | None = field(default=None, repr=False)
    source_file: Path | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def is_torch(self) -> bool:
        return self.module is not None


@dataclass
class Samples:
    """Preprocessed inputs (one row per file) and their labels where the folder has them."""

    inputs: np.ndarray
    files: list[str]
    labels: np.ndarray | None = None
    label_source: str | None = None

    def __len__(self) -> int:
        return len(self.files)


class Family(Protocol):
    name: str
    recipe_defaults: dict[str, Any]  # dotted recipe keys this family sets unless the recipe does
    headline: tuple[str, ...]  # metrics of `compare` a report and the INT8 search carry at their top level

    def claims(self, source: object, options: LoadOptions) -> bool:
        """True when this family recognises the model source."""

    def load(self, source: object, options: LoadOptions) -> LoadedModel:
        """Load the model; bad input raises UsageError."""

    def samples(self, model: LoadedModel, files: list[Path], root: Path | None) -> Samples:
        """Preprocess files the way the model expects; labels from `root`'s layout where it has them."""

    def prune_keep(self, module: torch.nn.Module) -> list[torch.nn.Module]:
        """Layers whose output channels structured pruning must keep."""

    def distill_targets(self, module: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """What distillation makes the student reproduce: the family's outputs before any decoding."""

    def distill_loss(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        """How far the student's `distill_targets` are from the teacher's (0 when they match)."""

    def search_units(self, module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """Image families: the blocks a budget search compresses each to its own level, by name in `module` (none
        inside another); the search prunes only channels that stay inside a block (passes/levels.py)."""

    def search_distance(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        """Image families: the fitness a budget search minimises, between `distill_targets` of a candidate and of
        the original, per image on average."""

    def int8_float_nodes(self, graph: onnx.ModelProto) -> list[str]:
        """Nodes of `graph` every INT8 build keeps in float: parts of this family known to break in INT8."""

    def tflite_float_ops(self, ops: list[tuple[str, str]]) -> list[str]:
        """Of a TFLite graph's ops, as (op type, output tensor name) in graph order, the outputs of those an INT8
        build keeps in float where the target runs float ops: the TFLite side of `int8_float_nodes`."""

    def compare(
        self, reference: np.ndarray, artifact: np.ndarray, labels: np.ndarray | None
    ) -> dict[str, Any]:
        """Task metrics of the artifact against the reference outputs (and labels, if any), with a one-line
        `summary` for progress and the command's output."""


def module_fingerprint(module: torch.nn.Module) -> str:
    """A torch module by class and weights: what cache keys and manifests name a model built in Python by."""
    digest = hashlib.sha256(type(module).__qualname__.encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
