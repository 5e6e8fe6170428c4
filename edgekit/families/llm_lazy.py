"""Language models larger than memory: a Hugging Face safetensors checkpoint compressed one decoder block at a time.

Nothing holds the whole model. The checkpoint's tensors are read from their (memory-mapped) shards as a block
needs them; the block is quantized (GPTQ or RTN, EoRA) on the calibration windows' activations, traced to its own
ONNX part, and its packed weights appended to the artifact's external data file before the next block is read.
The ends (embedding, rotary positions, mask, final norm and head) are one more part, and the parts are joined into
the same prefill/decode graph `passes/export_llm.py` writes for a model in memory: same inputs, outputs and cache.

Peak memory is one float32 block with its GPTQ statistics and the calibration windows' activations, or at the ends
one vocabulary-sized table (the head, then the embedding) and its codes: it does not grow with the depth.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from edgekit.errors import StageError, UsageError, first_line
from edgekit.families import llm
from edgekit.passes.export_llm import (
    PastCache,
    cache_names,
    dequantizing_gather,
    integer_weights,
    matmul_nbits,
    packed_initializers,
    renumber,
)
from edgekit.passes.sequential import SchemeOf, WeightScheme, compress_blocks

if TYPE_CHECKING:
    import onnx
    import torch

    from edgekit.passes.weightonly import QuantizedWeight

MODEL_FILE, DATA_FILE = "model.onnx", "model.onnx.data"
BUILD_BYTES_PER_PARAM = 8  # `edgekit build` holds the model in float32 and the copy it compresses
ALIGN = 4096  # external tensors start on page boundaries: onnxruntime maps them in place
INLINE_BYTES = 1024  # smaller tensors (norms, shapes) stay in the graph


class Shards:
    """A checkpoint's tensors by name, each read from its safetensors file only when asked for."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        index, single = folder / "model.safetensors.index.json", folder / "model.safetensors"
        if index.is_file():
            self.files = {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        elif single.is_file():
            with safe_open(single, framework="pt") as handle:
                self.files = dict.fromkeys(handle.keys(), single)
        else:
            raise UsageError(f"{folder}: no safetensors weights (model.safetensors or its .index.json): block-by-block "
                             "compression reads them in place")

    def numel(self) -> int:
        """Parameters in the checkpoint, from the shards' headers (no tensor is read)."""
        from safetensors import safe_open

        total = 0
        for file in sorted(set(self.files.values())):
            with safe_open(file, framework="pt") as handle:
                total += sum(int(np.prod(handle.get_slice(name).get_shape())) for name in handle.keys())
        return total

    def tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.files:
            raise UsageError(f"the checkpoint has no tensor {name}")
        with safe_open(self.files[name], framework="pt") as handle:
            return handle.get_tensor(name).float()

    def fill(self, module: torch.nn.Module, prefix: str) -> torch.nn.Module:
        """`module` with every parameter read from `prefix` + its name."""
        import torch

        module.load_state_dict({name: self.tensor(prefix + name) for name in module.state_dict()}, strict=True,
                               assign=True)
        return module.to(torch.float32).eval()


def skeleton(folder: Path) -> torch.nn.Module:
    """The model with no weights (meta tensors): its structure and config, for the blocks and ends to be made from."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {folder}'s config with transformers: {first_line(err)}") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)


def ends_of(model: torch.nn.Module, shards: Shards) -> torch.nn.Module:
    """`model` (a skeleton) without its blocks, its final norm read in and its rotary positions computed; the
    embedding table and head come in when asked for (`with_table`)."""
    import torch

    model.model.layers = torch.nn.ModuleList()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    shards.fill(model.model.norm, "model.norm.")
    return model.eval()


def with_table(ends: torch.nn.Module, shards: Shards) -> torch.nn.Module:
    """`ends` with its embedding table read in (and its head, where the two are tied: an untied head is read
    when it is quantized)."""
    shards.fill(ends.model.embed_tokens, "model.embed_tokens.")
    if ends.config.tie_word_embeddings:
        ends.lm_head.weight = ends.model.embed_tokens.weight
    return ends


def without_tables(ends: torch.nn.Module) -> None:
    """Free the embedding table (and head) while the blocks run."""
    for module in (ends.model.embed_tokens, ends.lm_head):
        _release(module)


def _release(module: torch.nn.Module) -> None:
    """Free a module's float weight (its quantized codes, where it has them, stay)."""
    import torch

    module.weight = torch.nn.Parameter(torch.empty(module.weight.shape, device="meta"), requires_grad=False)


def _quantized_tables(ends: torch.nn.Module, shards: Shards, hidden: torch.Tensor, scheme: WeightScheme,
                      head_bits: int | None, embedding_bits: int | None) -> list[dict[str, Any]]:
    """The head (on the last block's outputs) and the embedding table quantized as `quantize_ends` does, an
    untied head first and freed before the table is read: one vocabulary-sized matrix in float at a time. A table
    left float stays for the export."""
    from edgekit.families.llm_adapter import quantize_ends

    records = []
    if not ends.config.tie_word_embeddings:
        shards.fill(ends.lm_head, "lm_head.")
        records += quantize_ends(ends, hidden, scheme, head_bits, None)
        if head_bits:
            _release(ends.lm_head)
    with_table(ends, shards)
    tied = bool(ends.config.tie_word_embeddings)
    records += quantize_ends(ends, hidden, scheme, head_bits if tied else None, embedding_bits)
    if tied and head_bits:  # the table is the head's codes
        _release(ends.lm_head)
    if embedding_bits or (tied and head_bits):
        _release(ends.model.embed_tokens)
    return records


def block(kind: type, config: Any, index: int, shards: Shards) -> torch.nn.Module:
    """Decoder block `index` (of class `kind`), read from the shards in float32."""
    return shards.fill(kind(config, index), f"model.layers.{index}.")


def available_memory() -> int | None:
    """Bytes of memory this machine can give a new allocation now (Linux's MemAvailable), or None where unknown."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    found = [int(line.split()[1]) * 1024 for line in lines if line.startswith("MemAvailable:")]
    return found[0] if found else None


def check_fits(folder: Path) -> None:
    """Refuse, before anything is loaded, a safetensors checkpoint a build could not hold in this machine's memory,
    naming the block-by-block path (other weight files are not sized: transformers loads them)."""
    try:
        params = Shards(folder).numel()
    except UsageError:
        return
    needed, available = BUILD_BYTES_PER_PARAM * params, available_memory()
    if available is not None and needed > available:
        raise UsageError(f"{folder}: {params:,} parameters; a build holds them in float32 twice (about "
                         f"{needed / 2**30:.1f} GiB) and this machine has {available / 2**30:.1f} GiB available: "
                         "compress the checkpoint block by block with edgekit.families.llm_lazy.compress_lazily "
                         "(README: \"Larger than memory\")")


def compress_lazily(folder: Path, out: Path, calibration: torch.Tensor, scheme: WeightScheme | SchemeOf,
                    head_bits: int | None, embedding_bits: int | None, opset: int, accuracy_level: int,
                    track: Callable[[Iterable[Any], int], Iterable[Any]] = lambda xs, _n: xs) -> dict[str, Any]:
    """Quantize the checkpoint in `folder` block by block on the `calibration` token windows and write the
    prefill/decode graph to `out` (model.onnx, its weights in model.onnx.data). Returns the quantization records
    (one per layer, as `quantize_lm` gives) and each block's seconds."""
    import torch

    shards = Shards(folder)
    model = skeleton(folder)
    config, kind, depth = model.config, type(llm.decoder_layers(model)[0]), model.config.num_hidden_layers
    scheme_of = scheme if callable(scheme) else lambda _index, _name: scheme
    out.mkdir(parents=True, exist_ok=True)
    parts: list[onnx.ModelProto] = []
    records: list[dict[str, Any]] = []
    seconds: list[float] = []
    with (out / DATA_FILE).open("wb") as data, torch.no_grad():
        ends = with_table(ends_of(model, shards), shards)
        hidden, kwargs = llm.block_inputs(ends, calibration)
        without_tables(ends)
        for index in track(range(depth), depth):
            start = time.perf_counter()
            layer = block(kind, config, index, shards)

            def own(_block: int, name: str, index: int = index) -> WeightScheme:
                return scheme_of(index, name)

            hidden, found = compress_blocks([layer], llm.block_linears, hidden, kwargs, own)
            records += [{**record, "block": index} for record in found]
            parts.append(_external(block_graph(layer, config, opset, accuracy_level), data))
            del layer
            gc.collect()
            seconds.append(time.perf_counter() - start)
        records += _quantized_tables(ends, shards, hidden, scheme_of(depth - 1, "lm_head"), head_bits,
                                     embedding_bits)
        first = ends_graph(ends, opset, accuracy_level, data)
    onnx_save(joined(first, parts), out / MODEL_FILE)
    return {"layers": records, "block_seconds": seconds}


def block_graph(layer: torch.nn.Module, config: Any, opset: int, accuracy_level: int) -> onnx.ModelProto:
    """One quantized block traced to ONNX (its linears as MatMulNBits). Inputs `hidden`, `cos`, `sin`, `mask`,
    `past_key`, `past_value`; outputs `hidden_out`, `present_key`, `present_value`."""
    import torch

    class Step(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                    past_key: torch.Tensor, past_value: torch.Tensor) -> tuple[torch.Tensor, ...]:
            cache = PastCache([(past_key, past_value)])
            return (self.layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), cache=cache),
                    *cache.present[0])

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    tokens, past = 3, 2
    past_kv = torch.zeros(1, config.num_key_value_heads, past, head_dim)
    example = (torch.zeros(1, tokens, config.hidden_size), torch.zeros(1, tokens, head_dim),
               torch.zeros(1, tokens, head_dim), llm.causal_mask(tokens, past, torch.float32), past_kv, past_kv)
    axes = {"hidden": {1: "tokens"}, "cos": {1: "tokens"}, "sin": {1: "tokens"}, "mask": {2: "tokens", 3: "total"},
            "past_key": {2: "past"}, "past_value": {2: "past"}, "hidden_out": {1: "tokens"},
            "present_key": {2: "total"}, "present_value": {2: "total"}}
    index = layer.self_attn.layer_idx
    layer.self_attn.layer_idx = 0  # the step's cache holds this block's pair only
    try:
        return _traced(Step(), example, list(axes)[:6], list(axes)[6:], axes, opset, layer, accuracy_level)
    finally:
        layer.self_attn.layer_idx = index


