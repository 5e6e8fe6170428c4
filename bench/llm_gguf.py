"""SmolLM2-135M-Instruct in llama.cpp, one run: llama.cpp's own Q8_0 / Q4_0 / Q4_K_M against edgekit's GGUF (RTN,
GPTQ, GPTQ + EoRA adapter at two ranks, and with `--search` a budget build at Q4_K_M's bytes) and edgekit's ONNX
graph of the same codes, on the same held-out windows.

    .venv/bin/python bench/llm_gguf.py [--windows 8] [--ranks 32 64] [--no-rtn] [--search] [--rounds 5] [--threads 2]

Every row starts from the same float weights: the model edgekit loads (SmolLM2 ships only as a Q4_1 GGUF, which
transformers dequantizes to float32 once). edgekit writes them as a float32 GGUF (its own `--format gguf
--precision fp32` writer: same tensors, same tokenizer), and llama.cpp's `llama_model_quantize` (no importance
matrix) requantizes that file to each of its types, with its default choice for the tied embedding / output table.
edgekit quantizes the same float module (defaults: groups of 32, the tied table as the head's 8-bit codes), and
each quantized module is written both as GGUF and as ONNX, so the two formats hold the same codes. `--search` adds
the product's budget build (`edgekit build --format gguf` with `search.budget = bytes=<Q4_K_M's file>`: each
block's attention and MLP linears at Q8_0, Q4_0 + EoRA r32 adapter or Q4_0, chosen by the EvoPress search on
calibration windows), a GGUF row only.

Perplexity: summed NLL over the product's held-out windows (32 × 512 tokens unless `--windows`), each scored in
one prefill, one thread (the numbers do not depend on threads; on a shared 2-core host one thread is fastest).
Timing: greedy decoding from the held-out prompts through each runtime's key/value cache on `--threads` threads;
every artifact runs once per round, rounds interleaved, and each figure is the best round's median (decode: per
token; prefill: the prompt). `spread` is the slowest round's median over the fastest's: how noisy the host was.
Greedy agreement: the first 16 greedy tokens of each held-out prompt from the GGUF file against the ONNX graph of
the same codes (llama.cpp rounds activations to 8-bit blocks for Q4_0 / Q8_0 products, onnxruntime's int8 path
to its own blocks: a near-tie can flip).

SmolLM2's weights were 4-bit once (Q4_1): every 4-bit figure here is flattered by that.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL = "smollm2-135m"
SEARCH_LEVELS = ["int8", "int4+eora32", "int4"]  # Q8_0, Q4_0 + a rank-32 adapter, Q4_0
SEARCH_TARGET = "raspberry-pi-5"  # a llama.cpp target; the budget is bytes, so its device model does not decide
LLAMA_TYPES = {"Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15}  # llama_ftype: LLAMA_FTYPE_MOSTLY_*
COMPARED_TOKENS = 16


@dataclass
class Row:
    name: str
    runtime: str  # "llama.cpp" or "onnxruntime"
    files: list[Path]
    types: str = ""
    accuracy: dict[str, Any] = field(default_factory=dict)
    tokens: list[list[int]] = field(default_factory=list)
    decode_ms: list[float] = field(default_factory=list)  # per round: median ms per decoded token
    prefill_ms: list[float] = field(default_factory=list)  # per round: median ms per prompt

    @property
    def bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=MODEL, help="a name, folder or GGUF file edgekit loads")
    parser.add_argument("--windows", type=int, help="held-out windows (default: the product's, 32 × 512 tokens)")
    parser.add_argument("--ranks", type=int, nargs="*", default=[32, 64],
                        help="EoRA ranks (multiples of 32: Q8_0); the first is built right after plain GPTQ")
    parser.add_argument("--rtn", action=argparse.BooleanOptionalAction, default=True,
                        help="also the round-to-nearest row (--no-rtn: only GPTQ and its EoRA rows)")
    parser.add_argument("--search", action="store_true",
                        help="also the budget build at Q4_K_M's bytes (levels " + ", ".join(SEARCH_LEVELS) + ")")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=2, help="threads for the timing runs")
    parser.add_argument("--work", type=Path, help="folder for the files (default: a new temporary folder)")
    parser.add_argument("--retime", action="store_true",
                        help="time again the rows a run left in --work (its rows.json and files): perplexity and "
                        "tokens are kept, only the timing rounds run (timings on shared cores are noisy)")
    args = parser.parse_args()
    if args.retime and not args.work:
        parser.error("--retime needs --work: the folder of an earlier run")

    import torch

    from edgekit.cache import ArrayCache, default_cache_dir
    from edgekit.families import llm
    from edgekit.families.llm_adapter import GGUF_ADAPTER, GGUF_MODEL, gguf_files, load_text, reference, verify_lm
    from edgekit.passes.export_llm import export_lm
    from edgekit.progress import Progress
    from edgekit.recipe import DEFAULT_OPSET, Recipe, with_overrides

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="edgekit-gguf-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    plan = with_overrides(Recipe(), {"text.eval_windows": args.windows} if args.windows else {})
    quiet = Progress(quiet=True)
    loaded = llm.load_lm(args.model, default_cache_dir())
    text = load_text(loaded, plan, None, None)
    ref = reference(loaded, text, plan.text.new_tokens, ArrayCache(default_cache_dir()), quiet)
    _log(started, f"{loaded.name}: held-out {tuple(text.evaluation.shape)}, {len(text.prompts)} prompts")

    rows: list[Row] = []
    if args.retime:
        kept = json.loads((work / "rows.json").read_text())
        rows = [Row(r["name"], r["runtime"], [Path(f) for f in r["files"]], r["types"], r["accuracy"], r["tokens"])
                for r in kept]

    def scored(row: Row) -> Row:
        """The row with its perplexity and greedy tokens (deterministic: measured once, as soon as it exists)."""
        runner = _runner(row, 1, plan.text.eval_length)
        row.accuracy, _, row.tokens = verify_lm(runner, text, ref, quiet)
        _log(started, f"{row.name} ({row.runtime}, {row.bytes:,} bytes, {row.types}): {row.accuracy['summary']}")
        return row

    source = work / "float32.gguf"
    if not args.retime:
        source.write_bytes(gguf_files(loaded.module, loaded, "fp32")[0][GGUF_MODEL])
    for kind, ftype in LLAMA_TYPES.items() if not args.retime else ():
        path = work / f"llama.cpp-{kind}.gguf"
        _llama_quantize(source, path, ftype, args.threads)
        rows.append(Row(f"llama.cpp {kind}", "llama.cpp", [path], _types(path)))
    source.unlink(missing_ok=True)
    for row in rows if not args.retime else ():
        scored(row)
    if args.search and not args.retime:
        k_m = next(row for row in rows if row.name == "llama.cpp Q4_K_M")
        rows.append(scored(_searched(args.model, k_m.bytes, args.windows, work)))

    weights = plan.weights
    # the rows the verdicts need first (GPTQ against Q4_0, + EoRA against Q4_K_M), in case the run is cut short
    eora = [(f"gptq + eora r{rank}", "gptq", rank) for rank in args.ranks]
    built = [("gptq", "gptq", 0), *eora[:1], *([("rtn", "rtn", 0)] if args.rtn else []), *eora[1:]]
    for label, method, rank in built if not args.retime else ():
        module = copy.deepcopy(loaded.module)
        _quantize(module, text, plan, method, rank)
        folder = work / label.replace(" ", "").replace("+", "-")
        folder.mkdir()
        files = gguf_files(module, loaded, "int4")[0]
        for name, data in files.items():
            (folder / name).write_bytes(data)
        (folder / "model.onnx").write_bytes(
            export_lm(module, DEFAULT_OPSET, weights.accuracy_level).SerializeToString(deterministic=True))
        paths = [folder / GGUF_MODEL] + ([folder / GGUF_ADAPTER] if GGUF_ADAPTER in files else [])
        del module
        rows.append(scored(Row(f"edgekit {label}", "llama.cpp", paths, " + ".join(_types(p) for p in paths))))
        rows.append(scored(Row(f"edgekit {label}", "onnxruntime", [folder / "model.onnx"], "MatMulNBits")))

    context = plan.text.prompt_length + plan.text.new_tokens
    for round_ in range(args.rounds):  # timing: every artifact once per round, rounds interleaved
        for row in rows:
            runner = _runner(row, args.threads, context)
            runs = [runner.greedy(p.numpy(), plan.text.new_tokens) for p in text.prompts]
            row.decode_ms.append(statistics.median(ms for run in runs for ms in run["decode_ms"]))
            row.prefill_ms.append(statistics.median(run["prefill_ms"] for run in runs))
            del runner
        _log(started, f"timing round {round_ + 1} of {args.rounds}")

    (work / "rows.json").write_text(json.dumps([{**vars(row), "files": [str(f) for f in row.files],
                                                 "bytes": row.bytes} for row in rows], indent=1))
    tokens = int(text.evaluation.shape[0] * (text.evaluation.shape[1] - 1))
    _print(rows, loaded.name, plan.text.prompt_length, args, float(ref["nll"].sum()), tokens)
    _log(started, f"done; files in {work}")


def _searched(model: str, budget: int, windows: int | None, work: Path) -> Row:
    """The product's GGUF budget build at `budget` bytes, its files as a row."""
    import edgekit
    from edgekit.families.llm_adapter import GGUF_ADAPTER, GGUF_MODEL

    out = work / "searched"
    edgekit.build(model, SEARCH_TARGET, format="gguf", precision="int4", out=out, quiet=False,
                  overrides={"search.budget": f"bytes={budget}B", "search.weight_levels": SEARCH_LEVELS,
                             **({"text.eval_windows": windows} if windows else {})})
    files = [out / GGUF_MODEL] + ([out / GGUF_ADAPTER] if (out / GGUF_ADAPTER).exists() else [])
    return Row("edgekit searched", "llama.cpp", files, " + ".join(_types(p) for p in files))


