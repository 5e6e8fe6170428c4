"""ExecuTorch: `--format pte` lowers the torch module to an XNNPACK-delegated program (fp32, or int8 through PT2E on
the build's calibration images), verifies it in ExecuTorch's Python runtime, hashes it, rebuilds to the same bytes;
what it cannot build is refused in one line. Lowering costs ExecuTorch 10-40 s even for a tiny model, so the builds
are few."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from edgekit import build
from edgekit.cli import main

from .test_detector import SIZE, tiny_yaml

FAST = {"verify.runs": 3, "verify.warmup": 1}
needs_executorch = pytest.mark.skipif(importlib.util.find_spec("executorch") is None,
                                      reason="executorch is not installed (pip install 'edgekit[executorch]')")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@needs_executorch
def test_fp32_program_verifies_in_executorch_here_and_on_a_device_and_rebuilds_to_the_same_bytes(
        tiny_model: nn.Module, photos: Path, loopback_agent: str) -> None:
    import torch

    from edgekit.runtimes.executorch import ExecuTorchRunner

    first = build(tiny_model, "android-arm64", format="pte", calib=photos, input_size=32, out="a", overrides=FAST,
                  quiet=True, use_cache=False)
    report, program = first.report, first.out / "model.pte"
    assert first.exit_code == 0 and report["top1_agreement"] == 1.0
    assert report["artifact"]["file"] == "model.pte" and report["target"]["runtime"] == "executorch"
    assert json.loads((first.out / "manifest.json").read_text())["outputs"]["model.pte"]["sha256"] == sha(program)
    host = report["latency_ms"]["measured_host"]
    assert host["label"] == "measured: host" and host["runtime"].startswith("ExecuTorch") and host["p50"] > 0
    assert report["artifact"]["inputs"][0]["shape"] == [1, 3, 32, 32]
    assert report["artifact"]["outputs"][0] | {"name": ""} == {"name": "", "shape": [1, 3], "dtype": "float32"}
    sample = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        expected = tiny_model(torch.from_numpy(sample)).numpy()
    # two rows: the second call overwrites the program's output buffer, the first row must have been copied out
    np.testing.assert_allclose(ExecuTorchRunner(program.read_bytes(), 1).run(sample), expected, rtol=1e-4, atol=1e-5)
    second = build(tiny_model, "android-arm64", format="pte", calib=photos, input_size=32, out="b", overrides=FAST,
                   quiet=True, use_cache=False, device_url=loopback_agent)  # and verified on a device
    device, again = second.report["device"], second.out
    assert device["runtime"].startswith("ExecuTorch") and device["accuracy"]["top1_agreement"] == 1.0
    assert device["latency_ms"]["label"] == "measured: test-board" and device["sha256"] == sha(program)
    assert sha(again / "model.pte") == sha(program)


@needs_executorch
def test_int8_program_is_quantized_on_the_calibration_images(tiny_model: nn.Module, photos: Path) -> None:
    import torch

    from edgekit.runtimes.executorch import ExecuTorchRunner

    result = build(tiny_model, "ios", precision="int8", calib=photos, input_size=32,  # ios builds pte by default
                   out="q", overrides=FAST, quiet=True, use_cache=False)
    report = result.report
    assert result.exit_code == 0 and report["top1_agreement"] >= 0.66
    assert report["target"]["name"] == "ios-arm64" and report["artifact"]["file"] == "model.pte"
    quantization = report["quantization"]
    assert quantization["calibration"]["images"] == 9 and "XNNPACKQuantizer" in quantization["scheme"]["engine"]
    assert quantization["scheme"]["calibration"].startswith("histogram")  # a classifier's mse: the quantizer's own
    assert quantization["calibration_diagnostics"]["images"] == 9
    estimated = report["latency_ms"]["estimated_target"]["layers"]  # the device model reads int8 arithmetic
    assert {layer["precision"] for layer in estimated if layer["class"] in ("conv", "depthwise", "gemm")} == {"int8"}
    sample = np.random.default_rng(1).random((4, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        expected = tiny_model(torch.from_numpy(sample)).numpy()
    got = ExecuTorchRunner((result.out / "model.pte").read_bytes(), 1).run(sample)
    error = np.abs(got - expected).max()
    assert 1e-4 < error < 0.1 * np.abs(expected).max()  # int8 arithmetic: close, not float-exact


@pytest.mark.parametrize(("args", "expected"), [
    (["--target", "jetson"], "jetson-orin-nano does not run pte models"),
    (["--target", "android-arm64", "--precision", "fp16"], "ExecuTorch programs are built fp32 or int8"),
])
def test_what_pte_cannot_build_is_refused_in_one_line(args: list[str], expected: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build", "mobilenet_v2", "--format", "pte", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err


def test_a_language_model_is_refused(tiny_gguf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build", str(tiny_gguf), "--target", "android-arm64", "--format", "pte"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not pte" in err and "\n" not in err


@needs_executorch  # without it, the build is refused before the model is read
def test_an_onnx_input_is_refused(tmp_path: Path, tiny_model: nn.Module, capsys: pytest.CaptureFixture[str]) -> None:
    from edgekit.passes.export import export_onnx

    onnx_file = tmp_path / "tiny.onnx"
    onnx_file.write_bytes(export_onnx(tiny_model, (1, 3, 32, 32), 17).SerializeToString())
    assert main(["build", str(onnx_file), "--target", "android-arm64", "--format", "pte"]) == 2
    assert "ExecuTorch export converts torch models; an ONNX input builds to --format onnx" in capsys.readouterr().err


@needs_executorch
def test_an_int8_detector_program_keeps_its_decode_float(tmp_path: Path, boxes: Path) -> None:
    """The head's decode (pixel boxes beside 0-1 scores) stays float; the rest is int8, verified by mAP."""
    import torch

    from edgekit.families.base import LoadOptions
    from edgekit.families.detector import DetectorFamily
    from edgekit.runtimes.executorch import ExecuTorchRunner

    yaml_file = tiny_yaml(tmp_path, "yolo11")
    result = build(str(yaml_file), "android-arm64", format="pte", precision="int8", calib=boxes / "images",
                   eval=boxes, input_size=SIZE, out=tmp_path / "q", overrides={**FAST, "gates.max_map_drop_pt": 100},
                   quiet=True, use_cache=False)
    report = result.report
    quantization = report["quantization"]
    kept = quantization["kept_float"]
    assert any("softmax" in name for name in kept) and len(kept) > 10
    assert quantization["decided_on"] == "the family's parts that one int8 scale cannot serve"
    assert quantization["scheme"]["calibration"] == "per-image min/max averaged"  # the detector's rule
    assert "map50_95_artifact" in report["accuracy"] and 0 <= report["box_agreement"] <= 1
    int8_layers = [layer for layer in report["latency_ms"]["estimated_target"]["layers"] if layer["class"] == "conv"]
    assert {layer["precision"] for layer in int8_layers} == {"int8"}
    torch.manual_seed(0)
    module = DetectorFamily().load(str(yaml_file), LoadOptions(input_size=SIZE)).module
    sample = np.random.default_rng(1).random((1, 3, SIZE, SIZE), dtype=np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(sample)).numpy()
    got = ExecuTorchRunner((result.out / "model.pte").read_bytes(), 1).run(sample)
    scores, boxes_px = got[0, 4:], got[0, :4]
    # one int8 scale over boxes in pixels would round these small scores to 0 (its step is about SIZE / 255)
    assert scores.min() > 0 and np.abs(scores / expected[0, 4:] - 1).max() < 0.2
    assert np.abs(boxes_px - expected[0, :4]).max() < 0.1 * SIZE


def test_without_executorch_the_build_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tiny_model: nn.Module,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "executorch" else real(name, *a))
    assert main(["build", "mobilenet_v2", "--target", "android-arm64", "--format", "pte"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'edgekit[executorch]'" in err and "\n" not in err
