"""Language models: GPTQ/RTN, EoRA, the key/value-cache export with MatMulNBits, and the build, on tiny Llamas."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekit.api import build
from edgekit.families import llm
from edgekit.families.llm_adapter import quantize_lm, torch_greedy
from edgekit.passes.eora import Compensated, eora, output_error
from edgekit.passes.export_llm import export_lm, pack_codes
from edgekit.passes.sequential import WeightScheme
from edgekit.passes.weightonly import block_size, gptq, rtn
from edgekit.runtimes.onnx_lm import OnnxCausalLM

from .conftest import VOCAB, TinyNet, tiny_llama
from .test_report_html import assert_page


def _inputs(rows: int = 2048, features: int = 128, seed: int = 0) -> torch.Tensor:
    """Correlated, unevenly scaled inputs like a layer's activations (a few directions carry most energy)."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(features, features, generator=generator)
    scales = torch.logspace(1, -2, features)
    return (torch.randn(rows, features, generator=generator) * scales) @ basis


def test_gptq_beats_round_to_nearest_on_the_layer_output() -> None:
    x = _inputs()
    weight = torch.randn(96, 128, generator=torch.Generator().manual_seed(1))
    covariance = x.T @ x
    for bits, group in ((4, 32), (4, 128), (8, 64)):
        by_rtn = output_error(weight - rtn(weight, bits, group, symmetric=True).dequantize(), covariance)
        for act_order in (False, True):
            quantized = gptq(weight, covariance, bits, group, symmetric=True, act_order=act_order)
            by_gptq = output_error(weight - quantized.dequantize(), covariance)
            assert by_gptq < 0.8 * by_rtn, (bits, group, act_order, by_gptq, by_rtn)


def test_quantized_weights_are_codes_on_a_grid() -> None:
    weight = torch.randn(8, 70)  # 70 columns: the last group of 32 is partial
    for symmetric in (True, False):
        quantized = rtn(weight, 4, 32, symmetric)
        assert quantized.codes.max() <= 15 and quantized.scales.shape == (8, 3)
        step = quantized.scales.abs().repeat_interleave(32, dim=1)[:, :70]
        # asymmetric grids round to the nearest step; symmetric ones may clip the far side by one step
        assert ((quantized.dequantize() - weight).abs() <= step * (1 if symmetric else 0.5) + 1e-6).all()
    symmetric = rtn(weight, 4, 32, True)
    assert symmetric.symmetric and int(symmetric.zeros.unique()[0]) == 8
    assert torch.equal(symmetric.scales.half().float(), symmetric.scales)  # stored as float16 without loss
    extremes = weight[:, :32].abs().argmax(dim=1)  # the largest-magnitude weight of a group is exact, up to
    largest = weight[torch.arange(8), extremes]  # the float16 rounding of its scale
    exact = symmetric.dequantize()[torch.arange(8), extremes] - largest
    assert (exact.abs() <= largest.abs() * 2.0**-11).all()


def test_eora_beats_plain_svd_of_the_error_on_real_inputs() -> None:
    x = _inputs(seed=2)
    covariance = x.T @ x
    weight = torch.randn(96, 128, generator=torch.Generator().manual_seed(3))
    delta = weight - rtn(weight, 4, 64, symmetric=True).dequantize()
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    before = output_error(delta, covariance)
    errors = []
    for rank in (4, 16, 32):
        b, a = eora(delta, covariance, rank)
        plain = (u[:, :rank] * s[:rank]) @ vh[:rank]
        errors.append(output_error(delta - b @ a, covariance))
        assert errors[-1] < 0.9 * output_error(delta - plain, covariance)
    assert before > errors[0] > errors[1] > errors[2]


def test_codes_pack_low_bits_first() -> None:
    codes = np.array([[1, 2, 3, 15, 7]], np.uint8)
    assert pack_codes(codes, 4).tolist() == [[0x21, 0xF3, 0x07]]
    assert pack_codes(codes, 8).tolist() == codes.tolist()