def _quantize(module: Any, text: Any, plan: Any, method: str, rank: int) -> None:
    """The product's weight-only quantization at int4 with the GGUF build's defaults (groups of 32, symmetric)."""
    from edgekit.families.llm_adapter import quantize_lm
    from edgekit.passes.export_gguf import BLOCK
    from edgekit.passes.sequential import WeightScheme
    from edgekit.progress import Progress

    weights = plan.weights
    scheme = WeightScheme(4, BLOCK, True, method, weights.damp, rank, plan.lowrank.bits,  # type: ignore[arg-type]
                          weights.act_order)
    quantize_lm(module, text.calibration, scheme, weights.head_bits, weights.embedding_bits, Progress(quiet=True))


def _llama_quantize(source: Path, out: Path, ftype: int, threads: int) -> None:
    """llama.cpp's own quantizer (llama_model_quantize, default parameters: no importance matrix, its default type
    for the output / tied embedding table)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread, params.ftype = threads, ftype
    with _stderr_to(out.with_suffix(".log")):
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if status:
        sys.exit(f"llama_model_quantize failed ({status}) for {out.name}: see {out.with_suffix('.log')}")


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """llama.cpp's C-level log into a file (appended)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with path.open("a") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _types(path: Path) -> str:
    """Tensor types in a GGUF file, with the table llama.cpp reads for both embedding and output named apart."""
    from gguf import GGUFReader

    tensors = GGUFReader(path).tensors
    counts = Counter(t.tensor_type.name for t in tensors)
    table = {t.name: t.tensor_type.name for t in tensors if t.name in ("token_embd.weight", "output.weight")}
    listed = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    return listed + "".join(f"; {name.split('.')[0]} {kind}" for name, kind in table.items())


