"""The benchmark scripts run end to end at CPU sizes (their GPU numbers are recorded in bench/).

sam2_throughput.py and amp_parity.py run as stages of the GPU kit's CPU dry run (test_gpu_kit.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
pytestmark = pytest.mark.slow


def run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_loader_throughput_smoke(tmp_path: Path) -> None:
    out = tmp_path / "loader.json"
    args = ["--image-size", "64", "--source-size", "80", "--images", "8", "--batch", "2", "--repeats", "1"]
    printed = run("loader_throughput.py", *args, "--workers", "0", "--out", str(out))
    result = json.loads(out.read_text())
    # The script itself checks that held images reach the step undecoded with their features.
    for mode in ("decode", "memory-held", "disk-held"):
        assert result[mode]["images_per_second"] > 0 and f"\n{mode} " in printed
    assert result["decode"]["ratio"] == 1.0 and result["entry_mib"] > 0
