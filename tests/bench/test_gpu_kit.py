"""The GPU kit (bench/gpu/): its CPU dry run end to end, so it cannot rot between measurement
rounds, and the bundle it carries, read from the real uv.lock."""

from __future__ import annotations

import importlib.util
import json
import secrets
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.helpers import ROOT

KIT = ROOT / "bench" / "gpu"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_kit_{name}", KIT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bundle = load("bundle")
kit = load("kit")
LOCK = tomllib.loads((ROOT / "uv.lock").read_text())


def carried(python: str = "3.12", present: set[str] | None = None) -> dict[str, dict]:
    present = bundle.read_present() if present is None else present
    return {p["name"]: p for p in bundle.carried_packages(LOCK, present, python)}


def test_the_bundle_holds_what_the_gpu_image_lacks_and_nothing_it_has() -> None:
    names = set(carried())
    needed = {"pydantic", "pydantic-core", "structlog", "boto3", "botocore", "s3transfer", "moto", "flask"}
    needed |= {"sam2", "hydra-core", "omegaconf", "antlr4-python3-runtime", "iopath", "pycocotools", "monai"}
    needed |= {"fvcore", "yacs", "termcolor", "setuptools"}  # detectron2's, built there from source
    assert needed <= names, needed - names
    assert not names & {
        "torch",
        "torchvision",
        "numpy",
        "transformers",
        "pillow",
        "safetensors",
        "opencv-python-headless",
    }
    assert not names & {"kubetune", "detectron2"}  # the repository and a source, not wheels


def test_markers_pick_the_lock_version_for_the_target_python() -> None:
    present = bundle.read_present() - {"numpy"}
    assert carried("3.12", present)["numpy"]["version"] != carried("3.11", present)["numpy"]["version"]


def test_every_package_has_a_cp312_wheel_or_a_pure_python_sdist_and_the_whole_fits() -> None:
    tags = bundle.target_tags("3.12")
    items = [bundle.artifact(p, tags) for p in carried().values()]
    # The sdists built here must stay pure Python; a new compiled sdist-only dependency needs a plan.
    assert {i.name for i in items if i.built} <= {"sam2", "iopath", "fvcore", "antlr4-python3-runtime"}
    wheels = [i.url.rsplit("/", 1)[1] for i in items if not i.built]
    assert all("cp312" in w or "abi3" in w or "-none-any" in w for w in wheels), wheels
    assert not [w for w in wheels if "musllinux" in w or "macosx" in w or "win" in w.rsplit("-", 1)[1]]
    # Wheels as the lock sizes them, sdists as a stand-in for what they build: room is left under
    # the 56 MiB cap for the Detectron2 source (about 1 MiB).
    assert sum(i.size or 0 for i in items) < 52 * 2**20


