"""Language models (Llama-style decoders) as an adapter: text instead of images, perplexity instead of top-1.

data: calibration windows, held-out windows and prompts → reference: the original's held-out NLL and greedy
tokens → compress: FLAP width / depth pruning and distillation → export: weight-only GPTQ/RTN (+ EoRA), one
ONNX graph with a key/value cache that onnxruntime both prefills and decodes with, or a GGUF file (and its EoRA
LoRA adapter) for llama.cpp → verify: perplexity, greedy
agreement, prefill and decode timings. Compression runs one decoder block at a time on calibration text;
everything the report says about accuracy comes from running the exported graph on held-out text.
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from edgekit import __version__
from edgekit.agent.protocol import Job
from edgekit.cache import ArrayCache, checked_json
from edgekit.errors import StageError, UsageError
from edgekit.families import llm, llm_gguf
from edgekit.families.base import Artifact, LoadOptions, Section, Verification
from edgekit.passes import export_gguf as gguf_export
from edgekit.passes.distill import distill, distilled, next_token_kl
from edgekit.passes.export import set_metadata
from edgekit.passes.export_llm import export_lm
from edgekit.passes.openvino import graph_details, graph_files
from edgekit.passes.prune_llm import block_importance, prune_width
from edgekit.passes.quantize import to_fp16
from edgekit.passes.sequential import BATCH, Covariance, SchemeOf, WeightScheme, compress_blocks, compress_linear
from edgekit.passes.weight_levels import (
    LanguageModelSpace,
    WeightLevel,
    chosen_layers,
    graph_shares,
    kl_to_original,
    level_database,
    record_search,
    unit_index,
    variants,
)
from edgekit.passes.weightonly import by_rows, rtn
from edgekit.progress import Progress
from edgekit.runtimes import lm_runner
from edgekit.runtimes.llama_cpp_lm import LlamaCppLM, gguf_tokenize, require_llama_cpp
from edgekit.runtimes.onnx_lm import KeyValueDecoder, lm_outputs, window_nll
from edgekit.verify.estimate_lm import estimate_lm, kernels
from edgekit.verify.latency import host_description

if TYPE_CHECKING:
    import onnx

    from edgekit.context import BuildContext
    from edgekit.recipe import Recipe
    from edgekit.search import Config

BITS = {"int4": 4, "int8": 8}


@dataclass
class Text:
    calibration: Any  # torch.LongTensor [windows, length]
    evaluation: Any
    prompts: Any
    source: str
    given: tuple[str | None, str | None] = (None, None)  # --calib and --eval as given, for `edgekit verify`

    def record(self) -> dict[str, Any]:
        """How the manifest names the text (and `edgekit verify` finds it again)."""
        return {"text": {"source": self.source, "sha256": self.digest()}, "calibration": {"path": self.given[0]},
                "eval": {"dir": self.given[1]}}

    def digest(self) -> str:
        return _sha256(self.calibration, self.evaluation, self.prompts)

    def calibration_digest(self) -> str:
        return _sha256(self.calibration)


def _sha256(*parts: Any) -> str:
    import hashlib

    digest = hashlib.sha256()
    for part in parts:
        digest.update(np.ascontiguousarray(part.numpy()).tobytes())
    return digest.hexdigest()


@dataclass
class Decoder:
    """What compress hands export: the decoder, and its quantization record where compress already quantized it
    (a budget search stitches quantized layers)."""

    module: Any
    quantization: dict[str, Any] | None = None


def load_text(loaded: llm.LoadedLM, plan: Recipe, calib: str | Path | None, eval_text: str | Path | None) -> Text:
    """Calibration windows, held-out windows and prompts. Without `--eval`, every fifth document of the
    calibration source is held out; with it, all of `--eval` is held-out text and all of `--calib` calibrates
    (the default Wikipedia source keeps its held-out fifth out of calibration either way)."""
    settings = plan.text
    if eval_text is None:
        calibration, held, label = llm.text_parts(calib)
        source = f"{label}, every {llm.HELD_OUT_EVERY}th document held out"
    else:
        calibration = llm.text_parts(None)[0] if calib is None else llm.documents(calib)[0]
        held, held_label = llm.documents(eval_text)
        source = f"calibration: {calib or 'Wikipedia (gensim test dump)'}; held out: {held_label}"
    evaluation = llm.token_windows(loaded.tokenizer, held, settings.eval_length, settings.eval_windows)
    prompt_text = held[::-1]  # prompts from the end of the held-out text: its start is read for perplexity
    prompts = llm.token_windows(loaded.tokenizer, prompt_text, settings.prompt_length, max(1, settings.prompts))
    return Text(llm.token_windows(loaded.tokenizer, calibration, settings.calib_length, settings.calib_windows),
                evaluation, prompts[: settings.prompts], source,
                (str(calib) if calib else None, str(eval_text) if eval_text else None))


def torch_greedy(module: Any, prompt: Any, new_tokens: int) -> list[int]:
    """The original model's greedy continuation (full recompute each step: no cache to get wrong)."""
    import torch

    ids = prompt[None]
    tokens: list[int] = []
    with torch.no_grad():
        while len(tokens) < new_tokens:
            token = int(module(ids).logits[0, -1].argmax())
            tokens.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokens


