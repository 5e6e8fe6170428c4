"""Least-squares reconstruction of pruned layers (He et al., 2017; ThiNet): each layer that reads pruned
channels is refitted so its output on the pruned model's own inputs matches the original layer's.

Bias compensation keeps a removed channel's mean; reconstruction goes further: the remaining channels'
weights absorb what the removed ones carried (channels are correlated), and because layers are refitted
in the order they run, each also corrects the drift of the layers before it. No training, no labels:
`Σ x xᵀ` and `Σ x yᵀ` over calibration positions, then one ridge solve per layer.
"""

from __future__ import annotations

from typing import Any

import torch

RIDGE = 1e-3  # of the mean input energy: keeps the solve stable for inputs the images barely excite
BATCH = 8  # calibration images through the models at once


class _Reached(Exception):
    """Raised by a hook once the layer of interest has been seen: the rest of the forward pass is not needed."""


def dense(module: torch.nn.Module) -> bool:
    """A layer mixing all its input channels: a linear layer or an ungrouped convolution."""
    return isinstance(module, torch.nn.Linear) or (isinstance(module, torch.nn.Conv2d) and module.groups == 1)


def execution_order(module: torch.nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the dense layers in the order a forward pass first calls them."""
    order: list[str] = []
    names = {m: name for name, m in module.named_modules() if dense(m)}
    hooks = [m.register_forward_pre_hook(lambda m, _a: order.append(names[m]) if names[m] not in order else None)
             for m in names]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for hook in hooks:
            hook.remove()
    return order


def _capture(module: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor, output: bool) -> torch.Tensor:
    """`layer`'s input (or output) when `module` runs on `x`; the pass stops there."""
    seen: list[torch.Tensor] = []

    def hook(_m: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor | None = None) -> None:
        seen.append((out if output else args[0]).detach())
        raise _Reached

    handle = layer.register_forward_hook(hook) if output else layer.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            module(x)
    except _Reached:
        pass
    finally:
        handle.remove()
    return seen[0]


def _rows(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows a matrix product maps to its output rows: im2col patches for a convolution."""
    if isinstance(layer, torch.nn.Linear):
        return x.reshape(-1, x.shape[-1])
    patches = torch.nn.functional.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _outputs(layer: torch.nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The layer's output as rows matching `_rows`."""
    if isinstance(layer, torch.nn.Linear):
        return y.reshape(-1, y.shape[-1])
    return y.flatten(2).transpose(1, 2).flatten(0, 1)


def reconstruct(pruned: torch.nn.Module, original: torch.nn.Module, images: torch.Tensor,
                kept_outputs: dict[str, list[int]]) -> dict[str, Any]:
    """Refit every dense layer of `pruned`, in execution order, to the original layer's outputs (its kept output
    channels: `kept_outputs[name]`, all where absent); a refit that would not lower the layer's error is skipped."""
    images = torch.as_tensor(images)
    originals = dict(original.named_modules())
    layers = dict(pruned.named_modules())
    order = execution_order(pruned, images[:1])
    refitted = 0
    for name in order:
        layer, source = layers[name], originals[name]
        width = layer.weight.shape[1] * (layer.weight[0, 0].numel())
        gram = torch.zeros(width + 1, width + 1, dtype=torch.float64)
        cross = torch.zeros(width + 1, layer.weight.shape[0], dtype=torch.float64)
        for part in images.split(BATCH):
            x = _rows(layer, _capture(pruned, layer, part, output=False)).double()
            y = _outputs(layer, _capture(original, source, part, output=True))[:, kept_outputs.get(name, slice(None))]
            x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
            gram += x.T @ x
            cross += x.T @ y.double()
        current = torch.cat([layer.weight.detach().reshape(layer.weight.shape[0], -1),
                             (layer.bias.detach() if layer.bias is not None else
                              torch.zeros(layer.weight.shape[0]))[:, None]], dim=1).double()
        before = _residual(gram, cross, current)
        ridge = RIDGE * gram.diagonal()[:-1].mean()
        solved = torch.linalg.solve(gram + ridge * torch.eye(width + 1, dtype=gram.dtype), cross).T
        after = _residual(gram, cross, solved)
        if after < before:
            with torch.no_grad():
                layer.weight.copy_(solved[:, :-1].reshape(layer.weight.shape).float())
                if layer.bias is None:
                    layer.bias = torch.nn.Parameter(torch.zeros(layer.weight.shape[0]))
                layer.bias.copy_(solved[:, -1].float())
            refitted += 1
    return {"method": "least-squares reconstruction to the original's layer outputs", "images": len(images),
            "layers": refitted}


def _residual(gram: torch.Tensor, cross: torch.Tensor, weights: torch.Tensor) -> float:
    """Σ‖W x − y‖² without the constant Σ‖y‖² term: tr(W G Wᵀ) − 2 tr(W C)."""
    return float(torch.einsum("oi,ij,oj->", weights, gram, weights) - 2 * torch.einsum("oi,io->", weights, cross))