def test_export_prefills_and_decodes_through_the_cache_like_torch() -> None:
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (1, 24))
    runner = OnnxCausalLM(export_lm(model, 17).SerializeToString(), 1)
    with torch.no_grad():
        expected = model(ids).logits[0].numpy()
    prefill, _ = runner.step(ids[0].numpy(), runner.empty_cache())
    np.testing.assert_allclose(prefill, expected, atol=1e-4)
    _, cache = runner.step(ids[0, :16].numpy(), runner.empty_cache())
    stepped = []
    for position in range(16, 24):
        logits, cache = runner.step(ids[0, position : position + 1].numpy(), cache)
        stepped.append(logits[-1])
    np.testing.assert_allclose(np.stack(stepped), expected[16:], atol=1e-4)
    assert runner.greedy(ids[0, :8].numpy(), 6)["tokens"] == torch_greedy(model, ids[0, :8], 6)


def test_fp16_graph_keeps_float32_inputs_and_outputs_and_the_logits() -> None:
    from onnx import numpy_helper

    from edgekit.passes.quantize import to_fp16

    def weight_bytes(graph: object) -> int:
        return sum(numpy_helper.to_array(i).nbytes for i in graph.graph.initializer)

    model = tiny_llama()
    graph = to_fp16(export_lm(model, 17))
    assert weight_bytes(graph) < 0.55 * weight_bytes(export_lm(model, 17))
    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        expected = model(ids).logits[0].numpy()
    runner = OnnxCausalLM(graph.SerializeToString(), 1)
    logits, cache = runner.step(ids[0].numpy(), runner.empty_cache())
    assert logits.dtype == np.float32 and all(v.dtype == np.float32 for v in cache.values())
    np.testing.assert_allclose(logits, expected, atol=0.02 * np.abs(expected).max())


@pytest.mark.parametrize(("scheme", "tie"), [(WeightScheme(4, 32, method="gptq", rank=8, rank_bits=8), True),
                                            (WeightScheme(4, 64, symmetric=False, method="rtn"), False),
                                            (WeightScheme(8, 32, method="gptq"), True),
                                            (WeightScheme(4, 32, ranks=(("mlp.down_proj", 4), ("q_proj", 8))), True)])
def test_integer_graph_computes_what_the_quantized_torch_model_does(scheme: WeightScheme, tie: bool) -> None:
    from onnx import numpy_helper

    from edgekit.progress import Progress

    model = tiny_llama(tie=tie)
    calibration = torch.randint(0, VOCAB, (8, 32))
    record = quantize_lm(model, calibration, scheme, head_bits=4, embedding_bits=8, progress=Progress(quiet=True))
    graph = export_lm(model, 17)
    nbits = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    per_block = 7 + 2 * sum(1 for name in llm.LINEARS if scheme.rank_for(name))
    assert len(nbits) == 2 * per_block + 1  # every block linear (and its EoRA factors), plus the head
    ranks = {r["layer"]: r.get("output_error_eora") for r in record["layers"] if r["block"] == 0}
    assert all((ranks[name] is not None) == bool(scheme.rank_for(name)) for name in llm.LINEARS)
    floats = [i for i in graph.graph.initializer if numpy_helper.to_array(i).dtype == np.float32]
    assert max(numpy_helper.to_array(i).size for i in floats) < VOCAB * 64 / 4  # no float table left
    table = next(r for r in record["layers"] if r["layer"] == "embed_tokens")
    assert table.get("shared_with") == ("lm_head" if tie else None)  # a tied table is the head's codes
    assert all(np.isfinite(r.get("output_error", 0)) for r in record["layers"])
    ids = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        expected = model(ids).logits[0].numpy()
    runner = OnnxCausalLM(graph.SerializeToString(), 1)
    logits, _ = runner.step(ids[0].numpy(), runner.empty_cache())
    np.testing.assert_allclose(logits, expected, atol=1e-4)  # float activations: the same arithmetic as torch
    assert graph.ByteSize() < export_lm(tiny_llama(tie=tie), 17).ByteSize() / 2
    fast = OnnxCausalLM(export_lm(model, 17, accuracy_level=4).SerializeToString(), 1)
    approx, _ = fast.step(ids[0].numpy(), fast.empty_cache())  # int8 activations: close, not equal
    assert 0 < np.abs(approx - expected).max() < 0.05 * np.abs(expected).max()


