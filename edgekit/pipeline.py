"""The build, one skeleton for every family: load → data → reference → compress → export → verify (here, and
on the device) → report → gates → seal.

Each step asks the family adapter what it means for its family; this module only orders the steps, writes the
folder (which appears only when it is complete) and assembles the report and manifest from what the steps
returned. It knows no family, no CLI and no target file format.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgekit import __version__
from edgekit.context import BuildContext
from edgekit.data import file_sha256
from edgekit.errors import StageError
from edgekit.families.base import Artifact, Loaded, Verification
from edgekit.report.manifest import output_hashes, package_versions
from edgekit.report.schema import Manifest, Report
from edgekit.report.write import staged, write_html, write_json
from edgekit.verify.gates import check_gates


@dataclass
class BuildResult:
    out: Path
    report: dict[str, Any]
    kept: bool = False  # a finished folder reused as it was (`build(..., reuse=True)`), not built again

    @property
    def failed_gates(self) -> list[dict[str, Any]]:
        return [g for g in self.report["gates"] if g["status"] == "failed"]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed_gates else 0


def run(ctx: BuildContext, source: object, out: str | Path | None) -> BuildResult:
    """Build `source` as `ctx` says into `out` (default dist/<name>-<target>)."""
    import torch

    from edgekit.passes.tflite import ConverterFailed

    adapter, progress = ctx.adapter, ctx.progress
    torch.manual_seed(ctx.plan.seed)  # random-init models (a detector from its yaml) load the same every time
    with progress.stage("load") as record:
        model = adapter.load(source, ctx.options, ctx.cache.root)
        record["note"] = _describe(model)
    out_dir = Path(out) if out else Path("dist") / f"{model.name}-{ctx.target.name}"
    try:
        with staged(out_dir) as staging:
            ctx.staging = staging
            data = adapter.data(model, ctx)
            reference = adapter.reference(model, data, ctx)
            compressed = adapter.compress(model, data, ctx)
            artifact = adapter.export(compressed, model, data, reference, ctx)
            for name, content in {**artifact.files, **artifact.extras}.items():
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                (staging / name).write_bytes(content)
            verified = adapter.verify(artifact, model, data, reference, ctx)
            device = adapter.on_device(artifact, data, reference, ctx) if ctx.remote else None
            report = build_report(ctx, model, artifact, verified, device)
            judge(report, ctx)
            manifest = build_manifest(ctx, model, source, data.record(), artifact)
            seal(staging, report, manifest, [*artifact.files, *artifact.extras], ctx.plan.to_toml())
    except ConverterFailed as err:
        log = out_dir.parent / f"{out_dir.name}.converter.log"  # beside the folder: no half-built folder is left
        log.write_text(err.log)
        raise StageError(f"{err} (full log: {log})") from err
    return BuildResult(out=out_dir, report=report)


def _describe(model: Loaded) -> str:
    where = Path(model.source).name or model.source
    params = model.details.get("params")
    return f"{where}, {params / 1e6:.1f} M params" if params else where


def build_report(ctx: BuildContext, model: Loaded, artifact: Artifact, verified: Verification,
                 device: dict[str, Any] | None) -> dict[str, Any]:
    """report.json for every family: the common fields, the family's headline metrics at the top level."""
    staging = ctx.staging
    assert staging is not None
    latency = dict(verified.latency)
    if device:
        kind = device["latency_ms"]["label"].split(":")[0]  # measured, or emulated under qemu
        latency[f"{kind}_device"] = device["latency_ms"]
    preprocess = getattr(model, "preprocess", None)
    analysis = {"reference": artifact.reference_analysis.to_dict(),
                "artifact": artifact.analysis.to_dict(layers=False)} if artifact.reference_analysis else None
    report = Report.model_validate(dict(
        edgekit_version=__version__,
        model={"name": model.name, "family": ctx.adapter.name, "source": model.source, **model.details,
               **({"preprocess": preprocess} if preprocess else {})},
        target={"name": ctx.target.name, "description": ctx.target.description, "runtime": ctx.runtime,
                "format": artifact.format},
        artifact={"file": artifact.file, "format": artifact.format, "precision": artifact.precision,
                  **artifact.details, "size_bytes": len(artifact.main), "sha256": file_sha256(staging / artifact.file),
                  **verified.io},
        size_bytes=sum(len(content) for content in artifact.files.values()),
        **{key: verified.accuracy[key] for key in ctx.adapter.headline},
        accuracy=verified.accuracy, latency_ms=latency, **ctx.sections, quantization=artifact.quantization,
        deploy=artifact.deploy, ops=verified.ops, examples=verified.examples, analysis=analysis, device=device,
        stages=ctx.progress.stages,
        notes=ctx.notes,
        cache={"hits": ctx.cache.hits, "misses": ctx.cache.misses,
               "dir": str(ctx.cache.root) if ctx.cache.root else None},
    ))
    return report.model_dump(mode="json", exclude_none=False)


