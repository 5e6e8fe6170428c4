"""The build for language models: load → text → reference → [prune → distill] → quantize (+ EoRA) → export →
verify (perplexity, greedy generation, prefill and decode timings) → report.

Compression runs one decoder block at a time on calibration text; the artifact is one ONNX graph with a
key/value cache that onnxruntime both prefills and decodes with. Everything the report says about accuracy
comes from running that graph on held-out text.
"""

from __future__ import annotations

import copy
import math
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit import __version__
from edgekit.cache import ArrayCache
from edgekit.data import file_sha256
from edgekit.errors import UsageError
from edgekit.families import llm
from edgekit.passes.distill import distill, next_token_kl
from edgekit.passes.export import set_metadata
from edgekit.passes.export_llm import export_lm
from edgekit.passes.prune_llm import block_importance, prune_width
from edgekit.passes.quantize import to_fp16
from edgekit.passes.sequential import BATCH, Covariance, WeightScheme, compress_blocks, compress_linear
from edgekit.passes.weightonly import rtn
from edgekit.progress import Progress
from edgekit.recipe import Recipe
from edgekit.report.manifest import package_versions
from edgekit.runtimes.onnx_lm import OnnxCausalLM, window_nll
from edgekit.targets import Target
from edgekit.verify.estimate_lm import estimate_lm, kernels
from edgekit.verify.latency import host_description

BITS = {"int4": 4, "int8": 8}


@dataclass
class Text:
    calibration: Any  # torch.LongTensor [windows, length]
    evaluation: Any
    prompts: Any
    source: str

    def digest(self) -> str:
        import hashlib

        digest = hashlib.sha256()
        for part in (self.calibration, self.evaluation, self.prompts):
            digest.update(np.ascontiguousarray(part.numpy()).tobytes())
        return digest.hexdigest()


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
                evaluation, prompts[: settings.prompts], source)


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
                embedding_bits: int | None, progress: Progress) -> dict[str, Any]:
    """Quantize every decoder block's linears (GPTQ/RTN, EoRA), then the output layer and the embedding table.

    A table tied to the head stays tied: it is the head's codes, stored once and read by row."""
    import torch

    tied = bool(module.config.tie_word_embeddings)
    if tied and not head_bits and embedding_bits:  # a float head beside an integer table: two tables after all
        module.lm_head.weight = torch.nn.Parameter(module.lm_head.weight.detach().clone())
        module.config.tie_word_embeddings = tied = False
    with torch.no_grad():
        hidden, kwargs = llm.block_inputs(module, calibration)
        hidden, records = compress_blocks(llm.decoder_layers(module), llm.block_linears, hidden, kwargs, scheme,
                                          track=lambda xs, n: progress.track(xs, n, "decoder blocks"))
        if head_bits:
            covariance = Covariance(module.lm_head.in_features)
            for part in hidden.split(BATCH):
                covariance(module.lm_head, (module.model.norm(part),))
            head_scheme = WeightScheme(head_bits, scheme.group_size, scheme.symmetric, scheme.method, scheme.damp,
                                       act_order=scheme.act_order)
            records.append({"block": None} | compress_linear(module, "lm_head", module.lm_head, covariance.matrix,
                                                             head_scheme))
        table = module.model.embed_tokens
        if tied and head_bits:
            records.append({"block": None, "layer": "embed_tokens", "bits": head_bits, "bytes": 0,
                            "shared_with": "lm_head"})
        elif embedding_bits:
            quantized = rtn(table.weight.detach(), embedding_bits, scheme.group_size, symmetric=True)
            table.weight.data = quantized.dequantize()
            table.edgekit_quantized = quantized
            records.append({"block": None, "layer": "embed_tokens", "bits": embedding_bits,
                            "bytes": quantized.nbytes})
    errors = [r["output_error"] for r in records if "output_error" in r]
    compensated = [r["output_error_eora"] for r in records if "output_error_eora" in r]
    return {"layers": records,
            "mean_output_error": float(np.mean(errors)) if errors else None,
            "mean_output_error_eora": float(np.mean(compensated)) if compensated else None}


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
        widths = []
        if ratio:
            _, widths = prune_width(list(llm.decoder_layers(module)), hidden, kwargs, ratio, llm.width_consumers,
                                    llm.prune_block_width, track=lambda xs, n: progress.track(xs, n, "blocks pruned"))
            module.config.intermediate_size = widths[0]["mlp_channels"][1]
            module.config.num_attention_heads = widths[0]["heads"][1]
    return {"method": "depth: lowest 1 - cos(block input, output); width: FLAP fluctuation with bias compensation",
            "ratio": ratio, "block_importance": [round(v, 5) for v in importance], "dropped_blocks": dropped,
            "width": widths[0] if widths else None,
            "params_before": params_before, "params_after": sum(p.numel() for p in module.parameters())}


