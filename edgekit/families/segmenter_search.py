"""The segmenter's budget search: each block of the TinyViT image encoder slimmed to its own level.

A unit is one of the encoder's blocks (the patch embedding, each MBConv and attention block, each patch merging,
the neck), and a level the share of the block's own hidden units removed: every bottleneck group of
`tinyvit.slim_groups` inside it (MBConv and merging expansions, per-head query/key and value dimensions, MLP hidden
units, the neck's middle channels). Embedding channels, which carry the residual stream from block to block, stay
whole, so one block's level never changes another's layers, and the search is passes/levels.py's: variants
stitched in place, costs from the device model on the encoder as the build makes it (exported at 1024 px in the
build's precision), charged op by op to the block whose scope the op carries.

The variants come from one ranking: disturbed Taylor scores (SlimSAM) of every group on the original encoder (with
nothing cut yet, a group's scores do not depend on the others), each level cut from them, and each cut block refitted
by least squares to the original block's outputs on its own inputs (`prune.reconstruct`). Ranking, refit and fitness
run on 512 px crops, as slimming does; fitness is the embedding's normalised MSE to the original's on crops of
calibration images the refit did not see.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekit import __version__
from edgekit.data import file_sha256, files_record
from edgekit.families.segmenter import ENCODER_SIZE, LoadedSegmenter, encoder_crops, encoder_frames

if TYPE_CHECKING:
    import torch

    from edgekit.cache import ArrayCache
    from edgekit.families.base import FloatParts
    from edgekit.passes.levels import Variants
    from edgekit.progress import Progress
    from edgekit.recipe import Recipe
    from edgekit.targets import Target


def search_encoder(original: Any, loaded: LoadedSegmenter, plan: Recipe, files: list[Path], root: Path,
                   crop: int, adapter: FloatParts, target: Target, cache: ArrayCache, progress: Progress,
                   ray: str | None = None) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, Any]]:
    """The original encoder and a copy with each block at the level the search chose for `plan.search.budget` on
    `target` (both torch, at the `crop` resolution), and the report's `search` block. The first `prune.images` of
    `files` rank and refit the variants, the next `search.images` measure fitness (with too few, the same ones)."""
    import torch

    from edgekit.families.tinyvit import set_resolution, tinyvit_from_onnx
    from edgekit.passes.levels import ImageSpace, artifact_key, choose, fitness_split, image_budget, price_artifact

    image_budget(plan)
    refit, scoring, disjoint = fitness_split(len(files), plan)
    torch.manual_seed(plan.seed)
    teacher = set_resolution(tinyvit_from_onnx(original), crop)
    settings = plan.search
    key = {"kind": "segmenter-levels", "encoder": file_sha256(loaded.encoder),
           "images": files_record(files[:refit], root)["sha256"], "crop": crop, "levels": settings.levels,
           "reconstruct": plan.prune.reconstruct, "seed": plan.seed, "edgekit": __version__}
    frames = encoder_frames(files[:2])  # int8 pricing's calibration

    def price(candidate: torch.nn.Module) -> Any:
        full = set_resolution(copy.deepcopy(candidate), ENCODER_SIZE)
        return price_artifact(full, (1, 3, ENCODER_SIZE, ENCODER_SIZE), plan, target, adapter, frames)

    with progress.stage("levels") as note:
        hits = cache.hits
        found = encoder_variants(teacher, torch.from_numpy(encoder_crops(files[:refit], crop, 1, plan.seed)),
                                 settings.levels, plan.prune.reconstruct, cache, key, progress)
        crops = encoder_crops([files[i] for i in scoring], crop, 1, plan.seed + 1)
        space = ImageSpace(teacher, found, crops, embedding, embedding_distance, price, target, cache,
                           {**key, "kind": "segmenter-search-costs", "artifact": artifact_key(plan, target),
                            "size": ENCODER_SIZE, "units": found.names})
        note["note"] = (f"{len(found.names)} blocks x {len(found.labels)} levels, {space.basis}"
                        + (", from the cache" if cache.hits > hits else ""))
    refitted = ", least-squares refit of the block to the original's outputs" if plan.prune.reconstruct else ""
    config, record = choose(space, plan, progress, refit=refit, disjoint=disjoint, ray=ray,
                            levels="shares of each encoder block's own hidden units removed (disturbed Taylor "
                                   f"ranking on the original encoder{refitted}); embedding channels stay whole",
                            fitness=f"image encoder embedding, normalised MSE to the original's, mean over "
                                    f"{space.samples} {crop} px crops of calibration images")
    return teacher, copy.deepcopy(space.stitched(config)), record


def encoder_variants(teacher: torch.nn.Module, crops: torch.Tensor, ratios: list[float], refit: bool,
                     cache: ArrayCache, key: dict[str, Any], progress: Progress) -> Variants:
    """Every block of `teacher` at every level (`ratios[0]` is 0: the block as it is), from the cache where it has
    them; `teacher` is not changed."""
    from edgekit.families.tinyvit import block_groups, sync_sizes
    from edgekit.passes.levels import stored_variants, unit_inputs, variant_arrays
    from edgekit.passes.reconstruct import reconstruct
    from edgekit.passes.slim import disturbed_taylor, remove

    names = list(block_groups(teacher))

    def compute() -> dict[str, np.ndarray]:
        ranked = copy.deepcopy(teacher)
        groups = [g for own in block_groups(ranked).values() for g in own]
        scores = disturbed_taylor(ranked, groups, list(crops.split(1)), teacher)
        inputs = unit_inputs(teacher, crops, names) if refit else {}
        arrays: dict[str, np.ndarray] = {}
        for level in progress.track(range(1, len(ratios)), len(ratios) - 1, "levels cut and refitted"):
            student = copy.deepcopy(teacher)
            _, kept = remove(student, [g for own in block_groups(student).values() for g in own], scores,
                             ratios[level])
            sync_sizes(student)
            for name in names:
                block = student.get_submodule(name)
                if refit:
                    own = {layer[len(name) + 1:]: rows for layer, rows in kept.items() if layer.startswith(f"{name}.")}
                    reconstruct(block, teacher.get_submodule(name), inputs[name], own)
                arrays |= variant_arrays(name, level, block)
        return arrays

    stored = cache.get_or_compute({**key, "units": names}, compute)
    return stored_variants([(name, teacher.get_submodule(name)) for name in names], ratios, stored, sync_sizes)


def embedding_distance(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Each image's embedding MSE to the original's over the original's mean square, averaged over the images."""
    (ours,), (theirs,) = student, teacher
    return ((ours - theirs).pow(2).flatten(1).mean(1) / theirs.pow(2).flatten(1).mean(1)).mean()


def embedding(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """What the encoder's distillation and search compare: its embedding, whole."""
    return [model(x)]
