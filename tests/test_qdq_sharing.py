"""OpenVINO's int8 graphs round a value once, above the ops that only move values: pairs move without changing a
number, only where every input and output takes one scale, and the ranges that meet are made one."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from edgekit.passes.export import export_onnx
from edgekit.passes.int8 import QUANTIZABLE, Int8Quantizer, Int8Scheme
from edgekit.passes.qdq_sharing import hoist, share_ranges, sharing_groups

MOVERS = {"Concat", "Split", "Slice", "MaxPool", "Resize"}


def split_concat_graph(b_scale: float) -> onnx.ModelProto:
    """conv -> split -> (a, b); b -> conv; concat(a, b) -> conv: the shape of a YOLO C3k2 block, in QDQ form as
    onnxruntime's quantizer writes it (pairs where convs read). `b_scale`: the scale b is rounded with."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name) for name, shape in
             (("w1", (8, 4, 1, 1)), ("w2", (4, 4, 3, 3)), ("w3", (2, 8, 1, 1)))]
    inits += [numpy_helper.from_array(np.array(value, np.float32), name)
              for name, value in (("s_in", 0.01), ("s", 0.05), ("s_b", b_scale))]
    inits += [numpy_helper.from_array(np.array(128, np.uint8), "z"), numpy_helper.from_array(np.array([4, 4]), "sizes")]

    def pair(tensor: str, scale: str) -> list[onnx.NodeProto]:
        rounded = f"{tensor}_q"
        return [helper.make_node("QuantizeLinear", [tensor, scale, "z"], [rounded], name=f"{tensor}_Q"),
                helper.make_node("DequantizeLinear", [rounded, scale, "z"], [f"{tensor}_dq"], name=f"{tensor}_DQ")]

    nodes = [*pair("x", "s_in"), helper.make_node("Conv", ["x_dq", "w1"], ["c1"], name="conv1"),
             helper.make_node("Split", ["c1", "sizes"], ["a", "b"], axis=1, name="split"),
             *pair("b", "s_b"), helper.make_node("Conv", ["b_dq", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("Concat", ["a", "b_dq"], ["cat"], axis=1, name="concat"),
             *pair("cat", "s"), helper.make_node("Conv", ["cat_dq", "w3"], ["c3"], name="conv3")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, channels, 8, 8])
                               for name, channels in (("c2", 4), ("c3", 2))],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no fusion changes a number
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})


def rounded_by(model: onnx.ModelProto) -> dict[str, str]:
    """What each QuantizeLinear reads -> the op that produced it."""
    producers = {output: node.op_type for node in model.graph.node for output in node.output}
    return {node.input[0]: producers.get(node.input[0], "input") for node in model.graph.node
            if node.op_type == "QuantizeLinear"}


def test_pairs_of_one_scale_move_above_the_concat_and_the_split_without_changing_a_number() -> None:
    model = split_concat_graph(b_scale=0.05)
    x = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    before = run(model, x)
    assert hoist(model) == 2  # the concat's pair moved to its inputs, then the split's to the conv's output
    onnx.checker.check_model(model, full_check=True)
    assert rounded_by(model) == {"x": "input", "c1": "Conv"}  # one rounding of the conv's output, none after
    for expected, got in zip(before, run(model, x), strict=True):
        np.testing.assert_array_equal(got, expected)


def test_a_split_whose_parts_take_different_scales_stays_where_it_is() -> None:
    model = split_concat_graph(b_scale=0.02)
    x = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    before = run(model, x)
    assert hoist(model) == 1  # the concat's pair moves (b is rounded again, to the concat's scale); the split's not
    onnx.checker.check_model(model, full_check=True)
    assert set(rounded_by(model).values()) == {"input", "Split", "DequantizeLinear"}
    for expected, got in zip(before, run(model, x), strict=True):
        np.testing.assert_array_equal(got, expected)


class Block(nn.Module):
    """A C3k2-like block (split, bottleneck with residual, concat) and an SPPF-like pooling concat."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.inner = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.fuse, self.pool_fuse = nn.Conv2d(12, 8, 1), nn.Conv2d(16, 4, 1)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = nn.functional.silu(self.stem(x)).chunk(2, 1)
        y = nn.functional.silu(self.fuse(torch.cat([a, b, b + nn.functional.silu(self.inner(b))], 1)))
        return self.pool_fuse(torch.cat([y, self.pool(y)], 1))


def test_an_openvino_int8_graph_rounds_before_split_concat_and_pool_and_runs_them_in_int8() -> None:
    from edgekit.passes.openvino import to_openvino
    from edgekit.runtimes.openvino import compiled

    torch.manual_seed(0)
    graph = export_onnx(Block().eval(), (1, 3, 16, 16), 17)
    images = np.random.default_rng(0).random((8, 3, 16, 16), dtype=np.float32)
    scheme = Int8Scheme("uint8", "minmax", bias_correction=False, weighted_inputs_only=True)
    quantized = Int8Quantizer(graph, images, scheme, None, 1).quantize()
    assert not MOVERS & set(rounded_by(quantized).values())  # nothing is rounded after an op that only moves values
    ir = to_openvino(quantized)
    runtime = compiled(ir["model.xml"], ir["model.bin"], 1).get_runtime_model()
    precisions = {op.get_rt_info()["layerType"].value: op.get_rt_info()["runtimePrecision"].value
                  for op in runtime.get_ordered_ops()}
    assert precisions["Split"] == precisions["Concatenation"] == precisions["Pooling"] == "u8", precisions


def test_tensors_that_meet_at_a_mover_share_one_range_and_graph_outputs_do_not_join() -> None:
    torch.manual_seed(0)
    prepared = export_onnx(Block().eval(), (1, 3, 16, 16), 17)
    groups = sharing_groups(prepared, QUANTIZABLE, keep_float=())
    producers = {output: node.op_type for node in prepared.graph.node for output in node.output}
    kinds = [sorted({producers.get(name, "input") for name in group}) for group in groups]
    assert ["Add", "Concat", "Mul", "Split"] in kinds or ["Add", "Concat", "Mul", "Slice"] in kinds, kinds
    assert ["Concat", "MaxPool", "Mul"] in kinds, kinds
    ranges = {"data": {name: {"lowest": {"data": [-float(i)]}, "highest": {"data": [float(i)]}}
                       for i, name in enumerate(sorted(set().union(*groups)))}}
    shared = share_ranges(ranges, groups)["data"]
    for group in groups:
        assert len({(shared[name]["lowest"]["data"][0], shared[name]["highest"]["data"][0]) for name in group}) == 1
    # the pooling concat's conv kept float: its concat is no longer quantized, so it shares nothing
    last = [node.name for node in prepared.graph.node if node.op_type == "Conv"][-1]
    assert len(sharing_groups(prepared, QUANTIZABLE, keep_float=(last,))) == len(groups) - 1


@pytest.mark.parametrize("resize_mode", ["nearest", "linear"])
def test_only_nearest_resize_moves_values(resize_mode: str) -> None:
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], mode=resize_mode)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["in", "w"], ["x"]), node, helper.make_node("Conv", ["y", "w2"], ["out"])], "g",
        [helper.make_tensor_value_info("in", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), name) for name in ("w", "w2")]
        + [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]))
    assert bool(sharing_groups(model, QUANTIZABLE, ())) == (resize_mode == "nearest")
