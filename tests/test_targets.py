from __future__ import annotations

from pathlib import Path

import pytest

from edgekit.errors import UsageError
from edgekit.resources import resource_dir
from edgekit.targets import builtin_targets, load_target, load_target_file

REQUIRED = {"jetson-orin-nano", "jetson-agx-orin", "raspberry-pi-5", "coral-edgetpu", "android-arm64",
            "snapdragon-8-gen-3", "x86-64", "cortex-m55-ethos-u55", "ios-arm64"}


def test_builtin_profiles_cover_the_required_devices_and_each_number_has_a_source() -> None:
    targets = {t.name: t for t in builtin_targets()}
    assert REQUIRED <= set(targets)
    for target in targets.values():
        numbers = target.device_numbers()
        assert "compute.cores" in numbers and "memory.bandwidth_gbps" in numbers
        assert all(target.sources[key].strip() for key in numbers), target.name
        assert target.runtimes and target.runtimes[0].precisions


def test_alias_and_suggestion() -> None:
    assert load_target("jetson").name == "jetson-orin-nano"
    with pytest.raises(UsageError, match="did you mean raspberry-pi-5"):
        load_target("raspbery-pi-5")


def _profile(tmp_path: Path, edit: tuple[str, str] | None = None) -> Path:
    text = (resource_dir("targets") / "raspberry-pi-5.toml").read_text()
    if edit:
        assert edit[0] in text
        text = text.replace(*edit)
    path = tmp_path / "board.toml"
    path.write_text(text.replace('name = "raspberry-pi-5"', 'name = "my-board"'))
    return path


def test_user_profile_by_path(tmp_path: Path) -> None:
    target = load_target(str(_profile(tmp_path)))
    assert target.name == "my-board" and len(target.sha256) == 64


@pytest.mark.parametrize(("edit", "expected"), [
    (("fp32_gflops = 153.6", 'fp32_gflops = "fast"'), r"board\.toml: compute\.fp32_gflops: .*valid number.*'fast'"),
    (("bandwidth_gbps = 17.1", "bandwith_gbps = 17.1"),
     r"board\.toml: .*memory\.bandwith_gbps: extra inputs are not permitted"),
    (('"memory.ram_mb" = "product brief: 8 GB variant"\n', ""),
     r"board\.toml: .*no entry in \[sources\] for memory\.ram_mb"),
    (('format = "onnx"\nopset', 'format = "pt"\nopset'),
     r"board\.toml: runtimes\.1\.format: input should be 'onnx', 'tflite', 'gguf', 'openvino' or 'pte'"),
    (("cores = 4", "cores = 0"), r"board\.toml: compute\.cores: input should be greater than 0"),
    (('name = "litert"', 'name = "litrt"'), r"board\.toml: runtimes\.0\.name: unknown runtime 'litrt' \(known: "),
    (('name = "onnxruntime"\nformat = "onnx"', 'name = "onnxruntime"\nformat = "tflite"'),
     r"board\.toml: runtimes\.1\.format: onnxruntime takes onnx models, not tflite"),
    (("fp16_gflops = 307.2\n", ""),
     r"board\.toml: compute\.fp16_gflops is missing: runtimes\.0 \(litert\) runs fp16, so the device model"),
])
def test_schema_errors_name_file_key_and_expectation(tmp_path: Path, edit: tuple[str, str], expected: str) -> None:
    with pytest.raises(UsageError, match=expected):
        load_target_file(_profile(tmp_path, edit))


def test_broken_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [")
    with pytest.raises(UsageError, match="bad.toml: not valid TOML"):
        load_target(str(bad))
    with pytest.raises(UsageError, match="target file not found"):
        load_target(str(tmp_path / "none.toml"))
    folder = tmp_path / "folder.toml"
    folder.mkdir()
    with pytest.raises(UsageError, match=r"folder\.toml: cannot read the target file \(Is a directory\)"):
        load_target(str(folder))
    bad.write_text("a = " + "[" * 5000 + "]" * 5000)
    with pytest.raises(UsageError, match=r"bad\.toml: not valid TOML \(arrays or tables nested too deeply\)"):
        load_target(str(bad))
