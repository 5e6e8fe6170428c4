"""Least-squares reconstruction of pruned layers (He et al., 2017; ThiNet): each layer that reads pruned
channels is refitted so its output on the pruned model's own inputs matches the original layer's.

Bias compensation keeps a removed channel's mean; reconstruction goes further: the remaining channels'
weights absorb what the removed ones carried (channels are correlated), and because layers are refitted
in the order they run, each also corrects the drift of the layers before it. No training, no labels:
`Σ x xᵀ` and `Σ x yᵀ` over calibration positions, then one ridge solve per layer.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch

RIDGE = 1e-3  # of the mean input energy: keeps the solve stable for inputs the images barely excite
BATCH = 8  # images through the original at once while its outputs are recorded
ROWS = 65536  # positions per float64 product (bounds the copy)
T = TypeVar("T")


def dense(module: torch.nn.Module) -> bool:
    """A layer mixing all its input channels: a linear layer or an ungrouped convolution."""
    return isinstance(module, torch.nn.Linear) or (isinstance(module, torch.nn.Conv2d) and module.groups == 1)


def execution_order(module: torch.nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the dense layers in the order a forward pass first calls them."""
    names = {m: name for name, m in module.named_modules() if dense(m)}
    return list(dict.fromkeys(name for name, _ in forward_calls(module, example, names)))


def forward_calls(module: torch.nn.Module, example: torch.Tensor, layers: dict[torch.nn.Module, T]
                  ) -> list[tuple[T, Any]]:
    """Each time a forward pass of `module` on `example` calls one of `layers`: its key there and its output (a
    tensor copied as it was then: a later in-place op must not change it), in the order the calls end."""
    calls: list[tuple[T, Any]] = []
    hooks = [layer.register_forward_hook(lambda m, _a, out: calls.append(
        (layers[m], out.detach().clone() if isinstance(out, torch.Tensor) else out))) for layer in layers]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def recorded(model: torch.nn.Module, images: torch.Tensor, outputs: list[str], inputs: list[str]
             ) -> dict[tuple[str, bool], torch.Tensor]:
    """`model`'s output of each module in `outputs` and input of each module in `inputs`, over all images (run in
    batches), keyed by (name, is_output)."""
    modules = dict(model.named_modules())
    seen: dict[tuple[str, bool], list[torch.Tensor]] = {}
    batch = [0]

    def keep(key: tuple[str, bool]) -> Any:
        def hook(_m: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor | None = None) -> None:
            parts = seen.setdefault(key, [])
            if len(parts) == batch[0]:  # a module called again in one pass: its first call counts, as in the refit
                value = out if key[1] else args[0]
                assert value is not None  # a forward hook (key[1]) always receives the output
                # a copy: a later in-place op (the SiLU of a fused Conv + SiLU) would rewrite a view of it
                parts.append(value.detach().clone())
        return hook

    hooks = [modules[n].register_forward_hook(keep((n, True))) for n in outputs]
    hooks += [modules[n].register_forward_pre_hook(keep((n, False))) for n in inputs]
    try:
        with torch.no_grad():
            for batch[0], part in enumerate(images.split(BATCH)):
                model(part)
    finally:
        for hook in hooks:
            hook.remove()
    return {key: torch.cat(parts) for key, parts in seen.items()}


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
    channels: `kept_outputs[name]`, all where absent); a refit that would not lower the layer's error is skipped.

    One pass of the pruned model over all `images` does it: each layer is refitted as the pass reaches it, so
    the layers after it see its refitted output."""
    images = torch.as_tensor(images)
    order = execution_order(pruned, images[:1])
    wanted = recorded(original, images, order, [])
    layers = dict(pruned.named_modules())
    names = {layers[name]: name for name in order}
    reached: set[str] = set()
    refitted: list[str] = []

    def refit(layer: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        name = names[layer]
        if name in reached:  # a layer the pass calls again keeps its first refit
            return
        reached.add(name)
        kept = kept_outputs.get(name, slice(None))
        if _solve(layer, _rows(layer, args[0]), _outputs(layer, wanted[name, True])[:, kept]):
            refitted.append(name)

    hooks = [layer.register_forward_pre_hook(refit) for layer in names]
    try:
        with torch.no_grad():
            pruned(images)
    finally:
        for hook in hooks:
            hook.remove()
    return {"method": "least-squares reconstruction to the original's layer outputs", "images": len(images),
            "layers": len(refitted)}


def _solve(layer: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> bool:
    """Set `layer`'s weights and bias to the ridge least-squares map from rows `x` to rows `y`, if that lowers
    its error; says whether it did."""
    gram = torch.zeros(x.shape[1] + 1, x.shape[1] + 1, dtype=torch.float64)
    cross = torch.zeros(x.shape[1] + 1, y.shape[1], dtype=torch.float64)
    for rows, wanted in zip(x.split(ROWS), y.split(ROWS), strict=True):
        rows = torch.cat([rows.double(), torch.ones(len(rows), 1, dtype=torch.float64)], dim=1)
        gram += rows.T @ rows
        cross += rows.T @ wanted.double()
    current = torch.cat([layer.weight.detach().reshape(layer.weight.shape[0], -1),
                         (layer.bias.detach() if layer.bias is not None else
                          torch.zeros(layer.weight.shape[0]))[:, None]], dim=1).double()
    ridge = RIDGE * gram.diagonal()[:-1].mean()
    solved = torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=gram.dtype), cross).T
    if _residual(gram, cross, solved) >= _residual(gram, cross, current):
        return False
    layer.weight.copy_(solved[:, :-1].reshape(layer.weight.shape).float())
    if layer.bias is None:
        layer.bias = torch.nn.Parameter(torch.zeros(layer.weight.shape[0]))
    layer.bias.copy_(solved[:, -1].float())
    return True


def _residual(gram: torch.Tensor, cross: torch.Tensor, weights: torch.Tensor) -> float:
    """Σ‖W x − y‖² without the constant Σ‖y‖² term: tr(W G Wᵀ) − 2 tr(W C)."""
    return float(torch.einsum("oi,ij,oj->", weights, gram, weights) - 2 * torch.einsum("oi,io->", weights, cross))
