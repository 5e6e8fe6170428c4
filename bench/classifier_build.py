"""Side by side, in one run: the real classifiers as PyTorch runs them vs edgekit's FP32 and FP16 artifacts.

The peer is what a team ships without edgekit: the torch model in eager mode. For each model:
top-1 on labelled ImageNet-sample images, top-1 agreement with the torch model, artifact size,
host latency (same thread count, variants interleaved, the minimum of several medians) and
build time, then the ratios edgekit/torch.

    .venv/bin/python bench/classifier_build.py [--images 200] [--threads 1] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import edgekit
from edgekit.families import FAMILIES, LoadOptions
from edgekit.runtimes.onnxruntime import OnnxRuntimeRunner

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"


def timed_median(run, sample: np.ndarray, runs: int) -> float:
    for _ in range(3):
        run(sample)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(sample)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--runs", type=int, default=30, help="timed inferences per round")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"needs labelled images at {DATA}")
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("mobilenet_v2", "efficientnet_lite0"):
            results = {}
            for precision in ("fp32", "fp16"):
                start = time.perf_counter()
                results[precision] = edgekit.build(
                    name, "x86-64", eval=DATA, precision=precision, out=f"{tmp}/{name}-{precision}", quiet=True,
                    overrides={"verify.eval_limit": args.images, "verify.runs": 5, "verify.threads": args.threads},
                )
                results[precision].seconds = time.perf_counter() - start
            module = FAMILIES["classifier"].load(name, LoadOptions()).module
            sample = np.zeros((1, 3, 224, 224), dtype=np.float32)
            runners = {p: OnnxRuntimeRunner((r.out / "model.onnx").read_bytes(), args.threads)
                       for p, r in results.items()}

            def torch_run(x: np.ndarray, module: torch.nn.Module = module) -> None:
                with torch.no_grad():
                    module(torch.from_numpy(x))

            variants = {"torch eager": torch_run, **{f"edgekit {p}": r.run for p, r in runners.items()}}
            medians: dict[str, list[float]] = {k: [] for k in variants}
            for _ in range(args.rounds):  # interleave so drift on a shared machine hits every variant alike
                for label, run in variants.items():
                    medians[label].append(timed_median(run, sample, args.runs))
            fp32 = results["fp32"].report
            torch_size = sum(t.numel() * t.element_size() for t in module.state_dict().values())
            rows.append((name, "torch eager", fp32["top1_reference"], 1.0, torch_size, min(medians["torch eager"]),
                         None))
            for precision, result in results.items():
                report = result.report
                rows.append((name, f"edgekit {precision}", report["top1_artifact"], report["top1_agreement"],
                             report["size_bytes"], min(medians[f"edgekit {precision}"]), result.seconds))
    header = f"{'model':<20}{'variant':<15}{'top1':>7}{'agree':>7}{'MB':>8}{'host ms':>9}{'x torch':>9}{'build s':>9}"
    print(f"host latency: measured here, {args.threads} thread(s), min of {args.rounds} interleaved medians")
    print(header)
    torch_ms = {}
    for model, variant, top1, agree, size, ms, build_s in rows:
        torch_ms.setdefault(model, ms)
        speedup = torch_ms[model] / ms
        build_text = "-" if build_s is None else f"{build_s:.1f}"
        print(f"{model:<20}{variant:<15}{top1:>7.3f}{agree:>7.3f}{size / 1e6:>8.2f}{ms:>9.2f}{speedup:>8.2f}x"
              f"{build_text:>9}")


if __name__ == "__main__":
    main()
