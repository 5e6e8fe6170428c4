"""What every family adapter provides: the only family-aware code in edgekit lives behind this interface.

The build (`pipeline.run`) is one skeleton for every family: load → data → reference → compress → export →
verify → report. Each step asks the adapter what it means for its family, and the adapter answers with the
family's own objects (images and labels, text windows, frames with instance masks) that only it reads.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import numpy as np

from edgekit.errors import UsageError

if TYPE_CHECKING:
    import onnx
    import torch

    from edgekit.context import BuildContext


@dataclass
class LoadOptions:
    """What the user said about the model beyond its path (`--arch`, `--num-classes`, `--input-size`)."""

    arch: str | None = None
    num_classes: int | None = None
    input_size: int | None = None

    def __post_init__(self) -> None:
        """Checked where they are made, so every family (and `edgekit verify`, which reads them back from a
        manifest) refuses them in one line before any loading; a family never sees a size of 0 or -3."""
        for flag, value in (("--num-classes", self.num_classes), ("--input-size", self.input_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UsageError(f"{flag} must be a whole number of at least 1, got {value!r}")
        if self.arch is not None and not (isinstance(self.arch, str) and self.arch.strip()):
            raise UsageError(f"--arch must name an architecture, got {self.arch!r}")


class Loaded(Protocol):
    """A loaded model of any family: what the report, the manifest and cache keys name it by."""

    name: str
    source: str
    fingerprint: str
    details: dict[str, Any]


@dataclass
class LoadedModel:
    """An image model ready for the pipeline: a torch module, or an ONNX graph when the input was ONNX."""

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
    # what the report's notes should say about this data: files skipped or converted, labels that look wrong
    # (those start with "warning:" and belong on stderr too)
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)


@dataclass
class Artifact:
    """What export wrote: its files (the artifact first), and what the report says of them."""

    files: dict[str, bytes]  # the model files: the artifact first (a segmenter's decoder after it); their size counts
    format: str
    precision: str
    extras: dict[str, bytes] = field(default_factory=dict)  # files beside them (a tokenizer), hashed, not counted
    details: dict[str, Any] = field(default_factory=dict)  # the report's artifact block beyond file, size, hash
    quantization: dict[str, Any] | None = None
    analysis: Any = None  # the artifact's analysis (passes.analyze), for the estimate and the report
    reference_analysis: Any = None  # the same of the original (or its float export), beside it in the report
    deploy: dict[str, str] | None = None  # how the device's engine takes it, where it needs a step of its own

    @property
    def file(self) -> str:
        return next(iter(self.files))

    @property
    def main(self) -> bytes:
        return self.files[self.file]


@dataclass
class Verification:
    """The artifact run in its runtime on held-out data against the original."""

    accuracy: dict[str, Any]  # the family's metrics, with a one-line `summary`
    latency: dict[str, Any]  # measured_host, estimated_target (each labelled), and the family's extras
    io: dict[str, Any] = field(default_factory=dict)  # the artifact's inputs and outputs
    ops: dict[str, Any] | None = None  # op placement on the target's accelerator, where checked
    examples: list[dict[str, Any]] | None = None  # a few held-out inputs, the original's and the artifact's answers


Section = tuple[str, ...] | Literal["*"]


class FloatParts:
    """The parts of a graph an INT8 build keeps in float: none unless a family knows some that break in INT8 (the
    build's quantization and a budget search's pricing of the artifact both ask)."""

    def int8_float_nodes(self, graph: onnx.ModelProto) -> list[str]:
        """Nodes every INT8 build keeps in float: parts of this family known to break in INT8."""
        return []

    def tflite_float_ops(self, ops: list[tuple[str, str]]) -> list[str]:
        """Of a TFLite graph's ops, as (op type, output tensor name), the outputs an INT8 build keeps in float
        where the target runs float ops: the TFLite side of `int8_float_nodes`."""
        return []

    def pte_float_ops(self, ops: list[tuple[str, str, str]]) -> list[str]:
        """Of an exported torch graph's ops, as (node name, op, class of the innermost module that ran it), those an
        INT8 ExecuTorch program keeps in float: the ExecuTorch side of `int8_float_nodes`."""
        return []


class Family(Protocol):
    """A model family: how to recognise, load, feed, compress, export and verify its models."""

    name: str
    headline: ClassVar[tuple[str, ...]]  # metrics of the accuracy block a report also carries at its top level
    recipe_defaults: ClassVar[dict[str, Any]]  # dotted recipe keys this family sets unless the recipe does
    format_defaults: ClassVar[dict[str, dict[str, Any]]]  # the same, for one artifact format (its block layout)
    # recipe sections (and their keys, or "*" for all) this family reads beyond the common ones
    # (recipe.COMMON_SETTINGS); a key set outside them is refused rather than recorded as if it ran
    settings: ClassVar[dict[str, Section]]
    # gate name -> (the accuracy metric it reads, what that metric is measured on, why it can be missing)
    accuracy_gates: ClassVar[dict[str, tuple[str, str, str]]]
    precisions: ClassVar[tuple[str, ...]]  # artifact precisions this family builds
    formats: ClassVar[tuple[str, ...]]  # artifact formats this family exports
    trains_on_labels: ClassVar[bool]  # whether `--train` (a labelled fine-tune after compression) applies

    def claims(self, source: object, options: LoadOptions) -> bool:
        """True when this family recognises the model source."""

    def load(self, source: object, options: LoadOptions, cache_root: Path | None = None) -> Loaded:
        """Load the model (converted weights may be kept under `cache_root`); bad input raises UsageError."""

    def data(self, model: Any, ctx: BuildContext) -> Any:
        """Calibration and held-out data in the family's form, with `record()` naming them for the manifest."""

    def reference(self, model: Any, data: Any, ctx: BuildContext) -> Any:
        """The original model's outputs on the held-out data (cached by content)."""

    def compress(self, model: Any, data: Any, ctx: BuildContext) -> Any:
        """What export takes: the model, or a pruned / distilled / searched copy; steps record into ctx.sections."""

    def export(self, compressed: Any, model: Any, data: Any, reference: Any, ctx: BuildContext) -> Artifact:
        """The artifact's files at the recipe's format and precision."""

    def verify(self, artifact: Artifact, model: Any, data: Any, reference: Any, ctx: BuildContext) -> Verification:
        """Run the artifact in its runtime on the held-out data; compare with the reference; time it."""

    def on_device(self, artifact: Artifact, data: Any, reference: Any, ctx: BuildContext) -> dict[str, Any]:
        """The report's `device` block: the artifact run on the board through its agent (`RemoteDevice.record`)."""

    def inspect(self, source: object, options: LoadOptions) -> dict[str, Any]:
        """Parameters, MACs and the per-layer table of what the family would build, without building."""


def module_fingerprint(module: torch.nn.Module) -> str:
    """A torch module by class and weights: what cache keys and manifests name a model built in Python by."""
    digest = hashlib.sha256(type(module).__qualname__.encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
