"""`edgekit diff`: an artifact's intermediate tensors against the original's, matched by the exporter's scopes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgekit.data import file_sha256
from edgekit.passes.export import export_onnx
from edgekit.verify.diff import DEPARTS, layer_diff, summary

from .test_levels import _images
from .test_report_html import assert_page


def test_an_exact_export_matches_every_block_and_a_changed_block_is_found(tiny_blocks: torch.nn.Module) -> None:
    graph = export_onnx(tiny_blocks, (1, 3, 32, 32), 17)
    inputs = _images(3)
    rows = layer_diff(tiny_blocks, graph.SerializeToString(), "onnx", inputs, 1)
    layers = [row["layer"] for row in rows]
    assert {"features.3", "features.3.conv", "features.4", "features.4.conv.1", "features.5"} <= set(layers)
    assert layers.index("features.3") < layers.index("features.4") < layers.index("features.5")  # graph order
    assert all(row["rel_error"] < 1e-4 and row["cosine"] > 0.9999 for row in rows)
    assert summary(rows)["first_departure"] is None

    # the projection of block 4 scaled by 1.5 in the artifact: blocks 3 stay exact, 4 departs, 5 follows it
    changed = onnx.ModelProto()
    changed.CopyFrom(graph)
    projection = next(node for node in changed.graph.node
                      if node.op_type == "Conv" and node.name.startswith("/features/features.4/conv/conv.2"))
    for initializer in changed.graph.initializer:
        if initializer.name in projection.input[1:]:  # weight and bias (its batch norm folded in)
            initializer.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(initializer) * 1.5, initializer.name))
    rows = {row["layer"]: row for row in layer_diff(tiny_blocks, changed.SerializeToString(), "onnx", inputs, 1)}
    assert rows["features.3"]["rel_error"] < 1e-4
    assert rows["features.4"]["rel_error"] == pytest.approx(0.5, rel=0.05)  # a projection scaled by 1.5, no residual
    assert rows["features.5"]["rel_error"] >= DEPARTS
    found = summary(list(rows.values()))
    assert found["first_departure"] == "features.4" and found["worst"] in {"features.4", "features.5"}


def test_pruned_layers_are_skipped_and_block_boundaries_compared(tiny_blocks: torch.nn.Module) -> None:
    from edgekit.passes.prune import prune_channels

    pruned = __import__("copy").deepcopy(tiny_blocks)
    block = pruned.features[4]
    prune_channels(block, (1, 8, 16, 16), 0.5, [block.conv[2]], torch.randn(4, 8, 16, 16))
    graph = export_onnx(pruned, (1, 3, 32, 32), 17).SerializeToString()
    rows = {row["layer"]: row for row in layer_diff(tiny_blocks, graph, "onnx", _images(2), 1)}
    assert "features.4.conv.0" not in rows  # its output channels were halved: not the same tensor
    assert rows["features.3"]["rel_error"] < 1e-4 and rows["features.4"]["shape"] == [1, 16, 8, 8]
    assert np.isfinite(rows["features.4"]["rel_error"]) and rows["features.4"]["rel_error"] > 1e-4


def test_diff_command_compares_a_built_int8_artifact(mobilenet_v3_pth: Path, photos: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from edgekit.cli import main

    assert main(["build", str(mobilenet_v3_pth), "--arch", "mobilenet_v3_small", "--target", "x86-64", "--precision",
                 "int8", "--calib", str(photos), "--input-size", "64", "--out", "built", "-q"]) == 0
    capsys.readouterr()
    assert main(["diff", "built", "--images", "2", "--json", "-q"]) == 0
    found = json.loads(capsys.readouterr().out)
    rows = found["rows"]
    assert found["images"] == 2 and found["layers"] == len(rows) > 10
    assert rows[0]["layer"].startswith("features.0") and found["worst"] in {row["layer"] for row in rows}
    assert all(0 < row["rel_error"] < 1.5 and -1 <= row["cosine"] <= 1 for row in rows)  # int8: close, not exact
    assert main(["diff", "built", "--images", "2", "-q"]) == 0  # the table
    out = capsys.readouterr().out
    assert any("<-" in line and "worst" in line for line in out.splitlines())  # marked, maybe beside first departure
    assert out.strip().splitlines()[-1].startswith(f"{len(rows)} layers on 2 held-out images")
    report = json.loads(Path("built/report.json").read_text())
    assert report["diff"] == found  # kept in report.json, drawn on report.html, both rehashed in the manifest
    manifest = json.loads(Path("built/manifest.json").read_text())
    assert manifest["outputs"]["report.json"]["sha256"] == file_sha256(Path("built/report.json"))
    assert manifest["outputs"]["report.html"]["sha256"] == file_sha256(Path("built/report.html"))
    assert_page(Path("built"))
    assert main(["diff", "nowhere"]) == 2
    assert "not an edgekit artifact folder" in capsys.readouterr().err

    # on a device: the agent returns one output, so every intermediate tensor travels in one concatenation
    import threading

    from edgekit.agent.server import Agent

    board = Agent(("127.0.0.1", 0), "diff-token-0123", name="bench-board", quiet=True)
    threading.Thread(target=board.serve_forever, daemon=True).start()
    try:
        assert main(["diff", "built", "--images", "2", "--json", "-q", "--device",
                     f"http://127.0.0.1:{board.server_address[1]}", "--device-token", "diff-token-0123"]) == 0
    finally:
        board.shutdown()
        board.server_close()
    there = json.loads(capsys.readouterr().out)
    assert found["ran_on"] == "host" and there["ran_on"] == "bench-board"
    assert [row["layer"] for row in there["rows"]] == [row["layer"] for row in rows]
    for ours, theirs in zip(there["rows"], rows, strict=True):  # the same runtime there: the same tensors
        assert ours["rel_error"] == pytest.approx(theirs["rel_error"], rel=1e-5, abs=1e-7)


def test_tflite_artifacts_are_read_channels_last_and_dequantized(tiny_blocks: torch.nn.Module) -> None:
    from edgekit.passes.tflite import Int8Fit, convert_tflite, tflite_precision

    inputs = _images(3)
    flat = convert_tflite(tiny_blocks, (1, 3, 32, 32))
    rows = {row["layer"]: row for row in layer_diff(tiny_blocks, flat, "tflite", inputs, 1)}
    assert {"features.3", "features.4", "features.5", "features.3.conv.0"} <= set(rows)  # by litert-torch locations
    assert rows["features.4"]["shape"] == [1, 16, 8, 8]  # NHWC in the flatbuffer, compared as torch lays it out
    assert all(row["rel_error"] < 1e-4 for row in rows.values())
    integer = tflite_precision(flat, "int8", _images(8), Int8Fit("minmax", 0, False))
    rows = {row["layer"]: row for row in layer_diff(tiny_blocks, integer, "tflite", inputs, 1)}
    assert {"features.3", "features.4", "features.5"} <= set(rows)
    assert all(1e-4 < row["rel_error"] < 0.5 and row["cosine"] > 0.85 for row in rows.values())  # int8: close
