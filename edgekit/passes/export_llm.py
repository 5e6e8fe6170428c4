"""Export a causal LM to one ONNX graph that both prefills and decodes, with its key/value cache as I/O.

Inputs: `input_ids [1, tokens]` and, per block, `past_key_i` / `past_value_i [1, kv_heads, past, head_dim]`
(past = 0 for the prompt). Outputs: `logits [1, tokens, vocab]` and `present_key_i` / `present_value_i`,
the cache extended by these tokens. One graph, one copy of the weights, serves the whole decode loop.

Weights quantized by edgekit (`edgekit_quantized` on a linear layer) become onnxruntime `MatMulNBits`
nodes holding the packed codes, their scales (stored as float16, cast once at load) and zero points; a
quantized embedding becomes an int8 table gathered and scaled per row. The graph is traced from the model
with the quantized weights already in place, so the rewrite only swaps each float MatMul for its integer form.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekit.errors import StageError, first_line
from edgekit.families.llm import block_inputs, decoder_layers, head
from edgekit.runtimes.onnx_lm import present_name

if TYPE_CHECKING:
    import onnx
    import torch

    from edgekit.passes.weightonly import QuantizedWeight

EXPORT_TOKENS = 3  # example sequence used for tracing; the axes are dynamic


class PastCache:
    """The cache object transformers' attention expects, over the past tensors given as graph inputs."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.past = past
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = list(past)

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        past_keys, past_values = self.past[layer_idx]
        self.present[layer_idx] = (torch.cat([past_keys, keys], dim=2), torch.cat([past_values, values], dim=2))
        return self.present[layer_idx]


