"""INT8: calibrated QDQ, per-layer sensitivity, layers kept in float until the gate holds, and what is recorded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from edgekit import build
from edgekit.cache import read_checked_json
from edgekit.cli import main
from edgekit.data import files_digest
from edgekit.passes.export import export_onnx
from edgekit.passes.int8 import Int8Quantizer, Int8Scheme

FAST = {"verify.runs": 3, "verify.warmup": 1}


class OneBadLayer(nn.Module):
    """conv2 carries huge weights that only ever meet zeros: harmless in float, ruinous in int8 (every other
    weight of each output channel rounds to zero), so conv2 is the layer the sensitivity pass must find."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 4)
        with torch.no_grad():
            self.conv1.weight[0] = 0
            self.conv1.bias[0] = -1  # channel 0 of conv1's output is 0 after the ReLU, for every input
            self.conv2.weight[:, 0] = 50.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.conv1(x))
        return self.fc(torch.relu(self.conv2(hidden)).mean((2, 3)))


@pytest.fixture
def many_photos(tmp_path: Path) -> Path:
    from .conftest import PHOTOS

    folder = tmp_path / "many"
    folder.mkdir()
    for path in PHOTOS[::4]:
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def test_sensitive_layer_is_found_and_kept_in_float(many_photos: Path) -> None:
    result = build(OneBadLayer(), "x86-64", precision="int8", calib=many_photos, input_size=32, out="o",
                   overrides={**FAST, "gates.min_top1_agreement": 0.8}, quiet=True)
    quantization = result.report["quantization"]
    table = quantization["sensitivity"]
    assert table[0]["layer"] == "/conv2/Conv" and table[0]["nsr"] > 5 * table[1]["nsr"]
    first, last = quantization["steps"][0], quantization["steps"][-1]
    assert first["kept_float"] == [] and first["top1_agreement"] < 0.8  # fully quantized, the gate fails
    assert quantization["kept_float"] == ["/conv2/Conv"] == last["kept_float"]
    assert quantization["scheme"]["bias"] == "int32" and quantization["scheme"]["activations"].startswith("uint8")
    assert result.exit_code == 0 and result.report["top1_agreement"] >= 0.8
    assert all({"size_bytes", "host_p50_ms"} <= step.keys() for step in quantization["steps"])
    graph = onnx.load(str(result.out / "model.onnx"))
    conv2 = next(n for n in graph.graph.node if n.name == "/conv2/Conv")
    producers = {o: n.op_type for n in graph.graph.node for o in n.output}
    assert producers.get(conv2.input[1]) != "DequantizeLinear"  # its weights stayed float
    assert sum(n.op_type == "QuantizeLinear" for n in graph.graph.node) > 0  # the rest is int8


def test_report_and_artifact_record_scheme_exclusions_and_calibration(many_photos: Path) -> None:
    result = build(OneBadLayer(), "jetson", precision="int8", calib=many_photos, input_size=32,
                   overrides={**FAST, "gates.min_top1_agreement": 0.8}, quiet=True)
    quantization = json.loads((result.out / "report.json").read_text())["quantization"]
    assert quantization["scheme"]["activations"] == "int8, symmetric, per tensor"  # TensorRT's form
    assert quantization["scheme"]["weights"] == "int8, symmetric, per output channel"
    assert quantization["scheme"]["calibration"] == "mse" and quantization["scheme"]["bias_correction"]
    calib_files = sorted(many_photos.iterdir())
    calib_part = [f for f in calib_files if f not in calib_files[3::4]]
    assert quantization["calibration"] == {"images": len(calib_part), "path": str(many_photos),
                                           "sha256": files_digest(calib_part, many_photos)}
    graph = onnx.load(str(result.out / "model.onnx"))
    metadata = json.loads({p.key: p.value for p in graph.metadata_props}["edgekit.quantization"])
    assert metadata["kept_float"] == quantization["kept_float"] and metadata["calibration"]["sha256"]
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    zero_points = [initializers[n.input[2]] for n in graph.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)  # symmetric
    assert not any(v.dtype == np.int32 for v in initializers.values())  # TensorRT takes float biases
    assert quantization["scheme"]["bias"] == "float"
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    producers = {o: n.op_type for n in graph.graph.node for o in n.output}
    assert producers[graph.graph.output[0].name] == "Gemm"  # logits are not rounded to 8 bits


def test_gate_that_cannot_be_met_exits_1(capsys, many_photos: Path, tmp_path: Path) -> None:
    model = tmp_path / "bad.onnx"
    onnx.save(export_onnx(OneBadLayer().eval(), (1, 3, 32, 32), 17), str(model))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[quantize]\nprecision = \"int8\"\nmax_float_layers = 0\n[verify]\nruns = 3\n")
    code = main(["build", str(model), "--target", "x86-64", "--calib", str(many_photos), "--recipe", str(recipe),
                 "--min-agreement", "0.8", "--out", "gated", "-q"])
    _, err = capsys.readouterr()
    assert code == 1 and "gate failed: min_top1_agreement" in err
    report = json.loads(Path("gated/report.json").read_text())
    assert report["status"] == "gate_failed" and report["quantization"]["kept_float"] == []
    assert len(report["quantization"]["steps"]) == 1 and report["quantization"]["max_float_layers"] == 0


