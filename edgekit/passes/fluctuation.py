"""FLAP's measures (An et al., 2024) for any layer that reads channels: linear layers and dense convolutions.

An input channel matters to the layer reading it by how much it *fluctuates* around its mean,
Var(x_j) · ‖W[:, j]‖², not by its size: a constant input can be removed and its mean contribution kept
as a bias (bias compensation). Language-model width pruning and image-model channel pruning both use them.
"""

from __future__ import annotations

import torch


class InputMoments:
    """Per-channel mean and variance of a layer's input (a forward pre-hook; convolutions' channels are dim 1)."""

    def __init__(self, features: int) -> None:
        self.total = torch.zeros(features, dtype=torch.float64)
        self.squares = torch.zeros(features, dtype=torch.float64)
        self.rows = 0

    def __call__(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach()
        x = x.movedim(1, -1) if isinstance(module, torch.nn.Conv2d) else x
        rows = x.reshape(-1, x.shape[-1]).double()
        self.total += rows.sum(0)
        self.squares += (rows * rows).sum(0)
        self.rows += rows.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.rows

    @property
    def variance(self) -> torch.Tensor:
        return (self.squares / self.rows - self.mean**2).clamp(min=0)

    def drop(self, removed: list[int]) -> None:
        """Forget removed channels, so the moments stay aligned with the layer's remaining inputs."""
        keep = torch.ones(len(self.total), dtype=torch.bool)
        keep[removed] = False
        self.total, self.squares = self.total[keep], self.squares[keep]


def _per_input(layer: torch.nn.Module) -> torch.Tensor:
    """The weight as `[out, in, positions]`: a linear layer has one position, a k×k convolution k²."""
    weight = layer.weight.detach().double()
    return weight.reshape(weight.shape[0], weight.shape[1], -1)


def fluctuation(layer: torch.nn.Module, moments: InputMoments) -> torch.Tensor:
    """FLAP's score of each input channel of `layer`: Var(x_j) · ‖W[:, j]‖²."""
    return moments.variance * _per_input(layer).pow(2).sum(dim=(0, 2))


def compensation(layer: torch.nn.Module, mean: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """The bias that keeps the removed inputs' mean contribution: W[:, removed] · E[x_removed] (a convolution's
    kernel summed over its positions; exact away from zero padding)."""
    return (_per_input(layer)[:, removed].sum(dim=2) @ mean[removed].double()).float()
