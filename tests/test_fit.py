"""The device model held to published measurements: the fit, the measurement tables, the command."""

from __future__ import annotations

import dataclasses

import pytest

from edgekit.cli import main
from edgekit.passes.analyze import Analysis, LayerStats
from edgekit.resources import resource_dir
from edgekit.targets import HeldToPublished, builtin_targets, load_target, load_target_file
from edgekit.verify.estimate import estimate
from edgekit.verify.fit import (
    MODELS,
    _module,
    fit,
    parameters,
    read_measurements,
    record_published,
    with_values,
    write_fit,
)


def _graph(*layers: LayerStats) -> Analysis:
    return Analysis(params=0, macs=sum(layer.macs for layer in layers), weight_bytes=0, activation_bytes=0,
                    activation_peak_bytes=0, layers=list(layers))


def _layer(op_class: str, macs: int = 0, weight_bytes: int = 0, activation_bytes: int = 0,
           precision: str = "fp32") -> LayerStats:
    return LayerStats(name=op_class, op="Op", macs=macs, params=0, output_shape=[1, 8, 8, 8], op_class=op_class,
                      weight_bytes=weight_bytes, activation_bytes=activation_bytes, precision=precision)


def test_fit_recovers_the_efficiencies_that_made_the_measurements() -> None:
    """Measurements made by the estimator with known numbers: the fit, started from other numbers, finds them."""
    target = load_target("jetson-agx-orin")
    graphs = [
        _graph(_layer("conv", macs=4_000_000_000)),  # compute-bound dense conv
        _graph(_layer("depthwise", macs=200_000_000)),  # compute-bound depthwise
        _graph(*[_layer("elementwise") for _ in range(400)]),  # nothing but per-op overhead
        _graph(_layer("conv", macs=1000, weight_bytes=300_000_000)),  # weight streaming: memory efficiency
        _graph(_layer("elementwise", activation_bytes=200_000_000)),  # bandwidth times elementwise efficiency
        _graph(_layer("conv", macs=2_000_000_000), *[_layer("elementwise") for _ in range(50)]),
    ]
    truth = {"node_overhead_us": 12.0, "memory_efficiency": 0.35, "efficiency.conv": 0.2,
             "efficiency.depthwise": 0.03, "efficiency.elementwise": 0.7}
    published = [estimate(graph, with_values(target, truth), top=0)["ms"] for graph in graphs]
    start = parameters(target, graphs)
    assert set(start) == set(truth) and all(abs(start[k] / truth[k] - 1) > 0.1 for k in truth)
    found = fit(target, graphs, published, start, prior_weight=1e-4)
    assert found == pytest.approx(truth, rel=0.02)


def test_a_per_inference_overhead_is_charged_once_and_fitted_where_the_profile_has_one() -> None:
    """A USB accelerator's round trip costs the same for a tiny graph and a large one: the estimate adds it once, and
    the fit tells it apart from the per-op overhead and the compute rate."""
    coral = load_target("coral-edgetpu")  # integer-only: every op int8

    def _int8(op_class: str, macs: int = 0) -> LayerStats:
        return _layer(op_class, macs, precision="int8")

    assert coral.latency is not None and coral.latency.invoke_overhead_us
    small = _graph(_int8("conv", macs=1_000_000))
    without = with_values(coral, {"invoke_overhead_us": 0.0})
    assert estimate(small, coral, top=0)["ms"] - estimate(small, without, top=0)["ms"] == pytest.approx(
        coral.latency.invoke_overhead_us / 1e3, abs=1e-4)
    graphs = [small, _graph(_int8("conv", macs=8_000_000_000)), _graph(*[_int8("elementwise") for _ in range(300)]),
              _graph(_int8("conv", macs=2_000_000_000), *[_int8("elementwise") for _ in range(40)])]
    truth = {"node_overhead_us": 5.0, "invoke_overhead_us": 2500.0, "memory_efficiency": 0.8, "efficiency.conv": 0.3,
             "efficiency.elementwise": 0.5}
    published = [estimate(graph, with_values(coral, truth), top=0)["ms"] for graph in graphs]
    start = parameters(coral, graphs)
    assert start.keys() == truth.keys() and "invoke_overhead_us" not in parameters(load_target("x86-64"), graphs)
    found = fit(coral, graphs, published, start, prior_weight=1e-4)
    assert {k: found[k] for k in truth if k != "memory_efficiency"} == pytest.approx(
        {k: v for k, v in truth.items() if k != "memory_efficiency"}, rel=0.03)


