"""Detectors: tiny random-init Ultralytics YOLOs (one with PSA attention) built, verified by mAP, and quantized."""

from __future__ import annotations

import copy
import functools
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import edgekit
from edgekit.families.detector import letterbox, mean_average_precision

from .conftest import SHARED_DATA
from .test_finetune import judged_worse
from .test_report_html import assert_page

SIZE = 64
FAST = {"verify.runs": 3, "verify.warmup": 1, "quantize.sensitivity_images": 2, "quantize.calib_limit": 8}


def tiny_yaml(tmp_path: Path, family: str) -> Path:
    """An Ultralytics model YAML at a width where YOLO11's C2PSA attention keeps one head; 3 classes."""
    import ultralytics

    base = Path(ultralytics.__file__).parent / "cfg" / "models"
    config = yaml.safe_load((base / ("11/yolo11.yaml" if family == "yolo11" else "v8/yolov8.yaml")).read_text())
    config.update(nc=3, scales={"t": [0.25, 0.125, 1024]}, scale="t")
    path = tmp_path / f"tiny-{family}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_map_has_known_answers() -> None:
    truth = np.array([[0, 1, 10, 10, 30, 40], [0, 2, 50, 50, 60, 60], [1, 1, 0, 0, 20, 20]], np.float32)
    exact = [np.array([[10, 10, 30, 40, 0.9, 1], [50, 50, 60, 60, 0.8, 2]], np.float32),
             np.array([[0, 0, 20, 20, 0.7, 1]], np.float32)]
    assert mean_average_precision(exact, truth, 2) == pytest.approx((1.0, 1.0))
    shifted = [d.copy() for d in exact]
    shifted[0][0, [0, 2]] += 4  # IoU of the first box drops to about 0.67: counts at 0.5, not at 0.75
    map50_95, map50 = mean_average_precision(shifted, truth, 2)
    assert map50 == pytest.approx(1.0) and map50_95 < 0.9
    assert mean_average_precision([np.zeros((0, 6), np.float32)] * 2, truth, 2) == (0.0, 0.0)
    wrong_class = [np.array([[10, 10, 30, 40, 0.9, 0]], np.float32), np.zeros((0, 6), np.float32)]
    assert mean_average_precision(wrong_class, truth, 2) == (0.0, 0.0)


def test_letterbox_maps_labels_into_the_input_frame(tmp_path: Path) -> None:
    from PIL import Image

    from edgekit.families.base import LoadOptions
    from edgekit.families.detector import DetectorFamily

    root = tmp_path / "set"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    Image.new("RGB", (100, 50), (200, 10, 10)).save(root / "images" / "wide.png")
    (root / "labels" / "wide.txt").write_text("2 0.5 0.5 0.2 0.4\n")
    array, scale, pad = letterbox(Image.open(root / "images" / "wide.png"), SIZE)
    assert array.shape == (3, SIZE, SIZE) and scale == pytest.approx(0.64) and pad == (0.0, 16.0)
    assert array[:, 0, 0] == pytest.approx([114 / 255] * 3)  # the grey border
    family = DetectorFamily()
    model = family.load(str(tiny_yaml(tmp_path, "yolov8")), LoadOptions(input_size=SIZE))
    samples = family.samples(model, [root / "images" / "wide.png"], root)
    # centre (50, 25) of 100x50 -> (32, 32); size 20x20 pixels -> 12.8 x 12.8
    assert samples.labels.shape == (1, 6)
    assert samples.labels[0].tolist() == pytest.approx([0, 2, 25.6, 25.6, 38.4, 38.4])


