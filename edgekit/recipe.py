"""Recipes: the stages of a build, their parameters, and the gates the artifact must pass.

A recipe file (TOML) may leave anything unset; `plan` fills the gaps from the family's defaults and the
target's per-family defaults and budgets, so the resolved recipe saved beside the artifact says exactly
what ran, and records where each value came from. A key the model's family does not read is refused
rather than recorded as if it ran.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgekit.errors import UsageError
from edgekit.passes.int8 import OWN_RULES, Calibration, SevenBitWeights
from edgekit.search.budget import Budget, parse_budget
from edgekit.targets import Budgets, Format, Int8Activations, Precision, Target, describe_errors, read_toml

if TYPE_CHECKING:
    from edgekit.families.base import Family

EXPORTABLE_FORMATS = ("onnx", "tflite", "gguf", "openvino", "pte")
DEFAULT_OPSET = 17
WEIGHT_LEVEL = re.compile(r"int(4|8)(?:\+eora([1-9]\d*))?")


class _Stage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QuantizeStage(_Stage):
    precision: Precision | None = None
    # int8 only
    activations: Int8Activations | None = Field(default=None, description="default: what the target runtime takes")
    seven_bit_weights: SevenBitWeights | None = Field(
        default=None, description="int8 weights in 7 bits (-64..63) on no layer, every layer, or the layers whose "
        "8-bit weights saturate x86 int16 pairs (saturating); default: saturating where the runtime adds int16 pairs")
    calibration: Calibration = "mse"
    bias_correction: bool = True
    calib_limit: int = Field(default=128, gt=0, description="calibration images at most")
    sensitivity_images: int = Field(default=32, gt=0, description="calibration images the per-layer probe runs on")
    bias_correction_images: int = Field(
        default=128, gt=0, description="calibration images bias correction reads (it runs the model once per layer)")
    max_float_layers: int = Field(default=8, ge=0, description="most layers the accuracy gate may keep in float")
    int8_mode: Literal["static", "dynamic"] = Field(
        default="static", description="tflite: full-integer (calibrated) or dynamic-range int8")
    range_sweeps: int = Field(default=3, ge=0, description="tflite int8: sweeps of the activation range search "
                              "against the model's output (0: none; each quantizes the model 5x per tensor; "
                              "3 as tflite.RANGE_SWEEPS)")
    refit: bool = Field(default=True, description="tflite int8: refit each conv/FC layer on the integer model's "
                        "own inputs (runs the model twice per layer)")


class PruneStage(_Stage):
    ratio: float = Field(default=0.0, ge=0, lt=1, description="share of each prunable layer's channels removed")
    blocks: int = Field(default=0, ge=0, description="language models: whole decoder blocks removed (depth)")
    images: int = Field(default=32, ge=0, description="calibration images that rank channels, compensate "
                        "removed ones and refit the layers (0: rank by weight magnitude alone)")
    reconstruct: bool = Field(default=True, description="refit each pruned layer to the original's outputs "
                              "(least squares on the calibration images)")


class DistillStage(_Stage):
    steps: int = Field(default=0, ge=0, description="training steps after pruning (0: none)")
    seconds: float = Field(default=600, gt=0, description="wall-time bound")
    lr: float = Field(default=1e-4, gt=0)
    batch: int = Field(default=4, gt=0)
    images: int = Field(default=128, gt=0, description="calibration images (or text windows) it trains on, at most")
    scope: Literal["model", "blocks"] = Field(
        default="model", description="model: the whole model learns the original's output; blocks (segmenter "
        "encoders): each block in turn learns the original block's output, `steps` steps each")


class FinetuneStage(_Stage):
    steps: int = Field(default=100, gt=0, description="training steps on the --train labels, after pruning or a "
                       "budget search (and any distillation)")
    seconds: float = Field(default=300, gt=0, description="wall-time bound")
    lr: float = Field(default=1e-4, gt=0)
    batch: int = Field(default=8, gt=0, description="labelled images per step; the last batch of --train is held "
                       "out to judge whether the fine-tune helped")


def weight_level(label: str) -> tuple[int, int]:
    """(bits, EoRA rank) of a language model's search level: `int8`, `int4`, `int4+eora32` (rank 0: none)."""
    match = WEIGHT_LEVEL.fullmatch(label)
    if match is None:
        raise ValueError(f"{label!r} is not a weight level: int8, int4, or either with +eora<rank> (int4+eora32)")
    return int(match.group(1)), int(match.group(2) or 0)


