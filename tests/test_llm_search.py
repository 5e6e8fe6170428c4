"""Language models built to a budget: the weight-level database, its costs against real exports, and the build."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edgekit.api import build
from edgekit.errors import UsageError
from edgekit.families.llm_adapter import _costs, quantize_lm
from edgekit.passes.export_llm import export_lm
from edgekit.passes.sequential import WeightScheme
from edgekit.passes.weight_levels import (
    LanguageModelSpace,
    WeightLevel,
    graph_shares,
    kl_to_original,
    level_database,
    variants,
)
from edgekit.progress import Progress
from edgekit.search import BudgetUnreachable
from edgekit.search.evolve import cost

from .conftest import VOCAB, TinyNet, tiny_llama

TEXT = {"text.calib_windows": 6, "text.calib_length": 32, "text.eval_windows": 2, "text.eval_length": 32,
        "text.prompts": 1, "text.prompt_length": 8, "text.new_tokens": 4, "weights.group_size": 32,
        "search.weight_levels": ["int8", "int4+eora4", "int4"], "search.generations": 4, "search.offspring": 4,
        "search.images": 4}


def test_a_stitched_configuration_costs_what_its_export_takes() -> None:
    """Units' bytes, kernels and parameters measured in one export per level add up to any mixed configuration's:
    the predicted file size and latency (a device model linear in what it reads) are the export's, exactly."""
    model = tiny_llama()
    calibration = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    levels = [WeightLevel.parse(label) for label in ("int8", "int4+eora8", "int4")]
    scheme = WeightScheme(4, 32, rank_bits=8)
    arrays = level_database(model, calibration, levels, scheme, Progress(quiet=True))
    hidden = torch.from_numpy(arrays["hidden"])
    space = LanguageModelSpace(model, copy.deepcopy(model), variants(model, arrays, levels, scheme),
                               [level.label for level in levels], calibration[:2], hidden[:2], "test")
    units = len(space.found)

    def exported(config: tuple[int, ...]) -> tuple[Any, dict[str, int]]:
        graph = export_lm(space.stitch(config), 17)
        return graph, _costs(graph, space.working)

    def decode_ms(analysis: dict[str, Any]) -> float:  # any device model linear in what it reads
        return analysis["weight_bytes"] * 1e-6 + analysis["nodes"] * 1e-3 + analysis["params"] * 1e-5

    first = exported((0,) * units)
    space.set_costs([graph_shares(exported((level,) * units)[0], units) for level in range(len(levels))],
                    first[1], decode_ms)
    rng = np.random.default_rng(0)
    configs = [tuple(int(v) for v in rng.integers(0, len(levels), units)) for _ in range(3)]
    for config in [(2, 0, 1, 0), *configs]:
        graph, analysis = exported(config)
        predicted = cost(space, config)
        assert predicted.bytes == graph.ByteSize(), config
        assert predicted.latency_ms == pytest.approx(decode_ms(analysis), rel=1e-9), config
    int8, eora = (space.stitch((level,) * units).get_submodule("model.layers.0.mlp.down_proj") for level in (0, 1))
    assert int8.edgekit_quantized.bits == 8 and eora.base.edgekit_quantized.bits == 4 and eora.a.weight.shape[0] == 8
    # fitness runs block by block from the outputs kept for the levels upstream: as a full forward pass computes it
    configs = [(0, 0, 0, 0), (0, 0, 2, 1), (0, 0, 2, 2), (1, 0, 2, 2), (0, 0, 2, 1)]
    remembered = [space.fitness(config, samples) for config in configs for samples in (1, 2)]
    assert space.kept.hits > 0 and space.wanted.hits > 0
    assert remembered == pytest.approx([kl_to_original(model, space.stitch(c), calibration[:n], hidden[:n])
                                        for c in configs for n in (1, 2)], rel=1e-4, abs=1e-7)
    # requantized block by block at a mixed configuration's levels: other codes, the same layers and bytes
    mixed = (0, 1, 1, 2)
    sequential = copy.deepcopy(model)
    records = quantize_lm(sequential, calibration, scheme, None, None, Progress(quiet=True),
                          per_layer=space.schemes(mixed, scheme))["layers"]
    assert [(r["block"], r["bits"], r["eora_rank"]) for r in records if r["layer"] == "mlp.down_proj"] == [
        (0, 4, 8), (1, 4, 0)]
    assert export_lm(sequential, 17).ByteSize() == cost(space, mixed).bytes
    assert not torch.equal(sequential.get_submodule("model.layers.1.mlp.down_proj").weight,
                           space.stitch(mixed).get_submodule("model.layers.1.mlp.down_proj").weight)


def _cheapest_bytes(folder: Path) -> float:
    with pytest.raises(BudgetUnreachable) as raised:
        build(folder, "android-arm64", quiet=True, overrides={**TEXT, "search.budget": "bytes=1kB"})
    assert raised.value.exit_code == 1
    return raised.value.closest.bytes


