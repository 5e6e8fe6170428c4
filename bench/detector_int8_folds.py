"""YOLO11n INT8 over coco128 folds: which quantization settings hold on images they were not chosen on.

    .venv/bin/python bench/detector_int8_folds.py [--folds 4] [--settings uint8/mean-minmax uint8/mse ...]

coco128 (sorted by name) is cut into `--folds` folds. For each fold, the 64 images of the folds after it
(cyclically) calibrate and the fold's own images score, so every image is scored once and never by ranges it made.
Each setting is an activation scheme and a range rule (`uint8/mean-minmax`, `int8-symmetric/mse`, ...); its QDQ
graph keeps the detector's decode in float (as every edgekit build does) and nothing else, and is run in
onnxruntime with its graph optimisations (`ort`: integer kernels, what ships), in onnxruntime with none
(`ort-float`: each QuantizeLinear/DequantizeLinear computed in float, the scheme's rounding alone), in OpenVINO
(as edgekit's OpenVINO builds quantize: only the inputs of convs and matmuls), and (`litert`) as edgekit's
full-integer TFLite build for raspberry-pi-5 in LiteRT. `@all` quantizes the weights to 7 bits (-64..63), `@none`
to 8, `@saturating` (the default, as edgekit's x86 builds) 7 bits only where 8 would saturate x86 CPUs without
VNNI (their uint8 x int8 multiply, vpmaddubsw, adds pairs into int16; edgekit/passes/int16_pairs.py). The drop is
the original PyTorch model's mAP50-95 minus the artifact's on the fold, in points; the pooled column scores all
folds' detections together. Telling the float-simulated column from the integer one separates a scheme's error
from a runtime's kernels. A rule ending in `+bc` adds empirical bias correction on 16 of the calibration images
(it runs the model once per layer).
`--ultralytics` adds Ultralytics' own OpenVINO INT8 export (NNCF) of each fold, calibrated on the same images,
run in OpenVINO: the peer, under the same folds. `--nncf` adds `nncf.quantize` (preset MIXED, as Ultralytics calls
it) on the OpenVINO FP32 model of edgekit's graph, the same decode nodes ignored, calibrated on the same images, with
its bias correction (NNCF's default) and without: the other way edgekit could quantize for OpenVINO."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
COCO = REPO.parent / "shared" / "data" / "coco128"
BIAS_IMAGES = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--calib-images", type=int, default=64)
    parser.add_argument("--settings", nargs="+", default=["uint8/mean-minmax", "uint8/minmax", "uint8/mse",
                                                          "int8-symmetric/mean-minmax"])
    parser.add_argument("--runtimes", nargs="+", default=["ort", "ort-float@none", "openvino", "litert"],
                        help="ort, ort-float or openvino, each with @none, @all or @saturating (the default): the "
                        "layers whose weights take 7 bits (-64..63); "
                        "litert (an edgekit TFLite build for raspberry-pi-5, no layer kept in float)")
    parser.add_argument("--ultralytics", action="store_true",
                        help="add Ultralytics' OpenVINO INT8 export of each fold, calibrated on the same images")
    parser.add_argument("--nncf", action="store_true",
                        help="add nncf.quantize on the OpenVINO FP32 model, with and without its bias correction")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if "litert" in args.runtimes and any("+" in setting for setting in args.settings):
        parser.error("+bc is a QDQ graph's bias correction; edgekit's TFLite builds have none: drop litert")
    if not COCO.is_dir():
        raise SystemExit(f"{COCO} is absent: this bench needs the labelled coco128 set")
    os.environ["YOLO_OFFLINE"] = "1"
    import torch

    from edgekit.families.base import LoadOptions
    from edgekit.families.detector import DetectorFamily, detections, mean_average_precision
    from edgekit.passes.export import export_onnx

    torch.set_num_threads(args.threads)
    family = DetectorFamily()
    loaded = family.load("yolo11n", LoadOptions())
    files = sorted((COCO / "images" / "train2017").glob("*.jpg"))
    samples = family.samples(loaded, files, None)
    assert samples.labels is not None
    with torch.no_grad():
        reference = np.concatenate([loaded.module(torch.from_numpy(batch)).numpy()
                                    for batch in np.array_split(samples.inputs, 32)])
    graph = export_onnx(loaded.module, tuple(samples.inputs[:1].shape), 17)
    folds = np.array_split(np.arange(len(samples)), args.folds)
    # each fold's calibration images: the first of the folds after it, cyclically
    calibrating = [np.concatenate([folds[(k + j) % args.folds] for j in range(1, args.folds)])[: args.calib_images]
                   for k in range(args.folds)]
    print(f"YOLO11n, coco128: {len(samples)} images, {len(samples.labels)} boxes, {args.folds} folds of "
          f"{[len(f) for f in folds]}; {args.calib_images} calibration images per fold from the folds after it")

    found: dict[tuple[str, str], np.ndarray] = {}
    for setting in args.settings:
        activations, rule = setting.split("/")
        for runtime in args.runtimes:
            found[setting, runtime] = np.zeros_like(reference)
        for k, fold in enumerate(folds):
            calib = samples.inputs[calibrating[k]]
            start = time.perf_counter()
            onnx_runtimes = [spec for spec in args.runtimes if spec != "litert"]
            for runtime, outputs in _run(family, graph, calib, activations, rule, samples.inputs[fold], onnx_runtimes,
                                         args.threads).items():
                found[setting, runtime][fold] = outputs
            if "litert" in args.runtimes:
                found[setting, "litert"][fold] = _litert([files[i] for i in calibrating[k]],
                                                         [files[i] for i in fold], rule, samples.inputs[fold],
                                                         args.threads)
            print(f"  {setting} fold {k}: {time.perf_counter() - start:.0f} s", flush=True)

    if args.ultralytics:
        found["ultralytics (nncf)", "openvino"] = np.zeros_like(reference)
        for k, fold in enumerate(folds):
            start = time.perf_counter()
            found["ultralytics (nncf)", "openvino"][fold] = _ultralytics(
                loaded.source, [files[i] for i in calibrating[k]], samples.inputs[fold], args.threads)
            print(f"  ultralytics fold {k}: {time.perf_counter() - start:.0f} s", flush=True)

    decode = family.int8_float_nodes(graph)
    for bias_correction in (True, False) if args.nncf else ():
        label = "nncf.quantize" + ("" if bias_correction else ", no bias corr.")
        found[label, "openvino"] = np.zeros_like(reference)
        for k, fold in enumerate(folds):
            found[label, "openvino"][fold] = _nncf(graph, decode, samples.inputs[calibrating[k]], samples.inputs[fold],
                                                   bias_correction, args.threads)

    def drop(outputs: np.ndarray, rows: np.ndarray) -> float:
        truth = samples.labels[np.isin(samples.labels[:, 0], rows)].copy()
        truth[:, 0] = np.searchsorted(rows, truth[:, 0])
        original = mean_average_precision(detections(reference[rows]), truth, len(rows))[0]
        return 100 * (original - mean_average_precision(detections(outputs[rows]), truth, len(rows))[0])

    every = np.arange(len(samples))
    original = mean_average_precision(detections(reference), samples.labels, len(samples))[0]
    print(f"\noriginal mAP50-95 {original:.4f} (all {len(samples)} images); mAP50-95 points lost per fold, then "
          "pooled (ort: integer kernels; ort-float: QDQ computed in float; @: which layers' weights take 7 bits)")
    print(f"{'setting':30s} {'runtime':10s} " + " ".join(f"{'fold ' + str(k):>7s}" for k in range(args.folds))
          + f" {'mean':>7s} {'pooled':>7s}")
    for (setting, runtime), outputs in found.items():
        drops = [drop(outputs, fold) for fold in folds]
        print(f"{setting:30s} {runtime:10s} " + " ".join(f"{d:7.2f}" for d in drops)
              + f" {np.mean(drops):7.2f} {drop(outputs, every):7.2f}")


def _litert(calib: list[Path], scored: list[Path], rule: str, inputs: np.ndarray, threads: int) -> np.ndarray:
    """The fold's outputs in LiteRT from edgekit's full-integer TFLite build (raspberry-pi-5), calibrated on `calib`
    with `rule`; no layer is kept in float, so the held-out fold chooses nothing."""
    import sys

    import edgekit
    from edgekit.runtimes.litert import LiteRtRunner

    sys.path.insert(0, str(Path(__file__).parent))
    from detector import yolo_folder  # the detector bench's YOLO-layout folders of coco128 images

    with tempfile.TemporaryDirectory(prefix="edgekit-folds-") as work:
        folders = [yolo_folder(Path(work) / "calib", calib), yolo_folder(Path(work) / "eval", scored)]
        result = edgekit.build("yolo11n", "raspberry-pi-5", precision="int8", calib=folders[0], eval=folders[1],
                               out=Path(work) / "out", quiet=True, use_cache=False,
                               overrides={"quantize.calibration": rule, "quantize.max_float_layers": 0,
                                          "verify.threads": threads})
        artifact = (result.out / result.report["artifact"]["file"]).read_bytes()
    return LiteRtRunner(artifact, threads).run(inputs)


def _ultralytics(checkpoint: str, calib: list[Path], inputs: np.ndarray, threads: int) -> np.ndarray:
    """The fold's outputs in OpenVINO from Ultralytics' `export(format="openvino", int8=True)` calibrated on
    `calib` (NNCF, with Ultralytics' own settings and ignored scope)."""
    import shutil
    import sys

    from ultralytics import YOLO

    from edgekit.runtimes.openvino import OpenVinoRunner

    sys.path.insert(0, str(Path(__file__).parent))
    from detector import yolo_folder

    with tempfile.TemporaryDirectory(prefix="edgekit-folds-ul-") as work:
        images = yolo_folder(Path(work) / "calib", calib)
        data = Path(work) / "calib.yaml"
        data.write_text((COCO / "data.yaml").read_text().replace("path: .", f"path: {images.parent}")
                        .replace("images/train2017", "images"))
        shutil.copy(checkpoint, Path(work) / "yolo11n.pt")
        folder = Path(YOLO(str(Path(work) / "yolo11n.pt")).export(format="openvino", imgsz=640, int8=True,
                                                                  data=str(data), fraction=1.0, verbose=False))
        xml = next(folder.glob("*.xml"))
        return OpenVinoRunner(xml.read_bytes(), xml.with_suffix(".bin").read_bytes(), threads).run(inputs)


def _nncf(graph: Any, ignored: list[str], calib: np.ndarray, inputs: np.ndarray, bias_correction: bool,
          threads: int) -> np.ndarray:
    """The fold's outputs in OpenVINO from `nncf.quantize` (preset MIXED) on the OpenVINO FP32 model of `graph`,
    `ignored` (the decode) left float, calibrated on every image of `calib`."""
    import io

    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    from edgekit.runtimes.openvino import OpenVinoRunner

    model = ov.convert_model(io.BytesIO(graph.SerializeToString()))
    names = {op.get_friendly_name() for op in model.get_ordered_ops()}
    quantized = nncf.quantize(model, nncf.Dataset(list(calib), lambda image: image[None]),
                              preset=nncf.QuantizationPreset.MIXED, subset_size=len(calib),
                              ignored_scope=nncf.IgnoredScope(names=[n for n in ignored if n in names], validate=False),
                              advanced_parameters=AdvancedQuantizationParameters(
                                  disable_bias_correction=not bias_correction))
    with tempfile.TemporaryDirectory(prefix="edgekit-folds-nncf-") as work:
        xml = Path(work) / "model.xml"
        ov.save_model(quantized, str(xml), compress_to_fp16=False)
        return OpenVinoRunner(xml.read_bytes(), xml.with_suffix(".bin").read_bytes(), threads).run(inputs)


def _run(family: Any, graph: Any, calib: np.ndarray, activations: str, rule: str, inputs: np.ndarray,
         runtimes: list[str], threads: int) -> dict[str, np.ndarray]:
    """The fold's outputs in each runtime from one setting's QDQ graph (the decode kept float)."""
    import onnxruntime as ort

    from edgekit.passes.int8 import Int8Quantizer, Int8Scheme
    from edgekit.passes.openvino import to_openvino
    from edgekit.runtimes.onnxruntime import OnnxRuntimeRunner
    from edgekit.runtimes.openvino import OpenVinoRunner

    results = {}
    def weights(spec: str) -> str:
        return spec.partition("@")[2] or "saturating"

    for mode, openvino in sorted({(weights(spec), spec.startswith("openvino")) for spec in runtimes}):
        base, _, extra = rule.partition("+")
        scheme = Int8Scheme(activations, base, extra == "bc", seven_bit_weights=mode,  # type: ignore[arg-type]
                            weighted_inputs_only=openvino)
        quantizer = Int8Quantizer(graph, calib, scheme, None, threads, BIAS_IMAGES)
        quantizer.keep_float(family.int8_float_nodes(quantizer.prepared))
        model = quantizer.quantize()
        for spec in runtimes:
            runtime = spec.partition("@")[0]
            if (weights(spec), runtime == "openvino") != (mode, openvino):
                continue
            if runtime == "openvino":
                files = to_openvino(model)
                runner: Any = OpenVinoRunner(files["model.xml"], files["model.bin"], threads)
            else:
                runner = OnnxRuntimeRunner(model.SerializeToString(), threads)
                if runtime == "ort-float":
                    options = ort.SessionOptions()
                    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                    options.intra_op_num_threads = threads
                    runner.session = ort.InferenceSession(model.SerializeToString(), options,
                                                          providers=["CPUExecutionProvider"])
            results[spec] = runner.run(inputs)
    return results


if __name__ == "__main__":
    main()
