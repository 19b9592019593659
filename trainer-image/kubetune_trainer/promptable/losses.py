"""Mask losses on one candidate mask per prompt (see `reduce_candidates`).

Presets:
  sam2   — sigmoid focal (α 0.25, γ 2) ×20 + dice ×1 + IoU-prediction L1 ×1 (all candidates)
           + object-score BCE ×1: the weighting of SAM2's own training configs.
  simple — BCE + 0.05·|predicted IoU − IoU|: the widely copied minimal SAM2 fine-tuning recipe.
  dicece — MONAI's DiceCELoss (sigmoid, squared prediction): the transformers SAM tutorial.
  otx    — focal ×20 + dice + (predicted IoU − IoU)²: OpenVINO Training Extensions' SAM recipe
           (without its double sigmoid before the BCE-with-logits focal term).
Losses are computed at the decoder's output resolution against area-resized targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from kubetune_trainer.promptable.data import resize_targets
from kubetune_trainer.promptable.models.base import Predictions


@dataclass
class LossTerms:
    total: torch.Tensor
    parts: dict[str, torch.Tensor]
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


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


@torch.no_grad()
def mask_health(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Running training metrics of the trained masks, at the mask logits' resolution: the share of
    prompts whose mask is empty once thresholded and the mean probability inside the targets (a
    collapse towards empty masks shows in both first), soft Dice and thresholded IoU (which a
    model collapsing under a falling loss drives apart)."""
    probs = logits.float().sigmoid().flatten(1)
    flat = targets.float().flatten(1)
    inside = (probs * flat).sum(1)
    return {
        "train/empty_share": (~(logits > 0).flatten(1).any(1)).float().mean(),
        "train/target_prob": inside.sum() / flat.sum().clamp(min=1),
        "train/soft_dice_at_logits": (2 * inside / (probs.sum(1) + flat.sum(1)).clamp(min=1e-6)).mean(),
        "train/miou_at_logits": mask_iou(logits, targets).mean(),
    }


# Which prediction heads each preset trains; a head a preset ignores is frozen, so it gets no
# update and DDP never waits for its gradient.
LOSS_HEADS: dict[str, frozenset[str]] = {
    "sam2": frozenset({"iou", "object"}),
    "simple": frozenset({"iou"}),
    "dicece": frozenset(),
    "otx": frozenset({"iou"}),
}


@dataclass
class Candidates:
    """The masks a prompt produced, reduced as model.multimaskReduction says."""

    logits: torch.Tensor  # [N,M,h,w]; M = 1 after mean reduction or without multimask output
    iou_pred: torch.Tensor  # [N,M]
    chosen: torch.Tensor  # [N] index of the candidate that is trained


def reduce_candidates(preds: Predictions, targets: torch.Tensor | None, reduction: str) -> Candidates:
    """min-loss: the candidate with the lowest focal×20 + dice (SAM's training rule; without
    targets, as in evaluation, the highest predicted IoU); best: the highest predicted IoU;
    mean: one mask, the mean of the candidates' logits."""
    logits, iou_pred = preds.mask_logits.float(), preds.iou_pred.float()
    if reduction == "mean":
        logits, iou_pred = logits.mean(1, keepdim=True), iou_pred.mean(1, keepdim=True)
    if logits.shape[1] == 1:
        chosen = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
    elif reduction == "min-loss" and targets is not None:
        t = targets[:, None].expand_as(logits)
        focal = sigmoid_focal_loss(logits, t, alpha=0.25, gamma=2.0, reduction="none").flatten(-2).mean(-1)
        chosen = (20 * focal + dice_loss(logits, t)).detach().argmin(dim=1)
    else:
        chosen = iou_pred.detach().argmax(dim=1)
    return Candidates(logits, iou_pred, chosen)


def kept_logits(preds: Predictions, reduction: str) -> torch.Tensor:
    """[N,h,w] the mask a user of the model gets for each prompt."""
    c = reduce_candidates(preds, None, reduction)
    return c.logits[torch.arange(len(c.chosen), device=c.chosen.device), c.chosen]


def compute_loss(preds: Predictions, masks: torch.Tensor, preset: str, reduction: str = "min-loss") -> LossTerms:
    size = preds.mask_logits.shape[-2:]
    if masks.shape[-1] < size[-1]:
        raise ValueError(f"target masks ({tuple(masks.shape[-2:])}) are coarser than the mask logits ({tuple(size)})")
    targets = resize_targets(masks, size).float()
    c = reduce_candidates(preds, targets, reduction)
    rows = torch.arange(len(c.chosen), device=c.chosen.device)
    logits, iou_pred = c.logits[rows, c.chosen], c.iou_pred[rows, c.chosen]
    if preset == "dicece":
        from monai.losses import DiceCELoss  # imported here: monai takes seconds to import

        value = DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")(logits[:, None], targets[:, None])
        return LossTerms(value, {"loss_dicece": value}, mask_health(logits, targets))
    focal = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="none").flatten(-2).mean(-1)
    dice = dice_loss(logits, targets)
    iou = mask_iou(logits, targets)
    if preset == "sam2":
        all_targets = targets[:, None].expand_as(c.logits)
        parts = {
            "loss_focal": 20 * focal.mean(),
            "loss_dice": dice.mean(),
            "loss_iou": (c.iou_pred - mask_iou(c.logits, all_targets)).abs().mean(),  # every candidate
        }
        if preds.object_logits is not None:
            obj = preds.object_logits.float()
            parts["loss_object"] = F.binary_cross_entropy_with_logits(obj, torch.ones_like(obj))
    elif preset == "otx":
        parts = {
            "loss_focal": 20 * focal.mean(),
            "loss_dice": dice.mean(),
            "loss_iou": F.mse_loss(iou_pred, iou),
        }
    elif preset == "simple":
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(-2).mean(-1)
        parts = {"loss_bce": bce.mean(), "loss_iou": 0.05 * (iou_pred - iou).abs().mean()}
    else:
        raise ValueError(f"unknown loss preset {preset!r}")
    return LossTerms(sum(parts.values()), parts, mask_health(logits, targets))
