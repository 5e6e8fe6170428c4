"""The Python API the `edgekit` command calls: build, verify, report, inspect, generate, estimate.

Each function checks its input, makes the build context once and hands it to the pipeline or the family
adapter; bad input raises UsageError (exit 2), a broken stage StageError (exit 3).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edgekit import __version__, families
from edgekit.cache import ArrayCache, default_cache_dir
from edgekit.context import BuildContext
from edgekit.data import file_sha256
from edgekit.errors import UsageError, first_line
from edgekit.families.base import Family, LoadOptions
from edgekit.families.image import ImageFamily
from edgekit.pipeline import BuildResult, judge, manifest_inputs, run
from edgekit.progress import Progress
from edgekit.recipe import Recipe, plan
from edgekit.report.manifest import output_hashes, package_versions
from edgekit.report.schema import Manifest, Report
from edgekit.report.write import adopt, write_html, write_json
from edgekit.targets import Target, load_target


def build(
    model: object,
    target: str | Path | Target,
    *,
    calib: str | Path | None = None,
    eval: str | Path | None = None,
    train: str | Path | None = None,
    recipe: str | Path | Recipe | None = None,
    precision: str | None = None,
    format: str | None = None,
    overrides: dict[str, Any] | None = None,
    arch: str | None = None,
    num_classes: int | None = None,
    input_size: int | None = None,
    family: str | None = None,
    out: str | Path | None = None,
    use_cache: bool = True,
    quiet: bool = False,
    effort: str = "default",
    device_url: str | None = None,
    device_token: str | None = None,
    ray: str | None = None,
    reuse: bool = False,
) -> BuildResult:
    """Build a verified artifact of `model` for `target`.

    `overrides` takes dotted recipe keys (`{"gates.max_size_mb": 4}`); `precision` and `format` are shorthands
    for the most common two; `effort` (fast, default, max) sets the slow, bounded parts (recipe.EFFORTS) unless the
    recipe or `overrides` does. `train` (classifiers, detectors): labelled images to fine-tune on after pruning or a
    search.
    With `device_url` (an `edgekit agent`), the artifact is also verified on that device, and its figures decide
    the gates. With `reuse` and `out`, a folder at `out` that this edgekit built from the same inputs (by sha256),
    load options, resolved recipe and packages, its outputs intact, is returned as it is instead of being rebuilt
    (what lets a killed `edgekit fleet` finish only what is missing); a build verified on a device always runs.
    With `ray` (a Ray address, or "local"), a budget search scores its candidates on Ray actors
    (edgekit/search/remote.py): the same result, the forward passes spread over the cluster.
    """
    for name, given in (("out", out), ("calib", calib), ("eval", eval), ("train", train)):
        if given is not None and not str(given).strip():
            raise UsageError(f"{name} is empty: name a folder, or leave it out")
    options = LoadOptions(arch=arch, num_classes=num_classes, input_size=input_size)
    adapter = families.resolve(model, options, family)
    device = target if isinstance(target, Target) else load_target(target)
    flags = {"quantize.precision": precision, "export.format": format, **(overrides or {})}
    resolved, origins, recipe_file = plan(adapter, device, recipe, flags, effort)
    if train and not adapter.trains_on_labels:
        raise UsageError(f"--train fine-tunes classifiers (class folders) and detectors (YOLO label files); "
                         f"{adapter.name} models do not take it yet")
    if ray and not resolved.search.budget:
        raise UsageError("--ray scores a budget search's candidates: give --budget too")
    if device_url:
        _agent_runs(str(resolved.export.format))
    if resolved.export.format == "pte":
        from edgekit.passes.executorch import require_executorch

        require_executorch()

    def context(progress: Progress, remote: Any) -> BuildContext:
        return BuildContext(
            plan=resolved, origins=origins, target=device, adapter=adapter, options=options,
            calib=str(calib) if calib else None, eval=str(eval) if eval else None,
            cache=ArrayCache(default_cache_dir() if use_cache else None), progress=progress,
            threads=min(resolved.verify.threads or 1, os.cpu_count() or 1), remote=remote,
            recipe_file=recipe_file, train=str(train) if train else None, ray=ray,
        )

    reusable = reuse and out is not None and not device_url
    if reusable and (kept := _kept(Path(str(out)), model, context(Progress(quiet=True), None))):
        return kept
    ctx = context(Progress(quiet), _reach(device_url, device_token))
    host = {"tflite": "LiteRT", "gguf": "llama.cpp", "openvino": "OpenVINO", "pte": "ExecuTorch"}.get(ctx.format,
                                                                                                  "onnxruntime")
    ctx.notes.append(f"verified in {host} on this host's CPU; on {device.name} the artifact runs in {ctx.runtime}")
    fast = device.runtime_for(ctx.format).precisions  # type: ignore[union-attr]  # resolve() checked the format
    if ctx.precision not in fast:
        ctx.notes.append(f"{ctx.precision} is not among {device.name}'s fast precisions ({', '.join(fast)})")
    if ctx.threads < ctx.target_threads:
        ctx.notes.append(f"host latency uses {ctx.threads} threads (this host's cores); the target uses "
                         f"{ctx.target_threads}")
    return run(ctx, model, out)


def fleet(matrix: str | Path, *, out: str | Path = "dist/fleet", address: str | None = None,
          cache: str | Path | None = None, quiet: bool = False) -> dict[str, Any]:
    """Build every cell of a matrix file on Ray (edgekit/fleet.py): the summary written to `out`/fleet.json."""
    from edgekit.fleet import run as run_fleet

    return run_fleet(matrix, out=out, address=address, cache=cache, quiet=quiet)


def _kept(folder: Path, source: object, ctx: BuildContext) -> BuildResult | None:
    """The build at `folder` when its manifest matches what building `source` as `ctx` says would record (this
    edgekit's version, load options, resolved recipe, packages, every input's sha256) and its outputs are intact;
    None when it must be built. Only the model is loaded and the data listed, the cheap first steps."""
    try:
        stored = json.loads((folder / "manifest.json").read_text())
        report = json.loads((folder / "report.json").read_text())
        intact = all(file_sha256(folder / name) == entry["sha256"] for name, entry in stored["outputs"].items())
        same = (intact and stored["edgekit"] == __version__ and stored["load_options"] == asdict(ctx.options)
                and stored["recipe"] == ctx.plan.model_dump(mode="json") and stored["packages"] == package_versions())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not same:
        return None
    model = ctx.adapter.load(source, ctx.options, ctx.cache.root)
    if manifest_inputs(ctx, model, source, ctx.adapter.data(model, ctx).record()) != stored["inputs"]:
        return None
    return BuildResult(out=folder, report=report, kept=True)


def _agent_runs(fmt: str) -> None:
    """Refuse a format the agent's jobs cannot carry (a llama.cpp file is verified in llama.cpp here) before any
    work."""
    from edgekit.agent.protocol import FORMATS

    if fmt not in FORMATS:
        raise UsageError(f"the agent runs {', '.join(FORMATS)} artifacts, not {fmt}; {fmt} artifacts are verified "
                         "on this host")


def _reach(url: str | None, token: str | None) -> Any:
    """The device's agent, asked once before any long work so a wrong URL or token fails at once."""
    if url is None:
        return None
    from edgekit.runtimes.remote import RemoteDevice

    remote = RemoteDevice(url, token)
    remote.info()
    return remote