@pytest.mark.parametrize("family", ["yolov8", "yolo11"])
def test_fp32_build_is_verified_by_map(tmp_path: Path, boxes: Path, family: str) -> None:
    result = edgekit.build(str(tiny_yaml(tmp_path, family)), "x86-64", calib=boxes / "images",
                           eval=boxes / "images", input_size=SIZE, overrides=FAST, out="out", quiet=True)
    report = result.report
    assert report["model"]["family"] == "detector" and report["model"]["num_classes"] == 3
    assert report["artifact"]["outputs"][0]["shape"][:2] == [1, 4 + 3]
    assert report["accuracy"]["label_source"] == "YOLO label files (16 boxes)"
    assert report["box_agreement"] == pytest.approx(1.0) or report["accuracy"]["max_abs_output_diff"] < 1e-3
    assert report["map50_95_drop_pt"] == pytest.approx(0.0, abs=1e-6)
    assert {g["name"] for g in report["gates"]} >= {"max_map_drop_pt"}
    assert "min_top1_agreement" not in {g["name"] for g in report["gates"]}  # top-1 is not a detector metric
    assert report["model"]["preprocess"]["kind"] == "letterbox" and result.exit_code == 0
    assert [(e["kind"], e["width"], e["height"]) for e in report["examples"]] == [("boxes", SIZE, SIZE)] * 4
    assert_page(result.out)  # the page draws every example's boxes


def test_shown_boxes_are_the_confident_ones_best_first_as_shares_of_the_frame() -> None:
    from edgekit.verify.examples import MIN_SCORE, shown_boxes

    found = np.array([[0, 0, 32, 16, 0.5, 1], [16, 16, 64, 64, 0.9, 0], [0, 0, 8, 8, MIN_SCORE / 2, 2]])
    shown = shown_boxes(found, (64, 128), ["cat", "dog"])
    assert [(b["box"], b["score"], b["name"]) for b in shown] == [([0.125, 0.25, 0.5, 1.0], 0.9, "cat"),
                                                                    ([0.0, 0.0, 0.25, 0.25], 0.5, "dog")]


def test_int8_keeps_the_decode_and_attention_softmax_in_float(tmp_path: Path, boxes: Path) -> None:
    result = edgekit.build(str(tiny_yaml(tmp_path, "yolo11")), "x86-64", calib=boxes / "images",
                           eval=boxes / "images", input_size=SIZE, precision="int8", overrides=FAST, out="out",
                           quiet=True)
    quantization = result.report["quantization"]
    kept = quantization["always_float"]
    assert any(name.endswith("dfl/Softmax") for name in kept)  # the box distribution
    assert any("attn/Softmax" in name for name in kept)  # the PSA block's attention
    assert not any("/cv2." in name or "/cv3." in name for name in kept)  # the head's convs stay int8
    assert all("top1_changed" not in row for row in quantization["sensitivity"])
    import onnx

    graph = onnx.load(str(result.out / "model.onnx"))
    assert sum(node.op_type == "QuantizeLinear" for node in graph.graph.node) > 10
    assert result.report["map50_95_artifact"] is not None


@pytest.mark.skipif(not (SHARED_DATA / "coco128").is_dir(), reason="../shared/data/coco128 is absent")
def test_coco128_labels_are_read(tmp_path: Path) -> None:
    from edgekit.families.base import LoadOptions
    from edgekit.families.detector import DetectorFamily

    images = sorted((SHARED_DATA / "coco128" / "images" / "train2017").glob("*.jpg"))[:4]
    family = DetectorFamily()
    model = family.load(str(tiny_yaml(tmp_path, "yolov8")), LoadOptions(input_size=SIZE))
    samples = family.samples(model, images, None)
    assert samples.labels is not None and set(samples.labels[:, 0]) <= {0, 1, 2, 3}
    assert (samples.labels[:, 2:] >= 0).all() and (samples.labels[:, 2:] <= SIZE).all()


def settled_yolo(family: str) -> torch.nn.Module:
    """A tiny random YOLO whose BatchNorm statistics come from real photos, so its outputs depend on the input: a
    copy of one made once per family (building and settling one takes seconds, a copy a fraction of one)."""
    model = copy.deepcopy(_settled_yolo(family))
    torch.manual_seed(0)  # the random state a freshly settled one leaves behind
    return model


@functools.cache
def _settled_yolo(family: str) -> torch.nn.Module:
    from ultralytics.nn.tasks import DetectionModel

    from .conftest import settle_batchnorm

    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        return settle_batchnorm(DetectionModel(str(tiny_yaml(Path(folder), family)), nc=3, verbose=False), SIZE)


