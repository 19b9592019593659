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


def test_operator_scale_smoke(tmp_path: Path) -> None:
    """The operator benchmark end to end at a tiny size: its own control plane, the real operator,
    the audit log read back."""
    out = tmp_path / "scale.json"
    printed = run("operator_scale.py", "--sizes", "6", "--seconds", "4", "--nodes", "2", "--json", str(out))
    result = json.loads(out.read_text())["sizes"][0]
    assert result["jobs"] == 6 and 0 < result["apply_to_job_s"]["p50"] <= result["apply_to_job_s"]["p99"]
    # Every new job: the credentials Secret's labels, a dry-run and a create of each object.
    assert result["creating"]["by_request"]["get secrets"] == 6
    assert result["creating"]["by_request"]["create jobs"] == 12
    assert result["hung"]["left_running"] == 0 and "hung endpoints:" in printed
