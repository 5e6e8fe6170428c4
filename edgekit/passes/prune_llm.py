"""Structured pruning of decoder blocks: width (MLP channels, attention heads) and depth (whole blocks).

Width follows FLAP (An et al., 2024; `fluctuation.py`): a channel entering an output projection matters by
how much it fluctuates around its mean, and its mean is kept as a bias when it is removed. Heads score the
sum over their channels.
Depth follows ShortGPT/Minitron: a block whose output is nearly its input (1 − cos(x_in, x_out) small)
is removed. Blocks are visited in order on the calibration activations of the already-pruned model.
The family adapter does the surgery (which layers share a channel, how heads group around key/value heads).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from edgekit.passes.fluctuation import InputMoments, fluctuation
from edgekit.passes.sequential import input_statistics, run_block


def prune_width(blocks: list[torch.nn.Module], hidden: torch.Tensor, kwargs: dict[str, Any], ratio: float,
                consumers: Callable[[torch.nn.Module], dict[str, torch.nn.Linear]],
                surgery: Callable[[torch.nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor], float],
                                  dict[str, Any]],
                track: Callable[[Iterable[Any], int], Iterable[Any]] = lambda xs, _n: xs,
                ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Score every block's prunable inputs (those of its output projections, named by `consumers`) on the
    calibration activations, and let `surgery` remove `ratio` of them with their biases compensated."""
    records = []
    for block in track(blocks, len(blocks)):
        layers = consumers(block)
        moments = input_statistics(block, layers, hidden, kwargs, InputMoments)
        scores = {name: fluctuation(layers[name], moments[name]) for name in layers}
        records.append(surgery(block, scores, {name: m.mean for name, m in moments.items()}, ratio))
        hidden = run_block(block, hidden, kwargs)
    return hidden, records


def block_importance(blocks: list[torch.nn.Module], hidden: torch.Tensor, kwargs: dict[str, Any]) -> list[float]:
    """1 − mean cosine similarity between each block's input and output tokens: how much the block changes."""
    importance = []
    for block in blocks:
        out = run_block(block, hidden, kwargs)
        cosine = torch.nn.functional.cosine_similarity(hidden.flatten(0, 1), out.flatten(0, 1), dim=-1)
        importance.append(float(1 - cosine.mean()))
        hidden = out
    return importance
