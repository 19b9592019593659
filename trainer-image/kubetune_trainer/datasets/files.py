"""Reading the files a dataset is made of: annotation JSON, images (pixels or only the header,
EXIF orientation applied or not), and finding the image an annotation names where exporters
put it, with errors that name the file."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from kubetune_trainer.errors import DataError
from kubetune_trainer.paths import OutsideRoot, is_inside

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
EXIF_ORIENTATION = 0x0112
TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
COCO_FILE_PREFIXES = ("instances_", "person_keypoints_", "panoptic_")


def load_json(path: Path) -> object:
    if not path.is_file():
        raise DataError(f"annotation file {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"annotation file {path} is not valid JSON: {exc}") from exc


def first_file(root: Path, name: str, candidates: list[Path]) -> Path | None:
    """The first existing file among `candidates` (the places `name` may mean) that lies inside
    the dataset `root`. Raises OutsideRoot, naming it, when `name` is absolute, holds a NUL byte,
    or every place it names is outside `root` (`..`, or a symlink that leads out)."""
    if "\x00" in name or os.path.isabs(name):
        raise OutsideRoot(f"file name {name!r} is not a path relative to the dataset")
    within = [c for c in candidates if is_inside(root, c)]
    if not within:
        raise OutsideRoot(f"file name {name!r} leads outside the dataset")
    return next((c for c in within if c.is_file()), None)


@dataclass(frozen=True)
class ImageFinder:
    """Where the images of one annotation file are, by the rule every family shares.

    With an explicit image folder (data.trainImages / data.validationImages) only that folder is
    looked in. Otherwise, for an annotation file in folder D whose subset S is its name without
    `instances_`-like prefixes (instances_default.json -> default, instances_train2017.json ->
    train2017), a name N is looked for at D/N (Roboflow's `_annotations.coco.json`, VIA, Label
    Studio's result.json with `images/...` names), D/images/N, D/images/S/N, and beside D (CVAT,
    Datumaro and COCO keep annotations/ apart): D/../images/S/N, D/../images/N, D/../S/N, D/../N.
    Where N has folders that are not there, its last part is looked for the same way. Windows
    separators are read as `/`. A name that leads out of the dataset from the annotation file's
    folder (or the explicit one) is refused, wherever else it might land."""

    root: Path
    annotations: Path  # the annotation file
    images: Path | None = None  # the explicit image folder

    @property
    def subset(self) -> str:
        stem = self.annotations.name.split(".")[0]
        for prefix in COCO_FILE_PREFIXES:
            stem = stem.removeprefix(prefix)
        return stem

    def folders(self) -> list[Path]:
        if self.images is not None:
            return [self.images]
        here, s = self.annotations.parent, self.subset
        near = [here, here / "images", here / "images" / s]
        if here.resolve() != self.root.resolve():  # never above the dataset
            up = here.parent
            near += [up / "images" / s, up / "images", up / s, up]
        return near

    def find(self, name: str) -> tuple[Path | None, list[Path]]:
        """(the image, or None; the paths tried). Raises OutsideRoot for a name that leads out."""
        name = name.replace("\\", "/")
        folders = self.folders()
        if "\x00" not in name and not os.path.isabs(name) and not is_inside(self.root, folders[0] / name):
            raise OutsideRoot(f"file name {name!r} leads outside the dataset")  # from where it is written
        tried = [folder / name for folder in folders]
        found = first_file(self.root, name, tried)
        parts = name.split("/")
        if found is None and len(parts) > 1 and ".." not in parts:
            fallback = [folder / parts[-1] for folder in self.folders()]
            tried += fallback
            found = first_file(self.root, name, fallback)
        return found, tried


def orientation(im: Image.Image) -> int:
    """The image's EXIF orientation (1: as stored)."""
    try:
        value = im.getexif().get(EXIF_ORIENTATION, 1)
    except (OSError, ValueError, SyntaxError):  # a damaged EXIF block reads as none
        return 1
    return value if value in range(1, 9) else 1


def set_pixel_limit(side: int | None) -> None:
    """Pillow's decompression-bomb limit for this job: 64 model inputs' worth of pixels (photos
    are often far larger than the model's side, and are scaled down), at least Pillow's own."""
    if side:
        Image.MAX_IMAGE_PIXELS = max(64 * side * side, DEFAULT_PIXEL_LIMIT)


DEFAULT_PIXEL_LIMIT = Image.MAX_IMAGE_PIXELS or 89_478_485


def load_image(path: Path, exif: bool = True) -> np.ndarray:
    """RGB uint8 array, turned by its EXIF orientation when `exif` (what annotation tools show);
    raises OSError/ValueError for an unreadable or truncated file, and DecompressionBombError
    for one past Pillow's pixel limit (a 20000×20000 PNG would take GBs to decode per step)."""
    with Image.open(path) as im:
        limit = Image.MAX_IMAGE_PIXELS
        if limit and im.width * im.height > limit:  # Pillow only warns up to twice its limit
            raise Image.DecompressionBombError(f"{im.width}x{im.height} pixels, past the limit of {limit}")
        if exif and orientation(im) != 1:
            im = ImageOps.exif_transpose(im)
        return np.array(im.convert("RGB"))


def image_size(path: Path, exif: bool = True) -> tuple[int, int]:
    """(height, width) from the file's header, without decoding the pixels; as shown when `exif`."""
    with Image.open(path) as im:
        turned = exif and orientation(im) in TRANSPOSED
        return (im.width, im.height) if turned else (im.height, im.width)


def image_orientation(path: Path) -> int:
    with Image.open(path) as im:
        return orientation(im)