def verify_lm(artifact: bytes, text: Text, ref: dict[str, np.ndarray], threads: int,
              progress: Progress) -> tuple[dict[str, Any], dict[str, Any]]:
    """Perplexity of the artifact in onnxruntime against the original's, greedy agreement, and host timings."""
    runner = OnnxCausalLM(artifact, threads)
    scores = [runner.score(w.numpy()) for w in progress.track(text.evaluation, len(text.evaluation),
                                                              "artifact on held-out text")]
    nll = np.array([value for value, _ in scores])
    predictions = np.array([best for _, best in scores])
    tokens = int(text.evaluation.shape[0] * (text.evaluation.shape[1] - 1))
    ppl_reference, ppl_artifact = math.exp(ref["nll"].sum() / tokens), math.exp(nll.sum() / tokens)
    runs = [runner.greedy(p.numpy(), ref["tokens"].shape[1]) for p in text.prompts]
    agreement = [_common_prefix(run["tokens"], list(expected)) / len(expected)
                 for run, expected in zip(runs, ref["tokens"], strict=True)]
    accuracy = {
        "ppl_reference": round(ppl_reference, 4), "ppl_artifact": round(ppl_artifact, 4),
        "ppl_ratio": round(ppl_artifact / ppl_reference, 4), "eval_tokens": tokens,
        "next_token_agreement": round(float((predictions == ref["predictions"]).mean()), 4),
        "generation_agreement": round(float(np.mean(agreement)), 4) if agreement else None,
        "generation_prompts": len(agreement),
    }
    accuracy["summary"] = (f"ppl {ppl_artifact:.3f} (original {ppl_reference:.3f}, ×{accuracy['ppl_ratio']:.3f}), "
                           f"next-token agreement {accuracy['next_token_agreement']:.3f}")
    decode = [ms for run in runs for ms in run["decode_ms"]]
    latency = {"label": "measured: host", "runtime": runner.description, "host": host_description(),
               "prefill_ms": round(float(np.median([r["prefill_ms"] for r in runs])), 3) if runs else None,
               "prefill_tokens": int(text.prompts.shape[1]),
               "decode_ms_per_token": round(float(np.median(decode)), 3) if decode else None,
               "tokens_per_s": round(1e3 / float(np.median(decode)), 2) if decode else None,
               "decode_steps": len(decode)}
    return accuracy, latency


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


