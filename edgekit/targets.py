"""Target profiles: one TOML file per device, validated, with a source for every device number.

Numbers about devices live in `targets/*.toml`, never in code. A user passes a name, an alias
or a path to their own file; schema errors name the file, the key and what was expected.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from edgekit.errors import UsageError, first_line
from edgekit.resources import resource_dir

Precision = Literal["fp32", "fp16", "int8", "int4"]  # int4: weight-only (language models)
Format = Literal["onnx", "tflite", "gguf", "openvino", "pte"]
Int8Activations = Literal["uint8", "int8-symmetric"]
# the engines edgekit builds for, and the file format each takes
RUNTIME_FORMATS: dict[str, str] = {"onnxruntime": "onnx", "onnxruntime-qnn": "onnx", "tensorrt": "onnx",
                                   "litert": "tflite", "litert-qnn": "tflite", "edgetpu": "tflite",
                                   "tflite-micro": "tflite", "llama.cpp": "gguf", "openvino": "openvino",
                                   "executorch": "pte"}

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Runtime(_Strict):
    """One way the device runs a model: an engine, the file format it takes, the precisions it runs fast."""

    name: str = Field(description="engine on the device, e.g. tensorrt, onnxruntime, litert, edgetpu")
    format: Format
    opset: int | None = Field(default=None, description="highest ONNX opset the engine takes")
    precisions: list[Precision] = Field(min_length=1, description="precisions this engine runs fast")
    int8_activations: Int8Activations = Field(
        default="uint8", description="uint8 (asymmetric: onnxruntime, LiteRT) or int8-symmetric (TensorRT)"
    )
    int16_pairs: bool = Field(
        default=False, description="x86 engines whose uint8 x int8 kernels add products in int16 pairs (vpmaddubsw, "
        "CPUs without VNNI): layers whose full-range weights would saturate there take 7-bit weights")

    @field_validator("name")
    @classmethod
    def _known_engine(cls, name: str) -> str:
        if name not in RUNTIME_FORMATS:
            raise ValueError(f"unknown runtime {name!r} (known: {', '.join(RUNTIME_FORMATS)})")
        return name

    @field_validator("format")
    @classmethod
    def _the_engine_s_format(cls, fmt: str, info: ValidationInfo) -> str:
        name = info.data.get("name")  # absent when the name itself was refused
        if name is not None and RUNTIME_FORMATS[name] != fmt:
            raise ValueError(f"{name} takes {RUNTIME_FORMATS[name]} models, not {fmt}")
        return fmt


class Compute(_Strict):
    cores: int = Field(gt=0, description="CPU cores on the device")
    threads: int = Field(gt=0, description="threads a deployed model should use")
    fp32_gflops: float | None = Field(default=None, gt=0)
    fp16_gflops: float | None = Field(default=None, gt=0)
    int8_gops: float | None = Field(default=None, gt=0)

    def peak_gops(self, precision: str) -> float | None:
        return {"fp32": self.fp32_gflops, "fp16": self.fp16_gflops, "int8": self.int8_gops}.get(precision)


class Memory(_Strict):
    bandwidth_gbps: float = Field(gt=0, description="DRAM (or link) bandwidth in GB/s")
    streaming_bandwidth_gbps: float | None = Field(
        default=None, gt=0, description="GB/s when streaming more than the caches hold (a language model's weights "
                                        "per token); default: bandwidth_gbps")
    ram_mb: float = Field(gt=0, description="memory a model may use, MB")


class Constraints(_Strict):
    static_shapes: bool = True
    max_tensor_rank: int | None = Field(default=None, gt=0)
    op_allowlist: list[str] = Field(default_factory=list, description="empty: any op")


class Budgets(_Strict):
    """Gates a build must pass for this device unless the recipe says otherwise."""

    max_top1_drop_pt: float | None = Field(default=None, ge=0)
    min_top1_agreement: float | None = Field(default=None, ge=0, le=1)
    max_map_drop_pt: float | None = Field(default=None, ge=0, description="detectors: mAP50-95 points lost")
    max_ppl_ratio: float | None = Field(default=None, ge=1, description="language models: perplexity / original's")
    max_miou_drop_pt: float | None = Field(default=None, ge=0, description="segmenters: box-prompt mIoU points lost")
    max_size_mb: float | None = Field(default=None, gt=0)
    max_latency_ms: float | None = Field(default=None, gt=0)
    on_cpu_fallback: Literal["fail", "warn"] | None = Field(
        default=None, description="TFLite ops the target's accelerator cannot run: fail the build or warn"
    )


OpClass = Literal["conv", "depthwise", "grouped", "gemm", "gemv", "elementwise"]


class KernelRate(_Strict):
    """One measured kernel: the efficiency a layer of this class, precision and shape reaches on the device."""

    op_class: OpClass
    precision: Precision
    weights: Literal["constant", "dequantized"] = Field(
        default="constant", description="dequantized: float arithmetic on int8 weights dequantized at every run, as "
        "onnxruntime runs a QDQ pattern it does not fuse")
    reduction: int = Field(gt=0, description="multiply-accumulates per output value (Cin/groups x kernel area)")
    outputs: int = Field(gt=0, description="output values")
    efficiency: float = Field(gt=0, le=1)


class LatencyModel(_Strict):
    """How close to its peaks the device gets, per kind of kernel: the device model's data (verify/estimate)."""

    node_overhead_us: float = Field(ge=0, description="fixed cost of launching one kernel")
    invoke_overhead_us: float | None = Field(
        default=None, ge=0, description="fixed cost of one inference on top of its ops: a USB accelerator's round "
                                        "trip from the host, its driver's call")
    efficiency: dict[OpClass, float] = Field(
        description="fraction of the compute peak each kernel class reaches (elementwise: of the bandwidth)")
    int8_efficiency: dict[OpClass, float] = Field(
        default_factory=dict, description="the same for int8 kernels where it differs (default: efficiency)")
    memory_efficiency: float = Field(gt=0, le=1, description="fraction of the bandwidth streaming kernels reach")
    runtime_efficiency: dict[str, float] = Field(
        default_factory=dict, description="per runtime of the device, how much faster (>1) or slower (<1) its kernels "
        "compute than the efficiencies above say (1 where absent): one device's engines differ (on a Raspberry Pi 5 "
        "onnxruntime runs YOLO11n twice as fast as TF Lite)")
    on_chip_weights_mb: float | None = Field(
        default=None, gt=0, description="weights up to this size stay on the accelerator and are not streamed")
    activations_on_chip: bool = Field(
        default=False, description="intermediate tensors stay on the accelerator; only the graph's I/O moves")
    kernels: list[KernelRate] = Field(
        default_factory=list, description="measured kernels: a layer takes the efficiency of the nearest in shape")

    @model_validator(mode="after")
    def _fractions(self) -> LatencyModel:
        bad = [k for k, v in {**self.efficiency, **self.int8_efficiency}.items() if not 0 < v <= 1]
        if bad:
            raise ValueError(f"efficiency of {', '.join(bad)} must be in (0, 1]")
        unknown = [k for k, v in self.runtime_efficiency.items() if k not in RUNTIME_FORMATS or v <= 0]
        if unknown:
            raise ValueError(f"runtime_efficiency of {', '.join(unknown)}: a known runtime and a positive factor")
        return self


