"""Object keys are names from a bucket: none may write outside the job's cache, and what the
node's jobs share is checked before a job uses it. Against a real S3 endpoint (moto server)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from kubetune_trainer.config import StorageSpec
from kubetune_trainer.errors import DataError
from kubetune_trainer.storage.shared import SharedFiles
from kubetune_trainer.storage.staging import INDEX_NAME, cache_dir_for, fetch_object, stage
from kubetune_trainer.storage.stores import open_store


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


@pytest.mark.parametrize(
    "key",
    [
        "../../../escaped.txt",  # climbs out of the cache
        "/etc/escaped.txt",  # an absolute path once the prefix is cut (the object is data//etc/...)
        "a/./b.txt",
        "a//b.txt",
    ],
)
def test_a_key_that_is_not_a_plain_relative_path_stops_staging_before_any_write(
    s3, s3_endpoint: str, bucket: str, tmp_path: Path, key: str
) -> None:
    prefix = f"data-{abs(hash(key)) % 10**8}/"  # one dataset per case, in the test's bucket
    s3.put_object(Bucket=bucket, Key=prefix + "ok.txt", Body=b"fine")
    s3.put_object(Bucket=bucket, Key=prefix + key, Body=b"planted")
    cache = tmp_path / "node" / "jobs" / "ns" / "job"
    with pytest.raises(DataError, match="outside the cache") as err:
        stage(open_store(f"s3://{bucket}/{prefix}", StorageSpec(endpoint=s3_endpoint)), cache)
    assert "1 object key(s)" in str(err.value) and repr(key) in str(err.value) and err.value.exit_code == 2
    assert files_under(tmp_path) == set()  # nothing was written, not even the good object
    assert not (Path("/etc/escaped.txt").exists() or (tmp_path / "escaped.txt").exists())


def test_a_symlink_planted_in_the_cache_does_not_lead_writes_out(
    s3, s3_endpoint: str, bucket: str, tmp_path: Path
) -> None:
    store = open_store(f"s3://{bucket}/data/", StorageSpec(endpoint=s3_endpoint))
    s3.put_object(Bucket=bucket, Key="data/images/a.jpg", Body=b"image")
    cache = tmp_path / "cache"
    outside = tmp_path / "outside"
    outside.mkdir()
    root = cache_dir_for(cache, store)
    root.mkdir(parents=True)
    (root / "images").symlink_to(outside)  # what a tampering neighbour could leave behind
    with pytest.raises(DataError, match="images/a.jpg"):
        stage(store, cache)
    assert list(outside.iterdir()) == []
    with pytest.raises(DataError, match="outside the cache"):
        fetch_object(store, "images/a.jpg", cache)
    assert list(outside.iterdir()) == []


def test_a_shared_file_another_job_changed_is_not_trusted(
    s3, s3_endpoint: str, tiny_coco_s3: str, tiny_coco: Path, tmp_path: Path
) -> None:
    """Two jobs on one node stage the same data: the second takes it from the shared folder,
    unless a file there no longer has its ETag; then it downloads that file anew. The first
    job's own copy is not touched by a change to the shared one."""
    node = tmp_path / "node"
    shared = SharedFiles(node / "shared")
    store = open_store(tiny_coco_s3, StorageSpec(endpoint=s3_endpoint))
    first = stage(store, node / "jobs" / "team-a" / "first", shared)
    files = sorted(p.relative_to(tiny_coco) for p in tiny_coco.rglob("*") if p.is_file())
    assert first.downloaded == len(files) and len(list((node / "shared").iterdir())) == len(files)

    # Another tenant of the node rewrites a shared file (same size, other content).
    victim = tiny_coco / files[0]
    blob = next(p for p in (node / "shared").iterdir() if p.read_bytes() == victim.read_bytes())
    blob.write_bytes(bytes(len(victim.read_bytes())))

    second = stage(store, node / "jobs" / "team-b" / "second", shared)
    assert second.shared == len(files) - 1 and second.downloaded == 1
    for rel in files:  # both jobs hold exactly the bucket's bytes
        assert (second.root / rel).read_bytes() == (tiny_coco / rel).read_bytes()
        assert (first.root / rel).read_bytes() == (tiny_coco / rel).read_bytes()
    assert blob.read_bytes() == victim.read_bytes()  # the shared copy was replaced by a checked one
    assert not os.path.samefile(second.root / files[1], next(iter((node / "shared").iterdir())))


def test_a_damaged_index_is_read_as_empty_and_every_file_checked(
    s3_endpoint: str, tiny_coco_s3: str, tmp_path: Path
) -> None:
    store = open_store(tiny_coco_s3, StorageSpec(endpoint=s3_endpoint))
    first = stage(store, tmp_path)
    (first.root / INDEX_NAME).write_text('{"truncated": ')
    again = stage(store, tmp_path)
    assert again.downloaded == 0 and again.skipped == first.downloaded
