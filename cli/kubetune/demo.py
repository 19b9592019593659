"""`kubetune demo`: a complete small fine-tune with nothing to set up.

Makes a synthetic COCO dataset, serves it from an S3-compatible server on loopback (moto), runs the
embedded spec through the same torchrun launcher as `kubetune run --local`, then copies the
checkpoint, report (report.html with its before/after gallery) and metrics out of S3 and draws the
loss curve.

With Meta's weights (`--checkpoint`) the spec is the usual fine-tune: frozen image encoder, SAM2's
own loss. Without them the model starts from random weights, and that recipe learns nothing a
user could see in a CPU minute: the focal-heavy loss drives a random model towards empty masks and
four images a step are too few prompts for a random decoder. So the demo then trains what can
learn from scratch: the mask decoder and prompt encoder (to fill the prompted box with the object)
at 64 px, on 16 images a step with Dice + cross-entropy, over 200 varied images, for 300 steps.
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

# Without base weights: what a random SAM2 can learn on two CPU cores in a couple of minutes (see
# the module docstring). Measured on 2 cores (2026-11-28): validation mIoU 0.063 -> 0.545 in 300
# steps, the whole demo in 146 s.
FROM_SCRATCH = {
    "model": {"imageSize": 64},
    "data": {"prompts": {"perturbation": 2}},  # 4 px of box jitter at 128 px, the same share at 64
    "training": {"batchSize": 16, "loss": "dicece"},
}
FROM_SCRATCH_STEPS, FINE_TUNE_STEPS = 300, 120
FROM_SCRATCH_TRAIN_IMAGES, FINE_TUNE_TRAIN_IMAGES = 200, 24


def _merge(base: dict, changes: dict) -> None:
    for key, value in changes.items():
        if isinstance(value, dict):
            _merge(base.setdefault(key, {}), value)
        else:
            base[key] = value


def demo_job(endpoint: str, steps: int | None, checkpoint: str | None, gpu: bool) -> FineTuneJob:
    raw = yaml.safe_load(resources.files(__package__).joinpath("demo.yaml").read_text())
    spec = raw["spec"]
    if checkpoint:
        spec["model"]["checkpoint"] = checkpoint
    else:
        _merge(spec, FROM_SCRATCH)
    steps = steps or (FINE_TUNE_STEPS if checkpoint else FROM_SCRATCH_STEPS)
    spec["storage"]["endpoint"] = endpoint
    spec["training"]["maxSteps"] = steps
    spec["training"]["evalEvery"] = max(steps // 2, 1)
    spec["output"]["checkpointEvery"] = max(steps // 2, 1)
    if gpu:
        spec["training"]["precision"] = "bf16"
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


def run_demo(out: Path, steps: int | None = None, nproc: int | None = None, checkpoint: Path | None = None) -> int:
    import torch

    started = time.time()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kubetune-demo-") as tmp, local_s3() as endpoint:
        print(f"[demo] S3-compatible server at {endpoint}")
        if checkpoint is None:
            print(
                "[demo] no base weights can be downloaded here, so SAM2 starts from RANDOM weights. The usual\n"
                "       fine-tune (frozen encoder, SAM2's focal-heavy loss, 4 images a step) would learn nothing\n"
                "       visible from there: the loss drives a random model to empty masks. So the demo trains what\n"
                "       can learn from scratch on a CPU: the mask decoder and prompt encoder at 64 px, 16 images a\n"
                "       step, Dice + cross-entropy loss, on 200 images. Pass --checkpoint sam2.1_hiera_tiny.pt\n"
                "       (Meta's release) for the usual fine-tune."
            )
        images = FINE_TUNE_TRAIN_IMAGES if checkpoint else FROM_SCRATCH_TRAIN_IMAGES
        dataset = write_coco_dataset(Path(tmp) / "shapes", train=images)
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
    for name, e in (("before", first), ("after: ", last)):
        print(
            f"[demo] validation {name} mIoU {e['miou']:.3f}  Dice {e['dice']:.3f}  F1 {e['f1']:.3f}  "
            f"empty masks {e['empty_share']:.0%}  (at each image's original size)"
        )
    print(f"[demo] mIoU change: {last['miou'] - first['miou']:+.3f}")
    print(f"[demo] final model (loads with sam2.build_sam.build_sam2): {out / 'final' / 'model.pt'}")
    print(f"[demo] checkpoints: {out / 'checkpoints'}")
    print(f"[demo] metrics: {out / 'metrics.jsonl'}  report: {out / 'report.json'}")
    print(f"[demo] loss curve: {out / 'loss_curve.png'}")
    print(f"[demo] report (before/after table, curves, pictures): {(out / 'report' / 'report.html').as_uri()}")
    print(f"[demo] done in {time.time() - started:.0f} s")
    return 0
