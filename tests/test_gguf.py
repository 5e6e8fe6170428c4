"""GGUF for llama.cpp: Q4_0 / Q8_0 blocks holding edgekit's codes, the llama layout, the EoRA adapter, llama.cpp."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from edgekit.api import build
from edgekit.errors import UsageError
from edgekit.families import llm
from edgekit.families.llm_adapter import GGUF_ADAPTER, gguf_files, quantize_ends, quantize_lm, uniform_files
from edgekit.passes import export_gguf
from edgekit.passes.sequential import WeightScheme
from edgekit.passes.weight_levels import LanguageModelSpace, WeightLevel, level_database, variants
from edgekit.passes.weightonly import gptq, rtn
from edgekit.progress import Progress
from edgekit.search.evolve import cost

from .conftest import VOCAB

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
NO_LLAMA_CPP = "llama-cpp-python is not installed (pip install 'edgekit[gguf]')"
TEXT = {"text.calib_windows": 4, "text.calib_length": 32, "text.eval_windows": 2, "text.eval_length": 32,
        "text.prompts": 1, "text.prompt_length": 8, "text.new_tokens": 4}


@pytest.mark.parametrize("bits", [4, 8])
def test_blocks_dequantize_in_gguf_to_edgekits_weights_bit_for_bit(bits: int) -> None:
    weight = torch.randn(8, 96) * torch.logspace(0, -2, 96)
    quantized = gptq(weight, torch.eye(96) + 0.1, bits, 32, symmetric=True)
    data, kind = export_gguf.blocks(quantized)
    assert kind == {4: "Q4_0", 8: "Q8_0"}[bits] and data.shape == (8, 3 * (2 + 32 * bits // 8))
    ours = quantized.dequantize().numpy()
    assert np.array_equal(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind]), ours)


def test_q4_0_grid_is_llama_cpps_own() -> None:
    """Round-to-nearest codes are what llama.cpp's reference Q4_0 quantizer writes for the same weights: same
    scale (the group's largest-magnitude weight at q = 0), same orientation, same nibble order."""
    quantized = rtn(torch.randn(16, 64), 4, 32, symmetric=True)
    data, _ = export_gguf.blocks(quantized)
    reference = gguf.quants.quantize(quantized.dequantize().numpy(), gguf.GGMLQuantizationType.Q4_0)
    assert np.array_equal(data, reference)


def test_codes_that_blocks_cannot_hold_are_refused() -> None:
    weight = torch.randn(4, 64)
    assert "groups of 64" in export_gguf.unexact(rtn(weight, 4, 64, symmetric=True))
    assert "asymmetric" in export_gguf.unexact(rtn(weight, 4, 32, symmetric=False))
    with pytest.raises(ValueError, match="not whole blocks"):
        export_gguf.blocks(rtn(torch.randn(4, 48), 8, 32, symmetric=True))


def _quantized_tiny(folder: Path, method: str = "gptq", rank: int = 32) -> llm.LoadedLM:
    loaded = llm.load_lm(folder, None)
    calibration = llm.token_windows(loaded.tokenizer, list(llm.wiki_articles()[:4]), 32, 4)
    scheme = WeightScheme(4, group_size=32, method=method, rank=rank)  # type: ignore[arg-type]
    quantize_lm(loaded.module, calibration, scheme, head_bits=8, embedding_bits=8, progress=Progress(quiet=True))
    return loaded


def _write(loaded: llm.LoadedLM) -> tuple[dict[str, bytes], dict[str, list[export_gguf.GGUFTensor]]]:
    files, written, _ = gguf_files(loaded.module, loaded, "int4")
    return files, written


def _read(data: bytes, tmp_path: Path, name: str) -> gguf.GGUFReader:
    path = tmp_path / name
    path.write_bytes(data)
    return gguf.GGUFReader(path)


def test_model_file_has_llamas_names_types_shapes_and_tokenizer(tiny_lm_folder: Path, tmp_path: Path) -> None:
    loaded = _quantized_tiny(tiny_lm_folder)
    files, written = _write(loaded)
    reader = _read(files["model.gguf"], tmp_path, "model.gguf")
    tensors = {t.name: t for t in reader.tensors}
    linears = {"attn_q": (64, 64), "attn_k": (64, 32), "attn_v": (64, 32), "attn_output": (64, 64),
               "ffn_gate": (64, 128), "ffn_up": (64, 128), "ffn_down": (128, 64)}
    expected = {"token_embd.weight": ("Q8_0", (64, VOCAB)), "output_norm.weight": ("F32", (64,))}  # tied: no output
    for block in range(2):
        expected |= {f"blk.{block}.{norm}.weight": ("F32", (64,)) for norm in ("attn_norm", "ffn_norm")}
        expected |= {f"blk.{block}.{name}.weight": ("Q4_0", shape) for name, shape in linears.items()}
    assert {name: (t.tensor_type.name, tuple(int(n) for n in t.shape)) for name, t in tensors.items()} == expected

    def field(key: str) -> object:
        return reader.fields[key].contents()

    assert field("general.architecture") == "llama" and field("llama.block_count") == 2
    assert (field("llama.attention.head_count"), field("llama.attention.head_count_kv")) == (4, 2)
    assert field("llama.rope.dimension_count") == 16 and field("llama.embedding_length") == 64
    tokens = field("tokenizer.ggml.tokens")
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert len(tokens) == VOCAB and tokens[field("tokenizer.ggml.eos_token_id")] == "<eos>"
    assert tokens == [loaded.tokenizer.convert_ids_to_tokens(i) for i in range(VOCAB)]
    assert len(field("tokenizer.ggml.merges")) > 0

    # llama.cpp's converter reorders query rows per head: (head, half, i) -> (head, i, half)
    query = loaded.module.model.layers[0].self_attn.q_proj.base.weight.detach().numpy()
    converted = query.reshape(4, 2, 8, 64).swapaxes(1, 2).reshape(64, 64)
    stored = gguf.quants.dequantize(tensors["blk.0.attn_q.weight"].data, gguf.GGMLQuantizationType.Q4_0)
    assert np.array_equal(stored, converted)

    check = export_gguf.dequantization_check(files, written)
    assert check["passed"] and check["bit_exact"] == check["tensors"] == len(expected) + 2 * 14


def test_adapter_holds_the_eora_residual_as_lora_pairs(tiny_lm_folder: Path, tmp_path: Path) -> None:
    loaded = _quantized_tiny(tiny_lm_folder)
    files, _ = _write(loaded)
    reader = _read(files[GGUF_ADAPTER], tmp_path, GGUF_ADAPTER)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == 0.0  # llama.cpp: scale 1
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * 2 * 7

    def values(name: str) -> np.ndarray:
        return gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type)

    for block, name, short in ((0, "mlp.down_proj", "ffn_down"), (1, "self_attn.k_proj", "attn_k")):
        layer = loaded.module.model.layers[block].get_submodule(name)
        residual = (layer.b.weight @ layer.a.weight).detach().numpy()
        if short == "attn_k":
            residual = residual.reshape(2, 2, 8, 64).swapaxes(1, 2).reshape(32, 64)
        lora_a, lora_b = values(f"blk.{block}.{short}.weight.lora_a"), values(f"blk.{block}.{short}.weight.lora_b")
        assert tensors[f"blk.{block}.{short}.weight.lora_a"].tensor_type.name == "Q8_0"  # rank 32: whole blocks
        assert lora_a.shape == (32, layer.base.in_features) and lora_b.shape == (layer.base.out_features, 32)
        np.testing.assert_allclose(lora_b @ lora_a, residual, rtol=1e-5, atol=1e-7)


