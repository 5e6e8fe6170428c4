"""TFLite: each precision converts and verifies in LiteRT, ops are placed against target rules, failures say why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgekit import build
from edgekit.cli import main

FAST = {"verify.runs": 3, "verify.warmup": 1}


@pytest.mark.parametrize(("precision", "mode", "weight_type", "input_dtype"), [
    ("fp32", "static", np.float32, "float32"),
    ("fp16", "static", np.float16, "float32"),
    ("int8", "dynamic", np.int8, "float32"),
    ("int8", "static", np.int8, "int8"),
])
def test_each_precision_converts_and_verifies(tiny_model: nn.Module, photos: Path, precision: str, mode: str,
                                              weight_type: type, input_dtype: str) -> None:
    from ai_edge_litert.interpreter import Interpreter

    result = build(tiny_model, "android-arm64", precision=precision, calib=photos, input_size=32, out="o",
                   overrides={**FAST, "quantize.int8_mode": mode}, quiet=True)
    report = result.report
    assert report["artifact"]["file"] == "model.tflite" and report["artifact"]["format"] == "tflite"
    assert report["latency_ms"]["measured_host"]["runtime"].startswith("LiteRT")
    assert report["top1_agreement"] >= (1.0 if precision != "int8" else 0.66)
    interpreter = Interpreter(model_path=str(result.out / "model.tflite"))
    tensor_types = {d["dtype"] for d in interpreter.get_tensor_details()}
    assert np.dtype(weight_type) in {np.dtype(t) for t in tensor_types}
    inputs = report["artifact"]["inputs"][0]
    assert inputs["shape"] == [1, 32, 32, 3] and inputs["dtype"] == input_dtype
    if input_dtype == "int8":
        assert inputs["quantization"]["scale"] > 0  # what an app needs to quantize its pixels
        assert report["quantization"]["calibration"]["images"] == 9
    ops = report["ops"]
    assert ops["checked_against"] == "android-arm64 [constraints]" and ops["ops"] == len(ops["placement"])


class WithExp(nn.Module):
    """A conv net with an exp: XNNPACK runs it, the Edge TPU cannot."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.exp(-torch.relu(self.conv(x))).mean((2, 3)))


def test_op_outside_the_edge_tpu_list_is_named_and_fails(photos: Path) -> None:
    torch.manual_seed(0)
    result = build(WithExp().eval(), "coral", calib=photos, input_size=16, out="coral", overrides=FAST, quiet=True)
    ops = result.report["ops"]
    assert "EXP" in ops["fallback_ops"]
    first = ops["first_fallback"]
    assert first["op"] in ops["fallback_ops"] and "op not supported by the accelerator" in first["reasons"]
    after = [p for p in ops["placement"] if p["index"] > first["index"] and not p["reasons"]]
    assert after and all(p["placement"] == "cpu (after the first fallback)" for p in after)
    gate = next(g for g in result.report["gates"] if g["name"] == "on_cpu_fallback")
    assert gate["status"] == "failed" and result.exit_code == 1
    assert any("fall back to the CPU on coral-edgetpu" in note for note in result.report["notes"])


def test_same_op_on_android_only_warns(photos: Path) -> None:
    torch.manual_seed(0)
    result = build(WithExp().eval(), "android-arm64", calib=photos, input_size=16, out="a", overrides=FAST,
                   quiet=True)
    gate = next(g for g in result.report["gates"] if g["name"] == "on_cpu_fallback")
    assert result.report["ops"]["fallback_ops"] == ["EXP"]  # outside the XNNPACK list: reference kernels
    assert gate["status"] == "warned" and result.exit_code == 0


class Unconvertible(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # control flow on data: torch.export cannot trace it
            return x.mean((2, 3))
        return -x.mean((2, 3))


def test_converter_failure_exits_3_with_the_log_beside_the_folder(capsys, photos: Path, tmp_path: Path) -> None:
    from edgekit.errors import StageError

    with pytest.raises(StageError, match=r"TFLite conversion failed: .*full log: out.converter.log") as caught:
        build(Unconvertible(), "android-arm64", calib=photos, input_size=16, out="out", overrides=FAST, quiet=True)
    assert caught.value.exit_code == 3
    assert Path("out.converter.log").read_text().strip() and not Path("out").exists()
    assert len(str(caught.value).splitlines()) == 1


def test_onnx_input_for_a_tflite_target_exits_2(capsys, tiny_model: nn.Module, photos: Path, tmp_path: Path) -> None:
    import onnx

    from edgekit.passes.export import export_onnx

    onnx_path = tmp_path / "tiny.onnx"
    onnx.save(export_onnx(tiny_model, (1, 3, 32, 32), 17), str(onnx_path))
    code = main(["build", str(onnx_path), "--target", "android-arm64", "--calib", str(photos), "-q"])
    _, err = capsys.readouterr()
    assert code == 2 and err.strip().endswith("TFLite export converts torch models; an ONNX input builds to "
                                              "--format onnx")
    assert not Path("dist").exists()