def reference(loaded: llm.LoadedLM, text: Text, new_tokens: int, cache: ArrayCache,
              progress: Progress) -> dict[str, np.ndarray]:
    """The original model's summed NLL and next-token predictions per held-out window, and its greedy tokens per
    prompt (cached)."""
    import torch

    key = {"kind": "lm-reference", "model": loaded.fingerprint, "text": text.digest(), "new_tokens": new_tokens,
           "arrays": ["nll", "predictions", "tokens"]}

    def compute() -> dict[str, np.ndarray]:
        nll, predictions = [], []
        with torch.no_grad():
            for window in progress.track(text.evaluation, len(text.evaluation), "original on held-out text"):
                logits = loaded.module(window[None]).logits[0].numpy()
                nll.append(window_nll(logits, window.numpy()))
                predictions.append(logits.argmax(-1))
        tokens = [torch_greedy(loaded.module, p, new_tokens) for p in text.prompts]
        return {"nll": np.array(nll), "predictions": np.array(predictions),
                "tokens": np.array(tokens, dtype=np.int64).reshape(len(text.prompts), -1)}

    return cache.get_or_compute(key, compute)


def quantize_lm(module: Any, calibration: Any, scheme: WeightScheme, head_bits: int | None,
                embedding_bits: int | None, progress: Progress, per_layer: SchemeOf | None = None) -> dict[str, Any]:
    """Quantize every decoder block's linears (GPTQ/RTN, EoRA; by `scheme`, or by `per_layer` where a search chose
    each layer's bits and rank), then the output layer and the embedding table."""
    import torch

    with torch.no_grad():
        hidden, kwargs = llm.block_inputs(module, calibration)
        hidden, records = compress_blocks(llm.decoder_layers(module), llm.block_linears, hidden, kwargs,
                                          per_layer or scheme,
                                          track=lambda xs, n: progress.track(xs, n, "decoder blocks"))
        records += quantize_ends(module, hidden, scheme, head_bits, embedding_bits)
    errors = [r["output_error"] for r in records if "output_error" in r]
    compensated = [r["output_error_eora"] for r in records if "output_error_eora" in r]
    return {"layers": records,
            "mean_output_error": float(np.mean(errors)) if errors else None,
            "mean_output_error_eora": float(np.mean(compensated)) if compensated else None}


def quantize_ends(module: Any, hidden: Any, scheme: WeightScheme, head_bits: int | None,
                  embedding_bits: int | None) -> list[dict[str, Any]]:
    """Quantize the output layer (GPTQ on `hidden`, the last block's outputs) and the embedding table, in place.

    A table tied to the head stays tied: it is the head's codes, stored once and read by row."""
    import torch

    records: list[dict[str, Any]] = []
    tied = bool(module.config.tie_word_embeddings)
    if tied and not head_bits and embedding_bits:  # a float head beside an integer table: two tables after all
        module.lm_head.weight = torch.nn.Parameter(module.lm_head.weight.detach().clone())
        module.config.tie_word_embeddings = tied = False
    with torch.no_grad():
        if head_bits:
            covariance = Covariance(module.lm_head.in_features)
            for part in hidden.split(BATCH):
                covariance(module.lm_head, (module.model.norm(part),))
            head_scheme = WeightScheme(head_bits, scheme.group_size, scheme.symmetric, scheme.method, scheme.damp,
                                       act_order=scheme.act_order)
            records.append({"block": None} | compress_linear(module, "lm_head", module.lm_head, covariance,
                                                             head_scheme))
        table = module.model.embed_tokens
        if tied and head_bits:
            records.append({"block": None, "layer": "embed_tokens", "bits": head_bits, "bytes": 0,
                            "shared_with": "lm_head"})
        elif embedding_bits:
            quantized = by_rows(lambda rows: rtn(rows, embedding_bits, scheme.group_size, symmetric=True),
                                table.weight.detach())
            table.weight.data = quantized.dequantize()
            table.edgekit_quantized = quantized
            records.append({"block": None, "layer": "embed_tokens", "bits": embedding_bits,
                            "bytes": quantized.nbytes})
    return records


def prune_lm(module: Any, calibration: Any, ratio: float, blocks: int, progress: Progress) -> dict[str, Any]:
    """Drop the `blocks` decoder blocks that change their input least, then prune `ratio` of every block's width
    (FLAP scores, bias compensation), on the calibration windows."""
    import torch

    params_before = sum(p.numel() for p in module.parameters())
    with torch.no_grad():
        hidden, kwargs = llm.block_inputs(module, calibration)
        importance, dropped = [], []
        if blocks:
            importance = block_importance(list(llm.decoder_layers(module)), hidden, kwargs)
            if blocks >= len(importance):
                raise UsageError(f"prune.blocks {blocks} would leave none of the {len(importance)} decoder blocks")
            dropped = sorted(int(i) for i in np.argsort(importance)[:blocks])
            llm.drop_blocks(module, dropped)
        widths: list[dict[str, Any]] = []
        if ratio:
            _, widths = prune_width(list(llm.decoder_layers(module)), hidden, kwargs, ratio, llm.width_consumers,
                                    llm.prune_block_width, track=lambda xs, n: progress.track(xs, n, "blocks pruned"))
            module.config.intermediate_size = widths[0]["mlp_channels"][1]
            module.config.num_attention_heads = widths[0]["heads"][1]
    return {"method": "depth: lowest 1 - cos(block input, output); width: FLAP fluctuation with bias compensation",
            "ratio": ratio, "block_importance": [round(v, 5) for v in importance], "dropped_blocks": dropped,
            "width": widths[0] if widths else None,
            "params_before": params_before, "params_after": sum(p.numel() for p in module.parameters())}


