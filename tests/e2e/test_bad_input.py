"""Bad input fails fast with a clear reason and exit code 2, and writes nothing to the output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kubetune.s3server import free_port, upload_tree

from tests.factories import job_manifest

pytestmark = pytest.mark.slow


def run_cli(spec: dict, tmp_path: Path, env_extra: dict | None = None) -> tuple[int, str, str]:
    import os

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    termination = tmp_path / "termination-log"
    termination.write_text("")
    env = {
        **os.environ,
        "KUBETUNE_METRICS_PORT": "0",
        "KUBETUNE_TERMINATION_LOG": str(termination),
        **(env_extra or {}),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "run", str(path), "--local"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    return proc.returncode, proc.stdout + proc.stderr, termination.read_text()


def test_malformed_spec(tmp_path: Path) -> None:
    spec = job_manifest("s3://d/x/", "s3://o/x/", None)
    spec["spec"]["training"]["batchsize"] = 4
    code, out, _ = run_cli(spec, tmp_path)
    assert code == 2
    assert "spec.training.batchsize: Extra inputs are not permitted" in out


def test_corrupt_annotations(s3, s3_endpoint: str, tiny_coco: Path, bucket: str, tmp_path: Path) -> None:
    upload_tree(s3_endpoint, tiny_coco, bucket, "data/")
    s3.put_object(Bucket=bucket, Key="data/train/annotations.json", Body=b'{"images": [ {"id": 1,')
    code, out, reason = run_cli(job_manifest(f"s3://{bucket}/data/", f"s3://{bucket}/out/", s3_endpoint), tmp_path)
    assert code == 2, out[-2000:]
    assert "train/annotations.json is not valid JSON" in reason
    assert s3.list_objects_v2(Bucket=bucket, Prefix="out/").get("KeyCount") == 0


def test_s3_down_past_the_retry_budget_exits_1_for_a_retry(tmp_path: Path) -> None:
    """Not bad input: an outage. Retried with backoff for KUBETUNE_STORAGE_RETRY_S, then exit 1,
    so the Job's podFailurePolicy retries the pod instead of failing the job."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    spec = job_manifest("s3://data/x/", "s3://out/x/", endpoint)
    code, out, reason = run_cli(spec, tmp_path, {"KUBETUNE_STORAGE_RETRY_S": "2"})
    assert code == 1, out[-2000:]
    assert "S3 unavailable for s3://data/x/" in reason and endpoint in reason and "retried for 2 s" in reason
    assert '"event": "storage unavailable, retrying"' in out


def test_missing_output_bucket_fails_before_training(s3_endpoint: str, tiny_coco_s3: str, tmp_path: Path) -> None:
    code, out, reason = run_cli(job_manifest(tiny_coco_s3, "s3://no-such-output/run/", s3_endpoint), tmp_path)
    assert code == 2, out[-2000:]
    assert "bucket 'no-such-output' does not exist" in reason
    assert '"event": "training"' not in out
