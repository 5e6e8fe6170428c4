"""Structured channel pruning with a dependency graph (Torch-Pruning): real speed on every runtime.

Channels are removed together with everything that depends on them (the next layer's inputs, the
other branch of a residual add or a concat). The family names the layers whose output channels must
stay (a detection head's output convolutions, attention projections whose reshapes count heads, blocks
that split their output in fixed halves).

With calibration images, channels are ranked the FLAP way (`fluctuation.py`): by how much they vary
around their mean, weighted by the weights of every layer that reads them, and each reader keeps a
removed channel's mean in its bias. A channel whose output is nearly constant (a folded batch norm's
shift through small weights, common in trained CNNs) then goes almost for free, where ranking by weight
magnitude alone removes channels the next layers depend on. Without images: group L2 magnitude.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from edgekit.passes.fluctuation import InputMoments

def prune_channels(module: torch.nn.Module, input_shape: tuple[int, ...], ratio: float,
                   keep: list[torch.nn.Module], images: torch.Tensor | None = None,
                   rebuild: bool = True) -> dict[str, Any]:
    """Remove `ratio` of the prunable channels of `module` in place; with `images`, ranked by fluctuation,
    compensated through the readers' biases and (`rebuild`) every dense layer refitted to the original's
    outputs. Returns MACs and parameters before and after."""
    import torch
    import torch_pruning as tp

    from edgekit.passes.fluctuation import compensation
    from edgekit.passes.reconstruct import dense, reconstruct

    example = torch.zeros(input_shape)
    original = copy.deepcopy(module).eval() if images is not None and rebuild else None
    names = {layer: name for name, layer in module.named_modules()}
    kept_outputs = {name: list(range(layer.weight.shape[0])) for layer, name in names.items() if dense(layer)}
    moments = _reader_moments(module, images) if images is not None else {}
    importance = _Fluctuation(moments) if moments else tp.importance.GroupMagnitudeImportance(p=2)
    traceable(module)
    macs_before, params_before = tp.utils.count_ops_and_params(module, example)
    pruner = tp.pruner.BasePruner(module, example, importance=importance, pruning_ratio=ratio, ignored_layers=keep,
                                  global_pruning=False)
    compensated = set()
    with torch.no_grad():
        for group in pruner.step(interactive=True):
            for item in group:
                layer, removed = item.dep.layer, [int(i) for i in item.idxs]
                if layer in moments and _reads(item.dep.pruning_fn):
                    shift = compensation(layer, moments[layer].mean.float(), torch.tensor(removed))
                    if layer.bias is None:
                        layer.bias = torch.nn.Parameter(torch.zeros_like(shift))
                    layer.bias += shift
                    moments[layer].drop(removed)
                    compensated.add(layer)
                if names.get(layer) in kept_outputs and _writes(item.dep.pruning_fn):
                    gone = set(removed)
                    kept = kept_outputs[names[layer]]
                    kept_outputs[names[layer]] = [o for i, o in enumerate(kept) if i not in gone]
            group.prune()
    module.eval()
    if original is not None:
        reconstruction = reconstruct(module, original, images, kept_outputs)
    macs_after, params_after = tp.utils.count_ops_and_params(module, example)
    method = ("group L2 magnitude" if not moments else "FLAP fluctuation, bias-compensated"
              + (", refitted by least squares" if original is not None else ""))
    return {"method": f"Torch-Pruning, {method}, uniform per layer", "ratio": ratio,
            "statistics_images": 0 if images is None else len(images), "compensated_layers": len(compensated),
            "reconstruction": reconstruction if original is not None else None,
            "macs_before": int(macs_before), "macs_after": int(macs_after),
            "params_before": int(params_before), "params_after": int(params_after), "kept_layers": len(keep)}


def traceable(module: torch.nn.Module) -> None:
    """Ready `module` for Torch-Pruning's dependency graph, which is traced through autograd: parameters that require
    gradients, and activations out of place. An in-place activation right after a convolution (YOLO's fused
    Conv + SiLU) rewrites the convolution's output in autograd's graph: the convolution would not be seen, and its
    channels never pruned. Outputs are unchanged."""
    for parameter in module.parameters():
        parameter.requires_grad_(True)
    for layer in module.modules():
        if getattr(layer, "inplace", False):
            layer.inplace = False


def _reads(pruning_fn: Any) -> bool:
    """Whether a dependency removes input channels of a layer that reads (sums over) them."""
    import torch_pruning as tp

    return pruning_fn in (tp.prune_conv_in_channels, tp.prune_linear_in_channels)


def _writes(pruning_fn: Any) -> bool:
    """Whether a dependency removes output channels of a dense layer."""
    import torch_pruning as tp

    return pruning_fn in (tp.prune_conv_out_channels, tp.prune_linear_out_channels)


def _reader_moments(module: torch.nn.Module, images: torch.Tensor) -> dict[torch.nn.Module, InputMoments]:
    """Each dense convolution's and linear layer's input moments on `images` (layers the images reach)."""
    import torch

    from edgekit.passes.fluctuation import InputMoments
    from edgekit.passes.reconstruct import dense
    from edgekit.passes.sequential import input_statistics

    readers = {name: layer for name, layer in module.named_modules() if dense(layer)}
    moments = input_statistics(module, readers, torch.as_tensor(images), {}, InputMoments)
    return {readers[name]: found for name, found in moments.items() if found.rows}


class _Fluctuation:
    """Torch-Pruning importance: each channel's fluctuation summed over the layers of its group that read it
    (magnitude where none of them was measured)."""

    def __init__(self, moments: dict[torch.nn.Module, InputMoments]) -> None:
        import torch_pruning as tp

        self.moments = moments
        self.fallback = tp.importance.GroupMagnitudeImportance(p=2)

    def __call__(self, group: Any) -> torch.Tensor:
        import torch

        from edgekit.passes.fluctuation import fluctuation

        scores, measured = torch.zeros(len(group[0].idxs), dtype=torch.float64), False
        for item in group:
            layer = item.dep.layer
            if layer in self.moments and _reads(item.dep.pruning_fn) and None not in item.root_idxs:
                local = fluctuation(layer, self.moments[layer])[[int(i) for i in item.idxs]]
                scores.scatter_add_(0, torch.tensor(item.root_idxs), local)
                measured = True
        return scores.float() if measured else self.fallback(group)
