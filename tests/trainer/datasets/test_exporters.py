"""Datasets as annotation tools export them, each tool's conventions reproduced: where images go
beside the annotations (CVAT, Datumaro, COCO, Roboflow, Label Studio), crowd RLE, VIA 1.x and
2.x shapes and attributes, CVAT/Datumaro VOC in RGB with a labelmap, Datumaro items without
media, EXIF-rotated photos and degenerate polygons. The same readers serve every family."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from kubetune_trainer.datasets.checks import check_split
from kubetune_trainer.datasets.files import image_size, load_image
from kubetune_trainer.datasets.voc import COLORMAP
from kubetune_trainer.errors import DataError
from PIL import Image
from pycocotools import mask as mask_utils

from tests.factories import read, usable

SQUARE = [[4.0, 4.0, 20.0, 4.0, 20.0, 16.0, 4.0, 16.0]]


def rgb(path: Path, h: int = 32, w: int = 40, exif: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[: h // 2, : w // 2] = (250, 10, 10)  # a red top-left quarter shows which way is up
    image = Image.fromarray(pixels)
    if exif is None:
        image.save(path)
    else:
        tags = Image.Exif()
        tags[0x0112] = exif
        image.save(path, exif=tags)


def coco(path: Path, names: list[str], annotations: list[dict] | None = None, **extra) -> None:
    """A COCO file as CVAT/Datumaro write it: ids from 1, categories, one polygon per image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [{"id": i + 1, "file_name": n, "width": 40, "height": 32} for i, n in enumerate(names)]
    if annotations is None:
        annotations = [
            {"id": i + 1, "image_id": i + 1, "category_id": 1, "segmentation": SQUARE, "iscrowd": 0, "area": 192}
            for i in range(len(names))
        ]
    categories = extra.pop("categories", [{"id": 1, "name": "cell", "supercategory": ""}])
    content = {"licenses": [], "info": {}, "categories": categories, "images": images, "annotations": annotations}
    path.write_text(json.dumps({**content, **extra}))


@pytest.mark.parametrize(
    ("annotations", "image_folder", "file_name"),
    [
        ("annotations/instances_default.json", "images/default", "frame_000.jpg"),  # CVAT 2.x COCO 1.0
        ("annotations/instances_default.json", "images", "frame_000.jpg"),  # CVAT 1.x
        ("annotations/instances_train.json", "images/train", "a/b/frame_000.jpg"),  # Datumaro, sub-folders
        ("annotations/instances_val2017.json", "val2017", "frame_000.jpg"),  # COCO 2017
        ("train/_annotations.coco.json", "train", "frame_000.jpg"),  # Roboflow
        ("result.json", "", "images/frame_000.jpg"),  # Label Studio's COCO export
        ("result.json", "images", "images\\frame_000.jpg"),  # written on Windows
        ("export/labels.json", "export/images", "/data/upload/7/frame_000.jpg"),  # absolute: refused
    ],
)
def test_images_are_found_where_each_exporter_puts_them(
    tmp_path: Path, annotations: str, image_folder: str, file_name: str
) -> None:
    image = tmp_path / image_folder / file_name.replace("\\", "/")
    rgb(image)
    categories = [{"id": 1, "name": "cell", "supercategory": "cells-x2f"}]
    if "_annotations" in annotations:  # Roboflow: the dataset itself is category 0, never used
        categories.insert(0, {"id": 0, "name": "cells-x2f", "supercategory": "none"})
    coco(tmp_path / annotations, [file_name], categories=categories)
    report = read("coco", tmp_path, annotations)
    if file_name.startswith("/"):  # never opened, however plausible its last part
        assert report.samples == [] and report.skipped == {"file name outside the dataset": 1}
        return
    assert [s.image for s in report.samples] == [image] and not report.skipped
    assert report.classes == ["cell"]


