from __future__ import annotations

import torch
from torch import nn

from edgekit.passes.analyze import analyze
from edgekit.passes.export import export_onnx
from edgekit.passes.quantize import to_fp16


class ConvLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.depthwise(self.conv(x))).flatten(1))


def test_macs_params_bytes_match_hand_counts() -> None:
    model = ConvLinear().eval()
    analysis = analyze(export_onnx(model, (1, 3, 16, 16), 17))
    conv = 8 * 16 * 16 * (3 * 3 * 3)
    depthwise = 8 * 16 * 16 * (1 * 3 * 3)
    fc = 10 * 8 * 16 * 16
    assert analysis.macs == conv + depthwise + fc
    torch_params = sum(p.numel() for p in model.parameters())
    assert analysis.params == torch_params
    assert analysis.weight_bytes >= 4 * torch_params
    by_op = {layer.op: layer for layer in analysis.layers if layer.macs}
    assert by_op["Gemm"].macs == fc and by_op["Gemm"].params == 10 * 2048 + 10
    # the peak holds at least the largest single activation (8x16x16 fp32) and at most all of them
    assert 8 * 16 * 16 * 4 <= analysis.activation_peak_bytes <= analysis.activation_bytes


def test_fp16_halves_weight_bytes_and_keeps_macs() -> None:
    graph = export_onnx(ConvLinear().eval(), (1, 3, 16, 16), 17)
    fp32, fp16 = analyze(graph), analyze(to_fp16(graph))
    assert fp16.macs == fp32.macs and fp16.params == fp32.params
    assert abs(fp16.weight_bytes - fp32.weight_bytes / 2) < 64
