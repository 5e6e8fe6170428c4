from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekit.errors import UsageError
from edgekit.families.base import LoadOptions
from edgekit.families.classifier import ClassifierFamily, preprocess_spec

FAMILY = ClassifierFamily()


def test_preprocessing_travels_with_the_architecture() -> None:
    lite = preprocess_spec("efficientnet_lite0", None)
    assert lite["mean"] == [127.0] * 3 and lite["std"] == [128.0] * 3
    imagenet = preprocess_spec("mobilenet_v2", 160)
    assert imagenet["center_crop"] == 160 and imagenet["resize_short_side"] == 183
    assert imagenet["mean"][0] == pytest.approx(0.485 * 255)


def test_samples_are_normalised_crops(photos: Path, tiny_model: torch.nn.Module) -> None:
    model = FAMILY.load(tiny_model, LoadOptions(input_size=32))
    samples = FAMILY.samples(model, sorted(photos.iterdir()), photos)
    assert samples.inputs.shape == (len(samples), 3, 32, 32)
    assert samples.labels is None  # a flat folder of photos carries no labels
    assert -3 < samples.inputs.mean() < 3 and samples.inputs.std() > 0.3


def test_labels_from_folders_classes_txt_and_synsets(labelled: Path, tmp_path: Path, tiny_model) -> None:
    model = FAMILY.load(tiny_model, LoadOptions(input_size=32))
    files = sorted(p for p in labelled.rglob("*.jpg"))
    samples = FAMILY.samples(model, files, labelled)
    assert samples.label_source == "class folders (sorted names)"
    assert [int(label) for label in samples.labels] == [int(Path(f).parent.name[-1]) for f in samples.files]

    (labelled / "classes.txt").write_text("class_2\nclass_1\nclass_0\n")
    samples = FAMILY.samples(model, files, labelled)
    assert samples.label_source == "classes.txt"
    assert [int(label) for label in samples.labels] == [2 - int(Path(f).parent.name[-1]) for f in samples.files]

    synsets = tmp_path / "synsets"
    synsets.mkdir()
    shutil.copy(files[0], synsets / "n01443537_goldfish.jpg")
    shutil.copy(files[1], synsets / "n01484850_great_white_shark.jpg")
    samples = FAMILY.samples(model, sorted(synsets.iterdir()), synsets)
    assert samples.label_source == "imagenet synsets" and list(samples.labels) == [1, 2]

    (labelled / "classes.txt").write_text("class_0\nclass_1\n")
    with pytest.raises(UsageError, match="name classes not in classes.txt: class_2"):
        FAMILY.samples(model, files, labelled)


def test_state_dict_infers_class_count(mobilenet_v3_pth: Path) -> None:
    model = FAMILY.load(mobilenet_v3_pth, LoadOptions(arch="mobilenet_v3_small", input_size=64))
    assert model.details == {"arch": "mobilenet_v3_small", "num_classes": 4}
    assert model.input_shape == (1, 3, 64, 64) and len(model.fingerprint) == 64


@pytest.mark.parametrize(("arch", "message"), [
    ("mobilenet_v2", "does not fit --arch mobilenet_v2"),
    ("mobilenet_v3_smal", "unknown --arch 'mobilenet_v3_smal'; did you mean mobilenet_v3_small"),
    (None, "say which architecture with --arch"),
])
def test_wrong_arch(mobilenet_v3_pth: Path, arch: str | None, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        FAMILY.load(mobilenet_v3_pth, LoadOptions(arch=arch))


class NotWeights:
    def __reduce__(self) -> tuple:
        return (print, ("this would run at load time",))


def test_refuses_corrupt_files_and_pickled_code(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(UsageError, match="not a readable torch checkpoint"):
        FAMILY.load(corrupt, LoadOptions(arch="mobilenet_v2"))
    code = tmp_path / "code.pth"
    torch.save({"weights": NotWeights()}, code, pickle_module=pickle)
    with pytest.raises(UsageError, match="holds Python objects, not plain weights"):
        FAMILY.load(code, LoadOptions(arch="mobilenet_v2"))
    tensors = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], tensors)
    with pytest.raises(UsageError, match="is not a state dict"):
        FAMILY.load(tensors, LoadOptions(arch="mobilenet_v2"))
    bad_onnx = tmp_path / "bad.onnx"
    bad_onnx.write_bytes(b"not onnx")
    with pytest.raises(UsageError, match="is not a valid ONNX model"):
        FAMILY.load(bad_onnx, LoadOptions())


def test_compare_counts_agreement_and_drop() -> None:
    reference = np.eye(4, dtype=np.float32)
    artifact = reference.copy()
    artifact[3] = [0, 0, 1, 0]  # one of four answers changes
    metrics = FAMILY.compare(reference, artifact, labels=np.array([0, 1, 2, 3]))
    assert metrics["top1_agreement"] == 0.75
    assert metrics["top1_reference"] == 1.0 and metrics["top1_artifact"] == 0.75
    assert metrics["top1_drop_pt"] == 25.0


def test_efficientnet_lite0_from_its_package() -> None:
    model = FAMILY.load("efficientnet_lite0", LoadOptions())
    assert model.details["num_classes"] == 1000 and model.preprocess["mean"] == [127.0] * 3
    assert sum(p.numel() for p in model.module.parameters()) == pytest.approx(4.65e6, rel=0.01)
