"""Shared fixtures: a real S3 endpoint (moto's server on loopback), tiny synthetic datasets, local
runs of `kubetune run --local`, a real Kubernetes control plane (kube_cluster.py). Helpers are in helpers.py, configs
and manifests in factories.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubetune.local import kill_tree
from kubetune.s3server import client, local_s3, upload_tree
from kubetune.synthetic import write_coco_dataset

from tests.kube_cluster import cluster, namespace, operator  # noqa: F401 - fixtures: a real control plane, a fresh namespace, the operator


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    with local_s3() as endpoint:
        yield endpoint


@pytest.fixture
def s3(s3_endpoint: str):
    """A boto3 client for the test server."""
    return client(s3_endpoint)


@pytest.fixture
def bucket(s3, request) -> str:
    """A fresh, empty bucket named after the test."""
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory) -> Path:
    """Eight training and four validation images of 96 px: small enough for CPU runs."""
    return write_coco_dataset(tmp_path_factory.mktemp("coco"), train=8, val=4, size=96, seed=3)


@pytest.fixture
def tiny_coco_s3(s3_endpoint: str, tiny_coco: Path, bucket: str) -> str:
    upload_tree(s3_endpoint, tiny_coco, bucket, "data/")
    return f"s3://{bucket}/data/"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KUBETUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("KUBETUNE_LOG_FORMAT", "json")
    os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def start_run(tmp_path):
    """Start `kubetune run SPEC --local` as a process group; returns (Popen, log path)."""
    import subprocess
    import sys

    import yaml

    procs = []

    def start(spec: dict, nproc: int = 1, env: dict | None = None, name: str = "run"):
        spec_path = tmp_path / f"{name}.yaml"
        spec_path.write_text(yaml.safe_dump(spec))
        log_path = tmp_path / f"{name}.log"
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        proc = subprocess.Popen(
            [sys.executable, "-m", "kubetune.cli", "run", str(spec_path), "--local", "--nproc-per-node", str(nproc)],
            stdout=log_path.open("w"),
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )
        procs.append(proc)
        return proc, log_path

    yield start
    for proc in procs:
        kill_tree(proc.pid)
        proc.wait()
