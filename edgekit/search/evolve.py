"""Per-unit compression levels under a budget: the evolutionary search of EvoPress (Sieberling et al., 2024).

Uniform compression (the same share of every layer) spends the budget where it hurts: some blocks lose
little when halved, others break at 10%. The search chooses a level per unit instead, on a `Space` it
knows nothing else about:

    class Space(Protocol):
        units: Sequence[Unit]    # the independently compressible parts; each has levels, least compressed first
        base: Costs              # costs of the model around the units' levels: config cost = base + Σ deltas
        samples: int             # calibration samples `fitness` can read
        basis: str               # where latencies come from, for messages: "estimated: raspberry-pi-5"
        def fitness(self, config: Config, samples: int) -> float: ...

- A `Unit` is a name and its `Level`s; each level has a label ("0.3": the share of the unit's channels
  removed) and additive cost deltas (`Costs`: MACs, bytes, estimated latency on the target). A configuration
  is one level index per unit, and its cost is `base` plus the sum of its levels' deltas: that is how the
  search keeps every candidate within the budget without building it. Additivity is exact where a unit's
  levels change only what is inside the unit (passes/levels.py checks it op by op).
- `fitness(config, samples)` says how far the model stitched from `config` is from the original, lower is
  better, on the first `samples` calibration samples of a fixed order: a pure function of its arguments (the
  search memoises it), and never computed on evaluation data.

The loop (EvoPress's (1 + λ) algorithm, level-switch mutations, multi-step selection):
1. The parent starts as the uniform configuration nearest the budget: the least compressed one within it.
   If no uniform one fits, the cheapest configuration (each unit at its cheapest level); if that misses too,
   `BudgetUnreachable` names its cost. Then units step to less compressed levels while the budget holds, the
   most compressed first (at random among equals), so that the search starts on the budget's edge and as near
   uniform as it can: where two uniform levels lie far apart in cost (int4 and int4 + EoRA for every linear of a
   language model), the uniform start leaves much of the budget unspent, and mutations that keep their parent's
   cost would never spend it. The uniform configuration is scored too, and the better of the two starts.
2. Each generation draws `offspring` children: one to three units (fewer more often) step to a less
   compressed level, then random units step to more compressed ones until the budget holds again. A child
   needing more than `MAX_SWITCHES` steps, or giving back far more budget than it took (a taken/returned
   ratio under `MIN_TAKEN`), is redrawn, as is a duplicate: children stay near the budget's edge, where the
   best configurations are.
3. Selection in steps (`stages`): every child scored on a few samples, the best few on more, and so on;
   the last survivor and the parent on all samples, the better one the next parent. Most candidates cost a
   few samples' forward passes; only the close calls are measured carefully.

A seeded numpy Generator drives every draw, so a seed and a space give the same result, as long as the
generation bound (not `seconds`) ends the search.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.search.budget import Budget, Metric

MAX_SWITCHES = 10  # level steps a child may differ from its parent by
MIN_TAKEN = 0.8  # a child gives back at most 1/0.8 of the budget it took from the parent's other units
DEFAULT_STAGES = ((4, 4), (16, 1))  # (samples, survivors): 16 children on 4 samples, 4 on 16, then 1 vs parent on all

Config = tuple[int, ...]
Scorer = Callable[[list[Config], int], list[float]]  # many configurations' fitness on `samples` samples at once


@dataclass(frozen=True)
class Costs:
    """Additive costs: a whole model's, or one level's change to them."""

    macs: float = 0.0
    bytes: float = 0.0
    latency_ms: float = 0.0

    def __add__(self, other: Costs) -> Costs:
        return Costs(self.macs + other.macs, self.bytes + other.bytes, self.latency_ms + other.latency_ms)

    def of(self, metric: Metric) -> float:
        return float(getattr(self, metric))


@dataclass(frozen=True)
class Level:
    label: str
    delta: Costs


@dataclass(frozen=True)
class Unit:
    name: str
    levels: tuple[Level, ...]


class Space(Protocol):
    """Read-only members: a space may hold them as attributes or compute them."""

    @property
    def units(self) -> Sequence[Unit]: ...

    @property
    def base(self) -> Costs: ...

    @property
    def samples(self) -> int: ...

    @property
    def basis(self) -> str: ...

    def fitness(self, config: Config, samples: int) -> float:
        """Distance of the model built from `config` to the original on the first `samples` calibration samples."""


def cost(space: Space, config: Config) -> Costs:
    """What `config` costs: the base plus each unit's level delta."""
    total = space.base
    for unit, level in zip(space.units, config, strict=True):
        total = total + unit.levels[level].delta
    return total


