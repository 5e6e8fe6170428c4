"""The budget parser and the evolutionary search on synthetic spaces whose best configuration is known."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import pytest

from edgekit.errors import UsageError
from edgekit.search import BudgetUnreachable, Config, Costs, Level, Unit, evolve, parse_budget
from edgekit.search.evolve import cost


@dataclass
class ToySpace:
    """Units with unequal costs and sensitivities: the best configuration compresses the cheap-to-lose, costly
    units most, which no uniform configuration does. Fitness is exact; `calls` records every request."""

    weights: np.ndarray  # latency a unit saves per level step
    sensitivity: np.ndarray  # fitness a unit loses per squared level
    levels: int = 5
    samples: int = 32
    basis: str = "toy latencies"
    calls: list[tuple[Config, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.units = [Unit(f"u{i}", tuple(Level(f"{0.1 * k:.1f}", Costs(macs=-k * w * 1e6, latency_ms=-k * w))
                                          for k in range(self.levels))) for i, w in enumerate(self.weights)]
        self.base = Costs(macs=float(self.weights.sum()) * 10e6, latency_ms=float(self.weights.sum()) * 10)

    def true_fitness(self, config: Config) -> float:
        return float(np.dot(self.sensitivity, np.square(config)))

    def fitness(self, config: Config, samples: int) -> float:
        self.calls.append((config, samples))
        return self.true_fitness(config)


def _toy(seed: int = 1, units: int = 6) -> ToySpace:
    rng = np.random.default_rng(seed)
    return ToySpace(weights=rng.uniform(0.5, 3.0, units), sensitivity=rng.uniform(0.1, 2.0, units))


def _brute_force(space: ToySpace, limit: float) -> tuple[Config, float]:
    feasible = [c for c in itertools.product(range(space.levels), repeat=len(space.units))
                if cost(space, c).latency_ms <= limit]
    best = min(feasible, key=space.true_fitness)
    return best, space.true_fitness(best)


@pytest.mark.parametrize("text, metric, limit", [
    ("latency=6ms", "latency_ms", 6.0), ("latency=500us", "latency_ms", 0.5), ("size=4MB", "bytes", 4e6),
    ("bytes=90MiB", "bytes", 90 * 2**20), ("macs=1.5G", "macs", 1.5e9), ("macs=3e8", "macs", 3e8),
    ("tokens_per_s=20", "latency_ms", 50.0)])
def test_budget_text_becomes_a_limit_on_one_cost(text: str, metric: str, limit: float) -> None:
    budget = parse_budget(text)
    assert (budget.metric, budget.text) == (metric, text)
    assert budget.limit == pytest.approx(limit)


@pytest.mark.parametrize("text", ["latency=6", "speed=3ms", "size=-1MB", "macs=1.5Gx", "latency=0ms", "size=",
                                  "6ms", "tokens_per_s=fast"])
def test_bad_budget_text_is_a_one_line_usage_error(text: str) -> None:
    with pytest.raises(UsageError) as raised:
        parse_budget(text)
    assert "\n" not in str(raised.value) and repr(text) in str(raised.value)


def test_search_finds_the_known_best_configuration_and_beats_uniform() -> None:
    space = _toy()
    limit = cost(space, (2,) * 6).latency_ms  # exactly uniform level 2's latency
    best, best_fitness = _brute_force(space, limit)
    result = evolve(space, parse_budget(f"latency={limit}ms"), seed=0, generations=80)
    assert result.uniform is not None and result.uniform.config == (2,) * 6
    assert result.best.config == best and result.best.fitness == pytest.approx(best_fitness)
    assert result.best.fitness < result.uniform.fitness


def test_every_scored_candidate_keeps_the_budget() -> None:
    space = _toy(seed=3, units=8)
    budget = parse_budget(f"latency={cost(space, (3,) * 8).latency_ms + 0.5}ms")
    result = evolve(space, budget, seed=5, generations=30)
    assert len(result.scored) > 100
    assert all(cost(space, config).latency_ms <= budget.limit for config, _ in space.calls)
    assert all(s.costs == cost(space, s.config) for s in result.scored)


def test_same_seed_same_search_and_fitness_is_memoised() -> None:
    runs = [_toy(seed=2) for _ in range(3)]
    budget = parse_budget(f"macs={cost(runs[0], (2,) * 6).macs / 1e9}G")
    results = [evolve(space, budget, seed=seed, generations=15) for space, seed in zip(runs, (7, 7, 8), strict=True)]
    assert runs[0].calls == runs[1].calls and results[0].best == results[1].best
    assert runs[0].calls != runs[2].calls  # the seed drives the draws
    assert len(set(runs[0].calls)) == len(runs[0].calls) == results[0].evaluations


def test_selection_scores_most_children_on_few_samples() -> None:
    space = _toy()
    evolve(space, parse_budget(f"latency={cost(space, (2,) * 6).latency_ms}ms"), seed=0, generations=10,
           offspring=16, stages=((4, 4), (16, 1)))
    by_samples = {n: sum(1 for _, m in space.calls if m == n) for n in (4, 16, 32)}
    assert by_samples[4] > by_samples[16] > by_samples[32] > 0
    assert set(by_samples) == {n for _, n in space.calls}


def test_unreachable_budget_names_the_closest_configuration() -> None:
    space = _toy()
    cheapest = cost(space, (4,) * 6).latency_ms
    with pytest.raises(BudgetUnreachable) as raised:
        evolve(space, parse_budget(f"latency={cheapest * 0.9}ms"), seed=0)
    assert raised.value.exit_code == 1 and raised.value.closest.latency_ms == pytest.approx(cheapest)
    assert f"{cheapest:.3f} ms" in str(raised.value) and "toy latencies" in str(raised.value)


def test_a_budget_the_original_meets_keeps_every_unit_whole() -> None:
    space = _toy()
    result = evolve(space, parse_budget(f"latency={space.base.latency_ms}ms"), seed=0, generations=5)
    assert result.best.config == (0,) * 6 == result.uniform.config
    assert result.front() == [result.best]


def test_time_bound_stops_the_search() -> None:
    space = _toy()
    budget = parse_budget(f"latency={cost(space, (2,) * 6).latency_ms}ms")
    result = evolve(space, budget, seed=0, generations=1000, seconds=0.0)
    assert result.generations == 0 and result.best == result.uniform


def test_the_search_starts_on_the_budget_edge_between_two_uniform_levels() -> None:
    space = _toy()
    limit = (cost(space, (1,) * 6).latency_ms + cost(space, (2,) * 6).latency_ms) / 2
    result = evolve(space, parse_budget(f"latency={limit}ms"), seed=0, generations=0)
    assert result.uniform is not None and result.uniform.config == (2,) * 6
    best = result.best.config
    assert cost(space, best).latency_ms <= limit and result.best.fitness < result.uniform.fitness
    # no unit could step to a less compressed level without breaking the budget
    for unit, level in enumerate(best):
        if level:
            raised = (*best[:unit], level - 1, *best[unit + 1:])
            assert cost(space, raised).latency_ms > limit
