"""What image models share (classifiers, detectors: one image tensor in, one tensor out), as a base adapter.

Data are folders of images (held out: `--eval`, or every 4th calibration image); the reference is the original
model run in torch (or onnxruntime for an ONNX input); compression is channel pruning and distillation of the
torch module; export is ONNX (FP32, FP16, accuracy-aware INT8), OpenVINO IR (that ONNX graph converted), TFLite
(FP32, FP16, INT8) or an ExecuTorch program (FP32, PT2E INT8), verified in onnxruntime, OpenVINO, LiteRT or ExecuTorch
here and, through `edgekit agent`, on the board (ONNX, TFLite). A subclass says what its family's
models, samples, metrics and fragile layers are.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from edgekit import __version__
from edgekit.agent.protocol import Job
from edgekit.data import files_digest, files_record, list_images, split_held_out
from edgekit.errors import UsageError
from edgekit.families.base import (
    Artifact,
    FloatParts,
    LoadedModel,
    LoadOptions,
    Samples,
    Section,
    Verification,
)
from edgekit.passes.openvino import graph_details, graph_files

if TYPE_CHECKING:
    from collections.abc import Callable

    import onnx
    import torch

    from edgekit.context import BuildContext


@dataclass
class ImageData:
    """The data folders of an image build, checked up front; the held-out samples once read."""

    calib_dir: Path
    calib_files: list[Path]
    eval_root: Path
    eval_files: list[Path]
    eval_source: str
    eval_dir: Path | None  # None: held out of the calibration folder
    samples: Samples | None = None
    calibration: tuple[np.ndarray, dict[str, Any]] | None = None  # inputs and record, once read
    train_dir: Path | None = None  # labelled images a fine-tune reads (`--train`)
    train_files: list[Path] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """How the manifest names them (and `edgekit verify` finds them again)."""
        found = {"calibration": {"path": str(self.calib_dir), "files": len(self.calib_files),
                                 "sha256": files_digest(self.calib_files, self.calib_dir)},
                 "eval": {"path": self.eval_source, "dir": str(self.eval_dir) if self.eval_dir else None,
                          "files": len(self.eval_files), "sha256": files_digest(self.eval_files, self.eval_root)}}
        if self.train_dir is not None:
            found["train"] = {"path": str(self.train_dir), "files": len(self.train_files),
                              "sha256": files_digest(self.train_files, self.train_dir)}
        return found


def image_folders(calib: str | Path | None, eval_dir: str | Path | None, limit: int) -> ImageData:
    """Check the data folders; without --eval, every 4th calibration image is held out."""
    from edgekit.resources import resource_dir

    calib_dir = Path(calib) if calib else resource_dir("calibration") / "images"
    calib_files = list_images(calib_dir, "calibration")
    if eval_dir:
        root, held, source = Path(eval_dir), list_images(Path(eval_dir), "evaluation"), str(eval_dir)
    else:
        calib_files, held = split_held_out(calib_files)
        if not held:
            raise UsageError(f"{calib_dir} has {len(calib_files)} images: too few to hold a quarter out; pass --eval")
        root, source = calib_dir, f"held-out quarter of {calib_dir}"
    return ImageData(calib_dir, calib_files, root, held[:limit], source, Path(eval_dir) if eval_dir else None)


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def opset_of(graph: Any) -> int:
    return next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))


class ImageFamily(FloatParts):
    """The build steps of one-tensor image models; subclasses add load, samples, compare and the family's hooks."""

    name: str
    headline: ClassVar[tuple[str, ...]]
    format_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    recipe_defaults: ClassVar[dict[str, Any]] = {}
    settings: ClassVar[dict[str, Section]] = {
        "quantize": "*", "verify": "*", "prune": ("ratio", "images", "reconstruct"),
        "search": ("budget", "levels", "stream", "generations", "seconds", "offspring", "images"),
        "distill": ("steps", "seconds", "lr", "batch", "images"), "gates": ("on_cpu_fallback",),
        "finetune": ("steps", "seconds", "lr", "batch"),
    }
    accuracy_gates: ClassVar[dict[str, tuple[str, str, str]]] = {}
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "int8")
    formats: ClassVar[tuple[str, ...]] = ("onnx", "tflite", "openvino", "pte")
    trains_on_labels: ClassVar[bool] = True
    label_layout: ClassVar[str]  # how a `--train` folder carries its labels, for the error that finds none
    agreement: ClassVar[str]  # the `compare` metric of agreement with the original, which judges a distillation

    # --- what a subclass provides -------------------------------------------------------------------------------

    def load(self, source: object, options: LoadOptions, cache_root: Path | None = None) -> LoadedModel:
        raise NotImplementedError

    def samples(self, model: LoadedModel, files: list[Path], root: Path | None) -> Samples:
        """Preprocess files the way the model expects; labels from `root`'s layout where it has them."""
        raise NotImplementedError

    def compare(self, reference: np.ndarray, artifact: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
        """Task metrics of the artifact against the reference outputs (and labels), with a one-line `summary`."""
        raise NotImplementedError

    def prune_keep(self, module: torch.nn.Module) -> list[torch.nn.Module]:
        """Layers whose output channels structured pruning must keep."""
        raise NotImplementedError

    def distill_targets(self, module: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """What distillation makes the student reproduce: the family's outputs before any decoding."""
        raise NotImplementedError

    def label_targets(self, module: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """What a fine-tune on labels compares with them (by default the `distill_targets`)."""
        return self.distill_targets(module, x)

    def label_loss(self, module: torch.nn.Module) -> Callable[[list[torch.Tensor], list[torch.Tensor]], torch.Tensor]:
        """The fine-tune's loss for `module`: how far its `label_targets` are from the `batch_labels`."""
        raise NotImplementedError

    def batch_labels(self, labels: np.ndarray, rows: torch.Tensor) -> list[torch.Tensor]:
        """The labels of the images at `rows` of a labelled set (`Samples.labels`), as `label_loss` takes them."""
        raise NotImplementedError

    def agreement_score(self, student: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor) -> float:
        """How far the student's answers agree with the teacher's on `x` (`compare`'s `agreement` metric, higher is
        better): what decides whether a distillation is kept, as a lower distillation loss on a few images did not
        (YOLO11n: the loss fell on held-out calibration images while box agreement fell on the eval set)."""
        return float(self.compare(teacher(x).float().numpy(), student(x).float().numpy(), None)[self.agreement])

    def label_score(self, module: torch.nn.Module, x: torch.Tensor, labels: list[torch.Tensor]) -> float:
        """The task metric (higher is better) of `module` on labelled inputs (`batch_labels`): what decides whether a
        fine-tune is kept."""
        raise NotImplementedError

    def distill_loss(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        """How far the student's `distill_targets` are from the teacher's (0 when they match)."""
        raise NotImplementedError

    def search_units(self, module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """The blocks a budget search compresses each to its own level, by name in `module` (none inside another);
        the search prunes only channels that stay inside a block (passes/levels.py)."""
        raise NotImplementedError

    def search_distance(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        """The fitness a budget search minimises, between `distill_targets` of a candidate and of the original, per
        image on average."""
        raise NotImplementedError

    def examples(self, model: LoadedModel, samples: Samples, reference: np.ndarray, artifact: np.ndarray
                 ) -> list[dict[str, Any]]:
        """The first few held-out inputs (edgekit/verify/examples.py), each with what the original (`reference`)
        and the artifact made of it, for report.html."""
        raise NotImplementedError

    # --- the build steps ------------------------------------------------------------------------------------------

    def data(self, model: LoadedModel, ctx: BuildContext) -> ImageData:
        data = image_folders(ctx.calib, ctx.eval, ctx.plan.verify.eval_limit)
        if ctx.train:
            data.train_dir = Path(ctx.train)
            data.train_files = list_images(data.train_dir, "training")
        if ctx.format in ("tflite", "pte") and not model.is_torch:
            raise UsageError(f"{'TFLite' if ctx.format == 'tflite' else 'ExecuTorch'} export converts torch models; "
                             "an ONNX input builds to --format onnx")
        if ctx.precision in ("fp32", "fp16"):
            ctx.notes.append(f"{ctx.precision} needs no calibration: the {len(data.calib_files)} calibration "
                             "images are recorded in the manifest and serve int8 builds")
        with ctx.progress.stage("data") as record:
            data.samples = self.cached_samples(model, data.eval_files, data.eval_root, ctx)
            record["note"] = f"{len(data.samples)} held-out images, labels: {data.samples.label_source or 'none'}"
        for note in data.samples.notes:
            ctx.notes.append(note)
            if note.startswith("warning:"):
                ctx.progress.warn(note.removeprefix("warning:").strip())
        return data

    def cached_samples(self, model: LoadedModel, files: list[Path], root: Path, ctx: BuildContext) -> Samples:
        key = {"kind": "samples", "family": self.name, "files": files_digest(files, root),
               "preprocess": model.preprocess, "num_classes": model.details.get("num_classes")}

        def compute() -> dict[str, np.ndarray]:
            samples = self.samples(model, files, root)
            # contiguous, as a cache hit reads them: torch computes on a strided view with other rounding, and a
            # pruned model's bytes would then depend on whether the images came from the cache
            arrays = {"inputs": np.ascontiguousarray(samples.inputs), "files": np.array(samples.files),
                      "notes": np.array(samples.notes, dtype=str)}
            if samples.labels is not None:
                arrays.update(labels=samples.labels, label_source=np.array(samples.label_source))
            return arrays

        arrays = ctx.cache.get_or_compute(key, compute)
        return Samples(
            inputs=arrays["inputs"], files=[str(f) for f in arrays["files"]], labels=arrays.get("labels"),
            label_source=str(arrays["label_source"]) if "label_source" in arrays else None,
            notes=[str(note) for note in arrays.get("notes", [])],
        )

    def reference(self, model: LoadedModel, data: ImageData, ctx: BuildContext) -> np.ndarray:
        """The original model's outputs: torch for torch models, onnxruntime FP32 for ONNX inputs."""
        assert data.samples is not None
        samples = data.samples
        key = {"kind": "reference", "model": model.fingerprint, "inputs": digest(samples.inputs)}

        def compute() -> dict[str, np.ndarray]:
            if not model.is_torch:
                from edgekit.runtimes.onnxruntime import OnnxRuntimeRunner

                assert model.onnx_model is not None
                return {"outputs": OnnxRuntimeRunner(model.onnx_model.SerializeToString(),
                                                     ctx.threads).run(samples.inputs)}
            import torch

            torch.set_num_threads(ctx.threads)
            # a forward pass may cache state (a head's anchors) that export would then trace as constants:
            module: Any = copy.deepcopy(model.module)  # a copy keeps the bytes the same, cached or not
            with torch.no_grad():
                chunks = np.array_split(samples.inputs, max(1, len(samples) // 16))
                batches = [module(torch.from_numpy(chunk)) for chunk in chunks]
            return {"outputs": torch.cat(batches).float().numpy()}

        return ctx.cache.get_or_compute(key, compute)["outputs"]

    def calibration(self, model: LoadedModel, data: ImageData, ctx: BuildContext) -> tuple[np.ndarray, dict[str, Any]]:
        """The calibration images as model inputs, and how the report names them (read once per build)."""
        if data.calibration is None:
            files = data.calib_files[: ctx.plan.quantize.calib_limit]
            data.calibration = (self.cached_samples(model, files, data.calib_dir, ctx).inputs,
                                files_record(files, data.calib_dir))
        return data.calibration

    def compress(self, model: LoadedModel, data: ImageData, ctx: BuildContext) -> Any:
        """The module to export: the loaded one, or a pruned (and distilled) copy; the original stays the
        reference. An ONNX input is exported as it is."""
        plan = ctx.plan
        if not model.is_torch:
            if plan.prune.ratio or plan.search.budget or plan.distill.steps:
                raise UsageError("pruning, budget search and distillation change a torch model; an ONNX input "
                                 "cannot be pruned")
            return model.onnx_model
        if not plan.prune.ratio and not plan.search.budget:
            if plan.distill.steps or data.train_dir:
                step = "distillation" if plan.distill.steps else "fine-tuning on --train"
                raise UsageError(f"{step} recovers what pruning lost: set prune.ratio or search.budget too")
            return model.module
        from edgekit.passes.distill import distill, distilled, quarter_probe

        images, calibration = self.calibration(model, data, ctx)
        if plan.search.budget:
            from edgekit.passes.levels import search

            module, ctx.sections["search"] = search(model.module, model.input_shape, model.fingerprint, self, images,
                                                    calibration["sha256"], plan, ctx.target, ctx.cache, ctx.progress,
                                                    ctx.ray)
        else:
            from edgekit.passes.prune import prune_channels

            module = copy.deepcopy(model.module)
            with ctx.progress.stage("prune") as note:
                pruned = prune_channels(module, model.input_shape, plan.prune.ratio, self.prune_keep(module),
                                        images[: plan.prune.images] if plan.prune.images else None,
                                        rebuild=plan.prune.reconstruct)
                ctx.sections["pruning"] = pruned
                note["note"] = f"MACs {pruned['macs_before'] / 1e6:.0f} M -> {pruned['macs_after'] / 1e6:.0f} M"
        if plan.distill.steps:
            import torch

            settings = plan.distill
            chosen = torch.as_tensor(images[: settings.images])
            with ctx.progress.stage("distill") as note:
                done = distill(module, model.module, chosen, self.distill_targets, loss=self.distill_loss,
                               judge=lambda rows: self.agreement_score(module, model.module, chosen[rows]),
                               probe_size=quarter_probe(settings.batch, len(chosen)), steps=settings.steps,
                               seconds=settings.seconds, lr=settings.lr, batch=settings.batch, seed=plan.seed,
                               progress=lambda steps, total: ctx.progress.track(steps, total, "distillation steps"))
                ctx.sections["distillation"] = done
                note["note"] = distilled(done, "loss")
        if data.train_dir is not None:
            ctx.sections["finetune"] = self._finetune(module, model, data, ctx)
        return module

    def _finetune(self, module: torch.nn.Module, model: LoadedModel, data: ImageData, ctx: BuildContext
                  ) -> dict[str, Any]:
        """Train the compressed `module` in place on the labelled `--train` images (the family's `label_loss`), kept
        only if the task metric (`label_score`) on the last quarter of them, held out, says it helped."""
        import torch

        from edgekit.passes.distill import distill, distilled, quarter_probe

        assert data.train_dir is not None
        settings = ctx.plan.finetune
        if len(data.train_files) < 2 * settings.batch:
            raise UsageError(f"--train {data.train_dir} has {len(data.train_files)} images: a fine-tune needs at "
                             f"least {2 * settings.batch} (finetune.batch {settings.batch} to train on, as many or a "
                             "quarter of them to judge)")
        train = self.cached_samples(model, data.train_files, data.train_dir, ctx)
        labels = train.labels
        if labels is None:
            raise UsageError(f"--train {data.train_dir} has no labels: {self.label_layout}")
        inputs = torch.as_tensor(train.inputs)
        with ctx.progress.stage("finetune") as note:
            done = distill(module, model.module, inputs, self.label_targets,
                           labels=lambda rows: self.batch_labels(labels, rows), loss=self.label_loss(module),
                           judge=lambda rows: self.label_score(module, inputs[rows], self.batch_labels(labels, rows)),
                           probe_size=quarter_probe(settings.batch, len(inputs)), steps=settings.steps,
                           seconds=settings.seconds, lr=settings.lr, batch=settings.batch, seed=ctx.plan.seed,
                           progress=lambda steps, total: ctx.progress.track(steps, total, "fine-tune steps"))
            note["note"] = distilled(done, "label loss")
        return {"images": len(train.inputs), "labels": train.label_source, **done}

    def export(self, compressed: Any, model: LoadedModel, data: ImageData, reference: np.ndarray,
               ctx: BuildContext) -> Artifact:
        from edgekit.passes.analyze import analyze, analyze_tflite
        from edgekit.passes.export import export_onnx
        from edgekit.passes.tflite import convert_tflite

        tflite = ctx.format == "tflite"
        if model.is_torch:
            note = {"tflite": "tflite via litert-torch, onnx graph for analysis",
                    "pte": "onnx graph for analysis, pte lowered at its precision"}.get(ctx.format,
                                                                                        f"onnx opset {ctx.opset}")
            with ctx.progress.stage("export", note=note):
                graph = export_onnx(compressed, model.input_shape, ctx.opset)
                float_tflite = convert_tflite(compressed, model.input_shape) if tflite else b""
        else:
            graph = compressed
            ctx.progress.skip("export", "input is ONNX: torch-only stages do not apply")
            ctx.notes.append("input is ONNX: export and torch-only stages were skipped")
            if opset_of(graph) > ctx.opset:
                ctx.notes.append(f"the input ONNX uses opset {opset_of(graph)}; {ctx.target.name}'s runtime is "
                                 f"profiled for opset {ctx.opset} and may refuse newer ops")
        with ctx.progress.stage("analyze") as record:
            reference_analysis = analyze(graph)
            record["note"] = (f"{reference_analysis.params / 1e6:.2f} M params, "
                              f"{reference_analysis.macs / 1e6:.1f} M MACs")
        diagnostics = self._calibration_check(graph, model, data, ctx)
        details: dict[str, Any]
        if tflite:
            artifact_bytes, quantization = self._tflite(model, float_tflite, data, ctx)
            ctx.notes.append("TFLite artifacts carry no edgekit metadata: report.json holds the preprocessing")
            analysis, details = analyze_tflite(artifact_bytes), {}
            files = {"model.tflite": artifact_bytes}
        elif ctx.format == "pte":
            files, quantization = self._pte(compressed, model, data, ctx)
            analysis, details = at_precision(reference_analysis, ctx.precision), {"delegate": "XNNPACK"}
        else:
            artifact_graph, quantization = self._onnx(model, graph, data, reference, ctx)
            analysis, files = analyze(artifact_graph), graph_files(artifact_graph, ctx.format)
            details = graph_details(files, opset_of(artifact_graph))
        if quantization is not None and diagnostics is not None:
            quantization["calibration_diagnostics"] = diagnostics
        return Artifact(files=files, format=ctx.format, precision=ctx.precision, details=details,
                        quantization=quantization, analysis=analysis, reference_analysis=reference_analysis,
                        deploy=tensorrt_deploy(ctx, "model.onnx"))

    def _calibration_check(self, graph: onnx.ModelProto, model: LoadedModel, data: ImageData,
                           ctx: BuildContext) -> dict[str, Any] | None:
        """Whether the calibration images cover the held-out ones (verify/calibration.py), for builds that
        calibrate activation ranges; each warning on stderr too."""
        from edgekit.resources import resource_dir
        from edgekit.verify.calibration import diagnose

        if ctx.precision != "int8" or (ctx.format == "tflite" and ctx.plan.quantize.int8_mode == "dynamic"):
            return None
        assert data.samples is not None
        with ctx.progress.stage("calibration check") as record:
            calibration, _ = self.calibration(model, data, ctx)
            shipped = data.calib_dir.resolve() == (resource_dir("calibration") / "images").resolve()
            found = diagnose(graph, calibration, data.samples.inputs, ctx.threads, shipped)
            record["note"] = (f"{found['images']} images, {found['near_duplicates']} near-duplicates, "
                              f"{found['tensors_poorly_covered']} of {found['tensors']} tensors poorly covered")
        for warning in found["warnings"]:
            ctx.notes.append(f"warning: {warning}")
            ctx.progress.warn(warning)
        return found

    def _onnx(self, model: LoadedModel, graph: onnx.ModelProto, data: ImageData, reference: np.ndarray,
              ctx: BuildContext) -> tuple[onnx.ModelProto, dict[str, Any] | None]:
        """The ONNX graph at the recipe's precision, with edgekit's metadata (preprocessing, quantization) inside."""
        from edgekit.passes.export import set_metadata
        from edgekit.passes.quantize import to_fp16

        quantization = None
        if ctx.precision == "int8":
            artifact, quantization = self._int8(model, graph, data, reference, ctx)
        else:
            with ctx.progress.stage("quantize", note=ctx.precision):
                artifact = to_fp16(graph) if ctx.precision == "fp16" else graph
        metadata = {"edgekit.version": __version__, "edgekit.family": self.name, "edgekit.target": ctx.target.name,
                    "edgekit.precision": ctx.precision, "edgekit.preprocess": model.preprocess}
        if quantization:
            # the calibration set by content, not by where it lay: the same images give the same bytes anywhere
            calibration = {k: v for k, v in quantization["calibration"].items() if k != "path"}
            metadata["edgekit.quantization"] = {"scheme": quantization["scheme"],
                                                "kept_float": quantization["kept_float"], "calibration": calibration}
        set_metadata(artifact, metadata)
        return artifact, quantization

    def _int8(self, model: LoadedModel, graph: onnx.ModelProto, data: ImageData, reference: np.ndarray,
              ctx: BuildContext) -> tuple[onnx.ModelProto, dict[str, Any]]:
        """Calibrated INT8, sensitivity-ranked, with layers kept in float until the accuracy gates hold."""
        from edgekit.passes.int8 import Int8Quantizer, Int8Scheme, accuracy_aware
        from edgekit.runtimes import files_runner
        from edgekit.verify.gates import accuracy_shortfall
        from edgekit.verify.latency import measure

        settings, samples = ctx.plan.quantize, data.samples
        assert samples is not None
        scheme = Int8Scheme(ctx.activations, settings.calibration, settings.bias_correction,
                            seven_bit_weights=settings.seven_bit_weights or "none",
                            weighted_inputs_only=ctx.format == "openvino")
        calibration, calib_record = self.calibration(model, data, ctx)
        # everything the ranges depend on, the symmetric/asymmetric clip and the code that computes them included
        ranges = ctx.cache.path({"kind": "int8-ranges", "model": model.fingerprint,
                                 "calibration": calib_record["sha256"], "preprocess": model.preprocess,
                                 "method": scheme.calibration, "activations": scheme.activations,
                                 "edgekit": __version__}, ".json")
        quantizer = Int8Quantizer(graph, calibration, scheme, ranges, ctx.threads, settings.bias_correction_images)
        quantizer.keep_float(self.int8_float_nodes(quantizer.prepared))
        with ctx.progress.stage("sensitivity") as record:
            probe = calibration[: settings.sensitivity_images]
            table = quantizer.sensitivity(probe, progress=lambda xs: ctx.progress.track(xs, len(xs),
                                                                                       "layers quantized alone"))
            record["note"] = f"{len(table)} layers, each quantized alone"

        def evaluate(candidate: onnx.ModelProto) -> dict[str, Any]:
            """A try judged in the runtime the artifact is verified in (its int8 arithmetic is the one that counts)."""
            files = graph_files(candidate, ctx.format)
            runner = files_runner(files, ctx.format, ctx.threads)
            metrics = self.compare(reference, runner.run(samples.inputs), samples.labels)
            return {k: metrics[k] for k in self.headline} | {
                "size_bytes": sum(map(len, files.values())),
                "host_p50_ms": measure(runner, samples.inputs[0], 3, 20)["p50"]}

        shortfall = partial(accuracy_shortfall, ctx.plan.gates, self.accuracy_gates)
        with ctx.progress.stage("quantize", note="int8") as record:
            artifact, steps, chosen = accuracy_aware(
                quantizer, [row["layer"] for row in table], evaluate, shortfall, settings.max_float_layers,
                progress=lambda xs: ctx.progress.track(xs, len(xs), "bias correction"))
            kept = len(steps[chosen]["kept_float"])
            record["note"] = f"{kept} layers kept in float (try {chosen + 1} of {len(steps)})"
        return artifact, {
            "scheme": scheme.describe() | {"activations_for": ctx.format},
            "calibration": calib_record,
            "ranges_sha256": quantizer.ranges_digest,
            "kept_float": steps[chosen]["kept_float"],
            "chosen_step": chosen,
            "always_float": list(quantizer.always_float),
            "seven_bit_layers": sorted(quantizer.seven_bit_layers()),
            "int16_pairs": quantizer.int16_pairs,
            "max_float_layers": settings.max_float_layers,
            "steps": steps,
            "decided_on": "the held-out images, against the accuracy gates (if none meets them: the closest)",
            "sensitivity": table,
        }

    def _tflite(self, model: LoadedModel, float_model: bytes, data: ImageData,
                ctx: BuildContext) -> tuple[bytes, dict[str, Any] | None]:
        """The TFLite artifact at the recipe's precision; full-integer INT8 is calibrated like the ONNX path."""
        from edgekit.passes.tflite import Int8Fit, int8_scheme, op_outputs, tflite_precision

        settings, device = ctx.plan.quantize, ctx.target
        precision = settings.precision
        dynamic = precision == "int8" and settings.int8_mode == "dynamic"
        mode = "int8-dynamic" if dynamic else str(precision)
        calibration, record = self.calibration(model, data, ctx) if mode == "int8" else (None, None)
        keep = [] if device.integer_only or mode != "int8" else self.tflite_float_ops(op_outputs(float_model))
        fit = Int8Fit(settings.calibration, settings.range_sweeps, settings.refit, tuple(keep))
        with ctx.progress.stage("quantize", note=mode):
            artifact = tflite_precision(float_model, mode, calibration, fit,
                                        progress=lambda xs, what: ctx.progress.track(xs, len(xs), what))
        if precision != "int8":
            return artifact, None
        return artifact, {
            "scheme": int8_scheme(fit, dynamic),
            "calibration": record,
            "kept_float": keep,
            "decided_on": f"every op quantized: {device.name} runs no float op" if device.integer_only
            else "the family's parts that one int8 scale cannot serve" if keep else "every op quantized",
        }

    def _pte(self, module: torch.nn.Module, model: LoadedModel, data: ImageData,
             ctx: BuildContext) -> tuple[dict[str, bytes], dict[str, Any] | None]:
        """The ExecuTorch program at the recipe's precision: int8 observes the calibration images (PT2E)."""
        from edgekit.passes.executorch import ACTIVATIONS, WEIGHTS, observer_of, to_pte

        ctx.notes.append("ExecuTorch programs carry no edgekit metadata: report.json holds the preprocessing")
        calibration, record = self.calibration(model, data, ctx) if ctx.precision == "int8" else (None, None)
        rule = ctx.plan.quantize.calibration
        with ctx.progress.stage("quantize", note=f"{ctx.precision}, lowered to XNNPACK"):
            program, keep = to_pte(module, model.input_shape, calibration, self.pte_float_ops, rule)
        files = {"model.pte": program}
        if calibration is None:
            return files, None
        return files, {
            "scheme": {"format": "ExecuTorch", "engine": "PT2E (torchao) with the XNNPACKQuantizer",
                       "weights": WEIGHTS, "activations": ACTIVATIONS, "calibration": observer_of(rule)},
            "calibration": record,
            "kept_float": keep,
            "decided_on": "the family's parts that one int8 scale cannot serve" if keep
            else "every op the XNNPACKQuantizer annotates quantized",
        }

    def verify(self, artifact: Artifact, model: LoadedModel, data: ImageData, reference: np.ndarray,
               ctx: BuildContext) -> Verification:
        from edgekit.passes.tflite import io_details
        from edgekit.runtimes import files_runner
        from edgekit.verify.estimate import estimate
        from edgekit.verify.latency import measure
        from edgekit.verify.ops import op_placement

        samples, plan, tflite = data.samples, ctx.plan, artifact.format == "tflite"
        assert samples is not None
        ops = op_placement(artifact.main, ctx.target) if tflite else None
        with ctx.progress.stage("verify") as record:
            runner = files_runner(artifact.files, artifact.format, ctx.threads)
            outputs = np.concatenate([runner.run(row[None]) for row in
                                      ctx.progress.track(samples.inputs, len(samples), "artifact on held-out images")])
            accuracy = self.compare(reference, outputs, samples.labels)
            examples = self.examples(model, samples, reference, outputs)
            latency = {"measured_host": measure(runner, samples.inputs[0], plan.verify.warmup, plan.verify.runs,
                                                layers=True),
                       "estimated_target": estimate(artifact.analysis, ctx.target)}
            record["note"] = f"{accuracy['summary']}, host p50 {latency['measured_host']['p50']:.2f} ms"
        if ops and ops["fallback_count"]:
            first = ops["first_fallback"]
            ctx.notes.append(f"{ops['fallback_count']} of {ops['ops']} ops fall back to the CPU on {ctx.target.name} "
                             f"({', '.join(ops['fallback_ops'])}); the first is op {first['index']} {first['op']}")
        return Verification(
            accuracy={**accuracy, "eval_source": data.eval_source, "label_source": samples.label_source},
            latency=latency, io=io_details(artifact.main) if tflite else _io_spec(runner), ops=ops, examples=examples)

    def on_device(self, artifact: Artifact, data: ImageData, reference: np.ndarray,
                  ctx: BuildContext) -> dict[str, Any]:
        """Run the artifact on the device with the held-out inputs and compare it with the reference as on the
        host; the device's figures are labelled `measured: <device>` (or `emulated: …` under qemu)."""
        assert ctx.remote is not None and data.samples is not None
        plan, remote = ctx.plan, ctx.remote
        with ctx.progress.stage("device", note=remote.url) as record:
            answer, info = remote.run(Job("run", artifact.format, ctx.target_threads, plan.verify.warmup,
                                          plan.verify.runs, list(artifact.files.values()),
                                          {"inputs": data.samples.inputs}))
            accuracy = self.compare(reference, answer["outputs"], data.samples.labels)
            record["note"] = f"{info['device']}: {accuracy['summary']}, p50 {info['latency_ms']['p50']:.2f} ms"
        return remote.record(info, {**accuracy, "eval_source": data.eval_source})

    def inspect(self, source: object, options: LoadOptions) -> dict[str, Any]:
        from edgekit.passes.analyze import analyze
        from edgekit.passes.export import export_onnx

        loaded = self.load(source, options)
        graph = export_onnx(loaded.module, loaded.input_shape, 17) if loaded.is_torch else loaded.onnx_model
        return {"model": loaded.name, "family": self.name, "input_shape": list(loaded.input_shape),
                **analyze(graph).to_dict()}


def _io_spec(runner: Any) -> dict[str, list[dict[str, Any]]]:
    """The artifact's inputs and outputs (name, shape, dtype) as its runtime sees them."""
    from edgekit.runtimes.onnxruntime import OnnxRuntimeRunner

    if not isinstance(runner, OnnxRuntimeRunner):  # OpenVINO, ExecuTorch: their runners say
        return runner.io()

    def spec(values: list[Any]) -> list[dict[str, Any]]:
        return [{"name": v.name, "shape": v.shape, "dtype": v.type.removeprefix("tensor(").rstrip(")")} for v in values]

    return {"inputs": spec(runner.session.get_inputs()), "outputs": spec(runner.session.get_outputs())}


def at_precision(analysis: Any, precision: str) -> Any:
    """The float graph's analysis with its layers computing at `precision` (weights stored so): a program the ONNX
    analysis cannot read (.pte) runs the same layers, quantized."""
    if precision == "fp32":
        return analysis
    width = {"fp16": 2, "int8": 1}[precision]
    layers = [replace(layer, precision=precision, weight_bytes=layer.params * width)
              if layer.macs else layer for layer in analysis.layers]
    saved = sum(old.weight_bytes - new.weight_bytes for old, new in zip(analysis.layers, layers, strict=True))
    return replace(analysis, layers=layers, weight_bytes=analysis.weight_bytes - saved)


def tensorrt_deploy(ctx: BuildContext, artifact_file: str) -> dict[str, str] | None:
    """How the device's engine takes the artifact, where it needs a step of its own (TensorRT builds an engine)."""
    if ctx.runtime != "tensorrt":
        return None
    flags = {"int8": " --int8 --fp16", "fp16": " --fp16"}.get(ctx.precision, "")  # QDQ: int8, float layers fp16
    return {"command": f"trtexec --onnx={artifact_file}{flags} --saveEngine=model.engine",
            "note": "run on the Jetson: TensorRT engines are specific to the GPU and TensorRT version"}
