"""Stage 2 of the GPU kit: one FineTuneJob through `kubetune run --local`, killed and resumed.

SAM2 hiera tiny on synthetic COCO data served by a moto S3 server on loopback, bf16 with
`featureCache: memory`, a checkpoint after every epoch. The whole run (launcher, torchrun and
worker) is SIGKILLed, as a lost node would be, as soon as its first checkpoint is complete; run
again, it must resume from the newest complete checkpoint and finish. Then the same job in fp16
with the GradScaler for a few dozen steps.

Records exit codes, the resume step, images/s per epoch (the first epoch of each run computes the
encoder's features, later ones read them from the cache), the loss trajectories, skipped steps,
cache hits and peak GPU memory, and exits 1 when any of them is not what a healthy run gives.

    python bench/gpu/end_to_end.py --out e2e.json           # 1024 px, on the GPU
    python bench/gpu/end_to_end.py --tiny --out e2e.json    # 64 px, a CPU dry run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from kubetune.local import kill_tree
from kubetune.s3server import client, local_s3, upload_tree
from kubetune.synthetic import write_coco_dataset

SIZES = {
    "gpu": {"image_size": 1024, "train": 128, "val": 8, "batch": 16, "epochs": 5, "fp16_steps": 40, "workers": 8},
    "tiny": {"image_size": 64, "train": 16, "val": 2, "batch": 2, "epochs": 3, "fp16_steps": 4, "workers": 0},
}


def job(name: str, endpoint: str, size: dict, precision: str, cache: str, **training) -> dict:
    steps_per_epoch = size["train"] // size["batch"]
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "gpu-kit"},
        "spec": {
            "model": {
                "family": "sam2",
                "variant": "sam2.1_hiera_tiny",
                "imageSize": size["image_size"],
                "featureCache": cache,
            },
            "data": {
                "source": "s3://datasets/shapes/",
                "format": "coco",
                "train": "train/annotations.json",
                "validation": "val/annotations.json",
                "numWorkers": size["workers"],
                "prompts": {"type": "box", "perturbation": 4, "maxObjects": 4},
                # One cache entry per image, so the second epoch of a run reads every feature.
                "horizontalFlip": False,
            },
            "training": {
                "batchSize": size["batch"],
                "precision": precision,
                "optimizer": {"name": "adamw", "lr": 1.0e-4},
                "schedule": {"type": "cosine", "warmupSteps": 2},
                "seed": 0,
                **training,
            },
            "storage": {"endpoint": endpoint, "region": "us-east-1"},
            "output": {"uri": f"s3://runs/{name}/", "checkpointEvery": steps_per_epoch, "keepLast": 2},
        },
    }


class Runs:
    """`kubetune run --local` processes sharing one work folder, S3 server and node cache."""

    def __init__(self, work: Path, endpoint: str, nproc: int) -> None:
        self.work, self.endpoint, self.nproc = work, endpoint, nproc
        self.s3 = client(endpoint)
        self.env = {
            **os.environ,
            "KUBETUNE_CACHE_DIR": str(work / "cache"),
            "KUBETUNE_METRICS_PORT": "0",
            "KUBETUNE_LOG_FORMAT": "json",
        }

    def start(self, spec: dict, label: str) -> tuple[subprocess.Popen, Path]:
        path = self.work / f"{label}.yaml"
        path.write_text(yaml.safe_dump(spec))
        log = self.work / f"{label}.log"
        command = [sys.executable, "-m", "kubetune.cli", "run", str(path), "--local"]
        proc = subprocess.Popen(
            [*command, "--nproc-per-node", str(self.nproc)],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        return proc, log

    @staticmethod
    def wait(proc: subprocess.Popen, deadline: float) -> int:
        """The run's exit code; past the deadline the whole run is killed and TimeoutExpired raised."""
        try:
            return proc.wait(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            proc.wait()
            raise

    def keys(self, prefix: str) -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket="runs", Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def complete_checkpoints(self, name: str) -> list[int]:
        keys = self.keys(f"{name}/checkpoints/")
        return sorted(int(k.split("/")[2][5:]) for k in keys if k.endswith("/manifest.json"))

    def read(self, name: str, key: str) -> bytes:
        return self.s3.get_object(Bucket="runs", Key=f"{name}/{key}")["Body"].read()


def tail(log: Path, chars: int = 2500) -> str:
    return log.read_text(errors="replace")[-chars:]


def events(log: Path, name: str) -> list[dict]:
    rows = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return [r for r in rows if r.get("event") == name]


def history(runs: Runs, name: str) -> list[dict]:
    """One row per trained step from metrics.jsonl, each completed by the values of the rows
    before it (the log writes only what changed, sometimes in two rows for one step)."""
    by_step, last = {}, {}
    for line in runs.read(name, "metrics.jsonl").decode().splitlines():
        last = {**last, **json.loads(line)}
        by_step[int(last["step"])] = dict(last, step=int(last["step"]))
    return [by_step[s] for s in sorted(by_step) if "loss" in by_step[s] and "images_per_second" in by_step[s]]


def per_epoch(rows: list[dict], resumed_at: int) -> list[dict]:
    """Median images/s per (run, epoch); an epoch that opens its run computes the features."""
    groups: dict[tuple[int, int], list[float]] = {}
    waits: dict[tuple[int, int], list[float]] = {}
    for row in rows:
        run = 1 if row["step"] <= resumed_at else 2
        groups.setdefault((run, int(row["epoch"])), []).append(row["images_per_second"])
        waits.setdefault((run, int(row["epoch"])), []).append(row.get("data_wait_share", float("nan")))
    out, opened = [], set()
    for (run, epoch), values in sorted(groups.items()):
        out.append(
            {
                "run": run,
                "epoch": epoch,
                "steps": len(values),
                "images_per_second": statistics.median(values),
                # The share of each step spent waiting for the DataLoader: host-bound when high.
                "data_wait_share": statistics.median(waits[(run, epoch)]),
                "features": "cached" if run in opened else "computed",
            }
        )
        opened.add(run)
    return out


def peak_gib(rows: list[dict]) -> float | None:
    peaks = [r["gpu_memory/peak"] for r in rows if "gpu_memory/peak" in r]
    return max(peaks) / 2**30 if peaks else None


def killed_and_resumed(runs: Runs, size: dict, deadline: float, problems: list[str]) -> dict:
    """The bf16 job: SIGKILL after the first complete checkpoint, then a resumed run to the end."""
    name = "e2e-bf16"
    spec = job(name, runs.endpoint, size, "bf16", "memory", epochs=size["epochs"])
    spec["spec"]["training"]["evalEvery"] = size["train"] // size["batch"]
    first, log1 = runs.start(spec, "bf16-first")
    while not runs.complete_checkpoints(name):
        if first.poll() is not None:
            problems.append(f"the first run exited {first.returncode} before any checkpoint:\n{tail(log1)}")
            return {"first_exit_code": first.returncode}
        if time.time() > deadline:
            kill_tree(first.pid)
            problems.append("no checkpoint before the stage's deadline")
            return {"first_exit_code": None}
        time.sleep(0.1)
    kill_tree(first.pid)
    first_code = first.wait()
    newest = runs.complete_checkpoints(name)[-1]
    if first_code == 0:
        problems.append("the first run finished before it could be killed: raise the epochs")
    second, log2 = runs.start(spec, "bf16-resumed")
    second_code = runs.wait(second, deadline)
    result = {"first_exit_code": first_code, "killed_after_checkpoint": newest, "resumed_exit_code": second_code}
    if second_code != 0:
        problems.append(f"the resumed run exited {second_code}:\n{tail(log2)}")
        return result
    resumed = events(log2, "resumed")
    result["resumed_from_step"] = resumed[0]["step"] if resumed else None
    if result["resumed_from_step"] != newest:
        problems.append(f"resumed from {result['resumed_from_step']}, not the newest checkpoint {newest}")
    report = json.loads(runs.read(name, "report.json"))
    rows = history(runs, name)
    result |= {
        "steps": report["steps"],
        "total_steps": report["total_steps"],
        "epochs": per_epoch(rows, newest),
        "losses": [[r["step"], r["loss"]] for r in rows],
        "skipped_steps": report.get("amp_skipped_steps"),
        "feature_cache_after_resume": report["feature_cache"],
        "baseline": report["baseline"],
        "final": report["final"],
        "peak_gib": peak_gib(rows),
        "wall_seconds_resumed_run": report["wall_seconds"],
    }
    if report["steps"] != report["total_steps"]:
        problems.append(f"the resumed run stopped at step {report['steps']} of {report['total_steps']}")
    if [r["step"] for r in rows] != list(range(1, report["total_steps"] + 1)):
        problems.append("the metric history is not one step after another across the restart")
    if not (report["feature_cache"] or {}).get("hits"):
        problems.append(f"the feature cache was never hit after the resume: {report['feature_cache']}")
    return result


def fp16_run(runs: Runs, size: dict, deadline: float, problems: list[str]) -> dict:
    """The same job in fp16 (GradScaler), no cache, a few dozen steps."""
    name = "e2e-fp16"
    spec = job(name, runs.endpoint, size, "fp16", "off", maxSteps=size["fp16_steps"])
    proc, log = runs.start(spec, "fp16")
    code = runs.wait(proc, deadline)
    result = {"exit_code": code}
    if code != 0:
        problems.append(f"the fp16 run exited {code}:\n{tail(log)}")
        return result
    report = json.loads(runs.read(name, "report.json"))
    rows = history(runs, name)
    result |= {
        "steps": report["steps"],
        "losses": [[r["step"], r["loss"]] for r in rows],
        "skipped_steps": report.get("amp_skipped_steps"),
        "grad_scale": [r.get("amp/grad_scale") for r in rows][-1] if rows else None,
        "images_per_second": statistics.median(r["images_per_second"] for r in rows[1:] or rows),
        "peak_gib": peak_gib(rows),
    }
    if report.get("amp_skipped_steps", 0) >= report["steps"] / 2:
        problems.append(f"fp16 skipped {report['amp_skipped_steps']} of {report['steps']} steps")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU sizes (64 px, a handful of images)")
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: by size)")
    parser.add_argument("--budget-s", type=float, default=600, help="give up after this long")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    size = SIZES["tiny" if args.tiny else "gpu"]
    if args.workers is not None:
        size = {**size, "workers": args.workers}
    deadline = time.time() + args.budget_s
    problems: list[str] = []
    result: dict = {"sizes": size}
    with tempfile.TemporaryDirectory(prefix="kubetune-e2e-") as tmp, local_s3() as endpoint:
        work = Path(tmp)
        data = write_coco_dataset(work / "shapes", train=size["train"], val=size["val"], size=size["image_size"])
        upload_tree(endpoint, data, "datasets", "shapes/")
        runs = Runs(work, endpoint, args.nproc_per_node)
        runs.s3.create_bucket(Bucket="runs")
        try:
            result["bf16_killed_and_resumed"] = killed_and_resumed(runs, size, deadline, problems)
            result["fp16"] = fp16_run(runs, size, deadline, problems)
        except subprocess.TimeoutExpired as exc:
            problems.append(f"a run outlasted the budget: {exc}")
    trajectories = [result.get(part, {}).get("losses", []) for part in ("bf16_killed_and_resumed", "fp16")]
    if not all(math.isfinite(loss) for losses in trajectories for _, loss in losses):
        problems.append("a loss is not finite")
    result["problems"] = problems
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "sizes"}, indent=1)[:6000])
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
