"""Validation at each image's original size: padding cropped, resized back, scored per class and
per COCO size; the collapse numbers (empty masks, probability inside targets)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from kubetune_trainer.config import PromptSpec
from kubetune_trainer.datasets.masks import PolygonMasks
from kubetune_trainer.datasets.readers import Sample
from kubetune_trainer.promptable.data import EVAL_EPOCH, Preprocess, PromptedMasks, collate
from kubetune_trainer.promptable.evaluation import (
    ObjectScore,
    original_size_logits,
    score_objects,
    size_of,
    summarize,
)
from kubetune_trainer.promptable.gallery import Gallery, decode, draw_row, encode, pick
from kubetune_trainer.promptable.losses import mask_health
from PIL import Image


def _sample(tmp_path: Path, height: int, width: int, boxes: list[tuple], names: list[str]) -> Sample:
    """A noise image with rectangle objects (x0, y0, x1, y1) given as COCO polygons."""
    path = tmp_path / f"img{height}x{width}.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    polygons = [[[x0, y0, x1, y0, x1, y1, x0, y1]] for x0, y0, x1, y1 in boxes]
    return Sample(path, PolygonMasks(polygons, names))


def _batch(sample: Sample, size: int = 64):
    pre = Preprocess(size, "longest-side")
    dataset = PromptedMasks([sample], pre, PromptSpec(type="box", perturbation=0), seed=0, train=False)
    item = dataset[(EVAL_EPOCH, 0)]
    return collate([item]), item


def test_scores_are_taken_at_the_original_size_with_the_padding_cropped(tmp_path: Path) -> None:
    """A 120×200 image at 64 px longest-side is 38×64 plus 26 rows of padding. A mask that is
    positive everywhere, padding included, must count only the image's own pixels as false
    positives: at the original size, FP = H·W − area exactly."""
    sample = _sample(tmp_path, 120, 200, [(10, 20, 60, 80), (100, 10, 190, 110)], ["cat", "dog"])
    batch, item = _batch(sample)
    assert tuple(batch.shapes[0].tolist()) == (38, 64) and item["original"].shape == (2, 120, 200)
    everywhere = torch.full((2, 16, 16), 5.0)  # mask logits at a quarter of the input side
    scores = score_objects(everywhere, batch, side=64)
    areas = [50 * 60, 90 * 100]
    assert [s.area for s in scores] == areas
    assert [s.fp for s in scores] == [120 * 200 - a for a in areas] and all(s.fn == 0 for s in scores)
    assert [s.cls for s in scores] == ["cat", "dog"]


def test_a_mask_predicted_at_the_logits_size_scores_well_at_the_original_size(tmp_path: Path) -> None:
    """The ground truth brought to the logits' grid (as the model would predict it) and scored
    back at 120×200: IoU near 1, where comparing at the padded input size would not be the same."""
    sample = _sample(tmp_path, 120, 200, [(10, 20, 60, 80), (100, 10, 190, 110)], ["a", "b"])
    batch, _ = _batch(sample)
    targets = batch.masks.float()[:, None]  # [N,1,64,64], padded at the input size
    logits = torch.nn.functional.interpolate(targets, size=(16, 16), mode="area")[:, 0] * 20 - 10
    scores = score_objects(logits, batch, side=64)
    assert all(s.iou > 0.85 for s in scores), [s.iou for s in scores]
    full = original_size_logits(logits, 64, (38, 64), (120, 200))
    assert full.shape == (2, 120, 200)


def test_summary_means_sizes_classes_and_collapse_numbers() -> None:
    scores = [
        ObjectScore("cat", 100, 80, 20, 20, prob_inside=70.0, prob_sum=90.0),  # small (< 32²)
        ObjectScore("cat", 2000, 0, 0, 2000, prob_inside=300.0, prob_sum=350.0),  # medium, empty mask
        ObjectScore("dog", 10000, 9000, 1000, 1000, prob_inside=8000.0, prob_sum=9000.0),  # large
    ]
    result = summarize(scores)
    ious = [80 / 120, 0.0, 9000 / 11000]
    assert result["miou"] == pytest.approx(sum(ious) / 3)
    assert result["f1"] == pytest.approx(2 * 9080 / (2 * 9080 + 1020 + 3020))  # pixel-level
    assert result["empty_share"] == pytest.approx(1 / 3)
    assert result["target_prob"] == pytest.approx(8370 / 12100)
    assert result["size/small/miou"] == pytest.approx(ious[0]) and result["size/medium/objects"] == 1
    assert result["class/cat/miou"] == pytest.approx(sum(ious[:2]) / 2) and result["class/dog/objects"] == 1
    assert [size_of(a) for a in (1023, 1024, 9215, 9216)] == ["small", "medium", "medium", "large"]
    slashed = summarize([ObjectScore("traffic/light", 10, 5, 0, 5, 5.0, 5.0), scores[0]])
    assert "class/traffic_light/miou" in slashed
    one_class = summarize([ObjectScore("shape", 10, 5, 0, 5, 5.0, 5.0)])
    assert not any(k.startswith("class/") for k in one_class)  # no table of one row


def test_mask_health_sees_a_collapse() -> None:
    targets = torch.zeros(3, 8, 8)
    targets[:, 2:6, 2:6] = 1
    healthy = mask_health(targets * 8 - 4, targets)
    assert healthy["train/empty_share"] == 0 and healthy["train/miou_at_logits"] == 1
    faded = mask_health(targets * 3.5 - 4, targets)  # inside: p = 0.38, closer than before, yet empty
    assert faded["train/empty_share"] == 1 and faded["train/miou_at_logits"] == 0
    assert 0.3 < faded["train/target_prob"] < 0.5 and faded["train/soft_dice_at_logits"] > 0.3


def test_gallery_draws_each_row_at_the_original_aspect(tmp_path: Path) -> None:
    sample = _sample(tmp_path, 120, 200, [(10, 20, 60, 80)], ["cat"])
    pre = Preprocess(64, "longest-side")
    dataset = PromptedMasks([sample], pre, PromptSpec(type="box", perturbation=0), seed=0, train=False)
    gallery = Gallery([sample], dataset, 8)
    _, shown = gallery._item(0)
    assert shown.image.shape == (120, 200, 3)
    # The box prompt comes back in original pixels, around the object.
    assert np.allclose(shown.coords[0], [[10, 20], [60, 80]], atol=4)
    row = draw_row(shown, shown.targets, shown.targets)
    assert row.height > 150 and row.width > 5 * 300  # five panels of 320 px wide
    masks = shown.targets
    assert np.array_equal(decode(json.loads(json.dumps(encode(masks))), 120, 200), masks)
    assert pick(8, 3) == [0, 1, 2] and pick(3, 100) == [0, 50, 99] and len(pick(8, 100)) == 8


def test_large_images_are_scored_a_few_objects_at_a_time_with_the_same_result(tmp_path: Path, monkeypatch) -> None:
    from kubetune_trainer.promptable import evaluation

    boxes = [(10, 20, 60, 80), (100, 10, 190, 110), (5, 5, 30, 30)]
    batch, _ = _batch(_sample(tmp_path, 120, 200, boxes, ["a", "b", "c"]))
    logits = torch.randn(3, 16, 16)
    whole = score_objects(logits, batch, side=64)
    monkeypatch.setattr(evaluation, "CHUNK_PIXELS", 120 * 200)  # one object at a time
    assert score_objects(logits, batch, side=64) == whole
    assert batch.to(torch.device("cpu")).originals is batch.originals  # never copied to the device