def _folder(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """An artifact folder's report and manifest, whose artifact is the one that was built."""
    try:
        report = json.loads((folder / "report.json").read_text())
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"{folder} is not an edgekit artifact folder ({err})") from None
    artifact = report.get("artifact") if isinstance(report, dict) else None
    if not isinstance(artifact, dict) or "format" not in artifact:
        raise UsageError(f"{folder}/report.json is not an edgekit report")
    outputs = manifest.get("outputs") if isinstance(manifest, dict) else None
    for index, name in enumerate(_artifact_files(report)):
        built = report["artifact"].get("sha256") if index == 0 else ((outputs or {}).get(name) or {}).get("sha256")
        if not (folder / name).is_file() or file_sha256(folder / name) != built:
            raise UsageError(f"{folder / name} is missing or changed since it was built; rebuild it")
    return report, manifest


def _artifact_files(report: dict[str, Any]) -> list[str]:
    """The artifact's model files as its report names them: the artifact, then an OpenVINO IR's weights or a
    segmenter's decoder."""
    more = [report["artifact"].get(key) for key in ("weights_file", "decoder_file")]
    return [str(report["artifact"].get("file")), *filter(None, more)]


def verify(folder: str | Path, device_url: str, *, device_token: str | None = None, use_cache: bool = True,
           quiet: bool = False) -> BuildResult:
    """Verify a built artifact folder on a real device through its agent: the held-out inputs and the reference
    are recreated from the manifest, and report.json gains the device's figures and its gate results."""
    folder = Path(folder)
    rebuilt = _rebuilt(folder, use_cache, quiet, lambda: _reach(device_url, device_token),
                       lambda adapter, fmt: _agent_runs(fmt))
    report, manifest, ctx, model, data = rebuilt
    from edgekit.families.base import Artifact

    reference = ctx.adapter.reference(model, data, ctx)
    artifact = Artifact(files={name: (folder / name).read_bytes() for name in _artifact_files(report)},
                        format=report["artifact"]["format"], precision=report["artifact"]["precision"])
    device = ctx.adapter.on_device(artifact, data, reference, ctx)
    report["device"] = device
    kind = device["latency_ms"]["label"].split(":")[0]
    report["latency_ms"][f"{kind}_device"] = device["latency_ms"]
    judge(report, ctx)
    _rewrite(folder, report, manifest.model_dump(mode="json"), with_json=True)
    return BuildResult(out=folder, report=report)


