"""Validation: mIoU, Dice and F1 over every object of the split, summed across ranks.

Per object the kept mask is what a user of the model gets: the candidate with the highest
predicted IoU, or the candidates' mean with multimaskReduction mean. miou and dice are means
over objects; f1 is pixel-level over the whole split (2·TP / (2·TP + FP + FN)), so large objects
weigh more in it than in dice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from kubetune_trainer.promptable.data import Batch
from kubetune_trainer.promptable.losses import compute_loss, kept_logits
from kubetune_trainer.training import distributed
from kubetune_trainer.training.distributed import DistContext


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    ctx: DistContext,
    precision: str,
    multimask: bool,
    loss: str,
    reduction: str = "min-loss",
) -> dict[str, float]:
    was_training = model.training
    model.eval()
    # iou_sum, dice_sum, objects, tp, fp, fn, loss_sum, batches
    acc = torch.zeros(8, dtype=torch.float64, device=ctx.device)
    for batch in loader:
        batch: Batch = batch.to(ctx.device)
        with distributed.autocast(precision, ctx.device):
            preds = model(batch, multimask)
        acc[6] += compute_loss(preds, batch.masks, loss, reduction).total.double()
        acc[7] += 1
        logits = kept_logits(preds, reduction)
        size = batch.masks.shape[-2:]
        pred = F.interpolate(logits[:, None], size=size, mode="bilinear", align_corners=False)[:, 0] > 0
        tgt = batch.masks
        tp = (pred & tgt).flatten(1).sum(1).double()
        fp = (pred & ~tgt).flatten(1).sum(1).double()
        fn = (~pred & tgt).flatten(1).sum(1).double()
        acc[0] += (tp / (tp + fp + fn).clamp(min=1)).sum()
        acc[1] += (2 * tp / (2 * tp + fp + fn).clamp(min=1)).sum()
        acc[2] += len(tp)
        acc[3] += tp.sum()
        acc[4] += fp.sum()
        acc[5] += fn.sum()
    distributed.all_reduce(acc)
    model.train(was_training)
    objects = max(acc[2].item(), 1.0)
    return {
        "miou": acc[0].item() / objects,
        "dice": acc[1].item() / objects,
        "f1": 2 * acc[3].item() / max(2 * acc[3].item() + acc[4].item() + acc[5].item(), 1.0),
        "loss": acc[6].item() / max(acc[7].item(), 1.0),
        "objects": acc[2].item(),
    }
