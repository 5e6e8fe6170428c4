"""SmolLM2-135M-Instruct, side by side in one run: edgekit FP32, RTN/GPTQ int4, GPTQ int4 + EoRA, pruned
variants, against NNCF's `compress_weights` int4 (data-free, AWQ + scale estimation, + LoRA correction).

    .venv/bin/pip install -e '.[bench]' && .venv/bin/python bench/llm.py [--ranks 8 16 32 64] [--skip-pruned]

Every variant is scored the same way in its runtime (edgekit's verification: summed NLL on the same held-out
Wikipedia windows, greedy decode through the key/value cache, tokens/s measured here, 2 threads): ONNX graphs in
onnxruntime, OpenVINO IRs in OpenVINO. The NNCF peer compresses edgekit's own FP32 graph with
`nncf.compress_weights` (its ONNX backend: MatMulNBits, like edgekit's), calibrated on the same windows, so ppl,
bytes (file size) and speed compare like for like. LoRA correction exists only in NNCF's OpenVINO backend: that
row converts the same graph to OpenVINO, compresses it there and runs it in OpenVINO (bytes: the IR files);
`--openvino` adds edgekit's GPTQ int4 builds (with EoRA at the first of `--ranks`) as OpenVINO IRs
(`--format openvino`) beside it.

SmolLM2's weights were 4-bit once (the GGUF is Q4_1): int4 results on the unpruned model are optimistic.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from typing import Any

MODEL, TARGET = "smollm2-135m", "x86-64"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--prune", type=float, default=0.25, help="width pruning ratio of the pruned variants")
    parser.add_argument("--distill-steps", type=int, default=100)
    parser.add_argument("--skip-pruned", action="store_true")
    parser.add_argument("--skip-nncf", action="store_true")
    parser.add_argument("--head-bits", type=int, choices=[4, 8], default=8, help="edgekit's output-layer bits")
    parser.add_argument("--openvino", action="store_true", help="edgekit's GPTQ int4 builds as OpenVINO IRs too")
    args = parser.parse_args()

    import edgekit
    from edgekit.cache import ArrayCache, default_cache_dir
    from edgekit.families.llm import load_lm
    from edgekit.families.llm_adapter import load_text, reference, verify_lm
    from edgekit.progress import Progress
    from edgekit.recipe import Recipe
    from edgekit.runtimes.onnx_lm import OnnxCausalLM

    work = Path(tempfile.mkdtemp(prefix="edgekit-llm-bench-"))
    rows: list[dict[str, Any]] = []
    base = {"weights.group_size": args.group_size, "weights.head_bits": args.head_bits}

    def edgekit_build(name: str, precision: str, fmt: str = "onnx", **overrides: Any) -> None:
        start = time.perf_counter()
        result = edgekit.build(MODEL, TARGET, precision=precision, format=fmt, out=work / name.replace(" ", "-"),
                               quiet=True, overrides=base | overrides)
        report = result.report
        rows.append({"variant": name, "ppl": report["ppl_artifact"], "reference": report["ppl_reference"],
                     "bytes": report["size_bytes"], "tok_s": report["latency_ms"]["measured_host"]["tokens_per_s"],
                     "build_s": time.perf_counter() - start, "runtime": "openvino" if fmt == "openvino" else
                     "onnxruntime"})
        print(f"  {name}: ppl {report['ppl_artifact']:.3f}", flush=True)

    edgekit_build("edgekit fp32", "fp32")
    edgekit_build("edgekit rtn int4", "int4", **{"weights.method": "rtn"})
    edgekit_build("edgekit gptq int4", "int4")
    for rank in args.ranks:
        edgekit_build(f"edgekit gptq int4 + eora r{rank}", "int4", **{"lowrank.rank": rank})
    if args.openvino:
        edgekit_build("edgekit gptq int4, IR", "int4", "openvino")
        edgekit_build(f"edgekit gptq int4 + eora r{args.ranks[0]}, IR", "int4", "openvino",
                      **{"lowrank.rank": args.ranks[0]})

    if not args.skip_nncf:
        import nncf
        import onnx

        loaded = load_lm(MODEL, default_cache_dir())
        plan = Recipe()
        text = load_text(loaded, plan, None, None)
        ref = reference(loaded, text, plan.text.new_tokens, ArrayCache(default_cache_dir()), Progress(quiet=True))
        float_graph = _untied(onnx.load(work / "edgekit-fp32" / "model.onnx"))
        empty = OnnxCausalLM(float_graph.SerializeToString(), 1).empty_cache()
        dataset = nncf.Dataset([{"input_ids": w[None].numpy(), **empty} for w in text.calibration])
        for name, options in (("nncf int4", {}), ("nncf int4 awq+se", {"awq": True, "scale_estimation": True})):
            start = time.perf_counter()
            compressed = nncf.compress_weights(
                copy.deepcopy(float_graph), mode=nncf.CompressWeightsMode.INT4_SYM, group_size=args.group_size,
                ratio=1.0, dataset=dataset, subset_size=len(text.calibration), **options)
            seconds = time.perf_counter() - start
            artifact = compressed.SerializeToString()
            accuracy, measured, _ = verify_lm(OnnxCausalLM(artifact, 2), text, ref, Progress(quiet=True))
            rows.append({"variant": name, "ppl": accuracy["ppl_artifact"], "reference": accuracy["ppl_reference"],
                         "bytes": len(artifact), "tok_s": measured["tokens_per_s"], "build_s": seconds,
                         "runtime": "onnxruntime"})
            print(f"  {name}: ppl {accuracy['ppl_artifact']:.3f}", flush=True)

        rows.append(_openvino_lora(float_graph, text, ref, args.group_size, work))

    if not args.skip_pruned:
        pruned = {"prune.ratio": args.prune, "distill.steps": args.distill_steps}
        edgekit_build(f"edgekit pruned {args.prune:.0%} + distilled", "fp32", **pruned)
        edgekit_build(f"edgekit pruned {args.prune:.0%} + distilled + gptq int4 + eora r32", "int4",
                      **pruned, **{"lowrank.rank": 32})

    _print(rows)


def _openvino_lora(graph: Any, text: Any, ref: dict[str, Any], group_size: int, work: Path) -> dict[str, Any]:
    """NNCF int4 with AWQ, scale estimation and LoRA correction: only NNCF's OpenVINO backend takes LoRA
    correction, so this peer is the same FP32 graph converted to OpenVINO, compressed there, and verified in the
    OpenVINO runtime as edgekit's IR builds are (the same windows, the same decode loop through the cache)."""
    import nncf
    import onnx
    import openvino as ov

    from edgekit.families.llm_adapter import verify_lm
    from edgekit.progress import Progress
    from edgekit.runtimes.onnx_lm import OnnxCausalLM
    from edgekit.runtimes.openvino import OpenVinoCausalLM

    empty = OnnxCausalLM(graph.SerializeToString(), 1).empty_cache()
    start = time.perf_counter()
    folder = work / "nncf-lora"
    folder.mkdir()
    source = folder / "float.onnx"  # OpenVINO converts ONNX files, not in-memory graphs
    onnx.save(graph, source)
    model = ov.convert_model(source)
    source.unlink()
    dataset = nncf.Dataset([{"input_ids": w[None].numpy(), **empty} for w in text.calibration])
    compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=group_size,
                                       ratio=1.0, dataset=dataset, subset_size=len(text.calibration), awq=True,
                                       scale_estimation=True, lora_correction=True)
    seconds = time.perf_counter() - start
    ov.save_model(compressed, folder / "model.xml")
    runner = OpenVinoCausalLM((folder / "model.xml").read_bytes(), (folder / "model.bin").read_bytes(), 2)
    accuracy, measured, _ = verify_lm(runner, text, ref, Progress(quiet=True))
    print(f"  nncf int4 awq+se+lora: ppl {accuracy['ppl_artifact']:.3f}", flush=True)
    return {"variant": "nncf int4 awq+se+lora", "ppl": accuracy["ppl_artifact"],
            "reference": accuracy["ppl_reference"], "bytes": sum(f.stat().st_size for f in folder.iterdir()),
            "tok_s": measured["tokens_per_s"], "build_s": seconds, "runtime": "openvino"}


