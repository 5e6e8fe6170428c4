"""The device model against measurement on this host: ten CNNs, fp32 and INT8, estimated and measured.

    .venv/bin/python bench/estimate_validate.py [--threads 1] [--out /tmp/edgekit-validate] [--other-tools]

Exports torchvision architectures (random weights: latency does not depend on them) to ONNX, quantizes
each with edgekit's INT8 quantizer, and runs `edgekit estimate --validate` over all of them: the host
profile comes from single-kernel microbenchmarks, never from these models. Prints the per-model error
and the median absolute error; latency is `measured: host` and `estimated` side by side.
`--other-tools` adds each architecture's INT8 graph from onnxruntime's `quantize_static` at its defaults and
from NNCF's `quantize` (both calibrated on the same 4 random inputs) and prints the median error per tool: graphs
edgekit did not make, whose QDQ patterns onnxruntime may not fuse.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

TOOLS = {"-int8": "edgekit int8", "-ortq": "onnxruntime quantize_static", "-nncf": "nncf quantize"}
ARCHS = ["mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "mnasnet1_0",
         "shufflenet_v2_x1_0", "squeezenet1_1", "regnet_y_400mf", "resnet18", "resnet50"]


def export_all(folder: Path, other_tools: bool = False) -> list[Path]:
    import onnx
    import torch
    import torchvision

    from edgekit.passes.export import export_onnx
    from edgekit.passes.int8 import Int8Quantizer, Int8Scheme

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for arch in ARCHS:
        fp32, int8 = folder / f"{arch}.onnx", folder / f"{arch}-int8.onnx"
        if not fp32.exists():
            torch.manual_seed(0)
            graph = export_onnx(torchvision.models.get_model(arch).eval(), (1, 3, 224, 224), 17)
            onnx.save(graph, fp32)
        if not int8.exists():
            calibration = np.random.default_rng(0).normal(0, 1, (4, 3, 224, 224)).astype(np.float32)
            scheme = Int8Scheme("uint8", calibration="minmax", bias_correction=False)
            onnx.save(Int8Quantizer(onnx.load(fp32), calibration, scheme, None, 2).quantize(), int8)
        paths += [fp32, int8]
        if other_tools:
            paths += _other_tools(fp32)
    return paths


def _other_tools(fp32: Path) -> list[Path]:
    """`fp32`'s INT8 graphs by onnxruntime's quantize_static (its defaults: QDQ, uint8 activations, int8 per-tensor
    weights, MinMax) and by NNCF's quantize (its ONNX defaults), each calibrated on the same 4 random inputs."""
    import nncf
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    inputs = [np.random.default_rng(i).normal(0, 1, (1, 3, 224, 224)).astype(np.float32) for i in range(4)]
    name = onnx.load(fp32).graph.input[0].name
    ortq, nncfq = fp32.with_name(f"{fp32.stem}-ortq.onnx"), fp32.with_name(f"{fp32.stem}-nncf.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rows = iter({name: x} for x in inputs)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.rows, None)

    if not ortq.exists():
        quantize_static(str(fp32), str(ortq), Reader())
    if not nncfq.exists():
        onnx.save(nncf.quantize(onnx.load(fp32), nncf.Dataset([{name: x} for x in inputs]), subset_size=4), nncfq)
    return [ortq, nncfq]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="/tmp/edgekit-validate", help="where the exported models are kept")
    parser.add_argument("--other-tools", action="store_true",
                        help="add INT8 graphs from onnxruntime's quantize_static and NNCF (pip install -e '.[bench]')")
    args = parser.parse_args()
    paths = export_all(Path(args.out), args.other_tools)
    from edgekit.api import estimate

    rows = estimate(list(map(str, paths)), None, validate=True, threads=args.threads,
                    recalibrate=True)["validation"]["models"]
    print(f"\n{args.threads} thread(s): estimated (host profile from microbenchmarks) vs measured: host")
    groups: dict[str, list[float]] = {}
    for row in rows:
        stem = Path(row["artifact"]).stem
        tool = next((label for suffix, label in TOOLS.items() if stem.endswith(suffix)), "fp32")
        groups.setdefault(tool, []).append(abs(row["error"]))
        print(f"  {stem:<32} {row['estimated_ms']:>9.2f} ms est {row['measured_ms']:>9.2f} ms meas "
              f"{100 * row['error']:>+7.1f}%")
    for tool, errors in groups.items():
        print(f"median absolute error, {tool:<28} {len(errors):>3} models  {100 * float(np.median(errors)):5.1f}%")

if __name__ == "__main__":
    main()
