"""Layer-wise refit of full-integer TFLite: im2col matches LiteRT's convolutions, GPTQ rounds better than nearest,
refits are patched in place, and one that makes the model's output worse is undone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgekit.passes import litert_refit, tflite


class ConvChain(nn.Module):
    """Every layer kind the refit handles, no activations: each output is its layer's pre-activation."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.strided = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.project = nn.Conv2d(8, 6, 1)
        self.classify = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.project(self.strided(self.depthwise(self.stem(x)))).mean((2, 3)))


@pytest.fixture(scope="module")
def chain() -> bytes:
    torch.manual_seed(0)
    return tflite.convert_tflite(ConvChain().eval(), (1, 3, 16, 16))


def _images(count: int) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(count, 16, 16, 3)).astype(np.float32)


def _layers(model: bytes) -> tuple[list[litert_refit.Layer], object]:
    probe = tflite._every_tensor(model)
    names = {t["index"]: t["name"] for t in probe.get_tensor_details()}
    return litert_refit.layers_of(model, names, probe._get_ops_details()), probe


def test_patches_reproduce_each_litert_layer(chain: bytes) -> None:
    layers, probe = _layers(chain)
    assert [layer.kind for layer in layers] == ["CONV_2D", "DEPTHWISE_CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D",
                                                "FULLY_CONNECTED"]
    (image,) = _images(1)
    for layer in layers:
        x, y = next(tflite._tensor_stream(chain, [layer.input, layer.output], image[None]))
        weight, bias = probe.get_tensor(layer.weight), probe.get_tensor(layer.bias)
        if layer.kind == "FULLY_CONNECTED":
            kernel, rows = (1, 1), weight
        elif layer.depthwise:
            kernel, rows = weight.shape[1:3], weight.reshape(-1, weight.shape[-1]).T
        else:
            kernel, rows = weight.shape[1:3], weight.reshape(weight.shape[0], -1)
        columns = litert_refit.patches(layer, x, kernel)
        if layer.depthwise:
            computed = torch.einsum("rgi,gi->rg", columns, torch.from_numpy(rows).double())
        else:
            computed = columns[:, 0] @ torch.from_numpy(rows).double().T
        np.testing.assert_allclose((computed + torch.from_numpy(bias).double()).numpy(),
                                   y.reshape(-1, y.shape[-1]), rtol=1e-4, atol=1e-4)


def test_gptq_rounding_keeps_codes_in_range_and_beats_nearest() -> None:
    torch.manual_seed(0)
    inputs = torch.randn(400, 24, dtype=torch.float64) @ torch.randn(24, 24, dtype=torch.float64)  # correlated
    inputs = torch.cat([inputs, torch.ones(400, 1, dtype=torch.float64)], 1)
    weights = torch.randn(10, 25, dtype=torch.float64)
    gram = (inputs.T @ inputs)[None]
    codes, scales, bias = litert_refit.round_int8(weights, gram)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) == 127 and int(codes.min()) >= -127
    gptq = torch.cat([codes.double() * scales[:, None], bias[:, None]], 1)
    nearest = torch.cat([torch.round(weights[:, :-1] / scales[:, None]) * scales[:, None], weights[:, -1:]], 1)
    error = {name: float(((inputs @ (w - weights).T) ** 2).sum()) for name, w in (("gptq", gptq),
                                                                                 ("nearest", nearest))}
    assert error["gptq"] < error["nearest"]


def test_depthwise_solve_recovers_weights_from_noisy_inputs() -> None:
    """Per channel, least squares on the integer inputs finds weights that undo a known input distortion."""
    torch.manual_seed(0)
    real = torch.randn(500, 3, 4, dtype=torch.float64)
    integer = real * 0.5  # the integer path sees every input at half its size
    target = torch.randn(3, 5, dtype=torch.float64)
    sums = litert_refit.moments(integer, real)
    solved = litert_refit.solve(sums, target, ridge=1e-9)
    np.testing.assert_allclose(solved[:, :4].numpy(), 2 * target[:, :4].numpy(), rtol=1e-5)
    np.testing.assert_allclose(solved[:, 4].numpy(), target[:, 4].numpy(), atol=1e-6)


