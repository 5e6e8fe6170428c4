"""The cache trusts nothing it reads back: damaged, altered or misfiled entries are recomputed, never used."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekit import build
from edgekit.cache import ArrayCache, checked_json
from edgekit.passes.export import export_onnx
from edgekit.passes.int8 import Int8Quantizer, Int8Scheme

FAST = {"verify.runs": 3, "verify.warmup": 1}
KEY = {"kind": "test", "n": 1}


def _arrays(calls: list[int]) -> dict[str, np.ndarray]:
    calls.append(1)
    return {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "y": np.array([7], np.int64)}


def _entry(root: Path) -> Path:
    (path,) = root.glob("*.npz")
    return path


@pytest.mark.parametrize("damage", ["truncated", "garbled", "altered", "misfiled"])
def test_a_damaged_array_entry_is_recomputed_with_a_note(damage: str, tmp_path: Path) -> None:
    notes: list[str] = []
    calls: list[int] = []
    cache = ArrayCache(tmp_path / "c", note=notes.append)
    expected = cache.get_or_compute(KEY, lambda: _arrays(calls))
    path = _entry(tmp_path / "c")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbled":
        path.write_bytes(bytes(range(256)) * 8)
    elif damage == "altered":  # a valid .npz whose values were changed: its stored digest no longer matches
        with np.load(path) as stored:
            arrays = {name: stored[name] for name in stored.files}
        arrays["x"] = arrays["x"] + 1
        np.savez(path, **arrays)
    else:  # another key's entry copied under this key's name
        other = ArrayCache(tmp_path / "other")
        other.get_or_compute({"kind": "other"}, lambda: {"x": np.zeros((2, 3), np.float32)})
        shutil.copy(_entry(tmp_path / "other"), path)
    again = cache.get_or_compute(KEY, lambda: _arrays(calls))
    assert len(calls) == 2 and len(notes) == 1 and str(path) in notes[0] and "\n" not in notes[0]
    assert all(np.array_equal(again[k], expected[k]) for k in expected) and again.keys() == expected.keys()
    assert cache.get_or_compute(KEY, lambda: _arrays(calls))["x"].tolist() == expected["x"].tolist()
    assert len(calls) == 2 and cache.hits == 1  # the replaced entry is intact and read back


def test_a_json_entry_altered_misfiled_or_unreadable_is_recomputed(tmp_path: Path) -> None:
    notes: list[str] = []
    cache = ArrayCache(tmp_path, note=notes.append)
    path = cache.path(KEY, ".json")
    assert checked_json(path, lambda: {"peak": 1.5}, notes.append) == {"peak": 1.5}
    entry = json.loads(path.read_text())
    entry["value"]["peak"] = 99.0
    path.write_text(json.dumps(entry))
    assert checked_json(path, lambda: {"peak": 1.5}, notes.append) == {"peak": 1.5}
    shutil.copy(path, cache.path({"kind": "other"}, ".json"))
    assert checked_json(cache.path({"kind": "other"}, ".json"), lambda: {"peak": 2.0}, notes.append) == {"peak": 2.0}
    path.write_bytes(b"\xff\xfe not json")
    assert checked_json(path, lambda: {"peak": 1.5}, notes.append) == {"peak": 1.5}
    assert len(notes) == 3 and all("recomputing" in note for note in notes)
    assert checked_json(path, lambda: pytest.fail("an intact entry is read, not recomputed"), notes.append)


def test_altered_int8_ranges_are_detected_and_their_digest_is_the_same(tiny_model: torch.nn.Module,
                                                                       tmp_path: Path) -> None:
    graph = export_onnx(tiny_model, (1, 3, 32, 32), 17)
    calibration = np.random.default_rng(0).normal(0, 1, (4, 3, 32, 32)).astype(np.float32)
    ranges = tmp_path / "ranges.json"
    scheme = Int8Scheme("uint8", "minmax", bias_correction=False)

    def quantize() -> tuple[bytes, str | None]:
        quantizer = Int8Quantizer(graph, calibration, scheme, ranges, 1)
        model = quantizer.quantize()
        return model.SerializeToString(), quantizer.ranges_digest

    fresh = quantize()
    assert fresh[1] is not None and len(fresh[1]) == 64
    entry = json.loads(ranges.read_text())
    first = next(iter(entry["value"]["data"].values()))
    first["highest"]["data"][0] *= 4  # a range widened by hand: the artifact would change silently
    ranges.write_text(json.dumps(entry))
    assert quantize() == fresh  # recomputed: same bytes, same digest
    assert quantize() == fresh  # and read back intact


def test_same_bytes_from_an_empty_a_warm_and_a_poisoned_cache(tiny_model: torch.nn.Module, photos: Path,
                                                               capfd: pytest.CaptureFixture[str]) -> None:
    def artifact(out: str) -> tuple[str, int]:
        report = build(tiny_model, "x86-64", precision="int8", calib=photos, input_size=32, out=out,
                       overrides=FAST, quiet=True).report
        return report["artifact"]["sha256"], report["cache"]["hits"]

    empty, warm = artifact("empty"), artifact("warm")
    cache = Path("cache")
    for entry in cache.glob("*.npz"):
        entry.write_bytes(entry.read_bytes()[:100])  # truncated: a BadZipFile
    for entry in cache.glob("*.json"):
        data = json.loads(entry.read_text())
        for tensor in data["value"]["data"].values():
            tensor["lowest"]["data"][0] -= 1.0
        entry.write_text(json.dumps(data))
    capfd.readouterr()
    poisoned = artifact("poisoned")
    noted = [line for line in capfd.readouterr().err.splitlines() if "damaged or altered" in line]
    assert empty[1] == 0 and warm[1] > 0 and poisoned[1] == 0
    assert empty[0] == warm[0] == poisoned[0]
    assert len(noted) == len(list(cache.glob("*"))) and "Traceback" not in "".join(noted)
