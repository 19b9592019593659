"""Read instance-segmentation datasets into one form: an image path and a way to decode its masks.

Formats: COCO (polygons and RLE), VIA JSON (the Detectron2 balloon tutorial), mask-folder
(images/ + masks/ instance-id PNGs), LabPicsV1 (Image/ + Instance/), Pascal VOC
(SegmentationObject per instance, or SegmentationClass per class), Datumaro JSON (polygons and
RLE masks, as OpenVINO Training Extensions exports them). Broken samples are skipped and counted,
never fatal one by one; a split with no usable sample left is a `DataError`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from PIL import UnidentifiedImageError

from kubetune_trainer.datasets import voc
from kubetune_trainer.datasets.files import IMAGE_SUFFIXES, first_file, load_image, load_json, resolve_image
from kubetune_trainer.datasets.masks import DatumaroMasks, InstancePng, MaskSource, PolygonMasks
from kubetune_trainer.datasets.via import read_via
from kubetune_trainer.errors import DataError
from kubetune_trainer.paths import OutsideRoot

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Sample:
    image: Path
    masks: MaskSource


@dataclass
class SplitReport:
    """What was read and what was skipped, by reason (logged as one warning)."""

    samples: list[Sample] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    refused: list[str] = field(default_factory=list)  # file names that lead outside the dataset

    def refuse(self, exc: OutsideRoot) -> None:
        self.skipped["file name outside the dataset"] += 1
        self.refused.append(str(exc))


def read_split(fmt: str, root: Path, split: str) -> SplitReport:
    readers = {
        "coco": _read_coco,
        "via": _read_via,
        "mask-folder": _read_mask_folder,
        "labpics": _read_labpics,
        "voc": _read_voc,
        "voc-semantic": _read_voc_semantic,
        "datumaro": _read_datumaro,
    }
    report = SplitReport()
    readers[fmt](root, split, report)
    return report


def _read_coco(root: Path, split: str, report: SplitReport) -> None:
    path = root / split
    data = load_json(path)
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise DataError(f"{path} is not a COCO file: it needs 'images' and 'annotations' lists")
    by_image: dict[int, list] = {}
    for ann in data["annotations"]:
        seg = ann.get("segmentation") if isinstance(ann, dict) else None
        if not seg or ann.get("iscrowd", 0) or "image_id" not in ann:
            report.skipped["annotation without an instance mask"] += 1
            continue
        by_image.setdefault(ann["image_id"], []).append(seg)
    for img in data["images"]:
        try:
            image = resolve_image(root, path.parent, str(img.get("file_name", "")))
        except OutsideRoot as exc:
            report.refuse(exc)
            continue
        if image is None:
            report.skipped["missing image file"] += 1
        elif img.get("id") not in by_image:
            report.skipped["image without annotations"] += 1
        else:
            report.samples.append(Sample(image, PolygonMasks(tuple(by_image[img["id"]]))))


def _read_via(root: Path, split: str, report: SplitReport) -> None:
    path = root / split
    for entry in read_via(path):
        polygons = [r.polygon for r in entry.regions if r.polygon]
        if len(entry.regions) > len(polygons):
            report.skipped["unsupported VIA shape"] += len(entry.regions) - len(polygons)
        try:
            image = resolve_image(root, path.parent, entry.filename)
        except OutsideRoot as exc:
            report.refuse(exc)
            continue
        if image is None:
            report.skipped["missing image file"] += 1
        elif not polygons:
            report.skipped["image without annotations"] += 1
        else:
            report.samples.append(Sample(image, PolygonMasks(tuple([p] for p in polygons))))


def _paired(root: Path, images: Path, masks: Path, style: str, report: SplitReport) -> None:
    if not images.is_dir():
        raise DataError(f"image folder {images} does not exist")
    for image in sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        try:  # a symlink in the folder may lead anywhere
            image = first_file(root, image.name, [image])
            mask = first_file(root, image.stem + ".png", [masks / (image.stem + ".png")]) if image else None
        except OutsideRoot as exc:
            report.refuse(exc)
            continue
        if image is not None and mask is not None:
            report.samples.append(Sample(image, InstancePng(mask, style)))
        else:
            report.skipped["missing mask file"] += 1


def _read_mask_folder(root: Path, split: str, report: SplitReport) -> None:
    _paired(root, root / split / "images", root / split / "masks", "ids", report)


def _read_labpics(root: Path, split: str, report: SplitReport) -> None:
    _paired(root, root / split / "Image", root / split / "Instance", "labpics", report)


def _read_voc(root: Path, split: str, report: SplitReport, masks: str = "SegmentationObject") -> None:
    for name in voc.image_set(root, split):
        try:
            image = first_file(root, name, [voc.image_path(root, name)])
            mask = first_file(root, name, [voc.mask_path(root, masks, name)])
        except OutsideRoot as exc:
            report.refuse(exc)
            continue
        if image is None or mask is None:
            report.skipped["missing image or mask file"] += 1
        else:
            report.samples.append(Sample(image, InstancePng(mask, "voc")))


def _read_voc_semantic(root: Path, split: str, report: SplitReport) -> None:
    """SegmentationClass PNGs hold class ids, so each class present in an image is one object."""
    _read_voc(root, split, report, masks="SegmentationClass")


DATUMARO_SHAPES = ("polygon", "mask")


def _read_datumaro(root: Path, split: str, report: SplitReport) -> None:
    """Datumaro's JSON: annotations/<subset>.json, images under images/<subset>/. Polygons and
    RLE masks that share a non-zero `group` and label are parts of one object."""
    path = root / split if split.endswith(".json") else root / "annotations" / f"{split}.json"
    subset = path.stem
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("items"), list):
        raise DataError(f"{path} is not a Datumaro annotation file: it needs an 'items' list")
    for item in data["items"]:
        media = (item.get("media") or item.get("image") or {}) if isinstance(item, dict) else {}
        if not isinstance(media, dict) or not media.get("path"):
            raise DataError(
                f"{path}: Datumaro item {item.get('id') if isinstance(item, dict) else item!r} has no image path"
            )
        objects: dict[tuple, list] = {}
        for ann in item.get("annotations") or []:
            kind = ann.get("type") if isinstance(ann, dict) else None
            if kind not in DATUMARO_SHAPES:
                if kind not in ("label", "caption"):  # image-level annotations are not objects
                    report.skipped[f"Datumaro {kind} annotation (no mask)"] += 1
                continue
            try:
                part = ann["points"] if kind == "polygon" else dict(ann["rle"])
            except (KeyError, TypeError) as exc:
                raise DataError(f"{path}: a Datumaro {kind} annotation of item {item.get('id')!r} lacks {exc}") from exc
            group = ann.get("group") or 0
            key = (group, ann.get("label_id")) if group else ("id", len(objects))
            objects.setdefault(key, []).append(part)
        try:
            image = _datumaro_image(root, path.parent, subset, str(media["path"]))
        except OutsideRoot as exc:
            report.refuse(exc)
            continue
        if image is None:
            report.skipped["missing image file"] += 1
        elif not objects:
            report.skipped["image without annotations"] += 1
        else:
            report.samples.append(Sample(image, DatumaroMasks(tuple(tuple(parts) for parts in objects.values()))))


def _datumaro_image(root: Path, annotations: Path, subset: str, name: str) -> Path | None:
    return first_file(root, name, [root / "images" / subset / name, root / "images" / name, annotations / name])


def usable_samples(fmt: str, root: Path, split: str) -> list[Sample]:
    """Read a split, decode every image and mask once, and keep the samples that work."""
    report = read_split(fmt, root, split)
    usable = []
    for sample in report.samples:
        try:
            height, width = load_image(sample.image).shape[:2]
            masks = sample.masks(height, width)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            report.skipped["unreadable image or mask"] += 1
            log.debug("skipped sample", image=str(sample.image), reason=str(exc))
            continue
        if masks.shape[0] == 0 or not masks.any(axis=(1, 2)).all():
            report.skipped["empty mask"] += 1
            if masks.shape[0] == 0 or not masks.any():
                continue
        usable.append(sample)
    if report.skipped:
        log.warning("skipped broken samples", split=split, usable=len(usable), **dict(report.skipped))
    if report.refused:  # names that point out of the dataset (../x, /etc/passwd, a symlink): never opened
        log.warning("refused file names outside the dataset", split=split, names=report.refused[:5])
    if not usable:
        raise DataError(
            f"no usable sample in {fmt} split {split!r} under {root} (skipped: {dict(report.skipped) or 'none found'})"
        )
    return usable
