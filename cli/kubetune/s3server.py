"""An S3-compatible server on loopback (moto's server mode) for the demo and the tests."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3

DEMO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "kubetune-demo", "AWS_SECRET_ACCESS_KEY": "kubetune-demo-secret"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_s3() -> Iterator[str]:
    """Start moto on 127.0.0.1 and yield its endpoint URL; credentials go into os.environ."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

    os.environ.update(DEMO_CREDENTIALS)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def upload_tree(endpoint: str, folder: Path, bucket: str, prefix: str) -> int:
    """Upload every file under `folder` to s3://bucket/prefix/…, creating the bucket; returns the count."""
    s3 = client(endpoint)
    if bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
        s3.create_bucket(Bucket=bucket)
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    for path in files:
        s3.upload_file(str(path), bucket, prefix + path.relative_to(folder).as_posix())
    return len(files)


def download_prefix(endpoint: str, bucket: str, prefix: str, dest: Path) -> list[Path]:
    s3 = client(endpoint)
    out = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            path = dest / obj["Key"][len(prefix) :]
            path.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(path))
            out.append(path)
    return out