def _step_module(model: torch.nn.Module) -> torch.nn.Module:
    import torch

    class Step(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, *past_flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
            cache = PastCache(list(zip(past_flat[0::2], past_flat[1::2], strict=True)))
            hidden, kwargs = block_inputs(self.model, input_ids, past_flat[0].shape[2])
            for layer in decoder_layers(self.model):
                hidden = layer(hidden, cache=cache, **kwargs)
            return (head(self.model, hidden), *[t for pair in cache.present for t in pair])

    return Step()


def cache_names(layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    return past, [present_name(name) for name in past]


def export_lm(model: torch.nn.Module, opset: int, accuracy_level: int = 0) -> onnx.ModelProto:
    """Trace the model's prefill/decode step into ONNX with dynamic token and past lengths; quantized weights
    become MatMulNBits (computing at `accuracy_level`: 0 float activations, 4 int8), a quantized table a
    gather of its codes."""
    import onnx
    import torch

    config = model.config
    layers = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    past = [torch.zeros(1, config.num_key_value_heads, 2, head_dim) for _ in range(2 * layers)]
    ids = torch.zeros(1, EXPORT_TOKENS, dtype=torch.long)
    past_names, present_names = cache_names(layers)
    axes = {"input_ids": {1: "tokens"}, "logits": {1: "tokens"}}
    axes |= {name: {2: "past"} for name in past_names} | {name: {2: "total"} for name in present_names}
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(_step_module(model).eval(), (ids, *past), buffer, dynamo=False, opset_version=opset,
                              input_names=["input_ids", *past_names], output_names=["logits", *present_names],
                              dynamic_axes=axes, do_constant_folding=True)
    except Exception as err:  # the exporter raises many types; the first line names what failed
        raise StageError(f"ONNX export of the decoder failed at opset {opset}: {first_line(err)}") from err
    graph = onnx.load_from_string(buffer.getvalue())
    integer_weights(graph, model, accuracy_level)
    renumber(graph)
    return graph


COUNTED = re.compile(r"((?:onnx::)?[A-Za-z]+_)\d+")  # names the exporter numbers by its running counters


def renumber(graph: onnx.ModelProto) -> None:
    """Renumber the exporter's running counters (`onnx::Unsqueeze_97`, `Constant_247`) in order of first use.

    Traced through an EoRA-compensated layer, every later counter moves on; renumbered, a layer's form changes no
    name outside its own scope, so each part of the graph has the same bytes whatever the other layers' forms (a
    budget search adds up the file's size from its parts exactly)."""
    numbers: dict[str, str] = {}

    def renamed(name: str) -> str:
        match = COUNTED.fullmatch(name)
        if match is None:
            return name
        return numbers.setdefault(name, f"{match.group(1)}{len(numbers)}")

    for node in graph.graph.node:
        node.name = renamed(node.name)
        node.input[:] = [renamed(name) for name in node.input]
        node.output[:] = [renamed(name) for name in node.output]
    for init in graph.graph.initializer:
        init.name = renamed(init.name)
    for info in graph.graph.value_info:
        info.name = renamed(info.name)


def _key(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def integer_weights(graph: onnx.ModelProto, model: torch.nn.Module, accuracy_level: int) -> None:
    """Swap each traced float MatMul whose weight a quantized linear layer holds for MatMulNBits, and each gather
    from a quantized table (the embedding, or the head it is tied to) for a gather of packed codes dequantized per
    row; float initializers left unused are dropped, so a tied table is stored once (as the head's codes, or as
    the float table the head reads transposed)."""
    import onnx
    import torch
    from onnx import helper, numpy_helper

    as_matmul: dict[str, QuantizedWeight] = {}  # key of the [in, out] float weight a traced MatMul multiplies by
    as_table: dict[str, QuantizedWeight] = {}  # key of the [rows, features] float table a traced Gather reads
    for module in model.modules():
        quantized = getattr(module, "edgekit_quantized", None)
        if quantized is None:
            continue
        weight = module.weight.detach().numpy()
        as_table[_key(weight)] = quantized
        if isinstance(module, torch.nn.Linear):
            as_matmul[_key(weight.T)] = quantized
    initializers = {init.name: init for init in graph.graph.initializer}
    stored: dict[int, list[str]] = {}
    casts: list[onnx.NodeProto] = []  # float16 scales to float32, folded into constants when the session loads

    def store(quantized: QuantizedWeight, prefix: str) -> list[str]:
        if id(quantized) not in stored:
            tensors, cast, stored[id(quantized)] = packed_initializers(quantized, prefix)
            graph.graph.initializer.extend(tensors)
            casts.append(cast)
        return stored[id(quantized)]

    def constant(node: onnx.NodeProto, index: int) -> np.ndarray | None:
        name = node.input[index] if len(node.input) > index else None
        return numpy_helper.to_array(initializers[name]) if name in initializers else None

    gathered: dict[str, tuple[str, str]] = {}  # table initializer -> keys of the table and of its transpose
    for node in graph.graph.node:
        if node.op_type == "Gather" and node.input[0] in initializers and node.input[0] not in gathered:
            table = numpy_helper.to_array(initializers[node.input[0]])
            if table.ndim == 2:  # tables are large: read and hash each once
                gathered[node.input[0]] = (_key(table), _key(table.T))
    tables = {transposed: name for name, (_, transposed) in gathered.items()}
    nodes: list[onnx.NodeProto] = []
    for node in graph.graph.node:  # MatMuls first: a tied table then gathers from the head's codes
        weight = constant(node, 1) if node.op_type == "MatMul" else None
        key = _key(weight) if weight is not None else None
        quantized = as_matmul.get(key) if key else None
        if quantized is None:
            if key in tables:  # a float head tied to the table: read the table transposed, store it once
                nodes.append(helper.make_node("Transpose", [tables[key]], [node.input[1] + "_tied"],
                                              name=node.name + "_tied", perm=[1, 0]))
                node.input[1] = node.input[1] + "_tied"
            nodes.append(node)
            continue
        names = store(quantized, node.output[0].replace("/", "_").strip("_") + "_q")
        nodes.append(matmul_nbits(node.input[0], node.output[0], node.name + "_nbits", quantized, names,
                                  accuracy_level))
    rewritten: list[onnx.NodeProto] = []
    for node in nodes:
        keys = gathered.get(node.input[0]) if node.op_type == "Gather" else None
        quantized = as_table.get(keys[0]) if keys else None
        if quantized is None:
            rewritten.append(node)
            continue
        rewritten.extend(dequantizing_gather(node, quantized, store(quantized, "embedding_q")))
    del graph.graph.node[:]
    graph.graph.node.extend(casts + rewritten)
    used = {name for node in graph.graph.node for name in node.input}
    kept = [init for init in graph.graph.initializer if init.name in used]
    del graph.graph.initializer[:]
    graph.graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in graph.opset_import):
        graph.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.checker.check_model(graph)


def packed_initializers(quantized: QuantizedWeight, prefix: str
                        ) -> tuple[list[onnx.TensorProto], onnx.NodeProto, list[str]]:
    """`quantized` as initializers (packed codes, float16 scales, zero points), the Cast that widens its scales
    once at load, and the names a MatMulNBits or a dequantizing gather reads (codes, scales[, zero points])."""
    import onnx
    from onnx import helper, numpy_helper

    tensors = _packed(quantized, prefix)
    scales = f"{prefix}_scales"
    cast = helper.make_node("Cast", [scales + "16"], [scales], name=scales, to=onnx.TensorProto.FLOAT)
    return ([numpy_helper.from_array(value, name) for name, value in tensors.items()], cast,
            [scales if name == scales + "16" else name for name in tensors])


def matmul_nbits(x: str, output: str, name: str, quantized: QuantizedWeight, names: list[str],
                 accuracy_level: int) -> onnx.NodeProto:
    """`x @ Wᵀ` for a weight stored as `quantized` (its initializers called `names`), in onnxruntime's kernel."""
    from onnx import helper

    out, columns = quantized.codes.shape
    return helper.make_node("MatMulNBits", [x, *names], [output], name=name, domain="com.microsoft", K=columns,
                            N=out, bits=quantized.bits, block_size=quantized.group_size,
                            accuracy_level=accuracy_level)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes `[rows, n]` (< 2**bits) packed low bits first into bytes `[rows, n * bits / 8]`."""
    if bits == 8:
        return codes.astype(np.uint8)
    per_byte = 8 // bits
    padded = np.zeros((codes.shape[0], math.ceil(codes.shape[1] / per_byte) * per_byte), np.uint8)
    padded[:, : codes.shape[1]] = codes
    parts = padded.reshape(codes.shape[0], -1, per_byte).astype(np.uint8)
    return sum((parts[:, :, i] << (bits * i)).astype(np.uint8) for i in range(per_byte)).astype(np.uint8)


def _packed(quantized: QuantizedWeight, prefix: str) -> dict[str, np.ndarray]:
    """The MatMulNBits inputs: codes `[out, blocks, block·bits/8]`, scales `[out·blocks]` (float16, exact: the
    quantizer chose them on that grid), packed zero points (asymmetric grids only)."""
    out, columns = quantized.codes.shape
    block = quantized.group_size
    blocks = math.ceil(columns / block)
    codes = np.zeros((out, blocks * block), np.uint8)
    codes[:, :columns] = quantized.codes.numpy()
    tensors = {f"{prefix}_codes": pack_codes(codes, quantized.bits).reshape(out, blocks, block * quantized.bits // 8),
               f"{prefix}_scales16": quantized.scales.numpy().astype(np.float16).reshape(-1)}
    if not quantized.symmetric:  # symmetric grids use MatMulNBits' default zero point, the middle code
        tensors[f"{prefix}_zeros"] = pack_codes(quantized.zeros.numpy().astype(np.uint8), quantized.bits).reshape(-1)
    return tensors


def dequantizing_gather(node: onnx.NodeProto, quantized: QuantizedWeight,
                         names: list[str]) -> list[onnx.NodeProto]:
    """`table[ids]` read from packed codes: gather the rows' codes, zero points and scales, unpack, dequantize."""
    from onnx import TensorProto, helper

    codes, scales, *zeros = names
    rows, columns = quantized.codes.shape
    blocks, block, bits = quantized.scales.shape[1], quantized.group_size, quantized.bits
    p = node.output[0].replace("/", "_").strip("_") + "_dq"
    made: list[onnx.NodeProto] = []

    def add(op: str, inputs: list[str], **attrs: Any) -> str:
        name = f"{p}_{len(made)}"
        made.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def const(values: list[int] | int, dtype: int = TensorProto.INT64) -> str:
        shape = [len(values)] if isinstance(values, list) else []
        return add("Constant", [], value=helper.make_tensor(f"{p}_c{len(made)}", dtype, shape,
                                                             values if isinstance(values, list) else [values]))

    def unpacked(packed: str, width: int) -> str:
        """Gathered packed bytes → one code per element, `[1, tokens, width]` (low bits first)."""
        if bits == 8:
            return add("Reshape", [packed, const([1, -1, width])])
        whole = add("Cast", [packed], to=TensorProto.INT32)
        base = const(2**bits, TensorProto.INT32)
        low, high = add("Mod", [whole, base]), add("Div", [whole, base])
        pairs = add("Concat", [add("Unsqueeze", [low, const([-1])]), add("Unsqueeze", [high, const([-1])])], axis=-1)
        return add("Reshape", [pairs, const([1, -1, width])])

    ids = node.input[1]
    code_rows = add("Reshape", [unpacked(add("Gather", [codes, ids]), blocks * block), const([1, -1, blocks, block])])
    if zeros:
        zero_bytes = add("Gather", [add("Reshape", [zeros[0], const([rows, -1])]), ids])
        per_row = math.ceil(blocks * bits / 8) * 8 // bits  # zero points stored per row, padded to whole bytes
        zero_rows = add("Unsqueeze", [add("Cast", [add("Slice", [unpacked(zero_bytes, per_row), const([0]),
                                                                  const([blocks]), const([2])])],
                                          to=TensorProto.FLOAT), const([-1])])
    else:
        zero_rows = const(2 ** (bits - 1), TensorProto.FLOAT)
    scale_rows = add("Gather", [add("Reshape", [scales, const([rows, blocks])]), ids])
    centred = add("Sub", [add("Cast", [code_rows], to=TensorProto.FLOAT), zero_rows])
    values = add("Mul", [centred, add("Unsqueeze", [scale_rows, const([-1])])])
    flat = add("Reshape", [values, const([1, -1, blocks * block])])
    made.append(helper.make_node("Slice", [flat, const([0]), const([columns]), const([2])], list(node.output),
                                 name=f"{p}_out"))
    return made
