"""Channel pruning keeps what a removed channel carried on average (bias compensation)."""

from __future__ import annotations

import copy

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


def test_reconstruction_brings_a_pruned_network_closer_to_the_original() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 4, 1)).eval()
    images = torch.randn(16, 3, 12, 12)
    with torch.no_grad():
        wanted = net(images)
    errors = {}
    for rebuild in (False, True):
        pruned = copy.deepcopy(net)
        record = prune_channels(pruned, (1, 3, 12, 12), 0.5, keep=[pruned[4]], images=images, rebuild=rebuild)
        assert pruned[2].in_channels == 8 and pruned[4].in_channels == 8
        with torch.no_grad():
            errors[rebuild] = float((pruned(images) - wanted).pow(2).mean())
        assert (record["reconstruction"] is not None) == rebuild
    assert errors[True] < 0.8 * errors[False]  # 0.68 here: random channels share little to absorb


def test_distillation_that_makes_the_student_worse_on_held_out_inputs_is_undone() -> None:
    from edgekit.passes.distill import distill, mse

    torch.manual_seed(0)
    teacher = _net_with_a_constant_channel(True)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[2].weight.mul_(0.9)
    start = {name: value.clone() for name, value in student.state_dict().items()}
    images = torch.randn(16, 3, 12, 12)
    outcome = {}
    for lr in (1e-3, 1e3):  # a sane step, and one that blows the student up
        student.load_state_dict(start)
        student.requires_grad_(True)  # distill freezes the student when it is done
        done = distill(student, teacher, images, lambda m, x: [m(x)], loss=mse, steps=10, seconds=60, lr=lr,
                       batch=4, seed=0, progress=lambda xs, _n: xs)
        assert done["probe_held_out"] and done["samples"] == 12
        outcome[lr] = done
    assert not outcome[1e-3]["reverted"] and outcome[1e-3]["probe_loss_after"] < outcome[1e-3]["probe_loss_before"]
    assert outcome[1e3]["reverted"] and outcome[1e3]["probe_loss_after"] > outcome[1e3]["probe_loss_before"]
    assert all(torch.equal(value, start[name]) for name, value in student.state_dict().items())


def test_recorded_outputs_survive_an_in_place_activation_after_them() -> None:
    from edgekit.passes.reconstruct import recorded

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.SiLU(inplace=True)).eval()  # a fused Conv + SiLU
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        wanted = net[0](x)
    assert torch.equal(recorded(net, x, ["0"], [])["0", True], wanted)  # the conv's output, not the SiLU's
