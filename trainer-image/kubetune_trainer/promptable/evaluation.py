"""Validation of a promptable segmenter, scored as its users see it: at each image's own size.

Per prompt the kept mask is what a user of the model gets: the candidate with the highest
predicted IoU, or the candidates' mean with multimaskReduction mean. Its logits are brought back
the way SAM's and SAM2's post-processing does (upsampled to the input size, the padding cropped,
resized to the image's original height and width) and compared with the original-size ground
truth. `score_objects` turns a batch into one `ObjectScore` per prompt; `summarize` (pure) makes
the metrics: mIoU and Dice are means over objects, F1 is pixel-level over the whole split
(2·TP / (2·TP + FP + FN)), so large objects weigh more in it than in Dice. The same are given per
class and per COCO object size (small < 32², medium < 96², large) of the target's area.

Two numbers watch for collapse (the model learning to predict nothing): `empty_share`, the share
of prompts whose kept mask is empty, and `target_prob`, the mean predicted probability inside the
target. `soft_dice` (on probabilities) beside the thresholded `dice` shows a model that gets
closer in loss while its masks, once thresholded, vanish.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import astuple, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from kubetune_trainer.metrics.report import COLLAPSE_SHARE
from kubetune_trainer.promptable.data import Batch
from kubetune_trainer.promptable.losses import compute_loss, kept_logits
from kubetune_trainer.training import distributed
from kubetune_trainer.training.distributed import DistContext

# COCO's object sizes, by area in original pixels.
SIZES = (("small", 0, 32**2), ("medium", 32**2, 96**2), ("large", 96**2, float("inf")))


@dataclass(frozen=True)
class ObjectScore:
    """One prompt's kept mask against its target, at the image's original size."""

    cls: str
    area: int  # target pixels
    tp: int
    fp: int
    fn: int
    prob_inside: float  # sum of predicted probabilities inside the target
    prob_sum: float  # over the whole image

    @property
    def iou(self) -> float:
        return self.tp / max(self.tp + self.fp + self.fn, 1)

    @property
    def dice(self) -> float:
        return 2 * self.tp / max(2 * self.tp + self.fp + self.fn, 1)

    @property
    def soft_dice(self) -> float:
        return 2 * self.prob_inside / max(self.prob_sum + self.area, 1e-9)

    @property
    def empty(self) -> bool:
        return self.tp + self.fp == 0


def size_of(area: int) -> str:
    return next(name for name, low, high in SIZES if low <= area < high)


def _means(scores: list[ObjectScore]) -> dict[str, float]:
    n = max(len(scores), 1)
    tp, fp, fn = (sum(getattr(s, k) for s in scores) for k in ("tp", "fp", "fn"))
    return {
        "miou": sum(s.iou for s in scores) / n,
        "dice": sum(s.dice for s in scores) / n,
        "f1": 2 * tp / max(2 * tp + fp + fn, 1),
        "objects": float(len(scores)),
    }


def summarize(scores: list[ObjectScore]) -> dict[str, float]:
    """The split's metrics from every prompt's score; per class (`class/<name>/miou`, ...) only
    when there is more than one class, per size (`size/small/miou`, ...) for the sizes present."""
    n = max(len(scores), 1)
    result = _means(scores)
    result["soft_dice"] = sum(s.soft_dice for s in scores) / n
    result["empty_share"] = sum(s.empty for s in scores) / n
    result["target_prob"] = sum(s.prob_inside for s in scores) / max(sum(s.area for s in scores), 1)
    by_size: dict[str, list[ObjectScore]] = defaultdict(list)
    by_class: dict[str, list[ObjectScore]] = defaultdict(list)
    for s in scores:
        by_size[size_of(s.area)].append(s)
        by_class[s.cls.replace("/", "_")].append(s)  # a slash in a class name must not nest the key
    for name, _, _ in SIZES:
        if by_size[name]:
            result.update({f"size/{name}/{k}": v for k, v in _means(by_size[name]).items()})
    if len(by_class) > 1:
        for name in sorted(by_class):
            result.update({f"class/{name}/{k}": v for k, v in _means(by_class[name]).items()})
    return result


def original_size_logits(
    logits: torch.Tensor, side: int, extent: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """[K,h,w] mask logits of one image -> [K,H,W] at its original size: upsampled to the input
    side, cropped to the resized image (the rest is padding), resized to (H, W), as
    SAM2Transforms.postprocess_masks and SamProcessor.post_process_masks do."""
    x = F.interpolate(logits[:, None].float(), size=(side, side), mode="bilinear", align_corners=False)
    x = x[..., : extent[0], : extent[1]]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)[:, 0]


CHUNK_PIXELS = 2**26  # original-size pixels scored at once (objects × H × W): 256 MB of float logits


def score_objects(logits: torch.Tensor, batch: Batch, side: int) -> list[ObjectScore]:
    """One score per prompt of `batch` (which must carry its originals: an evaluation batch).
    The objects of a large image are scored a few at a time, so memory stays bounded."""
    assert batch.originals is not None and batch.classes is not None and batch.shapes is not None
    scores = []
    for i, targets in enumerate(batch.originals):
        rows = (batch.image_index == i).nonzero()[:, 0].tolist()
        extent = tuple(batch.shapes[i].tolist())
        size = tuple(targets.shape[-2:])
        step = max(1, CHUNK_PIXELS // (size[0] * size[1]))
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            full = original_size_logits(logits[chunk], side, extent, size)
            tgt = targets[start : start + step].to(full.device)
            pred, prob = full > 0, full.sigmoid()
            tp = (pred & tgt).flatten(1).sum(1)
            fp = (pred & ~tgt).flatten(1).sum(1)
            fn = (~pred & tgt).flatten(1).sum(1)
            inside = (prob * tgt).flatten(1).sum(1)
            total = prob.flatten(1).sum(1)
            stats = torch.stack([tp.double(), fp.double(), fn.double(), inside.double(), total.double()], 1)
            for row, (t, p, n, ins, tot) in zip(chunk, stats.tolist(), strict=True):
                scores.append(ObjectScore(batch.classes[row], int(t + n), int(t), int(p), int(n), ins, tot))
    return scores


def gather_scores(scores: list[ObjectScore]) -> list[ObjectScore]:
    """Every rank's scores, on every rank (as tuples: a few numbers and a class name each)."""
    everyone = distributed.all_gather_object([astuple(s) for s in scores])
    return [ObjectScore(*row) for part in everyone for row in part]


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
    """The split's metrics at each image's original size, plus the mean validation loss (at the
    mask logits' resolution, as in training)."""
    was_training = model.training
    model.eval()
    loss_acc = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # loss sum, batches
    scores: list[ObjectScore] = []
    for batch in loader:
        batch: Batch = batch.to(ctx.device)
        with distributed.autocast(precision, ctx.device):
            preds = model(batch, multimask)
        loss_acc[0] += compute_loss(preds, batch.masks, loss, reduction).total.double()
        loss_acc[1] += 1
        scores += score_objects(kept_logits(preds, reduction), batch, batch.images.shape[-1])
    distributed.all_reduce(loss_acc)
    model.train(was_training)
    result = summarize(gather_scores(scores))
    result["loss"] = loss_acc[0].item() / max(loss_acc[1].item(), 1.0)
    return result


def collapsing(result: dict[str, float]) -> bool:
    return result.get("empty_share", 0.0) > COLLAPSE_SHARE
