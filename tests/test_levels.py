"""The level database of image models and budget builds: units pruned only inside, variants cached and stitched,
costs that add up to what the device model says of the artifact, budgets held end to end."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekit import build
from edgekit.cache import ArrayCache
from edgekit.cli import main
from edgekit.errors import UsageError
from edgekit.families.classifier import ClassifierFamily
from edgekit.passes.analyze import analyze
from edgekit.passes.export import export_onnx
from edgekit.passes.levels import ImageSpace, internal_keep, price_artifact, variants
from edgekit.recipe import Recipe, resolve
from edgekit.search import BudgetUnreachable
from edgekit.search.evolve import cost, uniform
from edgekit.targets import load_target
from edgekit.verify.estimate import estimate

from .conftest import PHOTOS, TinyBlocks, settle_batchnorm
from .test_report_html import assert_page

FAST = {"verify.runs": 3, "verify.warmup": 1, "search.generations": 4, "search.levels": [0.0, 0.25, 0.5]}
FAMILY = ClassifierFamily()


def _images(count: int = 12, size: int = 32) -> np.ndarray:
    from PIL import Image

    rows = [(np.asarray(Image.open(p).convert("RGB").resize((size, size)), np.float32).transpose(2, 0, 1) - 127) / 64
            for p in PHOTOS[:count]]
    return np.stack(rows).astype(np.float32)


def _space(model: torch.nn.Module, tmp_path: Path, target: str = "x86-64") -> tuple[ImageSpace, Recipe]:
    device = load_target(target)
    plan = resolve(Recipe(), device, ClassifierFamily())
    images = _images()
    units = FAMILY.search_units(model)
    found = variants(model, units, FAMILY.prune_keep(model), images[:8], [0.0, 0.25, 0.5],
                     ArrayCache(tmp_path / "cache"), {"kind": "test"}, progress=iter)
    space = ImageSpace(model, found, images[8:], FAMILY.distill_targets, FAMILY.search_distance,
                       lambda m: price_artifact(m, (1, 3, 32, 32), plan, device, FAMILY, images[:2]), device,
                       ArrayCache(tmp_path / "cache"), {"kind": "test-costs"})
    return space, plan


def test_only_channels_inside_a_unit_are_pruned(tiny_blocks: torch.nn.Module) -> None:
    from torchvision.models.mobilenetv2 import InvertedResidual

    residual, strided = tiny_blocks.features[3], tiny_blocks.features[4]
    example = torch.randn(1, 8, 16, 16)
    # the projection's outputs are the residual sum's (the block's input and output): they stay
    assert internal_keep(residual, example, []) == ["conv.2"]
    assert internal_keep(strided, example, []) == ["conv.2"]
    assert internal_keep(InvertedResidual(8, 8, 1, 1).eval(), example, []) is None  # no expansion: nothing inside
    assert internal_keep(residual, example, ["conv.0"]) is None  # the family keeps the expansion: nothing left
    fused = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.SiLU(inplace=True),
                                torch.nn.Conv2d(16, 8, 1))  # a fused Conv+SiLU, as YOLO checkpoints load
    assert internal_keep(fused, example, []) == ["2"] and fused[1].inplace


def test_stitched_variants_keep_every_unit_boundary_and_come_back_from_the_cache(tiny_blocks: torch.nn.Module,
                                                                               tmp_path: Path) -> None:
    original = copy.deepcopy(tiny_blocks)
    space, _ = _space(tiny_blocks, tmp_path)
    assert space.found.names == ["features.3", "features.4", "features.5"]
    x = torch.as_tensor(_images(4))
    with torch.no_grad():
        smallest = space.stitched(uniform(space, 2))(x)
        hidden = [row[2].conv[1][0].out_channels for row in space.found.modules]
    assert hidden == [24, 24, 48] and smallest.shape == (4, 5)
    assert all(torch.equal(a, b) for a, b in zip(tiny_blocks.state_dict().values(),
                                                 original.state_dict().values(), strict=True))  # not changed
    again, _ = _space(tiny_blocks, tmp_path)  # the variants and costs now come from the cache
    with torch.no_grad():
        assert torch.equal(again.stitched(uniform(again, 2))(x), smallest)
    assert again.base == space.base and again.units == space.units
    assert space.fitness((0, 0, 0), 4) == 0.0 < space.fitness((2, 2, 2), 4)


def test_kept_unit_outputs_give_the_fitness_a_full_pass_gives(tiny_blocks: torch.nn.Module, tmp_path: Path) -> None:
    space, _ = _space(tiny_blocks, tmp_path)
    assert space.memo.order == [0, 1, 2]  # the units in the order a forward pass runs them
    configs = [(0, 0, 0), (0, 0, 2), (0, 1, 2), (2, 1, 2), (0, 0, 1), (0, 1, 2)]
    remembered = [space.fitness(config, samples) for config in configs for samples in (3, 4)]
    assert space.memo.kept.hits > 0
    space.memo.order = []  # nothing kept: every unit runs
    assert remembered == pytest.approx([space.fitness(c, n) for c in configs for n in (3, 4)], rel=1e-6, abs=1e-9)
    assert not any(hasattr(module, "__dict__") and "forward" in module.__dict__
                   for row in space.found.modules for module in row)  # the units' own forward is back


@pytest.mark.parametrize("target", ["x86-64", "jetson-orin-nano"])
def test_configuration_costs_add_up_to_the_artifacts_estimate(tiny_blocks: torch.nn.Module, tmp_path: Path,
                                                              target: str) -> None:
    space, plan = _space(tiny_blocks, tmp_path, target)
    device = load_target(target)
    for config in [(2, 0, 1), (0, 2, 2), (1, 1, 0)]:
        analysis, size = price_artifact(space.stitched(config), (1, 3, 32, 32), plan, device, FAMILY, _images(2))
        predicted = cost(space, config)
        assert predicted.macs == analysis.macs
        assert predicted.latency_ms == pytest.approx(estimate(analysis, device)["ms"], abs=1e-4)  # its rounding
        assert predicted.bytes == pytest.approx(size, rel=0.01)


def test_budget_build_meets_a_macs_budget_and_reports_the_search(tiny_blocks: torch.nn.Module, photos: Path) -> None:
    full = analyze(export_onnx(tiny_blocks, (1, 3, 32, 32), 17)).macs
    limit = int(full * 0.75)
    result = build(tiny_blocks, "x86-64", calib=photos, input_size=32, out="out", quiet=True,
                   overrides={**FAST, "search.budget": f"macs={limit}"})
    assert result.exit_code == 0
    report = json.loads((Path("out") / "report.json").read_text())
    search = report["search"]
    assert report["analysis"]["artifact"]["macs"] == search["chosen"]["macs"] <= limit < full
    assert search["unpruned"]["macs"] == full and search["latency_label"] == "estimated: x86-64"
    assert [u["name"] for u in search["units"]] == ["features.3", "features.4", "features.5"]
    uniform = search["uniform"]
    assert uniform["macs"] <= limit and set(uniform["levels"]) == {uniform["level"]}
    assert search["chosen"]["fitness"] <= uniform["fitness"]
    every = search["uniform_levels"]  # each uniform configuration's costs, the least compressed first
    assert [e["level"] for e in every] == search["levels"] and every[0]["macs"] == full
    assert next(e for e in every if e["level"] == uniform["level"])["macs"] == uniform["macs"]
    assert all(a["macs"] >= b["macs"] for a, b in itertools.pairwise(every)) and every[-1]["macs"] < full
    assert search["front"] and all(p["macs"] <= limit for p in search["front"])
    assert [s["name"] for s in report["stages"]][:4] == ["load", "data", "levels", "search"]
    assert report["top1_agreement"] >= 0  # verified like any build
    again = build(tiny_blocks, "x86-64", calib=photos, input_size=32, out="again", quiet=True, use_cache=False,
                  overrides={**FAST, "search.budget": f"macs={limit}"})
    assert again.report["artifact"]["sha256"] == report["artifact"]["sha256"]  # recomputed: the same seed, same bytes
    assert_page(Path("out"))


def test_latency_budget_becomes_the_artifacts_latency_gate(tiny_blocks: torch.nn.Module, photos: Path) -> None:
    plain = build(tiny_blocks, "x86-64", calib=photos, input_size=32, out="plain", quiet=True, overrides=FAST)
    limit = round(plain.report["latency_ms"]["estimated_target"]["ms"] * 0.9, 5)
    result = build(tiny_blocks, "x86-64", calib=photos, input_size=32, out="out", quiet=True,
                   overrides={**FAST, "search.budget": f"latency={limit}ms", "gates.max_latency_ms": 10 * limit})
    gate = next(g for g in result.report["gates"] if g["name"] == "max_latency_ms")
    assert gate["limit"] == limit and gate["status"] == "passed" and gate["basis"] == "estimated: x86-64"  # the tighter
    assert result.report["latency_ms"]["estimated_target"]["ms"] == pytest.approx(
        result.report["search"]["chosen"]["latency_ms"], abs=1e-4)


def test_unreachable_budget_exits_1_naming_the_closest(capsys: pytest.CaptureFixture[str], photos: Path,
                                                       tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = settle_batchnorm(TinyBlocks(), 32)
    with pytest.raises(BudgetUnreachable, match=r"the closest .* is 0\.\d+ M MACs$"):
        build(model, "x86-64", calib=photos, input_size=32, quiet=True, overrides={**FAST, "search.budget": "macs=1K"})
    import torchvision

    torch.manual_seed(0)
    path = tmp_path / "small.pth"
    torch.save(settle_batchnorm(torchvision.models.mobilenet_v3_small(num_classes=3), 32).state_dict(), path)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[search]\nbudget = "latency=1us"\nlevels = [0.0, 0.5]\n[prune]\nimages = 4\n')
    code = main(["build", str(path), "--arch", "mobilenet_v3_small", "--input-size", "32", "--target", "x86-64",
                 "--calib", str(photos), "--recipe", str(recipe), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "no configuration meets the budget latency=1us" in err and "ms (estimated: x86-64)" in err
    assert not Path("dist").exists() or not any(Path("dist").iterdir())  # no artifact


@pytest.mark.parametrize("overrides, message", [
    ({"prune.ratio": 0.2, "search.budget": "macs=1M"}, r"prune.\* and search.budget"),
    ({"search.budget": "speed=3ms"}, "expected kind=value"),
    ({"search.budget": "latency=6"}, "with a unit"),
    ({"search.levels": [0.2, 0.4]}, "levels must start at 0"),
    ({"search.budget": "tokens_per_s=20"}, "image models take latency, size or macs"),
])
def test_bad_search_settings_are_usage_errors(tiny_blocks: torch.nn.Module, photos: Path, overrides: dict,
                                              message: str) -> None:
    with pytest.raises(UsageError, match=message) as raised:
        build(tiny_blocks, "x86-64", calib=photos, input_size=32, quiet=True, overrides=overrides)
    assert "\n" not in str(raised.value)


def test_bad_budget_in_a_recipe_names_the_file(capsys: pytest.CaptureFixture[str], tiny_blocks: torch.nn.Module,
                                              tmp_path: Path) -> None:
    recipe = tmp_path / "bad.toml"
    recipe.write_text('[search]\nbudget = "size=4"\n')
    onnx_path = tmp_path / "tiny.onnx"
    import onnx

    onnx.save(export_onnx(tiny_blocks, (1, 3, 32, 32), 17), str(onnx_path))
    code = main(["build", str(onnx_path), "--target", "x86-64", "--recipe", str(recipe)])
    err = capsys.readouterr().err
    assert code == 2 and str(recipe) in err and "size takes a number with a unit" in err
    code = main(["build", str(onnx_path), "--target", "x86-64", "--budget", "macs=1M"])
    assert code == 2 and "an ONNX input cannot be pruned" in capsys.readouterr().err


def test_detector_units_prune_only_their_hidden_channels(tmp_path: Path) -> None:
    from edgekit.families.base import LoadOptions
    from edgekit.families.detector import DetectorFamily

    from .test_detector import tiny_yaml

    family = DetectorFamily()
    model = family.load(tiny_yaml(tmp_path, "yolo11"), LoadOptions(input_size=64)).module
    units = family.search_units(model)
    assert [name for name, _ in units] == ["model.2", "model.4", "model.6", "model.8", "model.9", "model.13",
                                           "model.16", "model.19", "model.22", *[f"model.23.{b}.{i}" for b in
                                                                                ("cv2", "cv3") for i in range(3)]]
    images = np.random.default_rng(0).random((4, 3, 64, 64), dtype=np.float32)
    kinds = [units[0], units[4], units[-1]]  # a C3k2, the SPPF, a class branch of the head
    found = variants(model, kinds, family.prune_keep(model), images, [0.0, 0.5], ArrayCache(None), {}, progress=iter)
    assert found.names == ["model.2", "model.9", "model.23.cv3.2"]
    stitched = copy.deepcopy(model)
    for name, row in zip(found.names, found.modules, strict=True):
        stitched.set_submodule(name, row[1])
    x = torch.as_tensor(images[:2])
    with torch.no_grad():
        assert [t.shape for t in family.distill_targets(stitched, x)] == [
            t.shape for t in family.distill_targets(model, x)]
        assert stitched(x).shape == model(x).shape
    for name, _ in kinds:
        pruned = sum(p.numel() for p in stitched.get_submodule(name).parameters())
        assert pruned < sum(p.numel() for p in model.get_submodule(name).parameters())


def test_a_detector_budget_build_cuts_the_stream_then_searches_within_the_budget(tmp_path: Path, boxes: Path) -> None:
    """The detectors' default budget build end to end: the stream cut, the blocks' levels on the cut model, and an
    artifact within the budget, verified by mAP."""
    from edgekit.families.detector import _export_form

    from .test_detector import SIZE, settled_yolo

    model = settled_yolo("yolo11")
    full = analyze(export_onnx(_export_form(copy.deepcopy(model), SIZE), (1, 3, SIZE, SIZE), 17)).macs
    limit = int(full * 0.8)
    result = build(model, "x86-64", calib=boxes / "images", eval=boxes / "images", input_size=SIZE, quiet=True,
                   overrides={**FAST, "search.budget": f"macs={limit}", "search.levels": [0.0, 0.5],
                              "search.generations": 1, "prune.images": 4, "search.images": 4}, out=tmp_path / "out")
    report = result.report
    search = report["search"]
    assert 0 < search["stream"]["ratio"] < 0.5 and search["stream"]["kept_inside"]
    assert report["analysis"]["artifact"]["macs"] <= limit and search["chosen"]["macs"] <= limit
    assert [s["name"] for s in report["stages"]][:5] == ["load", "data", "stream", "levels", "search"]
    assert report["map50_95_artifact"] is not None  # verified like any build