def ends_graph(ends: torch.nn.Module, opset: int, accuracy_level: int, data: IO[bytes]) -> onnx.ModelProto:
    """The embedding, positions and mask before the blocks, and the final norm and head after them, as one part
    with its tables in `data`. Inputs `input_ids`, `past_key` (for the past length), `last_hidden`; outputs
    `hidden`, `cos`, `sin`, `mask`, `logits`.

    Only the positions, mask and norm are traced: the tables (a 128k vocabulary's are 2 GB each in float32, past
    what one protobuf holds) are written straight to `data` and read by hand-made nodes, a table tied to a
    quantized head from the head's codes."""
    import torch
    from onnx import TensorProto, helper

    class Step(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rotary, self.norm = ends.model.rotary_emb, ends.model.norm

        def forward(self, input_ids: torch.Tensor, past_key: torch.Tensor, last_hidden: torch.Tensor
                    ) -> tuple[torch.Tensor, ...]:
            kwargs = llm.step_inputs(self.rotary, input_ids.shape[1], past_key.shape[2], last_hidden.dtype)
            cos, sin = kwargs["position_embeddings"]
            return cos, sin, kwargs["attention_mask"], self.norm(last_hidden)

    config = ends.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    example = (torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, config.num_key_value_heads, 2, head_dim),
               torch.zeros(1, 3, config.hidden_size))
    axes = {"input_ids": {1: "tokens"}, "past_key": {2: "past"}, "last_hidden": {1: "tokens"}, "cos": {1: "tokens"},
            "sin": {1: "tokens"}, "mask": {2: "tokens", 3: "total"}, "normed": {1: "tokens"}}
    step = Step()
    graph = _external(_traced(step, example, list(axes)[:3], list(axes)[3:], axes, opset, step, accuracy_level), data)
    nodes, packed, arrays = _tables(ends, accuracy_level)
    graph.graph.initializer.extend([*(_external_tensor(tensor, data) for tensor in packed),
                                    *(_external_array(name, array, data) for name, array in arrays.items())])
    graph.graph.node.extend(nodes)
    kept = [o for o in graph.graph.output if o.name != "normed"]
    del graph.graph.output[:]
    graph.graph.output.extend([helper.make_tensor_value_info("hidden", TensorProto.FLOAT,
                                                             [1, "tokens", config.hidden_size]), *kept,
                               helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                             [1, "tokens", config.vocab_size])])
    return graph


