"""Pascal VOC's layout, as every family reads it: image sets under ImageSets/Segmentation, images
under JPEGImages (any image extension), masks under SegmentationObject / SegmentationClass as
palette PNGs (VOC itself) or RGB PNGs (CVAT's and Datumaro's exports), class names and colours
from labelmap.txt when the export has one, else VOC's twenty."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from kubetune_trainer.datasets.files import IMAGE_SUFFIXES
from kubetune_trainer.errors import DataError

VOID = 255  # VOC's boundary / "difficult" index, painted (224, 224, 192)
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def _colormap(n: int = 256) -> np.ndarray:
    """VOC's palette: index i's bits spread over the high bits of r, g and b (a bijection)."""
    cmap = np.zeros((n, 3), np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


COLORMAP = _colormap()


@dataclass(frozen=True)
class Labelmap:
    """Class index -> name (background left out) and the colour each index is painted in."""

    names: dict[int, str]
    colours: np.ndarray  # [N, 3] uint8, row i: index i's colour (VOC's colormap where unset)

    @property
    def classes(self) -> list[str]:
        return [self.names[i] for i in sorted(self.names)]


DEFAULT_LABELMAP = Labelmap({i + 1: n for i, n in enumerate(VOC_CLASSES)}, COLORMAP)


def read_labelmap(root: Path) -> Labelmap:
    """labelmap.txt (`name:r,g,b:parts:actions` per line, as CVAT and Datumaro write it), its
    line order the class index; VOC's twenty classes and colours without one."""
    path = root / "labelmap.txt"
    if not path.is_file():
        return DEFAULT_LABELMAP
    names: dict[int, str] = {}
    colours = COLORMAP.copy()
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if len(lines) > VOID:
        raise DataError(f"{path} lists {len(lines)} labels; VOC masks hold at most {VOID}")
    for index, line in enumerate(lines):
        name, _, rest = line.partition(":")
        colour = rest.split(":")[0].strip()
        if colour:
            try:
                rgb = [int(v) for v in colour.split(",")]
                if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
                    raise ValueError
            except ValueError:
                raise DataError(f"{path}, line {index + 1}: colour {colour!r} is not r,g,b") from None
            colours[index] = rgb
        if name.strip().lower() != "background":
            names[index] = name.strip()
    return Labelmap(names, colours)


def image_set(root: Path, split: str) -> list[str]:
    """The image names of split `split` (ImageSets/Segmentation/<split>.txt)."""
    ids_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not ids_file.is_file():
        raise DataError(f"VOC image set {ids_file} does not exist")
    return [line.split()[0] for line in ids_file.read_text().splitlines() if line.strip()]


def image_paths(root: Path, name: str) -> list[Path]:
    """Where image `name` may be: JPEGImages/<name>.<any image extension>."""
    folder = root / "JPEGImages"
    return [folder / f"{name}{s}" for s in IMAGE_SUFFIXES] + [folder / f"{name}{s.upper()}" for s in IMAGE_SUFFIXES]


def mask_path(root: Path, folder: str, name: str) -> Path:
    """SegmentationObject (instances) or SegmentationClass (classes)."""
    return root / folder / f"{name}.png"


def indices(path: Path, colours: np.ndarray) -> np.ndarray:
    """A VOC mask as class or instance indices: a palette/grey PNG's values as they are, an RGB
    PNG's colours looked up in `colours` (VOC's void colour is 255); a colour in neither is an
    error naming it."""
    with Image.open(path) as im:
        if im.mode in ("P", "L"):
            return np.asarray(im).astype(np.int64)
        rgb = np.asarray(im.convert("RGB")).astype(np.int64)
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    table = colours.astype(np.int64)
    keys = (table[:, 0] << 16) | (table[:, 1] << 8) | table[:, 2]
    lookup = {int(k): i for i, k in reversed(list(enumerate(keys)))}  # the first index wins
    void = COLORMAP[VOID].astype(np.int64)
    lookup.setdefault(int((void[0] << 16) | (void[1] << 8) | void[2]), VOID)
    values, inverse = np.unique(packed, return_inverse=True)
    unknown = [int(v) for v in values if int(v) not in lookup]
    if unknown:
        v = unknown[0]
        raise ValueError(f"mask {path.name} has colour {(v >> 16, (v >> 8) & 255, v & 255)}, in no label")
    return np.asarray([lookup[int(v)] for v in values], np.int64)[inverse.reshape(packed.shape)]
