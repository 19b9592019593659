"""Prompt generation, losses and LR schedules: small pure functions, checked against hand math."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kubetune_trainer.config import PromptSpec, ScheduleSpec
from kubetune_trainer.promptable.losses import compute_loss, dice_loss, mask_iou
from kubetune_trainer.promptable.models.base import Predictions
from kubetune_trainer.promptable.prompts import boxes_from_masks, make_prompts
from kubetune_trainer.promptable.schedules import lr_factor


def square_masks() -> torch.Tensor:
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 10:30, 5:25] = True  # x 5..24, y 10..29
    masks[1, 40:60, 40:50] = True
    return masks


def test_boxes_are_tight_xyxy() -> None:
    assert boxes_from_masks(square_masks()).tolist() == [[5, 10, 25, 30], [40, 40, 50, 60]]


def test_box_perturbation_is_bounded_and_seeded() -> None:
    spec = PromptSpec(type="box", perturbation=3)
    a, labels = make_prompts(square_masks(), spec, np.random.default_rng(7), perturb=True)
    b, _ = make_prompts(square_masks(), spec, np.random.default_rng(7), perturb=True)
    tight = boxes_from_masks(square_masks()).view(-1, 2, 2)
    assert torch.equal(a, b)
    assert (a - tight).abs().max() <= 3 and not torch.equal(a, tight)
    assert labels.tolist() == [[2, 3], [2, 3]]
    clean, _ = make_prompts(square_masks(), spec, np.random.default_rng(7), perturb=False)
    assert torch.equal(clean, tight)


def test_points_come_from_eroded_mask_and_background() -> None:
    spec = PromptSpec(type="points", positive_points=20, negative_points=20, erosion=3)
    masks = square_masks()
    coords, labels = make_prompts(masks, spec, np.random.default_rng(0), perturb=True)
    assert coords.shape == (2, 40, 2) and labels[:, :20].eq(1).all() and labels[:, 20:].eq(0).all()
    for k in range(2):
        xy = coords[k].floor().long()
        inside = masks[k][xy[:, 1], xy[:, 0]]
        assert inside[:20].all() and not inside[20:].any()
    # eroded by 3: no positive point within 3 px of the first square's border
    pos = coords[0, :20]
    assert (pos[:, 0] >= 5 + 3).all() and (pos[:, 0] <= 25 - 3).all()


def test_box_plus_points_puts_the_box_first() -> None:
    spec = PromptSpec(type="box+points", positive_points=2, negative_points=1)
    _, labels = make_prompts(square_masks(), spec, np.random.default_rng(0), perturb=False)
    assert labels[0].tolist() == [2, 3, 1, 1, 0]


def _preds(good: torch.Tensor, bad: torch.Tensor, iou_pred: list[float]) -> Predictions:
    logits = torch.stack([bad, good, bad])[None]  # best candidate in the middle
    return Predictions(logits, torch.tensor([iou_pred]), torch.tensor([[5.0]]))


def test_multimask_trains_only_the_best_candidate() -> None:
    target = torch.zeros(1, 16, 16, dtype=torch.bool)
    target[0, 4:12, 4:12] = True
    good = torch.where(target[0], 8.0, -8.0).requires_grad_(True)
    bad = torch.full((16, 16), 8.0, requires_grad=True)
    terms = compute_loss(_preds(good, bad, [0.2, 0.9, 0.1]), target, "sam2")
    terms.total.backward()
    assert terms.parts["loss_focal"] < 0.01 and terms.parts["loss_dice"] < 0.01
    assert bad.grad.abs().sum() == 0  # the bad candidates get no mask gradient
    assert set(terms.parts) == {"loss_focal", "loss_dice", "loss_iou", "loss_object"}


def test_iou_prediction_is_supervised_with_the_real_iou() -> None:
    target = torch.zeros(1, 16, 16, dtype=torch.bool)
    target[0, :8] = True  # half the image
    full = torch.full((16, 16), 8.0)
    exact = torch.where(target[0], 8.0, -8.0)
    assert mask_iou(full[None], target.float()).item() == pytest.approx(0.5)
    terms = compute_loss(_preds(exact, full, [0.5, 1.0, 0.5]), target, "sam2")
    assert terms.parts["loss_iou"].item() == pytest.approx(0.0, abs=1e-6)
    simple = compute_loss(_preds(exact, full, [0.5, 0.0, 0.5]), target, "simple")
    assert simple.parts["loss_iou"].item() == pytest.approx(0.05)


def test_dice_loss_extremes() -> None:
    target = torch.zeros(16, 16)
    target[:8] = 1
    assert dice_loss(torch.where(target > 0, 20.0, -20.0), target).item() < 0.01
    assert dice_loss(torch.where(target > 0, -20.0, 20.0), target).item() > 0.95


def test_schedules() -> None:
    cosine = ScheduleSpec(type="cosine", warmup_steps=10, warmup_factor=0.1)
    assert lr_factor(cosine, 110, 0) == pytest.approx(0.1)
    assert lr_factor(cosine, 110, 5) == pytest.approx(0.55)
    assert lr_factor(cosine, 110, 10) == pytest.approx(1.0)
    assert lr_factor(cosine, 110, 60) == pytest.approx(0.5)
    assert lr_factor(cosine, 110, 110) == pytest.approx(0.0, abs=1e-12)
    multistep = ScheduleSpec(type="multistep", milestones=[20, 30], gamma=0.5)
    assert [lr_factor(multistep, 40, s) for s in (19, 20, 30)] == [1.0, 0.5, 0.25]
