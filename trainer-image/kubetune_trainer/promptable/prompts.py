"""Prompts a user would give, generated from ground-truth masks: boxes and clicks.

Coordinates are (x, y) in model-input pixels. Labels follow SAM's convention: 1 positive click,
0 negative click, 2/3 the top-left/bottom-right box corners.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kubetune_trainer.config import PromptSpec


def _erode(masks: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary erosion of [K,H,W] masks with a square of side 2·radius+1 (a min-filter)."""
    if radius == 0:
        return masks
    inverted = (~masks).float().unsqueeze(1)
    grown = F.max_pool2d(inverted, 2 * radius + 1, stride=1, padding=radius)
    return grown.squeeze(1) < 0.5


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Tight [K,4] (x0, y0, x1, y1) boxes around non-empty [K,H,W] masks."""
    ys = masks.any(dim=2)
    xs = masks.any(dim=1)
    idx_y = torch.arange(masks.shape[1]).expand_as(ys)
    idx_x = torch.arange(masks.shape[2]).expand_as(xs)
    big = masks.shape[1] + masks.shape[2]
    x0 = torch.where(xs, idx_x, big).min(dim=1).values
    x1 = torch.where(xs, idx_x, -1).max(dim=1).values + 1
    y0 = torch.where(ys, idx_y, big).min(dim=1).values
    y1 = torch.where(ys, idx_y, -1).max(dim=1).values + 1
    return torch.stack([x0, y0, x1, y1], dim=1).float()


def _sample_points(region: torch.Tensor, fallback: torch.Tensor, count: int, rng: np.random.Generator) -> torch.Tensor:
    """`count` pixel centres drawn from `region` (or `fallback` when it is empty), with replacement."""
    pool = region if region.any() else fallback
    yx = pool.nonzero()
    if len(yx) == 0:  # fully covered image: no background anywhere
        yx = torch.zeros((1, 2), dtype=torch.long)
    pick = torch.from_numpy(rng.integers(0, len(yx), size=count))
    return yx[pick].flip(1).float() + 0.5


def make_prompts(
    masks: torch.Tensor, spec: PromptSpec, rng: np.random.Generator, perturb: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt coordinates [K,P,2] and labels [K,P] for K masks; P is the same for every mask."""
    size_y, size_x = masks.shape[1:]
    coords: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    if spec.type in ("box", "box+points"):
        boxes = boxes_from_masks(masks)
        if perturb and spec.perturbation:
            boxes = (
                boxes
                + torch.from_numpy(rng.integers(-spec.perturbation, spec.perturbation + 1, size=boxes.shape)).float()
            )
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, size_x)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, size_y)
        coords.append(boxes.view(-1, 2, 2))
        labels.append(torch.tensor([[2, 3]]).expand(len(masks), 2))
    if spec.type in ("points", "box+points"):
        inside = _erode(masks, spec.erosion)
        outside = _erode(~masks, spec.erosion)
        for count, label, region, fallback in (
            (spec.positive_points, 1, inside, masks),
            (spec.negative_points, 0, outside, ~masks),
        ):
            if count:
                coords.append(
                    torch.stack([_sample_points(r, f, count, rng) for r, f in zip(region, fallback, strict=True)])
                )
                labels.append(torch.full((len(masks), count), label))
    return torch.cat(coords, dim=1), torch.cat(labels, dim=1).int()