class HeldToPublished(_Strict):
    """How far the profile's latency numbers are from the latencies published for the device
    (targets/measurements/<name>.csv), as `edgekit estimate --fit-published --write` last found them: how far to
    trust its estimates."""

    rows: int = Field(gt=0)
    models: list[str]
    median_error: float = Field(ge=0, description="median absolute error of the profile's numbers over the rows")
    held_out_median_error: float | None = Field(
        default=None, ge=0, description="of a fit to the rows, each model estimated by a fit made without it")


class FamilyDefaults(_Strict):
    precision: Precision | None = None
    format: Format | None = None


class Target(_Strict):
    name: str
    aliases: list[str] = Field(default_factory=list)
    description: str
    kind: Literal["cpu", "gpu", "npu", "tpu", "mcu"]
    runtimes: list[Runtime] = Field(min_length=1, description="preferred first")
    compute: Compute
    memory: Memory
    constraints: Constraints = Constraints()
    budgets: Budgets = Budgets()
    latency: LatencyModel | None = Field(default=None, description="without it, estimates are a plain roofline")
    published: HeldToPublished | None = Field(default=None, description="none: no public latency checks it")
    defaults: dict[str, FamilyDefaults] = Field(
        default_factory=dict, description='per family ("classifier", …), "*" for all'
    )
    sources: dict[str, str] = Field(description="dotted key -> where the number comes from")
    sha256: str = Field(default="", description="of the profile file, for the manifest")

    @model_validator(mode="after")
    def _a_peak_for_every_fast_precision(self) -> Target:
        """The device model times each op at its precision's peak: a precision a runtime says it runs fast needs
        one (int4 is weight-only: its arithmetic runs at another precision's peak)."""
        for i, runtime in enumerate(self.runtimes):
            for precision in runtime.precisions:
                if precision != "int4" and self.compute.peak_gops(precision) is None:
                    key = {"fp32": "fp32_gflops", "fp16": "fp16_gflops", "int8": "int8_gops"}[precision]
                    raise ValueError(f"compute.{key} is missing: runtimes.{i} ({runtime.name}) runs {precision}, "
                                     "so the device model needs its peak")
        return self

    @model_validator(mode="after")
    def _every_number_has_a_source(self) -> Target:
        missing = [key for key in self.device_numbers() if key not in self.sources]
        if missing:
            raise ValueError(f"no entry in [sources] for {', '.join(missing)}")
        return self

    def device_numbers(self) -> dict[str, float]:
        """Every numeric fact about the device, keyed as in the TOML ('compute.fp32_gflops')."""
        numbers: dict[str, float] = {}
        for section in ("compute", "memory", "constraints"):
            for key, value in getattr(self, section).model_dump().items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    numbers[f"{section}.{key}"] = value
        if self.latency is not None:
            for key, value in self.latency.model_dump().items():
                if key == "kernels":  # one source covers the table of measured kernels
                    if value:
                        numbers["latency.kernels"] = len(value)
                    continue
                items = value.items() if isinstance(value, dict) else [(None, value)]
                for name, number in items:
                    if isinstance(number, (int, float)) and not isinstance(number, bool):
                        numbers[f"latency.{key}" + (f".{name}" if name else "")] = number
        for i, runtime in enumerate(self.runtimes):
            if runtime.opset is not None:
                numbers[f"runtimes.{i}.opset"] = runtime.opset
        return numbers

    @property
    def integer_only(self) -> bool:
        """Edge TPUs and microcontroller NPUs run no float op: their TFLite INT8 models are integer end to end."""
        return self.kind in ("tpu", "mcu")

    def runtime_for(self, fmt: Format) -> Runtime | None:
        return next((r for r in self.runtimes if r.format == fmt), None)

    def default(self, family: str, key: str) -> str | None:
        """A recipe default for this family on this device: the family's entry, else '*'."""
        for scope in (family, "*"):
            value = getattr(self.defaults.get(scope, FamilyDefaults()), key)
            if value is not None:
                return value
        return None