def diff(folder: str | Path, *, images: int = 4, use_cache: bool = True, quiet: bool = False,
         device_url: str | None = None, device_token: str | None = None) -> dict[str, Any]:
    """Where a built ONNX or TFLite image artifact departs from the original torch model: each block's (container
    module's) relative error and cosine on the first `images` held-out inputs, the first layer that departs and the
    worst (edgekit/verify/diff.py). The original and the data are recreated from the manifest; the comparison goes
    into report.json and report.html. With `device_url` (an ONNX artifact) the artifact runs on that device."""
    from edgekit.verify.diff import layer_diff, summary

    folder = Path(folder)

    def reads(adapter: Family, fmt: str) -> None:
        if not isinstance(adapter, ImageFamily):
            raise UsageError(f"{folder} holds a {adapter.name} model: diff compares one-graph image models layer "
                             "by layer")
        if fmt not in ("onnx", "tflite"):
            raise UsageError(f"{folder} holds a {fmt} artifact: diff reads ONNX and TFLite artifacts")
        if device_url and fmt != "onnx":
            raise UsageError(f"{folder} holds a TFLite artifact: diff on a device reads ONNX artifacts (LiteRT keeps "
                             "intermediate tensors only within its own process); diff it here")

    report, manifest, ctx, model, data = _rebuilt(folder, use_cache, quiet, lambda: _reach(device_url, device_token),
                                                  reads)
    fmt = report["artifact"]["format"]
    if model.module is None:
        raise UsageError(f"{folder} was built from an ONNX file: diff compares an artifact with its torch original")
    assert data.samples is not None
    artifact = (folder / report["artifact"]["file"]).read_bytes()
    with ctx.progress.stage("diff") as record:
        rows = layer_diff(model.module.eval(), artifact, fmt, data.samples.inputs[:images], ctx.threads, ctx.remote)
        found = {"images": min(images, len(data.samples)), "ran_on": _ran_on(ctx.remote), **summary(rows),
                 "rows": rows}
        record["note"] = (f"{found['layers']} layers on {found['images']} held-out images; first departure: "
                          f"{found['first_departure'] or 'none'}, worst: {found['worst']}")
    report["diff"] = found
    _rewrite(folder, report, manifest.model_dump(mode="json"), with_json=True)
    return found


def _ran_on(remote: Any) -> str:
    """Where an artifact ran: `host`, or the agent's device name (`emulated` where its agent says so)."""
    if remote is None:
        return "host"
    info = remote.info()
    return f"{info['device']}{' (emulated)' if info.get('emulated') else ''}"


