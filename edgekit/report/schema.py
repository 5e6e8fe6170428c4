"""The shapes of report.json and manifest.json: one model for every family, built in one place.

Scripts read these files, so the names they use stay (`top1_agreement`, `latency_ms.measured_host.p50`, …):
a family's headline metrics sit at the report's top level beside the common fields, and its full metrics in
`accuracy`. `schema_version` changes when a field changes meaning or goes away.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 2


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ModelInfo(_Open):
    name: str
    family: str
    source: str


class TargetInfo(BaseModel):
    name: str
    description: str
    runtime: str
    format: str


class ArtifactInfo(_Open):
    file: str
    format: str
    precision: str
    size_bytes: int
    sha256: str


class Latency(_Open):
    measured_host: dict[str, Any] = Field(description="label `measured: host`")
    estimated_target: dict[str, Any] = Field(description="label `estimated`, from the device model")


class Gate(_Open):
    name: str
    limit: float | str
    value: float | int | None
    basis: str
    status: Literal["passed", "failed", "warned", "not_checked"]


class Report(_Open):
    """report.json. Extra top-level keys are the family's headline metrics (numbers, or None when not measured)."""

    schema_version: int = SCHEMA_VERSION
    edgekit_version: str
    status: Literal["ok", "gate_failed"] = "ok"
    model: ModelInfo
    target: TargetInfo
    artifact: ArtifactInfo
    size_bytes: int = Field(description="every file of the artifact (a segmenter's decoder included)")
    accuracy: dict[str, Any]
    latency_ms: Latency
    pruning: dict[str, Any] | None = None
    distillation: dict[str, Any] | None = None
    finetune: dict[str, Any] | None = None  # the labelled fine-tune (`--train`)
    slimming: dict[str, Any] | None = None
    search: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None
    deploy: dict[str, str] | None = None
    ops: dict[str, Any] | None = None
    examples: list[dict[str, Any]] | None = None  # held-out inputs, with the original's and the artifact's answers
    analysis: dict[str, Any] | None = None
    device: dict[str, Any] | None = None
    diff: dict[str, Any] | None = None  # `edgekit diff`: each block of the artifact against the original
    gates: list[Gate] = []
    stages: list[dict[str, Any]]
    notes: list[str]
    cache: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _headline_metrics_are_numbers(self) -> Report:
        for key, value in (self.model_extra or {}).items():
            if value is not None and not isinstance(value, (int, float)):
                raise ValueError(f"report.{key}: a headline metric is a number or null, not {type(value).__name__}")
        if "summary" not in self.accuracy:
            raise ValueError("report.accuracy has no one-line summary")
        return self


class Manifest(BaseModel):
    """manifest.json: every input by sha256, the resolved recipe and where each value came from, the software, and
    every output by sha256. Nothing time-dependent."""

    schema_version: int = SCHEMA_VERSION
    edgekit: str
    inputs: dict[str, Any]  # model, target, recipe_file, and the family's data (images, text)
    load_options: dict[str, Any]
    recipe: dict[str, Any]
    origins: dict[str, str]
    int8_ranges_sha256: str | None = None  # the activation ranges the artifact's bytes depend on (cache or not)
    seed: int
    packages: dict[str, str]
    platform: str
    outputs: dict[str, dict[str, Any]] = {}
    deploy: dict[str, str] | None = None