def test_refit_patches_the_flatbuffer_and_undoes_a_refit_that_hurts(chain: bytes) -> None:
    from ai_edge_quantizer import quantizer, recipe

    images = _images(10)
    engine = quantizer.Quantizer(chain, recipe.static_wi8_ai8())
    quantized = bytes(engine.quantize(engine.calibrate({tflite.SIGNATURE: [
        {tflite._input_name(chain): images[i : i + 1]} for i in range(len(images))]})).quantized_model)
    refitted = tflite._refit(quantized, chain, images, tflite._output_error(chain, images.transpose(0, 3, 1, 2)),
                             iter)
    assert len(refitted) == len(quantized) and refitted != quantized
    assert tflite.io_details(refitted) == tflite.io_details(quantized)  # layout and I/O quantization unchanged

    layers, probe = _layers(quantized)
    untouched = bytearray(quantized)
    calls = iter(range(100))  # every refit reports a larger output error than the one before
    kept = litert_refit.refit(untouched, lambda layer: (probe.get_tensor(layer.weight).astype(np.float32),
                                                        np.zeros(probe.get_tensor(layer.bias).shape, np.float32)),
                              lambda layer: ((x[0], x[0]) for x in tflite._tensor_stream(quantized, [layer.input],
                                                                                         images)),
                              layers, lambda layer: 1.0, lambda model: float(next(calls)))
    assert kept == 0 and bytes(untouched) == quantized


def test_refit_brings_int8_outputs_closer_to_float(tiny_model: nn.Module, photos: Path) -> None:
    from edgekit.families.base import LoadOptions
    from edgekit.families.classifier import ClassifierFamily
    from edgekit.runtimes.litert import LiteRtRunner

    family = ClassifierFamily()
    loaded = family.load(tiny_model, LoadOptions(input_size=32))
    images = family.samples(loaded, sorted(photos.iterdir()), None).inputs
    calibration, held_out = images, np.ascontiguousarray(images[..., ::-1])  # the mirrored photos score
    float_model = tflite.convert_tflite(tiny_model, (1, 3, 32, 32))
    refitted = tflite.tflite_precision(float_model, "int8", calibration)
    plain = tflite.tflite_precision(float_model, "int8", calibration, tflite.Int8Fit(refit=False))
    reference = LiteRtRunner(float_model, 1).run(held_out)
    error = {name: float(np.mean((LiteRtRunner(model, 1).run(held_out) - reference) ** 2))
             for name, model in (("refitted", refitted), ("plain", plain))}
    assert error["refitted"] < error["plain"]


def test_range_search_keeps_the_factor_that_lowers_the_output_error() -> None:
    """Each range is tried at every factor, in turn, on top of the ranges already chosen, sweep after sweep until
    one changes nothing."""
    tried: list[dict[str, tuple[float, float]]] = []

    def quantize(bounds: dict[str, tuple[float, float]]) -> bytes:
        tried.append(bounds)
        return json.dumps(bounds).encode()

    def output_error(model: bytes) -> float:  # lowest with "a" at 0.8 of its range and "b" unchanged
        bounds = json.loads(model)
        return abs(bounds["a"][1] - 4.0) + abs(bounds["b"][1] - 2.0)

    start = {"a": (0.0, 5.0), "b": (-1.0, 2.0)}
    found = tflite._searched_ranges(quantize, start, output_error, tflite.RANGE_SWEEPS, lambda items, _what: items)
    assert {name: tuple(bound) for name, bound in found.items()} == {"a": (0.0, 4.0), "b": (-1.0, 2.0)}
    assert len(tried) == 1 + 2 * len(start) * len(tflite.RANGE_FACTORS)  # the second sweep changes nothing: done