def test_pruning_and_distillation_shrink_and_recover(boxes: Path) -> None:
    model = settled_yolo("yolo11")
    # without the refit the pruned model is visibly off (with it, a settled random model is matched almost exactly,
    # leaving distillation nothing to recover)
    result = edgekit.build(model, "x86-64", calib=boxes / "images", eval=boxes / "images", input_size=SIZE,
                           overrides={**FAST, "prune.ratio": 0.3, "prune.reconstruct": False, "distill.steps": 12,
                                      "distill.batch": 4, "distill.images": 4, "distill.lr": 1e-3}, out="out",
                           quiet=True)
    report = result.report
    pruning, distillation = report["pruning"], report["distillation"]
    assert pruning["macs_after"] < 0.8 * pruning["macs_before"] and pruning["params_after"] < pruning["params_before"]
    assert report["analysis"]["reference"]["macs"] == pytest.approx(pruning["macs_after"], rel=0.05)
    assert distillation["steps"] == 12 and distillation["probe_loss_after"] < distillation["probe_loss_before"]
    assert report["artifact"]["outputs"][0]["shape"][:2] == [1, 7]  # the head's outputs are kept
    assert report["map50_95_reference"] is not None  # verified against the unpruned original


def test_onnx_inputs_cannot_be_pruned(tmp_path: Path, boxes: Path) -> None:
    from edgekit.errors import UsageError
    from edgekit.passes.export import export_onnx

    graph = tmp_path / "tiny.onnx"
    graph.write_bytes(export_onnx(settled_yolo("yolov8"), (1, 3, SIZE, SIZE), 17).SerializeToString())
    with pytest.raises(UsageError, match="cannot be pruned"):
        edgekit.build(str(graph), "x86-64", calib=boxes / "images", family="classifier", input_size=SIZE,
                      overrides={**FAST, "prune.ratio": 0.3}, quiet=True)


def test_tflite_int8_keeps_the_decode_in_float_where_the_target_runs_float(boxes: Path) -> None:
    """One int8 scale cannot serve pixel boxes and 0-1 scores: with the decode in float the scores survive."""
    from edgekit.families.base import LoadOptions
    from edgekit.families.detector import DetectorFamily
    from edgekit.passes import tflite
    from edgekit.runtimes.litert import LiteRtRunner

    family = DetectorFamily()
    model = settled_yolo("yolo11")
    loaded = family.load(model, LoadOptions(input_size=SIZE))
    images = family.samples(loaded, sorted((boxes / "images").iterdir()), None).inputs
    float_model = tflite.convert_tflite(loaded.module, loaded.input_shape)
    kept = family.tflite_float_ops(tflite.op_outputs(float_model))
    assert any("DFL" in name for name in kept) and any("Attention" in name for name in kept)
    assert not any(".Detect_" in name and "container.Sequential" in name for name in kept)  # its conv stacks: int8
    reference = LiteRtRunner(float_model, 1).run(images)
    score_error = {}
    for name, keep in (("decode in float", tuple(kept)), ("all int8", ())):
        fit = tflite.Int8Fit("mean-minmax", range_sweeps=0, refit=False, keep_float=keep)
        outputs = LiteRtRunner(tflite.tflite_precision(float_model, "int8", images, fit), 1).run(images)
        score_error[name] = float(np.mean((outputs[:, 4:] - reference[:, 4:]) ** 2))
    assert score_error["decode in float"] < 0.1 * score_error["all int8"]


def test_tflite_int8_build_verifies_a_float_output_artifact(tmp_path: Path, boxes: Path) -> None:
    from edgekit.targets import load_target

    result = edgekit.build(settled_yolo("yolo11"), "raspberry-pi-5", calib=boxes / "images",
                           eval=boxes / "images", input_size=SIZE, precision="int8",
                           overrides={**FAST, "quantize.range_sweeps": 0}, out=tmp_path / "out", quiet=True)
    report = result.report
    assert report["artifact"]["format"] == "tflite" and report["artifact"]["outputs"][0]["dtype"] == "float32"
    assert report["quantization"]["kept_float"] and report["quantization"]["scheme"]["calibration"] == "mean-minmax"
    assert report["map50_95_artifact"] is not None and report["box_agreement"] is not None
    assert load_target("coral").integer_only and not load_target("raspberry-pi-5").integer_only