def test_same_build_writes_the_same_bytes(tiny_lm_folder: Path) -> None:
    digests = [hashlib.sha256(_write(_quantized_tiny(tiny_lm_folder, rank=8))[0]["model.gguf"]).hexdigest()
               for _ in range(2)]
    assert digests[0] == digests[1]


def test_gguf_builds_refuse_settings_blocks_cannot_hold(tiny_lm_folder: Path) -> None:
    with pytest.raises(UsageError, match="set weights.group_size = 32"):
        build(tiny_lm_folder, "x86-64", format="gguf", quiet=True, overrides={"weights.group_size": 64})
    with pytest.raises(UsageError, match="weights.symmetric = true"):
        build(tiny_lm_folder, "x86-64", format="gguf", quiet=True, overrides={"weights.symmetric": False})
    with pytest.raises(UsageError, match="does not run gguf"):
        build(tiny_lm_folder, "jetson-orin-nano", format="gguf", quiet=True)


def test_a_searched_configuration_s_files_are_no_larger_than_the_search_priced_them(tiny_lm_folder: Path) -> None:
    """A budget search over GGUF prices each unit's level from its tensors: any mixed configuration's model and
    adapter files come to at most the predicted size, and within the padding (plus the adapter's fixed part
    where no unit has EoRA) of it; the decode estimate reads the same bytes, to within the adapter's header."""
    loaded = llm.load_lm(tiny_lm_folder, None)
    model = loaded.module
    calibration = llm.token_windows(loaded.tokenizer, list(llm.wiki_articles()[:4]), 32, 4)
    labels = ("int8", "int4+eora32", "int4")
    levels = [WeightLevel.parse(label) for label in labels]
    scheme = WeightScheme(4, 32, rank_bits=8)
    quiet = Progress(quiet=True)
    arrays = level_database(model, calibration, levels, scheme, quiet)
    hidden = torch.from_numpy(arrays["hidden"])
    working = copy.deepcopy(model)
    quantize_ends(working, hidden, scheme, 8, 8)
    space = LanguageModelSpace(model, working, variants(model, arrays, levels, scheme), list(labels),
                               calibration[:2], hidden[:2], "test")
    precision = "/".join(labels)
    measured = uniform_files(space, loaded, precision, quiet)
    space.set_costs(measured["shares"], measured["analysis"], lambda analysis: analysis["weight_bytes"] * 1e-6)
    unit_bytes = [[level.delta.bytes for level in unit.levels] for unit in space.units]
    assert all(0 == int8 > int4 < eora for int8, eora, int4 in unit_bytes)  # relative to every unit at int8
    for config in [(0, 1, 2, 1), (2, 1, 0, 2), (1, 1, 1, 1), (2, 0, 2, 0), (0, 0, 0, 0), (2, 2, 2, 2)]:
        files, _, _ = gguf_files(space.stitch(config), loaded, precision)
        real, predicted = sum(map(len, files.values())), cost(space, config)
        slack = predicted.bytes - real
        assert predicted.latency_ms == pytest.approx(real * 1e-6, abs=1024e-6), config  # less a header at most
        if 1 in config:
            assert GGUF_ADAPTER in files and 0 <= slack <= 2 * 62, config
        else:  # no adapter file: its header and metadata were priced in
            assert GGUF_ADAPTER not in files and 0 < slack < 1024, config


