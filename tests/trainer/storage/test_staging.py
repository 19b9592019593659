"""Staging from a real S3 endpoint (moto server): parallel download, ETag checks, skips, errors."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from boto3.s3.transfer import TransferConfig
from kubetune_trainer.config import StorageSpec
from kubetune_trainer.errors import ConfigError, StorageUnavailable
from kubetune_trainer.storage.staging import INDEX_NAME, fetch_object, stage
from kubetune_trainer.storage.stores import etag_matches, open_store

from tests.helpers import FlakyProxy


def test_stage_downloads_then_skips(s3_endpoint: str, tiny_coco_s3: str, tiny_coco: Path, tmp_path: Path) -> None:
    store = open_store(tiny_coco_s3, StorageSpec(endpoint=s3_endpoint))
    first = stage(store, tmp_path)
    files = sorted(p.relative_to(tiny_coco) for p in tiny_coco.rglob("*") if p.is_file())
    assert first.downloaded == len(files) and first.skipped == 0
    assert (
        sorted(p.relative_to(first.root) for p in first.root.rglob("*") if p.is_file() and p.name != INDEX_NAME)
        == files
    )
    for rel in files:
        assert (first.root / rel).read_bytes() == (tiny_coco / rel).read_bytes()
    again = stage(store, tmp_path)
    assert again.downloaded == 0 and again.skipped == len(files)
    # A damaged cached file (different size) is fetched again.
    victim = first.root / files[0]
    victim.write_bytes(b"x")
    third = stage(store, tmp_path)
    assert third.downloaded == 1 and victim.read_bytes() == (tiny_coco / files[0]).read_bytes()


def test_files_staged_before_a_kill_are_not_downloaded_again(
    s3_endpoint: str, tiny_coco_s3: str, tmp_path: Path
) -> None:
    store = open_store(tiny_coco_s3, StorageSpec(endpoint=s3_endpoint))
    first = stage(store, tmp_path)
    (first.root / INDEX_NAME).unlink()  # killed after the downloads, before the index was written
    half = sorted(p for p in first.root.rglob("*.jpg"))[: first.downloaded // 3]
    for path in half:  # ... or before these downloads finished: their .partial never got renamed
        path.unlink()
    again = stage(store, tmp_path)
    assert again.downloaded == len(half) and again.skipped == first.downloaded - len(half)
    assert stage(store, tmp_path).downloaded == 0


def test_multipart_etag_is_verified(s3, bucket: str, tmp_path: Path) -> None:
    big = tmp_path / "weights.bin"
    big.write_bytes(bytes(range(256)) * (40 * 1024 * 4))  # 40 MiB
    s3.upload_file(
        str(big),
        bucket,
        "w/weights.bin",
        Config=TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20),
    )
    etag = s3.head_object(Bucket=bucket, Key="w/weights.bin")["ETag"].strip('"')
    assert etag.endswith("-5")
    assert etag_matches(big, etag)
    with big.open("r+b") as fh:
        fh.seek(1000)
        fh.write(b"corrupt")
    assert not etag_matches(big, etag)


def test_missing_bucket_is_named(s3_endpoint: str, tmp_path: Path) -> None:
    store = open_store("s3://no-such-bucket/data/", StorageSpec(endpoint=s3_endpoint))
    with pytest.raises(ConfigError, match="bucket 'no-such-bucket' does not exist"):
        stage(store, tmp_path)


def test_empty_prefix_is_named(s3_endpoint: str, bucket: str, tmp_path: Path) -> None:
    store = open_store(f"s3://{bucket}/nothing-here/", StorageSpec(endpoint=s3_endpoint))
    with pytest.raises(ConfigError, match=f"s3://{bucket}/nothing-here/ holds no objects"):
        stage(store, tmp_path)


def test_missing_credentials_are_named(s3_endpoint: str, bucket: str, tmp_path: Path, monkeypatch) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = open_store(f"s3://{bucket}/x/", StorageSpec(endpoint=s3_endpoint))
    with pytest.raises(ConfigError, match="no S3 credentials"):
        stage(store, tmp_path)


def test_an_endpoint_down_past_the_retry_budget_is_retryable_and_named(tmp_path: Path, monkeypatch) -> None:
    from kubetune.s3server import free_port

    monkeypatch.setenv("KUBETUNE_STORAGE_RETRY_S", "1")
    endpoint = f"http://127.0.0.1:{free_port()}"
    store = open_store("s3://data/x/", StorageSpec(endpoint=endpoint))
    with pytest.raises(
        StorageUnavailable, match=f"S3 unavailable for s3://data/x/ at {endpoint}.*retried for 1 s"
    ) as err:
        stage(store, tmp_path)
    assert err.value.exit_code == 1  # the Job retries the pod; the spec is not wrong


def test_an_outage_shorter_than_the_budget_is_ridden_out(
    s3_endpoint: str, tiny_coco_s3: str, tmp_path: Path, monkeypatch
) -> None:
    """S3 behind a loopback proxy that refuses connections for a while, then forwards again."""
    monkeypatch.setenv("KUBETUNE_STORAGE_RETRY_S", "60")
    with FlakyProxy(s3_endpoint) as proxy:
        proxy.down_for(3.0)
        store = open_store(tiny_coco_s3, StorageSpec(endpoint=proxy.url, region="us-east-1"))
        started = time.monotonic()
        report = stage(store, tmp_path)
        assert report.downloaded > 0 and time.monotonic() - started >= 2.5
        assert proxy.refused > 0


def test_file_sources_are_used_in_place(tiny_coco: Path, tmp_path: Path) -> None:
    report = stage(open_store(f"file://{tiny_coco}", StorageSpec()), tmp_path)
    assert report.root == tiny_coco and report.downloaded == 0
    with pytest.raises(ConfigError, match="does not exist"):
        stage(open_store(f"file://{tmp_path}/absent/", StorageSpec()), tmp_path)


def test_fetch_object_caches_weights(s3_endpoint: str, s3, bucket: str, tmp_path: Path) -> None:
    s3.put_object(Bucket=bucket, Key="models/w.pt", Body=b"weights")
    store = open_store(f"s3://{bucket}/models/", StorageSpec(endpoint=s3_endpoint))
    path = fetch_object(store, "w.pt", tmp_path)
    assert path.read_bytes() == b"weights"
    with pytest.raises(ConfigError, match="missing.pt does not exist"):
        fetch_object(store, "missing.pt", tmp_path)


def test_a_multipart_object_with_unusual_parts_is_verified_by_the_part_size_s3_reports(
    s3, s3_endpoint: str, bucket: str, tmp_path: Path
) -> None:
    """12 MiB parts: no size a guess would try (8, 16, 5 MiB, size / parts rounded to MiB)."""
    big = tmp_path / "weights.bin"
    big.write_bytes(bytes(range(256)) * (40 * 1024 * 4))  # 40 MiB: parts of 12, 12, 12, 4
    config = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=12 << 20)
    s3.upload_file(str(big), bucket, "w/weights.bin", Config=config)
    etag = s3.head_object(Bucket=bucket, Key="w/weights.bin")["ETag"].strip('"')
    assert etag.endswith("-4") and not etag_matches(big, etag)
    store = open_store(f"s3://{bucket}/w/", StorageSpec(endpoint=s3_endpoint, region="us-east-1"))
    report = stage(store, tmp_path / "cache")
    assert report.downloaded == 1 and (report.root / "weights.bin").read_bytes() == big.read_bytes()
    obj = store.list()[0]
    staged = report.root / "weights.bin"
    assert store.verify(obj, staged)
    with staged.open("r+b") as fh:  # a flipped byte is caught by the same check
        fh.seek(30 << 20)
        fh.write(b"\xff")
    assert not store.verify(obj, staged)
