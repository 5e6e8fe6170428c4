"""A language model compressed to a budget: each decoder block's attention and MLP linears at their own weight
level, chosen by the evolutionary search of `edgekit.search` (EvoPress).

Units are each block's attention group (q, k, v, o projections) and MLP group (gate, up, down); a level is how
every linear of the unit is stored: int8 or int4 MatMulNBits codes, optionally with an EoRA residual of rank r
(`int4+eora32`). As in EvoPress, every level of every linear is computed once from the calibration activations
of the original model (GPTQ and EoRA on its inputs, not block by block on a compressed copy) and kept, so a
candidate is stitched by swapping modules, never recompressed. The database is cached by content.

Costs are the artifact's own. Each unit's bytes, kernels and parameters at each level are read from one export
of the model with every unit at that level (the nodes and initializers its names own; the exporter renumbers its
running counters, so no other name depends on a unit's level), and a configuration's file is the all-first-level
export plus each unit's change, to the byte. Decode latency is the target's device model, linear in the bytes
streamed, the kernels and the parameters around the all-first-level model.

Fitness: KL(original ‖ candidate) of next-token distributions on the first calibration windows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekit.families import llm
from edgekit.recipe import weight_level
from edgekit.search import Config, Costs, Level, SearchResult, Unit
from edgekit.search.kept import KeptOutputs

if TYPE_CHECKING:
    import onnx
    import torch

    from edgekit.passes.sequential import WeightScheme
    from edgekit.progress import Progress

GROUPS = {"self_attn": llm.LINEARS[:4], "mlp": llm.LINEARS[4:]}  # a unit's linears, by the block's submodule
FITNESS_BATCH = 2  # windows whose logits (tokens × vocabulary) are alive at once
_OWNER = re.compile(r"layers\.(\d+)[/_](self_attn|mlp)[/_]")  # a unit's scope in node, value and initializer names


@dataclass(frozen=True)
class WeightLevel:
    label: str
    bits: int
    rank: int  # EoRA rank (0: none)

    @classmethod
    def parse(cls, label: str) -> WeightLevel:
        return cls(label, *weight_level(label))


def level_database(module: torch.nn.Module, calibration: torch.Tensor, levels: Sequence[WeightLevel],
                   scheme: WeightScheme, progress: Progress) -> dict[str, np.ndarray]:
    """Every linear of every block at every level, from the original model's inputs: codes, scales and zero points
    per bit width (GPTQ or RTN as `scheme` says, run once per width), EoRA factors per rank; and the last block's
    outputs (`hidden`: the head's calibration, and the original's side of fitness)."""
    import torch

    from edgekit.passes.eora import eora
    from edgekit.passes.sequential import Covariance, input_statistics, run_block

    arrays: dict[str, np.ndarray] = {}
    blocks = list(llm.decoder_layers(module))
    with torch.no_grad():
        hidden, kwargs = llm.block_inputs(module, calibration)
        for index, block in enumerate(progress.track(blocks, len(blocks), "weight levels")):
            linears = llm.block_linears(block)
            stats = input_statistics(block, linears, hidden, kwargs, Covariance)
            for name, layer in linears.items():
                weight, covariance = layer.weight.detach().float(), stats[name].matrix
                for bits in sorted({level.bits for level in levels}):
                    quantized = replace(scheme, bits=bits).quantize(weight, covariance)
                    key = f"{index}.{name}.int{bits}"
                    arrays |= {f"{key}.codes": quantized.codes.numpy(), f"{key}.scales": quantized.scales.numpy(),
                               f"{key}.zeros": quantized.zeros.numpy()}
                    for rank in sorted({level.rank for level in levels if level.bits == bits and level.rank}):
                        b, a = eora(weight - quantized.dequantize(), covariance, rank)
                        arrays |= {f"{key}.eora{rank}.b": b.numpy(), f"{key}.eora{rank}.a": a.numpy()}
            hidden = run_block(block, hidden, kwargs)
    arrays["hidden"] = hidden.numpy()
    return arrays


def variants(module: torch.nn.Module, arrays: dict[str, np.ndarray], levels: Sequence[WeightLevel],
             scheme: WeightScheme) -> list[list[dict[str, torch.nn.Module]]]:
    """For each unit, for each level, the modules its linears become (by name in the block): quantized copies,
    EoRA-compensated where the level has a rank (the factors quantized at `scheme.rank_bits`). Levels of one
    width share their quantized layer."""
    import torch

    from edgekit.passes.eora import Compensated
    from edgekit.passes.sequential import quantized_copy
    from edgekit.passes.weightonly import QuantizedWeight

    found = []
    for index, block in enumerate(llm.decoder_layers(module)):
        for names in GROUPS.values():
            per_level: list[dict[str, torch.nn.Module]] = [{} for _ in levels]
            for name in names:
                layer = block.get_submodule(name)
                for bits in sorted({level.bits for level in levels}):
                    key = f"{index}.{name}.int{bits}"
                    codes, scales, zeros = (torch.from_numpy(arrays[f"{key}.{part}"])
                                            for part in ("codes", "scales", "zeros"))
                    base = quantized_copy(layer, QuantizedWeight(codes, scales, zeros, bits, scheme.group_size))
                    for slot, level in enumerate(levels):
                        if level.bits == bits:
                            per_level[slot][name] = base if not level.rank else Compensated(
                                base, torch.from_numpy(arrays[f"{key}.eora{level.rank}.b"]),
                                torch.from_numpy(arrays[f"{key}.eora{level.rank}.a"]), scheme.rank_bits,
                                scheme.group_size)
            found.append(per_level)
    return found


def unit_index(block: int, name: str) -> int:
    """The unit a linear belongs to, by its block's index and its name in the block."""
    return len(GROUPS) * block + next(i for i, names in enumerate(GROUPS.values()) if name in names)