def _tables(ends: torch.nn.Module, accuracy_level: int
            ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], dict[str, np.ndarray]]:
    """The nodes that gather `hidden` from the embedding table by `input_ids` and multiply `normed` by the head
    into `logits`, and what they read: packed codes where edgekit quantized a table, float arrays otherwise; a
    tied table stored once."""
    from onnx import helper

    head = getattr(ends.lm_head, "edgekit_quantized", None)
    tied = bool(ends.config.tie_word_embeddings)
    table = head if tied and head is not None else getattr(ends.model.embed_tokens, "edgekit_quantized", None)
    nodes: list[onnx.NodeProto] = []
    tensors: list[onnx.TensorProto] = []
    arrays: dict[str, np.ndarray] = {}

    def packed(quantized: QuantizedWeight, prefix: str) -> list[str]:
        stored, cast, names = packed_initializers(quantized, prefix)
        tensors.extend(stored)
        nodes.append(cast)
        return names

    if head is not None:
        head_names = packed(head, "lm_head_q")
        nodes.append(matmul_nbits("normed", "logits", "lm_head_nbits", head, head_names, accuracy_level))
    elif tied:
        nodes += [helper.make_node("Transpose", ["embed_table"], ["head_weight"], name="head_tied", perm=[1, 0]),
                  helper.make_node("MatMul", ["normed", "head_weight"], ["logits"], name="head")]
    else:
        arrays["head_weight"] = ends.lm_head.weight.detach().numpy().T
        nodes.append(helper.make_node("MatMul", ["normed", "head_weight"], ["logits"], name="head"))
    gather = helper.make_node("Gather", ["embed_table", "input_ids"], ["hidden"], name="embedding")
    if table is None:
        arrays["embed_table"] = ends.model.embed_tokens.weight.detach().numpy()
        return [gather, *nodes], tensors, arrays
    names = head_names if table is head else packed(table, "embedding_q")
    return [*nodes, *dequantizing_gather(gather, table, names)], tensors, arrays


