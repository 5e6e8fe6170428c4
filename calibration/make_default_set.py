"""Regenerate `calibration/images/`: the default calibration and held-out set that ships with edgekit.

Source photos are the real colour photographs that scikit-image and scikit-learn ship in their
wheels (public-domain or CC0, see their data READMEs). Each photo gives its full frame plus
several crops at different scales and positions, resized so the short side is 256 px, which
is what a classifier preprocessor resizes to anyway. Run once with scikit-image and
scikit-learn installed; the output is committed, so users need neither.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

PHOTOS = {
    "skimage": ["astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
                "motorcycle_left.png", "retina.jpg", "rocket.jpg"],
    "sklearn": ["china.jpg", "flower.jpg"],
}
# (scale of the short side kept, x position, y position) of each crop, positions in 0..1
CROPS = [(1.0, 0.5, 0.5), (0.8, 0.0, 0.0), (0.8, 1.0, 0.0), (0.8, 0.0, 1.0), (0.8, 1.0, 1.0),
         (0.6, 0.5, 0.5), (0.5, 0.25, 0.25), (0.5, 0.75, 0.25), (0.5, 0.25, 0.75), (0.5, 0.75, 0.75)]
SHORT_SIDE = 256


def source_paths() -> list[Path]:
    import skimage.data
    import sklearn.datasets

    roots = {"skimage": Path(skimage.data.__file__).parent,
             "sklearn": Path(sklearn.datasets.__file__).parent / "images"}
    return [roots[pkg] / name for pkg, names in PHOTOS.items() for name in names]


def crops(image: Image.Image) -> list[Image.Image]:
    width, height = image.size
    out = []
    for scale, fx, fy in CROPS:
        side = int(min(width, height) * scale)
        cw, ch = (side, side) if scale < 1.0 else (width, height)
        left, top = int((width - cw) * fx), int((height - ch) * fy)
        crop = image.crop((left, top, left + cw, top + ch))
        ratio = SHORT_SIDE / min(crop.size)
        out.append(crop.resize((round(crop.width * ratio), round(crop.height * ratio)), Image.BICUBIC))
    return out


def main() -> None:
    dest = Path(__file__).parent / "images"
    dest.mkdir(exist_ok=True)
    for path in source_paths():
        image = Image.open(path).convert("RGB")
        for i, crop in enumerate(crops(image)):
            crop.save(dest / f"{path.stem}_{i:02d}.jpg", quality=90)
    print(f"wrote {len(list(dest.glob('*.jpg')))} images to {dest}")


if __name__ == "__main__":
    main()
