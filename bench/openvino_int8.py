"""MobileNetV2 INT8 in OpenVINO, side by side in one run: edgekit's QDQ graph read by OpenVINO (the
`--format openvino` build) against NNCF's `nncf.quantize` on the OpenVINO FP32 model with the same
calibration images, with FP32 and edgekit's ONNX builds in onnxruntime beside them.

ImageNet-sample (../shared/data/imagenet-sample), sorted by name: the first 100 images calibrate every
INT8 variant, the other 400 score it (top-1 against the labels, and agreement with the original PyTorch
model). Latency is measured on this host with the same thread count for every variant, interleaved (the
order reversed every other round): the minimum of several medians. `--yolo11n` also prints edgekit's time over
Ultralytics' round by round: the median ratio and its quartiles say whether a difference outlives the noise.

    .venv/bin/python bench/openvino_int8.py [--threads 1] [--activations uint8 int8-symmetric]
    .venv/bin/python bench/openvino_int8.py --yolo11n   # YOLO11n: edgekit INT8 vs Ultralytics' OpenVINO INT8
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"
COCO = DATA.parent / "coco128" / "images" / "train2017"
CALIB_IMAGES = 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--activations", nargs="+", default=["uint8"], choices=["uint8", "int8-symmetric"],
                        help="edgekit OpenVINO INT8 rows: activation schemes of edgekit's QDQ graph")
    parser.add_argument("--yolo11n", action="store_true",
                        help="instead: YOLO11n, FP32 and edgekit INT8 in onnxruntime and OpenVINO, Ultralytics' "
                        "OpenVINO INT8")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"needs labelled images at {DATA}")
    logging.disable(logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    if args.yolo11n:
        return yolo11n(args)
    work = Path(tempfile.mkdtemp(prefix="edgekit-openvino-bench-"))
    try:
        bench(work, args)
    finally:
        shutil.rmtree(work)


def bench(work: Path, args: argparse.Namespace) -> None:
    import torch

    import edgekit
    from edgekit.families import FAMILIES, LoadOptions
    from edgekit.passes.export import export_onnx
    from edgekit.passes.openvino import to_openvino
    from edgekit.runtimes import files_runner

    calib, held = work / "calib", work / "eval"
    calib.mkdir()
    held.mkdir()
    for i, path in enumerate(sorted(DATA.glob("*.JPEG"))):
        (calib if i < CALIB_IMAGES else held).joinpath(path.name).symlink_to(path)
    family = FAMILIES["classifier"]
    loaded = family.load("mobilenet_v2", LoadOptions())
    samples = family.samples(loaded, sorted(held.iterdir()), held)
    calibration = family.samples(loaded, sorted(calib.iterdir()), None).inputs
    with torch.no_grad():
        reference = np.concatenate([loaded.module(torch.from_numpy(np.ascontiguousarray(chunk))).numpy()
                                    for chunk in np.array_split(samples.inputs, 25)])
    fp32 = export_onnx(loaded.module, loaded.input_shape, 17)
    variants: dict[str, tuple[Any, str, float]] = {}  # label -> (runner, format, build seconds)

    def built(label: str, fmt: str, **overrides: Any) -> None:
        start = time.perf_counter()
        result = edgekit.build("mobilenet_v2", "x86-64", format=fmt, precision="int8", calib=calib, eval=held,
                               out=work / label.replace(" ", "-"), quiet=True,
                               overrides={"verify.eval_limit": 1000, "verify.runs": 5, "verify.threads": args.threads,
                                          **overrides})
        folder = result.out
        files = {name: (folder / name).read_bytes() for name in
                 (("model.xml", "model.bin") if fmt == "openvino" else ("model.onnx",))}
        kept = len(result.report["quantization"]["kept_float"])
        variants[f"{label} ({kept} float)"] = (files_runner(files, fmt, args.threads), fmt,
                                               time.perf_counter() - start)

    start = time.perf_counter()
    variants["openvino fp32"] = (files_runner(to_openvino(fp32), "openvino", args.threads), "openvino",
                                 time.perf_counter() - start)
    for activations in args.activations:
        built(f"edgekit qdq->openvino {activations}", "openvino", **{"quantize.activations": activations})
    start = time.perf_counter()
    nncf_files = nncf_openvino(fp32, calibration)
    variants["nncf.quantize openvino"] = (files_runner(nncf_files, "openvino", args.threads), "openvino",
                                          time.perf_counter() - start)
    variants["onnxruntime fp32"] = (files_runner({"model.onnx": fp32.SerializeToString()}, "onnx", args.threads),
                                    "onnx", 0.0)
    built("edgekit onnxruntime", "onnx")

    outputs = {label: runner.run(samples.inputs) for label, (runner, _, _) in variants.items()}
    ms = {label: min(values) for label, values in interleaved(
        {label: runner for label, (runner, _, _) in variants.items()}, samples.inputs[0], args).items()}
    print(f"MobileNetV2, ImageNet-sample: {len(calibration)} calibration images (first by name), {len(samples)} "
          f"scored; {args.threads} thread(s), host latency measured here, min of {args.rounds} interleaved medians")
    print(f"{'variant':<44}{'top1':>7}{'agree':>8}{'host ms':>9}{'build s':>9}")
    for label, out in outputs.items():
        top1 = float((out.argmax(1) == samples.labels).mean())
        agree = float((out.argmax(1) == reference.argmax(1)).mean())
        print(f"{label:<44}{top1:>7.4f}{agree:>8.4f}{ms[label]:>9.2f}{variants[label][2]:>9.1f}")
    print(f"original (PyTorch){'':<26}{float((reference.argmax(1) == samples.labels).mean()):>7.4f}")


def yolo11n(args: argparse.Namespace) -> None:
    """YOLO11n at 640 exported once by edgekit: FP32 in onnxruntime and OpenVINO, edgekit's INT8 QDQ graph (the
    first try of an x86-64 build: mean-minmax ranges, the decode in float, the int16-pair guard; for OpenVINO only
    the inputs of convs and matmuls quantized, each value rounded once above splits and concats) in each, and
    Ultralytics' own OpenVINO INT8 export (NNCF) calibrated on the same images. coco128's first 64 images
    calibrate, the other 64 score (mAP50-95 against the labels); latency interleaved."""
    import os
    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from detector import _OpenVino, _split  # the detector bench's coco128 split and OpenVINO runner

    from edgekit.families import FAMILIES, LoadOptions
    from edgekit.passes.export import export_onnx
    from edgekit.passes.int8 import Int8Quantizer, Int8Scheme
    from edgekit.passes.openvino import to_openvino
    from edgekit.runtimes import files_runner

    os.environ["YOLO_OFFLINE"] = "1"
    family = FAMILIES["detector"]
    loaded = family.load("yolo11n", LoadOptions())
    work = Path(tempfile.mkdtemp(prefix="edgekit-openvino-yolo-"))
    try:
        calib, held = _split(work, 64)
        samples = family.samples(loaded, sorted(held.glob("*.jpg")), None)
        calibration = family.samples(loaded, sorted(calib.glob("*.jpg")), None).inputs
        with torch.no_grad():
            reference = np.concatenate([loaded.module(torch.from_numpy(batch)).numpy()
                                        for batch in np.array_split(samples.inputs, 16)])
        graph = export_onnx(loaded.module, loaded.input_shape, 17)
        qdq = {}
        for openvino in (False, True):  # an OpenVINO build quantizes only what convs and matmuls read
            quantizer = Int8Quantizer(graph, calibration, Int8Scheme(
                "uint8", "mean-minmax", False, seven_bit_weights="saturating", weighted_inputs_only=openvino),
                None, args.threads)
            quantizer.keep_float(family.int8_float_nodes(quantizer.prepared))
            qdq[openvino] = quantizer.quantize()
        runners = {
            "onnxruntime fp32": files_runner({"model.onnx": graph.SerializeToString()}, "onnx", args.threads),
            "openvino fp32": files_runner(to_openvino(graph), "openvino", args.threads),
            "edgekit int8 qdq, onnxruntime": files_runner({"model.onnx": qdq[False].SerializeToString()}, "onnx",
                                                          args.threads),
            "edgekit int8 qdq, openvino": files_runner(to_openvino(qdq[True]), "openvino", args.threads),
        }
        from ultralytics import YOLO

        checkpoint = work / "yolo11n.pt"
        shutil.copy(loaded.source, checkpoint)
        data = work / "calib.yaml"
        data.write_text((COCO.parents[1] / "data.yaml").read_text().replace("path: .", f"path: {calib.parent}")
                        .replace("images/train2017", "images"))
        folder = Path(YOLO(str(checkpoint)).export(format="openvino", imgsz=640, int8=True, data=str(data),
                                                   fraction=1.0, verbose=False))
        runners["ultralytics openvino int8"] = _OpenVino(next(folder.glob("*.xml")), args.threads)
        scores = {label: family.compare(reference, np.concatenate([runner.run(row[None]) for row in samples.inputs]),
                                        samples.labels) for label, runner in runners.items()}
        rounds = interleaved(runners, samples.inputs[0], args)
    finally:
        shutil.rmtree(work)
    print(f"YOLO11n 640, coco128: 64 calibration images, {len(samples)} scored ({len(samples.labels)} boxes), "
          f"original mAP50-95 {scores['onnxruntime fp32']['map50_95_reference']:.4f}; {args.threads} thread(s), "
          f"host latency measured here, min of {args.rounds} interleaved medians of {args.runs}; edgekit int8 "
          f"layers in 7 bits: {sorted(quantizer.seven_bit_layers())}")
    print(f"{'variant':<34}{'mAP50-95':>9}{'drop pt':>8}{'host ms':>9}")
    for label, values in rounds.items():
        print(f"{label:<34}{scores[label]['map50_95_artifact']:>9.4f}{scores[label]['map50_95_drop_pt']:>8.2f}"
              f"{min(values):>9.2f}")
    ratios = np.array(rounds["edgekit int8 qdq, openvino"]) / np.array(rounds["ultralytics openvino int8"])
    low, middle, high = np.quantile(ratios, [0.25, 0.5, 0.75])
    print(f"edgekit / ultralytics in OpenVINO, round by round: median {middle:.3f} (quartiles {low:.3f}-{high:.3f}, "
          f"{len(ratios)} rounds; below 1: edgekit faster)")


def nncf_openvino(fp32: Any, calibration: np.ndarray) -> dict[str, bytes]:
    """NNCF's post-training quantization of the OpenVINO FP32 model (its defaults), on the same calibration images."""
    import nncf
    import openvino as ov

    from edgekit.passes.openvino import to_openvino

    files = to_openvino(fp32)
    core = ov.Core()
    model = core.read_model(files["model.xml"].decode(), ov.Tensor(np.frombuffer(files["model.bin"], np.uint8)))
    quantized = nncf.quantize(model, nncf.Dataset([row[None] for row in calibration]), subset_size=len(calibration))
    with tempfile.TemporaryDirectory() as folder:
        ov.save_model(quantized, f"{folder}/model.xml", compress_to_fp16=False)
        return {name: Path(folder, name).read_bytes() for name in ("model.xml", "model.bin")}


def interleaved(runners: dict[str, Any], sample: np.ndarray, args: argparse.Namespace) -> dict[str, list[float]]:
    """Each variant's median per round. Rounds interleave the variants, so drift on a shared machine hits every
    variant alike, and every other round runs them in reverse, so none always runs first."""
    medians: dict[str, list[float]] = {label: [] for label in runners}
    for round_ in range(args.rounds):
        for label, runner in list(runners.items())[:: 1 if round_ % 2 == 0 else -1]:
            medians[label].append(statistics.median(runner.time(sample, warmup=5, runs=args.runs)))
    return medians


if __name__ == "__main__":
    main()