def _rebuilt(folder: Path, use_cache: bool, quiet: bool, remote: Any, reads: Callable[[Family, str], None]
             ) -> tuple[dict[str, Any], Manifest, BuildContext, Any, Any]:
    """A built folder's report, manifest, the build context recreated from the manifest, the
    original model (checked against its recorded hash) and its data; a family or artifact format the command
    cannot take is refused by `reads` (which raises) before any long work."""
    report, stored = _folder(folder)
    family = report.get("model", {}).get("family")
    if family not in families.FAMILIES:
        raise UsageError(f"{folder} holds a {family} model, which this edgekit does not know")
    adapter = families.FAMILIES[family]
    reads(adapter, str(report.get("artifact", {}).get("format")))
    if stored.get("schema_version") is None:
        raise UsageError(f"{folder} was built by an earlier edgekit (its manifest has no schema_version); rebuild it")
    try:
        manifest = Manifest.model_validate(stored)
        given = manifest.inputs["model"].get("given")
        resolved = Recipe.model_validate(manifest.recipe)
        calib, held_out = manifest.inputs["calibration"]["path"], manifest.inputs["eval"]["dir"]
    except (ValidationError, KeyError, TypeError, AttributeError) as err:
        raise UsageError(f"{folder}/manifest.json is damaged ({first_line(err)}); rebuild the folder") from None
    if given is None:
        raise UsageError(f"{folder} was built from a Python object, which the folder cannot load again (verify "
                         "such a build on a device with edgekit.build(..., device_url=...))")
    options = LoadOptions(**manifest.load_options)
    ctx = BuildContext(
        plan=resolved, origins=manifest.origins, target=load_target(report["target"]["name"]), adapter=adapter,
        options=options, calib=calib, eval=held_out,
        cache=ArrayCache(default_cache_dir() if use_cache else None), progress=Progress(quiet),
        threads=min(resolved.verify.threads or 1, os.cpu_count() or 1), remote=remote(),
    )
    with ctx.progress.stage("load") as record:
        model = adapter.load(given, options, ctx.cache.root)
        record["note"] = model.name
    if model.fingerprint != manifest.inputs["model"]["sha256"]:
        raise UsageError(f"{given} changed since the artifact was built; rebuild it")
    data = adapter.data(model, ctx)
    for part, found in data.record().items():  # the held-out data is the build's, or the figures mean nothing
        built = manifest.inputs.get(part)
        if isinstance(built, dict) and "sha256" in found and found["sha256"] != built.get("sha256"):
            raise UsageError(f"the {part} data the build used has changed ({found.get('path') or found.get('source')})"
                             "; rebuild the folder")
    return report, manifest, ctx, model, data


def report(folder: str | Path) -> Path:
    """Rewrite a build folder's report.html from its report.json (with manifest.json's facts when it has one): for a
    folder built by an earlier edgekit, or a report.json edited by hand. The manifest's hash of the page follows."""
    folder = Path(folder)
    source = _json_object(folder / "report.json")
    try:
        Report.model_validate(source)
    except ValidationError as err:
        raise UsageError(f"{folder / 'report.json'} is not an edgekit report ({first_line(err)})") from None
    manifest = _json_object(folder / "manifest.json") if (folder / "manifest.json").exists() else None
    return _rewrite(folder, source, manifest, with_json=False)


def _rewrite(folder: Path, report: dict[str, Any], manifest: dict[str, Any] | None, *, with_json: bool) -> Path:
    """report.html (and report.json, `with_json`) written anew from `report`; the page listed in the folder's marker,
    and the manifest's hashes of what was written updated where the folder has a manifest. Returns the page."""
    written = ["report.json", "report.html"] if with_json else ["report.html"]
    if with_json:
        write_json(folder / "report.json", report)
    write_html(folder / "report.html", report, manifest)
    adopt(folder, "report.html")
    if manifest and isinstance(manifest.get("outputs"), dict):
        manifest["outputs"] |= output_hashes(folder, written)
        write_json(folder / "manifest.json", manifest)
    return folder / "report.html"


def _json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise UsageError(f"{path}: {err.strerror or err}") from None
    except ValueError as err:
        raise UsageError(f"{path} is not JSON ({first_line(err)})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a JSON object")
    return data


def inspect(model: object, *, arch: str | None = None, num_classes: int | None = None,
            input_size: int | None = None, family: str | None = None) -> dict[str, Any]:
    """Parameters, MACs, weight bytes, activation memory and the per-layer table, without building."""
    options = LoadOptions(arch=arch, num_classes=num_classes, input_size=input_size)
    return families.resolve(model, options, family).inspect(model, options)


