"""Read instance-segmentation datasets into one form for every family: an image, whether it is
shown EXIF-turned, and a source of its objects' masks and class names.

Formats: COCO (polygons, RLE compressed or not, crowd), VIA 1.x/2.x JSON, mask-folder (images/ +
masks/ instance-id PNGs), LabPicsV1 (Image/ + Instance/), Pascal VOC (SegmentationObject per
instance, or SegmentationClass per class; palette or RGB), Datumaro JSON, and Hugging Face Parquet.
Broken samples and objects are skipped and counted by reason, with the first few file names;
`check_split` decodes each sample once and says what is usable (see `summary`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kubetune_trainer.config import DataSpec
from kubetune_trainer.datasets import parquet, voc
from kubetune_trainer.datasets.files import IMAGE_SUFFIXES, ImageFinder, first_file, load_json
from kubetune_trainer.datasets.masks import (
    DEFAULT_CLASS,
    DatumaroMasks,
    InstancePng,
    MaskSource,
    PolygonMasks,
    VocMasks,
    polygon_parts,
)
from kubetune_trainer.datasets.via import read_via, via_class
from kubetune_trainer.errors import DataError
from kubetune_trainer.paths import OutsideRoot

Which = Literal["train", "validation"]
EXAMPLES = 3  # file names kept per skip reason
OUTSIDE = "file name outside the dataset"
DEGENERATE = "polygon with fewer than 3 points"


@dataclass(frozen=True)
class Sample:
    image: Path
    masks: MaskSource
    exif: bool = True  # the annotations are on the image as EXIF shows it (data.exifOrientation)


@dataclass
class SplitReport:
    """What one split's annotations name, and what was skipped, by reason, with examples."""

    split: str
    where: str
    samples: list[Sample] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)  # declared by the format; [] = the names seen
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    notes: Counter = field(default_factory=Counter)  # kept, but worth saying (crowd annotations)

    def skip(self, reason: str, name: str = "", count: int = 1) -> None:
        self.skipped[reason] += count
        if name and len(shown := self.examples.setdefault(reason, [])) < EXAMPLES and name not in shown:
            shown.append(name)

    def refuse(self, exc: OutsideRoot) -> None:
        """A name that leads out of the dataset: counted and named, never opened."""
        self.skip(OUTSIDE, str(exc))

    @property
    def refused(self) -> list[str]:
        return self.examples.get(OUTSIDE, [])


@dataclass(frozen=True)
class Where:
    """One split to read: the spec, the dataset root, the split's value and image folder."""

    data: DataSpec
    root: Path
    which: Which
    scratch: Path | None  # for bytes embedded in Parquet

    @property
    def value(self) -> str:
        value = self.data.train if self.which == "train" else self.data.validation
        if value is None:
            raise DataError(f"data.{self.which} is not set")
        return value

    @property
    def images(self) -> Path | None:
        folder = self.data.train_images if self.which == "train" else self.data.validation_images
        return self.root / folder if folder else None

    def finder(self, annotations: Path) -> ImageFinder:
        return ImageFinder(self.root, annotations, self.images)

    def found(self, report: SplitReport, finder: ImageFinder, name: str) -> Path | None:
        """The image `name` names, or None with the skip (and the paths tried) recorded."""
        try:
            image, tried = finder.find(name)
        except OutsideRoot as exc:
            report.refuse(exc)
            return None
        if image is None:
            places = ", ".join(str(p.relative_to(self.root)) if p.is_relative_to(self.root) else str(p) for p in tried)
            report.skip("missing image file", f"{name} (looked for {places})")
        return image


def read_split(data: DataSpec, root: Path, which: Which = "train", scratch: Path | None = None) -> SplitReport:
    """Every sample split `which` of `data` names under the staged `root`; errors name the split."""
    where = Where(data, root, which, scratch)
    report = SplitReport(which, f"{data.format} {where.value!r} under {root}")
    readers = {
        "coco": _read_coco,
        "via": _read_via,
        "mask-folder": _read_mask_folder,
        "labpics": _read_labpics,
        "voc": _read_voc,
        "voc-semantic": _read_voc,
        "datumaro": _read_datumaro,
        "parquet": _read_parquet,
    }
    try:
        readers[data.format](where, report)
    except DataError as exc:
        raise DataError(f"data.{which}: {exc}") from exc
    return report


def _crowd(where: Where, report: SplitReport, crowd: object, name: str) -> bool:
    """Whether to keep an annotation by its crowd flag (data.crowd)."""
    if not crowd:
        return True
    if where.data.crowd == "skip":
        report.skip("crowd annotation (data.crowd: skip)", name)
        return False
    report.notes["crowd annotations read as instances (data.crowd: instances)"] += 1
    return True