def _untied(graph: Any) -> Any:
    """The FP32 graph with the head's weight as its own initializer (edgekit reads the tied table through a
    Transpose; NNCF's ONNX backend compresses MatMuls whose weight is an initializer)."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in graph.graph.initializer}
    for node in [n for n in graph.graph.node if n.op_type == "Transpose" and n.input[0] in initializers]:
        table = numpy_helper.to_array(initializers[node.input[0]])
        graph.graph.initializer.append(numpy_helper.from_array(table.T.copy(), node.output[0]))
        graph.graph.node.remove(node)
    return graph


def _print(rows: list[dict[str, Any]]) -> None:
    reference = rows[0]["reference"]
    print(f"\nSmolLM2-135M-Instruct, held-out Wikipedia (gensim dump); original PyTorch ppl {reference:.3f}; "
          "latency measured here (2 threads, in each row's runtime, KV cache)")
    print(f"{'variant':<52}{'ppl':>9}{'Δppl':>8}{'MB':>8}{'tok/s':>8}{'build s':>9}  runtime")
    for row in rows:
        speed = f"{row['tok_s']:.1f}" if row["tok_s"] else "-"
        print(f"{row['variant']:<52}{row['ppl']:>9.3f}{row['ppl'] - reference:>+8.3f}{row['bytes'] / 1e6:>8.2f}"
              f"{speed:>8}{row['build_s']:>9.1f}  {row['runtime']}")
    by_name = {row["variant"]: row for row in rows}
    rtn = by_name.get("edgekit rtn int4")
    for row in rows:
        if rtn and "eora" in row["variant"] and "pruned" not in row["variant"]:
            closed = (rtn["ppl"] - row["ppl"]) / (rtn["ppl"] - reference)
            print(f"{row['variant']}: closes {closed:.0%} of the RTN int4 perplexity gap")
    nncf = [row for row in rows if row["variant"].startswith("nncf")]
    ours = [row for row in rows if row["variant"].startswith("edgekit gptq int4")]
    for peer in nncf:  # edgekit's best int4 build in the peer's runtime in no more bytes than the peer's
        fits = [row for row in ours if row["bytes"] <= peer["bytes"] and row["runtime"] == peer["runtime"]]
        if fits:
            mine = min(fits, key=lambda row: row["ppl"])
            print(f"at ≤ {peer['bytes'] / 1e6:.2f} MB: {mine['variant']} ppl {mine['ppl']:.3f} "
                  f"({mine['bytes'] / 1e6:.2f} MB) vs {peer['variant']} {peer['ppl']:.3f} "
                  f"(ratio {mine['ppl'] / peer['ppl']:.3f})")
        else:
            print(f"no edgekit int4 variant fits in {peer['variant']}'s {peer['bytes'] / 1e6:.2f} MB")
    print("note: SmolLM2's weights were 4-bit once (GGUF Q4_1): int4 on the unpruned model is optimistic")


if __name__ == "__main__":
    main()
