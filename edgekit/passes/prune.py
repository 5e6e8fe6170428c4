"""Structured channel pruning with a dependency graph (Torch-Pruning): real speed on every runtime.

Channels are removed together with everything that depends on them (the next layer's inputs, the
other branch of a residual add or a concat), ranked by the L2 magnitude of each coupled group. The
family names the layers whose output channels must stay (a detection head's output convolutions,
attention projections whose reshapes count heads, blocks that split their output in fixed halves).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def prune_channels(module: torch.nn.Module, input_shape: tuple[int, ...], ratio: float,
                   keep: list[torch.nn.Module]) -> dict[str, Any]:
    """Remove `ratio` of the prunable channels of `module` in place; MACs and parameters before and after."""
    import torch
    import torch_pruning as tp

    example = torch.zeros(input_shape)
    for parameter in module.parameters():
        parameter.requires_grad_(True)  # the dependency graph is traced through autograd
    macs_before, params_before = tp.utils.count_ops_and_params(module, example)
    pruner = tp.pruner.BasePruner(module, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=keep, global_pruning=False)
    pruner.step()
    module.eval()
    macs_after, params_after = tp.utils.count_ops_and_params(module, example)
    return {"method": "Torch-Pruning, group L2 magnitude, uniform per layer", "ratio": ratio,
            "macs_before": int(macs_before), "macs_after": int(macs_after),
            "params_before": int(params_before), "params_after": int(params_after), "kept_layers": len(keep)}
