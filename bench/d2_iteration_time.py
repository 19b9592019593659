"""Detectron2 iteration time: a kubetune detectron2 job vs Detectron2's own trainer, side by side in
one process, on the same model, batch and synthetic data.

The baseline is what Detectron2's tools/train_net.py does: the zoo config, a registered COCO
dataset, `build_detection_train_loader`, `AMPTrainer` (fp16, GPU) or `SimpleTrainer`, with its
IterationTimer. The kubetune side is the whole job (`recipe.run`): file:// staging, the
resumable sampler, the metric bridge to Prometheus and metrics.jsonl, the checkpoint at the end.
Both report the median seconds per iteration after a warm-up; the ratio is kubetune / Detectron2
images per second (≥ 1.0 means kubetune is not slower).

  python bench/d2_iteration_time.py                                    # CPU smoke (tiny, minutes)
  python bench/d2_iteration_time.py --size 800 --batch 8 --iters 60 \\
      --variant COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml --precision fp16   # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))


def overrides(size: int) -> dict:
    return {
        "INPUT.MIN_SIZE_TRAIN": [size],
        "INPUT.MAX_SIZE_TRAIN": int(size * 1333 / 800),
        "INPUT.MIN_SIZE_TEST": size,
        "INPUT.MAX_SIZE_TEST": int(size * 1333 / 800),
    }


def baseline(args, root: Path) -> list[float]:
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog, build_detection_train_loader
    from detectron2.data.datasets import register_coco_instances
    from detectron2.engine import AMPTrainer, SimpleTrainer, hooks
    from detectron2.modeling import build_model
    from detectron2.solver import build_lr_scheduler, build_optimizer

    if "bench_train" not in DatasetCatalog.list():
        register_coco_instances("bench_train", {}, str(root / "train" / "annotations.json"), str(root / "train"))
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(args.variant))
    cfg.merge_from_list([x for k, v in overrides(args.size).items() for x in (k, v)])
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("bench_train",), ()
    cfg.MODEL.WEIGHTS, cfg.MODEL.ROI_HEADS.NUM_CLASSES = "", 1
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    cfg.INPUT.MASK_FORMAT = "bitmask"
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.MAX_ITER, cfg.SOLVER.BASE_LR = args.batch, args.iters, args.lr
    cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS = (), 0
    cfg.DATALOADER.NUM_WORKERS = args.workers
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    loader = build_detection_train_loader(cfg)
    if args.precision == "fp16" and torch.cuda.is_available():
        trainer = AMPTrainer(model, loader, optimizer)
    else:
        trainer = SimpleTrainer(model, loader, optimizer)
    trainer.register_hooks([hooks.IterationTimer(), hooks.LRScheduler(optimizer, build_lr_scheduler(cfg, optimizer))])
    trainer.train(0, args.iters)
    return [value for value, _ in trainer.storage.history("time").values()]


def kubetune(args, root: Path, out: Path, endpoint: str | None) -> tuple[list[float], float]:
    """The whole job; returns seconds per iteration and the mean data wait over the mean step."""
    from kubetune_trainer.config import TrainConfig
    from kubetune_trainer.d2 import recipe
    from kubetune_trainer.metrics.prometheus import PrometheusWriter
    from kubetune_trainer.training import distributed

    config = TrainConfig.model_validate(
        {
            "model": {
                "family": "detectron2",
                "variant": args.variant,
                "checkpoint": "none",  # random init, as the baseline's MODEL.WEIGHTS = "" (and offline)
                "overrides": {**overrides(args.size), "SOLVER.WARMUP_ITERS": 0, "SOLVER.STEPS": []},
            },
            "data": {
                "source": "s3://bench/data/" if endpoint else f"file://{root}/",
                "format": "coco",
                "train": "train/annotations.json",
                "numWorkers": args.workers,
            },
            "training": {
                "maxSteps": args.iters,
                "batchSize": args.batch,
                "precision": args.precision,
                "optimizer": {"lr": args.lr},
            },
            "storage": {"endpoint": endpoint, "region": "us-east-1"},
            "output": {"uri": f"file://{out}/"},
        }
    )
    metrics = PrometheusWriter("bench", "bench", 0, "detectron2")
    recipe.run(config, distributed.init(), metrics)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    labels = metrics.labels

    def mean(name: str) -> float:
        value = metrics.registry.get_sample_value
        return value(f"{name}_sum", labels) / max(value(f"{name}_count", labels), 1.0)

    wait = mean("kubetune_data_wait_seconds") / mean("kubetune_train_step_seconds")
    return [args.batch / r["images_per_second"] for r in rows if r.get("images_per_second")], wait


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="Misc/scratch_mask_rcnn_R_50_FPN_3x_gn.yaml")
    parser.add_argument("--size", type=int, default=128, help="shorter side of the input")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4, help="iterations left out of the median")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--lr", type=float, default=0.0002)
    parser.add_argument("--s3", action="store_true", help="kubetune reads the data from a moto S3 server (staged)")
    parser.add_argument("--out", type=Path, help="write the result JSON here")
    args = parser.parse_args()
    from kubetune.synthetic import write_coco_dataset

    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        root = write_coco_dataset(Path(tmp) / "data", train=args.images, val=1, size=args.size, seed=0)
        theirs = baseline(args, root)
        with contextlib.ExitStack() as stack:
            endpoint = None
            if args.s3:  # the data comes through kubetune's S3 staging, as in a cluster
                from kubetune.s3server import local_s3, upload_tree

                endpoint = stack.enter_context(local_s3())
                upload_tree(endpoint, root, "bench", "data/")
                os.environ["KUBETUNE_CACHE_DIR"] = str(Path(tmp) / "cache")
            ours, wait = kubetune(args, root, Path(tmp) / "out", endpoint)
    skip = max(0, args.warmup - 3)  # Detectron2's IterationTimer already leaves out 3 iterations
    d2_s, kt_s = statistics.median(theirs[skip:]), statistics.median(ours[args.warmup :])
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "variant": args.variant,
        "size": args.size,
        "batch": args.batch,
        "precision": args.precision,
        "iterations": args.iters,
        "detectron2_s_per_iter": d2_s,
        "kubetune_s_per_iter": kt_s,
        "detectron2_images_per_s": args.batch / d2_s,
        "kubetune_images_per_s": args.batch / kt_s,
        "ratio_kubetune_over_detectron2": d2_s / kt_s,
        "data_from_s3": args.s3,
        "kubetune_data_wait_fraction": wait,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
