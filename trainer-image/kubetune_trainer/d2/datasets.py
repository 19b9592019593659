"""VIA and Pascal VOC annotations → Detectron2 dataset dicts (plain dicts, no detectron2 import).

COCO files are read by Detectron2's own `load_coco_json` (see `d2_runtime`); these two formats have
no loader there that keeps instance masks. Records follow Detectron2's standard dataset dict:
file_name, image_id, height, width, annotations [{bbox, bbox_mode, category_id, segmentation,
iscrowd}]. A split with no usable image is a `DataError`; broken images are skipped and counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

from kubetune_trainer.datasets import via, voc
from kubetune_trainer.datasets.files import first_file, image_size, resolve_image
from kubetune_trainer.errors import DataError
from kubetune_trainer.paths import OutsideRoot

log = structlog.get_logger(__name__)
XYXY_ABS = 0  # detectron2.structures.BoxMode.XYXY_ABS
VIA_CLASS_ATTRIBUTES = ("class", "label", "category", "name", "type")
DEFAULT_CLASS = "object"
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


@dataclass
class Split:
    """Records of one split and the class names their category_id indexes."""

    records: list[dict[str, Any]]
    classes: list[str]
    skipped: Counter = field(default_factory=Counter)

    @property
    def has_rle(self) -> bool:
        return any(isinstance(a["segmentation"], dict) for r in self.records for a in r["annotations"])


def _record(image: Path, image_id: int, height: int, width: int, annotations: list[dict]) -> dict[str, Any]:
    """One Detectron2 dataset dict."""
    return {"file_name": str(image), "image_id": image_id, "height": height, "width": width, "annotations": annotations}


def refuse(skipped: Counter, exc: OutsideRoot) -> None:
    """A file name that leads out of the dataset: counted, named in the log, never opened."""
    skipped["file name outside the dataset"] += 1
    log.warning("refused a file name outside the dataset", reason=str(exc))


def finish_split(records: list[dict], classes: list[str], skipped: Counter, where: str, train: bool) -> Split:
    if train:
        empty = [r for r in records if not r["annotations"]]
        if empty:
            skipped["image without annotations"] += len(empty)
        records = [r for r in records if r["annotations"]]
    if skipped:
        log.warning("skipped broken samples", split=where, usable=len(records), **dict(skipped))
    if not records:
        raise DataError(f"no usable image in {where} (skipped: {dict(skipped) or 'none found'})")
    return Split(records, classes, skipped)


def via_class(attributes: Any) -> str:
    """A region's class: a class-like attribute (a string, or the checked box of a checkbox)."""
    if not isinstance(attributes, dict) or not attributes:
        return DEFAULT_CLASS
    names = [k for k in VIA_CLASS_ATTRIBUTES if k in attributes] or (list(attributes) if len(attributes) == 1 else [])
    for name in names:
        value = attributes[name]
        if isinstance(value, str) and value.strip():
            return value.strip()
        if isinstance(value, dict):
            checked = [k for k, on in value.items() if on]
            if len(checked) == 1:
                return checked[0]
    return DEFAULT_CLASS


def read_via(root: Path, split: str, train: bool, classes: list[str] | None = None) -> Split:
    """A VIA project or export (the Detectron2 balloon tutorial's via_region_data.json)."""
    path = root / split
    skipped: Counter = Counter()
    found: list[tuple[Path, list[tuple[str, list[float]]]]] = []
    for entry in via.read_via(path):
        objects = []
        for region in entry.regions:
            if region.polygon is None:
                skipped["unsupported VIA shape"] += 1
            else:
                objects.append((via_class(region.attributes), region.polygon))
        try:
            image = resolve_image(root, path.parent, entry.filename)
        except OutsideRoot as exc:
            refuse(skipped, exc)
            continue
        if image is None:
            skipped["missing image file"] += 1
        else:
            found.append((image, objects))
    names = classes if classes is not None else sorted({name for _, objs in found for name, _ in objs})
    records = []
    for image, objects in found:
        try:
            height, width = image_size(image)
        except (OSError, UnidentifiedImageError) as exc:
            skipped["unreadable image"] += 1
            log.debug("skipped sample", image=str(image), reason=str(exc))
            continue
        annotations = []
        for name, polygon in objects:
            if name not in names:
                skipped[f"class not in the training split: {name}"] += 1
                continue
            xs, ys = polygon[0::2], polygon[1::2]
            annotations.append(
                {
                    "bbox": [min(xs), min(ys), max(xs), max(ys)],
                    "bbox_mode": XYXY_ABS,
                    "segmentation": [polygon],
                    "category_id": names.index(name),
                    "iscrowd": 0,
                }
            )
        records.append(_record(image, len(records), height, width, annotations))
    return finish_split(records, names, skipped, f"via split {split!r} under {root}", train)


def read_voc(root: Path, split: str, train: bool) -> Split:
    """VOC instance segmentation: SegmentationObject gives the instances, SegmentationClass their class."""
    skipped: Counter = Counter()
    records = []
    for name in voc.image_set(root, split):
        try:
            image = first_file(root, name, [voc.image_path(root, name)])
            objects = first_file(root, name, [voc.mask_path(root, "SegmentationObject", name)])
            classes = first_file(root, name, [voc.mask_path(root, "SegmentationClass", name)])
        except OutsideRoot as exc:
            refuse(skipped, exc)
            continue
        if image is None or objects is None or classes is None:
            skipped["missing image or mask file"] += 1
            continue
        try:
            height, width = image_size(image)
            annotations = voc_instances(_palette_indices(objects), _palette_indices(classes))
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            skipped["unreadable image or mask"] += 1
            log.debug("skipped sample", image=str(image), reason=str(exc))
            continue
        if annotations and (height, width) != tuple(annotations[0]["segmentation"]["size"]):
            skipped["mask size differs from image"] += 1
            continue
        records.append(_record(image, len(records), height, width, annotations))
    return finish_split(records, list(VOC_CLASSES), skipped, f"voc split {split!r} under {root}", train)


def _palette_indices(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode not in ("P", "L"):
            raise ValueError(f"{path.name} is a {im.mode} image, not a VOC palette PNG")
        return np.asarray(im)


def voc_instances(objects: np.ndarray, classes: np.ndarray) -> list[dict[str, Any]]:
    """One annotation per instance id (0 background, 255 boundary), its class the most common
    class index under it, its mask as compressed RLE."""
    if objects.shape != classes.shape:
        raise ValueError(f"SegmentationObject is {objects.shape}, SegmentationClass {classes.shape}")
    out = []
    for value in np.unique(objects):
        if value in (0, 255):
            continue
        mask = objects == value
        labels = classes[mask]
        labels = labels[(labels > 0) & (labels <= len(VOC_CLASSES))]
        if labels.size == 0:
            continue
        ys, xs = np.nonzero(mask)
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        out.append(
            {
                "bbox": [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)],
                "bbox_mode": XYXY_ABS,
                "segmentation": rle,
                "category_id": int(np.bincount(labels).argmax()) - 1,
                "iscrowd": 0,
            }
        )
    return out