def verify_lm(runner: KeyValueDecoder | LlamaCppLM, text: Text, ref: dict[str, np.ndarray],
              progress: Progress) -> tuple[dict[str, Any], dict[str, Any], list[list[int]]]:
    """Perplexity of the artifact in its runtime (onnxruntime, OpenVINO or llama.cpp) against the original's, greedy
    agreement, host timings, and the artifact's greedy tokens per prompt."""
    outputs = lm_outputs(runner, text.evaluation.numpy(), text.prompts.numpy(), ref["tokens"].shape[1],
                         progress.track)
    return lm_figures(outputs, text, ref, {"label": "measured: host", "runtime": runner.description,
                                           "host": host_description()})


def lm_figures(outputs: dict[str, np.ndarray], text: Text, ref: dict[str, np.ndarray], where: dict[str, Any]
               ) -> tuple[dict[str, Any], dict[str, Any], list[list[int]]]:
    """The accuracy and latency blocks of a language model's run (`lm_outputs`, here or on a device labelled by
    `where`), and its greedy tokens per prompt."""
    tokens = int(text.evaluation.shape[0] * (text.evaluation.shape[1] - 1))
    ppl_reference, ppl_artifact = math.exp(ref["nll"].sum() / tokens), math.exp(outputs["nll"].sum() / tokens)
    generated = outputs["tokens"].tolist()
    agreement = [_common_prefix(run, list(expected)) / len(expected)
                 for run, expected in zip(generated, ref["tokens"], strict=True)]
    accuracy: dict[str, Any] = {
        "ppl_reference": round(ppl_reference, 4), "ppl_artifact": round(ppl_artifact, 4),
        "ppl_ratio": round(ppl_artifact / ppl_reference, 4), "eval_tokens": tokens,
        "next_token_agreement": round(float((outputs["predictions"] == ref["predictions"]).mean()), 4),
        "generation_agreement": round(float(np.mean(agreement)), 4) if agreement else None,
        "generation_prompts": len(agreement),
    }
    accuracy["summary"] = (f"ppl {ppl_artifact:.3f} (original {ppl_reference:.3f}, ×{accuracy['ppl_ratio']:.3f}), "
                           f"next-token agreement {accuracy['next_token_agreement']:.3f}")
    decode = outputs["decode_ms"].ravel()
    latency = {**where,
               "prefill_ms": round(float(np.median(outputs["prefill_ms"])), 3) if len(generated) else None,
               "prefill_tokens": int(text.prompts.shape[1]),
               "decode_ms_per_token": round(float(np.median(decode)), 3) if decode.size else None,
               "tokens_per_s": round(1e3 / float(np.median(decode)), 2) if decode.size else None,
               "decode_steps": int(decode.size)}
    return accuracy, latency, generated


def generations(tokenizer: Any, prompts: Any, original: np.ndarray, artifact: list[list[int]]
                ) -> list[dict[str, Any]]:
    """The first few prompts with the original's and the artifact's greedy continuations as text, and how many
    tokens the two share from the start (report.html shows them side by side)."""
    from edgekit.verify.examples import COUNT

    return [{"kind": "text", "prompt": tokenizer.decode(prompt.tolist()), "reference": tokenizer.decode(list(mine)),
             "artifact": tokenizer.decode(theirs), "same_tokens": _common_prefix(theirs, list(mine)),
             "tokens": len(mine)}
            for prompt, mine, theirs in list(zip(prompts, original, artifact, strict=True))[:COUNT]]


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _weight_bytes(graph: Any) -> tuple[int, int]:
    """Bytes of all initializers, and of the largest gathered table (the embedding, unless tied to the head:
    then every byte is read per token anyway)."""
    sizes = {init.name: len(init.raw_data) or init.ByteSize() for init in graph.graph.initializer}
    read_whole = {name for n in graph.graph.node if n.op_type != "Gather" for name in n.input}
    gathered = [sizes[n.input[0]] for n in graph.graph.node
                if n.op_type == "Gather" and n.input[0] in sizes and n.input[0] not in read_whole]
    return sum(sizes.values()), max(gathered, default=0)


def generate(folder: Path, report: dict[str, Any], files: list[str], prompt: str, new_tokens: int,
             threads: int) -> dict[str, Any]:
    """Greedy continuation of `prompt` by a built language-model artifact (its model `files`), through its
    key/value cache in its runtime (a GGUF artifact in llama.cpp, with the tokenizer its file carries)."""
    runner: KeyValueDecoder | LlamaCppLM
    if report["artifact"]["format"] == "gguf":
        require_llama_cpp()
        adapter = folder / GGUF_ADAPTER
        ids = np.array(gguf_tokenize(folder / GGUF_MODEL, prompt), dtype=np.int64)
        runner = LlamaCppLM(folder / GGUF_MODEL, adapter if adapter.is_file() else None, threads,
                            ids.size + new_tokens)
        decode_text = runner.detokenize
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
        runner = lm_runner([(folder / name).read_bytes() for name in files], report["artifact"]["format"], threads)
        ids = np.array(tokenizer(prompt, add_special_tokens=False)["input_ids"], dtype=np.int64)
        decode_text = tokenizer.decode
    if ids.size == 0:
        raise UsageError("the prompt encodes to no tokens")
    run = runner.greedy(ids, new_tokens)
    decode = float(np.median(run["decode_ms"])) if run["decode_ms"] else None
    return {"text": decode_text(run["tokens"]), "tokens": run["tokens"], "prefill_ms": run["prefill_ms"],
            "tokens_per_s": 1e3 / decode if decode else float("nan"), "runtime": runner.description}