class SearchStage(_Stage):
    """Compression to a device budget: each unit's level chosen by evolutionary search (edgekit/search/). Image
    models: units are blocks pruned inside (passes/levels.py); language models: each decoder block's attention
    and MLP linears (passes/weight_levels.py)."""

    budget: str | None = Field(default=None, description="latency=6ms (estimated on the target), size=4MB, "
                               "macs=1.5G; language models bytes=90MB, tokens_per_s=40: the artifact must meet it; "
                               "not with prune.*")
    levels: list[float] = Field(default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5], description="image models: shares of each "
                                "unit's own channels a level removes, from 0, increasing")
    weight_levels: list[str] = Field(default=["int8", "int4+eora32", "int4"], description="language models: how "
                                     "a unit's linears may be stored, least compressed first (int8, int4, +eora<rank>)")
    stream: bool = Field(default=False, description="image models: first cut the channels between units (which no "
                         "unit's level changes) at the share uniform pruning needs for the budget; the search then "
                         "sizes each unit inside (detectors: on)")
    generations: int = Field(default=50, ge=0)
    seconds: float = Field(default=900, gt=0, description="wall-time bound of the search (the generation under way "
                           "finishes)")
    offspring: int = Field(default=16, ge=4, description="children per generation; 4 samples score them all, 16 the "
                           "best quarter, all the best one against the parent")
    images: int = Field(default=64, gt=0, description="calibration images (language models: text windows, the first "
                        "ones) fitness is measured on (image models: those after the prune.images that refit the "
                        "variants, where there are enough)")

    @field_validator("budget")
    @classmethod
    def _budget(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return parse_budget(value).text
        except UsageError as err:
            raise ValueError(str(err)) from None

    @field_validator("levels")
    @classmethod
    def _levels(cls, value: list[float]) -> list[float]:
        if len(value) < 2 or value[0] != 0 or value != sorted(set(value)) or value[-1] >= 1:
            raise ValueError("levels must start at 0, increase, stay below 1, and be at least two")
        return value

    @field_validator("weight_levels")
    @classmethod
    def _weight_levels(cls, value: list[str]) -> list[str]:
        parsed = [weight_level(label) for label in value]
        if len(parsed) < 2 or any(a <= b for a, b in itertools.pairwise(parsed)):
            raise ValueError("weight_levels must be at least two, least compressed first (more bits first; of equal "
                             "bits, the larger EoRA rank first)")
        return value

    def parsed_budget(self) -> Budget | None:
        return parse_budget(self.budget) if self.budget else None


class WeightsStage(_Stage):
    """Weight-only quantization of a language model's linear layers (precision int4 or int8)."""

    method: Literal["rtn", "gptq"] = "gptq"
    group_size: int = Field(default=64, ge=16, le=4096, description="input columns sharing a scale: a power of two")
    symmetric: bool = True
    damp: float = Field(default=0.01, gt=0, description="GPTQ: diagonal added to the Hessian, × its mean")
    act_order: bool = Field(default=True, description="GPTQ: columns by decreasing input energy, static groups")
    head_bits: Literal[4, 8] | None = Field(default=8, description="the output layer's bits (none: float)")
    embedding_bits: Literal[8] | None = Field(default=8, description="the token embedding table's bits (none: float)")
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        default=4, description="onnxruntime MatMulNBits compute: 4 quantizes activations to int8 per block (int8 "
                               "dot products: ~7x faster decode on this host's CPU, ppl +0.6% on SmolLM2), 0: float")

    @model_validator(mode="after")
    def _power_of_two(self) -> WeightsStage:
        if self.group_size & (self.group_size - 1):
            raise ValueError(f"group_size must be a power of two (MatMulNBits blocks), got {self.group_size}")
        return self


class LowRankStage(_Stage):
    """EoRA: a rank-r residual path per compressed linear layer, fitted in its inputs' eigenspace."""

    rank: int = Field(default=0, ge=0, description="0: no compensation")
    ranks: dict[str, Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict, description='per layer, by name or its ending (e.g. "mlp.down_proj" = 64); the '
        "others take `rank`")
    bits: Literal[4, 8] | None = Field(default=8, description="the factors' own quantization (none: float)")


class TextStage(_Stage):
    """Language models: how much text calibrates, evaluates and prompts."""

    calib_windows: int = Field(default=64, gt=0, description="calibration windows (GPTQ, EoRA, distillation)")
    calib_length: int = Field(default=256, ge=8, description="tokens per calibration window")
    eval_windows: int = Field(default=32, gt=0, description="held-out windows perplexity is measured on")
    eval_length: int = Field(default=512, ge=8, description="tokens per held-out window")
    prompts: int = Field(default=4, ge=0, description="held-out prompts generated from, greedily")
    prompt_length: int = Field(default=32, gt=0)
    new_tokens: int = Field(default=32, gt=1, description="tokens generated per prompt")


class ExportStage(_Stage):
    format: Format | None = None
    opset: int | None = Field(default=None, ge=11, le=23)