def generate(folder: str | Path, prompt: str, new_tokens: int, threads: int) -> dict[str, Any]:
    """Greedy continuation of `prompt` by a built language-model artifact, through its key/value cache."""
    from edgekit.families.llm_adapter import generate as continue_text

    folder = Path(folder)
    report, _ = _folder(folder)
    if report.get("model", {}).get("family") != "llm":
        raise UsageError(f"{folder} holds a {report.get('model', {}).get('family')} model, not a language model")
    return continue_text(folder, report, _artifact_files(report), prompt, new_tokens, threads)


def estimate(artifacts: list[str], target: str | None, *, validate: bool = False, calibrate_host: str | None = None,
             threads: int = 1, recalibrate: bool = False, top: int = 10, quiet: bool = False) -> dict[str, Any]:
    """The device model's estimate of each artifact on `target` (default x86-64); with `validate`, this host is
    calibrated by microbenchmarks and each artifact is also measured here; `calibrate_host` writes that
    profile as a target file."""
    from edgekit.verify.estimate import estimate as estimate_graph
    from edgekit.verify.validate import analyze_artifact, artifact_file, host_profile, profile_toml
    from edgekit.verify.validate import validate as validate_here

    if not artifacts and not calibrate_host:
        raise UsageError("name one or more artifacts, or --calibrate-host OUT.toml")
    if validate and target:
        raise UsageError("--validate estimates for this host; it takes no --target")
    if threads < 1:
        raise UsageError("--threads must be at least 1")
    paths = [artifact_file(path) for path in artifacts]  # every path checked before any long work
    progress = Progress(quiet)
    results: dict[str, Any] = {}
    if validate or calibrate_host:
        with progress.stage("calibrate", note=f"microbenchmarks, {threads} threads"):
            profile = host_profile(threads, ArrayCache(default_cache_dir()), recalibrate,
                                   progress=lambda xs: progress.track(xs, len(xs), "rounds"))
        if calibrate_host:
            Path(calibrate_host).write_text(profile_toml(profile))
            results["profile"] = calibrate_host
            results["profile_description"] = profile.description
    if validate:
        with progress.stage("validate", note=f"{len(paths)} artifacts"):
            results["validation"] = validate_here(paths, profile, threads,
                                                  progress=lambda xs: progress.track(xs, len(xs), "rounds"))
    elif paths:
        device = load_target(target or "x86-64")
        results["estimates"] = [{"artifact": str(path), "target": device.name,
                                 **estimate_graph(analyze_artifact(path), device, top=top)} for path in paths]
        unrunnable = next((row for row in results["estimates"] if row["ms"] is None), None)
        if unrunnable:
            raise UsageError(f"{unrunnable['artifact']}: {unrunnable['reason']}")
    return results


MIN_FIT_MODELS = 3  # with two, leaving one out fits one model's rows and checks them on the other's: too weak


def fit_published(target: str, *, write: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Hold `target`'s device model to the public measurements in targets/measurements/<target>.csv: each row's
    estimate before and after fitting the `[latency]` numbers, and with that row's model left out of the fit.
    `write` puts the fitted numbers in the target's TOML, only where leave-one-model-out over at least three models
    beats the current ones, and records the errors in its `[published]` table either way."""
    from edgekit.resources import resource_dir
    from edgekit.verify.fit import fit_published as fit_rows
    from edgekit.verify.fit import record_published, write_fit

    device = load_target(target)
    progress = Progress(quiet)
    with progress.stage("fit", note=f"published measurements of {device.name}"):
        result = fit_rows(device, ArrayCache(default_cache_dir()),
                          progress=lambda rows: progress.track(rows, len(rows), "graphs"))
    if write:
        path = Path(target) if target.endswith(".toml") or "/" in target else (
            resource_dir("targets") / f"{device.name}.toml")
        held_out, before = result["held_out_median_error"], result["median_error_before"]
        if len(result["models"]) < MIN_FIT_MODELS or held_out is None or held_out >= before:
            result["written"] = None
            result["not_written"] = (
                f"{len(result['models'])} model(s): a fit is written when at least {MIN_FIT_MODELS} models check it"
                if len(result["models"]) < MIN_FIT_MODELS else
                "leave-one-model-out error does not improve on the current numbers")
        else:
            result["written"] = str(path)
            result["written_keys"] = write_fit(path, result)
        record_published(path, result, written=bool(result["written"]))
        result["published_recorded"] = str(path)
    return result
