"""Candidates scored on a Ray cluster: the search's children of one selection step, many at once.

Each actor holds its own copy of the space (shipped once through the object store) and computes `fitness` as the
build's own process would, on as many torch threads as the build uses, so the values (and with them the search's
path and its result) are the same as scoring in the build's process. The search itself, its random draws and its
memo stay in the build's process; only the forward passes move.

`address` is Ray's: `auto` (the cluster this machine belongs to), `ray://head:10001`, or `local` for a Ray started
in this process (the fleet's local Ray: this machine's cores, no dashboard).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import edgekit.families  # noqa: F401  # a space's pass module imports the families package: first, as a build does
from edgekit.errors import UsageError
from edgekit.search.evolve import Config, Scorer, Space

LOCAL_OBJECT_STORE = 300 * 2**20


class _Scoring:
    """One Ray actor: a copy of the space, computing fitness on `threads` torch threads."""

    def __init__(self, space: Space, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.space = space

    def fitness(self, config: Config, samples: int) -> float:
        return float(self.space.fitness(config, samples))


@contextlib.contextmanager
def ray_scorer(space: Space, address: str | None) -> Iterator[Scorer | None]:
    """A function scoring a list of configurations on `samples` samples with Ray actors (each on this process's
    torch thread count and as many of the cluster's CPUs; at most 64), or None where no address is given: the
    search scores in this process."""
    if address is None:
        yield None
        return
    import ray
    import torch
    from ray.util import ActorPool

    threads = torch.get_num_threads()
    started = not ray.is_initialized()
    if started:
        if address == "local":
            from edgekit.fleet import start_local_ray

            start_local_ray(os.cpu_count() or 1, LOCAL_OBJECT_STORE)
        else:
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            except (ConnectionError, ValueError, RuntimeError) as err:
                raise UsageError(f"no Ray cluster at {address!r}: {err}") from None
    actors: list[Any] = []
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        actor = ray.remote(num_cpus=threads)(_Scoring)
        shipped = ray.put(space)
        actors += [actor.remote(shipped, threads) for _ in range(max(1, min(64, cpus // threads)))]

        def score(configs: list[Config], samples: int) -> list[float]:
            pool: Any = ActorPool(actors)
            return list(pool.map(lambda a, config: a.fitness.remote(config, samples), configs))

        yield score
    finally:  # a joined cluster keeps running; its actors do not
        for handle in actors:
            ray.kill(handle)
        if started:
            ray.shutdown()