class LanguageModelFamily:
    name = "llm"
    # one ONNX graph with a key/value cache; weight-only int4 is what small LMs ship at on phones and boards
    # a budget search's fitness reads 16 windows (4,096 tokens at the default length): each candidate is forward
    # passes of the whole decoder, the search's whole cost
    recipe_defaults: ClassVar[dict[str, Any]] = {"export.format": "onnx", "quantize.precision": "int4",
                                                 "gates.max_ppl_ratio": 1.2, "search.images": 16}
    settings: ClassVar[dict[str, Section]] = {
        "weights": "*", "lowrank": "*", "text": "*", "prune": ("ratio", "blocks"),
        "distill": ("steps", "seconds", "lr", "batch", "images"),
        "search": ("budget", "weight_levels", "generations", "seconds", "offspring", "images"),
    }
    accuracy_gates: ClassVar[dict[str, tuple[str, str, str]]] = {
        "max_ppl_ratio": ("ppl_ratio", "held-out text (perplexity vs the original's)", "no perplexity measured"),
    }
    headline: ClassVar[tuple[str, ...]] = ("ppl_reference", "ppl_artifact", "ppl_ratio", "next_token_agreement",
                                           "generation_agreement")
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "int8", "int4")  # int4 and int8 are weight-only
    formats: ClassVar[tuple[str, ...]] = ("onnx", "gguf", "openvino")
    # llama.cpp's Q4_0 / Q8_0 blocks: 32 weights, one float16 scale, no zero point
    format_defaults: ClassVar[dict[str, dict[str, Any]]] = {"gguf": {"weights.group_size": 32}}
    trains_on_labels: ClassVar[bool] = False

    def claims(self, source: object, options: LoadOptions) -> bool:
        if not isinstance(source, (str, Path)):
            return False
        path = Path(source)
        return (str(source) in llm.NAMED or path.suffix.lower() == ".gguf"
                or (path.is_dir() and llm.is_causal_lm_folder(path)))

    def load(self, source: object, options: LoadOptions, cache_root: Path | None = None) -> llm.LoadedLM:
        if not isinstance(source, (str, Path)):
            raise UsageError("language models are given as a folder, a GGUF file or a name (e.g. smollm2-135m)")
        return llm.load_lm(source, cache_root)

    def data(self, model: llm.LoadedLM, ctx: BuildContext) -> Text:
        if ctx.format == "gguf":
            _check_gguf_build(model, ctx)
        with ctx.progress.stage("text") as record:
            text = load_text(model, ctx.plan, ctx.calib, ctx.eval)
            record["note"] = (f"calibration {tuple(text.calibration.shape)}, held-out {tuple(text.evaluation.shape)} "
                              f"tokens, {len(text.prompts)} prompts: {text.source}")
        if ctx.runtime not in ("onnxruntime", "llama.cpp", "openvino") and ctx.precision in BITS:
            ctx.notes.append(f"int4/int8 weights are onnxruntime MatMulNBits nodes: on {ctx.target.name} run the "
                             f"artifact in onnxruntime (CPU or CUDA execution provider), not {ctx.runtime}")
        return text

    def reference(self, model: llm.LoadedLM, data: Text, ctx: BuildContext) -> dict[str, np.ndarray]:
        import torch

        torch.set_num_threads(ctx.threads)
        with ctx.progress.stage("reference") as record:
            ref = reference(model, data, ctx.plan.text.new_tokens, ctx.cache, ctx.progress)
            record["note"] = "original model in torch: held-out NLL, greedy tokens"
        return ref

    def compress(self, model: llm.LoadedLM, data: Text, ctx: BuildContext) -> Decoder:
        """A copy of the decoder, pruned (width, depth) and distilled, or quantized to a budget, as the recipe says."""
        plan, progress = ctx.plan, ctx.progress
        if plan.distill.steps and not (plan.prune.ratio or plan.prune.blocks):
            raise UsageError("distillation recovers what pruning lost: set prune.ratio or prune.blocks too")
        if plan.search.budget:
            return search_lm(model, data, ctx)
        module = copy.deepcopy(model.module)
        if not (plan.prune.ratio or plan.prune.blocks):
            return Decoder(module)
        with progress.stage("prune") as record:
            done = ctx.sections["pruning"] = prune_lm(module, data.calibration, plan.prune.ratio, plan.prune.blocks,
                                                      progress)
            record["note"] = (f"{done['params_before'] / 1e6:.1f} M -> {done['params_after'] / 1e6:.1f} M params"
                              + (f", blocks {done['dropped_blocks']} removed" if done["dropped_blocks"] else ""))
        if plan.distill.steps:
            settings = plan.distill
            with progress.stage("distill") as record:
                done = ctx.sections["distillation"] = distill(
                    module, model.module, data.calibration[: settings.images], llm.logits, loss=next_token_kl,
                    steps=settings.steps, seconds=settings.seconds, lr=settings.lr, batch=settings.batch,
                    seed=plan.seed, progress=lambda steps, total: progress.track(steps, total, "distillation steps"))
                record["note"] = distilled(done, "KL")
        return Decoder(module)

    def export(self, compressed: Decoder, model: llm.LoadedLM, data: Text, reference: Any,
               ctx: BuildContext) -> Artifact:
        """Weight-only quantization (GPTQ/RTN, EoRA) of the compressed decoder, unless the search already chose each
        layer's, then one ONNX graph with its key/value cache (or its OpenVINO IR); the tokenizer travels beside it."""
        plan, precision, module = ctx.plan, ctx.precision, compressed.module
        quantization = compressed.quantization
        if quantization is None and precision in BITS:
            quantization = _quantize(module, data, plan, precision, ctx.progress)
        elif quantization is None and (plan.lowrank.rank or any(plan.lowrank.ranks.values())):
            raise UsageError("EoRA compensates quantization: set precision int4 or int8 with lowrank.rank")
        if ctx.format == "gguf":
            return _gguf_artifact(module, model, quantization, ctx)
        with ctx.progress.stage("export", note=f"onnx opset {plan.export.opset}, key/value cache"
                                + (", OpenVINO IR" if ctx.format == "openvino" else "")):
            graph = _graph(module, model, ctx)
            files = graph_files(graph, ctx.format)
        config = module.config  # the exported model's: depth pruning leaves fewer blocks (and cache tensors)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        ctx.notes.append("the artifact takes token ids: tokenizer/ holds the tokenizer to encode and decode text")
        return Artifact(
            files=files, extras=_tokenizer_files(model.tokenizer),
            format=ctx.format, precision=_precision(ctx), quantization=quantization, analysis=_costs(graph, module),
            details={**graph_details(files, ctx.opset),
                     "inputs": ["input_ids [1, tokens] int64", "past_key_i / past_value_i "
                                f"[1, {config.num_key_value_heads}, past, {head_dim}] float32 per block"],
                     "outputs": ["logits [1, tokens, vocab]", "present_key_i / present_value_i (past + tokens)"]})

    def verify(self, artifact: Artifact, model: llm.LoadedLM, data: Text, reference: dict[str, np.ndarray],
               ctx: BuildContext) -> Verification:
        with ctx.progress.stage("verify") as record:
            accuracy, measured, tokens = verify_lm(_runner(artifact, ctx), data, reference, ctx.progress)
            record["note"] = f"{accuracy['summary']}, decode {measured['tokens_per_s']} tok/s on host"
        return Verification(accuracy={**accuracy, "eval_source": data.source},
                            latency={"measured_host": measured, "estimated_target": _estimate(ctx, artifact.analysis)},
                            examples=generations(model.tokenizer, data.prompts, reference["tokens"], tokens))

    def on_device(self, artifact: Artifact, data: Text, reference: dict[str, np.ndarray],
                  ctx: BuildContext) -> dict[str, Any]:
        """The held-out windows and the greedy prompts run on the device through the artifact's key/value cache,
        read as here: perplexity and agreement against the original, prefill and decode times."""
        assert ctx.remote is not None
        arrays = {"windows": data.evaluation.numpy(), "prompts": data.prompts.numpy(),
                  "new_tokens": np.array([reference["tokens"].shape[1]], np.int64)}
        job = Job("lm", artifact.format, ctx.target_threads, 0, 1, list(artifact.files.values()), arrays)
        with ctx.progress.stage("device", note=ctx.remote.url) as record:
            answer, info = ctx.remote.run(job)
            accuracy, latency, _ = lm_figures(answer, data, reference, info["latency_ms"])
            record["note"] = f"{info['device']}: {accuracy['summary']}, decode {latency['tokens_per_s']} tok/s"
        return ctx.remote.record(info, {**accuracy, "eval_source": data.source}, latency)

    def inspect(self, source: object, options: LoadOptions) -> dict[str, Any]:
        """A decoder's structure says more than one traced graph would."""
        from edgekit.cache import default_cache_dir

        lm = self.load(source, options, default_cache_dir())
        return {"model": lm.name, "family": self.name, "source": lm.source, **lm.details,
                "weight_bytes_fp32": lm.details["params"] * 4}


