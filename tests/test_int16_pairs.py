"""The int16-pair emulation: which layers' 8-bit weights an x86 kernel without VNNI would saturate."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from edgekit.passes.export import export_onnx
from edgekit.passes.int8 import Int8Quantizer, Int8Scheme
from edgekit.passes.int16_pairs import pair_errors


def test_pairs_of_large_codes_and_weights_of_one_sign_are_clipped_and_small_ones_are_not() -> None:
    eight, seven = np.full((1, 4), 127, np.int8), np.full((1, 4), 63, np.int8)
    scales = np.array([1 / 127]), np.array([1 / 63])
    large = np.full((4, 3), 255, np.int32)  # 255 x 127 x 2 = 64,770: past int16 in every pair
    clipped, changed, share = pair_errors(large, 0, 1 / 255, eight, scales[0], seven, scales[1])
    assert share == 1.0 and clipped > changed
    small = np.full((4, 3), 100, np.int32)  # 100 x 127 x 2 = 25,400: fits
    clipped, changed, share = pair_errors(small, 0, 1 / 255, eight, scales[0], seven, scales[1])
    assert share == 0.0 and clipped == 0.0
    odd = np.full((3, 2), 255, np.int32)  # K padded with the zero point, whose code adds nothing here
    assert pair_errors(odd, 0, 1 / 255, eight[:, :3], scales[0], seven[:, :3], scales[1])[2] == 0.5


def _codes(model: onnx.ModelProto, layer: str) -> np.ndarray:
    producers = {out: node for node in model.graph.node for out in node.output}
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == layer)
    return weights[producers[node.input[1]].input[0]]


def test_the_layer_reading_pixels_takes_7_bit_weights_and_the_rest_keep_8() -> None:
    """A first conv over 0-1 pixels (uint8 codes up to 255, R,G,B neighbours alike) with weights of one sign
    saturates int16 pairs; the second, whose neighbouring input channels meet weights of opposite signs, does not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1)).eval()
    with torch.no_grad():
        model[0].weight.copy_(model[0].weight.abs() + 0.05)  # pixels summed with weights of one sign
        signs = torch.tensor([1.0, -1.0] * 4).view(1, 8, 1, 1)  # pairs (channel 2i, 2i + 1) cancel
        model[2].weight.copy_(model[2].weight.abs() * signs)
    graph = export_onnx(model, (1, 3, 16, 16), 17)
    images = np.random.default_rng(0).uniform(0.6, 1.0, (4, 3, 16, 16)).astype(np.float32)
    quantizer = Int8Quantizer(graph, images, Int8Scheme("uint8", "minmax", False, seven_bit_weights="saturating"),
                              None, 1)
    convs = quantizer.layers()
    assert quantizer.seven_bit_layers() == {convs[0]}
    rows = {row["layer"]: row for row in quantizer.int16_pairs or []}
    assert rows[convs[0]]["pairs_clipped"] > 0.1 and rows[convs[1]]["pairs_clipped"] == 0
    quantized = quantizer.quantize()
    assert np.abs(_codes(quantized, convs[0])).max() <= 64 and np.abs(_codes(quantized, convs[1])).max() == 127
    alone = quantizer.quantize(only=(convs[0],))  # a sensitivity probe quantizes the layer as the build would
    assert np.abs(_codes(alone, convs[0])).max() <= 64
    plain = Int8Quantizer(graph, images, Int8Scheme("uint8", "minmax", False), None, 1)
    assert plain.seven_bit_layers() == set() and np.abs(_codes(plain.quantize(), convs[0])).max() == 127