def build_manifest(ctx: BuildContext, model: Loaded, source: object, data: dict[str, Any],
                   artifact: Artifact) -> dict[str, Any]:
    """What went in (by sha256), how the recipe was resolved, and the software that ran it."""
    return Manifest(
        edgekit=__version__, inputs=manifest_inputs(ctx, model, source, data), load_options=asdict(ctx.options),
        recipe=ctx.plan.model_dump(), origins=ctx.origins, seed=ctx.plan.seed,
        int8_ranges_sha256=(artifact.quantization or {}).get("ranges_sha256"), packages=package_versions(),
        platform=platform.platform(), deploy=artifact.deploy,
    ).model_dump(mode="json")


def manifest_inputs(ctx: BuildContext, model: Loaded, source: object, data: dict[str, Any]) -> dict[str, Any]:
    """The manifest's `inputs`: the model, target and recipe file by sha256, and the family's data record."""
    recipe_file = ctx.recipe_file
    return {"model": {"given": str(source) if isinstance(source, (str, Path)) else None, "source": model.source,
                      "sha256": model.fingerprint},
            "target": {"name": ctx.target.name, "sha256": ctx.target.sha256},
            "recipe_file": {"path": str(recipe_file), "sha256": file_sha256(recipe_file)} if recipe_file else None,
            **data}


def judge(report: dict[str, Any], ctx: BuildContext) -> None:
    """Check the gates: on the real device's figures where it verified the artifact, else the host's accuracy and
    the target's estimated latency."""
    on_device: dict[str, Any] = report.get("device") or {}
    accuracy = on_device["accuracy"] if on_device else report["accuracy"]
    measured = on_device and on_device["latency_ms"]["label"].startswith("measured")  # not an emulator's timings
    latency, basis = ((on_device["latency_ms"]["p50"], on_device["latency_ms"]["label"]) if measured else
                      (report["latency_ms"]["estimated_target"].get("ms"), f"estimated: {report['target']['name']}"))
    ops = report.get("ops")
    report["gates"] = check_gates(
        ctx.plan.gates, ctx.adapter.accuracy_gates, accuracy, size_bytes=report["size_bytes"], latency_ms=latency,
        latency_basis=basis, fallback_ops=ops["fallback_count"] if ops else None,
    )
    report["status"] = "gate_failed" if any(g["status"] == "failed" for g in report["gates"]) else "ok"


def seal(folder: Path, report: dict[str, Any], manifest: dict[str, Any], files: list[str], recipe_toml: str) -> None:
    """Write the folder's recipe, report (JSON, and the page a person reads) and manifest (with every output's
    hash)."""
    Report.model_validate(report)
    (folder / "recipe.toml").write_text(recipe_toml)
    write_json(folder / "report.json", report)
    write_html(folder / "report.html", report, manifest)
    manifest["outputs"] = output_hashes(folder, [*files, "recipe.toml", "report.json", "report.html"])
    write_json(folder / "manifest.json", manifest)