def _check_gguf_build(model: llm.LoadedLM, ctx: BuildContext) -> None:
    """Before any long step: settings whose codes Q4_0 / Q8_0 cannot hold as they are, a decoder llama.cpp's
    `llama` architecture would compute differently, and llama.cpp itself, which verifies the file."""
    weights = ctx.plan.weights
    if ctx.precision == "fp16":
        raise UsageError("--format gguf writes fp32, int8 (Q8_0) or int4 (Q4_0) weights, not fp16")
    if ctx.precision in BITS and (weights.group_size != gguf_export.BLOCK or not weights.symmetric):
        raise UsageError(f"--format gguf stores codes in llama.cpp's Q4_0 / Q8_0 blocks ({gguf_export.BLOCK} weights, "
                         f"one scale, no zero point): set weights.group_size = {gguf_export.BLOCK} and "
                         f"weights.symmetric = true (here {weights.group_size}, {weights.symmetric})")
    llm_gguf.check_writable(model.module)
    require_llama_cpp()


GGUF_MODEL, GGUF_ADAPTER = "model.gguf", "eora-adapter.gguf"


def gguf_files(module: Any, model: llm.LoadedLM, precision: str
               ) -> tuple[dict[str, bytes], dict[str, list[gguf_export.GGUFTensor]], dict[str, int]]:
    """The model file and, where the decoder has EoRA factors, the adapter file; the tensors each holds; each
    compensated layer's rank."""
    tensors = llm_gguf.model_tensors(module)
    describe = llm_gguf.describe_model(module, model.tokenizer, model.source, model.name, precision)
    files = {GGUF_MODEL: gguf_export.gguf_bytes(llm_gguf.ARCH, describe, tensors)}
    written = {GGUF_MODEL: tensors}
    factors, ranks = llm_gguf.adapter_tensors(module)
    if factors:
        files[GGUF_ADAPTER] = gguf_export.gguf_bytes(llm_gguf.ARCH, gguf_export.describe_adapter(ranks), factors)
        written[GGUF_ADAPTER] = factors
    return files, written, ranks