def _read_coco(where: Where, report: SplitReport) -> None:
    path = where.root / where.value
    data = load_json(path)
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise DataError(f"{path} is not a COCO file: it needs 'images' and 'annotations' lists")
    declared = [c for c in data.get("categories") or [] if isinstance(c, dict) and "id" in c]
    categories = {c["id"]: str(c.get("name", c["id"])) for c in declared}
    # Roboflow declares the dataset itself as category 0, the supercategory of every real one,
    # with no annotation of its own: it is not a class.
    used = {a.get("category_id") for a in data["annotations"] if isinstance(a, dict)}
    parents = {c.get("supercategory") for c in declared}
    for key, name in list(categories.items()):
        if name in parents and key not in used and len(categories) > 1:
            del categories[key]
    ids = sorted(categories) if all(isinstance(k, int) for k in categories) else sorted(categories, key=str)
    report.classes = [categories[k] for k in ids] or [DEFAULT_CLASS]
    by_image: dict[object, list[tuple[str, object]]] = {}
    for ann in data["annotations"]:
        ann = ann if isinstance(ann, dict) else {}
        label = f"annotation {ann.get('id')} of image {ann.get('image_id')}"
        seg = ann.get("segmentation")
        if "image_id" not in ann or not seg:
            report.skip("annotation without a mask (a box only)", label)
            continue
        if not _crowd(where, report, ann.get("iscrowd"), label):
            continue
        if categories and ann.get("category_id") not in categories:
            report.skip("annotation with a category_id not in 'categories'", label)
            continue
        if isinstance(seg, list):
            seg = polygon_parts(seg)
            if not seg:
                report.skip(DEGENERATE, label)
                continue
        elif not isinstance(seg, dict) or "counts" not in seg:
            report.skip("annotation with an unreadable segmentation", label)
            continue
        name = categories.get(ann.get("category_id"), DEFAULT_CLASS)
        by_image.setdefault(ann["image_id"], []).append((name, seg))
    finder = where.finder(path)
    for img in data["images"]:
        img = img if isinstance(img, dict) else {}
        image = where.found(report, finder, str(img.get("file_name", "")))
        if image is not None:
            objects = by_image.get(img.get("id"), [])
            names, segs = tuple(n for n, _ in objects), tuple(s for _, s in objects)
            report.samples.append(Sample(image, PolygonMasks(segs, names), where.data.exif_orientation == "apply"))


def _read_via(where: Where, report: SplitReport) -> None:
    path = where.root / where.value
    finder = where.finder(path)
    attribute = where.data.class_attribute
    for entry in read_via(path):
        polygons, names = [], []
        for region in entry.regions:
            if region.polygon is None:
                report.skip(region.problem, entry.filename)
                continue
            name = via_class(region.attributes, attribute)
            if name is None:
                report.notes[
                    f"regions with several attributes ({', '.join(sorted(region.attributes))}) read as "
                    f"{DEFAULT_CLASS!r}: name the class one in data.classAttribute"
                ] += 1
                name = DEFAULT_CLASS
            polygons.append([region.polygon])
            names.append(name)
        image = where.found(report, finder, entry.filename)
        if image is not None:
            masks = PolygonMasks(tuple(polygons), tuple(names))
            report.samples.append(Sample(image, masks, where.data.exif_orientation == "apply"))


def _paired(where: Where, report: SplitReport, images: Path, masks: Path, style: str) -> None:
    if not images.is_dir():
        raise DataError(f"image folder {images} does not exist")
    for image in sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        try:  # a symlink in the folder may lead anywhere
            found = first_file(where.root, image.name, [image])
            mask = first_file(where.root, image.stem + ".png", [masks / (image.stem + ".png")]) if found else None
        except OutsideRoot as exc:
            report.refuse(exc)
            continue
        if found is not None and mask is not None:
            report.samples.append(Sample(found, InstancePng(mask, style), where.data.exif_orientation == "apply"))
        else:
            report.skip("missing mask file", f"{image.name} (no {masks.name}/{image.stem}.png)")


def _read_mask_folder(where: Where, report: SplitReport) -> None:
    base = where.root / where.value
    _paired(where, report, base / "images", base / "masks", "ids")


def _read_labpics(where: Where, report: SplitReport) -> None:
    base = where.root / where.value
    _paired(where, report, base / "Image", base / "Instance", "labpics")


