"""Reading the files a dataset is made of: annotation JSON and images (pixels or only the header),
with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from kubetune_trainer.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def load_json(path: Path) -> object:
    if not path.is_file():
        raise DataError(f"annotation file {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"annotation file {path} is not valid JSON: {exc}") from exc


def resolve_image(base: Path, name: str) -> Path | None:
    for candidate in (base / name, base / "images" / name):
        if candidate.is_file():
            return candidate
    return None


def load_image(path: Path) -> np.ndarray:
    """RGB uint8 array; raises OSError/ValueError for an unreadable or truncated file."""
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file's header, without decoding the pixels."""
    with Image.open(path) as im:
        return im.height, im.width
