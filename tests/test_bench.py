"""The benchmark scripts run end to end at CPU sizes (their GPU numbers are recorded in bench/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "bench"
pytestmark = pytest.mark.slow


def run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_sam2_throughput_smoke(tmp_path: Path) -> None:
    out = tmp_path / "sam2.json"
    args = ["--variants", "sam2.1_hiera_tiny", "--image-size", "64", "--images", "8", "--batch", "2"]
    printed = run("sam2_throughput.py", *args, "--steps", "3", "--warmup", "1", "--workers", "0", "--out", str(out))
    (row,) = json.loads(out.read_text())["results"]
    for mode in ("common", "batched", "cached", "cached-disk", "full", "full-ckpt"):
        assert row[mode]["images_per_second"] > 0 and f" {mode} " in printed
    assert row["batched"]["ratio"] == row["batched"]["images_per_second"] / row["common"]["images_per_second"]
    # The warm epoch encodes each of the 8 images once; the timed steps only hit the cache.
    for mode in ("cached", "cached-disk"):
        assert row[mode]["cache_misses"] == 8 and row[mode]["cache_hits"] == 2 * (1 + 3), mode
    assert row["encoder"]["gflop_per_batch"] > 0 and row["encoder"]["tflops"] > 0


def test_amp_parity_smoke() -> None:
    printed = run(
        "amp_parity.py",
        "--image-size",
        "64",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--precisions",
        "fp32,bf16",
    )
    assert "max loss gap vs fp32" in printed


def test_loader_throughput_smoke(tmp_path: Path) -> None:
    out = tmp_path / "loader.json"
    args = ["--image-size", "64", "--source-size", "80", "--images", "8", "--batch", "2", "--repeats", "1"]
    printed = run("loader_throughput.py", *args, "--workers", "0", "--out", str(out))
    result = json.loads(out.read_text())
    # The script itself checks that held images reach the step undecoded with their features.
    for mode in ("decode", "memory-held", "disk-held"):
        assert result[mode]["images_per_second"] > 0 and f"\n{mode} " in printed
    assert result["decode"]["ratio"] == 1.0 and result["entry_mib"] > 0