def test_int8_bytes_are_reproducible_across_processes(tiny_model: nn.Module, photos: Path, tmp_path: Path) -> None:
    """Separate processes with different hash seeds and no cache: set and dict orders must not leak into bytes."""
    import os
    import subprocess
    import sys

    model = tmp_path / "tiny.onnx"
    onnx.save(export_onnx(tiny_model, (1, 3, 32, 32), 17), str(model))
    hashes = set()
    for seed in ("1", "2"):
        subprocess.run([sys.executable, "-m", "edgekit", "build", str(model), "--target", "x86-64", "--precision",
                        "int8", "--calib", str(photos), "--runs", "2", "--no-cache", "-q", "--out", f"p{seed}"],
                       check=True, env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True)
        hashes.add(json.loads(Path(f"p{seed}/report.json").read_text())["artifact"]["sha256"])
    assert len(hashes) == 1


def test_int8_bytes_are_reproducible_through_the_ranges_cache(tiny_model: nn.Module, photos: Path) -> None:
    hashes = set()
    for i in range(2):
        result = build(tiny_model, "x86-64", precision="int8", calib=photos, input_size=32, out=f"b{i}",
                       overrides=FAST, quiet=True)
        hashes.add(result.report["artifact"]["sha256"])
    assert len(hashes) == 1
    assert len(list(Path("cache").glob("*.json"))) == 1  # one calibration, reused by the second build


def test_int8_bytes_do_not_depend_on_where_the_calibration_images_lie(tiny_model: nn.Module, photos: Path,
                                                                       tmp_path: Path) -> None:
    import shutil

    moved = shutil.copytree(photos, tmp_path / "elsewhere" / "photos")
    hashes = {build(tiny_model, "x86-64", precision="int8", calib=folder, input_size=32, out=f"m{i}",
                    overrides=FAST, quiet=True, use_cache=False).report["artifact"]["sha256"]
              for i, folder in enumerate((photos, moved))}
    assert len(hashes) == 1


@pytest.mark.parametrize("method", ["mean-minmax", "mse"])
def test_robust_ranges_sit_inside_the_extremes(method: str, tiny_model: nn.Module, photos: Path,
                                               tmp_path: Path) -> None:
    from edgekit.families.base import LoadOptions
    from edgekit.families.classifier import ClassifierFamily

    family = ClassifierFamily()
    loaded = family.load(tiny_model, LoadOptions(input_size=32))
    inputs = family.samples(loaded, sorted(photos.iterdir()), None).inputs
    graph = export_onnx(tiny_model, (1, 3, 32, 32), 17)
    ranges = {}
    for name in ("minmax", method):
        path = tmp_path / f"{name}.json"
        Int8Quantizer(graph, inputs, Int8Scheme("uint8", name, False), path, 1).quantize()
        ranges[name] = {k: (v["lowest"]["data"][0], v["highest"]["data"][0])
                        for k, v in read_checked_json(path)["data"].items()}
    assert ranges["minmax"].keys() == ranges[method].keys()
    narrower = [ranges["minmax"][k][0] - 1e-6 <= lo <= hi <= ranges["minmax"][k][1] + 1e-6
                for k, (lo, hi) in ranges[method].items()]
    assert all(narrower)
    assert any(ranges[method][k][1] < ranges["minmax"][k][1] - 1e-6 for k in ranges["minmax"])


def test_mse_clip_matches_the_known_optimum_for_laplace_tails() -> None:
    """For Laplace(0, b) values the 8-bit MSE-optimal clip is about 9.9 b (Banner et al., ACIQ); the extremes
    of 100k samples sit near 12 b, so the chosen range must be clipped inside them, near the optimum."""
    from edgekit.passes.int8 import mse_clip

    values = np.random.default_rng(0).laplace(0, 1, 100_000)
    low, high = mse_clip(values, symmetric=False)
    assert values.min() < low < -8 and 8 < high < values.max()
    bound_low, bound_high = mse_clip(values, symmetric=True)
    assert bound_low == -bound_high and 8 < bound_high < max(-values.min(), values.max())


def test_ranges_cache_keeps_symmetric_and_asymmetric_apart(tiny_model: nn.Module, photos: Path) -> None:
    """A TensorRT build (symmetric ranges) must not hand its ranges to a CPU build (asymmetric) of the same model."""
    jetson = build(tiny_model, "jetson", precision="int8", calib=photos, input_size=32, out="j", overrides=FAST,
                   quiet=True)
    cpu = build(tiny_model, "x86-64", precision="int8", calib=photos, input_size=32, out="x", overrides=FAST,
                quiet=True)
    assert len(list(Path("cache").glob("*.json"))) == 2
    assert cpu.report["top1_agreement"] >= jetson.report["top1_agreement"] - 0.34
    graph = onnx.load(str(cpu.out / "model.onnx"))
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    zero_points = [initializers[n.input[2]] for n in graph.graph.node if n.op_type == "QuantizeLinear"]
    assert any(z.dtype == np.uint8 and z.item() != 128 for z in zero_points)  # asymmetric ranges, not [-b, b]


def test_range_rules_have_known_answers() -> None:
    from edgekit.passes.int8 import stream_ranges

    images = [[np.array([-1.0, 2.0]), np.array([0.0, 10.0])], [np.array([-3.0, 4.0]), np.array([1.0, 2.0])]]
    assert stream_ranges(iter(images), "minmax", symmetric=False) == [(-3.0, 4.0), (0.0, 10.0)]
    assert stream_ranges(iter(images), "mean-minmax", symmetric=False) == [(-2.0, 3.0), (0.5, 6.0)]
    tails = np.random.default_rng(0).laplace(size=20000)  # a few far values: a clipped range serves the rest better
    (low, high), = stream_ranges(iter([[tails]]), "mse", symmetric=False, per_image=20000)
    assert tails.min() < low < 0 < high < tails.max()
    with pytest.raises(ValueError, match="entropy"):
        stream_ranges(iter(images), "entropy", symmetric=False)