def test_budget_build_keeps_every_candidate_and_the_artifact_within_the_budget(
        tiny_lm_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    limit = int(1.12 * _cheapest_bytes(tiny_lm_folder))  # between every unit at int4 and every unit at int8
    scored: list[tuple[int, ...]] = []
    fitness = LanguageModelSpace.fitness

    def recorded(space: LanguageModelSpace, config: tuple[int, ...], samples: int) -> float:
        assert cost(space, config).bytes <= limit
        scored.append(config)
        return fitness(space, config, samples)

    monkeypatch.setattr(LanguageModelSpace, "fitness", recorded)
    overrides = {**TEXT, "search.budget": f"bytes={limit}B"}
    result = build(tiny_lm_folder, "android-arm64", quiet=True, overrides=overrides)
    report = result.report
    search = report["search"]
    assert len(scored) == search["evaluations"] > 1 and len(set(scored)) == search["candidates"]
    assert report["size_bytes"] == search["chosen"]["bytes"] <= limit
    assert {unit["level"] for unit in search["units"]} <= {"int8", "int4+eora4", "int4"}
    assert [unit["level"] for unit in search["units"]] == search["chosen"]["levels"]
    assert len({unit["level"] for unit in search["units"]}) > 1  # a mix: no uniform level is this size
    assert search["uniform"]["level"] == "int4" and search["chosen"]["fitness"] <= search["uniform"]["fitness"]
    assert search["chosen"] in search["front"] and all(point["bytes"] <= limit for point in search["front"])
    refit = search["refit"]  # the chosen levels requantized block by block, kept if closer on unread windows
    assert refit["windows"] == 2 and refit["kept"] == (refit["kl_requantized"] < refit["kl_stitched"])
    assert set(search) >= {"budget", "chosen", "front", "uniform", "seconds", "candidates"}
    bits = {(row["block"], row["layer"]): row["bits"] for row in report["quantization"]["layers"]
            if row["block"] is not None}
    for index, unit in enumerate(search["units"]):
        group = "self_attn" if unit["name"].endswith("self_attn") else "mlp"
        assert {b for (block, layer), b in bits.items() if block == index // 2 and layer.startswith(group)} == {
            8 if unit["level"] == "int8" else 4}
    gate = next(g for g in report["gates"] if g["name"] == "max_size_mb")
    assert gate["limit"] == limit / 1e6 and gate["status"] == "passed"
    assert report["artifact"]["precision"] == "int8/int4+eora4/int4"
    assert report["accuracy"]["ppl_ratio"] < 1.1  # the artifact runs in onnxruntime and is close to the original
    again = build(tiny_lm_folder, "android-arm64", quiet=True, overrides=overrides, use_cache=False,
                  out=result.out.parent / "again", ray="local")
    # the same seed, the same bytes, with the candidates scored on Ray actors (a Ray started for the search)
    assert again.report["artifact"]["sha256"] == report["artifact"]["sha256"]
    assert again.report["search"]["chosen"] == search["chosen"]


def test_an_unreachable_throughput_exits_1_naming_the_closest(tiny_lm_folder: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from edgekit.cli import main

    recipe = tmp_path / "search.toml"
    recipe.write_text("[text]\n" + "".join(f"{key.split('.')[1]} = {json.dumps(value)}\n"
                                           for key, value in TEXT.items() if key.startswith("text."))
                      + "[weights]\ngroup_size = 32\n[search]\nweight_levels = ['int8', 'int4']\n")
    code = main(["build", str(tiny_lm_folder), "--target", "android-arm64", "--recipe", str(recipe), "-q",
                 "--budget", "tokens_per_s=1e6"])  # the device model's decode: about 1,400 tokens/s
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bar
    assert code == 1
    assert err.startswith("edgekit: no configuration meets the budget tokens_per_s=1e6: the closest")
    assert err.endswith(" tokens/s (estimated: android-arm64)")
    assert not (Path("dist") / "tiny-llama-android-arm64").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"prune.ratio": 0.2}, "prune.* and search.budget"),
    ({"prune.blocks": 1}, "prune.* and search.budget"),
    ({"search.weight_levels": ["int4", "int8"]}, "least compressed first"),
    ({"search.weight_levels": ["int8", "int3"]}, "'int3' is not a weight level"),
    ({"lowrank.rank": 8}, "EoRA ranks are levels"),
    ({"quantize.precision": "fp16"}, "precision fp16 does not apply"),
    ({"search.budget": "macs=1G"}, "language models take bytes="),
    ({"distill.steps": 5}, "distillation recovers what pruning lost"),
])
def test_budget_usage_errors(tiny_lm_folder: Path, overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("*", r"\*")):
        build(tiny_lm_folder, "android-arm64", quiet=True,
              overrides={**TEXT, "search.budget": "bytes=1MB", **overrides})


def test_a_bytes_budget_is_refused_for_an_openvino_ir(tiny_lm_folder: Path) -> None:
    """Unit bytes are measured in the ONNX graph; the IR widens the group scales, so its bytes would miss."""
    with pytest.raises(UsageError, match="OpenVINO's IR stores the group scales wider"):
        build(tiny_lm_folder, "x86-64", format="openvino", quiet=True, overrides={**TEXT, "search.budget": "bytes=1MB"})


def test_search_keys_are_refused_where_they_do_not_apply(tiny_lm_folder: Path) -> None:
    with pytest.raises(UsageError, match="search.weight_levels does not apply to classifier models"):
        build(TinyNet(), "x86-64", quiet=True, overrides={"search.weight_levels": ["int8", "int4"]})
    with pytest.raises(UsageError, match="prune.images does not apply to llm models"):
        build(tiny_lm_folder, "android-arm64", quiet=True, overrides={"search.budget": "bytes=1MB", "prune.images": 4})
