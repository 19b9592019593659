"""Learning-rate schedules: linear warmup, then cosine, multistep or constant (per step)."""

from __future__ import annotations

import math

import torch

from .config import ScheduleSpec


def lr_factor(spec: ScheduleSpec, total_steps: int, step: int) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based)."""
    if step < spec.warmup_steps:
        alpha = step / spec.warmup_steps
        return spec.warmup_factor * (1 - alpha) + alpha
    if spec.type == "cosine":
        span = max(total_steps - spec.warmup_steps, 1)
        progress = min((step - spec.warmup_steps) / span, 1.0)
        return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if spec.type == "multistep":
        return spec.gamma ** sum(step >= m for m in spec.milestones)
    return 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, spec: ScheduleSpec, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(spec, total_steps, step))