def _gguf_artifact(module: Any, model: llm.LoadedLM, quantization: dict[str, Any] | None,
                   ctx: BuildContext) -> Artifact:
    """The decoder as a llama.cpp GGUF file, its EoRA factors as a LoRA adapter beside it, both read back and
    dequantized by gguf's own code against the weights edgekit computes with."""
    with ctx.progress.stage("export", note="gguf for llama.cpp") as record:
        files, written, ranks = gguf_files(module, model, _precision(ctx))
        tensors, factors = written[GGUF_MODEL], written.get(GGUF_ADAPTER, [])
        check = gguf_export.dequantization_check(files, written)
        if not check["passed"]:
            raise StageError(f"the GGUF file does not hold edgekit's weights: {'; '.join(check['failures'])}")
        types = Counter(gguf_export.type_name(t) for t in [*tensors, *factors])
        record["note"] = (f"{', '.join(f'{n} {kind}' for kind, n in sorted(types.items()))} tensors; read back: "
                          f"{check['bit_exact']} of {check['tensors']} bit-exact")
    config = module.config
    return Artifact(
        files=files, format="gguf", precision=_precision(ctx), quantization=quantization,
        analysis=_gguf_costs(files, tensors, module),
        details={"architecture": llm_gguf.ARCH, "tensor_types": dict(sorted(types.items())),
                 "adapter": {"file": GGUF_ADAPTER, "kind": "LoRA (EoRA residual B·A), alpha 0: scale 1",
                             "ranks": sorted(set(ranks.values()))} if factors else None,
                 "dequantization_check": check,
                 "inputs": ["token ids (llama.cpp tokenizes with the model's own tokenizer, carried in the file)"],
                 "outputs": [f"logits over {config.vocab_size} tokens"]})


def _gguf_costs(files: dict[str, bytes], tensors: list[Any], module: Any) -> dict[str, int]:
    """The device model's inputs for the GGUF build: bytes per token (a table not shared with the output layer is
    read one row at a time), and llama.cpp's float16 key/value cache. Kernel launches are not counted: llama.cpp's
    graph is its own."""
    config = module.config
    table = 0 if config.tie_word_embeddings else len(gguf_export.stored(tensors[0])[0].tobytes())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"weight_bytes": sum(len(data) for data in files.values()), "embedding_bytes": table,
            "vocab": config.vocab_size,
            "params": sum(p.numel() for p in module.parameters()) - config.vocab_size * config.hidden_size,
            "kv_bytes_per_token": 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2,
            "nodes": 0}


def _runner(artifact: Artifact, ctx: BuildContext) -> KeyValueDecoder | LlamaCppLM:
    """The artifact in its runtime: onnxruntime or OpenVINO from its bytes, llama.cpp from the files in the build
    folder."""
    if artifact.format != "gguf":
        return lm_runner(list(artifact.files.values()), artifact.format, ctx.threads)
    assert ctx.staging is not None
    text = ctx.plan.text
    adapter = ctx.staging / GGUF_ADAPTER if GGUF_ADAPTER in artifact.files else None
    return LlamaCppLM(ctx.staging / GGUF_MODEL, adapter, ctx.threads,
                      max(text.eval_length, text.prompt_length + text.new_tokens))


