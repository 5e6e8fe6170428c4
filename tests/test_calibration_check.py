"""Calibration diagnostics (verify/calibration.py): near-duplicates, coverage of the held-out activations, and the
warnings an INT8 build gives when its calibration images cannot stand for the deployment's."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from edgekit import build
from edgekit.verify.calibration import MIN_IMAGES, coverage, diagnose, near_duplicates


def _photos(count: int) -> np.ndarray:
    from PIL import Image

    from tests.conftest import PHOTOS

    return np.stack([np.asarray(Image.open(p).convert("RGB").resize((48, 48)), np.float32).transpose(2, 0, 1) / 255
                     for p in PHOTOS[::7][:count]])


SHAPE = [1, 3, 12, 12]


def _uniform(rng: np.random.Generator, high: float, count: int) -> np.ndarray:
    return rng.uniform(0, high, (count, *SHAPE[1:])).astype(np.float32)


def _relu() -> onnx.ModelProto:
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_repeated_and_shifted_photos_are_near_duplicates_distinct_ones_are_not() -> None:
    photos = _photos(10)
    assert near_duplicates(photos) == 0
    noisy = photos[:3] + np.random.default_rng(0).normal(0, 0.01, photos[:3].shape).astype(np.float32)
    assert near_duplicates(np.concatenate([photos, noisy, photos[:2]])) == 5


def test_coverage_is_the_share_of_held_out_values_outside_the_calibrated_range() -> None:
    rng = np.random.default_rng(0)
    calibration, held_out = _uniform(rng, 1, 64), _uniform(rng, 2, 64)
    rows = {row["tensor"]: row["outside"] for row in coverage(_relu(), calibration, held_out, 1)}
    assert rows["y"] == pytest.approx(0.5, abs=0.02)
    assert coverage(_relu(), held_out, calibration, 1)[0]["outside"] == 0.0  # the wider set covers the narrower


def test_few_or_poorly_covering_images_warn_with_numbers() -> None:
    rng = np.random.default_rng(0)
    found = diagnose(_relu(), _uniform(rng, 1, MIN_IMAGES - 1), _uniform(rng, 2, 40), 1, shipped=False)
    warnings = " ".join(found["warnings"])
    assert f"only {MIN_IMAGES - 1} calibration images" in warnings
    assert "held-out images put" in warnings and found["tensors_poorly_covered"] == 1
    wide = diagnose(_relu(), _uniform(rng, 3, 64), _uniform(rng, 2, 40), 1, shipped=False)
    assert wide["warnings"] == [] and wide["outside_median"] == 0.0


def test_int8_build_on_the_shipped_images_warns(tiny_model: torch.nn.Module, capsys: pytest.CaptureFixture[str]
                                                ) -> None:
    result = build(tiny_model, "x86-64", precision="int8", input_size=32, out="out",
                   overrides={"verify.runs": 3, "verify.warmup": 1, "quantize.calib_limit": 40})
    found = result.report["quantization"]["calibration_diagnostics"]
    assert found["images"] == 40 and found["tensors"] > 0
    assert "shipped default images (40 crops" in found["warnings"][0]
    assert "edgekit: warning: calibrated on edgekit's shipped default images" in capsys.readouterr().err
    assert any("shipped default images" in note for note in result.report["notes"])