def test_search_space_serves_kept_unit_outputs_as_a_full_pass_computes_them() -> None:
    """YOLO's units (C3k2/SPPF blocks, head branches) feed later layers through skip connections and concats: an
    output kept for the levels upstream of a unit must still be exactly what a full pass gives."""
    from edgekit.cache import ArrayCache
    from edgekit.families.detector import DetectorFamily
    from edgekit.passes.levels import ImageSpace, variants
    from edgekit.targets import load_target

    model = settled_yolo("yolo11")
    family = DetectorFamily()
    units = family.search_units(model)
    images = np.stack([torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(i)).numpy()
                       for i in range(6)])
    found = variants(model, units, family.prune_keep(model), images[:3], [0.0, 0.5], ArrayCache(None), {},
                     progress=iter)
    assert "model.23.cv2.0" in found.names and "model.2" in found.names  # a head branch, a C3k2 block
    space = ImageSpace(model, found, images[3:], family.distill_targets, family.search_distance,
                       lambda _m: pytest.fail("costs come from the stored arrays"), load_target("x86-64"),
                       _StoredCosts(len(found.names)), {})  # type: ignore[arg-type]
    assert sorted(space.memo.order) == list(range(len(found.names)))
    rng = np.random.default_rng(0)
    configs = [tuple(int(v) for v in rng.integers(0, 2, len(found.names))) for _ in range(4)]
    configs.append((*configs[0][:-1], 1 - configs[0][-1]))  # only the last unit differs: the rest is served
    remembered = [space.fitness(config, samples) for config in configs for samples in (2, 3)]
    assert space.memo.kept.hits > 0
    space.memo.order = []  # nothing kept: every unit runs
    assert remembered == pytest.approx([space.fitness(c, n) for c in configs for n in (2, 3)], rel=1e-5, abs=1e-9)


class _StoredCosts:
    """A cache holding zero costs for every unit (the test needs no device model)."""

    def __init__(self, units: int) -> None:
        self.units = units

    def get_or_compute(self, _key: object, _compute: object) -> dict[str, np.ndarray]:
        return {"base": np.zeros(3), "deltas": np.zeros((self.units, 2, 3))}


def test_the_stream_between_units_is_cut_at_uniform_pruning_s_share_for_the_budget() -> None:
    """YOLO's strided convolutions and the outputs its neck concatenates belong to no unit: they are cut first, at the
    smallest share uniform pruning needs to meet the budget, and every unit's inside stays whole for the search."""
    import torch_pruning as tp

    from edgekit.cache import ArrayCache
    from edgekit.families.detector import DetectorFamily, _export_form
    from edgekit.passes.levels import channel_roots, unit_inputs
    from edgekit.passes.prune import prune_channels
    from edgekit.passes.stream import STEPS, cut_stream
    from edgekit.search.budget import parse_budget
    from edgekit.search.evolve import Costs

    model = _export_form(settled_yolo("yolo11"), SIZE)
    before = copy.deepcopy(model.state_dict())
    family = DetectorFamily()
    shape = (1, 3, SIZE, SIZE)

    def costs(module: torch.nn.Module) -> Costs:
        macs, params = tp.utils.count_ops_and_params(module, torch.zeros(shape))
        return Costs(float(macs), float(params), 0.0)

    def uniform(ratio: float) -> float:
        pruned = copy.deepcopy(model)
        prune_channels(pruned, shape, ratio, family.prune_keep(pruned))
        return costs(pruned).macs

    full = costs(model).macs
    budget = parse_budget(f"macs={int(full * 0.8)}")
    images = np.stack([torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(i)).numpy()
                       for i in range(4)])
    units = family.search_units(model)
    cut, record = cut_stream(model, shape, units, family.prune_keep(model), images, budget, costs, 0.5,
                             ArrayCache(None), {})
    ratio = record["ratio"]
    assert 0 < ratio < 0.5
    assert uniform(ratio) <= budget.limit < uniform(ratio - 0.5 / 2**STEPS)  # the least uniform pruning that meets it
    assert cut.get_submodule("model.1.conv").out_channels < model.get_submodule("model.1.conv").out_channels
    # a C3k2's bottleneck and a head branch's hidden convolution are insides: whole
    assert {"model.2.m.0.cv1.conv", "model.23.cv2.0.0.conv"} <= set(record["kept_inside"])
    for name in record["kept_inside"]:
        assert cut.get_submodule(name).out_channels == model.get_submodule(name).out_channels
    unit = model.get_submodule("model.2")
    inside, outside = channel_roots(unit, unit_inputs(model, torch.as_tensor(images[:1]), ["model.2"])["model.2"],
                                    ["cv1"])
    assert [f"model.2.{root}" for root in inside] == [n for n in record["kept_inside"] if n.startswith("model.2.")]
    assert all(cut.get_submodule(f"model.2.{root}").out_channels < unit.get_submodule(root).out_channels
               for root in outside)  # the block's output: the stream's
    assert costs(cut).macs < full and torch.isfinite(cut(torch.as_tensor(images))).all()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is not changed



