"""Export a causal LM to one ONNX graph that both prefills and decodes, with its key/value cache as I/O.

Inputs: `input_ids [1, tokens]` and, per block, `past_key_i` / `past_value_i [1, kv_heads, past, head_dim]`
(past = 0 for the prompt). Outputs: `logits [1, tokens, vocab]` and `present_key_i` / `present_value_i`,
the cache extended by these tokens. One graph, one copy of the weights, serves the whole decode loop.

Weights quantized by edgekit (`edgekit_quantized` on a linear layer) become onnxruntime `MatMulNBits`
nodes holding the packed codes, their scales and zero points; a quantized embedding becomes an int8
table gathered and scaled per row. The graph is traced from the model with the quantized weights
already in place, so the rewrite only swaps each float MatMul for its integer form.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekit.errors import StageError, first_line
from edgekit.families.llm import block_inputs, decoder_layers, head

if TYPE_CHECKING:
    import onnx
    import torch

    from edgekit.passes.weightonly import QuantizedWeight

EXPORT_TOKENS = 3  # example sequence used for tracing; the axes are dynamic


class _PastCache:
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
            cache = _PastCache(list(zip(past_flat[0::2], past_flat[1::2], strict=True)))
            hidden, kwargs = block_inputs(self.model, input_ids, past_flat[0].shape[2])
            for layer in decoder_layers(self.model):
                hidden = layer(hidden, cache=cache, **kwargs)
            return (head(self.model, hidden), *[t for pair in cache.present for t in pair])

    return Step()


def cache_names(layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    return past, [name.replace("past_", "present_") for name in past]


def export_lm(model: torch.nn.Module, opset: int) -> onnx.ModelProto:
    """Trace the model's prefill/decode step into ONNX with dynamic token and past lengths; quantized weights
    become MatMulNBits, a quantized embedding an int8 gather."""
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
    _integer_weights(graph, model)
    return graph


def _key(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def _integer_weights(graph: onnx.ModelProto, model: torch.nn.Module) -> None:
    """Swap each traced float MatMul whose weight a quantized linear layer holds for MatMulNBits, and the embedding
    gather for its int8 form; float initializers left unused are dropped."""
    import onnx
    import torch
    from onnx import helper, numpy_helper

    by_weight: dict[str, QuantizedWeight] = {}
    for module in model.modules():
        quantized = getattr(module, "edgekit_quantized", None)
        if quantized is not None and isinstance(module, torch.nn.Linear):
            by_weight[_key(module.weight.detach().numpy().T)] = quantized
    embedding = getattr(model.model.embed_tokens, "edgekit_quantized", None)
    embed_key = _key(model.model.embed_tokens.weight.detach().numpy()) if embedding is not None else None
    initializers = {init.name: init for init in graph.graph.initializer}
    nodes = []
    for node in graph.graph.node:
        weight = initializers.get(node.input[1]) if len(node.input) > 1 else None
        if node.op_type == "MatMul" and weight is not None:
            quantized = by_weight.get(_key(numpy_helper.to_array(weight)))
            if quantized is not None:
                nodes.append(_matmul_nbits(graph, node, quantized))
                continue
        if node.op_type == "Gather" and embed_key and node.input[0] in initializers and \
                _key(numpy_helper.to_array(initializers[node.input[0]])) == embed_key:
            nodes.extend(_int8_gather(graph, node, embedding))
            continue
        nodes.append(node)
    del graph.graph.node[:]
    graph.graph.node.extend(nodes)
    used = {name for node in graph.graph.node for name in node.input}
    kept = [init for init in graph.graph.initializer if init.name in used]
    del graph.graph.initializer[:]
    graph.graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in graph.opset_import):
        graph.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.checker.check_model(graph)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes `[rows, n]` (< 2**bits) packed low bits first into bytes `[rows, n * bits / 8]`."""
    if bits == 8:
        return codes.astype(np.uint8)
    per_byte = 8 // bits
    padded = np.zeros((codes.shape[0], math.ceil(codes.shape[1] / per_byte) * per_byte), np.uint8)
    padded[:, : codes.shape[1]] = codes
    parts = padded.reshape(codes.shape[0], -1, per_byte).astype(np.uint8)
    return sum((parts[:, :, i] << (bits * i)).astype(np.uint8) for i in range(per_byte)).astype(np.uint8)


def _matmul_nbits(graph: onnx.ModelProto, node: onnx.NodeProto, quantized: QuantizedWeight) -> onnx.NodeProto:
    from onnx import helper, numpy_helper

    out, columns = quantized.codes.shape
    block = quantized.group_size
    blocks = math.ceil(columns / block)
    codes = np.zeros((out, blocks * block), np.uint8)
    codes[:, :columns] = quantized.codes.numpy()
    packed = pack_codes(codes, quantized.bits).reshape(out, blocks, block * quantized.bits // 8)
    zeros = pack_codes(quantized.zeros.numpy().astype(np.uint8), quantized.bits).reshape(-1)
    prefix = node.output[0].replace("/", "_").strip("_") + "_q"
    tensors = {f"{prefix}_codes": packed, f"{prefix}_scales": quantized.scales.numpy().astype(np.float32).reshape(-1),
               f"{prefix}_zeros": zeros}
    graph.graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in tensors.items())
    return helper.make_node("MatMulNBits", [node.input[0], *tensors], list(node.output), name=node.name + "_nbits",
                            domain="com.microsoft", K=columns, N=out, bits=quantized.bits, block_size=block)


def _int8_gather(graph: onnx.ModelProto, node: onnx.NodeProto, quantized: QuantizedWeight) -> list[onnx.NodeProto]:
    """`table[ids]` as int8 rows times their scales: a quarter of the float table's bytes."""
    from onnx import TensorProto, helper, numpy_helper

    prefix = "embedding_q"
    signed = (quantized.codes.numpy().astype(np.int16) - quantized.zeros.numpy().astype(np.int16)).astype(np.int8)
    graph.graph.initializer.extend([numpy_helper.from_array(signed, f"{prefix}_codes"),
                                    numpy_helper.from_array(quantized.scales.numpy().astype(np.float32),
                                                            f"{prefix}_scales")])
    ids = node.input[1]
    return [
        helper.make_node("Gather", [f"{prefix}_codes", ids], [f"{prefix}_rows"], name=f"{prefix}_gather"),
        helper.make_node("Cast", [f"{prefix}_rows"], [f"{prefix}_float"], name=f"{prefix}_cast", to=TensorProto.FLOAT),
        helper.make_node("Gather", [f"{prefix}_scales", ids], [f"{prefix}_row_scales"], name=f"{prefix}_scale"),
        helper.make_node("Mul", [f"{prefix}_float", f"{prefix}_row_scales"], list(node.output), name=f"{prefix}_mul"),
    ]
