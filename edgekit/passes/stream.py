"""The channels between search units, cut once before the search sizes each unit inside.

A search unit is pruned only in channels that stay inside it (passes/levels.py), so that variants stitch. Channels
that pass from one unit to the next (a detector backbone's strided convolutions, the outputs its neck concatenates,
a residual stream) belong to no unit: a search over units alone must take the whole budget out of the units'
insides, where uniform pruning spreads it over every channel. On YOLO11n at 93% of the Jetson latency that left
40% of each unit's inside cut, against 13% of everything for uniform pruning.

So a family can ask for the stream to be cut first (`search.stream`): at the share of channels that uniform pruning
of the whole model needs to meet the budget, ranked and refitted as `--prune` does, with every unit's inside kept
whole. The search then starts from the units' insides at about that share too, the uniform configuration, and
moves budget between units from there.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from edgekit.cache import ArrayCache
    from edgekit.search.budget import Budget
    from edgekit.search.evolve import Costs

STEPS = 7  # bisection steps


def uniform_ratio(module: torch.nn.Module, input_shape: tuple[int, ...], keep: list[str], budget: Budget,
                  costs: Callable[[torch.nn.Module], Costs], highest: float) -> tuple[float, Costs | None]:
    """The smallest share of channels (at most `highest`) whose uniform pruning brings `module` within `budget`,
    keeping the output channels of the layers named in `keep`, and that model's costs; (0, None) where the model
    meets the budget as it is, (`highest`, its costs) where even that misses. Bisection on the artifact's costs,
    which channel counts alone set (magnitude ranking, no refit), to within `highest` / 2**STEPS."""
    from edgekit.passes.prune import prune_channels

    def priced(ratio: float) -> Costs:
        pruned = copy.deepcopy(module)
        prune_channels(pruned, input_shape, ratio, [pruned.get_submodule(name) for name in keep])
        return costs(pruned)

    if budget.allows(costs(module).of(budget.metric)):
        return 0.0, None
    top = priced(highest)
    if not budget.allows(top.of(budget.metric)):
        return highest, top
    low, found = 0.0, (highest, top)
    high = highest
    for _ in range(STEPS):
        middle = (low + high) / 2
        at = priced(middle)
        if budget.allows(at.of(budget.metric)):
            found, high = (middle, at), middle
        else:
            low = middle
    return found


def cut_stream(module: torch.nn.Module, input_shape: tuple[int, ...], units: list[tuple[str, torch.nn.Module]],
               family_keep: list[torch.nn.Module], images: np.ndarray, budget: Budget,
               costs: Callable[[torch.nn.Module], Costs], highest: float, cache: ArrayCache, key: dict[str, Any]
               ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A copy of `module` with the channels between `units` cut at uniform pruning's share for `budget` (FLAP ranking
    and least-squares refit on `images`, as `--prune` does), every unit's inside whole; and the report's record of
    it. The share is cached under `key` (what the model's artifact costs depend on)."""
    import torch

    from edgekit.passes.levels import channel_roots, own_keep, unit_inputs
    from edgekit.passes.prune import prune_channels

    keep = own_keep(module, family_keep)
    inputs = unit_inputs(module, torch.as_tensor(images[:1]), [name for name, _ in units])
    inside = [f"{name}.{root}" for name, unit in units
              for root in channel_roots(unit, inputs[name], own_keep(unit, family_keep))[0]]

    def compute() -> dict[str, np.ndarray]:
        ratio, _ = uniform_ratio(module, input_shape, keep, budget, costs, highest)
        return {"ratio": np.array(ratio)}

    ratio = float(cache.get_or_compute({**key, "kind": "search-stream", "budget": budget.text, "highest": highest},
                                       compute)["ratio"])
    cut = copy.deepcopy(module)
    record: dict[str, Any] = {"ratio": round(ratio, 4), "kept_inside": inside,
                              "why": "uniform pruning's share of channels for the budget, cut from the channels "
                                     "between units; each unit's inside is the search's"}
    if ratio > 0:
        pruned = prune_channels(cut, input_shape, ratio, [cut.get_submodule(name) for name in [*keep, *inside]],
                                torch.as_tensor(images))
        record |= {"method": pruned["method"], "macs_before": pruned["macs_before"],
                   "macs_after": pruned["macs_after"]}
    return cut.eval(), record
