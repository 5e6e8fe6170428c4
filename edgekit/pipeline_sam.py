"""A segmenter's build: the image encoder is quantized and exported, the prompt encoder + mask decoder travels
beside it unchanged, and the pair is verified in onnxruntime by box-prompt mIoU on held-out instance polygons,
against the ground truth and against the original pair's masks."""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from edgekit import __version__
from edgekit.cache import ArrayCache
from edgekit.data import file_sha256, files_digest
from edgekit.errors import UsageError
from edgekit.families.segmenter import (
    ENCODER_SIZE,
    LoadedSegmenter,
    SegmenterFamily,
    box_of,
    box_prompt,
    encoder_crops,
    encoder_input,
    instance_masks,
    iou,
    polygon_file,
)
from edgekit.passes.analyze import analyze
from edgekit.passes.export import set_metadata
from edgekit.passes.int8 import Int8Quantizer, Int8Scheme
from edgekit.passes.quantize import to_fp16
from edgekit.progress import Progress
from edgekit.recipe import Recipe
from edgekit.report.manifest import package_versions
from edgekit.runtimes.onnxruntime import OnnxRuntimeRunner, cpu_session
from edgekit.targets import Target
from edgekit.verify.estimate import estimate
from edgekit.verify.latency import measure

ENCODER_FILE, DECODER_FILE = "encoder.onnx", "decoder.onnx"
CROP = 512  # side of the encoder crops slimming ranks, refits and distils on (a quarter of a frame's cost)


def build_segmenter(source: str | Path, adapter: SegmenterFamily, device: Target, plan: Recipe, *,
                    calib_files: list[Path], calibration: dict[str, Any], slim_files: list[Path],
                    slim_images: dict[str, Any], eval_files: list[Path], eval_root: Path, threads: int,
                    cache: ArrayCache, staging: Path, notes: list[str],
                    progress: Progress) -> tuple[dict[str, Any], dict[str, Any]]:
    """Build, verify and describe; writes encoder.onnx and decoder.onnx into `staging`, returns (report, manifest).
    `calib_files` are the images INT8 calibrates on, `calibration` how the report names them; `slim_files` (named
    by `slim_images`) the unlabelled images slimming ranks, refits and distils on."""
    import onnx

    if plan.export.format != "onnx":
        raise UsageError("segmenters export to ONNX only in this edgekit (--format onnx)")
    if plan.distill.steps and not plan.prune.ratio:
        raise UsageError("distillation recovers what slimming lost: set prune.ratio too")
    precision = plan.quantize.precision
    with progress.stage("load") as record:
        loaded = adapter.load(source)
        original = onnx.load(str(loaded.encoder))
        record["note"] = loaded.source
    with progress.stage("data") as record:
        frames = [_frame(path) for path in progress.track(eval_files, len(eval_files), "held-out images read")]
        instances = sum(len(masks) for _, _, masks in frames)
        if not instances:
            raise UsageError("the held-out images have no instance polygons (YOLO-seg files in seg-labels/ or "
                             "labels/ beside images/): a segmenter is verified by box prompts from them")
        record["note"] = f"{len(frames)} held-out images, {instances} instances"
    with progress.stage("analyze") as record:
        reference_analysis = analyze(original)
        record["note"] = f"encoder {reference_analysis.params / 1e6:.2f} M params, " \
                         f"{reference_analysis.macs / 1e9:.1f} G MACs"
    decoder = cpu_session(loaded.decoder.read_bytes(), threads)
    reference_runner = OnnxRuntimeRunner(original.SerializeToString(), threads)
    reference = [_masks(reference_runner, decoder, frame)
                 for frame in progress.track(frames, len(frames), "original pair on held-out images")]
    quantization, slimming, start = None, None, original
    if plan.prune.ratio:
        start, slimming = _slimmed(original, loaded, plan, slim_files, slim_images, cache, progress)
    with progress.stage("quantize", note=precision) as record:
        if precision == "int8":
            encoder, quantization = _int8(start, loaded, plan, calib_files, calibration, threads, cache, progress)
            record["note"] = f"int8, {len(calib_files)} calibration images"
        else:
            encoder = to_fp16(start) if precision == "fp16" else start
    set_metadata(encoder, {"edgekit.version": __version__, "edgekit.family": adapter.name,
                           "edgekit.target": device.name, "edgekit.precision": precision,
                           "edgekit.preprocess": loaded.preprocess})
    encoder_bytes = encoder.SerializeToString(deterministic=True)
    (staging / ENCODER_FILE).write_bytes(encoder_bytes)
    shutil.copyfile(loaded.decoder, staging / DECODER_FILE)
    with progress.stage("verify") as record:
        runner = OnnxRuntimeRunner(encoder_bytes, threads)
        found = [_masks(runner, decoder, frame) for frame in progress.track(frames, len(frames),
                                                                             "artifact pair on held-out images")]
        accuracy = _compare(reference, found, frames)
        artifact_analysis = analyze(encoder)
        latency = {"measured_host": measure(runner, frames[0][0][0], plan.verify.warmup, plan.verify.runs),
                   "estimated_target": estimate(artifact_analysis, device),
                   "part": "image encoder (the decoder runs once per prompt, on the encoder's embedding)"}
        record["note"] = f"{accuracy['summary']}, encoder host p50 {latency['measured_host']['p50']:.0f} ms"
    sizes = {name: (staging / name).stat().st_size for name in (ENCODER_FILE, DECODER_FILE)}
    report: dict[str, Any] = {
        "edgekit_version": __version__,
        "status": "ok",
        "model": {"name": loaded.name, "family": adapter.name, "source": loaded.source,
                  "preprocess": loaded.preprocess},
        "target": {"name": device.name, "description": device.description,
                   "runtime": device.runtime_for("onnx").name, "format": "onnx"},
        "artifact": {"file": ENCODER_FILE, "decoder_file": DECODER_FILE, "format": "onnx", "precision": precision,
                     "size_bytes": sizes[ENCODER_FILE], "decoder_size_bytes": sizes[DECODER_FILE],
                     "sha256": file_sha256(staging / ENCODER_FILE)},
        "size_bytes": sum(sizes.values()),
        **{k: accuracy[k] for k in adapter.headline},
        "accuracy": accuracy,
        "latency_ms": latency,
        "quantization": quantization,
        "slimming": slimming,
        "ops": None,
        "deploy": None,
        "analysis": {"reference": reference_analysis.to_dict(), "artifact": artifact_analysis.to_dict(layers=False)},
        "stages": progress.stages,
        "notes": notes,
    }
    manifest = {
        "edgekit": __version__,
        "inputs": {"model": {"given": str(source), "encoder_sha256": file_sha256(loaded.encoder),
                             "decoder_sha256": file_sha256(loaded.decoder)},
                   "calibration": calibration,
                   "evaluation": {"images": len(eval_files), "sha256": files_digest(eval_files, eval_root)},
                   "target": {"name": device.name, "sha256": device.sha256}},
        "recipe": plan.model_dump(),
        "seed": plan.seed,
        "packages": package_versions(),
        "platform": platform.platform(),
        "deploy": None,
    }
    return report, manifest


