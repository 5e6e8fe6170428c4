"""Bad input ends in one line and exit 2, naming the file and the problem; legal but suspicious input is noted."""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from edgekit.cli import main
from edgekit.errors import UsageError
from edgekit.families.base import LoadedModel, LoadOptions
from edgekit.families.classifier import ClassifierFamily, preprocess_spec
from edgekit.families.detector import DetectorFamily
from edgekit.families.segmenter import instance_masks
from edgekit.passes.export import export_onnx

from .conftest import PHOTOS, TinyNet


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err: str) -> str:
    """The error line, after checking it is the only thing that is not argparse's usage."""
    assert "Traceback" not in err and "Warning" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("edgekit: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def float_onnx(tmp_path: Path) -> Path:
    path = tmp_path / "float.onnx"
    torch.manual_seed(0)
    onnx.save(export_onnx(TinyNet().eval(), (1, 3, 16, 16), 17), str(path))
    return path


def _classifier(num_classes: int | None) -> LoadedModel:
    return LoadedModel(name="m", family="classifier", source="m", input_shape=(1, 3, 16, 16),
                       preprocess=preprocess_spec(None, 16), fingerprint="", details={"num_classes": num_classes})


# A. estimate: damaged artifacts and targets that cannot run the graph


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("broken.onnx", b"\x08\x07\x12\x04edge\x3a\xff\xff\xff", "broken.onnx is not a valid onnx model"),
    ("empty.onnx", b"", "empty.onnx is not a valid onnx model (it holds no graph)"),
    ("text.tflite", b"not a flatbuffer at all", "text.tflite is not a valid tflite model"),
])
def test_estimate_names_a_damaged_artifact(capsys, tmp_path: Path, name: str, content: bytes, expected: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    code, out, err = _run(capsys, "estimate", str(path))
    assert code == 2 and out == ""
    assert expected in _one_line(err)


@pytest.mark.parametrize(("target", "expected"), [
    ("snapdragon-8-gen-3", "snapdragon-8-gen-3 has no peak for fp32 (it runs fp16, int8) and cannot run its"),
    ("coral-edgetpu", "coral-edgetpu is an integer-only accelerator and cannot run its"),
])
def test_estimate_says_why_a_target_cannot_run_a_float_graph(capsys, float_onnx: Path, target: str,
                                                             expected: str) -> None:
    code, out, err = _run(capsys, "estimate", str(float_onnx), "--target", target)
    assert code == 2 and out == ""
    line = _one_line(err)
    assert line.startswith(f"edgekit: {float_onnx}: ") and expected in line and "fp32 ops (Conv" in line
    assert "--precision" in line
    code, out, _ = _run(capsys, "estimate", str(float_onnx), "--target", "jetson", "--json")  # fp32 runs there
    assert code == 0 and json.loads(out)["estimates"][0]["ms"] > 0


# B. bad input is exit 2, not a failed stage


@pytest.mark.parametrize(("options", "expected"), [
    ({"num_classes": -3}, "--num-classes must be a whole number of at least 1, got -3"),
    ({"num_classes": 0}, "--num-classes must be a whole number of at least 1, got 0"),
    ({"input_size": -224}, "--input-size must be a whole number of at least 1, got -224"),
    ({"input_size": True}, "--input-size must be a whole number of at least 1, got True"),
    ({"arch": " "}, "--arch must name an architecture"),
])
def test_load_options_are_checked_where_they_are_made(options: dict, expected: str) -> None:
    with pytest.raises(UsageError, match=expected):
        LoadOptions(**options)


@pytest.mark.parametrize("argv", [["build", "mobilenet_v2", "--target", "x86-64", "--num-classes", "-3"],
                                  ["inspect", "mobilenet_v2", "--input-size", "0"]])
def test_cli_refuses_sizes_below_one(capsys, argv: list[str]) -> None:
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    assert "must be a whole number of at least 1" in _one_line(err)


def test_truncated_gguf_is_named_with_the_problem(capsys, tiny_gguf: Path, tmp_path: Path) -> None:
    """Before transformers reads it (it would fail deep inside, or its reader loop on a damaged count)."""
    from gguf import GGUFReader

    data = tiny_gguf.read_bytes()
    last = max(GGUFReader(tiny_gguf).tensors, key=lambda tensor: tensor.data_offset)
    cut = tmp_path / "cut.gguf"
    for size, expected in [
        (last.data_offset + 2, f"cut.gguf: truncated or damaged GGUF file (tensor {last.name}'s data ends at byte "
                               f"{last.data_offset + last.n_bytes}, past the end of the file ({last.data_offset + 2} "
                               "bytes))"),
        (10, "cut.gguf: truncated or damaged GGUF file (tensor count at byte 8 runs past the end of the file"),
        (0, "cut.gguf is not a GGUF file (it does not start with the GGUF magic)"),
    ]:
        cut.write_bytes(data[:size])
        code, out, err = _run(capsys, "inspect", str(cut))
        assert code == 2 and out == ""
        assert expected in _one_line(err)


def test_gguf_with_a_damaged_array_count_is_refused_at_once(tiny_gguf: Path) -> None:
    """gguf's reader trusts the count: 2^60 elements read past the end one empty slice at a time, for hours."""
    import time

    from edgekit.families.gguf_check import check_gguf

    data = bytearray(tiny_gguf.read_bytes())
    count = data.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens") + 8  # after value and element types
    data[count : count + 8] = (1 << 60).to_bytes(8, "little")
    tiny_gguf.write_bytes(data)
    start = time.perf_counter()
    with pytest.raises(UsageError, match=r"tokens at byte \d+ claims 1152921504606846976 elements, more than"):
        check_gguf(tiny_gguf)
    assert time.perf_counter() - start < 2


@pytest.mark.parametrize(("line", "expected"), [
    ("0 0.5 0.5 0.2", "line 2: expected `class cx cy w h` or a polygon"),
    ("0 0.5 abc 0.2 0.2", "line 2: 'abc' is not a number"),
    ("-1 0.5 0.5 0.2 0.2", "line 2: the class must be a whole number of at least 0, got '-1'"),
    ("1.5 0.5 0.5 0.2 0.2", "line 2: the class must be a whole number"),
    ("0 0.5 1.5 0.2 0.2", "line 2: coordinates are normalised to 0-1, got 1.5"),
    ("0 0.5 nan 0.2 0.2", "line 2: coordinates are normalised to 0-1, got nan"),
])
def test_malformed_yolo_label_line_names_file_and_line(tmp_path: Path, line: str, expected: str) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    image = tmp_path / "images" / "a.jpg"
    shutil.copy(PHOTOS[0], image)
    (tmp_path / "labels" / "a.txt").write_text(f"1 0.5 0.5 0.2 0.2\n{line}\n")
    model = LoadedModel(name="m", family="detector", source="m", input_shape=(1, 3, 32, 32),
                        preprocess={"size": 32}, fingerprint="", details={"num_classes": 3})
    with pytest.raises(UsageError, match=f"labels/a.txt {expected}"):
        DetectorFamily().samples(model, [image], None)


def test_detector_labels_take_polygons_as_boxes_and_warn_of_unknown_classes(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    image = tmp_path / "images" / "a.jpg"
    Image.new("RGB", (64, 32)).save(image)
    (tmp_path / "labels" / "a.txt").write_text("2 0.25 0.5 0.75 0.5 0.75 1.0\n\n7 0.5 0.5 0.5 0.5\n")
    model = LoadedModel(name="m", family="detector", source="m", input_shape=(1, 3, 64, 64),
                        preprocess={"size": 64}, fingerprint="", details={"num_classes": 3})
    samples = DetectorFamily().samples(model, [image], None)
    assert samples.labels[0, 1:].tolist() == pytest.approx([2, 16, 32, 48, 48])  # the triangle's box, letterboxed
    assert samples.notes == ["warning: 1 of 2 labelled boxes have a class the model does not have (up to 7; the "
                             "model has 3): no detection can match them"]


def test_malformed_polygon_line_names_file_and_line(tmp_path: Path) -> None:
    label = tmp_path / "a.txt"
    label.write_text("0 0.1 0.1 0.9 0.1 0.9 0.9\n0 0.1 0.1 0.9\n")
    with pytest.raises(UsageError, match=r"a\.txt line 2: expected"):
        instance_masks(label, 10, 10)


# C. messages that say what is wrong


def test_language_model_folder_without_weights_says_so(capsys, tmp_path: Path) -> None:
    folder = tmp_path / "lm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    code, _, err = _run(capsys, "inspect", str(folder))
    assert code == 2
    assert _one_line(err) == (f"edgekit: {folder}: no weights found (looked for model.safetensors, "
                              "model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json)")


@pytest.mark.parametrize(("present", "missing"), [("encoder.onnx", "sam.onnx"), ("sam.onnx", "encoder.onnx")])
def test_segmenter_folder_says_which_part_is_missing(capsys, tmp_path: Path, float_onnx: Path, present: str,
                                                     missing: str) -> None:
    folder = tmp_path / "pair"
    folder.mkdir()
    shutil.copy(float_onnx, folder / present)
    code, _, err = _run(capsys, "inspect", str(folder))
    assert code == 2 and f"{folder} has no {missing}" in _one_line(err)


def test_plain_pickle_is_refused_in_one_line_without_torch_warnings(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pth"
    with path.open("wb") as handle:
        pickle.dump({"weight": torch.zeros(2)}, handle, protocol=4)  # not torch.save: torch warns of the protocol
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UsageError, match="legacy.pth is not a readable torch checkpoint"):
            ClassifierFamily().load(path, LoadOptions(arch="mobilenet_v2"))
    assert [str(w.message) for w in caught] == []


# D. legal but suspicious input is noted; nonsense is refused


def _class_folders(root: Path, names: list[str]) -> list[Path]:
    for name, photo in zip(names, PHOTOS, strict=False):
        (root / name).mkdir(parents=True)
        shutil.copy(photo, root / name / photo.name)
    return sorted(root.rglob("*.jpg"))


@pytest.mark.parametrize(("folders", "num_classes", "warned"), [
    (["cat", "dog"], 1000, True),
    (["tench", "goldfish"], 1000, True),  # ImageNet names, but sorted order gives goldfish index 0 (tench's)
    (["tench"], 1000, False),
    (["cat", "dog"], 4, False),  # the model's own classes: sorted folders are the convention
])
def test_class_folders_that_do_not_name_the_models_classes_are_warned_of(tmp_path: Path, folders: list[str],
                                                                         num_classes: int, warned: bool) -> None:
    root = tmp_path / "eval"
    samples = ClassifierFamily().samples(_classifier(num_classes), _class_folders(root, folders), root)
    assert samples.label_source == "class folders (sorted names)"
    warnings_given = [note for note in samples.notes if note.startswith("warning: the class folders")]
    assert bool(warnings_given) == warned
    if warned:
        assert str(root) in warnings_given[0] and "n01440764 tench" in warnings_given[0]


def test_sixteen_bit_images_keep_their_brightness_and_are_noted(tmp_path: Path) -> None:
    grey = tmp_path / "grey16.png"
    Image.fromarray(np.full((16, 16), 0x8000, np.uint16)).save(grey)
    assert Image.open(grey).mode == "I;16"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    photo = tmp_path / PHOTOS[0].name
    shutil.copy(PHOTOS[0], photo)
    model = _classifier(None)
    samples = ClassifierFamily().samples(model, [broken, grey, photo], None)
    assert samples.files == [str(grey), str(photo)]
    spec = model.preprocess
    pixels = samples.inputs[0] * np.array(spec["std"])[:, None, None] + np.array(spec["mean"])[:, None, None]
    assert np.allclose(pixels, 128, atol=0.5)  # the high byte of 0x8000, not 255 (clipped)
    assert samples.notes[0].startswith(f"warning: 1 of 3 images could not be read and were skipped (first: {broken}")
    assert samples.notes[1].startswith("1 of 3 images have 16 bits a channel: reduced to 8")


@pytest.mark.parametrize("flag", ["--out", "--calib", "--recipe"])
def test_an_empty_path_is_refused_not_read_as_the_default(capsys, float_onnx: Path, photos: Path, flag: str) -> None:
    given = {"--out": [], "--calib": [], "--recipe": ["--calib", str(photos)]}[flag]
    code, out, err = _run(capsys, "build", str(float_onnx), "--target", "x86-64", *given, flag, "", "--runs", "2",
                          "-q")
    assert code == 2 and out == ""
    assert f"argument {flag}" in _one_line(err) and "is empty" in err
    assert not Path("dist").exists()


def test_a_negative_table_length_is_refused(capsys, float_onnx: Path) -> None:
    code, out, err = _run(capsys, "estimate", str(float_onnx), "--top", "-2")
    assert code == 2 and out == "" and "argument --top: expected a whole number of at least 0, got '-2'" in err


def test_classes_txt_that_is_not_text_is_named(tmp_path: Path) -> None:
    root = tmp_path / "eval"
    files = _class_folders(root, ["a", "b"])
    (root / "classes.txt").write_bytes(b"a\nb\xff\xfe\n")
    with pytest.raises(UsageError, match=r"classes\.txt: not UTF-8 text"):
        ClassifierFamily().samples(_classifier(2), files, root)


def test_an_unexpected_error_is_still_one_line_and_exit_3(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    import edgekit.targets

    def broken() -> None:
        raise KeyError("compute")

    monkeypatch.setattr(edgekit.targets, "builtin_targets", broken)
    code, out, err = _run(capsys, "targets")
    assert code == 3 and out == ""
    assert _one_line(err) == ("edgekit: unexpected KeyError: 'compute' (EDGEKIT_DEBUG=1 shows the traceback)")


@pytest.mark.parametrize(("text", "problem"), [("nc: 3\nbackbone: 5\nhead: []\n", "TypeError"),
                                               ("nc: 3\nbackbone:\n  - [-1, 1, NoSuchLayer, [64]]\nhead: []\n",
                                                "KeyError: 'NoSuchLayer'")])
def test_a_broken_model_yaml_is_named(capsys, tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    code, out, err = _run(capsys, "inspect", str(path))
    assert code == 2 and out == ""
    assert _one_line(err).startswith(f"edgekit: {path} is not an Ultralytics model YAML ({problem}")