def test_width_and_depth_pruning_keep_the_model_runnable_and_exportable() -> None:
    from edgekit.families.llm_adapter import prune_lm
    from edgekit.passes.distill import distill, next_token_kl
    from edgekit.progress import Progress

    teacher = tiny_llama(tie=False)
    teacher.config.num_hidden_layers = 3
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(teacher.config).eval()
    student = __import__("copy").deepcopy(teacher)
    calibration = torch.randint(0, VOCAB, (8, 32))
    record = prune_lm(student, calibration, 0.5, 1, Progress(quiet=True))
    assert len(record["dropped_blocks"]) == 1 and len(llm.decoder_layers(student)) == 2
    assert record["width"] == {"mlp_channels": [128, 64], "heads": [4, 2]}  # one query head of each pair
    assert record["params_after"] < 0.8 * record["params_before"]
    for layer in llm.decoder_layers(student):
        assert layer.mlp.down_proj.bias is not None  # the removed channels' mean, kept as a bias
        assert layer.self_attn.q_proj.out_features == layer.self_attn.o_proj.in_features == 2 * 16
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        pruned = student(ids, use_cache=False).logits[0].numpy()
    assert np.isfinite(pruned).all()
    runner = OnnxCausalLM(export_lm(student, 17).SerializeToString(), 1)
    np.testing.assert_allclose(runner.step(ids[0].numpy(), runner.empty_cache())[0], pruned, atol=1e-4)
    assert runner.greedy(ids[0, :4].numpy(), 4)["tokens"] == torch_greedy(student, ids[0, :4], 4)
    done = distill(student, teacher, calibration, llm.logits, loss=next_token_kl, steps=8, seconds=60, lr=1e-3,
                   batch=4, seed=0, progress=lambda xs, _n: xs)
    assert done["steps"] == 8 and done["probe_loss_after"] < done["probe_loss_before"]


def test_wikipedia_text_splits_into_disjoint_parts() -> None:
    calibration, held, source = llm.text_parts(None)
    assert "Wikipedia" in source and len(held) >= 20 and len(calibration) >= 4 * len(held) - 4
    assert not set(calibration) & set(held)
    assert all(not doc.upper().startswith("#REDIRECT") for doc in held)


def test_build_int4_eora_tiny_llama_is_verified_in_onnxruntime(tiny_lm_folder: Path) -> None:
    text = {"text.calib_windows": 8, "text.calib_length": 32, "text.eval_windows": 4, "text.eval_length": 64,
            "text.prompts": 2, "text.prompt_length": 8, "text.new_tokens": 6, "lowrank.rank": 8,
            "weights.group_size": 32, "gates.max_ppl_ratio": 1.5}
    result = build(tiny_lm_folder, "android-arm64", quiet=True, overrides=text)
    report = result.report
    assert report["model"]["family"] == "llm" and report["artifact"]["precision"] == "int4"
    accuracy = report["accuracy"]
    assert accuracy["eval_tokens"] == 4 * 63 and accuracy["ppl_reference"] > 1
    assert accuracy["ppl_ratio"] == pytest.approx(accuracy["ppl_artifact"] / accuracy["ppl_reference"], rel=1e-3)
    assert 0 <= accuracy["generation_agreement"] <= 1 and 0 <= accuracy["next_token_agreement"] <= 1
    assert report["quantization"]["scheme"]["accuracy_level"] == 4
    scheme = report["quantization"]["scheme"]
    assert scheme["eora_rank"] == 8 and scheme["method"] == "gptq"
    assert report["quantization"]["mean_output_error_eora"] < report["quantization"]["mean_output_error"]
    assert report["latency_ms"]["measured_host"]["label"] == "measured: host"
    assert report["latency_ms"]["estimated_target"]["label"] == "estimated"
    assert report["latency_ms"]["estimated_target"]["decode_bound"] in ("memory", "compute")
    gate = next(g for g in report["gates"] if g["name"] == "max_ppl_ratio")
    assert gate["value"] == accuracy["ppl_ratio"] and gate["status"] == ("passed" if gate["value"] <= 1.5 else "failed")
    manifest = json.loads((result.out / "manifest.json").read_text())
    assert manifest["outputs"]["model.onnx"]["sha256"] == report["artifact"]["sha256"]
    assert (result.out / "tokenizer" / "tokenizer.json").is_file()
    page = assert_page(result.out)
    assert any(caption.startswith("Quantization error per layer") for caption, _ in page.charts)
    examples = report["examples"]  # both prompts' greedy continuations, as text, on the page
    assert [e["kind"] for e in examples] == ["text", "text"] and all(e["tokens"] == 6 for e in examples)
    agreement = sum(e["same_tokens"] / e["tokens"] for e in examples) / 2
    assert agreement == pytest.approx(accuracy["generation_agreement"], abs=1e-4)
    assert [row[2] for row in page.tables["examples"][1:]] == [e["artifact"] for e in examples]


