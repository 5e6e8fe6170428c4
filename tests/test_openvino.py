"""OpenVINO: IR builds (model.xml + model.bin) verify in OpenVINO here, hash both files, rebuild to the same bytes,
and combinations OpenVINO does not take are refused in one line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from edgekit import build
from edgekit.cli import main

from .test_detector import SIZE, tiny_yaml

FAST = {"verify.runs": 3, "verify.warmup": 1}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fp32_build_verifies_in_openvino_here_and_on_a_device_and_rebuilds_to_the_same_bytes(
        tiny_model: nn.Module, photos: Path, loopback_agent: str) -> None:
    first = build(tiny_model, "x86-64", format="openvino", calib=photos, input_size=32, out="a", overrides=FAST,
                  quiet=True, use_cache=False)
    report, folder = first.report, first.out
    assert first.exit_code == 0 and report["top1_agreement"] == 1.0
    assert report["artifact"]["file"] == "model.xml" and report["artifact"]["weights_file"] == "model.bin"
    assert report["size_bytes"] == (folder / "model.xml").stat().st_size + (folder / "model.bin").stat().st_size
    outputs = json.loads((folder / "manifest.json").read_text())["outputs"]
    assert outputs["model.xml"]["sha256"] == sha(folder / "model.xml")
    assert outputs["model.bin"]["sha256"] == sha(folder / "model.bin")
    host = report["latency_ms"]["measured_host"]
    assert host["label"] == "measured: host" and host["runtime"].startswith("OpenVINO")
    layers = host["layers"]  # OpenVINO's own counters: the fused convolutions, timed
    assert any(row["op"] == "Convolution" for row in layers) and all(row["ms"] >= 0 for row in layers)
    assert report["artifact"]["inputs"] == [{"name": "input", "shape": [1, 3, 32, 32], "dtype": "float32"}]
    assert "preprocess" in (folder / "model.xml").read_text()  # edgekit's metadata in the IR's rt_info
    # a second build in the same process (OpenVINO's node counter has moved on, the bytes must not), verified on a
    # device too: both files travel to the board
    second = build(tiny_model, "x86-64", format="openvino", calib=photos, input_size=32, out="b", overrides=FAST,
                   quiet=True, use_cache=False, device_url=loopback_agent)
    device, again = second.report["device"], second.out
    assert device["runtime"].startswith("OpenVINO") and device["accuracy"]["top1_agreement"] == 1.0
    assert device["latency_ms"]["label"] == "measured: test-board"
    assert [sha(again / name) for name in ("model.xml", "model.bin")] == [
        sha(folder / name) for name in ("model.xml", "model.bin")]


def test_int8_build_is_edgekit_s_qdq_graph_run_in_openvino(tiny_model: nn.Module, photos: Path) -> None:
    import openvino as ov

    result = build(tiny_model, "x86-64", format="openvino", precision="int8", calib=photos, input_size=32,
                   out="q", overrides=FAST, quiet=True)
    report = result.report
    assert report["top1_agreement"] >= 0.66 and report["quantization"]["calibration"]["images"] == 9
    assert report["quantization"]["steps"][0]["host_p50_ms"] > 0  # each try was judged in OpenVINO
    model = ov.Core().read_model(str(result.out / "model.xml"))
    kinds = [node.get_type_name() for node in model.get_ordered_ops()]
    assert kinds.count("FakeQuantize") >= 2  # activations, as OpenVINO quantizes them
    # only what convs and matmuls read: a conv's own output is not rounded before its activation function too
    activations = [node for node in model.get_ordered_ops() if node.get_type_name() == "FakeQuantize"
                   and node.input_value(0).get_node().get_type_name() != "Constant"]
    readers = {use.get_node().get_type_name() for node in activations for use in node.output(0).get_target_inputs()}
    assert readers and readers <= {"Convolution", "GroupConvolution", "MatMul"}, readers
    assert "each value rounded once" in report["quantization"]["scheme"]["quantized_ops"]
    weights = [n for n in model.get_ordered_ops() if n.get_type_name() == "Constant" and n.get_output_size()
               and n.get_output_element_type(0) == ov.Type.i8]
    assert len(weights) >= 3  # both convs and the linear store int8 weights
    codes = np.concatenate([node.get_data().ravel() for node in weights])
    # 7 bits (-64..63) only on the layers whose 8-bit weights would saturate int16 pairs on x86 without VNNI
    quantization = report["quantization"]
    assert "where 8 would saturate" in quantization["scheme"]["weights"]
    emulated = {row["layer"] for row in quantization["int16_pairs"]}
    assert len(emulated) >= 2 and set(quantization["seven_bit_layers"]) <= emulated
    assert np.abs(codes).max() == 127 or set(quantization["seven_bit_layers"]) == emulated


def test_a_detector_builds_to_openvino_verified_by_map(tmp_path: Path, boxes: Path) -> None:
    result = build(str(tiny_yaml(tmp_path, "yolo11")), "intel-n100", calib=boxes / "images", eval=boxes / "images",
                   input_size=SIZE, overrides=FAST, out="det", quiet=True)
    report = result.report
    assert report["artifact"]["format"] == "openvino"  # the N100 box's preferred runtime
    assert report["target"]["runtime"] == "openvino" and result.exit_code == 0
    assert report["map50_95_drop_pt"] == pytest.approx(0.0, abs=0.5)
    assert report["artifact"]["outputs"][0]["shape"][:2] == [1, 4 + 3]


def test_stable_names_make_two_conversions_in_one_process_identical(tiny_model: nn.Module) -> None:
    from edgekit.passes.export import export_onnx
    from edgekit.passes.openvino import to_openvino
    from edgekit.runtimes.openvino import OpenVinoRunner

    graph = export_onnx(tiny_model, (1, 3, 32, 32), 17)
    first, second = to_openvino(graph), to_openvino(graph)
    assert first == second
    sample = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    import torch

    with torch.no_grad():
        expected = tiny_model(torch.from_numpy(sample)).numpy()
    runner = OpenVinoRunner(first["model.xml"], first["model.bin"], 1)
    # the CPU plugin computes float ops in bf16 where the CPU has bf16 instructions (8 significant bits), and the
    # report's runtime line says so; elsewhere in f32
    tolerance = 2e-2 if runner.description.endswith("bf16 float ops") else 1e-4
    np.testing.assert_allclose(runner.run(sample), expected, rtol=tolerance, atol=tolerance / 10)


@pytest.mark.parametrize(("target", "expected"), [
    ("jetson", "jetson-orin-nano does not run openvino models"),
    ("android-arm64", "android-arm64 does not run openvino models"),
])
def test_a_target_without_openvino_is_refused(target: str, expected: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build", "mobilenet_v2", "--target", target, "--format", "openvino"]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err


def test_a_language_model_builds_to_an_ir_stepped_through_its_cache_here_and_on_a_device(
        tiny_lm_folder: Path, loopback_agent: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The int4 decoder graph converted whole: its MatMulNBits stay 4-bit weights in the IR, OpenVINO computes the
    perplexity onnxruntime does of the same graph, on this host, on a board and in `edgekit generate`."""
    text = {"text.calib_windows": 4, "text.calib_length": 32, "text.eval_windows": 3, "text.eval_length": 48,
            "text.prompts": 2, "text.prompt_length": 8, "text.new_tokens": 5, "weights.group_size": 32}
    ir = build(tiny_lm_folder, "x86-64", format="openvino", precision="int4", overrides=text, out="ir", quiet=True,
               device_url=loopback_agent)
    onnx = build(tiny_lm_folder, "x86-64", precision="int4", overrides=text, out="onnx", quiet=True).report
    report = ir.report
    assert report["artifact"]["format"] == "openvino" and report["artifact"]["weights_file"] == "model.bin"
    assert 'element_type="u4"' in (ir.out / "model.xml").read_text()
    here = report["accuracy"]
    assert report["latency_ms"]["measured_host"]["runtime"].startswith("OpenVINO")
    assert here["eval_tokens"] == onnx["accuracy"]["eval_tokens"] == 3 * 47
    assert here["ppl_artifact"] == pytest.approx(onnx["accuracy"]["ppl_artifact"], rel=0.01)
    assert here["ppl_artifact"] != onnx["accuracy"]["ppl_artifact"]  # computed by OpenVINO, not a copied figure
    device = report["device"]
    assert device["sha256"] == report["artifact"]["sha256"] and device["latency_ms"]["decode_steps"] == 2 * 4
    assert device["accuracy"]["ppl_artifact"] == pytest.approx(here["ppl_artifact"], rel=1e-4)
    assert main(["generate", str(ir.out), "the", "--tokens", "3"]) == 0
    assert "3 tokens" in capsys.readouterr().err


def test_fp16_build_keeps_the_graph_s_fp16_weights(tiny_model: nn.Module, photos: Path) -> None:
    fp16 = build(tiny_model, "raspberry-pi-5", format="openvino", precision="fp16", calib=photos, input_size=32,
                 out="h", overrides=FAST, quiet=True).report
    fp32 = build(tiny_model, "raspberry-pi-5", format="openvino", calib=photos, input_size=32, out="f",
                 overrides=FAST, quiet=True).report
    assert fp16["artifact"]["weights_size_bytes"] < 0.55 * fp32["artifact"]["weights_size_bytes"]
    assert fp16["top1_agreement"] == 1.0 and fp16["target"]["runtime"] == "openvino"