def test_rows_in_two_engines_of_one_device_fit_a_speed_factor_for_the_less_measured() -> None:
    """On a Raspberry Pi 5 the same graph ran 2x apart in onnxruntime and TF Lite: the estimate takes the runtime of
    the graph's format, and the fit gives the engine with fewer rows a factor relative to the other."""
    pi = load_target("raspberry-pi-5")
    conv = _layer("conv", macs=3_000_000_000)
    graphs = [dataclasses.replace(_graph(conv), format=fmt) for fmt in ("tflite", "tflite", "onnx")]
    graphs[1] = dataclasses.replace(graphs[1], layers=[_layer("conv", macs=9_000_000_000)])
    truth = {"efficiency.conv": 0.3, "runtime_efficiency.onnxruntime": 2.0}
    published = [estimate(graph, with_values(pi, truth), top=0)["ms"] for graph in graphs]
    assert published[0] == pytest.approx(2 * published[2], rel=0.01)  # the same graph, twice as fast in onnxruntime
    start = parameters(pi, graphs)
    assert start["runtime_efficiency.onnxruntime"] == 1.0 and "runtime_efficiency.litert" not in start
    assert not any(key.startswith("runtime_efficiency") for key in parameters(pi, graphs[:2]))
    found = fit(pi, graphs, published, start, prior_weight=1e-4)
    assert {k: found[k] for k in truth} == pytest.approx(truth, rel=0.03)


def test_measurement_tables_name_buildable_models_and_links() -> None:
    tables = sorted((resource_dir("targets") / "measurements").glob("*.csv"))
    names = {target.name for target in builtin_targets()}
    assert tables and {table.stem for table in tables} <= names
    models = set()
    for table in tables:
        rows = read_measurements(table)
        assert all(row.model in MODELS and row.source.startswith("https://") and row.quote for row in rows)
        models |= {row.model for row in rows}
    for model in sorted(models):  # each builds here, offline, with random weights
        assert _module(model, 64) is not None


def test_fit_published_without_a_table_is_one_line_exit_2(capsys) -> None:
    assert main(["estimate", "--fit-published", "android-arm64"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1 and "no published measurements for android-arm64" in lines[0]


def test_a_written_fit_moves_the_numbers_and_records_how_far_to_trust_them(tmp_path, capsys) -> None:
    profile = tmp_path / "coral-edgetpu.toml"
    profile.write_text((resource_dir("targets") / "coral-edgetpu.toml").read_text())
    result = {"rows": [{}] * 5, "models": ["mobilenet_v2", "vgg16"], "file": "coral-edgetpu.csv",
              "current": {"node_overhead_us": 1.02, "invoke_overhead_us": 1980.0},
              "fitted": {"node_overhead_us": 1.02, "invoke_overhead_us": 2470.0},
              "median_error_before": 0.14, "median_error_after": 0.04, "held_out_median_error": 0.08}
    assert write_fit(profile, result) == ["invoke_overhead_us"]
    for _ in range(2):  # a second record replaces the first
        record_published(profile, result, written=True)
    target = load_target_file(profile)
    assert target.latency.invoke_overhead_us == 2470.0 and "fitted to 5 published rows" in target.sources[
        "latency.invoke_overhead_us"]
    assert target.published == HeldToPublished(rows=5, models=["mobilenet_v2", "vgg16"], median_error=0.04,
                                               held_out_median_error=0.08)
    assert profile.read_text().count("[published]") == 1
    record_published(profile, result, written=False)  # numbers left as they were: their own error
    assert load_target_file(profile).published.median_error == 0.14
    assert main(["targets"]) == 0
    shown = capsys.readouterr().out
    assert "coral-edgetpu" in shown and "held to" in shown
