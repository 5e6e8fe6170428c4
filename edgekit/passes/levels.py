"""The level database of a torch image model, and the search space built on it (edgekit/search/evolve.py).

A unit is a block the family names (an inverted residual, a C3k2, one branch of a detection head). It is pruned
only in channels that stay inside it: a channel group whose removal would change the unit's input or output
shape stays whole (`internal_keep` finds them by trying). One unit's level then never changes another's
layers, and a model stitched from any mix of levels is exactly its variants side by side.

Each unit's variant at each level (a share of its internal channels) is computed once: Torch-Pruning on the unit,
FLAP ranking and bias compensation from the unit's own calibration inputs, and a least-squares refit of its
layers towards the original unit's outputs on those inputs (`prune_channels`). Variants are cached by model,
calibration images, levels and edgekit version; their costs also by target, format and precision.

Costs come from the device model on the artifact as the build makes it: the model with every unit at level l is
exported in the build's format and precision, analysed and estimated op by op, and each op's change from level 0 is
charged to the unit whose scope its name carries. So a configuration's cost is the level-0 artifact's plus its
units' deltas; a changed op that no unit claims, or that two claim, stops the build, since the sum would be wrong.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekit import __version__
from edgekit.errors import StageError, UsageError
from edgekit.search.evolve import Config, Costs, Level, SearchResult, Unit, cost, evolve, uniform
from edgekit.search.kept import KeptOutputs

if TYPE_CHECKING:
    import torch

    from edgekit.cache import ArrayCache
    from edgekit.families.base import FloatParts
    from edgekit.families.image import ImageFamily as Family
    from edgekit.passes.analyze import Analysis
    from edgekit.progress import Progress
    from edgekit.recipe import Recipe
    from edgekit.search.budget import Budget
    from edgekit.targets import Target

BATCH = 8  # images through a stitched model at once


def internal_keep(unit: torch.nn.Module, example: torch.Tensor, keep: list[str]) -> list[str] | None:
    """Names of the layers of `unit` whose output channels pruning must keep so that only channels internal to the
    unit go (`keep` first: the family's own); None when the unit has no internal channel group at all."""
    internal, external = channel_roots(unit, example, keep)
    return [*keep, *external] if internal else None


def channel_roots(unit: torch.nn.Module, example: torch.Tensor, keep: list[str]) -> tuple[list[str], list[str]]:
    """The layers of `unit` whose output channels start a channel group (the family's `keep` aside): those whose
    group stays inside the unit, and those whose group reaches its input or output.

    Each group is tried on a copy of the unit: one channel removed, the copy must still take the unit's input and
    give an output of the unit's shape. The unit itself is not changed."""
    import torch

    unit = copy.deepcopy(unit)
    with torch.no_grad():
        shape = unit(example).shape
    kept = [layer for name in keep for layer in unit.get_submodule(name).modules()]
    names = {module: name for name, module in unit.named_modules()}
    graph = _dependency_graph(unit, example)
    roots = [names[group[0].dep.target.module] for group in graph.get_all_groups(ignored_layers=kept)
             if len(group[0].idxs) > 1]
    internal: list[str] = []
    external: list[str] = []
    for root in roots:
        trial = copy.deepcopy(unit)
        layer = trial.get_submodule(root)
        trial_graph = _dependency_graph(trial, example)
        pruner = trial_graph.get_pruner_of_module(layer)
        try:
            trial_graph.get_pruning_group(layer, pruner.prune_out_channels, [0]).prune()
            with torch.no_grad():
                fits = trial(example).shape == shape
        except (RuntimeError, ValueError, IndexError):  # the unit's input no longer fits its first layers
            fits = False
        (internal if fits else external).append(root)
    return internal, external


def own_keep(unit: torch.nn.Module, family_keep: list[torch.nn.Module]) -> list[str]:
    """The names, within `unit`, of the family's kept layers that lie inside it."""
    names = {module: path for path, module in unit.named_modules()}
    return [names[layer] for layer in family_keep if layer in names]


def _dependency_graph(module: torch.nn.Module, example: torch.Tensor) -> Any:
    import torch_pruning as tp

    from edgekit.passes.prune import traceable

    traceable(module)
    return tp.DependencyGraph().build_dependency(module, example_inputs=example)


@dataclass
class Variants:
    """Every unit's modules, one per level (level 0: the original unit), and the labels of the levels."""

    names: list[str]
    labels: list[str]
    modules: list[list[torch.nn.Module]]


def unit_inputs(model: torch.nn.Module, images: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """Each unit's input over `images`, in the original model."""
    from edgekit.passes.reconstruct import recorded

    found = recorded(model, images, [], names)
    return {name: found[name, False] for name in names}


def variants(model: torch.nn.Module, units: list[tuple[str, torch.nn.Module]], family_keep: list[torch.nn.Module],
             images: np.ndarray, ratios: list[float], cache: ArrayCache, key: dict[str, Any],
             progress: Callable[[list[Any]], Iterable[Any]]) -> Variants:
    """The level database's modules: each unit pruned at each ratio (`ratios[0]` is 0: the unit as it is) and
    refitted on `images`, from the cache where it has them. Units without internal channels are left out;
    `model` is not changed."""
    import torch

    from edgekit.passes.prune import prune_channels

    inputs = unit_inputs(model, torch.as_tensor(images), [name for name, _ in units])
    plans = []
    for name, unit in units:
        keep = internal_keep(unit, inputs[name][:1], own_keep(unit, family_keep))
        if keep is not None:
            plans.append((name, unit, keep))
    if not plans:
        raise UsageError("no search unit of this model has channels of its own to prune")

    def compute() -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        work = [(name, unit, keep, level) for name, unit, keep in plans for level in range(1, len(ratios))]
        for name, unit, keep, level in progress(work):
            pruned = copy.deepcopy(unit)
            prune_channels(pruned, tuple(inputs[name][:1].shape), ratios[level],
                           [pruned.get_submodule(k) for k in keep], inputs[name])
            arrays |= variant_arrays(name, level, pruned)
        return arrays

    stored = cache.get_or_compute({**key, "units": [[name, keep] for name, _, keep in plans]}, compute)
    return stored_variants([(name, unit) for name, unit, _ in plans], ratios, stored)


def variant_arrays(name: str, level: int, module: torch.nn.Module) -> dict[str, np.ndarray]:
    """Unit `name`'s variant at `level` as cache arrays (`stored_variants` reads them back)."""
    return {f"{name}|{level}|{param}": value.detach().cpu().numpy() for param, value in module.state_dict().items()}


def stored_variants(units: list[tuple[str, torch.nn.Module]], ratios: list[float], stored: dict[str, np.ndarray],
                    settle: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> Variants:
    """The level database from its arrays: each unit as it is, then a copy of it per level with the stored shapes
    and values (`settle` tells a family's own modules their new sizes)."""
    import torch

    modules = []
    for name, unit in units:
        row = [copy.deepcopy(unit).eval()]
        for level in range(1, len(ratios)):
            prefix = f"{name}|{level}|"
            state = {k[len(prefix):]: torch.from_numpy(v) for k, v in stored.items() if k.startswith(prefix)}
            variant = _load_pruned(copy.deepcopy(unit), state)
            row.append(settle(variant) if settle else variant)
        modules.append(row)
    return Variants([name for name, _ in units], [f"{r:g}" for r in ratios], modules)


def _load_pruned(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """`module` (a copy of an unpruned unit) with the channel counts of the pruned `state`, then its values."""
    import torch

    for name, layer in module.named_modules():
        prefix = f"{name}." if name else ""
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        if not own:
            continue
        weight = own.get("weight")
        if isinstance(layer, torch.nn.Conv2d) and weight is not None:
            depthwise = 1 < layer.groups == layer.in_channels
            layer.out_channels = weight.shape[0]
            layer.groups = weight.shape[0] if depthwise else layer.groups
            layer.in_channels = weight.shape[1] * layer.groups
        elif isinstance(layer, torch.nn.modules.batchnorm._BatchNorm) and weight is not None:
            layer.num_features = weight.shape[0]
        elif isinstance(layer, torch.nn.Linear) and weight is not None:
            layer.out_features, layer.in_features = weight.shape
        for key, value in own.items():
            if key in layer._buffers:
                layer._buffers[key] = torch.empty_like(value)
            else:
                setattr(layer, key, torch.nn.Parameter(torch.empty_like(value), requires_grad=False))
    module.load_state_dict(state)
    return module.eval()


class ImageSpace:
    """The search space of a torch image model (the `Space` of edgekit/search/evolve.py): a configuration is stitched
    from the variants (unit modules swapped in place, nothing recomputed); its costs are the level database's, its
    fitness the family's output distance to the original on calibration images."""

    def __init__(self, model: torch.nn.Module, found: Variants, images: np.ndarray,
                 targets: Callable[[torch.nn.Module, torch.Tensor], list[torch.Tensor]],
                 distance: Callable[[list[torch.Tensor], list[torch.Tensor]], torch.Tensor],
                 price: Callable[[torch.nn.Module], tuple[Analysis, int]], target: Target, cache: ArrayCache,
                 key: dict[str, Any], teacher: torch.nn.Module | None = None) -> None:
        """`price(module)`: the analysis and size in bytes of `module`'s artifact as the build makes it; the costs
        are cached under `key` (what the variants and the artifact depend on). Fitness is the distance to
        `teacher`'s outputs (default: `model`'s, the model with every unit at level 0)."""
        import torch

        self.found = found
        self.model = copy.deepcopy(model).eval()

        def compute() -> dict[str, np.ndarray]:
            base, deltas = unit_costs(self.stitched, found, price, target)
            return {"base": _vector(base), "deltas": np.array([[_vector(c) for c in row] for row in deltas])}

        stored = cache.get_or_compute(key, compute)
        self.base = Costs(*map(float, stored["base"]))
        deltas = [[Costs(*map(float, c)) for c in row] for row in stored["deltas"]]
        self.units: Sequence[Unit] = [
            Unit(name, tuple(Level(label, delta) for label, delta in zip(found.labels, row, strict=False)))
            for name, row in zip(found.names, deltas, strict=True)]
        self.basis = f"estimated: {target.name}"
        self.images = torch.as_tensor(images)
        self.samples = len(images)
        self.targets, self.distance = targets, distance
        with torch.no_grad():
            self.wanted = [targets(model if teacher is None else teacher, batch) for batch in self.images.split(BATCH)]
        self.memo = PrefixMemo(self.model, found, self.images[:1])

    def stitched(self, config: Config) -> torch.nn.Module:
        """The working model with each unit at its level in `config` (the next call changes it: copy to keep)."""
        for name, row, level in zip(self.found.names, self.found.modules, config, strict=True):
            self.model.set_submodule(name, row[level])
        return self.model

    def fitness(self, config: Config, samples: int) -> float:
        """The family's distance to the original's outputs, averaged over the first `samples` images."""
        import torch

        model = self.stitched(config)
        total = 0.0
        with torch.no_grad():
            for index, (batch, wanted) in enumerate(zip(self.images[:samples].split(BATCH), self.wanted,
                                                        strict=False)):
                with self.memo.serving(config, index):
                    distance = self.distance(self.targets(model, batch), [w[: len(batch)] for w in wanted])
                total += float(distance) * len(batch)
        return total / min(samples, self.samples)


class PrefixMemo:
    """Unit outputs kept for the candidates that share the levels upstream of a unit (edgekit/search/kept.py).

    Each unit's output on a batch is kept under the levels of the units that ran up to it, in the order a forward
    pass runs them (found once with hooks), and served instead of running the unit again. Where a unit runs more
    than once in a forward pass, or gives no single tensor, nothing is kept."""

    def __init__(self, model: torch.nn.Module, found: Variants, example: torch.Tensor) -> None:
        import torch

        from edgekit.passes.reconstruct import forward_calls

        units = {model.get_submodule(name): unit for unit, name in enumerate(found.names)}
        calls = forward_calls(model, example, units)
        single = sorted(unit for unit, _ in calls) == list(range(len(found.names)))
        tensors = all(isinstance(out, torch.Tensor) for _, out in calls)
        self.order = [unit for unit, _ in calls] if single and tensors else []
        self.found = found
        self.kept = KeptOutputs()

    @contextmanager
    def serving(self, config: Config, batch: int) -> Iterator[None]:
        """While open, the units of `config` serve kept outputs for batch number `batch` and keep new ones."""
        patched = []
        for position, unit in enumerate(self.order):
            module = self.found.modules[unit][config[unit]]
            key = (tuple(config[u] for u in self.order[: position + 1]), batch)
            module.forward = partial(self._forward, type(module).forward.__get__(module), key)
            patched.append(module)
        try:
            yield
        finally:
            for module in patched:
                del module.forward

    def _forward(self, forward: Callable[..., torch.Tensor], key: tuple[Config, int], x: torch.Tensor,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        kept = self.kept.get(key, len(x))
        if kept is None:
            kept = forward(x, *args, **kwargs)
            self.kept.put(key, kept)
        return kept

def _vector(costs: Costs) -> np.ndarray:
    return np.array([costs.macs, costs.bytes, costs.latency_ms], dtype=np.float64)


def unit_costs(stitched: Callable[[Config], torch.nn.Module], found: Variants,
               price: Callable[[torch.nn.Module], tuple[Analysis, int]], target: Target
               ) -> tuple[Costs, list[list[Costs]]]:
    """The level-0 artifact's costs and each unit's change at each level (a unit with fewer levels: zero beyond),
    from artifacts with every unit at one level: op by op, each changed op charged to the unit whose scope its
    name carries."""
    from edgekit.verify.estimate import estimate

    levels = len(found.labels)
    per_level = []
    for level in range(levels):
        analysis, size = price(stitched(tuple(min(level, len(row) - 1) for row in found.modules)))
        rows = estimate(analysis, target)
        if rows.get("ms") is None:
            raise UsageError(f"search budgets need a latency estimate: {rows.get('reason')}")
        ms = {row["index"]: row["ms"] for row in rows["layers"]}
        # ops a runtime runs (no folded constants, whose count can change with the weights' values)
        ops = [(layer, ms.get(i, 0.0)) for i, layer in enumerate(analysis.layers) if layer.op_class != "fused"]
        per_level.append((analysis, size, ops, sum(row["ms"] for row in rows["layers"])))
    base_analysis, base_size, base_ops, base_total = per_level[0]
    owners = _owners([layer.name for layer, _ in base_ops], found)
    deltas = [[Costs() for _ in range(levels)] for _ in found.names]
    for level, (_analysis, _size, ops, _total) in enumerate(per_level[1:], start=1):
        kinds, base_kinds = [layer.op for layer, _ in ops], [layer.op for layer, _ in base_ops]
        if kinds != base_kinds:
            at = next((i for i, pair in enumerate(zip(kinds, base_kinds, strict=False)) if pair[0] != pair[1]),
                      min(len(kinds), len(base_kinds)))
            first = ops[at][0].name if at < len(ops) else "(none)"
            raise StageError(f"the artifact at level {found.labels[level]} has other ops than at level 0 ({len(ops)} "
                             f"vs {len(base_ops)}, from op {at}: {first}): unit costs would not add up")
        for index, ((now, now_ms), (before, before_ms)) in enumerate(zip(ops, base_ops, strict=True)):
            change = Costs(now.macs - before.macs, now.weight_bytes - before.weight_bytes, now_ms - before_ms)
            if change == Costs():
                continue
            if len(owners[index]) != 1:
                claim = "no unit" if not owners[index] else f"units {', '.join(found.names[u] for u in owners[index])}"
                raise StageError(f"op {before.name} changes with the units' levels but {claim} claims it: unit costs "
                                 "would not add up")
            unit = owners[index][0]
            if level < len(found.modules[unit]):
                deltas[unit][level] = deltas[unit][level] + change
    return Costs(float(base_analysis.macs), float(base_size), float(base_total)), deltas


def _owners(names: list[str], found: Variants) -> list[list[int]]:
    """For each op name, the units it belongs to, in the exporters' two spellings: ONNX's scopes, read back as the
    module path (`/features/features.3/conv/...` or `/layers.1/blocks.0/attn/...`: `module_path`), within a unit's
    path; litert-torch's `/torchvision.models.mobilenetv2.InvertedResidual_3/` (class and attribute). A fused TFLite
    op is named by `;`-joined locations, the op's own first (later ones can name other blocks' identical ops): only
    the first counts."""
    from edgekit.passes.export import module_path
    from edgekit.passes.tflite import location_segment

    kinds = [f"/{location_segment(row[0], name.split('.')[-1])}/"
             for name, row in zip(found.names, found.modules, strict=True)]
    owners = []
    for op in (name.split(";")[0] for name in names):
        path = f"{module_path(op)}."
        owners.append([u for u, name in enumerate(found.names) if path.startswith(f"{name}.") or kinds[u] in op])
    return owners


def image_budget(plan: Recipe) -> Budget:
    """The build's budget, of a kind an image model's search can meet."""
    budget = plan.search.parsed_budget()
    assert budget is not None, "the build searches only with a budget"
    if budget.kind == "tokens_per_s":
        raise UsageError(f"search.budget {budget.text}: image models take latency, size or macs budgets")
    return budget


def fitness_split(count: int, plan: Recipe) -> tuple[int, np.ndarray, bool]:
    """Of `count` calibration images, how many refit the variants (the first `plan.prune.images`), the indices of
    those fitness reads (the next `plan.search.images`, in a seeded order; with too few, the first ones: then the
    two overlap), and whether they are apart."""
    if not plan.prune.images:
        raise UsageError("search.budget ranks and refits each unit's variants on calibration images: prune.images "
                         "must be at least 1")
    refit = min(plan.prune.images, count)
    disjoint = count - refit >= min(plan.search.images, 16)
    first = refit if disjoint else 0
    scoring = np.arange(first, min(count, first + plan.search.images))
    return refit, scoring[np.random.default_rng(plan.seed).permutation(len(scoring))], disjoint


def artifact_key(plan: Recipe, target: Target) -> dict[str, Any]:
    """What an artifact's costs depend on besides the model: the target and how the build makes the artifact."""
    return {"target": target.sha256, "format": plan.export.format, "precision": plan.quantize.precision,
            "int8_mode": plan.quantize.int8_mode, "activations": plan.quantize.activations, "opset": plan.export.opset}


def search(module: torch.nn.Module, input_shape: tuple[int, ...], fingerprint: str, adapter: Family,
           images: np.ndarray, calibration_sha: str, plan: Recipe, target: Target, cache: ArrayCache,
           progress: Progress, ray: str | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A copy of `module` with each search unit at the level the search chose for `plan.search.budget` on `target`,
    and the report's `search` block. The first `plan.prune.images` calibration images refit the variants, the next
    `plan.search.images` (in a seeded order) measure fitness; with too few images, the same ones do both. `ray`: a
    Ray address the candidates are scored on."""
    image_budget(plan)
    settings = plan.search
    units = adapter.search_units(module)
    if not units:
        raise UsageError(f"no search units in this {adapter.name}: budgets size residual blocks (inverted residuals, "
                         "MBConv, ResNet blocks; YOLO C3k2/C2f, SPPF and head branches)")
    refit_count, scoring, disjoint = fitness_split(len(images), plan)
    refit = images[:refit_count]
    key = {"kind": "search-levels", "model": fingerprint, "calibration": calibration_sha, "images": len(refit),
           "levels": settings.levels, "input_shape": list(input_shape), "edgekit": __version__}

    def price(candidate: torch.nn.Module) -> tuple[Analysis, int]:
        return price_artifact(candidate, input_shape, plan, target, adapter, images[:2])

    base, stream = module, None
    if settings.stream:
        from edgekit.passes.stream import cut_stream

        with progress.stage("stream") as note:
            base, stream = cut_stream(module, input_shape, units, adapter.prune_keep(module), refit,
                                      image_budget(plan), lambda m: artifact_costs(*price(m), target),
                                      settings.levels[-1], cache, {**key, "artifact": artifact_key(plan, target)})
            note["note"] = f"{stream['ratio']:.1%} of the channels between units cut"
        key["stream"] = stream["ratio"]
        units = [(name, base.get_submodule(name)) for name, _ in units]
    with progress.stage("levels") as note:
        found = variants(base, units, adapter.prune_keep(base), refit, settings.levels, cache, key,
                         progress=lambda work: progress.track(work, len(work), "unit variants"))
        space = ImageSpace(base, found, images[scoring], adapter.distill_targets, adapter.search_distance, price,
                           target, cache, {**key, "kind": "search-costs", "artifact": artifact_key(plan, target),
                                           "units": found.names}, teacher=module)
        note["note"] = f"{len(found.names)} units x {len(found.labels)} levels, {space.basis}"
    config, record = choose(space, plan, progress, refit=len(refit), disjoint=disjoint, ray=ray,
                            levels="shares of each unit's own channels removed (Torch-Pruning, FLAP ranking, "
                                   "least-squares refit of the unit to the original's outputs)",
                            fitness=f"{adapter.name} output distance to the original (search_distance), mean over "
                                    f"{space.samples} calibration images")
    if stream is not None:
        record["stream"] = stream
    return _settled(copy.deepcopy(space.stitched(config)), input_shape), record


def artifact_costs(analysis: Analysis, size: int, target: Target) -> Costs:
    """A whole artifact's costs: its MACs, bytes and the device model's latency on `target`."""
    from edgekit.verify.estimate import estimate

    ms = estimate(analysis, target).get("ms")
    if ms is None:
        raise UsageError(f"search budgets need a latency estimate on {target.name}")
    return Costs(float(analysis.macs), float(size), float(ms))


def choose(space: ImageSpace, plan: Recipe, progress: Progress, *, refit: int, disjoint: bool, levels: str,
           fitness: str, ray: str | None) -> tuple[Config, dict[str, Any]]:
    """The search stage: the configuration of `space` the search chooses for `plan.search.budget`, and the report's
    `search` block (`levels`: what a level removes, and how its variants were made; `fitness`: what it measures, on
    what). `ray`: a Ray address the candidates are scored on (None: here)."""
    from edgekit.search.remote import ray_scorer

    budget = image_budget(plan)
    settings = plan.search
    with progress.stage("search") as note, ray_scorer(space, ray) as score_many:
        result = evolve(space, budget, seed=plan.seed, generations=settings.generations, seconds=settings.seconds,
                        offspring=settings.offspring, score_many=score_many,
                        progress=lambda rounds, total: progress.track(rounds, total, "generations"))
        note["note"] = (f"{budget.text}: {budget.format(result.best.costs.of(budget.metric))}, fitness "
                        f"{result.best.fitness:.4g}" + (f" (uniform {space.found.labels[max(result.uniform.config)]}: "
                                                        f"{result.uniform.fitness:.4g})" if result.uniform else ""))
    fitness += " the refit did not see" if disjoint else " (too few to keep apart from the refit's)"
    return result.best.config, search_record(space, result, budget.text, refit, levels, fitness, plan.seed)


def search_record(space: ImageSpace, result: SearchResult, budget: str, refit: int, levels: str, fitness: str,
                  seed: int) -> dict[str, Any]:
    """The report's `search` block."""
    return {
        "budget": budget,
        "method": "EvoPress-style evolutionary search (level-switch mutations within the budget, selection in steps "
                  f"on 4, 16 and all fitness images); levels are {levels}",
        "costs": f"{space.basis}: per-op device model on the artifact's format and precision, summed per unit",
        "latency_label": space.basis,
        "fitness": fitness,
        "refit_images": refit,
        "unpruned": _costs_record(space.base),
        "uniform_levels": [{"level": label, **_costs_record(cost(space, uniform(space, level)))}
                           for level, label in enumerate(space.found.labels)],
        **result.record(space.found.labels, space.found.names, seed, lambda s: {"macs": int(s.costs.macs)}),
    }


def _costs_record(costs: Costs) -> dict[str, Any]:
    return {"latency_ms": round(costs.latency_ms, 4), "bytes": int(costs.bytes), "macs": int(costs.macs)}


def price_artifact(module: torch.nn.Module, input_shape: tuple[int, ...], plan: Recipe, target: Target,
                   adapter: FloatParts, calibration: np.ndarray) -> tuple[Analysis, int]:
    """`module`'s artifact as the build makes it, for its costs only: the same format, precision and float parts;
    int8 calibrated on two images (ranges do not change an op's cost), without the accuracy search."""
    from edgekit.passes.analyze import analyze, analyze_tflite

    module = _settled(module, input_shape)
    precision, opset, activations = plan.quantize.precision, plan.export.opset, plan.quantize.activations
    assert precision is not None and opset is not None and activations is not None, "a resolved recipe's"
    if plan.export.format == "tflite":
        from edgekit.passes.tflite import Int8Fit, convert_tflite, op_outputs, tflite_precision

        flat = convert_tflite(module, input_shape)
        if precision == "int8" and plan.quantize.int8_mode == "static":
            keep = () if target.integer_only else tuple(adapter.tflite_float_ops(op_outputs(flat)))
            flat = tflite_precision(flat, "int8", calibration, Int8Fit("minmax", 0, False, keep))
        else:
            flat = tflite_precision(flat, "int8-dynamic" if precision == "int8" else precision)
        return analyze_tflite(flat), len(flat)
    from edgekit.passes.export import export_onnx

    graph = export_onnx(module, input_shape, opset)
    if precision == "fp16":
        from edgekit.passes.quantize import to_fp16

        graph = to_fp16(graph)
    elif precision == "int8":
        from edgekit.passes.int8 import Int8Quantizer, Int8Scheme

        quantizer = Int8Quantizer(graph, calibration, Int8Scheme(activations, "minmax", False), None, 1)
        quantizer.keep_float(adapter.int8_float_nodes(quantizer.prepared))
        graph = quantizer.quantize()
    return analyze(graph), graph.ByteSize()


def _settled(module: torch.nn.Module, input_shape: tuple[int, ...]) -> torch.nn.Module:
    """`module` after one pass at the artifact's input shape: a module that caches shape-dependent constants (a
    detection head's anchors, recomputed when the batch changes) then traces the same ops every time."""
    import torch

    with torch.no_grad():
        module.eval()(torch.zeros(input_shape))
    return module