class VerifyStage(_Stage):
    eval_limit: int = Field(default=200, gt=0, description="held-out images at most")
    warmup: int = Field(default=10, ge=0)
    runs: int = Field(default=50, gt=0, description="timed inferences")
    threads: int | None = Field(default=None, gt=0, description="default: the target's threads, capped by this host")


class Recipe(_Stage):
    seed: int = 0
    prune: PruneStage = PruneStage()
    distill: DistillStage = DistillStage()
    finetune: FinetuneStage = FinetuneStage()
    search: SearchStage = SearchStage()
    quantize: QuantizeStage = QuantizeStage()
    weights: WeightsStage = WeightsStage()
    lowrank: LowRankStage = LowRankStage()
    text: TextStage = TextStage()
    export: ExportStage = ExportStage()
    verify: VerifyStage = VerifyStage()
    gates: Budgets = Budgets()

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.model_dump(exclude_none=True))


def _validate(data: dict[str, Any], where: str) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise UsageError(f"{where}: {describe_errors(err.errors())}") from None


def load_recipe(path: Path) -> Recipe:
    return _validate(read_toml(path, "recipe")[0], str(path))


def with_overrides(recipe: Recipe, overrides: dict[str, Any]) -> Recipe:
    """The recipe with dotted keys ('quantize.precision') replaced; None values leave a key alone."""
    data = recipe.model_dump()
    for dotted, value in overrides.items():
        if value is None:
            continue
        *section, key = dotted.split(".")
        (data[section[0]] if section else data)[key] = value
    return _validate(data, "options")


def with_defaults(recipe: Recipe, defaults: dict[str, Any]) -> Recipe:
    """The recipe with a family's own defaults (dotted `section.key`) for the fields it does not set itself."""
    unset = {}
    for dotted, value in defaults.items():
        section, key = dotted.split(".")
        if key not in getattr(recipe, section).model_fields_set:
            unset[dotted] = value
    return with_overrides(recipe, unset) if unset else recipe


def resolve(recipe: Recipe, target: Target, adapter: Family) -> Recipe:
    """Every unset field filled from the target; refuses combinations this build cannot produce."""
    family = adapter.name
    fmt = recipe.export.format or target.default(family, "format") or target.runtimes[0].format
    runtime = target.runtime_for(fmt)  # type: ignore[arg-type]  # a format name from the target file
    if runtime is None:
        takes = ", ".join(sorted({r.format for r in target.runtimes}))
        raise UsageError(f"{target.name} does not run {fmt} models (it takes: {takes})")
    if fmt not in EXPORTABLE_FORMATS:
        raise UsageError(
            f"{target.name} takes {fmt} ({runtime.name}); this edgekit exports {', '.join(EXPORTABLE_FORMATS)} only"
        )
    if fmt not in adapter.formats:
        raise UsageError(f"{family} models export to {', '.join(adapter.formats)} in this edgekit, not {fmt}; "
                         f"use --format {adapter.formats[0]}")
    precision = recipe.quantize.precision or target.default(family, "precision") or "fp32"
    if recipe.quantize.int8_mode == "dynamic" and fmt != "tflite":
        raise UsageError("dynamic-range int8 is a TFLite precision; use --format tflite")
    if fmt == "pte" and precision not in ("fp32", "int8"):
        raise UsageError(f"ExecuTorch programs are built fp32 or int8 (PT2E) in this edgekit, not {precision}")
    supported = adapter.precisions
    if precision not in supported:
        raise UsageError(
            f"precision {precision} is not supported for {family} models (supported: {', '.join(supported)})")
    static = precision == "int8" and recipe.quantize.int8_mode == "static"
    if fmt == "tflite" and static and recipe.quantize.calibration not in OWN_RULES:
        raise UsageError(f"TFLite int8 calibrates with {', '.join(OWN_RULES)}, "
                         f"not {recipe.quantize.calibration}")
    budget = recipe.search.parsed_budget()
    if budget and (recipe.prune.ratio or recipe.prune.blocks):
        raise UsageError("prune.* and search.budget both decide how much to compress: set one of them")
    gates = {k: v for k, v in recipe.gates.model_dump().items() if v is not None}
    gates |= {k: min(v, gates.get(k, v)) for k, v in _budget_gates(budget).items()}  # a gate cannot loosen it
    return with_overrides(recipe, {
        "quantize.precision": precision,
        "quantize.activations": recipe.quantize.activations or runtime.int8_activations,
        "quantize.seven_bit_weights": recipe.quantize.seven_bit_weights or (
            "saturating" if runtime.int16_pairs else "none"),
        "export.format": fmt,
        "export.opset": recipe.export.opset or runtime.opset or DEFAULT_OPSET,
        "verify.threads": recipe.verify.threads or target.compute.threads,
    }).model_copy(update={"gates": target.budgets.model_copy(update=gates)})