def test_a_detectron2_checkout_at_another_commit_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "d2"
    (src / "detectron2").mkdir(parents=True)
    (src / "setup.py").write_text("")
    (src / "detectron2" / "__init__.py").write_text("")
    git = ["git", "-C", str(src), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    with pytest.raises(SystemExit, match="pyproject.toml pins"):
        bundle.bundle_detectron2(src, bundle.pinned_detectron2(LOCK), tmp_path / "d2.tar.gz")


def test_a_detectron2_source_travels_without_git_data_or_build_products(tmp_path: Path) -> None:
    import tarfile

    src = tmp_path / "d2"
    for rel in ("setup.py", "detectron2/__init__.py", "configs/a.yaml", "build/x.o", "detectron2/_C.so", ".git/HEAD"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("x")
    record = bundle.bundle_detectron2(src, "0" * 40, tmp_path / "d2.tar.gz")
    with tarfile.open(tmp_path / "d2.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"detectron2/setup.py", "detectron2/detectron2/__init__.py", "detectron2/configs/a.yaml"} <= names
    assert not [n for n in names if "/build" in n or n.endswith(".so") or "/.git" in n]
    assert record["verified_commit"] is False


def test_goals_are_judged_on_the_measured_ratios() -> None:
    stages = {
        "sam2-throughput": {
            "figures": {
                "results": [
                    {
                        "variant": "tiny",
                        "batched": {"ratio": 16.0},
                        "cached": {"ratio": 30.0},
                        "encoder": {"bf16_peak_fraction": 0.5},
                    }
                ]
            }
        },
        "amp-parity": {"figures": {"results": {"fp32": {}, "bf16": {"max_loss_gap_vs_fp32": 0.03}}}},
    }
    judged = {g["goal"]: g["met"] for g in kit.goals(stages)}
    assert judged == {
        "tiny: first epoch >= 15x the common recipe": True,
        "tiny: cached epochs >= 35x the common recipe": False,
        "tiny: encoder forward >= 40 % of bf16 peak": True,
        "bf16 loss within 2 % of fp32 over the first 30 steps": False,
    }
    assert kit.parse_stages("1-3,6") == [1, 2, 3, 6]


def test_a_second_command_adds_its_stages_to_the_first_ones_results(tmp_path: Path) -> None:
    def entry(number: int, name: str, seconds: float) -> dict:
        return {"number": number, "name": name, "status": "ok", "seconds": seconds, "figures": {}, "error": None}

    first = kit.Recorder(tmp_path, "gpu", 8)
    first.add(entry(1, "environment", 1.0))
    first.add(entry(2, "end-to-end", 2.0))
    second = kit.Recorder(tmp_path, "gpu", 8)
    second.add(entry(6, "detectron2", 6.0))
    second.add(entry(2, "end-to-end", 9.0))  # run again: replaces the first command's entry
    record = json.loads((tmp_path / "results.json").read_text())
    assert [(s["number"], s["seconds"]) for s in record["stages"]] == [(1, 1.0), (2, 9.0), (6, 6.0)]
    assert "| 6 detectron2 | ok |" in (tmp_path / "results.md").read_text()
    assert kit.Recorder(tmp_path, "cpu-dry-run", 0).stages == []  # another mode starts afresh


def test_a_stage_past_its_cap_is_cut_off_with_every_process_it_started(tmp_path: Path) -> None:
    import time

    marker = f"sleep {secrets.randbelow(10**6) + 10**7}"  # a command line nothing else runs
    with (tmp_path / "stages.log").open("w") as log:
        k = kit.Kit(tmp_path, False, time.time() + 60, log, stage_deadline=time.time() + 2)
        with pytest.raises(kit.Failed, match="time cap"):
            # the second sleep starts a session of its own, as torchrun's workers do
            k.run(["bash", "-c", f"{marker} & setsid {marker} & wait"])
    survivors = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").strip()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):  # gone meanwhile
            continue
        if cmdline == marker.encode() and state != "Z":
            survivors.append(proc.name)
    assert survivors == []


@pytest.mark.slow
def test_cpu_dry_run_runs_every_stage(tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", str(KIT / "run.sh"), "--cpu-dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((tmp_path / "results.json").read_text())
    stages = {s["name"]: s for s in record["stages"]}
    assert [s["number"] for s in record["stages"]] == [1, 2, 3, 4, 5, 6]
    for name in ("environment", "end-to-end", "sam2-throughput", "amp-parity", "sam-throughput"):
        assert stages[name]["status"] == "ok", (
            name,
            stages[name]["error"],
            (tmp_path / "stages.log").read_text()[-4000:],
        )
    d2 = stages["detectron2"]
    if importlib.util.find_spec("detectron2") is None:
        assert d2["status"] == "skipped" and "make detectron2" in d2["error"]
    else:
        assert d2["status"] == "ok" and d2["figures"]["kubetune_data_wait_fraction"] < 1

    assert stages["environment"]["figures"]["import_errors"] == {}
    e2e = stages["end-to-end"]["figures"]
    bf16 = e2e["bf16_killed_and_resumed"]
    assert bf16["first_exit_code"] == -9 and bf16["resumed_exit_code"] == 0
    assert bf16["resumed_from_step"] == bf16["killed_after_checkpoint"] < bf16["total_steps"] == bf16["steps"]
    assert bf16["epochs"][-1]["features"] == "cached" and bf16["feature_cache_after_resume"]["hits"] > 0
    assert e2e["fp16"]["exit_code"] == 0 and e2e["problems"] == []

    (row,) = stages["sam2-throughput"]["figures"]["results"]
    for mode in ("common", "batched", "cached", "cached-disk", "full", "full-ckpt"):
        assert row[mode]["images_per_second"] > 0
    assert row["batched"]["ratio"] == row["batched"]["images_per_second"] / row["common"]["images_per_second"]
    # The warm epoch encodes each of the 8 images once; the 1 + 3 timed steps only hit the cache.
    for mode in ("cached", "cached-disk"):
        assert row[mode]["cache_misses"] == 8 and row[mode]["cache_hits"] == 2 * (1 + 3), mode
    assert row["encoder"]["gflop_per_batch"] > 0

    amp = stages["amp-parity"]["figures"]["results"]
    assert 0 <= amp["bf16"]["max_loss_gap_vs_fp32"] < 0.2 and 0 <= amp["fp16"]["max_loss_gap_vs_fp32"] < 0.2
    (sam,) = stages["sam-throughput"]["figures"]["results"]
    assert sam["base"] == "batched" and sam["cached"]["cache_hits"] > 0

    summary = (tmp_path / "results.md").read_text()
    assert "| 2 end-to-end | ok |" in summary and "not judged (CPU)" in summary
    assert "stage 5 sam-throughput: ok" in done.stdout


def test_run_refuses_a_missing_bundle(tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", str(KIT / "run.sh"), "--bundle", str(tmp_path), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "prepare.sh" in done.stderr
    assert not (tmp_path / "out").exists()
