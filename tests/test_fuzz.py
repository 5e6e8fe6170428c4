"""The parsers of user files, fuzzed: whatever the bytes, the answer is a result or a UsageError (exit 2, one line
naming the file), never another exception. Small and derandomized here; bench/fuzz_parsers.py runs thousands."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from edgekit.data import list_images
from edgekit.errors import UsageError
from edgekit.families import FAMILIES
from edgekit.families.base import LoadedModel
from edgekit.families.classifier import ClassifierFamily, preprocess_spec
from edgekit.families.gguf_check import check_gguf
from edgekit.families.yolo_labels import read_labels
from edgekit.recipe import Recipe, load_recipe, resolve
from edgekit.resources import resource_dir
from edgekit.targets import load_target, load_target_file

# fixtures are made once per test, not per example: each example overwrites the same file
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

TOML_VALUES = st.one_of(
    st.sampled_from(["0", "-1", "1e999", "-inf", "nan", "true", '""', '"fp8"', '"onnx"', "[]", "{}", '[1, "a"]',
                     "1979-05-27", '{ fp32 = 1 }', '[["x"]]', "0x10", '"\\u0000"']),
    st.integers(-(2**70), 2**70).map(str),
    st.floats().map(repr).filter(lambda text: text != "-nan"),
    st.text(max_size=12).map(lambda text: '"' + text.replace("\\", "").replace('"', "") + '"'),
)


def _write(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    return path


@st.composite
def _mutated_lines(draw: st.DrawFn, text: str) -> str:
    """A TOML text with a few lines dropped, replaced, inserted or given another value."""
    lines = text.splitlines()
    for _ in range(draw(st.integers(1, 4))):
        if not lines:
            break
        at = draw(st.integers(0, len(lines) - 1))
        kind = draw(st.sampled_from(["drop", "text", "insert", "value", "value"]))
        if kind == "drop":
            del lines[at]
        elif kind == "text":
            lines[at] = draw(st.text(max_size=30))
        elif kind == "insert":
            lines.insert(at, f"{draw(st.sampled_from(['name', 'cores', 'ratio', 'x', 'precision']))} = "
                             f"{draw(TOML_VALUES)}")
        elif "=" in lines[at]:
            lines[at] = f"{lines[at].split('=')[0]}= {draw(TOML_VALUES)}"
    return "\n".join(lines)


def _mutated_bytes(seed: bytes) -> st.SearchStrategy[bytes]:
    """The seed cut short, or with a few bytes overwritten."""
    cut = st.integers(0, len(seed)).map(lambda size: seed[:size])
    flips = st.lists(st.tuples(st.integers(0, len(seed) - 1), st.integers(0, 255)), min_size=1, max_size=6)
    return st.one_of(cut, flips.map(lambda edits: _overwrite(seed, edits)))


def _overwrite(seed: bytes, edits: list[tuple[int, int]]) -> bytes:
    data = bytearray(seed)
    for at, value in edits:
        data[at] = value
    return bytes(data)


TARGET_TEXT = (resource_dir("targets") / "raspberry-pi-5.toml").read_text()
RECIPE_TEXT = resolve(Recipe(), load_target("x86-64"), FAMILIES["classifier"]).to_toml()
RECIPE_SECTIONS = {name: list(field.annotation.model_fields) if hasattr(field.annotation, "model_fields") else []
                   for name, field in Recipe.model_fields.items()}


@FUZZ
@given(text=st.one_of(st.text(max_size=200), _mutated_lines(TARGET_TEXT)))
def test_target_files(tmp_path: Path, text: str) -> None:
    try:
        target = load_target_file(_write(tmp_path / "board.toml", text))
    except UsageError as err:
        assert str(err).startswith(str(tmp_path / "board.toml")) and "\n" not in str(err)
    else:
        fast = {p for runtime in target.runtimes for p in runtime.precisions if p != "int4"}  # int4: weight-only
        assert all(target.compute.peak_gops(p) for p in fast)


@st.composite
def _recipe_tables(draw: st.DrawFn) -> str:
    """A TOML recipe of real sections and keys (and a few made up) with values of any type."""
    data: dict = {}
    for section in draw(st.lists(st.sampled_from([*RECIPE_SECTIONS, "extra"]), max_size=4, unique=True)):
        keys = RECIPE_SECTIONS.get(section) or ["x"]
        if not RECIPE_SECTIONS.get(section, True):
            data[section] = draw(st.integers(-5, 5))  # `seed`: a plain value
            continue
        data[section] = draw(st.dictionaries(st.sampled_from([*keys, "typo"]), st.one_of(
            st.integers(-(2**40), 2**40), st.floats(allow_nan=False), st.booleans(), st.text(max_size=8),
            st.sampled_from(["fp16", "int8", "onnx", "gptq", "blocks", "mse"]),
            st.lists(st.integers(), max_size=3)), max_size=4))
    return tomli_w.dumps(data)


@FUZZ
@given(text=st.one_of(st.text(max_size=200), _mutated_lines(RECIPE_TEXT), _recipe_tables()))
def test_recipe_files(tmp_path: Path, text: str) -> None:
    try:
        load_recipe(_write(tmp_path / "r.toml", text))
    except UsageError as err:
        assert str(err).startswith(str(tmp_path / "r.toml")) and "\n" not in str(err)


LABEL_TOKENS = st.one_of(st.integers(-3, 100).map(str), st.floats(-2, 2).map(repr),
                         st.sampled_from(["nan", "inf", "-0", "1e999", "0x1", "1_0", "", "cat", "½"]),
                         st.text(max_size=5))


@FUZZ
@given(lines=st.lists(st.lists(LABEL_TOKENS, max_size=9).map(" ".join), max_size=5),
       raw=st.one_of(st.none(), st.binary(max_size=40)))
def test_yolo_label_files(tmp_path: Path, lines: list[str], raw: bytes | None) -> None:
    path = _write(tmp_path / "a.txt", raw if raw is not None else "\n".join(lines))
    try:
        labels = read_labels(path)
    except UsageError as err:
        assert str(err).startswith(str(path)) and "\n" not in str(err)
    else:
        for label in labels:
            assert label.cls >= 0 and len(label.coords) % 2 == 0 and all(0 <= v <= 1 for v in label.coords)


@pytest.fixture(scope="module")
def gguf_seed(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    import gguf

    path = tmp_path_factory.mktemp("gguf") / "seed.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_string("general.name", "seed")
    writer.add_array("tokenizer.ggml.tokens", ["a", "b"])
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@FUZZ
@given(data=st.data())
def test_gguf_headers(tmp_path: Path, gguf_seed: bytes, data: st.DataObject) -> None:
    raw = data.draw(st.one_of(_mutated_bytes(gguf_seed), st.binary(max_size=64).map(lambda b: b"GGUF" + b)))
    path = _write(tmp_path / "m.gguf", raw)
    try:
        check_gguf(path)
    except UsageError as err:
        assert str(path) in str(err) and "\n" not in str(err)


def _encoded(fmt: str, mode: str) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (6, 5, 3), np.uint8)
    image = Image.fromarray(pixels).convert(mode) if mode != "I;16" else Image.fromarray(
        pixels[..., 0].astype(np.uint16) * 257)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


IMAGE_SEEDS = [(".png", _encoded("PNG", "RGB")), (".jpg", _encoded("JPEG", "RGB")), (".png", _encoded("PNG", "I;16")),
               (".bmp", _encoded("BMP", "RGB")), (".webp", _encoded("WEBP", "RGB")), (".tif", _encoded("TIFF", "L"))]


@FUZZ
@given(data=st.data())
def test_images_in_a_data_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: st.DataObject) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1 << 20)  # a mutated header's huge size fails fast
    folder = tmp_path / "photos"
    folder.mkdir(exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for index in range(data.draw(st.integers(1, 3))):
        suffix, seed = data.draw(st.sampled_from(IMAGE_SEEDS))
        _write(folder / f"{index}{suffix}", data.draw(st.one_of(_mutated_bytes(seed), st.binary(max_size=32))))
    model = LoadedModel(name="m", family="classifier", source="m", input_shape=(1, 3, 8, 8),
                        preprocess=preprocess_spec(None, 8), fingerprint="", details={"num_classes": None})
    try:
        samples = ClassifierFamily().samples(model, list_images(folder, "calibration"), None)
    except UsageError as err:
        assert "\n" not in str(err)
    else:
        assert samples.inputs.shape[1:] == (3, 8, 8) and np.isfinite(samples.inputs).all()
