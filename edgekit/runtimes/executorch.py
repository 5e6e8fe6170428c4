"""Run ExecuTorch programs (.pte) in ExecuTorch's Python runtime on this host, XNNPACK's thread pool fixed.

The program is loaded from bytes and held for as long as its method (the method does not keep it alive: its metadata
read after the program is freed crashes the process); one method serves every call. Its output tensor lives in the
program's planned memory, which the next call overwrites: each result is copied out.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekit.errors import StageError, first_line
from edgekit.runtimes.base import time_calls


class ExecuTorchRunner:
    def __init__(self, program: bytes, threads: int) -> None:
        import torch
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime
        from executorch.version import __version__

        if portable_lib._threadpool_get_thread_count() != threads:  # process-wide: the pool every delegate call uses
            portable_lib._unsafe_reset_threadpool(threads)
        try:
            self.program = Runtime.get().load_program(program)
            self.method: Any = self.program.load_method("forward")
        except Exception as err:  # the runtime raises RuntimeError for malformed programs or missing kernels
            raise StageError(f"ExecuTorch cannot load the artifact: {first_line(err)}") from err
        self.torch = torch
        self.description = f"ExecuTorch {__version__.split('+')[0]} XNNPACK, {threads} threads"

    def _infer(self, sample: np.ndarray) -> np.ndarray:
        return np.array(self.method.execute([self.torch.from_numpy(sample[None])])[0], dtype=np.float32)

    def io(self) -> dict[str, list[dict[str, Any]]]:
        """The method's inputs and outputs: name, shape, dtype (as the report's artifact block lists them)."""
        meta = self.method.metadata

        def spec(kind: str, count: int) -> list[dict[str, Any]]:
            infos = [getattr(meta, f"{kind}_tensor_meta")(i) for i in range(count)]
            return [{"name": f"{kind}_{i}", "shape": list(info.sizes()), "dtype": _dtype(info.dtype())}
                    for i, info in enumerate(infos)]

        return {"inputs": spec("input", meta.num_inputs()), "outputs": spec("output", meta.num_outputs())}

    def run(self, inputs: np.ndarray) -> np.ndarray:
        return np.concatenate([self._infer(row) for row in inputs])

    def time(self, sample: np.ndarray, warmup: int, runs: int) -> list[float]:
        tensor = self.torch.from_numpy(sample[None])
        return time_calls(lambda: self.method.execute([tensor]), warmup, runs)


# ExecuTorch's ScalarType codes (c10's order) as numpy names the types
SCALAR_TYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16", 6: "float32", 7: "float64",
                11: "bool"}


def _dtype(code: int) -> str:
    return SCALAR_TYPES.get(code, f"scalar type {code}")
