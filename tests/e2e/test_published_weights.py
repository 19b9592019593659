"""Weights from where they are published, in real runs: an http:// checkpoint checked by its
SHA-256, downloaded once per node by two processes and not again by the node's next job; the
mirror that `kubetune weights mirror` fills standing in for the network; bad URIs exit 2 before
anything is written."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.factories import job_manifest
from tests.helpers import log_events, make_base_weights, serve_files

pytestmark = pytest.mark.slow
NAME = "sam2.1_hiera_tiny.pt"


@pytest.fixture
def published(tmp_path: Path):
    """Meta-format SAM2 weights served over loopback HTTP: (URL, its SHA-256, requests seen)."""
    folder = tmp_path / "published"
    folder.mkdir()
    make_base_weights(folder / NAME)
    digest = hashlib.sha256((folder / NAME).read_bytes()).hexdigest()
    with serve_files(folder) as (base, seen):
        yield f"{base}/{NAME}", digest, seen


def spec_for(source: str, out: Path, checkpoint: str, name: str, **model) -> dict:
    model = {"checkpoint": checkpoint, **model}
    return job_manifest(source, out.as_uri() + "/", name=name, model=model, data={"validation": None}, maxSteps=2)


def test_http_weights_download_once_per_node_and_are_shared(start_run, published, tiny_coco: Path, tmp_path: Path):
    url, digest, seen = published
    spec = spec_for(tiny_coco.as_uri(), tmp_path / "out-a", url, "first", checkpointSha256=digest)
    proc, log = start_run(spec, nproc=2, name="first")
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert seen == [("GET", f"/{NAME}")]  # local rank 0 fetched it; rank 1 found it staged
    assert "NO BASE WEIGHTS" not in log.read_text()

    # The node's next job (its own cache folder) takes the checked file from the shared cache.
    spec = spec_for(tiny_coco.as_uri(), tmp_path / "out-b", url, "second", checkpointSha256=digest)
    proc, log = start_run(spec, nproc=1, name="second")
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert seen == [("GET", f"/{NAME}")]


def test_the_mirror_stands_in_for_the_network(start_run, published, tiny_coco: Path, tmp_path: Path):
    url, digest, seen = published
    mirror = (tmp_path / "mirror").as_uri() + "/"
    spec = spec_for(tiny_coco.as_uri(), tmp_path / "out", url, "mirrored", checkpointSha256=digest)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    done = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "weights", "mirror", str(spec_path), "--to", mirror],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    host = url.split("/")[2]
    expected = f"{mirror}http/{host}/{NAME}"
    assert done.stdout.split() == [expected]
    assert hashlib.sha256(Path(expected.removeprefix("file://")).read_bytes()).hexdigest() == digest
    fetched = len(seen)

    # An air-gapped cluster: the same spec with storage.mirror, and no request reaches the URL.
    spec["spec"]["storage"]["mirror"] = mirror
    proc, log = start_run(spec, nproc=1, name="air-gapped")
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert len(seen) == fetched


@pytest.mark.parametrize(
    ("checkpoint", "message"),
    [
        ("{base}/missing.pt", "HTTP 404"),
        ("{base}/" + NAME, "SHA-256 is"),
    ],
)
def test_bad_weights_exit_2_before_anything_is_written(
    start_run, published, tiny_coco: Path, tmp_path: Path, checkpoint: str, message: str
):
    url, _, _ = published
    base = url.rsplit("/", 1)[0]
    out = tmp_path / "out"
    spec = spec_for(tiny_coco.as_uri(), out, checkpoint.format(base=base), "bad", checkpointSha256="0" * 64)
    proc, log = start_run(spec, nproc=1, name="bad")
    assert proc.wait(timeout=300) == 2, log.read_text()[-3000:]
    failed = [e for e in log_events(log.read_text()) if e.get("event") == "training failed"]
    assert failed and message in failed[0]["reason"] and "model.checkpoint" in failed[0]["reason"]
    assert not out.exists() or not any(out.rglob("*"))
