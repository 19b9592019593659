"""Pascal VOC's layout, as every family reads it: image sets under ImageSets/Segmentation, images
under JPEGImages, masks as palette PNGs beside them."""

from __future__ import annotations

from pathlib import Path

from kubetune_trainer.errors import DataError


def image_set(root: Path, split: str) -> list[str]:
    """The image names of split `split` (ImageSets/Segmentation/<split>.txt)."""
    ids_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not ids_file.is_file():
        raise DataError(f"VOC image set {ids_file} does not exist")
    return ids_file.read_text().split()


def image_path(root: Path, name: str) -> Path:
    return root / "JPEGImages" / f"{name}.jpg"


def mask_path(root: Path, folder: str, name: str) -> Path:
    """SegmentationObject (instances) or SegmentationClass (classes)."""
    return root / folder / f"{name}.png"
