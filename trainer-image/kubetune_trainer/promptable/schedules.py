"""Learning-rate schedules: linear warmup, then cosine, multistep or constant (per step)."""

from __future__ import annotations

import math

import torch

from kubetune_trainer.config import ScheduleSpec


def lr_factor(spec: ScheduleSpec, total_steps: int, step: int) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based); an unset type is cosine."""
    warmup = spec.warmup_steps or 0
    if step < warmup:
        alpha = step / warmup
        return spec.warmup_factor * (1 - alpha) + alpha
    if spec.type in ("cosine", None):
        span = max(total_steps - warmup, 1)
        progress = min((step - warmup) / span, 1.0)
        return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if spec.type == "multistep":
        return spec.gamma ** sum(step >= m for m in spec.milestones)
    return 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, spec: ScheduleSpec, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(spec, total_steps, step))
