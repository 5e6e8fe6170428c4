"""A Llama decoder as llama.cpp's `llama` architecture reads it: tensor names, row order, hyperparameters, tokenizer.

llama.cpp applies rotary positions to interleaved pairs of a head's channels, Hugging Face to its two halves, so
the query and key rows are reordered per head (as llama.cpp's own converter does); quantization groups run along
rows, so codes and scales move with their row unchanged. The tokenizer is the model's own: copied key for key from
a GGUF source, else built from the Hugging Face tokenizer (byte-level BPE).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgekit.errors import UsageError
from edgekit.families import llm
from edgekit.passes.export_gguf import GGUFTensor
from edgekit.passes.weightonly import QuantizedWeight

if TYPE_CHECKING:
    import torch
    from gguf import GGUFWriter

ARCH = "llama"
FILE_TYPES = {"fp32": "ALL_F32", "int8": "MOSTLY_Q8_0", "int4": "MOSTLY_Q4_0"}  # general.file_type, informative
NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def check_writable(module: torch.nn.Module) -> None:
    """Refuse, in one line, a decoder llama.cpp's `llama` architecture would not compute the same way."""
    config = module.config
    rope = getattr(config, "rope_parameters", None) or {}
    found = [
        f"model type {config.model_type} (llama.cpp architecture `llama` takes model type llama)"
        if config.model_type != "llama" else None,
        f"activation {config.hidden_act} (llama: silu)" if config.hidden_act != "silu" else None,
        f"rope type {rope.get('rope_type')} (written: default rotary positions only)"
        if rope.get("rope_type", "default") != "default" else None,
    ]
    problems = [p for p in found if p]
    if problems:
        raise UsageError(f"--format gguf writes Llama decoders; this one has {'; '.join(problems)}")


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_rows(rows: int, heads: int) -> torch.Tensor:
    """Row order that turns each head's two halves (Hugging Face's rotary layout) into interleaved pairs
    (llama.cpp's): row (head, i, j) of the result is row (head, j, i) of the original, i < head_dim / 2, j < 2."""
    import torch

    return torch.arange(rows).view(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def _tensor(name: str, layer: torch.nn.Linear, order: torch.Tensor | None = None) -> list[GGUFTensor]:
    """A linear layer's weight (its codes, where quantized) and bias, rows in `order`."""
    quantized: QuantizedWeight | None = getattr(layer, "edgekit_quantized", None)
    weight = layer.weight.detach()
    if order is not None:
        weight = weight[order]
        if quantized is not None:
            quantized = QuantizedWeight(quantized.codes[order], quantized.scales[order], quantized.zeros[order],
                                        quantized.bits, quantized.group_size)
    tensors = [GGUFTensor(f"{name}.weight", weight, quantized)]
    if layer.bias is not None:
        bias = layer.bias.detach()
        tensors.append(GGUFTensor(f"{name}.bias", bias if order is None else bias[order]))
    return tensors


def _linears(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module, torch.Tensor | None, int, str]]:
    """Each decoder linear (or its EoRA-compensated form) with its GGUF name and row order, and its block's index
    and its name in the block."""
    import gguf

    config = module.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    found = []
    for index, block in enumerate(llm.decoder_layers(module)):
        for name, layer in llm.block_linears(block).items():
            heads = {"self_attn.q_proj": config.num_attention_heads,
                     "self_attn.k_proj": config.num_key_value_heads}.get(name)
            base = getattr(layer, "base", layer)
            order = rope_rows(base.out_features, heads) if heads else None
            found.append((names.get_name(f"model.layers.{index}.{name}"), layer, order, index, name))
    return found


def model_tensors(module: torch.nn.Module) -> list[GGUFTensor]:
    """Every tensor of the model file: embedding, blocks (norms, linears without their EoRA factors), final norm,
    and the output layer unless it is the embedding table (then llama.cpp reads the table's codes for both)."""
    tied = bool(module.config.tie_word_embeddings)
    table = module.lm_head if tied else module.model.embed_tokens  # a tied table holds the head's codes
    tensors = _tensor("token_embd", table)
    for index, block in enumerate(llm.decoder_layers(module)):
        tensors += [GGUFTensor(f"blk.{index}.{short}.weight", getattr(block, norm).weight.detach())
                    for norm, short in NORMS.items()]
    for name, layer, order, _, _ in _linears(module):
        tensors += _tensor(name, getattr(layer, "base", layer), order)
    tensors.append(GGUFTensor("output_norm.weight", module.model.norm.weight.detach()))
    if not tied:
        tensors += _tensor("output", module.lm_head)
    return tensors


