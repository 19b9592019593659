"""File names inside annotations are untrusted: a name that leads out of the dataset (`..`, an
absolute path, a symlink) is refused and counted, never opened, in every format and family."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from kubetune_trainer.d2.datasets import to_records
from kubetune_trainer.datasets.checks import check_split
from kubetune_trainer.errors import DataError
from PIL import Image

from tests.factories import read, usable

OUTSIDE = "file name outside the dataset"


@pytest.fixture
def world(tmp_path: Path) -> tuple[Path, Path]:
    """A dataset folder and, beside it, a perfectly good image the dataset must not reach."""
    root = tmp_path / "dataset"
    root.mkdir()
    outside = tmp_path / "outside.jpg"
    Image.fromarray(np.full((32, 40, 3), 90, np.uint8)).save(outside)
    return root, outside


def rgb(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((32, 40, 3), 128, np.uint8)).save(path)


def test_coco_names_outside_the_dataset_are_refused(world: tuple[Path, Path]) -> None:
    root, outside = world
    rgb(root / "train" / "a.jpg")
    # A name is read from where its annotation file is: ../../outside.jpg leads out from train/,
    # so it is refused, though from train/images/ it would name the dataset's own outside.jpg.
    names = ["a.jpg", "../../../outside.jpg", "../../outside.jpg", str(outside), "/etc/passwd", "a.jpg\u0000.png"]
    images = [{"id": i + 1, "file_name": n, "height": 32, "width": 40} for i, n in enumerate(names)]
    polygon = [[2, 2, 20, 2, 20, 12, 2, 12]]
    annotations = [{"id": i, "image_id": i, "segmentation": polygon, "iscrowd": 0} for i in range(1, 7)]
    (root / "train" / "annotations.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    report = read("coco", root, "train/annotations.json")
    assert [s.image for s in report.samples] == [root / "train" / "a.jpg"]
    assert report.skipped == {OUTSIDE: 5}
    assert any(f"'{outside}'" in r for r in report.refused) and any(
        "'../../../outside.jpg'" in r for r in report.refused
    )
    assert len(usable("coco", root, "train/annotations.json")) == 1


def test_datumaro_voc_and_via_names_outside_are_refused(world: tuple[Path, Path]) -> None:
    root, outside = world
    rgb(root / "images" / "train" / "a.jpg")
    polygon = {"type": "polygon", "points": [2, 2, 20, 2, 20, 12], "label_id": 0}
    names = ("a.jpg", "/etc/passwd", "../../../outside.jpg")
    items = [{"id": n, "media": {"path": n}, "annotations": [polygon]} for n in names]
    (root / "annotations").mkdir()
    (root / "annotations" / "train.json").write_text(json.dumps({"items": items}))
    datumaro = read("datumaro", root, "train")
    assert len(datumaro.samples) == 1 and datumaro.skipped == {OUTSIDE: 2}

    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("../../outside\n/etc/passwd\n")
    voc = read("voc", root, "train")
    assert voc.samples == [] and voc.skipped == {OUTSIDE: 2}

    regions = [{"shape_attributes": {"name": "rect", "x": 1, "y": 1, "width": 9, "height": 9}, "region_attributes": {}}]
    via = {n: {"filename": n, "regions": regions} for n in ("a.jpg", "../../outside.jpg", "/etc/passwd")}
    shutil.copy(root / "images" / "train" / "a.jpg", root / "a.jpg")
    (root / "via.json").write_text(json.dumps(via))
    assert read("via", root, "via.json").skipped == {OUTSIDE: 2}
    checked = check_split(read("via", root, "via.json"))  # what both families train on
    d2 = to_records(checked, checked.classes)
    assert [Path(r["file_name"]).name for r in d2.records] == ["a.jpg"] and checked.summary.skipped[OUTSIDE] == 2


def test_a_split_of_refused_names_is_a_data_error_naming_them(world: tuple[Path, Path]) -> None:
    root, _ = world
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("../../outside\n")
    with pytest.raises(DataError, match="data.train: no usable sample in voc 'train'") as err:
        usable("voc", root, "train")
    assert OUTSIDE in str(err.value) and "'../../outside'" in str(err.value)


def test_a_symlink_in_a_mask_folder_does_not_lead_out(world: tuple[Path, Path]) -> None:
    root, outside = world
    rgb(root / "train" / "images" / "a.png")
    (root / "train" / "images" / "b.png").symlink_to(outside)
    (root / "train" / "masks").mkdir()
    mask = np.zeros((32, 40), np.uint8)
    mask[4:12, 4:20] = 1
    for name in ("a", "b"):
        Image.fromarray(mask).save(root / "train" / "masks" / f"{name}.png")
    report = read("mask-folder", root, "train")
    assert [s.image.name for s in report.samples] == ["a.png"] and report.skipped == {OUTSIDE: 1}
