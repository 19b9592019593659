"""File names inside annotations are untrusted: a name that leads out of the dataset (`..`, an
absolute path, a symlink) is refused and counted, never opened, in every format and family."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from kubetune_trainer.d2.datasets import read_via as d2_read_via
from kubetune_trainer.d2.datasets import read_voc as d2_read_voc
from kubetune_trainer.datasets.readers import read_split, usable_samples
from PIL import Image

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
    # ../../outside.jpg beside the annotations is outside; in train/images/ it would be the
    # dataset's own (absent) outside.jpg: that place alone is looked at, and nothing is there.
    names = ["a.jpg", "../../../outside.jpg", "../../outside.jpg", str(outside), "/etc/passwd", "a.jpg\u0000.png"]
    images = [{"id": i + 1, "file_name": n, "height": 32, "width": 40} for i, n in enumerate(names)]
    polygon = [[2, 2, 20, 2, 20, 12, 2, 12]]
    annotations = [{"id": i, "image_id": i, "segmentation": polygon, "iscrowd": 0} for i in range(1, 7)]
    (root / "train" / "annotations.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    report = read_split("coco", root, "train/annotations.json")
    assert [s.image for s in report.samples] == [root / "train" / "a.jpg"]
    assert report.skipped == {OUTSIDE: 4, "missing image file": 1}
    assert any("'/etc/passwd'" in r for r in report.refused) and any(
        "'../../../outside.jpg'" in r for r in report.refused
    )
    assert len(usable_samples("coco", root, "train/annotations.json")) == 1


def test_datumaro_voc_and_via_names_outside_are_refused(world: tuple[Path, Path]) -> None:
    root, outside = world
    rgb(root / "images" / "train" / "a.jpg")
    polygon = {"type": "polygon", "points": [2, 2, 20, 2, 20, 12], "label_id": 0}
    names = ("a.jpg", "/etc/passwd", "../../../outside.jpg")
    items = [{"id": n, "media": {"path": n}, "annotations": [polygon]} for n in names]
    (root / "annotations").mkdir()
    (root / "annotations" / "train.json").write_text(json.dumps({"items": items}))
    datumaro = read_split("datumaro", root, "train")
    assert len(datumaro.samples) == 1 and datumaro.skipped == {OUTSIDE: 2}

    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("../../outside\n/etc/passwd\n")
    voc = read_split("voc", root, "train")
    assert voc.samples == [] and voc.skipped == {OUTSIDE: 2}

    regions = [{"shape_attributes": {"name": "rect", "x": 1, "y": 1, "width": 9, "height": 9}, "region_attributes": {}}]
    via = {n: {"filename": n, "regions": regions} for n in ("a.jpg", "../../outside.jpg", "/etc/passwd")}
    shutil.copy(root / "images" / "train" / "a.jpg", root / "a.jpg")
    (root / "via.json").write_text(json.dumps(via))
    assert read_split("via", root, "via.json").skipped == {OUTSIDE: 2}
    d2 = d2_read_via(root, "via.json", train=True)
    assert [Path(r["file_name"]).name for r in d2.records] == ["a.jpg"] and d2.skipped[OUTSIDE] == 2


def test_detectron2_voc_names_outside_are_refused(world: tuple[Path, Path]) -> None:
    root, _ = world
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("../../outside\n")
    with pytest.raises(Exception, match="no usable image") as err:
        d2_read_voc(root, "train", train=True)
    assert OUTSIDE in str(err.value)


def test_a_symlink_in_a_mask_folder_does_not_lead_out(world: tuple[Path, Path]) -> None:
    root, outside = world
    rgb(root / "train" / "images" / "a.png")
    (root / "train" / "images" / "b.png").symlink_to(outside)
    (root / "train" / "masks").mkdir()
    mask = np.zeros((32, 40), np.uint8)
    mask[4:12, 4:20] = 1
    for name in ("a", "b"):
        Image.fromarray(mask).save(root / "train" / "masks" / f"{name}.png")
    report = read_split("mask-folder", root, "train")
    assert [s.image.name for s in report.samples] == ["a.png"] and report.skipped == {OUTSIDE: 1}
