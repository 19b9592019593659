"""`kubetune validate SPEC --data` as a user runs it: the spec's dataset staged from S3 (the local
moto server) and read as the trainer will, each split summarised; a split with no usable sample
exits 2, naming the split, the skip reason and example file names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.factories import job_manifest
from tests.helpers import log_events

pytestmark = pytest.mark.slow  # each run stages the data and starts the trainer's check: seconds


def validate(spec: dict, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    # S3 credentials: the s3_endpoint fixture put the server's keys into os.environ; the endpoint is in the spec.
    env = {**os.environ, "KUBETUNE_CACHE_DIR": str(tmp_path / "node-cache"), "KUBETUNE_LOG_FORMAT": "json"}
    return subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "validate", str(path), "--data", *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def counts(tiny_coco: Path, split: str) -> tuple[int, int]:
    """(images, objects) the annotation file of `split` holds."""
    coco = json.loads((tiny_coco / split / "annotations.json").read_text())
    return len(coco["images"]), len(coco["annotations"])


def test_validate_data_summarises_each_split(
    s3_endpoint: str, tiny_coco: Path, tiny_coco_s3: str, bucket: str, tmp_path: Path
) -> None:
    spec = job_manifest(tiny_coco_s3, f"s3://{bucket}/out/", s3_endpoint)
    (train_images, train_objects), (val_images, val_objects) = counts(tiny_coco, "train"), counts(tiny_coco, "val")

    text = validate(spec, tmp_path)
    assert text.returncode == 0, text.stdout + text.stderr[-3000:]
    lines = text.stdout.splitlines()
    train = next(i for i, line in enumerate(lines) if line.startswith("train: "))
    validation = next(i for i, line in enumerate(lines) if line.startswith("validation: "))
    assert "coco 'train/annotations.json'" in lines[train] and "coco 'val/annotations.json'" in lines[validation]
    assert lines[train + 1 : train + 4] == [
        f"  images: {train_images}",
        f"  objects: {train_objects}",
        "  classes (1): shape",
    ]
    assert lines[validation + 1 : validation + 4] == [
        f"  images: {val_images}",
        f"  objects: {val_objects}",
        "  classes (1): shape",
    ]
    assert "skipped" not in text.stdout
    staged = [e for e in log_events(text.stderr) if e.get("event") == "staging"]
    assert staged and staged[0]["source"] == tiny_coco_s3

    as_json = validate(spec, tmp_path, "--json")
    assert as_json.returncode == 0, as_json.stderr[-3000:]
    splits = json.loads(as_json.stdout)["splits"]  # stdout is the JSON alone: logs go to stderr
    assert set(splits) == {"train", "validation"}
    for name, images, objects in (("train", train_images, train_objects), ("validation", val_images, val_objects)):
        split = splits[name]
        assert (split["images"], split["objects"], split["classes"]) == (images, objects, ["shape"]), name
        assert split["skipped"] == {} and split["examples"] == {}
        assert split["imageSizes"] == {"smallest": [96, 96], "largest": [96, 96]}


def test_a_split_with_no_usable_image_exits_2_naming_it(
    s3, s3_endpoint: str, tiny_coco: Path, tiny_coco_s3: str, bucket: str, tmp_path: Path
) -> None:
    spec = job_manifest(tiny_coco_s3, f"s3://{bucket}/out/", s3_endpoint)
    first = validate(spec, tmp_path, "--json")  # a good dataset, staged into the node cache
    assert first.returncode == 0, first.stderr[-3000:]

    # Then the validation annotations are replaced by a file whose every image is missing.
    coco = json.loads((tiny_coco / "val" / "annotations.json").read_text())
    for image in coco["images"]:
        image["file_name"] = f"gone-{image['id']}.jpg"
    s3.put_object(Bucket=bucket, Key="data/val/annotations.json", Body=json.dumps(coco).encode())
    val_images = len(coco["images"])
    train_images, _ = counts(tiny_coco, "train")

    text = validate(spec, tmp_path)
    assert text.returncode == 2, text.stdout + text.stderr[-3000:]
    assert "kubetune validate --data: no usable sample in split validation" in text.stderr
    staged = [e for e in log_events(text.stderr) if e.get("event") == "staging"]
    assert staged and staged[0]["to_download"] == 1  # only the changed file is fetched again
    out = text.stdout
    assert f"  images: {train_images}" in out  # the train split is still summarised
    validation = out[out.index("validation: ") :]
    assert "  images: 0" in validation
    assert f"  skipped: missing image file: {val_images}" in validation
    assert "    e.g. gone-1.jpg (looked for val/gone-1.jpg, val/images/gone-1.jpg" in validation

    as_json = validate(spec, tmp_path, "--json")
    assert as_json.returncode == 2, as_json.stderr[-3000:]
    assert "no usable sample in split validation" in as_json.stderr
    splits = json.loads(as_json.stdout)["splits"]
    assert splits["train"]["images"] == train_images and splits["train"]["skipped"] == {}
    broken = splits["validation"]
    assert (broken["images"], broken["objects"], broken["classes"]) == (0, 0, [])
    assert broken["skipped"] == {"missing image file": val_images}
    examples = broken["examples"]["missing image file"]
    assert len(examples) == 3 and examples[0].startswith("gone-1.jpg (looked for val/gone-1.jpg")
