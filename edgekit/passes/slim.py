"""SlimSAM-style slimming: structured pruning of a ViT encoder scored by disturbed Taylor importance.

A group is a set of units (embedding channels of a stage, one MLP's hidden units, one attention's per-head query/key
or value dimensions) and every tensor slice each unit owns: the rows that write it and the columns that read it.
Removing a unit removes all its slices together, so the shapes stay consistent. The family adapter lists the groups
(it knows the architecture); this pass scores, selects and cuts them.

The score of a unit is the first-order Taylor estimate of the loss change when it is removed, |Σ w·∂L/∂w| over
its slices, accumulated over images. Against the original model the embedding loss has zero gradient (the student
is the teacher), so L compares the student with a slightly *disturbed* teacher embedding (SlimSAM): the gradient
then says how much each weight moves the embedding along random directions of the teacher's own scale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class Slice:
    """Where one group's units live in one tensor: unit u owns `positions[u]` along `dim` of `owner.<name>`."""

    owner: torch.nn.Module
    name: str
    dim: int
    positions: torch.Tensor  # [units, per_unit] indices


@dataclass
class Group:
    name: str
    kind: str  # "embedding" (a stage's residual stream) or "bottleneck" (hidden units inside one block)
    units: int
    segments: int = 1  # units fall in this many equal runs (attention heads) that must keep equal counts
    slices: list[Slice] = field(default_factory=list)


def disturbed_taylor(model: torch.nn.Module, groups: list[Group], images: Iterable[torch.Tensor],
                     reference: Callable[[torch.Tensor], torch.Tensor], noise: float = 0.1
                     ) -> dict[str, torch.Tensor]:
    """Per group, each unit's importance |Σ w·g| summed over `images`, where g is the gradient of
    MSE(model(x), reference(x) + ε) and ε is Gaussian with `noise` × the reference embedding's std."""
    import torch

    generator = torch.Generator().manual_seed(0)
    tensors = {id(getattr(s.owner, s.name)): getattr(s.owner, s.name) for g in groups for s in g.slices
               if isinstance(getattr(s.owner, s.name), torch.nn.Parameter)}  # running statistics carry no gradient
    totals = {name: torch.zeros_like(t) for name, t in tensors.items()}
    for tensor in tensors.values():
        tensor.requires_grad_(True)
    for x in images:
        with torch.no_grad():
            wanted = reference(x)
            wanted = wanted + noise * wanted.std() * torch.randn(wanted.shape, generator=generator)
        model.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), wanted).backward()
        with torch.no_grad():
            for key, tensor in tensors.items():
                totals[key] += tensor * tensor.grad
    for tensor in tensors.values():
        tensor.requires_grad_(False)
        tensor.grad = None
    scores = {}
    for group in groups:
        score = torch.zeros(group.units, dtype=torch.float64)
        for piece in group.slices:
            if id(getattr(piece.owner, piece.name)) not in totals:
                continue
            products = totals[id(getattr(piece.owner, piece.name))].movedim(piece.dim, 0)
            per_row = products.reshape(products.shape[0], -1).sum(dim=1).double()
            score += per_row[piece.positions].sum(dim=1)
        scores[group.name] = score.abs()
    return scores


def keep_units(group: Group, score: torch.Tensor, ratio: float) -> torch.Tensor:
    """The units to keep: the highest-scoring `1 - ratio` of each segment (at least one), in their order."""
    import torch

    per_segment = group.units // group.segments
    keep = max(1, round(per_segment * (1 - ratio)))
    kept = [torch.topk(part, keep).indices + s * per_segment
            for s, part in enumerate(score.view(group.segments, per_segment))]
    return torch.sort(torch.cat(kept)).values


def cut(groups: list[Group], kept: dict[str, torch.Tensor]) -> dict[torch.nn.Module, list[int]]:
    """Keep only `kept[name]` units of each group in every tensor it spans. Groups may share a tensor (query/key
    and value rows of one qkv layer), so each tensor is cut once, by the union of what its groups remove. The
    family then updates the modules' sizes. Returns the original output rows each layer kept."""
    import torch

    removed: dict[tuple[int, str, int], tuple[torch.nn.Module, str, int, set[int]]] = {}
    for group in groups:
        dropped = torch.ones(group.units, dtype=torch.bool)
        dropped[kept[group.name]] = False
        for piece in group.slices:
            entry = removed.setdefault((id(piece.owner), piece.name, piece.dim),
                                       (piece.owner, piece.name, piece.dim, set()))
            entry[3].update(int(i) for i in piece.positions[dropped].flatten())
    outputs = {}
    for owner, name, dim, rows in removed.values():
        tensor = getattr(owner, name)
        keep = torch.tensor(sorted(set(range(tensor.shape[dim])) - rows))
        if name == "weight" and dim == 0:
            outputs[owner] = keep.tolist()
        value = tensor.detach().index_select(dim, keep).clone()
        if isinstance(tensor, torch.nn.Parameter):
            setattr(owner, name, torch.nn.Parameter(value, requires_grad=tensor.requires_grad))
        else:
            owner.register_buffer(name, value)
    return outputs


def slim(model: torch.nn.Module, groups: list[Group], ratio: float, images: list[torch.Tensor],
         reference: Callable[[torch.Tensor], torch.Tensor]) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """Score `groups` on `images` against `reference` and remove `ratio` of each group's units, in place.
    Returns a record and, by layer name, the original output rows each cut layer kept."""
    removed, outputs = remove(model, groups, disturbed_taylor(model, groups, images, reference), ratio)
    record = {"groups": len(groups), "units_before": sum(g.units for g in groups), "units_removed": removed,
              "score": "disturbed Taylor (SlimSAM)", "images": len(images)}
    return record, outputs


def remove(model: torch.nn.Module, groups: list[Group], scores: dict[str, torch.Tensor], ratio: float
           ) -> tuple[int, dict[str, list[int]]]:
    """Remove the lowest-scoring `ratio` of each group's units from `model` (or a module holding every layer the
    groups cut), in place. Returns how many units went and, by layer name in `model`, the original output rows each
    cut layer kept."""
    kept = {group.name: keep_units(group, scores[group.name], ratio) for group in groups}
    names = {module: name for name, module in model.named_modules()}
    outputs = {names[module]: rows for module, rows in cut(groups, kept).items()}
    return sum(g.units - len(kept[g.name]) for g in groups), outputs


def chain_kept(earlier: dict[str, list[int]], later: dict[str, list[int]]) -> dict[str, list[int]]:
    """Kept output rows after two cuts, in the original layer's numbering (`later` numbers the rows `earlier`
    left)."""
    chained = dict(earlier)
    for name, rows in later.items():
        chained[name] = [earlier[name][i] for i in rows] if name in earlier else rows
    return chained
