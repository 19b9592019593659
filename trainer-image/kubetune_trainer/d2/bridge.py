"""Detectron2's EventStorage scalars → kubetune's `Snapshot`, so a Detectron2 job exports the same
Prometheus names (and metrics.jsonl rows) as a SAM2 job, and COCOEvaluator's results → kubetune's
metric names. Pure: tested without detectron2.

Detectron2 puts, per iteration: total_loss and each loss_* (averaged over ranks, main rank only),
lr (LRScheduler hook), time (IterationTimer, after its warm-up), data_time / rank_data_time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from kubetune_trainer.metrics.events import Snapshot

LOSS_COMPONENTS = ("loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc")


@dataclass(frozen=True)
class RunShape:
    total_batch: int
    world_size: int
    train_images: int
    max_iter: int


def bridge(latest: Mapping[str, tuple[float, int]], iteration: int, shape: RunShape) -> Snapshot:
    """The snapshot after Detectron2 iteration `iteration` (0-based): step = iteration + 1.

    Only values written at this iteration count; evaluation results (eval/*, best/*, baseline/*) and the
    checkpoint step are kept whenever they were written, like the SAM2 loop's storage.
    """
    step = iteration + 1
    fresh = {k: v for k, (v, it) in latest.items() if it == iteration}
    scalars: dict[str, float] = {
        "step": step,
        "total_steps": shape.max_iter,
        "epoch": step * shape.total_batch // shape.train_images,
    }
    observations: dict[str, list[float]] = {}
    if "total_loss" in fresh:
        scalars["loss"] = fresh["total_loss"]
    for key, value in fresh.items():
        if key.startswith("loss_"):
            scalars[key] = value
    if "lr" in fresh:
        scalars["lr"] = fresh["lr"]
    if "time" in fresh and fresh["time"] > 0:
        observations["step_seconds"] = [fresh["time"]]
        scalars["images_per_second"] = shape.total_batch / fresh["time"]
    if "rank_data_time" in fresh:
        observations["data_wait_seconds"] = [fresh["rank_data_time"]]
    for key, (value, _) in latest.items():
        if key.startswith(("eval/", "best/", "baseline/", "gpu_memory/")) or key in (
            "checkpoint/last_step",
            "amp/grad_scale",
        ):
            scalars[key] = value
    increments = {"images": float(shape.total_batch // shape.world_size)}
    return Snapshot(step, scalars, observations, increments)


SIZE_KEYS = {"APs": "small", "APm": "medium", "APl": "large"}


def coco_results(results: dict[str, dict[str, float]], tasks: tuple[str, ...]) -> dict[str, float]:
    """COCOEvaluator's percentages as fractions under kubetune's names: `segm_ap`, `bbox_ap50`…,
    per COCO object size `size/small/segm_ap`…, and per class `class/<name>/segm_ap` (its "AP-<name>")."""
    out = {}
    for task in tasks:
        values = results.get(task, {})
        for name in ("AP", "AP50", "AP75"):
            out[f"{task}_{name.lower()}"] = values.get(name, math.nan) / 100.0
        for name, size in SIZE_KEYS.items():
            if name in values:
                out[f"size/{size}/{task}_ap"] = values[name] / 100.0
        per_class = {name[3:]: value for name, value in values.items() if name.startswith("AP-")}
        if len(per_class) > 1:  # no table of one row
            for name, value in per_class.items():
                out[f"class/{name.replace('/', '_')}/{task}_ap"] = value / 100.0
    return out
