"""YOLO11n on coco128, side by side in one run: edgekit FP32 and INT8 (ONNX, TFLite) against Ultralytics' own exports.

    .venv/bin/pip install -e '.[bench]' && .venv/bin/python bench/detector.py [--threads 1]

Every variant runs on the same letterboxed coco128 images and is scored by the same host NMS and
pycocotools mAP (edgekit's detector family), against the same original PyTorch model; latency is
measured here, interleaved, min of several medians. coco128 is split: its first `--calib-images`
images calibrate every INT8 variant (edgekit's and the peer's) and are what pruning's statistics and
distillation see; the rest are the held-out images every variant is scored on. Peers: Ultralytics
`export(format="onnx")` run in onnxruntime, and its two INT8 exports: `export(format="openvino", int8=True)`
(NNCF) run in OpenVINO, and `export(format="tflite", int8=True)` (which Ultralytics 8.4 turns into its
LiteRT export: litert-torch and ai-edge-quantizer, boxes divided by the input size) run in LiteRT.
edgekit's TFLite row is built for the Raspberry Pi 5 profile (LiteRT) and its Jetson row for the Jetson Orin
Nano (symmetric int8 activations, as TensorRT takes them); both run here (LiteRT, onnxruntime).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
COCO = REPO.parent / "shared" / "data" / "coco128"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prune", type=float, nargs="*", default=[0.3],
                        help="pruning ratios of the pruned rows (none: no pruned row)")
    parser.add_argument("--distill-steps", type=int, default=300)
    parser.add_argument("--distill-seconds", type=float, default=300)
    parser.add_argument("--calib-images", type=int, default=64, help="coco128 images that calibrate; the rest score")
    args = parser.parse_args()
    if not COCO.is_dir():
        raise SystemExit(f"{COCO} is absent: this bench needs the labelled coco128 set")
    os.environ["YOLO_OFFLINE"] = "1"
    import edgekit
    from edgekit.families.base import LoadOptions
    from edgekit.families.detector import DetectorFamily
    from edgekit.runtimes.litert import LiteRtRunner
    from edgekit.runtimes.onnxruntime import OnnxRuntimeRunner

    work = Path(tempfile.mkdtemp(prefix="edgekit-detector-bench-"))
    calib, images = _split(work, args.calib_images)
    family = DetectorFamily()
    loaded = family.load("yolo11n", LoadOptions())
    samples = family.samples(loaded, sorted(images.glob("*.jpg")), None)
    import torch

    torch.set_num_threads(args.threads)
    with torch.no_grad():
        reference = np.concatenate([loaded.module(torch.from_numpy(batch)).numpy()
                                    for batch in np.array_split(samples.inputs, 16)])

    variants: dict[str, dict[str, Any]] = {}

    def edgekit_build(name: str, target: str = "x86-64", **options: Any) -> None:
        start = time.perf_counter()
        options.setdefault("overrides", {"verify.threads": args.threads})
        result = edgekit.build("yolo11n", target, eval=images, calib=calib,
                               out=work / name.replace(" ", "-").replace("%", ""), quiet=True, **options)
        path = result.out / result.report["artifact"]["file"]
        runner = LiteRtRunner if path.suffix == ".tflite" else OnnxRuntimeRunner
        variants[name] = {"runner": runner(path.read_bytes(), args.threads), "bytes": path.stat().st_size,
                          "build_s": time.perf_counter() - start, "report": result.report,
                          "macs": result.report["analysis"]["reference"]["macs"]}

    roadside = REPO / "examples" / "roadside" / "recipe.toml"
    edgekit_build("edgekit fp32")
    edgekit_build("edgekit int8 onnx", recipe=roadside)
    edgekit_build("edgekit int8 onnx, jetson", "jetson-orin-nano", recipe=roadside)  # symmetric QDQ for TensorRT
    edgekit_build("edgekit int8 tflite", "raspberry-pi-5", recipe=roadside)
    pruned_rows = [f"edgekit pruned {ratio:.0%} + distilled + int8" for ratio in args.prune]
    for name, ratio in zip(pruned_rows, args.prune, strict=True):
        edgekit_build(name, precision="int8", overrides={
            "verify.threads": args.threads, "prune.ratio": ratio, "distill.steps": args.distill_steps,
            "distill.seconds": args.distill_seconds})

    from ultralytics import YOLO

    checkpoint = work / "yolo11n.pt"
    shutil.copy(loaded.source, checkpoint)
    start = time.perf_counter()
    exported = Path(YOLO(str(checkpoint)).export(format="onnx", imgsz=640, simplify=False, verbose=False))
    variants["ultralytics onnx"] = {"runner": OnnxRuntimeRunner(exported.read_bytes(), args.threads),
                                    "bytes": exported.stat().st_size, "build_s": time.perf_counter() - start}
    data = work / "calib.yaml"  # the peers calibrate on the same images as edgekit
    data.write_text((COCO / "data.yaml").read_text().replace("path: .", f"path: {calib.parent}")
                    .replace("images/train2017", "images"))
    try:
        start = time.perf_counter()
        folder = Path(YOLO(str(checkpoint)).export(format="openvino", imgsz=640, int8=True, data=str(data),
                                                   fraction=1.0, verbose=False))
        variants["ultralytics openvino int8"] = {
            "runner": _OpenVino(next(folder.glob("*.xml")), args.threads),
            "bytes": sum(f.stat().st_size for f in folder.glob("*.bin")), "build_s": time.perf_counter() - start}
    except Exception as err:  # the peer's own failure is a result, reported as such
        print(f"ultralytics openvino int8: not run ({type(err).__name__}: {err})")
    try:
        start = time.perf_counter()
        path = Path(YOLO(str(checkpoint)).export(format="tflite", imgsz=640, int8=True, data=str(data),
                                                 fraction=1.0, verbose=False))
        variants["ultralytics tflite int8"] = {"runner": _UltralyticsLiteRt(path, args.threads),
                                               "bytes": path.stat().st_size, "build_s": time.perf_counter() - start}
    except Exception as err:
        print(f"ultralytics tflite int8: not run ({type(err).__name__}: {err})")

    rows = {}
    for name, variant in variants.items():
        outputs = np.concatenate([variant["runner"].run(row[None]) for row in samples.inputs])
        rows[name] = family.compare(reference, outputs, samples.labels)
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):  # interleaved: every variant sees the same machine state
        for name, variant in variants.items():
            timings[name].append(statistics.median(variant["runner"].time(samples.inputs[0], 3, 15)))
    original = rows["edgekit fp32"]["map50_95_reference"]
    print(f"\nYOLO11n on coco128's last {len(samples)} images ({len(samples.labels)} boxes; the first "
          f"{args.calib_images} calibrate); original PyTorch mAP50-95 "
          f"{original:.4f}; host: {args.threads} thread(s), latency measured here, min of {args.repeats} "
          "interleaved medians")
    print(f"{'variant':38s} {'mAP50-95':>9s} {'drop pt':>8s} {'mAP50':>7s} {'GMACs':>6s} {'MB':>6s} "
          f"{'host ms':>8s} {'build s':>8s}")
    for name, metrics in rows.items():
        variant = variants[name]
        macs = f"{variant['macs'] / 1e9:6.2f}" if "macs" in variant else f"{'-':>6s}"
        print(f"{name:38s} {metrics['map50_95_artifact']:9.4f} {metrics['map50_95_drop_pt']:8.2f} "
              f"{metrics['map50_artifact']:7.4f} {macs} {variant['bytes'] / 1e6:6.2f} {min(timings[name]):8.2f} "
              f"{variant['build_s']:8.1f}")
    for name in pruned_rows:
        pruning, taught = variants[name]["report"]["pruning"], variants[name]["report"]["distillation"]
        print(f"{name}: {pruning['macs_before'] / 1e9:.2f} -> {pruning['macs_after'] / 1e9:.2f} GMACs "
              f"({pruning['method']}); distillation: {taught['steps']} steps in {taught['seconds']} s, probe loss "
              f"{taught['probe_loss_before']:.4g} -> {taught['probe_loss_after']:.4g}")
    for ours, peer in (("edgekit int8 onnx", "ultralytics openvino int8"), ("edgekit int8 tflite",
                                                                           "ultralytics tflite int8")):
        if peer in rows:
            gain = rows[ours]["map50_95_artifact"] - rows[peer]["map50_95_artifact"]
            print(f"{ours} vs {peer}: mAP50-95 {gain:+.4f}, speed {min(timings[peer]) / min(timings[ours]):.2f}x")
    best = {side: max((name for name in rows if name.startswith(side) and "int8" in name and "pruned" not in name),
                      key=lambda name: rows[name]["map50_95_artifact"], default=None) for side in ("edgekit", "ultra")}
    if best["ultra"]:
        print(f"best int8: {best['edgekit']} {rows[best['edgekit']]['map50_95_artifact']:.4f} vs {best['ultra']} "
              f"{rows[best['ultra']]['map50_95_artifact']:.4f}")
    shutil.rmtree(work, ignore_errors=True)


def _split(work: Path, calib_images: int) -> tuple[Path, Path]:
    """coco128 as two YOLO-layout folders (images/ beside labels/): its first `calib_images` images, and the rest."""
    files = sorted((COCO / "images" / "train2017").glob("*.jpg"))
    return yolo_folder(work / "calib", files[:calib_images]), yolo_folder(work / "eval", files[calib_images:])


def yolo_folder(root: Path, images: list[Path]) -> Path:
    """coco128 `images` linked into a YOLO-layout folder at `root` (images/ beside labels/); its images/ folder."""
    for kind in ("images", "labels"):
        (root / kind).mkdir(parents=True)
    for image in images:
        (root / "images" / image.name).symlink_to(image)
        label = COCO / "labels" / "train2017" / f"{image.stem}.txt"
        if label.is_file():
            (root / "labels" / label.name).symlink_to(label)
    return root / "images"


class _UltralyticsLiteRt:
    """Ultralytics' LiteRT export behind the runner interface: NCHW input as traced, boxes scaled back to pixels
    (its export divides them by the input size so that they share the int8 output's scale with the scores)."""

    def __init__(self, path: Path, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_content=path.read_bytes(), num_threads=threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]["index"]
        self.output = self.interpreter.get_output_details()[0]["index"]
        self.size = self.interpreter.get_input_details()[0]["shape"][-1]

    def _invoke(self, sample: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self.input, sample[None])
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output)

    def run(self, inputs: np.ndarray) -> np.ndarray:
        outputs = np.concatenate([self._invoke(row) for row in inputs])
        outputs[:, :4] *= self.size
        return outputs

    def time(self, sample: np.ndarray, warmup: int, runs: int) -> list[float]:
        from edgekit.runtimes.base import time_calls

        return time_calls(lambda: self._invoke(sample), warmup, runs)


class _OpenVino:
    """An OpenVINO IR behind the runner interface (run, time)."""

    def __init__(self, xml: Path, threads: int) -> None:
        import openvino as ov

        self.compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_NUM_THREADS": threads})
        self.request = self.compiled.create_infer_request()

    def run(self, inputs: np.ndarray) -> np.ndarray:
        return np.concatenate([self.request.infer({0: row[None]})[self.compiled.output(0)] for row in inputs])

    def time(self, sample: np.ndarray, warmup: int, runs: int) -> list[float]:
        from edgekit.runtimes.base import time_calls

        return time_calls(lambda: self.request.infer({0: sample[None]}), warmup, runs)


if __name__ == "__main__":
    main()
