"""Every dataset format reads into samples with the right masks; broken samples are counted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from kubetune_trainer.datasets.files import load_image
from kubetune_trainer.errors import DataError
from PIL import Image

from tests.factories import read, usable


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def _rgb(path: Path, h: int = 32, w: int = 40) -> None:
    _png(path, np.full((h, w, 3), 128, np.uint8))


def test_coco_polygons_and_rle_decode_to_the_drawn_masks(tiny_coco: Path) -> None:
    samples = usable("coco", tiny_coco, "train/annotations.json")
    coco = json.loads((tiny_coco / "train" / "annotations.json").read_text())
    kinds = {type(a["segmentation"]).__name__ for a in coco["annotations"]}
    assert kinds == {"list", "dict"}  # both encodings present in the fixture
    assert len(samples) == len(coco["images"])
    areas = {}
    for ann in coco["annotations"]:
        areas.setdefault(ann["image_id"], []).append(ann["area"])
    for index, sample in enumerate(samples):
        masks = sample.masks(96, 96)
        # polygons rasterise within a pixel row of the drawn shape; RLE is exact
        assert masks.sum(axis=(1, 2)) == pytest.approx(areas[index + 1], rel=0.15)


def test_via_balloon_format(tmp_path: Path) -> None:
    _rgb(tmp_path / "train" / "a.jpg")
    _rgb(tmp_path / "train" / "b.jpg")
    regions = {
        "0": {
            "shape_attributes": {"name": "polygon", "all_points_x": [2, 20, 20, 2], "all_points_y": [2, 2, 12, 12]},
            "region_attributes": {},
        },
        "1": {"shape_attributes": {"name": "circle", "cx": 5, "cy": 5, "r": 3}, "region_attributes": {}},
    }
    via = {
        "a.jpg123": {"filename": "a.jpg", "size": 123, "regions": regions},
        "b.jpg9": {"filename": "b.jpg", "size": 9, "regions": []},
        "c.jpg9": {"filename": "c.jpg", "size": 9, "regions": regions},
    }
    (tmp_path / "train" / "via_region_data.json").write_text(json.dumps(via))
    report = read("via", tmp_path, "train/via_region_data.json")
    assert [s.image.name for s in report.samples] == ["a.jpg", "b.jpg"]
    assert report.skipped == {"missing image file": 1}
    assert report.examples["missing image file"][0].startswith("c.jpg (looked for train/c.jpg, train/images/c.jpg")
    mask = report.samples[0].masks(32, 40)
    assert mask.shape == (2, 32, 40) and mask[0, 5, 10] and not mask[0, 20, 10]
    assert mask[1].sum() == pytest.approx(np.pi * 3**2, rel=0.25) and mask[1, 5, 5]  # the circle
    assert [s.image.name for s in usable("via", tmp_path, "train/via_region_data.json")] == ["a.jpg"]


def test_mask_folder_instance_ids(tmp_path: Path) -> None:
    ids = np.zeros((32, 40), np.uint8)
    ids[2:10, 2:10] = 1
    ids[20:30, 20:35] = 7
    _rgb(tmp_path / "train" / "images" / "x.jpg")
    _png(tmp_path / "train" / "masks" / "x.png", ids)
    _rgb(tmp_path / "train" / "images" / "lonely.png")
    report = read("mask-folder", tmp_path, "train")
    assert report.skipped == {"missing mask file": 1}
    masks = report.samples[0].masks(32, 40)
    assert masks.shape == (2, 32, 40) and masks.sum(axis=(1, 2)).tolist() == [64, 150]


def test_labpics_layout_reads_vessels_and_materials(tmp_path: Path) -> None:
    instance = np.zeros((32, 40, 3), np.uint8)
    instance[2:10, 2:10, 0] = 1  # vessel 1 in red
    instance[20:30, 20:30, 2] = 1  # material 1 in blue
    instance[20:30, 30:35, 2] = 2  # material 2
    _rgb(tmp_path / "Simple" / "Train" / "Image" / "s1.jpg")
    _png(tmp_path / "Simple" / "Train" / "Instance" / "s1.png", instance)
    masks = usable("labpics", tmp_path, "Simple/Train")[0].masks(32, 40)
    assert sorted(masks.sum(axis=(1, 2)).tolist()) == [50, 64, 100]


def test_voc_segmentation_object_ignores_void(tmp_path: Path) -> None:
    ids = np.zeros((32, 40), np.uint8)
    ids[2:10, 2:10] = 1
    ids[10, :] = 255  # VOC's void boundary
    _rgb(tmp_path / "JPEGImages" / "2007_000001.jpg")
    _png(tmp_path / "SegmentationObject" / "2007_000001.png", ids)
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000001\n2007_000002\n")
    report = read("voc", tmp_path, "train")
    assert report.skipped == {"missing image file": 1}
    assert report.examples == {"missing image file": ["2007_000002 (looked for JPEGImages/2007_000002.*)"]}
    assert report.samples[0].masks(32, 40).shape == (1, 32, 40)


def test_broken_samples_are_skipped_and_counted(tiny_coco: Path, tmp_path: Path, caplog) -> None:
    root = tmp_path / "coco"
    shutil.copytree(tiny_coco, root)
    images = sorted((root / "train").glob("*.jpg"))
    images[0].write_bytes(b"not a jpeg at all")  # corrupt
    images[1].write_bytes(images[1].read_bytes()[:200])  # truncated
    images[2].unlink()  # missing
    coco = json.loads((root / "train" / "annotations.json").read_text())
    third = coco["images"][3]["id"]
    for ann in coco["annotations"]:
        if ann["image_id"] == third:
            ann["segmentation"] = {"size": [96, 96], "counts": [96 * 96]}  # an all-background RLE
    (root / "train" / "annotations.json").write_text(json.dumps(coco))
    samples = usable("coco", root, "train/annotations.json")
    assert len(samples) == len(coco["images"]) - 4
    assert all(s.image not in images[:3] for s in samples)


def test_no_usable_sample_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "annotations.json").write_text(
        json.dumps({"images": [{"id": 1, "file_name": "gone.jpg"}], "annotations": []})
    )
    with pytest.raises(DataError, match="no usable sample"):
        usable("coco", tmp_path, "train/annotations.json")


@pytest.mark.parametrize("content", ["{not json", json.dumps({"images": "nope"})])
def test_unreadable_annotations_are_a_data_error(tmp_path: Path, content: str) -> None:
    (tmp_path / "a.json").write_text(content)
    with pytest.raises(DataError, match="a.json"):
        read("coco", tmp_path, "a.json")


def test_load_image_returns_rgb(tmp_path: Path) -> None:
    _png(tmp_path / "g.png", np.zeros((5, 6), np.uint8))
    assert load_image(tmp_path / "g.png").shape == (5, 6, 3)


def test_voc_semantic_reads_one_mask_per_class(tmp_path: Path) -> None:
    classes = np.zeros((32, 40), np.uint8)
    classes[2:10, 2:10] = 15  # two people ...
    classes[20:30, 25:35] = 15
    classes[12:18, 5:30] = 7  # ... and a car
    classes[11, :] = 255
    _rgb(tmp_path / "JPEGImages" / "a.jpg")
    _png(tmp_path / "SegmentationClass" / "a.png", classes)
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("a\n")
    masks = read("voc-semantic", tmp_path, "val").samples[0].masks(32, 40)
    assert masks.shape == (2, 32, 40)
    assert masks[0].sum() == 6 * 25 and masks[1].sum() == 64 + 100  # class 7, then class 15 (both people)
    with pytest.raises(DataError, match="ImageSets/Segmentation/train.txt does not exist"):
        read("voc-semantic", tmp_path, "train")


def _datumaro(tmp_path: Path, items: list) -> Path:
    path = tmp_path / "annotations" / "train.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    categories = {"label": {"labels": [{"name": "cell", "parent": "", "attributes": []}], "attributes": []}}
    path.write_text(json.dumps({"info": {}, "categories": categories, "items": items}))
    return path


def test_datumaro_polygons_rle_and_groups(tmp_path: Path) -> None:
    from pycocotools import mask as mask_utils

    _rgb(tmp_path / "images" / "train" / "a.jpg")
    _rgb(tmp_path / "images" / "train" / "b.jpg")
    blob = np.zeros((32, 40), np.uint8, order="F")
    blob[20:30, 30:38] = 1
    rle = mask_utils.encode(blob)
    rle["counts"] = rle["counts"].decode()
    square = [2, 2, 12, 2, 12, 12, 2, 12]
    items = [
        {
            "id": "a",
            "image": {"path": "a.jpg", "size": [32, 40]},
            "annotations": [
                {"id": 0, "type": "label", "group": 0, "label_id": 0},
                {"id": 1, "type": "polygon", "group": 0, "label_id": 0, "points": square},
                {"id": 2, "type": "mask", "group": 0, "label_id": 0, "rle": rle},
                # Two parts of one occluded object: one group, one label.
                {"id": 3, "type": "polygon", "group": 4, "label_id": 0, "points": [20, 2, 24, 2, 24, 6, 20, 6]},
                {"id": 4, "type": "polygon", "group": 4, "label_id": 0, "points": [20, 10, 24, 10, 24, 14, 20, 14]},
                {"id": 5, "type": "bbox", "group": 0, "label_id": 0, "bbox": [1, 1, 3, 3]},
            ],
        },
        {"id": "b", "media": {"path": "b.jpg"}, "annotations": [{"id": 0, "type": "bbox", "bbox": [1, 1, 3, 3]}]},
        {"id": "c", "image": {"path": "gone.jpg"}, "annotations": []},
    ]
    _datumaro(tmp_path, items)
    report = read("datumaro", tmp_path, "train")
    assert [s.image.name for s in report.samples] == ["a.jpg", "b.jpg"]
    assert report.skipped == {"Datumaro bbox annotation (no mask)": 2, "missing image file": 1}
    assert report.samples[0].masks.labels(32, 40) == ["cell"] * 3
    assert [s.image.name for s in usable("datumaro", tmp_path, "train")] == ["a.jpg"]  # b has no object
    masks = report.samples[0].masks(32, 40)
    assert masks.shape == (3, 32, 40)
    assert masks[0].sum() == 100 and masks[0][2:12, 2:12].all()
    assert np.array_equal(masks[1], blob.astype(bool))
    assert masks[2].sum() == 32 and masks[2][2:6, 20:24].all() and masks[2][10:14, 20:24].all()
    # The same file named directly.
    assert len(read("datumaro", tmp_path, "annotations/train.json").samples) == 2


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ("nope", "needs an 'items' list"),
        ([{"id": "x", "annotations": []}], "skipped: Datumaro item without an image: 1\n    e.g. x"),
        (
            [{"id": "x", "image": {"path": "a.jpg"}, "annotations": [{"type": "mask"}]}],
            "skipped: Datumaro mask annotation without its RLE: 1\n    e.g. x",
        ),
    ],
)
def test_malformed_datumaro_is_a_clear_error(tmp_path: Path, items, message: str) -> None:
    _rgb(tmp_path / "images" / "train" / "a.jpg")
    _datumaro(tmp_path, items)
    with pytest.raises(DataError, match="data.train: ") as err:
        usable("datumaro", tmp_path, "train")
    assert message in str(err.value)


def test_rle_of_the_wrong_size_skips_the_sample(tmp_path: Path) -> None:
    _rgb(tmp_path / "images" / "train" / "a.jpg")
    rle = {"counts": [10, 5, 985], "size": [20, 50]}
    _datumaro(tmp_path, [{"id": "a", "image": {"path": "a.jpg"}, "annotations": [{"type": "mask", "rle": rle}]}])
    with pytest.raises(DataError, match="unreadable image or mask"):
        usable("datumaro", tmp_path, "train")
