"""Checked splits (any format `datasets` reads) → Detectron2 dataset dicts (plain dicts, no
detectron2 import), so both families read the same images, objects and classes.

Records follow Detectron2's standard dataset dict: file_name, image_id, height, width,
annotations [{bbox, bbox_mode, category_id, segmentation, iscrowd}]. Polygons stay polygons;
every other mask goes as compressed RLE. Detectron2's mapper always turns images by their EXIF
orientation, so with data.exifOrientation ignore the annotations are turned the same way here.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog
from pycocotools import mask as mask_utils

from kubetune_trainer.datasets.checks import SplitData
from kubetune_trainer.datasets.files import image_orientation, image_size
from kubetune_trainer.datasets.masks import encode, turn_mask, turn_polygon
from kubetune_trainer.errors import DataError

log = structlog.get_logger(__name__)
XYXY_ABS = 0  # detectron2.structures.BoxMode.XYXY_ABS


@dataclass
class Split:
    """Records of one split and the class names their category_id indexes."""

    records: list[dict[str, Any]]
    classes: list[str]
    skipped: Counter = field(default_factory=Counter)

    @property
    def has_rle(self) -> bool:
        return any(isinstance(a["segmentation"], dict) for r in self.records for a in r["annotations"])


def to_records(split: SplitData, classes: list[str]) -> Split:
    """One record per usable sample; objects of a class the training split lacks are skipped."""
    skipped: Counter = Counter()
    records = []
    for index, sample in enumerate(split.samples):
        height, width = image_size(sample.image, exif=True)  # as Detectron2's mapper reads it
        turn = 1 if sample.exif else image_orientation(sample.image)
        frame = image_size(sample.image, exif=sample.exif)  # the frame the annotations are in
        annotations = []
        for name, segment in zip(sample.masks.labels(*frame), sample.masks.segments(*frame), strict=True):
            if name not in classes:  # Detectron2 needs a class: a VOC instance on background, a bad label_id
                where = "the training split's" if split.summary.split != "train" else "the declared"
                skipped[f"object whose class {name!r} is not among {where} classes"] += 1
                continue
            segment = turned(segment, turn, *frame)
            annotations.append(
                {
                    "bbox": bbox(segment),
                    "bbox_mode": XYXY_ABS,
                    "segmentation": segment,
                    "category_id": classes.index(name),
                    "iscrowd": 0,  # data.crowd decided already; Detectron2 would drop crowd objects
                }
            )
        records.append(
            {
                "file_name": str(sample.image),
                "image_id": index,
                "height": height,
                "width": width,
                "annotations": annotations,
            }
        )
    if skipped:
        log.warning("skipped objects", split=split.summary.split, **dict(skipped))
    if not records:
        raise DataError(f"data.{split.summary.split}: no usable image in {split.summary.where}")
    return Split(records, classes, skipped)


def turned(segment: Any, orientation: int, height: int, width: int) -> Any:
    """A segment on the stored image, as it lies on the image EXIF shows."""
    if orientation == 1:
        return segment
    if isinstance(segment, dict):
        mask = mask_utils.decode({"size": segment["size"], "counts": segment["counts"].encode("ascii")})
        return encode(turn_mask(mask.astype(bool), orientation))
    return [turn_polygon(p, orientation, height, width) for p in segment]


def bbox(segment: Any) -> list[float]:
    """XYXY box around polygons or a compressed RLE."""
    if isinstance(segment, dict):
        x, y, w, h = mask_utils.toBbox({"size": segment["size"], "counts": segment["counts"].encode("ascii")})
        return [float(x), float(y), float(x + w), float(y + h)]
    points = np.concatenate([np.asarray(p, float) for p in segment])
    xs, ys = points[0::2], points[1::2]
    return [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]
