"""The device model: op classes from the graph, per-op estimates from target data, host calibration, validation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgekit.cli import main
from edgekit.passes.analyze import analyze, analyze_tflite
from edgekit.passes.export import export_onnx
from edgekit.passes.int8 import Int8Quantizer, Int8Scheme
from edgekit.targets import KernelRate, load_target
from edgekit.verify.estimate import estimate
from edgekit.verify.microbench import host_target, measure_host


class Mobile(nn.Module):
    """Stem conv, depthwise conv, pointwise conv, SiLU (sigmoid times input), pool, one-row linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pointwise = nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pointwise(self.depthwise(self.stem(x)))
        return self.fc((x * torch.sigmoid(x)).mean((2, 3)))


@pytest.fixture
def graph() -> onnx.ModelProto:
    torch.manual_seed(0)
    return export_onnx(Mobile().eval(), (1, 3, 32, 32), 17)


def test_op_classes_follow_what_runtimes_fuse(graph: onnx.ModelProto) -> None:
    classes = {(layer.op, layer.op_class) for layer in analyze(graph).layers}
    assert {("Conv", "conv"), ("Conv", "depthwise"), ("Gemm", "gemv")} <= classes
    assert ("Relu", "fused") in classes  # after a conv with one reader: folded into it
    assert ("Sigmoid", "elementwise") in classes  # its input has a second reader (the Mul): a kernel of its own


def test_int8_graph_folds_qdq_and_counts_int8_bytes(graph: onnx.ModelProto) -> None:
    calibration = np.random.default_rng(0).normal(0, 1, (2, 3, 32, 32)).astype(np.float32)
    quantized = Int8Quantizer(graph, calibration, Int8Scheme("uint8", "minmax", False), None, 1).quantize()
    fp32, int8 = analyze(graph), analyze(quantized)
    convs = [layer for layer in int8.layers if layer.op == "Conv"]
    assert convs and all(layer.precision == "int8" for layer in convs)
    weight_dqs = [layer for layer in int8.layers if layer.op == "DequantizeLinear" and not layer.activation_bytes]
    assert weight_dqs and all(layer.op_class == "fused" for layer in weight_dqs)  # folded when the session loads
    conv_bytes = {layer.name: layer.weight_bytes for layer in fp32.layers if layer.op == "Conv"}
    assert sum(layer.weight_bytes for layer in convs) < sum(conv_bytes.values()) / 3  # int8 weights, int32 bias
    rows = estimate(int8, load_target("x86-64"), top=999)["layers"]
    assert {row["precision"] for row in rows if row["op"] == "Conv"} == {"int8"}  # at the int8 peak


