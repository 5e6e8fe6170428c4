from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from edgekit.errors import UsageError
from edgekit.families import FAMILIES
from edgekit.recipe import Recipe, load_recipe, resolve, with_overrides
from edgekit.targets import load_target

CLASSIFIER = FAMILIES["classifier"]


def test_defaults_come_from_family_and_target() -> None:
    jetson = resolve(Recipe(), load_target("jetson"), CLASSIFIER)
    assert (jetson.quantize.precision, jetson.export.format, jetson.export.opset) == ("fp16", "onnx", 17)
    assert jetson.verify.threads == 6
    assert jetson.gates.max_top1_drop_pt == 1.0
    pi = resolve(Recipe(), load_target("raspberry-pi-5"), CLASSIFIER)
    assert pi.quantize.precision == "fp32" and pi.verify.threads == 4


def test_file_then_flags_override(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text('[quantize]\nprecision = "fp32"\n[gates]\nmax_size_mb = 3.5\n[verify]\nruns = 7\n')
    recipe = with_overrides(load_recipe(path), {"verify.runs": 9, "gates.max_top1_drop_pt": None, "seed": 3})
    plan = resolve(recipe, load_target("jetson"), CLASSIFIER)
    assert plan.quantize.precision == "fp32"  # the file beats the target default
    assert plan.verify.runs == 9 and plan.seed == 3  # flags beat the file
    assert plan.gates.max_size_mb == 3.5 and plan.gates.min_top1_agreement == 0.95  # target budget fills the rest
    assert tomllib.loads(plan.to_toml())["quantize"]["precision"] == "fp32"


def test_bad_recipe_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text("[verify]\nrunz = 3\n")
    with pytest.raises(UsageError, match=r"r\.toml: verify\.runz: extra inputs"):
        load_recipe(path)
    path.write_text('[quantize]\nprecision = "int3"\n')
    with pytest.raises(UsageError, match=r"quantize\.precision: input should be 'fp32', 'fp16', 'int8' or 'int4'"):
        load_recipe(path)


def test_refuses_what_this_build_cannot_produce() -> None:
    with pytest.raises(UsageError, match=r"coral-edgetpu does not run onnx models \(it takes: tflite\)"):
        resolve(with_overrides(Recipe(), {"export.format": "onnx"}), load_target("coral"), CLASSIFIER)
    with pytest.raises(UsageError, match="dynamic-range int8 is a TFLite precision"):
        resolve(with_overrides(Recipe(), {"quantize.int8_mode": "dynamic"}), load_target("x86-64"), CLASSIFIER)
    with pytest.raises(UsageError, match="x86-64 does not run tflite"):
        resolve(with_overrides(Recipe(), {"export.format": "tflite"}), load_target("x86-64"), CLASSIFIER)
    with pytest.raises(UsageError, match="TFLite int8 calibrates with mse, mean-minmax, minmax, not entropy"):
        resolve(with_overrides(Recipe(), {"quantize.precision": "int8", "quantize.calibration": "entropy"}),
                load_target("coral"), CLASSIFIER)


def test_int8_activation_form_follows_the_target_runtime() -> None:
    int8 = with_overrides(Recipe(), {"quantize.precision": "int8"})
    assert resolve(int8, load_target("jetson"), CLASSIFIER).quantize.activations == "int8-symmetric"
    assert resolve(int8, load_target("raspberry-pi-5"), CLASSIFIER).quantize.activations == "uint8"
    mine = with_overrides(int8, {"quantize.activations": "int8-symmetric"})
    assert resolve(mine, load_target("x86-64"), CLASSIFIER).quantize.activations == "int8-symmetric"


def test_int8_weights_guard_int16_pairs_on_x86_runtimes_only() -> None:
    int8 = with_overrides(Recipe(), {"quantize.precision": "int8"})
    openvino = with_overrides(int8, {"export.format": "openvino"})
    assert resolve(int8, load_target("x86-64"), CLASSIFIER).quantize.seven_bit_weights == "saturating"
    assert resolve(openvino, load_target("intel-n100"), CLASSIFIER).quantize.seven_bit_weights == "saturating"
    assert resolve(openvino, load_target("raspberry-pi-5"), CLASSIFIER).quantize.seven_bit_weights == "none"  # Arm
    assert resolve(int8, load_target("jetson"), CLASSIFIER).quantize.seven_bit_weights == "none"
    mine = with_overrides(int8, {"quantize.seven_bit_weights": "all"})
    assert resolve(mine, load_target("x86-64"), CLASSIFIER).quantize.seven_bit_weights == "all"


def test_family_defaults_fill_only_what_the_recipe_leaves_unset(tmp_path) -> None:
    from edgekit.recipe import load_recipe, with_defaults

    path = tmp_path / "r.toml"
    path.write_text("[quantize]\ncalib_limit = 16\n")
    recipe = with_defaults(load_recipe(path), {"quantize.calib_limit": 64, "quantize.bias_correction": False})
    assert recipe.quantize.calib_limit == 16 and recipe.quantize.bias_correction is False


def test_an_effort_sets_what_its_family_reads_under_the_recipe_file_and_flags(tmp_path: Path) -> None:
    from edgekit.recipe import plan

    path = tmp_path / "r.toml"
    path.write_text("[quantize]\nrange_sweeps = 2\n")
    pi = load_target("raspberry-pi-5")
    fast, origins, _ = plan(CLASSIFIER, pi, path, {"search.generations": 4}, "fast")
    assert (fast.quantize.range_sweeps, origins["quantize.range_sweeps"]) == (2, "recipe file")
    assert (fast.search.generations, origins["search.generations"]) == (4, "flag")
    assert (fast.quantize.refit, origins["quantize.refit"]) == (False, "effort fast")
    assert (fast.search.seconds, fast.quantize.sensitivity_images) == (180, 8)
    assert plan(CLASSIFIER, pi, None, {})[0].quantize.refit  # the default effort changes nothing
    lm, lm_origins, _ = plan(FAMILIES["llm"], load_target("android-arm64"), None, {}, "fast")
    assert lm.weights.method == "rtn" and "quantize.range_sweeps" not in {  # not a language model's key: not set
        key for key, origin in lm_origins.items() if origin.startswith("effort")}
    assert plan(CLASSIFIER, pi, None, {}, "max")[0].quantize.range_sweeps == 6
    with pytest.raises(UsageError, match="effort 'quick' is not one of fast, default, max"):
        plan(CLASSIFIER, pi, None, {}, "quick")
