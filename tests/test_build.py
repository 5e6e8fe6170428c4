"""The build end to end on tiny models: artifacts, reports, manifests, gates, exit codes, bad input."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import onnx
import pytest
import torch

from edgekit import build
from edgekit.cli import main
from edgekit.data import file_sha256
from edgekit.errors import UsageError
from edgekit.passes.export import export_onnx

FAST = {"verify.runs": 5, "verify.warmup": 1}


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_build_writes_verified_artifact_report_manifest(tiny_model: torch.nn.Module, photos: Path) -> None:
    result = build(tiny_model, "x86-64", calib=photos, input_size=32, out="out", overrides=FAST, quiet=True)
    assert result.exit_code == 0
    folder = Path("out")
    assert sorted(p.name for p in folder.iterdir()) == [".edgekit", "manifest.json", "model.onnx", "recipe.toml",
                                                        "report.html", "report.json"]
    report = json.loads((folder / "report.json").read_text())
    assert report["status"] == "ok"
    assert report["artifact"]["format"] == "onnx" and report["artifact"]["precision"] == "fp32"
    assert report["size_bytes"] == (folder / "model.onnx").stat().st_size
    assert report["top1_agreement"] == 1.0 and report["accuracy"]["eval_images"] == 3  # every 4th of 12 photos
    host = report["latency_ms"]["measured_host"]
    assert host["label"] == "measured: host" and 0 < host["p50"] <= host["p90"]
    estimate = report["latency_ms"]["estimated_target"]
    assert estimate["label"] == "estimated" and estimate["ms"] > 0 and estimate["bound"] in ("compute", "memory")
    assert [s["name"] for s in report["stages"]] == ["load", "data", "export", "analyze", "quantize", "verify"]
    assert all(s["seconds"] >= 0 for s in report["stages"])
    assert report["model"]["preprocess"]["center_crop"] == 32
    assert report["artifact"]["inputs"][0]["shape"] == [1, 3, 32, 32]
    assert {g["name"]: g["status"] for g in report["gates"]} == {
        "max_top1_drop_pt": "not_checked", "min_top1_agreement": "passed"}

    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["outputs"]["model.onnx"]["sha256"] == file_sha256(folder / "model.onnx")
    assert manifest["inputs"]["calibration"]["files"] == 9 and manifest["inputs"]["eval"]["files"] == 3
    assert manifest["inputs"]["target"]["name"] == "x86-64" and manifest["packages"]["onnxruntime"]
    assert manifest["seed"] == 0 and tomllib.loads((folder / "recipe.toml").read_text())["verify"]["runs"] == 5
    metadata = {p.key: p.value for p in onnx.load(str(folder / "model.onnx")).metadata_props}
    assert json.loads(metadata["edgekit.preprocess"])["center_crop"] == 32


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_same_inputs_give_the_same_bytes(tiny_model: torch.nn.Module, photos: Path, precision: str) -> None:
    hashes = {
        file_sha256(build(tiny_model, "jetson", calib=photos, input_size=32, out=f"b{i}", precision=precision,
                          overrides=FAST, quiet=True).out / "model.onnx")
        for i in range(2)
    }
    assert len(hashes) == 1


def test_fp16_artifact_holds_fp16_weights_and_keeps_answers(tiny_model: torch.nn.Module, photos: Path) -> None:
    result = build(tiny_model, "jetson", calib=photos, input_size=32, overrides=FAST, quiet=True)
    assert result.report["artifact"]["precision"] == "fp16"  # the Jetson default
    graph = onnx.load(str(result.out / "model.onnx"))
    assert {t.data_type for t in graph.graph.initializer if t.dims} == {onnx.TensorProto.FLOAT16}
    assert result.report["top1_agreement"] == 1.0
    analysis = result.report["analysis"]
    assert analysis["artifact"]["weight_bytes"] < analysis["reference"]["weight_bytes"]
    assert result.out == Path("dist/tinynet-jetson-orin-nano")


def test_onnx_input_skips_torch_stages(tiny_model: torch.nn.Module, photos: Path, tmp_path: Path) -> None:
    path = tmp_path / "tiny.onnx"
    onnx.save(export_onnx(tiny_model, (1, 3, 32, 32), 17), str(path))
    result = build(path, "x86-64", calib=photos, overrides=FAST, quiet=True)
    stages = {s["name"]: s for s in result.report["stages"]}
    assert stages["export"]["status"] == "skipped" and "input is ONNX" in stages["export"]["note"]
    assert result.report["top1_agreement"] == 1.0 and result.report["model"]["name"] == "tiny"


def test_second_build_reads_the_cache(tiny_model: torch.nn.Module, photos: Path) -> None:
    first = build(tiny_model, "x86-64", calib=photos, input_size=32, out="a", overrides=FAST, quiet=True)
    second = build(tiny_model, "x86-64", calib=photos, input_size=32, out="b", overrides=FAST, quiet=True)
    assert first.report["cache"]["hits"] == 0 and second.report["cache"]["hits"] == 2
    assert first.report["top1_agreement"] == second.report["top1_agreement"]


def test_cli_state_dict_with_labels_fp16(capsys, mobilenet_v3_pth: Path, photos: Path, labelled: Path) -> None:
    code, out, err = _run(capsys, "build", str(mobilenet_v3_pth), "--arch", "mobilenet_v3_small", "--input-size",
                          "64", "--target", "jetson", "--calib", str(photos), "--eval", str(labelled),
                          "--precision", "fp16", "--runs", "5", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["model"]["num_classes"] == 4 and report["accuracy"]["label_source"] == "class folders (sorted names)"
    assert report["top1_drop_pt"] is not None and report["accuracy"]["eval_images"] == 9
    gate = next(g for g in report["gates"] if g["name"] == "max_top1_drop_pt")
    assert gate["status"] == ("passed" if report["top1_drop_pt"] <= gate["limit"] else "failed")
    assert "✓ verify" in err


def test_failed_gate_exits_1_and_keeps_the_report(capsys, tiny_model, photos: Path, tmp_path: Path) -> None:
    path = tmp_path / "tiny.onnx"
    onnx.save(export_onnx(tiny_model, (1, 3, 32, 32), 17), str(path))
    code, _, err = _run(capsys, "build", str(path), "--target", "x86-64", "--calib", str(photos),
                        "--max-size-mb", "0.001", "--runs", "3", "--out", "gated", "-q")
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("edgekit: gate failed: max_size_mb")
    report = json.loads(Path("gated/report.json").read_text())
    assert report["status"] == "gate_failed"
    assert next(g for g in report["gates"] if g["name"] == "max_size_mb")["status"] == "failed"


def _leftovers() -> list[str]:
    return [p.name for p in Path(".").iterdir() if p.name.startswith(".") or p.name in ("dist", "out")]


@pytest.mark.parametrize("case", ["missing", "corrupt", "wrong_arch", "empty_calib", "unknown_target", "pickle",
                                  "jetson_tflite", "bad_flag"])
def test_bad_input_exits_2_with_one_line(capsys, case: str, mobilenet_v3_pth: Path, photos: Path,
                                         tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 truncated zip")
    pickled = tmp_path / "full_model.pth"
    torch.save(torch.nn.Linear(2, 2), pickled)  # a whole pickled module, not a state dict
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    model, target, extra = str(mobilenet_v3_pth), "x86-64", ["--arch", "mobilenet_v3_small"]
    expected = {
        "missing": "model file not found", "corrupt": "not a readable torch checkpoint",
        "wrong_arch": "does not fit --arch resnet18", "empty_calib": "holds no images",
        "unknown_target": "did you mean jetson", "pickle": "holds Python objects, not plain weights",
        "jetson_tflite": "jetson-orin-nano does not run tflite models (it takes: onnx)",
        "bad_flag": "invalid choice: 'int3'",
    }[case]
    if case == "missing":
        model = str(tmp_path / "nope.pth")
    elif case == "corrupt":
        model = str(corrupt)
    elif case == "wrong_arch":
        extra = ["--arch", "resnet18"]
    elif case == "empty_calib":
        extra += ["--calib", str(empty)]
    elif case == "unknown_target":
        target = "jetsn"
    elif case == "pickle":
        model = str(pickled)
    elif case == "jetson_tflite":
        target, extra = "jetson", [*extra, "--format", "tflite"]
    elif case == "bad_flag":
        extra += ["--precision", "int3"]
    code, out, err = _run(capsys, "build", model, "--target", target, "--calib", str(photos), *extra)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("edgekit: ") and expected in last
    assert "Traceback" not in err and out == ""
    assert _leftovers() == []


def test_stage_failure_exits_3_and_leaves_nothing(capsys, photos: Path) -> None:
    class Unexportable(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.linalg.eig(x.mean(1))[0].real  # no ONNX symbolic for eig

    from edgekit.errors import StageError

    with pytest.raises(StageError, match="ONNX export failed at opset 17"):
        build(Unexportable(), "x86-64", calib=photos, input_size=8, out="broken", overrides=FAST, quiet=True)
    assert _leftovers() == []


def test_targets_and_inspect_commands(capsys, mobilenet_v3_pth: Path) -> None:
    code, out, _ = _run(capsys, "targets")
    assert code == 0 and "jetson-orin-nano" in out and "cortex-m55-ethos-u55" in out
    code, out, _ = _run(capsys, "targets", "--json")
    assert {t["name"] for t in json.loads(out)} >= {"coral-edgetpu", "snapdragon-8-gen-3"}
    code, out, _ = _run(capsys, "inspect", str(mobilenet_v3_pth), "--arch", "mobilenet_v3_small", "--top", "5")
    assert code == 0 and "M MACs" in out and "Conv" in out and "more layers" in out
    code, out, _ = _run(capsys, "inspect", str(mobilenet_v3_pth), "--arch", "mobilenet_v3_small", "--json")
    analysis = json.loads(out)
    assert analysis["params"] == pytest.approx(1.52e6, rel=0.02) and analysis["macs"] > 5e7
    assert sum(layer["macs"] for layer in analysis["layers"]) == analysis["macs"]


def test_graph_the_runtime_cannot_load_exits_3(capsys, photos: Path, tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    node = helper.make_node("Frobnicate", ["input"], ["output"], domain="com.example")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3])])
    path = tmp_path / "custom.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.example", 1)]), str(path))
    code, out, err = _run(capsys, "build", str(path), "--target", "x86-64", "--calib", str(photos), "-q")
    assert code == 3 and out == ""
    assert err.strip() == ("edgekit: onnxruntime cannot load the artifact: [ONNXRuntimeError] : 1 : FAIL : "
                           "Fatal error: com.example:Frobnicate(-1) is not a registered function/op")
    assert _leftovers() == []


def test_out_folder_rules(capsys, tiny_model: torch.nn.Module, photos: Path, tmp_path: Path) -> None:
    def build_into(out: str | Path) -> Path:
        return build(tiny_model, "x86-64", calib=photos, input_size=32, out=out, overrides=FAST, quiet=True).out

    mine = Path("mine")
    mine.mkdir()
    (mine / "thesis.txt").write_text("do not delete")
    (mine / "manifest.json").write_text("{}")  # looks like an artifact folder, but edgekit never marked it
    with pytest.raises(UsageError, match="mine exists and is not an edgekit artifact folder"):
        build_into(mine)
    assert (mine / "thesis.txt").read_text() == "do not delete"
    first = build_into("again")
    second = build_into("again")  # a rebuild replaces the folder edgekit wrote
    assert (second / "model.onnx").is_file() and json.loads((second / ".edgekit").read_text())["files"] == [
        "manifest.json", "model.onnx", "recipe.toml", "report.html", "report.json"]
    (first / "notes.txt").write_text("the user's, written into the artifact folder")
    with pytest.raises(UsageError, match=r"again exists and holds files edgekit did not write \(notes.txt\)"):
        build_into("again")
    assert (first / "notes.txt").is_file() and (first / "model.onnx").is_file()
    (first / "notes.txt").unlink()
    # a build killed mid-way left its staging folder; its process is gone, so the next build removes it
    stale = Path(".again.partial-999999999")
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"half")
    build_into("again")
    assert not stale.exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for unwritable in ("/proc/edgekit-out", blocker / "out"):
        with pytest.raises(UsageError, match=f"cannot write the artifact folder {unwritable}"):
            build_into(unwritable)


def test_jetson_build_carries_the_trtexec_command(tiny_model: torch.nn.Module, photos: Path) -> None:
    result = build(tiny_model, "jetson-orin-nano", calib=photos, input_size=32, precision="fp16", out="out",
                   overrides=FAST, quiet=True)
    command = result.report["deploy"]["command"]
    assert command == "trtexec --onnx=model.onnx --fp16 --saveEngine=model.engine"
    assert json.loads((result.out / "manifest.json").read_text())["deploy"]["command"] == command
