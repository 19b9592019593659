"""Hugging Face datasets stored as Parquet (format parquet), as `datasets` and the Hub write them:
Image features (structs of bytes and path) with PNG/JPEG embedded, raw bytes, relative paths,
splits as one file, a folder of shards or a glob; broken rows are skipped and counted."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from kubetune_trainer.datasets.checks import check_split
from kubetune_trainer.datasets.files import load_image
from kubetune_trainer.datasets.readers import read_split
from kubetune_trainer.errors import DataError
from PIL import Image

from tests.factories import data_spec, read, usable

OUTSIDE = "file name outside the dataset"
H, W = 32, 40
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image feature in Arrow


def encoded(array: np.ndarray, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, fmt)
    return out.getvalue()


def picture(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def binary_mask() -> np.ndarray:
    """What many Hugging Face mask columns hold: one object painted 255 on 0."""
    mask = np.zeros((H, W), np.uint8)
    mask[2:10, 2:10] = 255
    return mask


def instance_ids() -> np.ndarray:
    """An instance-id mask: 0 background, objects 1 (64 px) and 2 (150 px)."""
    ids = np.zeros((H, W), np.uint8)
    ids[2:10, 2:10] = 1
    ids[20:30, 20:35] = 2
    return ids


def feature(data: bytes | None, path: str | None = None) -> dict:
    return {"bytes": data, "path": path}


def write(path: Path, columns: dict[str, list], kind: pa.DataType = IMAGE) -> Path:
    """A Parquet file written with pyarrow directly, every column of type `kind`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({name: pa.array(values, kind) for name, values in columns.items()}), path)
    return path


def scratch_files(scratch: Path) -> dict[Path, int]:
    """Every file under `scratch`, with its modification time in ns."""
    return {p: p.stat().st_mtime_ns for p in scratch.rglob("*") if p.is_file()}


def test_image_features_with_embedded_png_and_jpeg(tmp_path: Path) -> None:
    image_png, image_jpeg = picture(1), picture(2)
    write(
        tmp_path / "train.parquet",
        {
            "image": [feature(encoded(image_jpeg, "JPEG"), "a.jpg"), feature(encoded(image_png))],
            "label": [feature(encoded(binary_mask())), feature(encoded(instance_ids()), "b_mask.png")],
        },
    )
    report = read("parquet", tmp_path, "train.parquet", tmp_path / "scratch")
    assert report.skipped == {} and len(report.samples) == 2
    jpeg_row, png_row = report.samples
    assert jpeg_row.image.suffix == ".jpg" and png_row.image.suffix == ".png"  # named by what the bytes are
    assert np.array_equal(load_image(png_row.image), image_png)  # PNG: the very pixels
    assert load_image(jpeg_row.image).shape == (H, W, 3)

    binary = jpeg_row.masks(H, W)  # 0/255: one object
    assert binary.shape == (1, H, W) and binary.dtype == bool
    assert np.array_equal(binary[0], binary_mask() > 0)
    ids = png_row.masks(H, W)  # ids 1 and 2: two objects
    assert ids.shape == (2, H, W)
    assert ids.sum(axis=(1, 2)).tolist() == [64, 150]
    assert np.array_equal(ids[0], instance_ids() == 1) and np.array_equal(ids[1], instance_ids() == 2)

    assert len(usable("parquet", tmp_path, "train.parquet", tmp_path / "scratch")) == 2


def test_raw_bytes_columns(tmp_path: Path) -> None:
    write(
        tmp_path / "train.parquet",
        {"image": [encoded(picture(3))], "label": [encoded(instance_ids())]},
        pa.binary(),
    )
    (sample,) = usable("parquet", tmp_path, "train.parquet", tmp_path / "scratch")
    assert np.array_equal(load_image(sample.image), picture(3))
    assert sample.masks(H, W).sum(axis=(1, 2)).tolist() == [64, 150]


def test_parquet_written_by_datasets_reads_as_the_same_masks(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # nothing of the library lands in ~
    datasets = pytest.importorskip("datasets")
    images, masks = [picture(4), picture(5)], [binary_mask(), instance_ids()]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    hf = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(a) for a in images], "label": [Image.fromarray(m) for m in masks]},
        features=features,
    )
    hf.to_parquet(str(tmp_path / "hf" / "train.parquet"))
    schema = pq.read_schema(tmp_path / "hf" / "train.parquet")
    assert schema.field("image").type == IMAGE and b"huggingface" in schema.metadata  # what the Hub serves
    write(
        tmp_path / "arrow" / "train.parquet",
        {"image": [feature(encoded(a)) for a in images], "label": [feature(encoded(m)) for m in masks]},
    )

    from_hf = usable("parquet", tmp_path / "hf", "train.parquet", tmp_path / "scratch-hf")
    from_arrow = usable("parquet", tmp_path / "arrow", "train.parquet", tmp_path / "scratch-arrow")
    assert len(from_hf) == len(from_arrow) == 2
    for ours, theirs, pixels in zip(from_hf, from_arrow, images, strict=True):
        assert np.array_equal(load_image(ours.image), pixels)
        assert np.array_equal(ours.masks(H, W), theirs.masks(H, W))
    assert [s.masks(H, W).shape[0] for s in from_hf] == [1, 2]