def uniform(space: Space, level: int) -> Config:
    """Every unit at `level` (or its most compressed one, where it has fewer)."""
    return tuple(min(level, len(unit.levels) - 1) for unit in space.units)


@dataclass(frozen=True)
class Scored:
    """A configuration, its fitness on the most samples it was scored on, and its costs."""

    config: Config
    fitness: float
    samples: int
    costs: Costs


@dataclass
class SearchResult:
    best: Scored
    uniform: Scored | None  # the uniform configuration nearest the budget (None: no uniform one meets it)
    scored: list[Scored] = field(repr=False)  # every configuration scored, in the order first scored
    generations: int = 0
    seconds: float = 0.0
    evaluations: int = 0  # fitness computations (memoised repeats not counted)

    def front(self) -> list[Scored]:
        """The configurations scored on all samples that no other beats in fitness, latency, bytes and MACs at
        once (fitnesses on fewer samples are too noisy to rank against them)."""
        full = [s for s in self.scored if s.samples == self.best.samples]

        def key(s: Scored) -> tuple[float, ...]:
            return s.fitness, s.costs.latency_ms, s.costs.bytes, s.costs.macs

        return sorted((s for s in full if not any(_dominates(key(o), key(s)) for o in full)), key=key)

    def record(self, labels: Sequence[str], names: Sequence[str], seed: int,
               extra: Callable[[Scored], dict[str, Any]]) -> dict[str, Any]:
        """What every family's report `search` block says of the outcome: each unit's level, the chosen and the
        uniform configuration, the front, and the search's size and time. A configuration's entry holds its
        levels (by `labels`), fitness, samples, bytes and estimated latency, and `extra(scored)`."""

        def point(scored: Scored) -> dict[str, Any]:
            return {"levels": [labels[level] for level in scored.config], "fitness": scored.fitness,
                    "samples": scored.samples, "latency_ms": round(scored.costs.latency_ms, 4),
                    "bytes": int(scored.costs.bytes), **extra(scored)}

        uniform = self.uniform
        return {
            "levels": list(labels),
            "units": [{"name": name, "level": labels[level]} for name, level in zip(names, self.best.config,
                                                                                    strict=True)],
            "chosen": point(self.best),
            "uniform": None if uniform is None else {"level": labels[max(uniform.config)], **point(uniform)},
            "front": [point(s) for s in self.front()],
            "candidates": len(self.scored),
            "evaluations": self.evaluations,
            "generations": self.generations,
            "seconds": self.seconds,
            "seed": seed,
        }


def _dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and a != b


class BudgetUnreachable(EdgekitError):
    """No configuration meets the budget: the build stops with exit code 1, naming the closest one's cost."""

    exit_code = 1

    def __init__(self, budget: Budget, closest: Costs, basis: str) -> None:
        where = f" ({basis})" if budget.metric == "latency_ms" else ""
        super().__init__(f"no configuration meets the budget {budget.text}: the closest (every unit at its "
                         f"cheapest level) is {budget.format(closest.of(budget.metric))}{where}")
        self.closest = closest


