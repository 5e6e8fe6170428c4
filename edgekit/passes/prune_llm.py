"""Structured pruning of decoder blocks: width (MLP channels, attention heads) and depth (whole blocks).

Width follows FLAP (An et al., 2024): a channel entering an output projection matters by how much it
*fluctuates* around its mean, Var(x_j) · ‖W[:, j]‖², not by its size; a constant input can be removed
and its mean contribution kept as a bias (bias compensation). Heads score the sum over their channels.
Depth follows ShortGPT/Minitron: a block whose output is nearly its input (1 − cos(x_in, x_out) small)
is removed. Blocks are visited in order on the calibration activations of the already-pruned model.
The family adapter does the surgery (which layers share a channel, how heads group around key/value heads).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from edgekit.passes.sequential import input_statistics, run_block


class InputMoments:
    """Per-channel mean and variance of a linear layer's input (a forward pre-hook)."""

    def __init__(self, features: int) -> None:
        self.total = torch.zeros(features, dtype=torch.float64)
        self.squares = torch.zeros(features, dtype=torch.float64)
        self.rows = 0

    def __call__(self, _module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        rows = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        self.total += rows.sum(0)
        self.squares += (rows * rows).sum(0)
        self.rows += rows.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.rows

    @property
    def variance(self) -> torch.Tensor:
        return (self.squares / self.rows - self.mean**2).clamp(min=0)


def fluctuation(layer: torch.nn.Linear, moments: InputMoments) -> torch.Tensor:
    """FLAP's score of each input channel of `layer`: Var(x_j) · ‖W[:, j]‖²."""
    return moments.variance * layer.weight.detach().double().pow(2).sum(0)


def compensation(layer: torch.nn.Linear, mean: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """The bias that keeps the removed inputs' mean contribution: W[:, removed] · E[x_removed]."""
    return (layer.weight.detach().double()[:, removed] @ mean[removed].double()).float()


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
