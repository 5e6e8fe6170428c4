"""Every parser of a user's file, fed thousands of damaged inputs: each must answer with a result or a UsageError.

    .venv/bin/python bench/fuzz_parsers.py [--inputs 1200] [--seed 0] [--keep /tmp/edgekit-fuzz]

Target TOML, recipe TOML, YOLO label files, GGUF headers and images in a data folder, each from valid seeds
(the shipped target profiles, a resolved recipe, label lines, a GGUF written by the gguf package, small images in
six formats) cut short, with bytes overwritten, lines dropped or given other values, or replaced by random bytes.
Prints, per parser, how many inputs were accepted, refused with a UsageError, or raised anything else (each
other exception once, with the input kept under --keep to replay); the slowest input shows nothing hangs.
Exits 1 if anything but a UsageError was raised. tests/test_fuzz.py runs the same properties, small.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgekit.errors import UsageError

TOML_VALUES = ["0", "-1", "1e999", "-inf", "nan", "true", '""', '"fp8"', '"onnx"', '"int4"', "[]", "{}", '[1, "a"]',
               "1979-05-27", "{ fp32 = 1 }", '[["x"]]', "0x10", "3.5", "1000000000000000000000", '"\\u0000"']
LABEL_TOKENS = ["0", "1", "79", "-1", "0.5", "1.5", "0.0", "1e-3", "nan", "inf", "-0", "1e999", "0x1", "cat", "½", ""]


def mutate_bytes(rng: random.Random, seed: bytes) -> bytes:
    """The seed cut short, with bytes overwritten, with a slice repeated, or random bytes."""
    kind = rng.choice(["cut", "flip", "flip", "repeat", "random"])
    if kind == "cut":
        return seed[: rng.randrange(len(seed) + 1)]
    if kind == "random":
        return rng.randbytes(rng.randrange(64))
    data = bytearray(seed)
    if kind == "repeat":
        at = rng.randrange(len(data))
        return bytes(data[:at] + data[at : at + rng.randrange(1, 64)] * rng.randrange(2, 5) + data[at:])
    for _ in range(rng.randrange(1, 8)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def mutate_text(rng: random.Random, text: str) -> bytes:
    """A few lines dropped, replaced, duplicated or given another value; or the bytes mutated."""
    if rng.random() < 0.2:
        return mutate_bytes(rng, text.encode())
    lines = text.splitlines()
    for _ in range(rng.randrange(1, 5)):
        if not lines:
            break
        at = rng.randrange(len(lines))
        kind = rng.choice(["drop", "value", "value", "duplicate", "insert"])
        if kind == "drop":
            del lines[at]
        elif kind == "duplicate":
            lines.insert(at, lines[at])
        elif kind == "insert":
            lines.insert(at, f"{rng.choice(['name', 'cores', 'ratio', 'x', 'precision'])} = {rng.choice(TOML_VALUES)}")
        elif "=" in lines[at]:
            lines[at] = f"{lines[at].split('=')[0]}= {rng.choice(TOML_VALUES)}"
    return "\n".join(lines).encode()


def label_text(rng: random.Random) -> bytes:
    """Label lines (boxes, polygons, odd lengths) whose fields are now and then something else; or random bytes."""
    if rng.random() < 0.1:
        return rng.randbytes(rng.randrange(40))
    lines = [" ".join([str(rng.randrange(80)), *(f"{rng.random():.3f}" for _ in range(rng.choice([4, 4, 4, 6, 8, 3])))])
             for _ in range(rng.randrange(1, 5))]
    fields = "\n".join(lines).split(" ")
    return " ".join(rng.choice(LABEL_TOKENS) if rng.random() < 0.05 else field for field in fields).encode()


def gguf_seed(folder: Path) -> bytes:
    import gguf

    path = folder / "seed.gguf"
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


def image_seeds() -> list[tuple[str, bytes]]:
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (6, 5, 3), np.uint8)
    seeds = []
    for suffix, fmt, image in [(".png", "PNG", Image.fromarray(pixels)), (".jpg", "JPEG", Image.fromarray(pixels)),
                               (".bmp", "BMP", Image.fromarray(pixels)), (".webp", "WEBP", Image.fromarray(pixels)),
                               (".tif", "TIFF", Image.fromarray(pixels[..., 0])),
                               (".png", "PNG", Image.fromarray(pixels[..., 0].astype(np.uint16) * 257))]:
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        seeds.append((suffix, buffer.getvalue()))
    return seeds


def parsers(work: Path) -> dict[str, tuple[Callable[[random.Random], tuple[str, bytes]], Callable[[Path], object]]]:
    """Per parser: an input maker (suffix and bytes) and the call that parses the file."""
    from PIL import Image

    from edgekit.data import list_images
    from edgekit.families import FAMILIES
    from edgekit.families.base import LoadedModel
    from edgekit.families.classifier import ClassifierFamily, preprocess_spec
    from edgekit.families.gguf_check import check_gguf
    from edgekit.families.yolo_labels import read_labels
    from edgekit.recipe import Recipe, load_recipe, resolve
    from edgekit.resources import resource_dir
    from edgekit.targets import load_target, load_target_file

    Image.MAX_IMAGE_PIXELS = 1 << 20  # a mutated header's huge size is refused before it is decoded
    targets = [p.read_text() for p in sorted(resource_dir("targets").glob("*.toml"))]
    recipe = resolve(Recipe(), load_target("x86-64"), FAMILIES["classifier"]).to_toml()
    gguf = gguf_seed(work)
    images = image_seeds()
    model = LoadedModel(name="m", family="classifier", source="m", input_shape=(1, 3, 8, 8),
                        preprocess=preprocess_spec(None, 8), fingerprint="", details={"num_classes": None})

    def image_folder(path: Path) -> object:
        folder = path.parent / "images"
        folder.mkdir(exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
        path.rename(folder / path.name)
        return ClassifierFamily().samples(model, list_images(folder, "calibration"), None)

    return {
        "target TOML": (lambda rng: (".toml", mutate_text(rng, rng.choice(targets))), load_target_file),
        "recipe TOML": (lambda rng: (".toml", mutate_text(rng, recipe)), load_recipe),
        "YOLO labels": (lambda rng: (".txt", label_text(rng)), read_labels),
        "GGUF header": (lambda rng: (".gguf", mutate_bytes(rng, gguf)), check_gguf),
        "image files": (lambda rng: (lambda seed: (seed[0], mutate_bytes(rng, seed[1])))(rng.choice(images)),
                        image_folder),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=1200, help="inputs per parser (default 1200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="folder for the inputs that raised anything but a UsageError")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"{'parser':<14}{'inputs':>8}{'accepted':>10}{'UsageError':>12}{'other':>8}{'slowest s':>11}")
        for name, (make, parse) in parsers(work).items():
            outcomes: Counter[str] = Counter()
            seen: dict[str, str] = {}
            slowest = 0.0
            for index in range(args.inputs):
                suffix, data = make(rng)
                path = work / f"input{suffix}"
                path.write_bytes(data)
                start = time.perf_counter()
                try:
                    parse(path)
                    outcomes["accepted"] += 1
                except UsageError:
                    outcomes["UsageError"] += 1
                except Exception as err:  # what this bench is here to find
                    outcomes["other"] += 1
                    key = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                    if key not in seen and args.keep:
                        args.keep.mkdir(parents=True, exist_ok=True)
                        seen[key] = str(args.keep / f"{name.split()[0].lower()}-{index}{suffix}")
                        Path(seen[key]).write_bytes(data)
                    seen.setdefault(key, "")
                slowest = max(slowest, time.perf_counter() - start)
            print(f"{name:<14}{args.inputs:>8}{outcomes['accepted']:>10}{outcomes['UsageError']:>12}"
                  f"{outcomes['other']:>8}{slowest:>11.3f}")
            for key, kept in seen.items():
                print(f"    other: {key}" + (f"  (input: {kept})" if kept else ""))
            failures += outcomes["other"]
    print(f"{args.inputs * 5} inputs; {failures} raised anything but a UsageError")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