def _frame(path: Path) -> tuple[np.ndarray, float, list[np.ndarray]]:
    """One held-out image: the encoder's input, its resize factor, and its instance masks (original size)."""
    from PIL import Image

    with Image.open(path) as image:
        x, scale = encoder_input(image)
        label = polygon_file(path)
        return x, scale, instance_masks(label, image.width, image.height) if label else []


def _masks(encoder: OnnxRuntimeRunner, decoder: Any, frame: tuple[np.ndarray, float, list[np.ndarray]]
           ) -> list[np.ndarray]:
    """The pair's mask for each instance's box prompt on one image."""
    x, scale, truth = frame
    if not truth:
        return []
    embedding = encoder.run(x)
    height, width = truth[0].shape
    return [decoder.run(["masks"], box_prompt(embedding, box_of(mask), scale, height, width))[0][0, 0] > 0
            for mask in truth]


def _compare(reference: list[list[np.ndarray]], found: list[list[np.ndarray]],
             frames: list[tuple[np.ndarray, float, list[np.ndarray]]]) -> dict[str, Any]:
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
    from PIL import Image

    settings = plan.quantize

    def read(path: Path) -> np.ndarray:
        with Image.open(path) as image:
            return encoder_input(image)[0]

    calibration = np.concatenate([read(path) for path in progress.track(files, len(files), "calibration images read")])
    scheme = Int8Scheme(settings.activations, settings.calibration, bias_correction=False)
    ranges = cache.path({"kind": "int8-ranges", "model": _model_sha256(encoder), "calibration": record["sha256"],
                         "preprocess": loaded.preprocess, "method": scheme.calibration,
                         "activations": scheme.activations, "edgekit": __version__}, ".json")
    quantized = Int8Quantizer(encoder, calibration, scheme, ranges, threads).quantize()
    return quantized, {"scheme": scheme.describe() | {"activations_for": "onnx"},
                       "calibration": record,
                       "kept_float": [], "part": "image encoder; the decoder stays float"}


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

    from edgekit.families.tinyvit import blocks, set_resolution, slim_groups, sync_sizes, tinyvit_from_onnx
    from edgekit.passes.distill import distill, distill_blocks
    from edgekit.passes.export import export_onnx
    from edgekit.passes.reconstruct import reconstruct
    from edgekit.passes.slim import chain_kept, slim

    torch.manual_seed(plan.seed)
    teacher = set_resolution(tinyvit_from_onnx(original), CROP)
    student = copy.deepcopy(teacher)
    crops = torch.from_numpy(encoder_crops(files[: plan.prune.images], CROP, 1, plan.seed))
    steps, kept = [], {}
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
    settings = plan.distill
    if settings.steps:
        data = encoder_crops(files[: settings.images], CROP, 1, plan.seed + 1)
        bounds = {"steps": settings.steps, "seconds": settings.seconds, "lr": settings.lr, "batch": settings.batch,
                  "seed": plan.seed}
        if settings.scope == "blocks":
            done = distill_blocks(student, teacher, data, [(name, kept.get(writer) if writer else None)
                                                           for name, writer in blocks(student)],
                                  lambda model, x: [model(x)], **bounds,
                                  progress=lambda items, total: progress.track(items, total, "blocks distilled"))
        else:
            done = distill(student, teacher, data, lambda model, x: [model(x)], **bounds,
                           progress=lambda items, total: progress.track(items, total, "distillation steps"))
        record["distillation"] = done
        note["note"] = f"distilled {done['steps']} steps, probe loss {done['probe_loss_before']:.2e} -> " \
                       f"{done['probe_loss_after']:.2e}"
    set_resolution(student, ENCODER_SIZE)
    return export_onnx(student, (1, 3, ENCODER_SIZE, ENCODER_SIZE), plan.export.opset), record
