"""Classifiers trained with timm: `--arch` takes timm's names, `.safetensors` state dicts load, and the build
preprocesses images as timm's own configuration says (mean, std, crop share, interpolation)."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from edgekit import build
from edgekit.errors import UsageError
from edgekit.families.base import LoadOptions
from edgekit.families.classifier import ClassifierFamily
from tests.conftest import settle_batchnorm

FAST = {"verify.runs": 3, "verify.warmup": 1}


def test_timm_safetensors_state_dict_builds_with_timms_preprocessing(tmp_path: Path, photos: Path,
                                                                      labelled: Path) -> None:
    torch.manual_seed(0)
    model = settle_batchnorm(timm.create_model("mobilenetv3_small_050", num_classes=3), 64)
    path = tmp_path / "belt.safetensors"
    save_file(model.state_dict(), str(path))
    result = build(path, "x86-64", arch="timm/mobilenetv3_small_050", input_size=64, calib=photos, eval=labelled,
                   precision="fp32", overrides=FAST, quiet=True)
    assert result.exit_code == 0
    loaded = ClassifierFamily().load(path, LoadOptions(arch="mobilenetv3_small_050", input_size=64))
    assert loaded.details["num_classes"] == 3 and loaded.input_shape == (1, 3, 64, 64)
    assert loaded.preprocess["interpolation"] == "bicubic" and loaded.preprocess["resize_short_side"] == 73
    assert loaded.preprocess["mean"] == pytest.approx([123.675, 116.28, 103.53])
    assert result.report["top1_agreement"] == 1.0  # the ONNX artifact answers as the timm model does


def test_unknown_arch_names_the_nearest_of_both_libraries(tmp_path: Path) -> None:
    path = tmp_path / "w.pth"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(UsageError, match="did you mean .*mobilenetv3_small_050"):
        ClassifierFamily().load(path, LoadOptions(arch="mobilenetv3_smal_050"))