def test_depth_pruned_build_reports_the_exported_models_cache(tiny_lm_folder: Path) -> None:
    text = {"text.calib_windows": 4, "text.calib_length": 32, "text.eval_windows": 2, "text.eval_length": 32,
            "text.prompts": 1, "text.prompt_length": 8, "text.new_tokens": 4, "prune.blocks": 1}
    report = build(tiny_lm_folder, "x86-64", precision="fp32", quiet=True, overrides=text).report
    assert report["pruning"]["dropped_blocks"] and report["model"]["layers"] == 2
    per_token = 2 * 1 * 2 * 16 * 4  # key and value, one block left, 2 key/value heads of 16 floats
    assert report["latency_ms"]["estimated_target"]["kv_cache_bytes_per_token"] == per_token


def test_language_model_usage_errors(tiny_lm_folder: Path) -> None:
    from edgekit.errors import UsageError

    with pytest.raises(UsageError, match="llm models export to onnx"):
        build(tiny_lm_folder, "android-arm64", format="tflite", quiet=True)
    with pytest.raises(UsageError, match="power of two"):
        build(tiny_lm_folder, "x86-64", quiet=True, overrides={"weights.group_size": 48})
    with pytest.raises(UsageError, match="distill.scope does not apply to llm models"):
        build(tiny_lm_folder, "x86-64", quiet=True, overrides={"distill.scope": "blocks", "distill.steps": 5})
    with pytest.raises(UsageError, match="int4 is not supported for classifier"):
        build(TinyNet(), "x86-64", precision="int4", quiet=True)


def test_cli_builds_a_language_model_from_a_recipe_and_inspects_it(tiny_lm_folder: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from edgekit.cli import main

    recipe = tmp_path / "llm.toml"
    recipe.write_text("[quantize]\nprecision = 'int8'\n[weights]\nmethod = 'rtn'\ngroup_size = 32\n"
                      "[text]\ncalib_windows = 4\ncalib_length = 32\neval_windows = 2\neval_length = 32\n"
                      "prompts = 1\nprompt_length = 8\nnew_tokens = 4\n[gates]\nmax_ppl_ratio = 1.05\n")
    articles = llm.wiki_articles()
    notes, held = tmp_path / "notes.txt", tmp_path / "held"
    notes.write_text("\n\n".join(articles[20:24]))
    held.mkdir()
    for index, article in enumerate(articles[30:32]):
        (held / f"{index}.txt").write_text(article)
    code = main(["build", str(tiny_lm_folder), "--target", "raspberry-pi-5", "--recipe", str(recipe), "-q", "--json",
                 "--calib", str(notes), "--eval", str(held)])
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy"]["eval_source"] == f"calibration: {notes}; held out: {held}"
    assert report["artifact"]["precision"] == "int8" and report["quantization"]["scheme"]["method"] == "rtn"
    assert code == (1 if report["status"] == "gate_failed" else 0)
    assert report["latency_ms"]["estimated_target"]["tokens_per_s"] > 0
    assert main(["inspect", str(tiny_lm_folder)]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "2 blocks" in out
    folder = Path("dist") / "tiny-llama-raspberry-pi-5"
    assert main(["generate", str(folder), "The history of", "--tokens", "5", "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("The history of") and "5 tokens" in err and "tokens/s" in err
    assert main(["generate", str(tmp_path), "x"]) == 2  # not an artifact folder


def test_a_narrow_factor_takes_the_smallest_group_that_covers_it() -> None:
    assert [block_size(columns, 64) for columns in (8, 16, 24, 32, 64, 576)] == [16, 16, 32, 32, 64, 64]
    layer = torch.nn.Linear(128, 96, bias=False)
    b, a = eora(torch.randn(96, 128), torch.eye(128), 16)
    compensated = Compensated(layer, b, a, factor_bits=8, group_size=64)
    assert compensated.b.edgekit_quantized.group_size == 16  # B has 16 columns: no padding to 64
    assert compensated.a.edgekit_quantized.group_size == 64
