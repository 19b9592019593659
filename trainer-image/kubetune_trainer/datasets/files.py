"""Reading the files a dataset is made of: annotation JSON and images (pixels or only the header),
with errors that name the file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from kubetune_trainer.errors import DataError
from kubetune_trainer.paths import OutsideRoot, is_inside

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def load_json(path: Path) -> object:
    if not path.is_file():
        raise DataError(f"annotation file {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"annotation file {path} is not valid JSON: {exc}") from exc


def resolve_image(root: Path, base: Path, name: str) -> Path | None:
    """The image an annotation names, looked up beside the annotation file (`base`) and in its
    images/ folder; None when it is not there. Names are untrusted: see `first_file`."""
    return first_file(root, name, [base / name, base / "images" / name])


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


def load_image(path: Path) -> np.ndarray:
    """RGB uint8 array; raises OSError/ValueError for an unreadable or truncated file."""
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file's header, without decoding the pixels."""
    with Image.open(path) as im:
        return im.height, im.width
