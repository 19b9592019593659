"""Dataset items, batching and the resumable sampler order."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kubetune_trainer.config import PromptSpec
from kubetune_trainer.promptable.data import Preprocess, PromptedMasks, ResumableSampler, collate, resize_masks, shard

from tests.factories import usable


def test_items_are_deterministic_per_epoch_and_index(tiny_coco: Path) -> None:
    samples = usable("coco", tiny_coco, "train/annotations.json")
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


def test_targets_at_the_logits_size_give_the_same_loss_and_prompts(tiny_coco: Path) -> None:
    """Masks leave the workers at the mask logits' side: same prompts, same loss, 16× fewer bytes."""
    from kubetune_trainer.promptable.losses import compute_loss
    from kubetune_trainer.promptable.models.base import Predictions

    samples = usable("coco", tiny_coco, "train/annotations.json")
    pre, prompts = Preprocess(64, "longest-side"), PromptSpec(type="box+points", perturbation=3)
    full = PromptedMasks(samples, pre, prompts, seed=2, train=True)
    small = PromptedMasks(samples, pre, prompts, seed=2, train=True, target_size=16)
    for epoch in range(2):
        batches = [collate([ds[(epoch, i)] for i in range(len(samples))]) for ds in (full, small)]
        big, little = batches
        assert little.masks.shape[1:] == (16, 16) and little.masks.dtype == torch.bool
        assert torch.equal(big.coords, little.coords) and torch.equal(big.labels, little.labels)
        torch.manual_seed(epoch)
        n = len(big.masks)
        preds = Predictions(torch.randn(n, 3, 16, 16), torch.rand(n, 3), torch.randn(n, 1))
        for preset in ("sam2", "otx", "dicece"):
            a, b = compute_loss(preds, big.masks, preset).total, compute_loss(preds, little.masks, preset).total
            assert torch.equal(a, b), preset
    coarse = Predictions(torch.randn(n, 3, 32, 32), torch.rand(n, 3), torch.randn(n, 1))
    with pytest.raises(ValueError, match="coarser than the mask logits"):
        compute_loss(coarse, little.masks, "sam2")


def test_integer_target_downsampling_equals_area_interpolation() -> None:
    import torch.nn.functional as F
    from kubetune_trainer.promptable.data import resize_targets

    torch.manual_seed(0)
    for shape, size in [
        ((5, 64, 64), (16, 16)),
        ((3, 60, 90), (20, 30)),
        ((2, 64, 64), (4, 4)),
        ((4, 50, 50), (16, 16)),
    ]:
        masks = torch.rand(shape) > torch.rand(1)  # varied densities, exact half-covered cells included
        area = F.interpolate(masks[:, None].float(), size=size, mode="area")[:, 0] > 0.5
        assert torch.equal(resize_targets(masks, size), area), (shape, size)  # 16×16 cells: int32 counts


def test_batches_resume_at_their_position_across_epochs(tiny_coco: Path) -> None:
    """The batch source owns its position: a fresh one that seeks to a saved position yields what
    the first would have yielded next, also after an epoch boundary."""
    from kubetune_trainer.promptable.data import ResumableBatches
    from kubetune_trainer.promptable.recipe import build_loader
    from kubetune_trainer.training.distributed import init

    from tests.factories import train_config

    config = train_config(tiny_coco)
    samples = usable("coco", tiny_coco, "train/annotations.json")

    def batches() -> ResumableBatches:
        return ResumableBatches(build_loader(samples, config, init(), Preprocess(64)))

    first = batches()
    assert len(first) == 4  # 8 images, batch 2
    taken = [first.next() for _ in range(5)]  # into the second epoch
    assert first.state_dict() == {"epoch": 1, "batches_in_epoch": 1}
    again = batches()
    again.load_state_dict({"epoch": 0, "batches_in_epoch": 3})
    assert torch.equal(again.next().coords, taken[3].coords)
    assert torch.equal(again.next().coords, taken[4].coords) and again.epoch == 1
    elsewhere = batches()
    elsewhere.load_state_dict({"epoch": 0, "batches_in_epoch": 3}, same_world=False)  # epoch starts over
    assert torch.equal(elsewhere.next().coords, taken[0].coords)