def unit_names(module: torch.nn.Module) -> list[str]:
    return [f"layers.{index}.{group}" for index in range(len(llm.decoder_layers(module))) for group in GROUPS]


def _varint_length(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def graph_shares(graph: onnx.ModelProto, units: int) -> dict[str, Any]:
    """What each unit's nodes and initializers take in the serialized graph (`bytes`, one repeated-field entry each:
    tag, length, message; an entry is the unit's whose scope its name, or else one of its values, is in), the
    weights it streams (`weights`: its initializers' data) and how many kernels it launches (`nodes`); the file's
    and the graph's own size."""
    from edgekit.verify.estimate_lm import METADATA_OPS

    owned: np.ndarray = np.zeros((units, 3), np.int64)  # bytes, kernels, weights
    entries: list[tuple[Any, list[str], bool, int]] = [
        (node, [node.name, *node.output, *node.input], node.op_type not in METADATA_OPS, 0)
        for node in graph.graph.node]
    entries += [(init, [init.name], False, len(init.raw_data) or init.ByteSize()) for init in graph.graph.initializer]
    for entry, names, kernel, weights in entries:
        owner = next((m for m in map(_OWNER.search, names) if m), None)
        if owner is not None:
            size = entry.ByteSize()
            unit = len(GROUPS) * int(owner.group(1)) + list(GROUPS).index(owner.group(2))
            owned[unit] += (1 + _varint_length(size) + size, kernel, weights)
    return {"size": graph.ByteSize(), "graph": graph.graph.ByteSize(), "bytes": owned[:, 0].tolist(),
            "nodes": owned[:, 1].tolist(), "weights": owned[:, 2].tolist()}


@dataclass
class LanguageModelSpace:
    """The search's `Space` (edgekit/search/evolve.py) over a decoder's attention and MLP groups. `working` is a
    copy of the original whose head and table are quantized; `stitch` swaps each unit's modules into it."""

    original: torch.nn.Module
    working: torch.nn.Module
    found: list[list[dict[str, torch.nn.Module]]]  # unit -> level -> linear name in the block -> module
    labels: list[str]
    windows: torch.Tensor  # calibration token windows fitness reads, first ones first
    teacher: torch.Tensor  # the original's last block outputs on them
    basis: str
    sizing: str = "the artifact file's, each unit's share measured in one export per level"
    units: list[Unit] = field(default_factory=list)  # set by `set_costs`
    base: Costs = field(default_factory=Costs)
    current: list[int | None] = field(init=False)

    def __post_init__(self) -> None:
        self.current = [None] * len(self.found)
        self.names = unit_names(self.working)
        self.kept = KeptOutputs()  # block outputs by the levels up to the block
        self.wanted = KeptOutputs()  # the original's next-token log-probabilities, by batch

    @property
    def samples(self) -> int:
        return len(self.windows)

    def stitch(self, config: Config) -> torch.nn.Module:
        """`working` with each unit at its level: only units that changed are swapped."""
        blocks = llm.decoder_layers(self.working)
        for unit, level in enumerate(config):
            if self.current[unit] != level:
                block = blocks[unit // len(GROUPS)]
                for name, module in self.found[unit][level].items():
                    block.set_submodule(name, module)
                self.current[unit] = level
        return self.working

    def fitness(self, config: Config, samples: int) -> float:
        """Mean KL(original ‖ stitched) per token of next-token distributions on the first `samples` windows.

        Block by block: a block's outputs are kept under the levels of the units up to it (a child shares its
        parent's up to its first changed unit, and starts there), and the original's log-probabilities once."""
        import torch

        from edgekit.passes.distill import kl_from_log_probs, log_probs

        model = self.stitch(config)
        blocks = llm.decoder_layers(model)
        total = 0.0
        with torch.no_grad():
            for batch, ids in enumerate(self.windows[:samples].split(FITNESS_BATCH)):
                hidden, kwargs = llm.block_inputs(model, ids)
                start = 0
                for index in reversed(range(len(blocks))):
                    kept = self.kept.get((config[: len(GROUPS) * (index + 1)], batch), len(ids))
                    if kept is not None:
                        hidden, start = kept, index + 1
                        break
                for index in range(start, len(blocks)):
                    hidden = blocks[index](hidden, **kwargs)
                    self.kept.put((config[: len(GROUPS) * (index + 1)], batch), hidden)
                wanted = self.wanted.get(batch, len(ids))  # [windows, tokens, vocabulary]
                if wanted is None:
                    teacher = self.teacher[batch * FITNESS_BATCH:][: len(ids)]
                    wanted = log_probs(llm.head(self.original, teacher)).unflatten(0, teacher.shape[:2])
                    self.wanted.put(batch, wanted)
                total += float(kl_from_log_probs(log_probs(llm.head(model, hidden)), wanted.flatten(0, 1))) * len(ids)
        return total / samples

    def schemes(self, config: Config, scheme: WeightScheme) -> Callable[[int, str], WeightScheme]:
        """Each linear's weight scheme at `config`'s levels (by block index and name): the sequential requantization
        of the chosen configuration compresses every layer as its level says."""
        def scheme_of(block: int, name: str) -> WeightScheme:
            bits, rank = weight_level(self.labels[config[unit_index(block, name)]])
            return replace(scheme, bits=bits, rank=rank, ranks=())

        return scheme_of


    def set_costs(self, shares: list[dict[str, Any]], base: dict[str, Any],
                  decode_ms: Callable[[dict[str, Any]], float]) -> None:
        """Each unit's levels with their costs relative to the all-first-level model: bytes and streamed weights
        from the uniform exports' `shares` (one per level; the first also holds the file's `size`, and an ONNX
        graph's own size as `graph`), latency from `decode_ms` on the first level's analysis (`base`) changed by
        the unit's streamed bytes, kernels and parameters."""
        params = module_params(self.found)
        first = shares[0]

        def ms(unit: int, level: int) -> float:
            return decode_ms({**base,
                              "weight_bytes": base["weight_bytes"] + shares[level]["weights"][unit]
                              - first["weights"][unit],
                              "nodes": base["nodes"] + shares[level]["nodes"][unit] - first["nodes"][unit],
                              "params": base["params"] + params[unit, level] - params[unit, 0]})

        deltas = np.array([share["bytes"] for share in shares]).T - np.array(first["bytes"])[:, None]
        prefix = 0  # an ONNX graph's length prefix: a byte longer for configurations whose sizes straddle 2^(7k)
        if "graph" in first:
            graph = (first["graph"] + deltas.min(1).sum(), first["graph"] + deltas.max(1).sum())
            prefix = _varint_length(int(graph[1])) - _varint_length(int(graph[0]))
        start = decode_ms(base)
        self.base = Costs(bytes=first["size"] + prefix, latency_ms=start)
        self.units = [Unit(name, tuple(Level(label, Costs(bytes=int(deltas[unit, level]),
                                                          latency_ms=ms(unit, level) - start))
                                       for level, label in enumerate(self.labels)))
                      for unit, name in enumerate(self.names)]


def kl_to_original(original: torch.nn.Module, model: torch.nn.Module, windows: torch.Tensor,
                   teacher: torch.Tensor) -> float:
    """Mean KL(original ‖ model) per token of next-token distributions on `windows`, the original's side read from
    its last block's outputs (`teacher`)."""
    import torch

    from edgekit.passes.distill import next_token_kl

    total = 0.0
    with torch.no_grad():
        for ids, hidden in zip(windows.split(FITNESS_BATCH), teacher.split(FITNESS_BATCH), strict=True):
            total += float(next_token_kl(llm.logits(model, ids), [llm.head(original, hidden)])) * len(ids)
    return total / len(windows)


def module_params(found: list[list[dict[str, torch.nn.Module]]]) -> np.ndarray:
    """[unit, level] parameters (EoRA factors included)."""
    return np.array([[sum(p.numel() for m in level.values() for p in m.parameters()) for level in unit]
                     for unit in found], np.int64)


def record_search(space: LanguageModelSpace, result: SearchResult, budget: str, seed: int) -> dict[str, Any]:
    """The report's `search` block (the image search's shape), with each configuration's decode rate."""
    return {
        "budget": budget,
        "method": "EvoPress-style evolutionary search (level-switch mutations within the budget, selection in steps "
                  "on 4, 16 and all fitness windows); every level of every linear computed once (GPTQ, EoRA) from "
                  "the original model's calibration activations",
        "costs": f"decode latency {space.basis}; bytes: {space.sizing}",
        "fitness": f"KL(original ‖ candidate) of next-token distributions per token, mean over the first "
                   f"{space.samples} calibration windows",
        **result.record(space.labels, space.names, seed,
                        lambda s: {"tokens_per_s": round(1e3 / s.costs.latency_ms, 2)}),
    }


def chosen_layers(space: LanguageModelSpace, config: Config) -> list[dict[str, Any]]:
    """The quantization block's rows for the chosen configuration: each linear's bits, EoRA rank and bytes."""
    import torch

    from edgekit.passes.sequential import stored_bytes

    rows = []
    for unit, level in enumerate(config):
        bits, rank = weight_level(space.labels[level])
        for name, module in space.found[unit][level].items():
            rows.append({"block": unit // len(GROUPS), "layer": name, "bits": bits, "eora_rank": rank,
                         "bytes": sum(stored_bytes(m) for m in module.modules() if isinstance(m, torch.nn.Linear))})
    return rows

