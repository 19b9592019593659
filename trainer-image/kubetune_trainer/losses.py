"""Mask losses, with SAM2's multimask rule: only the candidate mask that fits best is trained.

Presets:
  sam2   — sigmoid focal (α 0.25, γ 2) ×20 + dice ×1 + IoU-prediction L1 ×1 (all candidates)
           + object-score BCE ×1: the weighting of SAM2's own training configs.
  simple — BCE + 0.05·|predicted IoU − IoU|: the widely copied minimal SAM2 fine-tuning recipe.
Losses are computed at the decoder's output resolution against area-resized targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from .segmenter import Predictions


@dataclass
class LossTerms:
    total: torch.Tensor
    parts: dict[str, torch.Tensor]


def resize_targets(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[N,S,S] bool masks -> [N,h,w] float in {0,1} at the prediction's size (area > 0.5)."""
    resized = F.interpolate(masks[:, None].float(), size=size, mode="area")[:, 0]
    return (resized > 0.5).float()


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 − soft Dice per [..., h, w] pair."""
    probs = logits.sigmoid().flatten(-2)
    targets = targets.flatten(-2)
    inter = (probs * targets).sum(-1)
    return 1 - (2 * inter + eps) / (probs.sum(-1) + targets.sum(-1) + eps)


def mask_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of the binarised predictions with the targets, per [..., h, w] pair (no gradient)."""
    pred = (logits.detach() > 0).flatten(-2)
    tgt = targets.flatten(-2) > 0.5
    inter = (pred & tgt).sum(-1).float()
    union = (pred | tgt).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def compute_loss(preds: Predictions, masks: torch.Tensor, preset: str) -> LossTerms:
    logits = preds.mask_logits.float()
    targets = resize_targets(masks, logits.shape[-2:])[:, None].expand_as(logits)
    focal = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="none").flatten(-2).mean(-1)
    dice = dice_loss(logits, targets)
    iou = mask_iou(logits, targets)
    # SAM2's multimask rule: back-propagate only the candidate with the lowest focal×20 + dice.
    best = (20 * focal + dice).argmin(dim=1)
    rows = torch.arange(len(best), device=best.device)
    iou_pred = preds.iou_pred.float()
    if preset == "sam2":
        parts = {
            "loss_focal": 20 * focal[rows, best].mean(),
            "loss_dice": dice[rows, best].mean(),
            "loss_iou": (iou_pred - iou).abs().mean(),
        }
        if preds.object_logits is not None:
            obj = preds.object_logits.float()
            parts["loss_object"] = F.binary_cross_entropy_with_logits(obj, torch.ones_like(obj))
    else:
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(-2).mean(-1)
        parts = {
            "loss_bce": bce[rows, best].mean(),
            "loss_iou": 0.05 * (iou_pred[rows, best] - iou[rows, best]).abs().mean(),
        }
    return LossTerms(sum(parts.values()), parts)