def _runner(row: Row, threads: int, context: int) -> Any:
    from edgekit.runtimes.llama_cpp_lm import LlamaCppLM
    from edgekit.runtimes.onnx_lm import OnnxCausalLM

    if row.runtime == "onnxruntime":
        return OnnxCausalLM(row.files[0].read_bytes(), threads)
    with _stderr_to(row.files[0].with_suffix(".log")):  # llama.cpp logs a line per adapter tensor as it loads
        return LlamaCppLM(row.files[0], row.files[1] if len(row.files) > 1 else None, threads, context)


def _log(started: float, message: str) -> None:
    print(f"[{time.perf_counter() - started:7.0f} s] {message}", flush=True)


def _print(rows: list[Row], model: str, prompt_tokens: int, args: argparse.Namespace, reference_nll: float,
           tokens: int) -> None:
    import math

    from edgekit.families.llm_adapter import _common_prefix

    original = math.exp(reference_nll / tokens)
    print(f"\n{model}: held-out ppl over {tokens} tokens; original (PyTorch, float32) {original:.3f}. Decode and "
          f"prefill ({prompt_tokens}-token prompts): {args.threads} threads, best of {args.rounds} interleaved "
          "rounds' medians.\n")
    print("| variant | runtime | bytes | ppl | × original | next-token agreement | decode tok/s | prefill tok/s "
          "| spread | tensor types |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        decode, prefill = min(row.decode_ms), min(row.prefill_ms)
        spread = max(max(row.decode_ms) / decode, max(row.prefill_ms) / prefill)
        print(f"| {row.name} | {row.runtime} | {row.bytes:,} | {row.accuracy['ppl_artifact']:.3f} | "
              f"{row.accuracy['ppl_ratio']:.3f} | {row.accuracy['next_token_agreement']:.3f} | {1e3 / decode:.1f} | "
              f"{prompt_tokens * 1e3 / prefill:.0f} | {spread:.2f} | {row.types} |")

    def find(name: str, runtime: str = "llama.cpp") -> Row:
        return next(r for r in rows if r.name == name and r.runtime == runtime)

    def ppl(row: Row) -> float:
        return float(row.accuracy["ppl_artifact"])

    print()
    q4_0, gptq = find("llama.cpp Q4_0"), find("edgekit gptq")
    verdict = "lower" if ppl(gptq) < ppl(q4_0) else "NOT lower"
    print(f"- Q4_0: edgekit GPTQ {ppl(gptq):.3f} in {gptq.bytes:,} bytes vs llama.cpp {ppl(q4_0):.3f} in "
          f"{q4_0.bytes:,} bytes ({gptq.bytes - q4_0.bytes:+,}): {verdict}")
    k_m = find("llama.cpp Q4_K_M")
    fits = [r for r in rows if r.runtime == "llama.cpp" and r.name.startswith("edgekit") and r.bytes <= k_m.bytes]
    if fits:
        best = min(fits, key=ppl)
        verdict = "lower" if ppl(best) < ppl(k_m) else "NOT lower"
        print(f"- Q4_K_M: edgekit's best in ≤ {k_m.bytes:,} bytes is {best.name} {ppl(best):.3f} ({best.bytes:,} "
              f"bytes, adapter included) vs llama.cpp {ppl(k_m):.3f}: {verdict}")
    for row in rows:
        if row.runtime == "llama.cpp" and row.name.startswith("edgekit"):
            peer = k_m if row.name == "edgekit searched" else q4_0
            print(f"- decode {row.name} ({row.types}): {min(peer.decode_ms) / min(row.decode_ms):.1%} of {peer.name}'s "
                  "tok/s")
    for row in rows:
        if row.runtime == "llama.cpp" and row.name.startswith("edgekit") and row.name != "edgekit searched":
            onnx = find(row.name, "onnxruntime")
            same = [_common_prefix(a[:COMPARED_TOKENS], b[:COMPARED_TOKENS]) for a, b in zip(row.tokens, onnx.tokens,
                                                                                     strict=True)]
            print(f"- greedy {row.name}, GGUF vs ONNX, first {COMPARED_TOKENS} tokens per prompt: tokens before the "
                  f"first difference {same}")


if __name__ == "__main__":
    main()
