"""Channel pruning keeps what a removed channel carried on average (bias compensation)."""

from __future__ import annotations

import pytest
import torch

from edgekit.passes.prune import prune_channels


def _net_with_a_constant_channel(reader_bias: bool) -> torch.nn.Module:
    """Channel 0 of the first conv has tiny weights and a large bias: a near-constant output the next layer reads."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 4, 1, bias=reader_bias))
    with torch.no_grad():
        net[0].weight[0] *= 1e-3
        net[0].bias[0] = 5.0
        net[2].weight[:, 0] = 0.05
    return net.eval()


@pytest.mark.parametrize("reader_bias", [True, False])  # a reader without a bias (before a batch norm) gets one
def test_the_layer_reading_a_removed_channel_takes_its_mean_into_its_bias(reader_bias: bool) -> None:
    images = torch.randn(16, 3, 12, 12)
    outputs = {}
    for compensate in (False, True):
        net = _net_with_a_constant_channel(reader_bias)
        with torch.no_grad():
            before = net(images)
        record = prune_channels(net, (1, 3, 12, 12), 0.125, keep=[net[2]], images=images if compensate else None)
        assert net[0].out_channels == 7 and net[2].in_channels == 7
        with torch.no_grad():
            outputs[compensate] = (net(images) - before).abs().max().item()
        assert record["compensated_layers"] == (1 if compensate else 0)
    assert outputs[False] > 0.2  # the channel's constant 5 through weights 0.05 is gone
    assert outputs[True] < 0.01  # ... and restored through the bias, up to the channel's tiny fluctuation
