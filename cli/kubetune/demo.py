"""`kubetune demo`: a complete small fine-tune with nothing to set up.

Makes a synthetic COCO dataset, serves it from an S3-compatible server on loopback (moto), runs the
embedded spec through the same torchrun launcher as `kubetune run --local`, then copies the
checkpoint, report and metrics out of S3 and draws the loss curve.
"""

from __future__ import annotations

import json
import tempfile
import time
from importlib import resources
from pathlib import Path

import yaml
from kubetune_operator.specs import FineTuneJob
from kubetune_trainer.config import environment

from .local import default_nproc, run_local
from .s3server import client, download_prefix, local_s3, upload_tree
from .synthetic import write_coco_dataset


def demo_job(endpoint: str, steps: int, checkpoint: str | None, gpu: bool) -> FineTuneJob:
    raw = yaml.safe_load(resources.files(__package__).joinpath("demo.yaml").read_text())
    spec = raw["spec"]
    spec["storage"]["endpoint"] = endpoint
    spec["training"]["maxSteps"] = steps
    spec["training"]["evalEvery"] = max(steps // 2, 1)
    spec["output"]["checkpointEvery"] = max(steps // 2, 1)
    if gpu:
        spec["training"]["precision"] = "bf16"
    if checkpoint:
        spec["model"]["checkpoint"] = checkpoint
    return FineTuneJob.model_validate(raw)


def plot_loss(metrics: Path, png: Path) -> None:
    """Training loss per step, validation loss and mIoU at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval/loss"], r["eval/miou"]) for r in rows if "eval/loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        steps, losses, mious = zip(*evals, strict=True)
        ax.plot(steps, losses, "o-", label="validation loss")
        right = ax.twinx()
        right.plot(steps, mious, "s--", color="tab:green", label="validation mIoU")
        right.set_ylabel("mIoU")
        right.set_ylim(0, 1)
        right.legend(loc="center right")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("kubetune demo: SAM2 tiny on synthetic shapes")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def run_demo(out: Path, steps: int = 120, nproc: int | None = None, checkpoint: Path | None = None) -> int:
    import torch

    started = time.time()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kubetune-demo-") as tmp, local_s3() as endpoint:
        print(f"[demo] S3-compatible server at {endpoint}")
        dataset = write_coco_dataset(Path(tmp) / "shapes")
        count = upload_tree(endpoint, dataset, "datasets", "shapes/")
        print(f"[demo] uploaded a synthetic COCO dataset ({count} files) to s3://datasets/shapes/")
        s3 = client(endpoint)
        s3.create_bucket(Bucket="runs")
        weights = None
        if checkpoint:  # real base weights travel the same way as in a cluster: through S3
            s3.create_bucket(Bucket="models")
            s3.upload_file(str(checkpoint), "models", checkpoint.name)
            weights = f"s3://models/{checkpoint.name}"
        job = demo_job(endpoint, steps, weights, gpu=torch.cuda.is_available())
        env = {environment.CACHE_DIR: str(Path(tmp) / "cache"), environment.METRICS_PORT: "0"}
        code = run_local(job.train_config(default_namespace="local"), nproc or default_nproc(), env)
        if code != 0:
            print(f"[demo] training failed with exit code {code}")
            return code
        download_prefix(endpoint, "runs", "demo/", out)
    report = json.loads((out / "report.json").read_text())
    plot_loss(out / "metrics.jsonl", out / "loss_curve.png")
    evals = report["evaluations"]
    first, last = evals[0], evals[-1]
    print(f"[demo] validation before: mIoU {first['miou']:.3f}  dice {first['dice']:.3f}  loss {first['loss']:.4f}")
    print(f"[demo] validation after:  mIoU {last['miou']:.3f}  dice {last['dice']:.3f}  loss {last['loss']:.4f}")
    if checkpoint is None:
        print(
            "[demo] note: no base weights can be downloaded here, so the demo starts SAM2 from random weights;\n"
            "       the training loss falls, but held-out mIoU moves little in a CPU-sized run. Pass\n"
            "       --checkpoint sam2.1_hiera_tiny.pt (Meta's release) for a real fine-tune."
        )
    print(f"[demo] final model (loads with sam2.build_sam.build_sam2): {out / 'final' / 'model.pt'}")
    print(f"[demo] checkpoints: {out / 'checkpoints'}")
    print(f"[demo] metrics: {out / 'metrics.jsonl'}  report: {out / 'report.json'}")
    print(f"[demo] loss curve: {out / 'loss_curve.png'}")
    print(f"[demo] done in {time.time() - started:.0f} s")
    return 0