def _read_voc(where: Where, report: SplitReport) -> None:
    """SegmentationObject for instances (format voc) with their class from SegmentationClass, or
    SegmentationClass alone, one object per class (voc-semantic)."""
    root, semantic = where.root, where.data.format == "voc-semantic"
    labelmap = voc.read_labelmap(root)
    report.classes = labelmap.classes
    for name in voc.image_set(root, where.value):
        try:
            image = first_file(root, name, voc.image_paths(root, name))
            objects = None if semantic else first_file(root, name, [voc.mask_path(root, "SegmentationObject", name)])
            classes = first_file(root, name, [voc.mask_path(root, "SegmentationClass", name)])
        except OutsideRoot as exc:
            report.refuse(exc)
            continue
        if image is None:
            report.skip("missing image file", f"{name} (looked for JPEGImages/{name}.*)")
        elif (objects if not semantic else classes) is None:
            folder = "SegmentationClass" if semantic else "SegmentationObject"
            report.skip("missing mask file", f"{name} (no {folder}/{name}.png)")
        else:
            masks = VocMasks(objects, classes, labelmap)
            report.samples.append(Sample(image, masks, where.data.exif_orientation == "apply"))


DATUMARO_SHAPES = ("polygon", "mask")
IMAGE_LEVEL = ("label", "caption")  # not objects, nothing to skip


def _read_datumaro(where: Where, report: SplitReport) -> None:
    """Datumaro's JSON: annotations/<subset>.json, images under images/<subset>/. Polygons and
    RLE masks that share a non-zero `group` and label are parts of one object."""
    root, split = where.root, where.value
    path = root / split if split.endswith(".json") else root / "annotations" / f"{split}.json"
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("items"), list):
        raise DataError(f"{path} is not a Datumaro annotation file: it needs an 'items' list")
    labels = ((data.get("categories") or {}).get("label") or {}).get("labels") or []
    label_names = [str(lab.get("name", i)) if isinstance(lab, dict) else str(lab) for i, lab in enumerate(labels)]
    report.classes = label_names or [DEFAULT_CLASS]
    finder = where.finder(path)
    for item in data["items"]:
        item = item if isinstance(item, dict) else {}
        item_id = str(item.get("id"))
        media = item.get("media") or item.get("image") or {}
        if not isinstance(media, dict) or not media.get("path"):
            report.skip("Datumaro item without an image", item_id)
            continue
        objects: dict[tuple, list] = {}
        names: dict[tuple, str] = {}
        for ann in item.get("annotations") or []:
            ann = ann if isinstance(ann, dict) else {}
            kind = ann.get("type")
            if kind in IMAGE_LEVEL:
                continue
            if kind not in DATUMARO_SHAPES:
                report.skip(f"Datumaro {kind} annotation (no mask)", item_id)
                continue
            if not _crowd(where, report, (ann.get("attributes") or {}).get("is_crowd"), item_id):
                continue
            if kind == "polygon":
                parts = polygon_parts([ann.get("points")])
                if not parts:
                    report.skip(DEGENERATE, item_id)
                    continue
                part: object = parts[0]
            elif isinstance(ann.get("rle"), dict) and "counts" in ann["rle"]:
                part = dict(ann["rle"])
            else:
                report.skip("Datumaro mask annotation without its RLE", item_id)
                continue
            group, label = ann.get("group") or 0, ann.get("label_id")
            key = (group, label) if group else ("id", len(objects))
            objects.setdefault(key, []).append(part)
            in_range = isinstance(label, int) and 0 <= label < len(label_names)
            names[key] = label_names[label] if in_range else DEFAULT_CLASS
        image = where.found(report, finder, str(media["path"]))
        if image is not None:
            masks = DatumaroMasks(tuple(tuple(p) for p in objects.values()), tuple(names[k] for k in objects))
            report.samples.append(Sample(image, masks, where.data.exif_orientation == "apply"))


def _read_parquet(where: Where, report: SplitReport) -> None:
    """Hugging Face Parquet: each row's mask image is read like a mask folder's (each non-zero
    value one object; a binary mask is one object)."""
    if where.scratch is None:
        raise DataError("format parquet needs a scratch folder for the images it holds")
    data = where.data
    for file in parquet.parquet_files(where.root, where.value):
        finder = where.finder(file)
        scratch = where.scratch / "parquet"
        for row in parquet.rows(file, data.image_column, data.mask_column):
            try:
                image = parquet.materialize(row.image, finder, scratch)
                mask = parquet.materialize(row.mask, finder, scratch)
            except OutsideRoot as exc:
                report.refuse(exc)
                continue
            if image is None:
                report.skip("missing image file", row.image.name)
            elif mask is None:
                report.skip("missing mask file", row.mask.name)
            else:
                report.samples.append(Sample(image, InstancePng(mask, "ids"), data.exif_orientation == "apply"))
