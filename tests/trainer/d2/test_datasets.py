"""Checked splits → Detectron2 dataset dicts (`d2.datasets.to_records`): VIA, VOC (palette, RGB
with a labelmap), COCO RLE and crowd, and EXIF orientation. Nothing here imports detectron2."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from kubetune_trainer.d2.datasets import Split, to_records, turned
from kubetune_trainer.datasets.checks import SplitData, check_split
from kubetune_trainer.datasets.masks import encode, turn_mask, turn_polygon
from kubetune_trainer.datasets.readers import read_split
from kubetune_trainer.datasets.voc import VOC_CLASSES
from kubetune_trainer.errors import DataError
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

from tests.factories import data_spec, read

ORIENTATION = 0x0112


def split_of(fmt: str, root: Path, split: str, keep_empty: bool = False, **fields) -> SplitData:
    return check_split(read(fmt, root, split, **fields), keep_empty=keep_empty)


def records_of(fmt: str, root: Path, split: str, keep_empty: bool = False, **fields) -> tuple[SplitData, Split]:
    data = split_of(fmt, root, split, keep_empty, **fields)
    return data, to_records(data, data.classes)


def decode(segment: dict) -> np.ndarray:
    assert isinstance(segment["counts"], str)  # JSON- and Detectron2-ready
    return mask_utils.decode({"size": segment["size"], "counts": segment["counts"].encode("ascii")}).astype(bool)


def rasterise(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))).astype(bool)


def names(split: Split, record: dict) -> list[str]:
    return [split.classes[a["category_id"]] for a in record["annotations"]]


# --- VIA ---------------------------------------------------------------------------------------


def polygon(xs: list[int], ys: list[int], **attributes) -> dict:
    shape = {"name": "polygon", "all_points_x": xs, "all_points_y": ys}
    return {"shape_attributes": shape, "region_attributes": attributes}


def write_via(folder: Path, entries: dict[str, list[dict]], images: tuple[str, ...]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in images:
        Image.new("RGB", (40, 30), (120, 60, 30)).save(folder / name)
    data = {
        f"{name}123": {"filename": name, "size": 123, "regions": dict(enumerate(regions)), "file_attributes": {}}
        for name, regions in entries.items()
    }
    (folder / "via.json").write_text(json.dumps(data))


@pytest.fixture
def via_root(tmp_path: Path) -> Path:
    circle = {"shape_attributes": {"name": "circle", "cx": 5, "cy": 5, "r": 3}, "region_attributes": {}}
    train = {
        "a.png": [polygon([2, 10, 10], [3, 3, 12], **{"class": "dog"}), circle, polygon([20, 30, 25], [1, 1, 9])],
        "b.png": [polygon([0, 5, 5, 0], [0, 0, 5, 5], **{"class": "cat"})],
        "empty.png": [],
        "gone.png": [polygon([0, 5, 5], [0, 0, 5], **{"class": "cat"})],
    }
    write_via(tmp_path / "train", train, ("a.png", "b.png", "empty.png"))
    val = {
        "v.png": [polygon([1, 4, 4], [1, 1, 4], **{"class": "bird"}), polygon([1, 4, 4], [1, 1, 4], label="cat")],
        "w.png": [],
    }
    write_via(tmp_path / "val", val, ("v.png", "w.png"))
    return tmp_path


def test_via_train_split(via_root: Path) -> None:
    data, split = records_of("via", via_root, "train/via.json")
    assert split.classes == data.classes == ["cat", "dog", "object"]  # sorted; no attributes: "object"
    assert [Path(r["file_name"]).name for r in split.records] == ["a.png", "b.png"]  # empty.png left out
    assert [r["image_id"] for r in split.records] == [0, 1]
    a, b = split.records
    assert (a["height"], a["width"]) == (b["height"], b["width"]) == (30, 40)
    assert [ann["category_id"] for ann in a["annotations"]] == [1, 2, 2]  # dog, the circle, an unnamed polygon
    dog, circle, unnamed = a["annotations"]
    assert dog["segmentation"] == [[2.5, 3.5, 10.5, 3.5, 10.5, 12.5]]  # VIA's corners + 0.5, still a polygon
    assert dog["bbox"] == [2.5, 3.5, 10.5, 12.5]  # XYXY around it
    assert unnamed["bbox"] == [20.5, 1.5, 30.5, 9.5]
    assert len(circle["segmentation"]) == 1 and len(circle["segmentation"][0]) == 2 * 64  # the circle's outline
    assert circle["bbox"] == pytest.approx([2.0, 2.0, 8.0, 8.0])
    for ann in a["annotations"] + b["annotations"]:
        assert (ann["bbox_mode"], ann["iscrowd"]) == (0, 0)
    assert names(split, b) == ["cat"] and b["annotations"][0]["bbox"] == [0.5, 0.5, 5.5, 5.5]
    assert not split.skipped and not split.has_rle
    assert data.summary.skipped == {"missing image file": 1, "image without annotations": 1}
    assert data.summary.examples["missing image file"][0].startswith("gone.png (looked for train/gone.png")
    assert data.summary.examples["image without annotations"] == ["empty.png"]
    assert (data.summary.images, data.summary.objects) == (2, 4)


def test_via_validation_keeps_the_training_classes(via_root: Path) -> None:
    train = split_of("via", via_root, "train/via.json")
    spec = data_spec("via", "train/via.json", "val/via.json")
    val = check_split(read_split(spec, via_root, "validation"), keep_empty=True)
    split = to_records(val, train.classes)
    assert split.classes == ["cat", "dog", "object"]
    assert [Path(r["file_name"]).name for r in split.records] == ["v.png", "w.png"]
    v, w = split.records
    assert names(split, v) == ["cat"]  # the bird is skipped, the "label" attribute names the cat
    assert v["annotations"][0]["category_id"] == 0
    assert w["annotations"] == []  # images without objects stay: evaluation counts what is found on them
    assert split.skipped == Counter({"object whose class 'bird' is not among the training split's classes": 1})
    # Without keep_empty (the training rule) w.png is not a record.
    dropped = to_records(check_split(read_split(spec, via_root, "validation")), train.classes)
    assert [Path(r["file_name"]).name for r in dropped.records] == ["v.png"]


def test_a_split_without_usable_images_is_a_data_error(via_root: Path) -> None:
    (via_root / "train" / "none.json").write_text(json.dumps({"x": {"filename": "absent.png", "regions": []}}))
    data = split_of("via", via_root, "train/none.json", keep_empty=True)
    assert data.samples == [] and data.summary.skipped == {"missing image file": 1}
    with pytest.raises(DataError, match=r"data\.train: no usable image in via 'train/none\.json'"):
        to_records(data, ["cat"])


# --- VOC ---------------------------------------------------------------------------------------


def palette_png(array: np.ndarray, path: Path) -> None:
    image = Image.fromarray(array.astype(np.uint8))
    image.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    assert image.mode == "P"
    image.save(path)


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    for folder in ("ImageSets/Segmentation", "JPEGImages", "SegmentationObject", "SegmentationClass"):
        (tmp_path / folder).mkdir(parents=True)
    objects, classes = np.zeros((16, 20), np.uint8), np.zeros((16, 20), np.uint8)
    objects[2:6, 3:9], classes[2:6, 3:9] = 1, 15  # a person, 24 px
    objects[6, 2:10], classes[6, 2:10] = 255, 255  # boundary (void)
    objects[10:14, 10:15], classes[10:14, 10:15] = 2, 8  # a cat, 20 px
    classes[13, 10:15] = 12  # a row of dog under the cat: the commonest class wins
    objects[0, 15:18] = 3  # an instance on background only
    for name in ("good", "rgb", "small"):
        Image.new("RGB", (20, 16), (10, 20, 30)).save(tmp_path / "JPEGImages" / f"{name}.jpg")
        palette_png(objects, tmp_path / "SegmentationObject" / f"{name}.png")
        palette_png(classes, tmp_path / "SegmentationClass" / f"{name}.png")
    # RGB with grey ids: not VOC's colours, so unreadable
    Image.fromarray(np.stack([objects] * 3, -1)).save(tmp_path / "SegmentationObject" / "rgb.png")
    Image.new("RGB", (10, 8)).save(tmp_path / "JPEGImages" / "small.jpg")  # not the masks' size
    (tmp_path / "ImageSets/Segmentation/train.txt").write_text("good\nrgb\nsmall\nabsent\n")
    return tmp_path


def test_voc_instances_take_the_commonest_class_under_them(voc_root: Path) -> None:
    data, split = records_of("voc", voc_root, "train")
    assert split.classes == list(VOC_CLASSES) and split.classes[14] == "person"
    assert [Path(r["file_name"]).name for r in split.records] == ["good.jpg"]
    record = split.records[0]
    assert (record["height"], record["width"], record["image_id"]) == (16, 20, 0)
    person, cat = record["annotations"]
    assert (person["category_id"], cat["category_id"]) == (14, 7)
    assert person["bbox"] == [3.0, 2.0, 9.0, 6.0] and cat["bbox"] == [10.0, 10.0, 15.0, 14.0]
    for ann, area in ((person, 24), (cat, 20)):
        mask = decode(ann["segmentation"])
        assert mask.shape == (16, 20) and int(mask.sum()) == area
        assert (ann["bbox_mode"], ann["iscrowd"]) == (0, 0)
    assert split.has_rle
    assert data.summary.skipped == {"unreadable image or mask": 2, "missing image file": 1}
    assert data.summary.examples["unreadable image or mask"] == [
        "rgb.jpg: mask rgb.png has colour (1, 1, 1), in no label",  # grey ids are not VOC's colours
        "small.jpg: mask small.png is 20x16, image is 10x8",
    ]


def test_voc_instance_on_background_only(voc_root: Path) -> None:
    """Its class is "object", which VOC's twenty do not hold: the promptable families (class-agnostic)
    train on it; Detectron2, which needs a class, drops it and says why."""
    data, split = records_of("voc", voc_root, "train")
    sample = data.samples[0]
    assert sample.masks.labels(16, 20) == ["person", "cat", "object"]
    assert data.summary.objects == 3 and data.summary.classes == ["cat", "person", "object"]
    assert "object" not in data.classes
    assert [len(r["annotations"]) for r in split.records] == [2]
    assert split.skipped == Counter({"object whose class 'object' is not among the declared classes": 1})


LABELMAP = "# label:color_rgb:parts:actions\nbackground:0,0,0::\ncat:128,0,0::\ndog:0,128,0::\nsheep:10,200,30::\n"


@pytest.fixture
def cvat_voc(tmp_path: Path) -> Path:
    for folder in ("ImageSets/Segmentation", "JPEGImages", "SegmentationObject", "SegmentationClass"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "labelmap.txt").write_text(LABELMAP)
    objects = np.zeros((12, 16, 3), np.uint8)  # instances in VOC's colours (1: 128,0,0; 2: 0,128,0; 3: 128,128,0)
    classes = np.zeros((12, 16, 3), np.uint8)  # classes in the labelmap's
    objects[1:4, 1:5], classes[1:4, 1:5] = (128, 0, 0), (0, 128, 0)  # instance 1: a dog, 12 px
    objects[6:10, 2:4], classes[6:10, 2:4] = (0, 128, 0), (128, 0, 0)  # instance 2: a cat, 8 px
    objects[5:8, 10:15], classes[5:8, 10:15] = (128, 128, 0), (10, 200, 30)  # instance 3: a sheep, 15 px
    Image.new("RGB", (16, 12), (90, 90, 90)).save(tmp_path / "JPEGImages" / "frame_000001.png")
    Image.fromarray(objects).save(tmp_path / "SegmentationObject" / "frame_000001.png")
    Image.fromarray(classes).save(tmp_path / "SegmentationClass" / "frame_000001.png")
    (tmp_path / "ImageSets/Segmentation/default.txt").write_text("frame_000001\n")
    return tmp_path


def test_voc_rgb_masks_with_a_labelmap(cvat_voc: Path) -> None:
    data, split = records_of("voc", cvat_voc, "default")
    assert split.classes == ["cat", "dog", "sheep"]  # from labelmap.txt, background left out
    (record,) = split.records
    assert (record["height"], record["width"]) == (12, 16)
    assert names(split, record) == ["dog", "cat", "sheep"]  # instance order, classes by the labelmap's colours
    assert [int(decode(a["segmentation"]).sum()) for a in record["annotations"]] == [12, 8, 15]
    assert record["annotations"][0]["bbox"] == [1.0, 1.0, 5.0, 4.0]
    assert not split.skipped and not data.summary.skipped


def test_voc_semantic_rgb_with_a_labelmap(cvat_voc: Path) -> None:
    _, split = records_of("voc-semantic", cvat_voc, "default")
    (record,) = split.records
    assert names(split, record) == ["cat", "dog", "sheep"]  # one object per class, in index order
    assert [int(decode(a["segmentation"]).sum()) for a in record["annotations"]] == [8, 12, 15]


# --- COCO --------------------------------------------------------------------------------------


def uncompressed(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (CVAT's crowd/brush masks): run lengths, column-major, from 0."""
    flat = mask.flatten(order="F").astype(np.uint8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    edges = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(edges).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": counts}


@pytest.fixture
def coco_root(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    h, w = 8, 10
    masks = {"plain": np.zeros((h, w), bool), "crowd": np.zeros((h, w), bool)}
    masks["plain"][1:4, 2:7] = True  # 15 px
    masks["crowd"][5:8, 0:3] = True  # 9 px, touching the image's corner
    masks["crowd"][0, 0] = True  # the first run is an object pixel
    plain = encode(masks["plain"])  # compressed, str counts
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 3, "segmentation": plain, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "segmentation": uncompressed(masks["crowd"]), "iscrowd": 1},
        {"id": 3, "image_id": 1, "category_id": 1, "segmentation": [[6, 4, 9, 4, 9, 7]], "iscrowd": 0},
    ]
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "height": h, "width": w}],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}],
    }
    (tmp_path / "train").mkdir()
    Image.new("RGB", (w, h)).save(tmp_path / "train" / "a.png")
    (tmp_path / "train" / "annotations.json").write_text(json.dumps(coco))
    return tmp_path, masks


