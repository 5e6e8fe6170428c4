"""The device model against measurement on this host: ten CNNs, fp32 and INT8, estimated and measured.

    .venv/bin/python bench/estimate_validate.py [--threads 1] [--out /tmp/edgekit-validate]

Exports torchvision architectures (random weights: latency does not depend on them) to ONNX, quantizes
each with edgekit's INT8 quantizer, and runs `edgekit estimate --validate` over all of them: the host
profile comes from single-kernel microbenchmarks, never from these models. Prints the per-model error
and the median absolute error; latency is `measured: host` and `estimated` side by side.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ARCHS = ["mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "mnasnet1_0",
         "shufflenet_v2_x1_0", "squeezenet1_1", "regnet_y_400mf", "resnet18", "resnet50"]


def export_all(folder: Path) -> list[Path]:
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
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="/tmp/edgekit-validate", help="where the exported models are kept")
    args = parser.parse_args()
    paths = export_all(Path(args.out))
    from edgekit.cli import main as edgekit

    edgekit(["estimate", *map(str, paths), "--validate", "--threads", str(args.threads), "--recalibrate"])


if __name__ == "__main__":
    main()