def test_qdq_patterns_onnxruntime_does_not_fuse_are_charged_in_float(tmp_path: Path) -> None:
    """The exporter shares equal biases through Identity nodes; onnxruntime's quantize_static, without its
    pre-processing, leaves such biases float, and onnxruntime then runs those convs in float between conversions.
    The host estimate charges them so (fp32 convs, Q/DQ as whole-tensor ops); a TensorRT target, whose fusions are
    its own, still reads int8; edgekit's quantizer (pre-processed graph) leaves none unfused."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Conv2d(8 if i else 3, 8, 3, padding=1) for i in range(4)], nn.Flatten(),
                          nn.Linear(8 * 16 * 16, 4)).eval()
    for conv in model[:4]:
        nn.init.zeros_(conv.bias)  # equal biases: the exporter shares one initializer between them
    graph = export_onnx(model, (1, 3, 16, 16), 17)
    onnx.save(graph, tmp_path / "shared.onnx")
    calibration = np.random.default_rng(0).normal(0, 1, (2, 3, 16, 16)).astype(np.float32)
    rows = iter([{graph.graph.input[0].name: row[None]} for row in calibration])

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(rows, None)

    quantize_static(str(tmp_path / "shared.onnx"), str(tmp_path / "ortq.onnx"), Reader())
    analysis = analyze(onnx.load(tmp_path / "ortq.onnx"))
    unfused = {layer.name for layer in analysis.layers if layer.op == "Conv" and layer.unfused_in_onnxruntime}
    assert len(unfused) == 3  # the first conv reads the initializer itself and fuses
    host = {row["name"]: row for row in estimate(analysis, load_target("x86-64"), top=999)["layers"]}
    assert {host[name]["precision"] for name in unfused} == {"fp32"}
    assert any(row["op"] == "DequantizeLinear" and row["class"] == "elementwise" for row in host.values())
    # where the profile measured float convs on dequantized weights (the host's microbenchmarks do), those take it
    x86 = load_target("x86-64")
    measured = {"op_class": "conv", "precision": "fp32", "reduction": 72, "outputs": 2048}
    slow = x86.model_copy(update={"latency": x86.latency.model_copy(update={"kernels": [
        KernelRate(**measured, efficiency=0.5), KernelRate(**measured, weights="dequantized", efficiency=0.01)]})})
    rows = {row["name"]: row["ms"] for row in estimate(analysis, slow, top=999)["layers"]}
    fast = x86.model_copy(update={"latency": x86.latency.model_copy(update={"kernels": slow.latency.kernels[:1]})})
    alike = {row["name"]: row["ms"] for row in estimate(analysis, fast, top=999)["layers"]}
    assert all(rows[name] > 5 * alike[name] for name in unfused)
    assert [rows[name] for name in alike if name not in unfused] == [alike[name] for name in alike
                                                                     if name not in unfused]
    jetson = estimate(analysis, load_target("jetson-orin-nano"), top=999)
    assert {row["precision"] for row in jetson["layers"] if row["op"] == "Conv"} == {"int8"}
    ours = Int8Quantizer(graph, calibration, Int8Scheme("uint8", "minmax", False), None, 1).quantize()
    assert not any(layer.unfused_in_onnxruntime for layer in analyze(ours).layers if layer.op == "Conv")


def test_tflite_analysis_counts_the_same_macs(graph: onnx.ModelProto) -> None:
    from edgekit.passes.tflite import convert_tflite

    torch.manual_seed(0)
    tflite = analyze_tflite(convert_tflite(Mobile().eval(), (1, 3, 32, 32)))
    assert tflite.macs == analyze(graph).macs
    assert {layer.op_class for layer in tflite.layers if layer.macs} == {"conv", "depthwise", "gemv"}


def test_estimate_sums_per_op_costs_from_the_target(graph: onnx.ModelProto) -> None:
    analysis = analyze(graph)
    target = load_target("raspberry-pi-5")
    result = estimate(analysis, target, top=3)
    assert result["label"] == "estimated" and len(result["layers"]) == 3
    assert result["ms"] == pytest.approx(sum(row["ms"] for row in estimate(analysis, target, top=999)
                                             ["layers"]), rel=1e-3)
    slower = target.model_copy(update={"latency": target.latency.model_copy(update={"efficiency": {
        k: v / 4 for k, v in target.latency.efficiency.items()}})})
    assert estimate(analysis, slower)["compute_ms"] == pytest.approx(4 * result["compute_ms"], rel=1e-3)


def test_on_chip_weights_are_not_streamed() -> None:
    big = analyze(export_onnx(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 512)).eval(), (1, 3, 32, 32), 17))
    assert estimate(big, load_target("coral"))["ms"] is None  # fp32: the Edge TPU has no float peak
    big.layers = [dataclasses.replace(layer, precision="int8") for layer in big.layers]
    coral = load_target("coral")
    cached = estimate(big, coral)["ms"]
    streamed = estimate(big, coral.model_copy(update={"latency": coral.latency.model_copy(
        update={"on_chip_weights_mb": 0.5})}))["ms"]  # 6 MB of weights, 0.5 MB of cache: most cross USB
    crossing = (big.weight_bytes - 0.5e6) / (coral.memory.bandwidth_gbps * 1e9 * coral.latency.memory_efficiency)
    assert streamed - cached == pytest.approx(crossing * 1e3, rel=0.01) and streamed > 5 * cached


def test_host_calibration_gives_a_valid_profile_with_sources() -> None:
    profile = host_target(measure_host(threads=1, runs=3, rounds=1))
    assert profile.compute.fp32_gflops > 0 and profile.memory.bandwidth_gbps > 0
    assert all(0 < value <= 1 for value in profile.latency.efficiency.values())
    assert {"conv", "depthwise", "gemm", "gemv", "elementwise"} <= set(profile.latency.efficiency)
    assert profile.latency.kernels and all(key in profile.sources for key in profile.device_numbers())
    assert {(k.precision, k.weights) for k in profile.latency.kernels} == {("fp32", "constant"), ("int8", "constant"),
                                                                           ("fp32", "dequantized")}


def test_validate_prints_estimate_measurement_and_median_error(graph: onnx.ModelProto, capsys,
                                                               tmp_path: Path) -> None:
    paths = []
    for name, size in (("a", 32), ("b", 64)):
        path = tmp_path / f"{name}.onnx"
        torch.manual_seed(0)
        onnx.save(export_onnx(Mobile().eval(), (1, 3, size, size), 17), path)
        paths.append(str(path))
    assert main(["estimate", *paths, "--validate", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["validation"]
    assert [row["artifact"] for row in report["models"]] == paths
    for row in report["models"]:
        assert row["estimated_ms"] > 0 and row["measured_ms"] > 0
        assert row["error"] == pytest.approx((row["estimated_ms"] - row["measured_ms"]) / row["measured_ms"], abs=0.01)
    assert report["median_abs_error"] == pytest.approx(np.median([abs(r["error"]) for r in report["models"]]), abs=1e-3)
    # the second run reuses the cached microbenchmarks and the profile it writes is a usable target
    profile = tmp_path / "host.toml"
    assert main(["estimate", paths[0], "--calibrate-host", str(profile), "--json"]) == 0
    estimates = json.loads(capsys.readouterr().out)
    assert main(["estimate", paths[0], "--target", str(profile), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["estimates"][0]["ms"] > 0 and estimates["profile"] == str(profile)


def test_estimate_refuses_what_is_not_an_artifact(tmp_path: Path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("x")
    assert main(["estimate", str(tmp_path / "notes.txt")]) == 2
    assert "an .onnx or .tflite file" in capsys.readouterr().err
    assert main(["estimate", str(tmp_path / "missing.onnx")]) == 2
    assert main(["estimate"]) == 2