def test_an_explicit_image_folder_and_a_missing_image_names_the_places_tried(tmp_path: Path) -> None:
    rgb(tmp_path / "pictures" / "2024" / "a.jpg")
    coco(tmp_path / "labels" / "train.json", ["a.jpg", "b.jpg"])
    report = read("coco", tmp_path, "labels/train.json")
    assert report.samples == [] and report.skipped == {"missing image file": 2}
    tried = report.examples["missing image file"][0]
    assert tried.startswith("a.jpg (looked for labels/a.jpg, labels/images/a.jpg, labels/images/train/a.jpg")
    assert "images/train/a.jpg" in tried and "train/a.jpg" in tried
    with pytest.raises(DataError, match=r"data.train: no usable sample(.|\n)*looked for labels/a.jpg"):
        usable("coco", tmp_path, "labels/train.json")

    report = read("coco", tmp_path, "labels/train.json", trainImages="pictures/2024")
    assert [s.image.name for s in report.samples] == ["a.jpg"]
    assert report.examples["missing image file"] == ["b.jpg (looked for pictures/2024/b.jpg)"]


def cvat_brush(mask: np.ndarray) -> dict:
    """CVAT's and Datumaro's COCO export of a mask: iscrowd 1, uncompressed (column-major) RLE."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return {"counts": counts, "size": list(mask.shape)}


def test_crowd_masks_as_cvat_writes_them_are_instances_unless_skipped(tmp_path: Path) -> None:
    rgb(tmp_path / "images" / "default" / "a.jpg")
    brush = np.zeros((32, 40), bool)
    brush[10:20, 5:30] = True
    brush[25:28, 2:6] = True
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": SQUARE, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 2, "segmentation": cvat_brush(brush), "iscrowd": 1},
    ]
    categories = [{"id": 1, "name": "cell"}, {"id": 2, "name": "debris"}]
    coco(tmp_path / "annotations" / "instances_default.json", ["a.jpg"], annotations, categories=categories)
    split = check_split(read("coco", tmp_path, "annotations/instances_default.json"))
    (sample,) = split.samples
    masks = sample.masks(32, 40)
    assert masks.shape == (2, 32, 40) and np.array_equal(masks[1], brush)
    assert sample.masks.labels(32, 40) == ["cell", "debris"]
    assert split.summary.notes == {"crowd annotations read as instances (data.crowd: instances)": 1}
    assert split.summary.objects == 2 and split.summary.classes == ["cell", "debris"]
    # A compressed RLE from the same mask is read the same.
    compressed = mask_utils.encode(np.asfortranarray(brush.astype(np.uint8)))
    annotations[1]["segmentation"] = {"size": [32, 40], "counts": compressed["counts"].decode()}
    coco(tmp_path / "annotations" / "instances_default.json", ["a.jpg"], annotations, categories=categories)
    again = usable("coco", tmp_path, "annotations/instances_default.json")[0].masks(32, 40)
    assert np.array_equal(again, masks)

    skipped = read("coco", tmp_path, "annotations/instances_default.json", crowd="skip")
    assert skipped.samples[0].masks(32, 40).shape == (1, 32, 40)
    assert skipped.skipped == {"crowd annotation (data.crowd: skip)": 1}


def test_degenerate_polygons_and_empty_masks_are_skipped_never_a_crash(tmp_path: Path) -> None:
    rgb(tmp_path / "a.jpg")
    rgb(tmp_path / "b.jpg")
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 5, 5]]},  # two points
        {"id": 2, "image_id": 1, "category_id": 1, "segmentation": [[1, 1], [2, 2, 3]]},
        {"id": 3, "image_id": 1, "category_id": 1, "segmentation": [[3, 3, 9, 3]] + SQUARE},  # one part is fine
        {"id": 4, "image_id": 1, "category_id": 1, "segmentation": [[2, 2, 2, 2, 2, 2]]},  # no area
        {"id": 5, "image_id": 2, "category_id": 1, "segmentation": [[0, 0, 1]]},
        {"id": 6, "image_id": 2, "category_id": 1, "bbox": [1, 1, 4, 4]},  # a box only
    ]
    coco(tmp_path / "ann.json", ["a.jpg", "b.jpg"], annotations)
    split = check_split(read("coco", tmp_path, "ann.json"))
    assert [s.image.name for s in split.samples] == ["a.jpg"]
    assert split.samples[0].masks(32, 40).shape == (1, 32, 40)  # the empty one is dropped too
    assert split.summary.skipped == {
        "polygon with fewer than 3 points": 3,
        "annotation without a mask (a box only)": 1,
        "empty mask (object)": 1,
        "image without annotations": 1,
    }
    assert split.summary.examples["polygon with fewer than 3 points"][0] == "annotation 1 of image 1"


def via_region(shape: dict, **attributes) -> dict:
    return {"shape_attributes": shape, "region_attributes": attributes}


def test_via_1_and_2_shapes_and_the_class_attribute(tmp_path: Path) -> None:
    for name in ("a.jpg", "b.jpg"):
        rgb(tmp_path / name, 64, 80)
    circle = {"name": "circle", "cx": 20, "cy": 20, "r": 8}
    ellipse = {"name": "ellipse", "cx": 50, "cy": 30, "rx": 12, "ry": 4, "theta": np.pi / 2}  # VIA 2: standing
    polyline = {"name": "polyline", "all_points_x": [2, 12, 12], "all_points_y": [40, 40, 60]}
    point = {"name": "point", "cx": 3, "cy": 3}
    # VIA 1.x: regions keyed "0", "1", ...; classes under several attributes.
    via1 = {
        "a.jpg1234": {
            "filename": "a.jpg",
            "size": 1234,
            "file_attributes": {},
            "regions": {
                "0": via_region(circle, species="owl", colour="brown"),
                "1": via_region(point, species="owl", colour="brown"),
            },
        }
    }
    # VIA 2.x project: regions as a list, inside _via_img_metadata.
    via2 = {
        "_via_settings": {},
        "_via_attributes": {},
        "_via_img_metadata": {
            "b.jpg99": {
                "filename": "b.jpg",
                "size": 99,
                "regions": [via_region(ellipse, species="cat", colour="black"), via_region(polyline, species="")],
            }
        },
    }
    (tmp_path / "via1.json").write_text(json.dumps(via1))
    (tmp_path / "via2.json").write_text(json.dumps(via2))

    one = read("via", tmp_path, "via1.json", classAttribute="species")
    assert one.skipped == {"VIA point region (a point has no area to mask)": 1}
    assert one.examples["VIA point region (a point has no area to mask)"] == ["a.jpg"]
    (a,) = one.samples
    circle_mask = a.masks(64, 80)[0]
    assert a.masks.labels(64, 80) == ["owl"] and circle_mask[20, 20] and not circle_mask[20, 29]
    assert circle_mask.sum() == pytest.approx(np.pi * 8**2, rel=0.1)

    two = check_split(read("via", tmp_path, "via2.json", classAttribute="species"))
    (b,) = two.samples
    ellipse_mask, line_mask = b.masks(64, 80)
    ys, xs = np.nonzero(ellipse_mask)  # turned by theta: taller than wide
    assert ys.max() - ys.min() > 2 * (xs.max() - xs.min()) and ellipse_mask[30, 50]
    assert line_mask[50, 10] and b.masks.labels(64, 80) == ["cat", "object"]  # an empty class is "object"
    assert two.summary.classes == ["cat", "object"] and not two.summary.skipped

    # Without classAttribute, several attributes and none class-like: said, not guessed.
    unnamed = read("via", tmp_path, "via1.json")
    assert unnamed.samples[0].masks.labels(64, 80) == ["object"]
    assert any("colour, species" in note and "data.classAttribute" in note for note in unnamed.notes)


def test_a_clean_via_set_reports_no_skips(tmp_path: Path, caplog) -> None:
    rgb(tmp_path / "a.jpg")
    shape = {"name": "polygon", "all_points_x": [2, 20, 20, 2], "all_points_y": [2, 2, 12, 12]}
    entry = {"filename": "a.jpg", "size": 1, "regions": [via_region(shape, label="balloon")]}
    (tmp_path / "via.json").write_text(json.dumps({"a.jpg1": entry}))
    split = check_split(read("via", tmp_path, "via.json"))
    assert split.summary.skipped == {} and split.summary.classes == ["balloon"]
    assert not any("skipped" in line for line in split.summary.lines())


def voc_export(root: Path, labelmap: str | None) -> None:
    """CVAT's / Datumaro's VOC export: RGB masks, images as .png, a labelmap with its colours."""
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "default.txt").write_text("frame_000\nframe_001\n")
    rgb(root / "JPEGImages" / "frame_000.png")
    objects = np.zeros((32, 40), np.uint8)
    objects[2:10, 2:10] = 1  # instances 1 and 16 have the same luma in VOC's colormap
    objects[12:20, 2:10] = 16
    objects[22:30, 20:30] = 2
    objects[11, :] = 255  # void boundary
    classes = np.zeros((32, 40), np.uint8)
    classes[2:20, 2:10] = 1
    classes[22:30, 20:30] = 2
    classes[11, :] = 255
    (root / "SegmentationObject").mkdir()
    (root / "SegmentationClass").mkdir()
    Image.fromarray(COLORMAP[objects]).save(root / "SegmentationObject" / "frame_000.png")
    colours = {0: (0, 0, 0), 1: (250, 50, 83), 2: (36, 179, 83), 255: tuple(COLORMAP[255])}
    painted = np.zeros((32, 40, 3), np.uint8)
    for index, colour in colours.items():
        painted[classes == index] = colour
    Image.fromarray(painted).save(root / "SegmentationClass" / "frame_000.png")
    if labelmap is not None:
        (root / "labelmap.txt").write_text(labelmap)


LABELMAP = "# label:color_rgb:parts:actions\nbackground:0,0,0::\nperson:250,50,83::\ncar:36,179,83::\n"


def test_voc_in_rgb_with_a_labelmap_as_cvat_exports_it(tmp_path: Path) -> None:
    voc_export(tmp_path, LABELMAP)
    report = read("voc", tmp_path, "default")
    assert report.classes == ["person", "car"]
    assert report.skipped == {"missing image file": 1}
    (sample,) = report.samples
    assert sample.image.name == "frame_000.png"
    masks = sample.masks(32, 40)
    assert masks.shape == (3, 32, 40)  # 1 and 16 stay apart, void is no object
    assert sorted(masks.sum(axis=(1, 2)).tolist()) == [64, 64, 80]
    assert sample.masks.labels(32, 40) == ["person", "car", "person"]  # ids 1, 2, 16

    semantic = read("voc-semantic", tmp_path, "default").samples[0]
    assert semantic.masks.labels(32, 40) == ["person", "car"]
    assert semantic.masks(32, 40).sum(axis=(1, 2)).tolist() == [136, 80]  # void row 11 is neither


def test_a_voc_colour_in_no_label_is_named(tmp_path: Path) -> None:
    voc_export(tmp_path, "background:0,0,0::\nperson:1,2,3::\n")  # car's colour is not listed
    with pytest.raises(DataError, match=r"colour \(36, 179, 83\), in no label") as err:
        usable("voc", tmp_path, "default")
    assert "frame_000.png" in str(err.value)


def test_datumaro_items_without_media_and_objects_without_masks_are_skipped(tmp_path: Path) -> None:
    rgb(tmp_path / "images" / "default" / "a.jpg")
    labels = {"label": {"labels": [{"name": "car"}, {"name": "person"}]}}
    items = [
        {
            "id": "a",
            "media": {"path": "a.jpg"},
            "annotations": [
                {"type": "polygon", "points": SQUARE[0], "label_id": 1},
                {"type": "points", "points": [1, 1], "label_id": 0},
                {"type": "polygon", "points": [1, 1, 2, 2], "label_id": 0},
                {"type": "mask", "rle": {"counts": [5, 10, 1265], "size": [32, 40]}, "label_id": 0,
                 "attributes": {"is_crowd": True}},
            ],
        },
        {"id": "video_frame_7", "annotations": [{"type": "polygon", "points": SQUARE[0], "label_id": 0}]},
        {"id": "c", "image": {"path": "c.jpg"}, "annotations": []},
    ]  # fmt: skip
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "default.json").write_text(json.dumps({"categories": labels, "items": items}))
    split = check_split(read("datumaro", tmp_path, "default"))
    assert split.summary.skipped == {
        "Datumaro points annotation (no mask)": 1,
        "polygon with fewer than 3 points": 1,
        "Datumaro item without an image": 1,
        "missing image file": 1,
    }
    assert split.summary.examples["Datumaro item without an image"] == ["video_frame_7"]
    assert split.samples[0].masks.labels(32, 40) == ["person", "car"]
    assert split.summary.notes == {"crowd annotations read as instances (data.crowd: instances)": 1}


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_exif_orientation_is_applied_by_default_and_can_be_ignored(tmp_path: Path, orientation: int) -> None:
    """A phone photo: stored 40×32 with an EXIF orientation; CVAT and Label Studio show it turned,
    so the polygon (in the shown frame) covers what the shown image has there."""
    rgb(tmp_path / "photo.jpg", exif=orientation)
    shown = load_image(tmp_path / "photo.jpg")
    assert shown.shape[:2] == image_size(tmp_path / "photo.jpg")
    stored = load_image(tmp_path / "photo.jpg", exif=False)
    assert stored.shape[:2] == (32, 40) and image_size(tmp_path / "photo.jpg", exif=False) == (32, 40)
    red = (shown[..., 0] > 200) & (shown[..., 1] < 60)
    ys, xs = (v.tolist() for v in np.nonzero(red))
    x0, y0, x1, y1 = min(xs), min(ys), max(xs) + 1, max(ys) + 1
    outline = [[x0, y0, x1, y0, x1, y1, x0, y1]]
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": outline}]
    coco(tmp_path / "ann.json", ["photo.jpg"], annotations)
    (sample,) = usable("coco", tmp_path, "ann.json")
    assert sample.exif
    height, width = image_size(sample.image, sample.exif)
    mask = sample.masks(height, width)[0]
    assert red[mask].mean() > 0.95 and mask.sum() == pytest.approx(red.sum(), rel=0.1)

    (raw,) = usable("coco", tmp_path, "ann.json", exifOrientation="ignore")
    assert not raw.exif and image_size(raw.image, raw.exif) == (32, 40)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_decompression_bomb_and_a_malformed_entry_are_skipped_not_retried(tmp_path: Path) -> None:
    """Past Pillow's pixel limit (89 Mpx) an image is skipped with its reason; so is an `images`
    entry that is not an object. Neither crashes the job into endless retries."""
    rgb(tmp_path / "a.jpg")
    Image.new("L", (10000, 9000)).save(tmp_path / "bomb.png")  # 90 Mpx of zeros: small on disk
    coco(tmp_path / "ann.json", ["a.jpg", "bomb.png"])
    data = json.loads((tmp_path / "ann.json").read_text())
    data["images"].append("c.jpg")
    (tmp_path / "ann.json").write_text(json.dumps(data))
    split = check_split(read("coco", tmp_path, "ann.json"))
    assert [s.image.name for s in split.samples] == ["a.jpg"]
    assert split.summary.skipped["unreadable image or mask"] == 1
    assert "bomb.png" in split.summary.examples["unreadable image or mask"][0]
    assert split.summary.skipped["missing image file"] == 1


def test_the_pixel_limit_follows_the_models_input_side(tmp_path: Path) -> None:
    from kubetune_trainer.datasets import files

    try:
        files.set_pixel_limit(2048)  # 64 inputs of 2048²: 268 Mpx
        assert Image.MAX_IMAGE_PIXELS == 64 * 2048 * 2048
        files.set_pixel_limit(64)  # never below Pillow's own
        assert Image.MAX_IMAGE_PIXELS == files.DEFAULT_PIXEL_LIMIT
    finally:
        Image.MAX_IMAGE_PIXELS = files.DEFAULT_PIXEL_LIMIT
