"""Shared fixtures: a real S3 endpoint (moto's server on loopback) and tiny synthetic datasets."""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubetune.local import kill_tree
from kubetune.s3server import client, local_s3, upload_tree
from kubetune.synthetic import write_coco_dataset

from .kube_emulator import kube_api  # noqa: F401 - a fixture, shared by the operator tests

ROOT = Path(__file__).resolve().parents[1]


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


def tiny_spec(source: str, output: str, endpoint: str | None, **training) -> dict:
    """A FineTuneJob for CPU tests: SAM2 tiny at 64 px on the tiny COCO set."""
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "e2e", "namespace": "tests"},
        "spec": {
            "model": {"family": "sam2", "variant": "sam2.1_hiera_tiny", "imageSize": 64},
            "data": {
                "source": source,
                "format": "coco",
                "train": "train/annotations.json",
                "validation": "val/annotations.json",
                "numWorkers": 0,
            },
            "training": {
                "maxSteps": 6,
                "batchSize": 2,
                "precision": "fp32",
                "evalEvery": 3,
                "optimizer": {"lr": 1e-3},
                **training,
            },
            "storage": {"endpoint": endpoint, "region": "us-east-1"},
            "output": {"uri": output, "checkpointEvery": 3, "keepLast": 2},
        },
    }


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


def write_tiny_sam(folder: Path, seed: int = 123) -> dict:
    """A transformers SamModel folder (config.json + model.safetensors) with a 64 px input and
    32-wide layers: the real architecture at a size that trains on a CPU in seconds."""
    import torch
    from transformers import SamConfig, SamModel

    config = SamConfig(
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "global_attn_indexes": [1],
            "image_size": 64,
            "patch_size": 8,
            "window_size": 4,
            "output_channels": 32,
            "num_pos_feats": 16,
            "mlp_dim": 64,
            "initializer_range": 0.02,
        },
        prompt_encoder_config={"hidden_size": 32, "image_size": 64, "patch_size": 8, "mask_input_channels": 4},
        mask_decoder_config={"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 2, "iou_head_hidden_dim": 32},
    )
    from kubetune_trainer.promptable.models.sam import reset_positional_encoding

    torch.manual_seed(seed)
    model = SamModel(config)
    reset_positional_encoding(model)
    model.save_pretrained(folder)
    return {k: v.clone() for k, v in model.state_dict().items()}


def free_port_run(count: int) -> int:
    """A base port with `count` consecutive free ports (ranks serve /metrics on base + local
    rank). Drawn below the kernel's ephemeral range, where client sockets of the same test
    (boto3, torchrun's rendezvous) would otherwise take base + 1 now and then."""
    for _ in range(200):
        base = random.randrange(20000, 32000 - count)
        sockets = [socket.socket() for _ in range(count)]
        try:
            for offset, sock in enumerate(sockets):
                sock.bind(("", base + offset))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports in 20000-32000")
