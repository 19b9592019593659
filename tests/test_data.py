"""Dataset items, batching and the resumable sampler order."""

from __future__ import annotations

from pathlib import Path

import torch
from kubetune_trainer.annotations import usable_samples
from kubetune_trainer.config import PromptSpec
from kubetune_trainer.data import Preprocess, PromptedMasks, ResumableSampler, collate, resize_masks, shard


def test_items_are_deterministic_per_epoch_and_index(tiny_coco: Path) -> None:
    samples = usable_samples("coco", tiny_coco, "train/annotations.json")
    ds = PromptedMasks(
        samples, Preprocess(64), PromptSpec(type="box+points", perturbation=5, max_objects=2), seed=1, train=True
    )
    a, b, c = ds[(0, 3)], ds[(0, 3)], ds[(1, 3)]
    assert torch.equal(a["coords"], b["coords"]) and torch.equal(a["image"], b["image"])
    assert not (torch.equal(a["coords"], c["coords"]) and torch.equal(a["image"], c["image"]))
    assert a["image"].shape == (3, 64, 64) and a["masks"].shape[1:] == (64, 64)
    assert 1 <= len(a["masks"]) <= 2 and a["coords"].shape == (len(a["masks"]), 2 + 3, 2)
    batch = collate([ds[(0, i)] for i in range(3)])
    assert batch.images.shape == (3, 3, 64, 64)
    assert len(batch.masks) == len(batch.coords) == len(batch.image_index)
    assert batch.image_index.tolist() == sorted(batch.image_index.tolist())


def test_sampler_resumes_mid_epoch_with_the_same_order() -> None:
    full = ResumableSampler(20, rank=1, world=2, seed=4)
    full.epoch = 3
    order = list(full)
    resumed = ResumableSampler(20, rank=1, world=2, seed=4)
    resumed.epoch, resumed.start = 3, 4
    assert list(resumed) == order[4:] and len(resumed) == len(order) - 4
    other_rank = ResumableSampler(20, rank=0, world=2, seed=4)
    other_rank.epoch = 3
    assert not {i for _, i in order} & {i for _, i in other_rank}  # ranks see disjoint samples
    full.epoch = 4
    assert list(full) != order


def test_eval_shards_cover_every_sample_once() -> None:
    keys = [k for rank in range(3) for k in shard(10, rank, 3)]
    assert sorted(i for _, i in keys) == list(range(10))


def test_thin_objects_survive_downscaling() -> None:
    masks = torch.zeros(2, 96, 96, dtype=torch.bool)
    masks[0, 40, 10:80] = True  # one pixel thin
    masks[1, 20:60, 20:60] = True
    small = resize_masks(masks, 32)
    assert small[0].any()
    assert small[1].sum() == 13 * 13  # cells 7..19 are covered by more than half