def search_lm(model: llm.LoadedLM, text: Text, ctx: BuildContext) -> Decoder:
    """The decoder with each block's attention and MLP linears at the weight level the search chose for the budget
    (passes/weight_levels.py), and its quantization record; the report's `search` block goes to ctx.sections."""
    import torch

    from edgekit.search import evolve
    from edgekit.search.remote import ray_scorer

    plan, settings, progress = ctx.plan, ctx.plan.search, ctx.progress
    budget = settings.parsed_budget()
    assert budget is not None
    if ctx.precision not in BITS:
        raise UsageError(f"search.budget picks each unit's weight level (int8, int4, +EoRA): precision {ctx.precision} "
                         "does not apply; leave it at int4")
    if budget.metric == "macs":
        raise UsageError(f"budget {budget.text}: language models take bytes= (size=), tokens_per_s= or latency=")
    if budget.metric == "bytes" and ctx.format == "openvino":
        raise UsageError(f"budget {budget.text}: a search prices each unit's bytes in the ONNX graph, and OpenVINO's "
                         "IR stores the group scales wider; search with --format onnx, or with tokens_per_s= or "
                         "latency=")
    if plan.lowrank.rank or any(plan.lowrank.ranks.values()):
        raise UsageError("with search.budget, EoRA ranks are levels (search.weight_levels = [..., 'int4+eora32', "
                         "...]): lowrank.rank and lowrank.ranks do not apply")
    levels = [WeightLevel.parse(label) for label in settings.weight_levels]
    scheme = _scheme(plan, BITS[ctx.precision], with_ranks=False)
    weights = plan.weights
    key = {"kind": "lm-weight-levels", "model": model.fingerprint, "calibration": text.calibration_digest(),
           "levels": sorted({(level.bits, level.rank) for level in levels}), "method": weights.method,
           "group_size": weights.group_size, "symmetric": weights.symmetric, "damp": weights.damp,
           "act_order": weights.act_order, "edgekit": __version__}
    with progress.stage("levels") as note:
        arrays = ctx.cache.get_or_compute(key, lambda: level_database(model.module, text.calibration, levels, scheme,
                                                                      progress))
        working = copy.deepcopy(model.module)
        hidden = torch.from_numpy(arrays["hidden"])
        ends = quantize_ends(working, hidden, scheme, weights.head_bits, weights.embedding_bits)
        samples = min(settings.images, len(text.calibration))
        space = LanguageModelSpace(model.module, working, variants(model.module, arrays, levels, scheme),
                                   list(settings.weight_levels), text.calibration[:samples], hidden[:samples],
                                   basis=f"estimated: {ctx.target.name}")
        costs_key = {**key, "kind": "lm-weight-level-costs", "labels": settings.weight_levels,
                     "head_bits": weights.head_bits, "embedding_bits": weights.embedding_bits,
                     "rank_bits": plan.lowrank.bits, "format": ctx.format, "opset": plan.export.opset,
                     "accuracy_level": weights.accuracy_level, "target": ctx.target.name, "tokenizer": model.source}
        if ctx.format == "gguf":
            space.sizing = GGUF_SIZING
        measured = checked_json(ctx.cache.path(costs_key, ".json"), lambda: (
            uniform_files(space, model, _precision(ctx), progress) if ctx.format == "gguf"
            else _uniform_exports(space, model, ctx)))
        space.set_costs(measured["shares"], measured["analysis"], lambda analysis: _estimate(ctx, analysis)["ms"])
        note["note"] = (f"{len(space.units)} units x {len(levels)} levels; all at {levels[0].label}: "
                        f"{budget.format(space.base.of(budget.metric))}")
    with progress.stage("search") as note, ray_scorer(space, ctx.ray) as score_many:
        result = evolve(space, budget, seed=plan.seed, generations=settings.generations, seconds=settings.seconds,
                        offspring=settings.offspring, score_many=score_many,
                        progress=lambda rounds, total: progress.track(rounds, total, "generations"))
        uniform = result.uniform
        note["note"] = (f"{budget.text}: {budget.format(result.best.costs.of(budget.metric))}, fitness "
                        f"{result.best.fitness:.4g}" + (f" (uniform {space.labels[uniform.config[0]]}: "
                                                        f"{uniform.fitness:.4g})" if uniform else ""))
    ctx.sections["search"] = record_search(space, result, budget.text, plan.seed)
    decoder, layers, ctx.sections["search"]["refit"] = refit_lm(model, text, space, result.best.config, scheme,
                                                                hidden, ends, ctx)
    quantization = {"layers": layers,
                    "scheme": {"weights": "searched: " + ", ".join(settings.weight_levels) + " per unit",
                               "method": weights.method, "act_order": weights.act_order,
                               "group_size": weights.group_size, "symmetric": weights.symmetric,
                               "head_bits": weights.head_bits, "embedding_bits": weights.embedding_bits,
                               "accuracy_level": weights.accuracy_level, "eora_bits": plan.lowrank.bits,
                               "calibration_tokens": int(text.calibration.numel())}}
    return Decoder(decoder, quantization)


def refit_lm(model: llm.LoadedLM, text: Text, space: LanguageModelSpace, config: Config, scheme: WeightScheme,
             hidden: Any, ends: list[dict[str, Any]], ctx: BuildContext
             ) -> tuple[Any, list[dict[str, Any]], dict[str, Any]]:
    """The chosen configuration requantized block by block (GPTQ and EoRA on the inputs the already-quantized
    blocks give, as a uniform build does; the database's levels saw the original's inputs), kept only if it is
    closer to the original on calibration windows the fitness did not read (`hidden`: the original's last block
    outputs on every calibration window). Same levels, same bytes. Returns the decoder, its quantization rows and
    the report's `refit` block."""
    window = slice(space.samples, 2 * space.samples)
    held, teacher = text.calibration[window], hidden[window]
    stitched = space.stitch(config)
    if not len(held):
        return stitched, chosen_layers(space, config) + ends, {
            "kept": False, "reason": "every calibration window was read by the fitness: none left to judge a refit"}
    weights = ctx.plan.weights
    with ctx.progress.stage("refit") as note:
        sequential = copy.deepcopy(model.module)
        records = quantize_lm(sequential, text.calibration, scheme, weights.head_bits, weights.embedding_bits,
                              ctx.progress, per_layer=space.schemes(config, scheme))["layers"]
        before, after = (kl_to_original(model.module, candidate, held, teacher) for candidate in (stitched, sequential))
        kept = after < before
        note["note"] = (f"KL on {len(held)} windows the fitness did not read: stitched {before:.4g}, requantized "
                        f"{after:.4g}: {'kept' if kept else 'not kept'}")
    record = {"method": "sequential GPTQ/EoRA at the chosen levels", "windows": len(held),
              "kl_stitched": before, "kl_requantized": after, "kept": kept}
    return (sequential, records, record) if kept else (stitched, chosen_layers(space, config) + ends, record)


def _uniform_exports(space: LanguageModelSpace, model: llm.LoadedLM, ctx: BuildContext) -> dict[str, Any]:
    """Each level's share of the graph per unit, from one export with every unit at that level, and the device
    model's inputs for the first level's."""
    shares, analysis = [], None
    for level in ctx.progress.track(range(len(space.labels)), len(space.labels), "uniform exports"):
        module = space.stitch((level,) * len(space.found))
        graph = _graph(module, model, ctx)
        shares.append(graph_shares(graph, len(space.found)))
        analysis = analysis or _costs(graph, module)
    return {"shares": shares, "analysis": analysis}


GGUF_SIZING = ("the model and adapter files', an upper bound within 62 bytes per file (each unit's tensors and rank "
               "entries priced exactly; the padding before the data is 0 to 31 bytes)")