def test_the_label_loss_reads_yolo_files_as_ultralytics_training_does(tmp_path: Path, boxes: Path) -> None:
    """Boxes from the label files, letterboxed into the input frame, reach Ultralytics' loss as its own training
    batch would carry them (image index, class, 0-1 centre and size); `batch_labels` renumbers the images."""
    from ultralytics.utils import DEFAULT_CFG
    from ultralytics.utils.loss import v8DetectionLoss

    from edgekit.families.base import LoadOptions
    from edgekit.families.detector import DetectorFamily

    family = DetectorFamily()
    square = tmp_path / "square"
    (square / "images").mkdir(parents=True)
    (square / "labels").mkdir()
    for index in range(3):  # square photos: the letterbox only scales them, so the 0-1 boxes are unchanged
        Image.open(next((boxes / "images").iterdir())).convert("RGB").resize((96, 96)).save(
            square / "images" / f"{index}.jpg")
        (square / "labels" / f"{index}.txt").write_text(f"{index} 0.5 0.5 0.4 0.3\n1 0.25 0.3 0.2 0.2\n")
    module = settled_yolo("yolo11")
    model = family.load(module, LoadOptions(input_size=SIZE))
    samples = family.samples(model, sorted((square / "images").iterdir()), None)
    assert samples.labels is not None
    rows = torch.tensor([2, 0])
    (picked,) = family.batch_labels(samples.labels, rows)
    assert picked[:, :2].tolist() == [[0, 2], [0, 1], [1, 0], [1, 1]]  # image 2's boxes first, now image 0's
    x = torch.from_numpy(samples.inputs[rows.numpy()])
    with torch.no_grad():
        ours = family.label_loss(model.module)(family.label_targets(model.module, x), [picked])
    module.args, head = DEFAULT_CFG, module.model[-1]
    batch = {"batch_idx": torch.tensor([0.0, 0, 1, 1]), "cls": torch.tensor([2.0, 1, 0, 1]),
             "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.25, 0.3, 0.2, 0.2]] * 2)}
    head.export = False  # the loaded model is in its export form: one decoded tensor out
    with torch.no_grad():
        theirs, _ = v8DetectionLoss(module)(module(x), batch)
    head.export = True
    assert float(ours) == pytest.approx(float(theirs.sum()) / 2, rel=1e-4)


def test_a_pruned_detector_is_fine_tuned_on_yolo_labels(tmp_path: Path, boxes: Path) -> None:
    model = settled_yolo("yolo11")
    settings = {**FAST, "prune.ratio": 0.3, "finetune.batch": 2, "finetune.steps": 6, "finetune.lr": 1e-3}
    plain = edgekit.build(model, "x86-64", calib=boxes / "images", eval=boxes / "images", input_size=SIZE,
                          overrides=settings, out=tmp_path / "plain", quiet=True)
    tuned = edgekit.build(model, "x86-64", calib=boxes / "images", eval=boxes / "images", train=boxes / "images",
                          input_size=SIZE, overrides=settings, out=tmp_path / "tuned", quiet=True)
    done = tuned.report["finetune"]
    assert done["images"] == 8 and done["labels"] == "YOLO label files (16 boxes)" and done["steps"] == 6
    assert done["probe_held_out"] and done["samples"] == 6 and done["probe_size"] == 2
    assert 0 <= done["probe_score_before"] <= 1 and done["reverted"] == judged_worse(done)  # mAP50-95 judges
    changed = tuned.report["artifact"]["sha256"] != plain.report["artifact"]["sha256"]
    assert changed == (not done["reverted"])
    assert tuned.report["map50_95_artifact"] is not None
