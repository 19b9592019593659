"""FineTuneJob fields → Detectron2 config keys: a pure function, so the mapping is tested where
detectron2 is not installed.

Precedence, lowest first: the model-zoo config, the FineTuneJob's common training fields (only
those the user set; a null keeps the zoo's value), then `model.overrides` as written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubetune_trainer.config import TrainParameters
from kubetune_trainer.config.detectron2_keys import check_overrides
from kubetune_trainer.errors import ConfigError

SCHEDULERS = {"cosine": "WarmupCosineLR", "multistep": "WarmupMultiStepLR", "constant": "WarmupMultiStepLR"}
# Zoo keys the mapping reads; `Detectron2Plan` needs them from the merged zoo config.
ZOO_KEYS = ("SOLVER.BASE_LR", "SOLVER.IMS_PER_BATCH", "SOLVER.WARMUP_ITERS", "SOLVER.STEPS")


@dataclass(frozen=True)
class DatasetFacts:
    """What the mapping needs to know about the staged data."""

    train_images: int
    num_classes: int
    has_rle: bool
    has_validation: bool


@dataclass(frozen=True)
class Detectron2Plan:
    settings: dict[str, Any]
    """Flat config keys in merge order (later wins), ready for CfgNode.merge_from_list."""
    max_iter: int
    total_batch: int
    optimizer: str
    """sgd (Detectron2's own build_optimizer) or adamw."""

    def merge_list(self) -> list[Any]:
        return [item for key, value in self.settings.items() for item in (key, value)]


def plan(
    params: TrainParameters, zoo: Mapping[str, Any], data: DatasetFacts, world_size: int, weights: str
) -> Detectron2Plan:
    """The config keys for this job; `zoo` holds ZOO_KEYS as the merged zoo config has them."""
    training, opt, sched = params.training, params.training.optimizer, params.training.schedule
    try:
        overrides = check_overrides(params.model.overrides)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    # An overridden batch or length is what the derived values (iterations per epoch, scaled lr,
    # warmup cap, checkpoint period) must follow.
    total_batch = int(overrides.get("SOLVER.IMS_PER_BATCH", training.batch_size * world_size))
    if total_batch % world_size:
        raise ConfigError(
            f"model.overrides SOLVER.IMS_PER_BATCH={total_batch} is not divisible by the "
            f"{world_size} processes of this job"
        )
    epochs_iter = math.ceil((training.epochs or 0) * data.train_images / total_batch)
    max_iter = int(overrides.get("SOLVER.MAX_ITER", training.max_steps or epochs_iter))
    base_lr = opt.lr if opt.lr is not None else float(zoo["SOLVER.BASE_LR"])
    s: dict[str, Any] = {
        "MODEL.WEIGHTS": weights,
        "MODEL.ROI_HEADS.NUM_CLASSES": data.num_classes,
        "MODEL.RETINANET.NUM_CLASSES": data.num_classes,
        "SOLVER.IMS_PER_BATCH": total_batch,
        "SOLVER.MAX_ITER": max_iter,
        # The zoo's BASE_LR was set for its IMS_PER_BATCH: scaled to this batch unless lrScaling says
        # otherwise; an lr the spec sets is taken as written.
        "SOLVER.BASE_LR": opt.scaled_lr(
            base_lr, total_batch, int(zoo["SOLVER.IMS_PER_BATCH"]), default="linear" if opt.lr is None else "none"
        ),
        "SOLVER.MOMENTUM": opt.momentum,
        "SOLVER.WARMUP_FACTOR": sched.warmup_factor,
        "SOLVER.WARMUP_ITERS": sched.warmup_steps
        if sched.warmup_steps is not None
        else min(int(zoo["SOLVER.WARMUP_ITERS"]), max_iter // 10),
        "SOLVER.AMP.ENABLED": training.precision == "fp16",
        "SOLVER.CHECKPOINT_PERIOD": params.output.checkpoint_every or max_iter,
        "TEST.EVAL_PERIOD": (training.eval_every or 0) if data.has_validation else 0,
        "DATALOADER.NUM_WORKERS": params.data.num_workers,
        "SEED": training.seed,
    }
    if opt.weight_decay is not None:
        s["SOLVER.WEIGHT_DECAY"] = opt.weight_decay
    if sched.type is None:  # the zoo's schedule, without milestones this short run never reaches
        s["SOLVER.STEPS"] = [step for step in zoo["SOLVER.STEPS"] if step < max_iter]
    else:
        s["SOLVER.LR_SCHEDULER_NAME"] = SCHEDULERS[sched.type]
        s["SOLVER.STEPS"] = list(sched.milestones) if sched.type == "multistep" else []
        s["SOLVER.GAMMA"] = sched.gamma
        s["SOLVER.BASE_LR_END"] = s["SOLVER.BASE_LR"] * sched.min_lr_ratio
    if training.grad_clip is not None:
        s["SOLVER.CLIP_GRADIENTS.ENABLED"] = training.grad_clip > 0
        if training.grad_clip > 0:
            s["SOLVER.CLIP_GRADIENTS.CLIP_TYPE"] = "full_model"
            s["SOLVER.CLIP_GRADIENTS.CLIP_VALUE"] = training.grad_clip
    if data.has_rle:  # RLE masks (COCO RLE, VOC PNGs) cannot be polygons
        s["INPUT.MASK_FORMAT"] = "bitmask"
    s.update(overrides)
    return Detectron2Plan(s, max_iter, total_batch, opt.name or "sgd")
