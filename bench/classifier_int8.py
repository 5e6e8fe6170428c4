"""INT8 for classifiers, side by side in one run: FP32, onnxruntime `quantize_static` defaults,
NNCF `quantize` defaults, and edgekit INT8 (accuracy-aware, gate: at most 0.5 pt top-1 drop).

ImageNet-sample (../shared/data/imagenet-sample): every 5th image calibrates, the rest evaluate.
Every variant runs in onnxruntime on this host with the same thread count; latency is the minimum
of several interleaved medians. Needs `pip install nncf` (a benchmark-only dependency).

    .venv/bin/python bench/classifier_int8.py [--models mobilenet_v2 efficientnet_lite0] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

import edgekit
from edgekit.families import FAMILIES, LoadOptions
from edgekit.passes.export import export_onnx
from edgekit.runtimes.onnxruntime import OnnxRuntimeRunner

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"


def split(folder: Path) -> tuple[Path, Path]:
    """Calibration (every 5th image) and evaluation folders of links into the sample."""
    calib, held = folder / "calib", folder / "eval"
    calib.mkdir()
    held.mkdir()
    for i, path in enumerate(sorted(DATA.glob("*.JPEG"))):
        (calib if i % 5 == 0 else held).joinpath(path.name).symlink_to(path)
    return calib, held


def ort_defaults(fp32: onnx.ModelProto, calibration: np.ndarray, tmp: Path) -> bytes:
    from onnxruntime.quantization import quant_pre_process, quantize_static

    onnx.save(fp32, str(tmp / "fp32.onnx"))
    quant_pre_process(str(tmp / "fp32.onnx"), str(tmp / "pre.onnx"))  # what onnxruntime's docs ask first

    class Reader:
        rows = iter([{"input": row[None]} for row in calibration])

        def get_next(self) -> dict | None:
            return next(self.rows, None)

    quantize_static(str(tmp / "pre.onnx"), str(tmp / "ort.onnx"), Reader())
    return (tmp / "ort.onnx").read_bytes()


def nncf_defaults(fp32: onnx.ModelProto, calibration: np.ndarray) -> bytes:
    import nncf

    return nncf.quantize(fp32, nncf.Dataset([{"input": row[None]} for row in calibration])).SerializeToString()


def timed(build: Callable[[], bytes]) -> tuple[bytes, float]:
    start = time.perf_counter()
    model = build()
    return model, time.perf_counter() - start


def latency(runners: dict[str, OnnxRuntimeRunner], sample: np.ndarray, rounds: int, runs: int) -> dict[str, float]:
    medians: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):  # interleaved, so drift on a shared machine hits every variant alike
        for name, runner in runners.items():
            medians[name].append(statistics.median(runner.time(sample, warmup=5, runs=runs)))
    return {name: min(values) for name, values in medians.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "efficientnet_lite0"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"needs labelled images at {DATA}")
    logging.disable(logging.WARNING)
    print(f"host: {args.threads} thread(s); latency measured here, min of {args.rounds} interleaved medians")
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        calib_dir, eval_dir = split(tmp)
        for name in args.models:
            bench_model(name, calib_dir, eval_dir, tmp, args)


def bench_model(name: str, calib_dir: Path, eval_dir: Path, tmp: Path, args: argparse.Namespace) -> None:
    family = FAMILIES["classifier"]
    loaded = family.load(name, LoadOptions())
    held = family.samples(loaded, sorted(eval_dir.iterdir()), eval_dir)
    calibration = family.samples(loaded, sorted(calib_dir.iterdir()), None).inputs
    fp32, fp32_s = timed(lambda: export_onnx(loaded.module, loaded.input_shape, 17))
    variants = {"fp32": (fp32.SerializeToString(), fp32_s)}
    variants["ort quantize_static"] = timed(lambda: ort_defaults(fp32, calibration, tmp))
    variants["nncf quantize"] = timed(lambda: nncf_defaults(fp32, calibration))
    result, seconds = timed(lambda: edgekit.build(
        name, "x86-64", precision="int8", calib=calib_dir, eval=eval_dir, out=tmp / name, quiet=True,
        overrides={"gates.max_top1_drop_pt": 0.5, "verify.eval_limit": 1000, "verify.runs": 5,
                   "verify.threads": args.threads}))
    variants["edgekit int8"] = ((result.out / "model.onnx").read_bytes(), seconds)
    runners = {label: OnnxRuntimeRunner(model, args.threads) for label, (model, _) in variants.items()}
    outputs = {label: runner.run(held.inputs) for label, runner in runners.items()}
    top1 = {label: float((out.argmax(1) == held.labels).mean()) for label, out in outputs.items()}
    ms = latency(runners, held.inputs[0], args.rounds, args.runs)
    ours = "edgekit int8"
    print(f"\n{name}: {len(held)} held-out images, {len(calibration)} calibration images; "
          f"edgekit kept {len(result.report['quantization']['kept_float'])} layers in float")
    print(f"{'variant':<22}{'top1':>7}{'drop pt':>9}{'agree':>7}{'MB':>7}{'host ms':>9}{'build s':>9}"
          f"{'edgekit acc/peer':>18}{'edgekit speed/peer':>20}")
    for label, out in outputs.items():
        agree = float((out.argmax(1) == outputs["fp32"].argmax(1)).mean())
        model, build_s = variants[label]
        print(f"{label:<22}{top1[label]:>7.4f}{100 * (top1['fp32'] - top1[label]):>9.2f}{agree:>7.3f}"
              f"{len(model) / 1e6:>7.2f}{ms[label]:>9.2f}{build_s:>9.1f}"
              f"{top1[ours] / top1[label]:>17.3f}x{ms[label] / ms[ours]:>19.2f}x")

if __name__ == "__main__":
    main()
