"""Compress a decoder one block at a time, on the inputs the already-compressed blocks produce.

Only one block's activations for the calibration windows are alive at once (plus the model), so peak
memory stays near `windows × length × hidden` floats whatever the depth. Each linear layer's input
second moment `H = Σ x xᵀ` is gathered once per block and serves both GPTQ and EoRA.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch

from edgekit.passes.eora import Compensated, eora, output_error
from edgekit.passes.weightonly import QuantizedWeight, by_rows, gptq, rtn

BATCH = 8  # calibration windows through a block at once
T = TypeVar("T")


@dataclass(frozen=True)
class WeightScheme:
    """How each linear layer is compressed: bits, grouping, rounding method, and the EoRA rank that compensates."""

    bits: int
    group_size: int = 64
    symmetric: bool = True
    method: Literal["rtn", "gptq"] = "gptq"
    damp: float = 0.01
    rank: int = 0
    rank_bits: int | None = 8
    act_order: bool = False
    ranks: tuple[tuple[str, int], ...] = ()  # (layer name or its ending, rank): where the uniform rank is not right

    def rank_for(self, name: str) -> int:
        """The EoRA rank of the layer called `name` in its block (e.g. `mlp.down_proj`)."""
        return next((rank for key, rank in self.ranks if name == key or name.endswith("." + key)), self.rank)

    def quantize(self, weight: torch.Tensor, covariance: torch.Tensor) -> QuantizedWeight:
        if self.method == "gptq":
            return by_rows(lambda rows: gptq(rows, covariance, self.bits, self.group_size, self.symmetric,
                                             self.damp, act_order=self.act_order), weight)
        return by_rows(lambda rows: rtn(rows, self.bits, self.group_size, self.symmetric), weight)


SchemeOf = Callable[[int, str], WeightScheme]  # a block's index and a linear's name in it -> how it is compressed


class Covariance:
    """Accumulates `Σ x xᵀ` over every row of a linear layer's input (a forward pre-hook), and keeps the rows
    themselves while there are fewer of them than features: an output error through them is then cheaper than
    through the matrix (a wide layer of a large model on a few hundred calibration tokens)."""

    def __init__(self, features: int) -> None:
        self.matrix = torch.zeros(features, features, dtype=torch.float64)
        self.rows = 0
        self.inputs: list[torch.Tensor] | None = []

    def __call__(self, _module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        rows = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        self.matrix += (rows.T @ rows).double()
        self.rows += rows.shape[0]
        if self.inputs is not None:
            self.inputs = [*self.inputs, rows] if self.rows < self.matrix.shape[0] else None

    def error(self, delta: torch.Tensor) -> float:
        """‖ΔW X‖²: how much an error in the weights moves the layer's outputs on these inputs."""
        if self.inputs is None:
            return output_error(delta, self.matrix)
        return float((delta.float() @ torch.cat(self.inputs).T).pow(2).sum(dtype=torch.float64))


def run_block(block: torch.nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """The block's outputs for every calibration window, in batches."""
    with torch.no_grad():
        return torch.cat([block(part, **kwargs) for part in hidden.split(BATCH)])


def input_statistics(block: torch.nn.Module, layers: dict[str, torch.nn.Module], hidden: torch.Tensor,
                     kwargs: dict[str, Any], statistic: Callable[[int], T]) -> dict[str, T]:
    """A statistic of each named layer's inputs (a forward pre-hook built from its input width: a linear layer's
    features, a convolution's channels), gathered while the block (or a whole model) runs on these inputs."""
    stats = {name: statistic(layer.weight.shape[1]) for name, layer in layers.items()}
    hooks = [layer.register_forward_pre_hook(stats[name]) for name, layer in layers.items()]
    try:
        run_block(block, hidden, kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return stats


def hold(layer: torch.nn.Linear, quantized: QuantizedWeight) -> torch.nn.Linear:
    """`layer`, computing with `quantized`'s dequantized weights from now on (in place: a table tied to it follows);
    its codes ride along as `edgekit_quantized` for the exporter."""
    layer.weight.data = quantized.dequantize().to(layer.weight.dtype)
    layer.edgekit_quantized = quantized
    return layer


def quantized_copy(layer: torch.nn.Linear, quantized: QuantizedWeight) -> torch.nn.Linear:
    """A new linear layer like `layer` (its bias kept) holding `quantized`; `layer` is left as it was."""
    copy = torch.nn.utils.skip_init(torch.nn.Linear, layer.in_features, layer.out_features,
                                    bias=layer.bias is not None)
    if layer.bias is not None:
        copy.bias.data = layer.bias.detach().clone()
    return hold(copy, quantized)


def compress_linear(parent: torch.nn.Module, name: str, layer: torch.nn.Linear, inputs: Covariance,
                    scheme: WeightScheme) -> dict[str, Any]:
    """Quantize one linear layer in place (its weight becomes the dequantized one, its codes ride along as
    `edgekit_quantized` for the exporter) and, with a rank, replace it by its EoRA-compensated form."""
    weight = layer.weight.detach().float()
    quantized = scheme.quantize(weight, inputs.matrix)
    delta = weight - hold(layer, quantized).weight.detach()
    signal = inputs.error(weight)
    record: dict[str, Any] = {"layer": name, "bits": scheme.bits, "eora_rank": scheme.rank_for(name),
                              "bytes": quantized.nbytes, "output_error": inputs.error(delta) / signal}
    if scheme.rank_for(name):
        b, a = eora(delta, inputs.matrix, scheme.rank_for(name))
        compensated = Compensated(layer, b, a, scheme.rank_bits, scheme.group_size)
        residual = delta - compensated.b.weight @ compensated.a.weight
        record["output_error_eora"] = inputs.error(residual) / signal
        record["bytes"] += sum(stored_bytes(f) for f in (compensated.a, compensated.b))
        parent.set_submodule(name, compensated)
    return record


def stored_bytes(layer: torch.nn.Linear) -> int:
    """The bytes a linear layer's weights take in the artifact: its codes and scales, or float32 weights."""
    quantized = getattr(layer, "edgekit_quantized", None)
    return quantized.nbytes if quantized is not None else layer.weight.numel() * 4


def compress_blocks(blocks: Iterable[torch.nn.Module], linears_of: Callable[[torch.nn.Module], dict[str, Any]],
                    hidden: torch.Tensor, kwargs: dict[str, Any], scheme: WeightScheme | SchemeOf,
                    track: Callable[[Iterable[Any], int], Iterable[Any]] = lambda xs, _n: xs,
                    ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Compress every linear of every block, block by block, by one scheme or by each layer's (`scheme(block
    index, layer name)`: the levels a budget search chose); returns the last block's outputs (what the head sees)
    and one record per layer."""
    scheme_of = scheme if callable(scheme) else lambda _index, _name: scheme
    blocks = list(blocks)
    records = []
    for index, block in enumerate(track(blocks, len(blocks))):
        linears = linears_of(block)
        stats = input_statistics(block, linears, hidden, kwargs, Covariance)  # GPTQ, EoRA, each layer's error
        for name, layer in linears.items():
            records.append({"block": index} | compress_linear(block, name, layer, stats[name],
                                                              scheme_of(index, name)))
        hidden = run_block(block, hidden, kwargs)
    return hidden, records