@pytest.mark.skipif(HAS_LLAMA_CPP, reason="llama-cpp-python is installed: the build verifies instead")
def test_gguf_build_without_llama_cpp_says_so_and_exits_2(tiny_lm_folder: Path) -> None:
    from edgekit.cli import main

    assert main(["build", str(tiny_lm_folder), "--target", "x86-64", "--format", "gguf", "-q"]) == 2
    with pytest.raises(UsageError, match="verifies the model in llama.cpp, which is not installed"):
        build(tiny_lm_folder, "x86-64", format="gguf", quiet=True)


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason=NO_LLAMA_CPP)
def test_llama_cpp_computes_what_the_dequantized_torch_model_does(tiny_lm_folder: Path, tmp_path: Path) -> None:
    from edgekit.runtimes.llama_cpp_lm import LlamaCppLM

    loaded = _quantized_tiny(tiny_lm_folder)
    files, _ = _write(loaded)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    ids = llm.token_windows(loaded.tokenizer, list(llm.wiki_articles()[30:32]), 48, 1)[0]
    with torch.no_grad():
        expected = loaded.module(ids[None]).logits[0].numpy()
    runner = LlamaCppLM(tmp_path / "model.gguf", tmp_path / GGUF_ADAPTER, threads=1, context=64)
    got = runner.step(ids.tolist())
    # llama.cpp multiplies Q4_0 / Q8_0 weights by activations rounded to Q8_0 blocks: close, not equal
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() < 0.02 * scale
    assert (got.argmax(-1) == expected.argmax(-1)).mean() > 0.9
    without = LlamaCppLM(tmp_path / "model.gguf", None, threads=1, context=64).step(ids.tolist())
    assert np.abs(without - expected).max() > np.abs(got - expected).max()  # the adapter is applied


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason=NO_LLAMA_CPP)
def test_gguf_build_is_verified_in_llama_cpp(tiny_lm_folder: Path) -> None:
    result = build(tiny_lm_folder, "raspberry-pi-5", format="gguf", quiet=True,
                   overrides={**TEXT, "lowrank.rank": 32})
    report = result.report
    assert report["artifact"]["format"] == "gguf" and report["artifact"]["file"] == "model.gguf"
    assert report["artifact"]["dequantization_check"]["passed"]
    assert report["artifact"]["tensor_types"] == {"F32": 5, "Q4_0": 14, "Q8_0": 1 + 28}
    assert (result.out / "eora-adapter.gguf").is_file()
    assert report["latency_ms"]["measured_host"]["runtime"].startswith("llama.cpp")
    assert report["latency_ms"]["measured_host"]["label"] == "measured: host"
    assert 0.8 < report["ppl_ratio"] < 1.25 and report["next_token_agreement"] > 0.5


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason=NO_LLAMA_CPP)
def test_gguf_budget_build_mixes_q8_0_and_q4_0_within_the_budget(tiny_lm_folder: Path) -> None:
    from edgekit.search import BudgetUnreachable

    settings = {**TEXT, "search.weight_levels": ["int8", "int4"], "search.generations": 3, "search.offspring": 4,
                "search.images": 2}
    with pytest.raises(BudgetUnreachable) as raised:
        build(tiny_lm_folder, "raspberry-pi-5", format="gguf", quiet=True,
              overrides={**settings, "search.budget": "bytes=1kB"})
    limit = int(raised.value.closest.bytes) + 16_000  # every unit at Q4_0, and room for about two at Q8_0
    report = build(tiny_lm_folder, "raspberry-pi-5", format="gguf", quiet=True,
                   overrides={**settings, "search.budget": f"bytes={limit}B"}).report
    search = report["search"]
    assert report["size_bytes"] <= search["chosen"]["bytes"] <= limit
    levels = search["chosen"]["levels"]
    assert set(levels) == {"int8", "int4"}
    # units alternate attention (4 linears) and MLP (3); the tied table is Q8_0 too
    eights = sum(4 if unit % 2 == 0 else 3 for unit, level in enumerate(levels) if level == "int8")
    assert report["artifact"]["tensor_types"] == {"F32": 5, "Q8_0": 1 + eights, "Q4_0": 14 - eights}
    assert report["artifact"]["dequantization_check"]["passed"] and report["ppl_ratio"] < 1.25