@pytest.mark.parametrize("as_feature", [False, True], ids=["string", "image-feature-path"])
def test_a_path_column_reads_the_files_beside_the_parquet_file(tmp_path: Path, as_feature: bool) -> None:
    root = tmp_path / "dataset"
    (root / "images").mkdir(parents=True)
    Image.fromarray(picture(6)).save(root / "images" / "a.png")
    Image.fromarray(instance_ids()).save(root / "images" / "a_mask.png")
    cells = {"image": ["images/a.png", "images/missing.png"], "label": ["images/a_mask.png", "images/a_mask.png"]}
    if as_feature:  # an Image feature whose bytes were not embedded: {"bytes": null, "path": ...}
        write(root / "train.parquet", {k: [feature(None, p) for p in v] for k, v in cells.items()})
    else:
        write(root / "train.parquet", cells, pa.string())
    scratch = tmp_path / "scratch"
    report = read("parquet", root, "train.parquet", scratch)
    assert [s.image for s in report.samples] == [root / "images" / "a.png"]  # read in place, not copied
    assert report.samples[0].masks(H, W).sum(axis=(1, 2)).tolist() == [64, 150]
    assert report.skipped == {"missing image file": 1}
    assert report.examples["missing image file"] == ["train.parquet row 1 (images/missing.png)"]
    assert scratch_files(scratch) == {}


def test_a_split_is_a_glob_of_hub_shards_or_a_folder(tmp_path: Path) -> None:
    def shard(path: Path, sizes: list[int]) -> None:  # one row per size: a mask of that many pixels in row 0
        rows = []
        for size in sizes:
            mask = np.zeros((H, W), np.uint8)
            mask[0, :size] = 1
            rows.append(mask)
        write(
            path,
            {"image": [feature(encoded(picture(s))) for s in sizes], "label": [feature(encoded(m)) for m in rows]},
        )

    # The Hub's layout, data/<split>-NNNNN-of-NNNNN.parquet, and the parquet converter's, <config>/<split>/NNNN.parquet.
    shard(tmp_path / "data" / "train-00000-of-00002.parquet", [1, 2])
    shard(tmp_path / "data" / "train-00001-of-00002.parquet", [3])
    shard(tmp_path / "data" / "validation-00000-of-00001.parquet", [7])
    shard(tmp_path / "default" / "train" / "0000.parquet", [4, 5])
    shard(tmp_path / "default" / "train" / "0001.parquet", [6])

    def sizes(split: str, which: str = "train") -> list[int]:
        spec = data_spec("parquet", split, validation="data/validation-*.parquet")
        report = read_split(spec, tmp_path, which, tmp_path / "scratch")  # type: ignore[arg-type]
        return [int(s.masks(H, W).sum()) for s in report.samples]

    assert sizes("data/train-*.parquet") == [1, 2, 3]  # every shard, in order; not the validation one
    assert sizes("data/train-*.parquet", "validation") == [7]
    assert sizes("default/train") == [4, 5, 6]
    assert sizes("default/train/0001.parquet") == [6]
    with pytest.raises(DataError, match=r"data.train: no Parquet file at .*data/test-\*.parquet"):
        sizes("data/test-*.parquet")


def test_custom_column_names_and_a_missing_column(tmp_path: Path) -> None:
    write(
        tmp_path / "train.parquet",
        {"pixel_values": [feature(encoded(picture(8)))], "annotation": [feature(encoded(instance_ids()))]},
    )
    (sample,) = usable(
        "parquet", tmp_path, "train.parquet", tmp_path / "scratch", imageColumn="pixel_values", maskColumn="annotation"
    )
    assert sample.masks(H, W).shape == (2, H, W)

    columns = "its columns are ['pixel_values', 'annotation']"
    with pytest.raises(DataError) as err:  # the defaults, image and label
        read("parquet", tmp_path, "train.parquet", tmp_path / "scratch")
    assert str(err.value).startswith("data.train: ")
    assert "has no column 'image' (data.imageColumn)" in str(err.value) and columns in str(err.value)
    with pytest.raises(DataError) as err:
        read("parquet", tmp_path, "train.parquet", tmp_path / "scratch", imageColumn="pixel_values")
    assert "train.parquet has no column 'label' (data.maskColumn)" in str(err.value) and columns in str(err.value)