def adapter_tensors(module: torch.nn.Module) -> tuple[list[GGUFTensor], dict[str, int]]:
    """The EoRA factors of every compensated linear as LoRA pairs (B's rows in the layer's order), and each
    layer's rank."""
    tensors, ranks = [], {}
    for name, layer, order, _, _ in _linears(module):
        if hasattr(layer, "base"):
            tensors += _factors(name, layer, order)
            ranks[name] = layer.a.out_features
    return tensors, ranks


def _factors(name: str, layer: torch.nn.Module, order: torch.Tensor | None) -> list[GGUFTensor]:
    from edgekit.passes.export_gguf import lora_tensors

    (a,), (b,) = _tensor(name, layer.a), _tensor(name, layer.b, order)
    return lora_tensors(f"{name}.weight", a, b)


def linear_bytes(module: torch.nn.Module, unit_of: Callable[[int, str], int], units: int
                 ) -> tuple[list[int], list[int]]:
    """What each unit's linears add to the model file and to the adapter file (`unit_of(block index, name in the
    block)`): their tensors' entries, and their EoRA factors and rank entries. The files are these plus parts no
    linear's level changes (`export_gguf.entry_bytes`)."""
    from edgekit.passes.export_gguf import entry_bytes, rank_entry

    model, adapter = [0] * units, [0] * units
    for name, layer, order, index, short in _linears(module):
        unit = unit_of(index, short)
        model[unit] += sum(map(entry_bytes, _tensor(name, getattr(layer, "base", layer), order)))
        if hasattr(layer, "base"):  # the factors, and the rank entry: a length-prefixed string
            adapter[unit] += (sum(map(entry_bytes, _factors(name, layer, order)))
                              + 8 + len(rank_entry(name, layer.a.out_features).encode()))
    return model, adapter


def describe_model(module: torch.nn.Module, tokenizer: Any, source: str, name: str,
                   precision: str) -> Callable[[GGUFWriter], None]:
    """The model file's metadata: llama hyperparameters, then the model's own tokenizer and chat template."""
    config = module.config
    rope = getattr(config, "rope_parameters", None) or {}
    head_dim = _head_dim(config)

    def describe(writer: GGUFWriter) -> None:
        import gguf

        writer.add_type("model")
        writer.add_name(name)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(config.vocab_size)
        if precision in FILE_TYPES:
            writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[precision]])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if Path(source).suffix.lower() == ".gguf":
            _copy_tokenizer(Path(source), writer)
        else:
            _hf_tokenizer(tokenizer, config.vocab_size, writer)

    return describe


def _copy_tokenizer(source: Path, writer: GGUFWriter) -> None:
    """Every `tokenizer.*` key of the source GGUF, as it was (its pre-tokenizer name, merges, chat template)."""
    from gguf import GGUFReader, GGUFValueType

    for key, field in GGUFReader(source).fields.items():
        if key.startswith("tokenizer."):
            kind = field.types[0]
            writer.add_key_value(key, field.contents(), kind,
                                 sub_type=field.types[-1] if kind == GGUFValueType.ARRAY else None)


def _pre_tokenizer(spec: dict[str, Any] | None) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer: the GPT-2 split, or SmolLM's (digits one by one
    first)."""
    steps = (spec or {}).get("pretokenizers", [spec] if spec else [])
    shape = [(s.get("type"), s.get("individual_digits"), s.get("use_regex", True), bool(s.get("add_prefix_space")))
             for s in steps]
    gpt2 = ("ByteLevel", None, True, False)
    if shape == [gpt2]:
        return "gpt-2"
    if shape == [("Digits", True, True, False), gpt2]:
        return "smollm"
    raise UsageError(f"--format gguf: the tokenizer's pre-tokenizer {json.dumps(spec)[:120]} has no llama.cpp "
                     "equivalent edgekit knows (byte-level BPE with GPT-2's or SmolLM's split)")


def _hf_tokenizer(tokenizer: Any, vocab_size: int, writer: GGUFWriter) -> None:
    """A byte-level BPE tokenizer as llama.cpp's `gpt2` tokenizer model: tokens by id (ids the tokenizer lacks are
    unused padding), their types, merges, special ids and the chat template."""
    import gguf

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        spec = json.loads((Path(folder) / "tokenizer.json").read_text())
        if spec["model"]["type"] != "BPE":
            raise UsageError(f"--format gguf writes byte-level BPE tokenizers; this one is {spec['model']['type']}")
        pre = _pre_tokenizer(spec.get("pre_tokenizer"))
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = {token.content: token.special for token in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        tokens.append(token if token is not None else f"[PAD{index}]")
        types.append(gguf.TokenType.UNUSED if token is None else gguf.TokenType.NORMAL if token not in added
                     else gguf.TokenType.CONTROL if added[token] else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special.add_to_gguf(writer, quiet=True)