def uniform_files(space: LanguageModelSpace, model: llm.LoadedLM, precision: str, progress: Progress
                  ) -> dict[str, Any]:
    """As `_uniform_exports`, for GGUF files: each unit's linears priced per level from their tensors
    (`llm_gguf.linear_bytes`); the files' fixed parts (header, metadata, padding) from the uniform files, taken at
    the most padding, so that a configuration's predicted size bounds its files from above."""
    shares: list[dict[str, Any]] = []
    fixed: dict[str, int] = {}
    analysis = None
    units = len(space.found)
    for level in progress.track(range(len(space.labels)), len(space.labels), "uniform files"):
        module = space.stitch((level,) * units)
        files, written, _ = gguf_files(module, model, precision)
        in_model, in_adapter = llm_gguf.linear_bytes(module, unit_index, units)
        for name, held in ((GGUF_MODEL, in_model), (GGUF_ADAPTER, in_adapter)):
            if name in files:
                fixed.setdefault(name, len(files[name]) - sum(held) + gguf_export.ALIGNMENT - 1)
        linears = [a + b for a, b in zip(in_model, in_adapter, strict=True)]
        shares.append({"bytes": linears, "weights": linears, "nodes": [0] * units})
        analysis = analysis or _gguf_costs(files, written[GGUF_MODEL], module)
    shares[0]["size"] = sum(fixed.values()) + sum(shares[0]["bytes"])
    return {"shares": shares, "analysis": analysis}


def _graph(module: Any, model: llm.LoadedLM, ctx: BuildContext) -> onnx.ModelProto:
    """The artifact's graph: the decoder exported with its cache, fp16 where asked, edgekit's metadata."""
    graph = export_lm(module, ctx.opset, ctx.plan.weights.accuracy_level)
    if ctx.precision == "fp16":
        graph = to_fp16(graph)
    set_metadata(graph, {"edgekit.version": __version__, "edgekit.family": "llm", "edgekit.target": ctx.target.name,
                         "edgekit.precision": _precision(ctx), "edgekit.tokenizer": model.source})
    return graph


def _precision(ctx: BuildContext) -> str:
    """The artifact's precision: the recipe's, or the levels a search chose among (the same for every candidate,
    so the metadata does not change a candidate's bytes)."""
    return "/".join(ctx.plan.search.weight_levels) if ctx.plan.search.budget else ctx.precision


def _estimate(ctx: BuildContext, analysis: dict[str, Any]) -> dict[str, Any]:
    """The device model's prefill and decode estimate for an exported decoder (`_costs`) on the target."""
    text = ctx.plan.text
    return estimate_lm(ctx.target, **analysis, prompt_tokens=text.prompt_length,
                       context=text.prompt_length + text.new_tokens,
                       int8_compute=ctx.precision in BITS and ctx.plan.weights.accuracy_level == 4)


def _scheme(plan: Recipe, bits: int, with_ranks: bool = True) -> WeightScheme:
    """The recipe's weight scheme at `bits`; EoRA ranks from `lowrank` (or none: a search's levels name them)."""
    settings, lowrank = plan.weights, plan.lowrank
    return WeightScheme(bits, settings.group_size, settings.symmetric, settings.method, settings.damp,
                        lowrank.rank if with_ranks else 0, lowrank.bits, settings.act_order,
                        tuple(lowrank.ranks.items()) if with_ranks else ())


def _quantize(module: Any, text: Text, plan: Recipe, precision: str, progress: Progress) -> dict[str, Any]:
    """Weight-only quantization of the decoder in place; the report's quantization block."""
    settings = plan.weights
    scheme = _scheme(plan, BITS[precision])
    eora = scheme.rank or any(rank for _, rank in scheme.ranks)
    note = f"{precision} {settings.method}, groups of {settings.group_size}" + (
        f", EoRA rank {scheme.rank}" + (" (per layer: recipe)" if scheme.ranks else "") if eora else "")
    with progress.stage("quantize", note=note) as record:
        quantization = quantize_lm(module, text.calibration, scheme, settings.head_bits, settings.embedding_bits,
                                   progress)
        quantization["scheme"] = {"weights": precision, "method": settings.method, "act_order": settings.act_order,
                                  "group_size": settings.group_size, "symmetric": settings.symmetric,
                                  "head_bits": settings.head_bits, "embedding_bits": settings.embedding_bits,
                                  "accuracy_level": settings.accuracy_level,
                                  "eora_rank": scheme.rank, "eora_ranks": dict(scheme.ranks),
                                  "eora_bits": scheme.rank_bits if eora else None,
                                  "calibration_tokens": int(text.calibration.numel())}
        if quantization["mean_output_error"] is not None:
            record["note"] = note + f"; output error {quantization['mean_output_error']:.4f}" + (
                f" -> {quantization['mean_output_error_eora']:.4f} with EoRA"
                if quantization["mean_output_error_eora"] is not None else "")
    return quantization


def _costs(graph: Any, module: Any) -> dict[str, int]:
    """What the device model needs of the exported decoder: bytes streamed per token, the gathered table, the
    parameters that multiply, the key/value cache per token and the kernels launched per step."""
    config = module.config  # the exported model's: depth pruning leaves fewer blocks (and cache tensors)
    weights, table = _weight_bytes(graph)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"weight_bytes": weights, "embedding_bytes": table, "vocab": config.vocab_size,
            "params": sum(p.numel() for p in module.parameters()) - config.vocab_size * config.hidden_size,
            "kv_bytes_per_token": 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4,
            "nodes": kernels(graph)}


def _tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """The tokenizer's files as the artifact folder holds them (tokenizer/…), so the manifest hashes them too."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return {f"tokenizer/{path.name}": path.read_bytes() for path in sorted(Path(folder).iterdir())
                if path.is_file()}