def build_lm(source: object, adapter: llm.LanguageModelFamily, device: Target, plan: Recipe, *,
             calib: str | Path | None, eval_text: str | Path | None, threads: int, cache: ArrayCache,
             staging: Path, notes: list[str], progress: Progress,
             given: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the language-model stages into `staging`; returns the report (gates not yet judged) and the manifest
    (outputs not yet hashed)."""
    import torch

    if plan.export.format != "onnx":
        raise UsageError("language models export to ONNX (one graph with a key/value cache); use --format onnx")
    precision = plan.quantize.precision  # resolve() admitted only fp32, fp16, int8, int4 for this family
    with progress.stage("load") as record:
        loaded = adapter.load(source, cache.root)
        record["note"] = f"{loaded.details['params'] / 1e6:.1f} M params, {loaded.details['layers']} blocks"
    with progress.stage("text") as record:
        text = load_text(loaded, plan, calib, eval_text)
        record["note"] = (f"calibration {tuple(text.calibration.shape)}, held-out {tuple(text.evaluation.shape)} "
                          f"tokens, {len(text.prompts)} prompts: {text.source}")
    torch.set_num_threads(threads)
    with progress.stage("reference") as record:
        ref = reference(loaded, text, plan.text.new_tokens, cache, progress)
        record["note"] = "original model in torch: held-out NLL, greedy tokens"
    module = copy.deepcopy(loaded.module)
    compression: dict[str, Any] = {}
    if plan.prune.ratio or plan.prune.blocks:
        with progress.stage("prune") as record:
            compression["pruning"] = prune_lm(module, text.calibration, plan.prune.ratio, plan.prune.blocks, progress)
            done = compression["pruning"]
            record["note"] = (f"{done['params_before'] / 1e6:.1f} M -> {done['params_after'] / 1e6:.1f} M params"
                              + (f", blocks {done['dropped_blocks']} removed" if done["dropped_blocks"] else ""))
        if plan.distill.steps:
            settings = plan.distill
            with progress.stage("distill") as record:
                compression["distillation"] = distill(
                    module, loaded.module, text.calibration[: settings.images], llm.logits, loss=next_token_kl,
                    steps=settings.steps, seconds=settings.seconds, lr=settings.lr, batch=settings.batch,
                    seed=plan.seed, progress=lambda steps, total: progress.track(steps, total, "distillation steps"))
                done = compression["distillation"]
                record["note"] = (f"{done['steps']} steps, probe KL {done['probe_loss_before']:.4g} -> "
                                  f"{done['probe_loss_after']:.4g}"
                                  + (" (worse: reverted)" if done["reverted"] else ""))
    elif plan.distill.steps:
        raise UsageError("distillation recovers what pruning lost: set prune.ratio or prune.blocks too")
    quantization = None
    if precision in BITS:
        settings = plan.weights
        scheme = WeightScheme(BITS[precision], settings.group_size, settings.symmetric, settings.method,
                              settings.damp, plan.lowrank.rank, plan.lowrank.bits, settings.act_order,
                              tuple(plan.lowrank.ranks.items()))
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
    elif plan.lowrank.rank or any(plan.lowrank.ranks.values()):
        raise UsageError("EoRA compensates quantization: set precision int4 or int8 with lowrank.rank")
    with progress.stage("export", note=f"onnx opset {plan.export.opset}, key/value cache"):
        graph = export_lm(module, plan.export.opset, plan.weights.accuracy_level)
        if precision == "fp16":
            graph = to_fp16(graph)
        set_metadata(graph, {"edgekit.version": __version__, "edgekit.family": adapter.name,
                             "edgekit.target": device.name, "edgekit.precision": precision,
                             "edgekit.tokenizer": loaded.source})
        artifact = graph.SerializeToString(deterministic=True)
    artifact_file = "model.onnx"
    (staging / artifact_file).write_bytes(artifact)
    loaded.tokenizer.save_pretrained(staging / "tokenizer")
    with progress.stage("verify") as record:
        accuracy, measured = verify_lm(artifact, text, ref, threads, progress)
        record["note"] = f"{accuracy['summary']}, decode {measured['tokens_per_s']} tok/s on host"
    config = module.config  # the exported model's: depth pruning leaves fewer blocks (and cache tensors)
    weights, table = _weight_bytes(graph)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cache_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4
    estimated = estimate_lm(device, weight_bytes=weights, embedding_bytes=table, vocab=config.vocab_size,
                            params=sum(p.numel() for p in module.parameters()) - config.vocab_size * config.hidden_size,
                            kv_bytes_per_token=cache_bytes, prompt_tokens=plan.text.prompt_length,
                            context=plan.text.prompt_length + plan.text.new_tokens,
                            nodes=kernels(graph),
                            int8_compute=precision in BITS and plan.weights.accuracy_level == 4)
    notes.append("the artifact takes token ids: tokenizer/ holds the tokenizer to encode and decode text")
    report = {
        "edgekit_version": __version__,
        "status": "ok",
        "model": {"name": loaded.name, "family": adapter.name, "source": loaded.source, **loaded.details},
        "target": {"name": device.name, "description": device.description,
                   "runtime": device.runtime_for("onnx").name, "format": "onnx"},
        "artifact": {"file": artifact_file, "format": "onnx", "precision": precision, "opset": plan.export.opset,
                     "size_bytes": len(artifact), "sha256": file_sha256(staging / artifact_file),
                     "inputs": ["input_ids [1, tokens] int64", "past_key_i / past_value_i "
                                f"[1, {config.num_key_value_heads}, past, {head_dim}] float32 per block"],
                     "outputs": ["logits [1, tokens, vocab]", "present_key_i / present_value_i (past + tokens)"]},
        "size_bytes": len(artifact),
        **{k: accuracy[k] for k in adapter.headline},
        "accuracy": {**accuracy, "eval_source": text.source},
        "latency_ms": {"measured_host": measured, "estimated_target": estimated},
        **compression,
        "quantization": quantization,
        "deploy": None,
        "ops": None,
        "stages": progress.stages,
        "notes": notes,
        "cache": {"hits": cache.hits, "misses": cache.misses, "dir": str(cache.root) if cache.root else None},
    }
    manifest = {
        "edgekit": __version__,
        "inputs": {"model": {"given": given, "source": loaded.source, "sha256": loaded.fingerprint},
                   "text": {"source": text.source, "sha256": text.digest()},
                   "target": {"name": device.name, "sha256": device.sha256}},
        "recipe": plan.model_dump(), "seed": plan.seed, "packages": package_versions(),
        "platform": platform.platform(),
    }
    return report, manifest


def generate(folder: str | Path, prompt: str, new_tokens: int, threads: int) -> dict[str, Any]:
    """Greedy continuation of `prompt` by a built language-model artifact, through its key/value cache."""
    import json

    from transformers import AutoTokenizer

    folder = Path(folder)
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"{folder} is not an edgekit artifact folder ({err})") from None
    if report.get("model", {}).get("family") != "llm":
        raise UsageError(f"{folder} holds a {report.get('model', {}).get('family')} model, not a language model")
    artifact = folder / report["artifact"]["file"]
    if not artifact.is_file() or file_sha256(artifact) != report["artifact"]["sha256"]:
        raise UsageError(f"{artifact} is missing or changed since it was built; rebuild it")
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    ids = np.array(tokenizer(prompt, add_special_tokens=False)["input_ids"], dtype=np.int64)
    if ids.size == 0:
        raise UsageError("the prompt encodes to no tokens")
    runner = OnnxCausalLM(artifact.read_bytes(), threads)
    run = runner.greedy(ids, new_tokens)
    decode = float(np.median(run["decode_ms"])) if run["decode_ms"] else None
    return {"text": tokenizer.decode(run["tokens"]), "tokens": run["tokens"], "prefill_ms": run["prefill_ms"],
            "tokens_per_s": 1e3 / decode if decode else float("nan"), "runtime": runner.description}