def describe_errors(errors: Sequence[Mapping[str, Any]]) -> str:
    """Pydantic's errors as `key: problem, got value`; a whole-file rule's own message names its keys."""
    parts = []
    for err in errors:
        key = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        got_text = "" if isinstance(got, dict) or got is None or err["type"] == "value_error" else f", got {got!r}"
        parts.append(f"{key + ': ' if key else ''}{message[:1].lower()}{message[1:]}{got_text}")
    return "; ".join(parts)


def read_toml(path: Path, what: str) -> tuple[dict[str, Any], bytes]:
    """A TOML file's table and its bytes; a missing, unreadable or malformed file is a UsageError naming it."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{what} file not found: {path}") from None
    except OSError as err:  # a folder, no permission, …
        raise UsageError(f"{path}: cannot read the {what} file ({err.strerror or err})") from None
    try:
        return tomllib.loads(raw.decode("utf-8")), raw
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: not valid TOML ({first_line(err)})") from None
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise UsageError(f"{path}: not valid TOML (arrays or tables nested too deeply)") from None


def load_target_file(path: Path) -> Target:
    """Read and validate one profile; any problem is a UsageError naming the file and the key."""
    data, raw = read_toml(path, "target")
    data["sha256"] = hashlib.sha256(raw).hexdigest()
    try:
        return Target.model_validate(data)
    except ValidationError as err:
        raise UsageError(f"{path}: {describe_errors(err.errors())}") from None


@functools.cache
def builtin_targets() -> tuple[Target, ...]:
    """The shipped profiles, read once per process: a long run (a bench, a fleet worker) sees one version of them even
    when the files change under it."""
    return tuple(load_target_file(p) for p in sorted(resource_dir("targets").glob("*.toml")))


def load_target(spec: str | Path) -> Target:
    """A target by name, alias, or path to a user's own `.toml`."""
    text = str(spec)
    if text.endswith(".toml") or "/" in text:
        return load_target_file(Path(text))
    targets = builtin_targets()
    by_name = {alias: t for t in targets for alias in (t.name, *t.aliases)}
    if text in by_name:
        return by_name[text]
    near = difflib.get_close_matches(text, list(by_name), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    raise UsageError(f"unknown target {text!r}{hint} (`edgekit targets` lists them)")