def _traced(step: torch.nn.Module, example: tuple[Any, ...], inputs: list[str], outputs: list[str],
            axes: dict[str, dict[int, str]], opset: int, holder: torch.nn.Module, accuracy_level: int
            ) -> onnx.ModelProto:
    import io
    import warnings

    import onnx
    import torch

    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(step.eval(), example, buffer, dynamo=False, opset_version=opset, input_names=inputs,
                              output_names=outputs, dynamic_axes=axes, do_constant_folding=True)
    except Exception as err:  # the exporter raises many types; the first line names what failed
        raise StageError(f"ONNX export of a decoder part failed at opset {opset}: {first_line(err)}") from err
    graph = onnx.load_from_string(buffer.getvalue())
    del buffer
    integer_weights(graph, holder, accuracy_level)
    renumber(graph)
    return graph


def _external(graph: onnx.ModelProto, data: IO[bytes]) -> onnx.ModelProto:
    """`graph` with its larger initializers moved to `data` and referenced from there, as a new message: protobuf
    keeps a message's cleared bytes until the message itself goes, so the traced one (its weights included) must
    not outlive its block."""
    import onnx

    for index, tensor in enumerate(graph.graph.initializer):
        graph.graph.initializer[index].CopyFrom(_external_tensor(tensor, data))
    return onnx.load_from_string(graph.SerializeToString())


def _external_tensor(tensor: onnx.TensorProto, data: IO[bytes]) -> onnx.TensorProto:
    """`tensor` itself if small, else its bytes appended to `data` and a tensor naming where they are."""
    import onnx

    if not tensor.HasField("raw_data"):
        return _external_array(tensor.name, onnx.numpy_helper.to_array(tensor), data)
    if len(tensor.raw_data) < INLINE_BYTES:
        return tensor
    return _moved(tensor.name, list(tensor.dims), tensor.data_type, tensor.raw_data, data)


def _external_array(name: str, array: np.ndarray, data: IO[bytes]) -> onnx.TensorProto:
    """A tensor holding `array`: in the graph if small, else appended to `data` (page-aligned: onnxruntime maps
    it in place) and named by location, offset and length."""
    import onnx

    if array.nbytes < INLINE_BYTES:
        return onnx.numpy_helper.from_array(array, name)
    return _moved(name, list(array.shape), onnx.helper.np_dtype_to_tensor_dtype(array.dtype),
                  memoryview(np.ascontiguousarray(array)).cast("B"), data)


