"""Block-by-block compression of a checkpoint read in place: the same graph and codes as the model compressed in
memory, from a sharded safetensors folder, with the blocks never all loaded."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgekit.errors import UsageError
from edgekit.families import llm
from edgekit.families.llm_adapter import quantize_lm
from edgekit.families.llm_lazy import DATA_FILE, MODEL_FILE, Shards, compress_lazily
from edgekit.passes import weightonly
from edgekit.passes.export_llm import export_lm
from edgekit.passes.sequential import WeightScheme
from edgekit.progress import Progress
from edgekit.runtimes.onnx_lm import OnnxCausalLM

from .conftest import VOCAB, tiny_llama


@pytest.mark.parametrize(("tie", "table_bits"), [(True, 8), (False, 8), (False, None)])
def test_a_sharded_checkpoint_compressed_block_by_block_matches_the_model_compressed_in_memory(
        tmp_path: Path, tie: bool, table_bits: int | None) -> None:
    model = tiny_llama(seed=3, tie=tie)
    with torch.no_grad():  # norms as trained ones are: not all ones (the exporter stores equal tensors once)
        for name, weight in model.named_parameters():
            if name.endswith("norm.weight"):
                weight.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="40KB")  # several shards: blocks span files
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    calibration = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))
    scheme = WeightScheme(4, 32, True, "gptq", 0.01, rank=8)

    in_memory = copy.deepcopy(model)
    expected = quantize_lm(in_memory, calibration, scheme, table_bits, table_bits, Progress(quiet=True))
    graph = export_lm(in_memory, 17).SerializeToString()
    reference = OnnxCausalLM(graph, 1)
    found = compress_lazily(tmp_path / "ckpt", tmp_path / "out", calibration, scheme, table_bits, table_bits, 17, 0)

    assert [(r["block"], r["layer"], r["bytes"]) for r in found["layers"]] == [
        (r["block"], r["layer"], r["bytes"]) for r in expected["layers"]]
    assert len(found["block_seconds"]) == 2
    assert (tmp_path / "out" / DATA_FILE).stat().st_size > (tmp_path / "out" / MODEL_FILE).stat().st_size
    assert _weight_bytes(onnx.load(tmp_path / "out" / MODEL_FILE)) == _weight_bytes(onnx.load_from_string(graph))
    lazy = OnnxCausalLM(str(tmp_path / "out" / MODEL_FILE), 1)
    assert lazy.past_shapes == reference.past_shapes and lazy.outputs == reference.outputs
    prompt = np.arange(5, 17)
    ours, cache = lazy.step(prompt, lazy.empty_cache())
    theirs, their_cache = reference.step(prompt, reference.empty_cache())
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    ours, _ = lazy.step(np.array([7]), cache)  # one decode step through the cache the prefill returned
    theirs, _ = reference.step(np.array([7]), their_cache)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    float_logits = llm.logits(model, torch.from_numpy(prompt)[None])[0][0].detach().numpy()
    assert np.abs(float_logits - ours).max() > 0  # quantized, not the float model by another road


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_a_tall_matrix_is_quantized_a_slice_of_rows_at_a_time_with_the_same_codes(
        monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    weight = torch.randn(300, 64, generator=torch.Generator().manual_seed(0))
    inputs = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    scheme = WeightScheme(4, 32, True, method)  # type: ignore[arg-type]
    whole = scheme.quantize(weight, (inputs.T @ inputs).double())
    monkeypatch.setattr(weightonly, "SLICE_WEIGHTS", 64 * 64)  # 64 rows a slice: 5 slices
    assert len(weightonly.row_slices(300, 64)) == 5
    sliced = scheme.quantize(weight, (inputs.T @ inputs).double())
    assert torch.equal(sliced.codes, whole.codes) and torch.equal(sliced.scales, whole.scales)
    assert torch.equal(sliced.dequantize(), whole.dequantize())


def _weight_bytes(graph: onnx.ModelProto) -> int:
    """The bytes of a graph's initializers (a tied table counted once if stored once)."""
    return sum(onnx.numpy_helper.to_array(t).nbytes for t in graph.graph.initializer)


def test_a_folder_without_safetensors_is_refused_in_one_line(tmp_path: Path) -> None:
    tiny_llama().save_pretrained(tmp_path, safe_serialization=False)
    if (tmp_path / "model.safetensors").exists():
        (tmp_path / "model.safetensors").unlink()
    with pytest.raises(UsageError, match="no safetensors weights"):
        Shards(tmp_path)


def test_a_build_refuses_a_checkpoint_larger_than_memory_naming_the_block_by_block_path(
        tiny_lm_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgekit.api import build
    from edgekit.families import llm_lazy

    params = sum(p.numel() for p in llm.load_lm(tiny_lm_folder, None).module.parameters())
    assert Shards(tiny_lm_folder).numel() == params  # from the headers: the tied head is stored once
    monkeypatch.setattr(llm_lazy, "available_memory", lambda: 8 * params - 1)
    with pytest.raises(UsageError, match=r"float32 twice .*compress_lazily"):
        build(tiny_lm_folder, "x86-64", quiet=True)
    monkeypatch.setattr(llm_lazy, "available_memory", lambda: 8 * params)
    llm.load_lm(tiny_lm_folder, None)  # it fits
