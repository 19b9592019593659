"""Read instance-segmentation datasets into one form: an image path and a way to decode its masks.

Formats: COCO (polygons and RLE), VIA JSON (the Detectron2 balloon tutorial), mask-folder
(images/ + masks/ instance-id PNGs), LabPicsV1 (Image/ + Instance/), Pascal VOC
(SegmentationObject per instance, or SegmentationClass per class), Datumaro JSON (polygons and
RLE masks, as OpenVINO Training Extensions exports them). Broken samples are skipped and counted,
never fatal one by one; a split with no usable sample left is a `DataError`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import structlog
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

from kubetune_trainer.errors import DataError

log = structlog.get_logger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class PolygonMasks:
    """COCO-style segmentations: a polygon list, or an RLE dict (compressed or not), per object."""

    segmentations: tuple

    def __call__(self, height: int, width: int) -> np.ndarray:
        out = []
        for seg in self.segmentations:
            if isinstance(seg, dict):
                rle = seg if isinstance(seg["counts"], str | bytes) else mask_utils.frPyObjects(seg, height, width)
            else:
                rle = mask_utils.merge(mask_utils.frPyObjects([p for p in seg if len(p) >= 6], height, width))
            if list(rle["size"]) != [height, width]:
                raise ValueError(f"an RLE mask is {rle['size'][1]}x{rle['size'][0]}, its image is {width}x{height}")
            out.append(mask_utils.decode(rle).astype(bool))
        return np.stack(out) if out else np.zeros((0, height, width), bool)


@dataclass(frozen=True)
class InstancePng:
    """A PNG whose pixel values are instance ids (0 = background); `style` says how to read it."""

    path: Path
    style: str = "ids"  # ids | labpics | voc

    def __call__(self, height: int, width: int) -> np.ndarray:
        with Image.open(self.path) as im:
            if self.style == "labpics":
                # LabPicsV1 Instance PNGs: material instances in blue, vessels in red.
                rgb = np.asarray(im.convert("RGB"))
                ids = rgb[..., 2].astype(np.int32)
                ids[ids == 0] = rgb[..., 0][ids == 0].astype(np.int32) * (int(ids.max()) + 1)
            elif im.mode in ("P", "L", "I", "I;16"):
                ids = np.asarray(im).astype(np.int32)
            else:
                ids = np.asarray(im.convert("L")).astype(np.int32)
        if ids.shape != (height, width):
            raise ValueError(f"mask {self.path.name} is {ids.shape[1]}x{ids.shape[0]}, image is {width}x{height}")
        values = [v for v in np.unique(ids) if v != 0 and not (self.style == "voc" and v == 255)]
        return np.stack([ids == v for v in values]) if values else np.zeros((0, height, width), bool)


MaskSource = Callable[[int, int], np.ndarray]


@dataclass(frozen=True)
class Sample:
    image: Path
    masks: MaskSource


@dataclass
class SplitReport:
    """What was read and what was skipped, by reason (logged as one warning)."""

    samples: list[Sample] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)


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
        image = resolve_image(path.parent, str(img.get("file_name", "")))
        if image is None:
            report.skipped["missing image file"] += 1
        elif img.get("id") not in by_image:
            report.skipped["image without annotations"] += 1
        else:
            report.samples.append(Sample(image, PolygonMasks(tuple(by_image[img["id"]]))))


def _read_via(root: Path, split: str, report: SplitReport) -> None:
    path = root / split
    data = load_json(path)
    entries = data.get("_via_img_metadata", data) if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise DataError(f"{path} is not a VIA project/export (expected an object of images)")
    for entry in entries.values():
        if not isinstance(entry, dict) or "filename" not in entry:
            raise DataError(f"{path}: VIA entries need a 'filename'")
        regions = entry.get("regions") or []
        regions = list(regions.values()) if isinstance(regions, dict) else regions
        polygons = [p for p in (via_polygon(r.get("shape_attributes", {})) for r in regions) if p]
        report.skipped["unsupported VIA shape"] += len(regions) - len(polygons)
        image = resolve_image(path.parent, entry["filename"])
        if image is None:
            report.skipped["missing image file"] += 1
        elif not polygons:
            report.skipped["image without annotations"] += 1
        else:
            report.samples.append(Sample(image, PolygonMasks(tuple([p] for p in polygons))))


def via_polygon(shape: dict) -> list[float] | None:
    if shape.get("name") in ("polygon", "polyline") and len(shape.get("all_points_x", [])) >= 3:
        xs, ys = shape["all_points_x"], shape["all_points_y"]
        return [float(v) + 0.5 for xy in zip(xs, ys, strict=False) for v in xy]
    if shape.get("name") == "rect":
        x, y, w, h = (float(shape[k]) for k in ("x", "y", "width", "height"))
        return [x, y, x + w, y, x + w, y + h, x, y + h]
    return None


def _paired(images: Path, masks: Path, style: str, report: SplitReport) -> None:
    if not images.is_dir():
        raise DataError(f"image folder {images} does not exist")
    for image in sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        mask = masks / (image.stem + ".png")
        if mask.is_file():
            report.samples.append(Sample(image, InstancePng(mask, style)))
        else:
            report.skipped["missing mask file"] += 1


def _read_mask_folder(root: Path, split: str, report: SplitReport) -> None:
    _paired(root / split / "images", root / split / "masks", "ids", report)


def _read_labpics(root: Path, split: str, report: SplitReport) -> None:
    _paired(root / split / "Image", root / split / "Instance", "labpics", report)


def _read_voc(root: Path, split: str, report: SplitReport, masks: str = "SegmentationObject") -> None:
    ids_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not ids_file.is_file():
        raise DataError(f"VOC image set {ids_file} does not exist")
    for name in ids_file.read_text().split():
        image = root / "JPEGImages" / f"{name}.jpg"
        mask = root / masks / f"{name}.png"
        if not image.is_file() or not mask.is_file():
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
        image = _datumaro_image(root, path.parent, subset, str(media["path"]))
        if image is None:
            report.skipped["missing image file"] += 1
        elif not objects:
            report.skipped["image without annotations"] += 1
        else:
            report.samples.append(Sample(image, DatumaroMasks(tuple(tuple(parts) for parts in objects.values()))))


def _datumaro_image(root: Path, annotations: Path, subset: str, name: str) -> Path | None:
    for candidate in (root / "images" / subset / name, root / "images" / name, annotations / name):
        if candidate.is_file():
            return candidate
    return None


@dataclass(frozen=True)
class DatumaroMasks:
    """One object per entry: the union of its polygons ([x, y, ...]) and RLE masks."""

    objects: tuple

    def __call__(self, height: int, width: int) -> np.ndarray:
        out = []
        for parts in self.objects:
            polygons = tuple(p for p in parts if not isinstance(p, dict))
            masks = [PolygonMasks((p,))(height, width)[0] for p in parts if isinstance(p, dict)]
            if polygons:
                masks.append(PolygonMasks((polygons,))(height, width)[0])
            out.append(np.logical_or.reduce(masks))
        return np.stack(out) if out else np.zeros((0, height, width), bool)


def load_image(path: Path) -> np.ndarray:
    """RGB uint8 array; raises OSError/ValueError for an unreadable or truncated file."""
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file's header, without decoding the pixels."""
    with Image.open(path) as im:
        return im.height, im.width


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
    if not usable:
        raise DataError(
            f"no usable sample in {fmt} split {split!r} under {root} (skipped: {dict(report.skipped) or 'none found'})"
        )
    return usable