def _budget_gates(budget: Budget | None) -> dict[str, float]:
    """The gate that holds the built artifact to a search budget (with a recipe's own gate, the tighter of the two):
    latency on the target, or the artifact's size. MACs need no gate: the artifact has the searched configuration's
    exactly."""
    if budget is None or budget.metric == "macs":
        return {}
    return {"max_latency_ms": budget.limit} if budget.metric == "latency_ms" else {"max_size_mb": budget.limit / 1e6}


# what every family reads; a family's adapter names the rest (`Family.settings`, `Family.accuracy_gates`)
COMMON_SETTINGS: dict[str, tuple[str, ...]] = {
    "": ("seed",), "export": ("format", "opset"), "quantize": ("precision",), "verify": ("threads",),
    "gates": ("max_size_mb", "max_latency_ms"),
}


def set_keys(recipe: BaseModel, prefix: str = "") -> set[str]:
    """The dotted keys a recipe sets itself (in its file, or as arguments), not those left to defaults."""
    keys = set()
    for name in recipe.model_fields_set:
        value = getattr(recipe, name)
        keys |= set_keys(value, f"{prefix}{name}.") if isinstance(value, BaseModel) else {prefix + name}
    return keys


def _reads(adapter: Family, key: str) -> bool:
    section, _, name = key.rpartition(".")
    family = dict(adapter.settings)
    family["gates"] = (*family.get("gates", ()), *adapter.accuracy_gates)
    return name in COMMON_SETTINGS.get(section, ()) or family.get(section) == "*" or name in family.get(section, ())


def refuse_irrelevant(adapter: Family, keys: set[str], where: str) -> None:
    """A key the family does not read would be recorded as if it ran: refuse it, naming where it was set."""
    ignored = sorted(k for k in keys if not _reads(adapter, k))
    if ignored:
        raise UsageError(f"{where}: {', '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} not apply to "
                         f"{adapter.name} models (see `edgekit build --help` and the README's recipe sections)")


def _dotted(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "ranks":  # lowrank.ranks is one value: a table of layers
            flat |= _dotted(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat


EFFORTS: dict[str, dict[str, Any]] = {
    # the slow, bounded parts of a build, where a person trades quality for time: tflite int8's range search and
    # layer refit (MobileNetV2 full-int8 for android-arm64: over 15 min on this project's 2-core host, 39 s
    # without them), the per-layer sensitivity probe, bias correction, the budget search, GPTQ (RTN instead)
    "fast": {"quantize.range_sweeps": 0, "quantize.refit": False, "quantize.sensitivity_images": 8,
             "quantize.bias_correction_images": 32, "search.generations": 10, "search.seconds": 180,
             "weights.method": "rtn"},
    "default": {},
    "max": {"quantize.range_sweeps": 6, "quantize.sensitivity_images": 64, "search.generations": 150,
            "search.seconds": 2700, "prune.images": 64},
}


def plan(adapter: Family, target: Target, recipe: str | Path | Recipe | None, flags: dict[str, Any],
         effort: str = "default") -> tuple[Recipe, dict[str, str], Path | None]:
    """The resolved recipe from six layers (edgekit's defaults < the target's < the family's < the effort's
    (`EFFORTS`, the keys the family reads) < the recipe file < flags), where each value came from, and the recipe
    file, if one was named."""
    if effort not in EFFORTS:
        raise UsageError(f"effort {effort!r} is not one of {', '.join(EFFORTS)}")
    recipe_file = Path(recipe) if isinstance(recipe, (str, Path)) else None
    given = recipe if isinstance(recipe, Recipe) else load_recipe(recipe_file) if recipe_file else Recipe()
    file_keys = set_keys(given)
    flag_keys = {key for key, value in flags.items() if value is not None}
    refuse_irrelevant(adapter, file_keys, str(recipe_file) if recipe_file else "recipe")
    refuse_irrelevant(adapter, flag_keys, "options")
    effort_keys = {key for key in EFFORTS[effort] if _reads(adapter, key) and key not in file_keys}
    fmt = flags.get("export.format") or given.export.format or adapter.recipe_defaults.get("export.format")
    family_defaults = {**adapter.recipe_defaults, **adapter.format_defaults.get(str(fmt), {})}
    family_keys = {key for key in family_defaults if key not in file_keys and key not in effort_keys}
    defaults = {**family_defaults, **{key: EFFORTS[effort][key] for key in effort_keys}}
    unresolved = with_overrides(with_defaults(given, defaults), flags)
    resolved = resolve(unresolved, target, adapter)
    before = _dotted(unresolved.model_dump())
    origins = {}
    for key, value in _dotted(resolved.model_dump()).items():
        origins[key] = ("flag" if key in flag_keys else "recipe file" if key in file_keys
                        else f"effort {effort}" if key in effort_keys else "family" if key in family_keys
                        else "target" if before.get(key) != value else "default")
    return resolved, origins, recipe_file