def evolve(space: Space, budget: Budget, *, seed: int, generations: int = 50, seconds: float = 600.0,
           offspring: int = 16, stages: Sequence[tuple[int, int]] = DEFAULT_STAGES,
           progress: Callable[[Iterable[int], int], Iterable[int]] | None = None,
           score_many: Scorer | None = None) -> SearchResult:
    """The configuration of `space` with the lowest fitness the search finds within `budget`, in at most
    `generations` generations and about `seconds` seconds (a generation started is finished). `score_many`
    scores each selection step's candidates together (on Ray: `search/remote.py`) where given; the fitness values,
    and so the result, are the same."""
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    deltas = [[level.delta.of(budget.metric) for level in unit.levels] for unit in space.units]

    def spent(config: Config | list[int]) -> float:
        return cost(space, tuple(config)).of(budget.metric)

    cheapest = tuple(int(np.argmin(d)) for d in deltas)
    if not budget.allows(spent(cheapest)):
        raise BudgetUnreachable(budget, cost(space, cheapest), space.basis)
    depth = max(len(unit.levels) for unit in space.units)
    start_uniform = next((c for c in (uniform(space, level) for level in range(depth)) if budget.allows(spent(c))),
                         None)

    memo: dict[tuple[Config, int], float] = {}
    known: dict[Config, Scored] = {}

    def remember(config: Config, samples: int, fitness: float) -> None:
        memo[config, samples] = fitness
        if config not in known or known[config].samples < samples:
            known[config] = Scored(config, fitness, samples, cost(space, config))

    def score(config: Config, samples: int) -> float:
        samples = min(samples, space.samples)
        if (config, samples) not in memo:
            remember(config, samples, float(space.fitness(config, samples)))
        return memo[config, samples]

    def score_all(configs: list[Config], samples: int) -> None:
        samples = min(samples, space.samples)
        missing = [config for config in configs if (config, samples) not in memo]
        if score_many is not None and missing:
            for config, fitness in zip(missing, score_many(missing, samples), strict=True):
                remember(config, samples, float(fitness))

    def child_of(parent: Config) -> Config | None:
        child = list(parent)
        taken = returned = 0.0
        steps = int(min(rng.integers(1, 4), rng.integers(1, 4)))
        for _ in range(steps):
            lowerable = [u for u, level in enumerate(child) if level > 0]
            if not lowerable:
                return None
            u = lowerable[rng.integers(len(lowerable))]
            taken += deltas[u][child[u] - 1] - deltas[u][child[u]]
            child[u] -= 1
        while not budget.allows(spent(child)):
            saving = [u for u, level in enumerate(child) if level + 1 < len(deltas[u])
                      and deltas[u][level + 1] < deltas[u][level]]
            if not saving or steps >= MAX_SWITCHES:
                return None
            u = saving[rng.integers(len(saving))]
            returned += deltas[u][child[u]] - deltas[u][child[u] + 1]
            child[u] += 1
            steps += 1
        if returned > 0 and taken < MIN_TAKEN * returned:
            return None
        return tuple(child)

    def filled(config: Config) -> Config:
        child = list(config)
        while True:
            now = spent(child)
            raisable = [u for u, level in enumerate(child) if level > 0
                        and budget.allows(now - deltas[u][level] + deltas[u][level - 1])]
            if not raisable:
                return tuple(child)
            most = max(child[u] for u in raisable)
            raisable = [u for u in raisable if child[u] == most]
            child[raisable[rng.integers(len(raisable))]] -= 1

    starts = list(dict.fromkeys([start_uniform or cheapest, filled(start_uniform or cheapest)]))
    parent = min(starts, key=lambda c: score(c, space.samples))
    done = 0
    rounds = progress(range(generations), generations) if progress else range(generations)
    for _ in rounds:
        if time.perf_counter() - start > seconds:
            break
        children: list[Config] = []
        for _attempt in range(100 * offspring):
            if len(children) == offspring:
                break
            child = child_of(parent)
            if child is not None and child != parent and child not in children:
                children.append(child)
        if not children:  # no move keeps the budget: the parent is the only candidate
            break
        for samples, survivors in stages:
            score_all(children, samples)
            children = sorted(children, key=partial(score, samples=samples))[:survivors]
        score_all(children, space.samples)
        parent = min([*children, parent], key=lambda c: score(c, space.samples))
        done += 1
    return SearchResult(best=known[parent], uniform=known[start_uniform] if start_uniform else None,
                        scored=list(known.values()), generations=done, seconds=round(time.perf_counter() - start, 2),
                        evaluations=len(memo))