def test_rows_without_an_image_or_a_mask_are_skipped_and_counted(tmp_path: Path) -> None:
    good = feature(encoded(picture(9)))
    write(
        tmp_path / "train.parquet",
        {
            "image": [good, None, feature(None, None), good, good],
            "label": [feature(encoded(binary_mask()))] * 3 + [None, feature(encoded(np.zeros((H, W), np.uint8)))],
        },
    )
    report = read("parquet", tmp_path, "train.parquet", tmp_path / "scratch")
    assert len(report.samples) == 2
    assert report.skipped == {"missing image file": 2, "missing mask file": 1}
    assert report.examples == {
        "missing image file": ["train.parquet row 1 image", "train.parquet row 2 image"],
        "missing mask file": ["train.parquet row 3 mask"],
    }
    summary = check_split(report).summary  # row 4's mask is all background
    assert summary.images == 1 and summary.objects == 1
    assert summary.skipped == {"missing image file": 2, "missing mask file": 1, "image without annotations": 1}


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_a_path_that_leads_outside_the_dataset_is_refused(tmp_path: Path, where: str) -> None:
    root = tmp_path / "dataset"
    Image.fromarray(picture(10)).save(tmp_path / "x.png")  # a good image the dataset must not reach
    Image.fromarray(binary_mask()).save(tmp_path / "x_mask.png")
    root.mkdir()
    Image.fromarray(picture(11)).save(root / "a.png")
    Image.fromarray(binary_mask()).save(root / "a_mask.png")
    # From data/, ../../x.png is tmp_path/x.png. `datasets` writes absolute paths for images opened from files.
    outside = "../../x.png" if where == "parent" else str(tmp_path / "x.png")
    outside_mask = "../../x_mask.png" if where == "parent" else str(tmp_path / "x_mask.png")
    write(
        root / "data" / "train.parquet",
        {"image": ["../a.png", outside, "../a.png"], "label": ["../a_mask.png", "../a_mask.png", outside_mask]},
        pa.string(),
    )
    scratch = tmp_path / "scratch"
    report = read("parquet", root, "data/train.parquet", scratch)
    assert [s.image.resolve() for s in report.samples] == [(root / "a.png").resolve()]  # `..` inside: fine
    assert report.skipped == {OUTSIDE: 2}
    assert len(report.refused) == 2
    assert repr(outside) in report.refused[0] and repr(outside_mask) in report.refused[1]
    assert scratch_files(scratch) == {}
    summary = check_split(report).summary
    assert summary.images == 1 and summary.skipped == {OUTSIDE: 2}


def test_embedded_bytes_are_written_once_named_by_their_content(tmp_path: Path) -> None:
    image, other = encoded(picture(12)), encoded(picture(13), "JPEG")
    masks = [encoded(binary_mask()), encoded(instance_ids()), encoded(binary_mask())]
    images = [feature(image), feature(image), feature(other)]
    write(tmp_path / "train.parquet", {"image": images, "label": [feature(m) for m in masks]})
    scratch = tmp_path / "scratch"
    first = read("parquet", tmp_path, "train.parquet", scratch)
    written = scratch_files(scratch)
    expected = {
        hashlib.sha256(data).hexdigest() + suffix
        for data, suffix in [(image, ".png"), (other, ".jpg"), (masks[0], ".png"), (masks[1], ".png")]
    }
    assert {p.name for p in written} == expected  # one file per distinct content, no temporary left
    assert all(p.is_relative_to(scratch) for p in written)
    assert first.samples[0].image == first.samples[1].image
    assert first.samples[0].image.read_bytes() == image

    again = read("parquet", tmp_path, "train.parquet", scratch)
    assert scratch_files(scratch) == written  # nothing new, nothing rewritten
    assert [s.image for s in again.samples] == [s.image for s in first.samples]


def test_a_glob_split_under_a_root_whose_name_has_brackets(tmp_path: Path) -> None:
    """Only the split is a pattern: the folder the data sits in is taken literally."""
    root = tmp_path / "sets[2024]"
    write(
        root / "data" / "train-00000-of-00001.parquet",
        {"image": [feature(encoded(picture(14)))], "label": [feature(encoded(binary_mask()))]},
    )
    assert len(read("parquet", root, "data", tmp_path / "scratch").samples) == 1  # a folder: found
    assert len(read("parquet", root, "data/train-*.parquet", tmp_path / "scratch").samples) == 1
    literal = root / "data" / "train[1].parquet"  # a file name with glob characters is itself
    (root / "data" / "train-00000-of-00001.parquet").rename(literal)
    assert len(read("parquet", root, "data/train[1].parquet", tmp_path / "scratch").samples) == 1
