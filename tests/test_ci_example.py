"""The app-CI example (examples/ci/): the workflow parses and runs the script, and the script's steps pass (and
fail on a gate) when run locally, with edgekit's exit code and a one-line summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
import yaml

from edgekit.passes.export import export_onnx
from edgekit.targets import load_target

CI = Path(__file__).resolve().parents[1] / "examples" / "ci"
EDGEKIT = Path(sys.executable).parent / "edgekit"


def test_workflow_builds_each_target_with_the_script() -> None:
    workflow = yaml.safe_load((CI / "github-actions.yml").read_text())
    job = workflow["jobs"]["build"]
    for target in job["strategy"]["matrix"]["target"]:
        assert load_target(target).name == target  # every device the job builds for is a profile edgekit has
    runs = [step["run"] for step in job["steps"] if "run" in step]
    assert "bash examples/ci/build-model.sh ${{ matrix.target }}" in runs
    assert job["env"]["EFFORT"].endswith("&& 'fast' || 'default' }}")  # pull requests build fast, pushes in full
    uploads = [step for step in job["steps"] if step.get("uses", "").startswith("actions/upload-artifact")]
    assert job["env"]["OUT"] == "dist" and uploads and uploads[0]["with"]["path"] == "dist/${{ matrix.target }}/"


@pytest.fixture
def tiny_onnx(tiny_model: torch.nn.Module, tmp_path: Path) -> Path:
    path = tmp_path / "classifier.onnx"
    onnx.save(export_onnx(tiny_model, (1, 3, 32, 32), 17), str(path))
    return path


def _script(target: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(CI / "build-model.sh"), target], capture_output=True, text=True,
                          env={**os.environ, "EDGEKIT": str(EDGEKIT), **env}, timeout=600)


def test_script_passes_and_writes_the_job_summary(tiny_onnx: Path, photos: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[verify]\nruns = 3\n")
    summary = tmp_path / "summary.md"
    done = _script("x86-64", {"MODEL": str(tiny_onnx), "CALIB": str(photos), "EVAL": str(photos),
                              "RECIPE": str(recipe), "PRECISION": "fp32", "EFFORT": "fast",
                              "GITHUB_STEP_SUMMARY": str(summary)})
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("x86-64: built and verified | dist/x86-64/model.onnx  fp32")
    assert summary.read_text() == f"- {line}\n"
    origins = json.loads((tmp_path / "dist" / "x86-64" / "manifest.json").read_text())["origins"]
    assert origins["quantize.sensitivity_images"] == "effort fast" and origins["verify.runs"] == "recipe file"


def test_script_fails_the_job_on_a_gate(tiny_onnx: Path, photos: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[verify]\nruns = 3\n[gates]\nmax_size_mb = 0.0001\n")
    done = _script("x86-64", {"MODEL": str(tiny_onnx), "CALIB": str(photos), "RECIPE": str(recipe),
                              "PRECISION": "fp32"})
    assert done.returncode == 1
    assert "x86-64: a gate failed: edgekit: gate failed: max_size_mb" in done.stdout


def test_script_reports_bad_input_with_exit_2(tmp_path: Path) -> None:
    done = _script("x86-64", {"MODEL": str(tmp_path / "missing.pth")})
    assert done.returncode == 2
    assert done.stdout.startswith("x86-64: failed (exit 2): edgekit: ")