def _moved(name: str, dims: list[int], data_type: int, raw: bytes | memoryview, data: IO[bytes]) -> onnx.TensorProto:
    import onnx

    data.write(b"\0" * (-data.tell() % ALIGN))
    moved = onnx.TensorProto(name=name, dims=dims, data_type=data_type, data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", DATA_FILE), ("offset", str(data.tell())), ("length", str(len(raw)))):
        entry = moved.external_data.add()
        entry.key, entry.value = key, value
    data.write(raw)
    return moved


def joined(ends: onnx.ModelProto, blocks: list[onnx.ModelProto]) -> onnx.ModelProto:
    """One prefill/decode graph from the ends part and the block parts: the ends' hidden states into block 0, each
    block's into the next, the last block's into the head; every block reads the ends' positions and mask and its
    own `past_key_i` / `past_value_i`. Names inside a part are scoped by its part."""
    from onnx import helper

    depth = len(blocks)
    past, present = cache_names(depth)
    nodes: list[onnx.NodeProto] = []
    initializers, values = [], []

    def take(part: onnx.ModelProto, scope: str, interface: dict[str, str]) -> list[onnx.NodeProto]:
        def name(old: str) -> str:
            return interface.get(old, f"{scope}/{old}") if old else old

        for node in part.graph.node:
            if any(a.type in (a.GRAPH, a.GRAPHS) for a in node.attribute):
                raise StageError(f"a decoder part has a subgraph ({node.op_type}); parts are joined flat")
            node.name = f"{scope}/{node.name}"
            node.input[:] = [name(n) for n in node.input]
            node.output[:] = [name(n) for n in node.output]
        for tensor in part.graph.initializer:
            tensor.name = name(tensor.name)
            initializers.append(tensor)
        for info in part.graph.value_info:
            info.name = name(info.name)
            values.append(info)
        return list(part.graph.node)

    last = f"hidden_{depth}"
    head, seen = [], {last}  # the ends' nodes that read the last block's output: they run after every block
    for node in take(ends, "ends", {"input_ids": "input_ids", "past_key": past[0], "last_hidden": last,
                                    "hidden": "hidden_0", "cos": "cos", "sin": "sin", "mask": "mask",
                                    "logits": "logits"}):
        if seen.intersection(node.input):
            seen.update(node.output)
            head.append(node)
        else:
            nodes.append(node)
    for index, part in enumerate(blocks):
        nodes += take(part, f"layers.{index}", {"hidden": f"hidden_{index}", "cos": "cos", "sin": "sin",
                                                "mask": "mask", "past_key": past[2 * index],
                                                "past_value": past[2 * index + 1], "hidden_out": f"hidden_{index + 1}",
                                                "present_key": present[2 * index],
                                                "present_value": present[2 * index + 1]})
    nodes += head
    declared = {i.name: i for i in ends.graph.input} | {o.name: o for o in ends.graph.output}
    first = {i.name: i for i in blocks[0].graph.input} | {o.name: o for o in blocks[0].graph.output}

    def io(info: Any, new: str) -> Any:
        copy = type(info)()
        copy.CopyFrom(info)
        copy.name = new
        return copy

    inputs = [io(declared["input_ids"], "input_ids")] + [io(first[kind], n) for n, kind in
                                                         zip(past, ["past_key", "past_value"] * depth, strict=True)]
    outputs = [io(declared["logits"], "logits")] + [io(first[kind], n) for n, kind in
                                                    zip(present, ["present_key", "present_value"] * depth,
                                                        strict=True)]
    graph = helper.make_graph(nodes, "edgekit_decoder", inputs, outputs, initializer=initializers, value_info=values)
    opsets = {o.domain: o.version for part in [ends, *blocks] for o in part.opset_import}
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())],
                             producer_name=ends.producer_name, producer_version=ends.producer_version,
                             ir_version=ends.ir_version)


def onnx_save(graph: onnx.ModelProto, path: Path) -> None:
    """Write the joined graph (its weights already in the data file beside it) and check it there."""
    import onnx

    path.write_bytes(graph.SerializeToString(deterministic=True))
    onnx.checker.check_model(str(path))
