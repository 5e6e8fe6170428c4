"""Run an exported causal LM (edgekit's prefill/decode graph) in onnxruntime: perplexity and greedy decoding (the
loop is shared with OpenVINO's runner of the same graph).

The decode loop is the one an app writes: feed the prompt with an empty cache, then one token at a time
with the cache the previous step returned.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edgekit.runtimes.onnxruntime import cpu_session, describe


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def window_nll(logits: np.ndarray, window: np.ndarray) -> float:
    """Summed negative log-likelihood of tokens 1… of a window given the logits `[tokens, vocab]` before them."""
    logp = log_softmax(logits[:-1].astype(np.float64))
    return float(-logp[np.arange(len(window) - 1), window[1:]].sum())


def present_name(past: str) -> str:
    """The output that returns a cache input extended: past_key_3 -> present_key_3."""
    return "present_" + past.removeprefix("past_")


class KeyValueDecoder:
    """The prefill/decode loop over edgekit's decoder graph (input_ids and past_* in, logits and present_* out),
    whatever runtime computes one step of it: subclasses give `past_shapes` (the cache inputs' shapes, past length
    dynamic) and `run`."""

    past_shapes: dict[str, list[Any]]
    description: str  # the runtime, as the report names it

    def run(self, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """The runtime's logits and present_* outputs (in the order of `past_shapes`) for one step's inputs."""
        raise NotImplementedError

    @property
    def outputs(self) -> list[str]:
        """The step's outputs, in the order `run` returns them."""
        return ["logits", *map(present_name, self.past_shapes)]

    def empty_cache(self) -> dict[str, np.ndarray]:
        return {name: np.zeros((1, shape[1], 0, shape[3]), np.float32) for name, shape in self.past_shapes.items()}

    def step(self, ids: np.ndarray, cache: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits `[tokens, vocab]` for `ids` following the cached positions, and the extended cache."""
        logits, presents = self.run({"input_ids": ids.reshape(1, -1).astype(np.int64), **cache})
        return logits[0], dict(zip(self.past_shapes, presents, strict=True))

    def score(self, window: np.ndarray) -> tuple[float, np.ndarray]:
        """Summed negative log-likelihood of a window's tokens after its first, read in one prefill, and the
        most likely next token at each position."""
        logits, _ = self.step(window, self.empty_cache())
        return window_nll(logits, window), logits.argmax(-1)

    def greedy(self, prompt: np.ndarray, new_tokens: int) -> dict[str, Any]:
        """Greedy continuation of `prompt` through the cache, with prefill and per-token decode times."""
        start = time.perf_counter()
        logits, cache = self.step(prompt, self.empty_cache())
        prefill_ms = (time.perf_counter() - start) * 1000
        tokens, decode_ms = [int(logits[-1].argmax())], []
        while len(tokens) < new_tokens:
            start = time.perf_counter()
            logits, cache = self.step(np.array([tokens[-1]]), cache)
            decode_ms.append((time.perf_counter() - start) * 1000)
            tokens.append(int(logits[-1].argmax()))
        return {"tokens": tokens, "prefill_ms": prefill_ms, "decode_ms": decode_ms}


class OnnxCausalLM(KeyValueDecoder):
    def __init__(self, model: bytes | str, threads: int) -> None:
        self.session = cpu_session(model, threads)
        self.description = describe(threads)
        self.past_shapes = {i.name: i.shape for i in self.session.get_inputs() if i.name.startswith("past_")}

    def run(self, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        logits, *presents = self.session.run(self.outputs, feed)
        return logits, presents


def lm_outputs(lm: Any, windows: np.ndarray, prompts: np.ndarray, new_tokens: int,
               track: Callable[[Any, int, str], Any] = lambda items, count, what: items) -> dict[str, np.ndarray]:
    """What verification reads of a language model in its runtime (a `KeyValueDecoder` or llama.cpp's, here or on
    a board through `edgekit agent`): each held-out window's summed NLL and next-token predictions, and each
    prompt's greedy tokens with its prefill and per-token decode milliseconds."""
    scores = [lm.score(window) for window in track(windows, len(windows), "artifact on held-out text")]
    runs = [lm.greedy(prompt, new_tokens) for prompt in prompts]
    return {"nll": np.array([nll for nll, _ in scores], np.float64),
            "predictions": np.stack([best for _, best in scores]).astype(np.int64),
            "tokens": np.array([run["tokens"] for run in runs], np.int64).reshape(len(runs), new_tokens),
            "prefill_ms": np.array([run["prefill_ms"] for run in runs], np.float64),
            "decode_ms": np.array([run["decode_ms"] for run in runs], np.float64).reshape(len(runs), new_tokens - 1)}