def test_coco_rle_and_crowd_as_instances(coco_root: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, masks = coco_root
    data, split = records_of("coco", root, "train/annotations.json")
    assert split.classes == ["cat", "dog"]  # category ids 1 and 3 → indices 0 and 1
    (record,) = split.records
    plain, crowd, triangle = record["annotations"]
    assert [a["category_id"] for a in record["annotations"]] == [1, 0, 0]
    assert [a["iscrowd"] for a in record["annotations"]] == [0, 0, 0]  # data.crowd decided: instances
    assert np.array_equal(decode(plain["segmentation"]), masks["plain"])
    assert np.array_equal(decode(crowd["segmentation"]), masks["crowd"])  # uncompressed counts → compressed
    assert plain["segmentation"]["size"] == crowd["segmentation"]["size"] == [8, 10]
    assert plain["bbox"] == [2.0, 1.0, 7.0, 4.0] and crowd["bbox"] == [0.0, 0.0, 3.0, 8.0]
    assert triangle["segmentation"] == [[6.0, 4.0, 9.0, 4.0, 9.0, 7.0]] and triangle["bbox"] == [6.0, 4.0, 9.0, 7.0]
    assert split.has_rle and not split.skipped
    assert data.summary.notes == {"crowd annotations read as instances (data.crowd: instances)": 1}


def test_coco_crowd_skip(coco_root: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, masks = coco_root
    data, split = records_of("coco", root, "train/annotations.json", crowd="skip")
    (record,) = split.records
    assert [a["category_id"] for a in record["annotations"]] == [1, 0]  # the crowd cat is gone
    assert np.array_equal(decode(record["annotations"][0]["segmentation"]), masks["plain"])
    assert isinstance(record["annotations"][1]["segmentation"], list)
    assert data.summary.skipped == {"crowd annotation (data.crowd: skip)": 1}
    assert data.summary.examples["crowd annotation (data.crowd: skip)"] == ["annotation 2 of image 1"]


# --- EXIF --------------------------------------------------------------------------------------

STORED_H, STORED_W = 30, 40  # the pixels as stored; EXIF 6 shows them 30 wide, 40 high
# An L on the stored image: axis-aligned, integer corners (pycocotools rasterises these exactly
# under every turn), no symmetry of its own.
STORED_L = [2.0, 3.0, 25.0, 3.0, 25.0, 8.0, 10.0, 8.0, 10.0, 20.0, 2.0, 20.0]


def exif_jpeg(path: Path, orientation: int, width: int = STORED_W, height: int = STORED_H) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.new("RGB", (width, height), (200, 100, 50)).save(path, exif=exif)


def exif_coco(root: Path, polygon: list[float], rle: dict) -> None:
    exif_jpeg(root / "train" / "turned.jpg", 6)
    coco = {
        "images": [{"id": 1, "file_name": "turned.jpg"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [polygon]},
            {"id": 2, "image_id": 1, "category_id": 1, "segmentation": rle},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (root / "train" / "annotations.json").write_text(json.dumps(coco))


def test_exif_apply_keeps_annotations_on_the_displayed_image(tmp_path: Path) -> None:
    shown = np.zeros((STORED_W, STORED_H), bool)  # 40 high, 30 wide
    shown[30:38, 4:9] = True
    polygon = [3.0, 2.0, 20.0, 2.0, 20.0, 25.0]
    exif_coco(tmp_path, polygon, encode(shown))
    _, split = records_of("coco", tmp_path, "train/annotations.json")  # exifOrientation apply: the default
    (record,) = split.records
    assert (record["height"], record["width"]) == (40, 30)  # as Detectron2's mapper reads the image
    poly, rle = record["annotations"]
    assert poly["segmentation"] == [polygon] and poly["bbox"] == [3.0, 2.0, 20.0, 25.0]
    assert np.array_equal(decode(rle["segmentation"]), shown)


def test_exif_ignore_turns_annotations_to_the_displayed_image(tmp_path: Path) -> None:
    stored = np.zeros((STORED_H, STORED_W), bool)  # annotated on the pixels as stored
    stored[22:27, 30:38] = True
    exif_coco(tmp_path, STORED_L, encode(stored))
    _, split = records_of("coco", tmp_path, "train/annotations.json", exifOrientation="ignore")
    (record,) = split.records
    assert (record["height"], record["width"]) == (40, 30)  # Detectron2 applies EXIF to the image
    poly, rle = record["annotations"]
    assert poly["segmentation"] == [turn_polygon(STORED_L, 6, STORED_H, STORED_W)]
    drawn = rasterise(poly["segmentation"], 40, 30)
    assert np.array_equal(drawn, turn_mask(rasterise([STORED_L], STORED_H, STORED_W), 6))
    assert poly["bbox"] == [10.0, 2.0, 27.0, 25.0]  # x from 30 - y, y from x
    assert rle["segmentation"]["size"] == [40, 30]
    assert np.array_equal(decode(rle["segmentation"]), turn_mask(stored, 6))
    assert rle["bbox"] == [3.0, 30.0, 8.0, 38.0]
    assert not np.array_equal(decode(rle["segmentation"]), stored.T)  # turned, not transposed


def test_exif_ignore_on_an_image_without_orientation_changes_nothing(tmp_path: Path) -> None:
    exif_coco(tmp_path, STORED_L, encode(np.eye(STORED_H, STORED_W, dtype=bool)))
    exif_jpeg(tmp_path / "train" / "turned.jpg", 1)
    _, split = records_of("coco", tmp_path, "train/annotations.json", exifOrientation="ignore")
    (record,) = split.records
    assert (record["height"], record["width"]) == (STORED_H, STORED_W)
    assert record["annotations"][0]["segmentation"] == [STORED_L]
    assert np.array_equal(decode(record["annotations"][1]["segmentation"]), np.eye(STORED_H, STORED_W, dtype=bool))


def exif_shown(mask: np.ndarray, orientation: int, tmp_path: Path) -> np.ndarray:
    """What a viewer shows of an image of `mask` tagged with `orientation` (PIL's exif_transpose)."""
    path = tmp_path / f"mask{orientation}.png"
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(mask.astype(np.uint8) * 255).save(path, exif=exif)
    with Image.open(path) as im:
        assert im.getexif().get(ORIENTATION) == orientation
        return np.asarray(ImageOps.exif_transpose(im)) > 127


@pytest.mark.parametrize("orientation", range(1, 9))
def test_turn_polygon_and_turn_mask_agree(orientation: int, tmp_path: Path) -> None:
    stored = rasterise([STORED_L], STORED_H, STORED_W)
    shown = turn_mask(stored, orientation)
    assert np.array_equal(shown, exif_shown(stored, orientation, tmp_path))  # as viewers turn the image
    expected = (STORED_W, STORED_H) if orientation >= 5 else (STORED_H, STORED_W)
    assert shown.shape == expected and shown.sum() == stored.sum()
    polygon = turn_polygon(STORED_L, orientation, STORED_H, STORED_W)
    assert np.array_equal(rasterise([polygon], *expected), shown)
    # Every orientation lies the L differently (so none of these checks passes by symmetry).
    others = {o: turn_mask(stored, o) for o in range(1, 9) if o != orientation}
    assert not any(m.shape == shown.shape and np.array_equal(m, shown) for m in others.values())


@pytest.mark.parametrize("orientation", range(2, 9))
def test_turn_polygon_with_slanted_edges(orientation: int) -> None:
    """Slanted edges rasterise a pixel differently here and there; the shape is the same."""
    triangle = [2.2, 3.1, 30.6, 5.3, 12.1, 25.7]
    expected = (STORED_W, STORED_H) if orientation >= 5 else (STORED_H, STORED_W)
    drawn = rasterise([turn_polygon(triangle, orientation, STORED_H, STORED_W)], *expected)
    shown = turn_mask(rasterise([triangle], STORED_H, STORED_W), orientation)
    assert (drawn & shown).sum() / (drawn | shown).sum() > 0.95


@pytest.mark.parametrize("orientation", range(1, 9))
def test_turned_rle_matches_turn_mask(orientation: int, tmp_path: Path) -> None:
    stored = np.zeros((STORED_H, STORED_W), bool)
    stored[2:6, 3:30] = True  # an asymmetric blob
    stored[6:25, 3:9] = True
    stored[0, STORED_W - 1] = True  # a corner pixel
    segment = encode(stored)
    out = turned(segment, orientation, STORED_H, STORED_W)
    shown = turn_mask(stored, orientation)
    assert np.array_equal(decode(out), shown)
    assert np.array_equal(decode(out), exif_shown(stored, orientation, tmp_path))
    assert out["size"] == list(shown.shape)
    if orientation == 1:
        assert out is segment
    polygons = turned([STORED_L, STORED_L], orientation, STORED_H, STORED_W)  # every polygon of an object
    assert polygons == [turn_polygon(STORED_L, orientation, STORED_H, STORED_W)] * 2
