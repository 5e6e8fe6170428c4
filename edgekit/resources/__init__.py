"""Data files that ship with edgekit: found beside the package in a wheel, at the repo root in a checkout."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent


def resource_dir(name: str) -> Path:
    """`targets` or `calibration`: the wheel puts them inside the package, a checkout keeps them at the root."""
    for candidate in (_PACKAGE / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"edgekit's {name}/ folder is missing from this install ({_PACKAGE})")


def imagenet_classes() -> list[tuple[str, str]]:
    """The 1000 ImageNet classes in class-index order (line i = class i): synset and name."""
    lines = (Path(__file__).parent / "imagenet_synsets.txt").read_text().splitlines()
    return [(synset, name) for synset, name in (line.split(" ", 1) for line in lines if line.strip())]


def imagenet_synsets() -> list[str]:
    """The 1000 ImageNet synsets in class-index order."""
    return [synset for synset, _ in imagenet_classes()]
