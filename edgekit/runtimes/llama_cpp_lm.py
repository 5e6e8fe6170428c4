"""Run a GGUF language model (and its LoRA adapter) in llama.cpp through llama-cpp-python: perplexity and greedy
decoding, with the interface of the onnxruntime runner (runtimes/onnx_lm.py), so both are verified alike.

Every window starts from an empty key/value cache; decoding feeds one token at a time through the cache, as an
app on llama.cpp does.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import UsageError
from edgekit.runtimes.onnx_lm import window_nll

INSTALL = "pip install 'edgekit[gguf]' (llama-cpp-python, built from source: about 15 minutes on 2 cores)"


def require_llama_cpp() -> None:
    """A GGUF build is verified in llama.cpp itself: without it there is nothing to verify in."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise UsageError(f"--format gguf verifies the model in llama.cpp, which is not installed here: {INSTALL}")


def gguf_tokenize(model: Path, text: str) -> list[int]:
    """Token ids of `text` by the tokenizer the GGUF file carries (no begin-of-text token added)."""
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    return list(vocab.tokenize(text.encode(), add_bos=False, special=True))


class LlamaCppLM:
    def __init__(self, model: Path, adapter: Path | None, threads: int, context: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(model), lora_path=str(adapter) if adapter else None, n_ctx=context,
                                   n_batch=context, n_ubatch=context, n_threads=threads, n_threads_batch=threads,
                                   logits_all=True, verbose=False)
        self.description = (f"llama.cpp (llama-cpp-python {llama_cpp.__version__}), CPU, {threads} threads"
                            + (", LoRA adapter" if adapter else ""))

    def step(self, ids: list[int]) -> np.ndarray:
        """Logits `[tokens, vocab]` for `ids` following the cached positions."""
        start = self.llm.n_tokens
        self.llm.eval(ids)
        return np.array(self.llm.scores[start : start + len(ids)])

    def score(self, window: np.ndarray) -> tuple[float, np.ndarray]:
        """Summed negative log-likelihood of a window's tokens after its first, read in one prefill, and the most
        likely next token at each position."""
        self.llm.reset()
        logits = self.step(window.tolist())
        return window_nll(logits, window), logits.argmax(-1)

    def greedy(self, prompt: np.ndarray, new_tokens: int) -> dict[str, Any]:
        """Greedy continuation of `prompt` through the cache, with prefill and per-token decode times."""
        self.llm.reset()
        start = time.perf_counter()
        logits = self.step(prompt.tolist())
        prefill_ms = (time.perf_counter() - start) * 1000
        tokens, decode_ms = [int(logits[-1].argmax())], []
        while len(tokens) < new_tokens:
            start = time.perf_counter()
            logits = self.step([tokens[-1]])
            decode_ms.append((time.perf_counter() - start) * 1000)
            tokens.append(int(logits[-1].argmax()))
        return {"tokens": tokens, "prefill_ms": prefill_ms, "decode_ms": decode_ms}

    def detokenize(self, tokens: list[int]) -> str:
        return str(self.llm.detokenize(tokens).decode(errors="replace"))
