"""The frozen-encoder feature cache: same losses as the uncached path, computed once, keyed right."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kubetune_trainer.config import ModelSpec, PromptSpec
from kubetune_trainer.promptable.data import Preprocess, PromptedMasks, ResumableSampler, collate
from kubetune_trainer.promptable.feature_cache import FeatureCache, fingerprint
from kubetune_trainer.promptable.losses import compute_loss
from kubetune_trainer.promptable.models.sam import SamSegmenter
from kubetune_trainer.promptable.models.sam2 import Sam2Segmenter
from kubetune_trainer.promptable.recipe import build_loader
from kubetune_trainer.training.distributed import init

from tests.factories import train_config, usable
from tests.helpers import write_tiny_sam


def build(family: str, base: Path):
    if family == "sam2":
        spec = ModelSpec(family="sam2", variant="sam2.1_hiera_tiny", imageSize=64)
        seg, weights = Sam2Segmenter(), None
    else:
        spec = ModelSpec(family="sam", variant="vit-base", imageSize=64)
        seg, weights = SamSegmenter(), base
    torch.manual_seed(0)
    return seg.build(spec, weights), seg.preprocess(spec, weights)


def train(
    module, pre: Preprocess, samples, epochs: int, flip: bool = True, workers: int = 0, decoded=None
) -> list[float]:
    """The trainer's own DataLoader (seeded flips, prompts, order; cached images not decoded)
    and plain Adam steps. `decoded` gets the number of images decoded in each epoch."""
    mode = module.cache.mode if module.cache is not None else "off"
    config = train_config(
        model={"featureCache": mode}, data={"numWorkers": workers, "horizontalFlip": flip}, defaults=False, seed=0
    )
    loader = build_loader(samples, config, init(), pre, module.cache, module.mask_side(64))
    sampler = loader.batch_sampler.sampler
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    module.train()
    losses = []
    for epoch in range(epochs):
        sampler.epoch = epoch
        images = 0
        for batch in loader:
            images += batch.images.shape[0]
            loss = compute_loss(module(batch), batch.masks, "sam2").total
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        if decoded is not None:
            decoded.append(images)
    return losses


@pytest.mark.parametrize("family", ["sam2", "sam"])
def test_cached_training_follows_the_uncached_loss_trajectory(family: str, tiny_coco: Path, tmp_path: Path) -> None:
    write_tiny_sam(tmp_path / "base")
    samples = usable("coco", tiny_coco, "train/annotations.json")
    plain, pre = build(family, tmp_path / "base")
    expected = train(plain, pre, samples, epochs=3)
    cached, pre = build(family, tmp_path / "base")
    cached.cache = FeatureCache("memory", "test", torch.device("cpu"))
    decoded: list[int] = []
    losses = train(cached, pre, samples, epochs=3, workers=2, decoded=decoded)
    assert torch.allclose(torch.tensor(losses), torch.tensor(expected), rtol=1e-4), (losses, expected)
    cache = cached.cache
    # The sampler flags what the cache holds: only misses are decoded, hits never are.
    assert decoded[0] == len(samples) // 2 * 2 and sum(decoded) == cache.misses
    # Each (image, flip) is encoded once; everything else came from the cache.
    assert cache.misses == len(cache.memory) <= 2 * len(samples) and cache.hits + cache.misses == 3 * len(samples)
    assert cache.hits >= len(samples)  # by the third epoch most entries are warm


def test_disk_cache_survives_a_restart_and_is_keyed_by_weights_and_preprocessing(
    tiny_coco: Path, tmp_path: Path
) -> None:
    write_tiny_sam(tmp_path / "base")
    samples = usable("coco", tiny_coco, "train/annotations.json")
    module, pre = build("sam", tmp_path / "base")
    namespace = fingerprint(module.sam.vision_encoder, pre, "fp32")
    module.cache = FeatureCache("disk", namespace, torch.device("cpu"), tmp_path / "cache")
    train(module, pre, samples, epochs=1)
    first = module.cache.misses
    assert first == len(list((tmp_path / "cache" / "features" / namespace).glob("*.safetensors")))

    again, pre = build("sam", tmp_path / "base")  # a restarted pod: same weights, same folder
    again.cache = FeatureCache("disk", namespace, torch.device("cpu"), tmp_path / "cache")
    train(again, pre, samples, epochs=1)
    assert again.cache.misses == 0 and again.cache.hits == len(samples)

    # A torn entry (a writer killed mid-file) is recomputed, not fatal.
    next((tmp_path / "cache" / "features" / namespace).glob("*.safetensors")).write_bytes(b"torn")
    train(again, pre, samples, epochs=1)
    assert again.cache.misses == 1

    changed = fingerprint(again.sam.vision_encoder, Preprocess(64, "stretch"), "fp32")
    with torch.no_grad():
        again.sam.vision_encoder.neck.conv1.weight.add_(0.1)
    assert len({namespace, changed, fingerprint(again.sam.vision_encoder, pre, "fp32")}) == 3
    assert fingerprint(again.sam.vision_encoder, pre, "bf16") != fingerprint(again.sam.vision_encoder, pre, "fp32")


def test_loader_workers_do_not_decode_images_the_disk_cache_holds(tiny_coco: Path, tmp_path: Path) -> None:
    samples = usable("coco", tiny_coco, "train/annotations.json")
    plain, pre = build("sam2", tmp_path)
    expected = train(plain, pre, samples, epochs=3, flip=False)
    cached, pre = build("sam2", tmp_path)
    cached.cache = FeatureCache("disk", "test", torch.device("cpu"), tmp_path / "cache")
    decoded: list[int] = []
    losses = train(cached, pre, samples, epochs=3, flip=False, workers=2, decoded=decoded)
    assert torch.allclose(torch.tensor(losses), torch.tensor(expected), rtol=1e-4), (losses, expected)
    per_epoch = len(samples) // 2 * 2
    assert decoded == [per_epoch, 0, 0]  # after the first epoch no image is decoded
    assert cached.cache.misses == per_epoch and cached.cache.hits == 2 * per_epoch


def test_a_held_item_has_the_decoded_items_masks_and_prompts(tiny_coco: Path) -> None:
    samples = usable("coco", tiny_coco, "train/annotations.json")
    dataset = PromptedMasks(samples, Preprocess(64, "longest-side"), PromptSpec(), seed=0, train=True, keyed=True)
    for epoch in range(3):
        for i in range(len(samples)):
            a, b = dataset[(epoch, i)], dataset[(epoch, i, True)]
            assert a["image"].shape == (3, 64, 64) and b["image"] is None
            assert a["key"] == b["key"] == dataset.cache_key(epoch, i)
            for name in ("masks", "coords", "labels"):
                assert torch.equal(a[name], b[name]), (epoch, i, name)
    batch = collate([dataset[(0, 0, True)], dataset[(0, 1, False)], dataset[(0, 2, True)]])
    assert batch.num_images == 3 and batch.images.shape == (1, 3, 64, 64)  # only the decoded one
    assert batch.decoded == [False, True, False] and collate([dataset[(0, 0)]]).decoded is None
    dataset.target_size = 16  # masks at the logits' side do not shrink the (empty) image tensor
    only_held = collate([dataset[(0, 0, True)]])
    assert only_held.images.shape == (0, 3, 64, 64) and only_held.num_images == 1
    assert only_held.images.dtype == torch.uint8 and only_held.extents.shape == (0, 2)


def test_only_complete_disk_entries_count_as_held(tmp_path: Path) -> None:
    cache = FeatureCache("disk", "test", torch.device("cpu"), tmp_path)
    cache.put("good", [torch.ones(2, 4, 4), torch.zeros(3)])
    assert cache.holds("good") and not cache.holds("absent")
    folder = tmp_path / "features" / "test"
    whole = (folder / "good.safetensors").read_bytes()
    for name, content in {"empty": b"", "short": whole[:-5], "garbage": b"torn"}.items():
        (folder / f"{name}.safetensors").write_bytes(content)  # e.g. a node lost power after the rename
        assert not cache.holds(name), name
    damaged = whole.replace(b'"shape"', b'"shapX"')  # right length, unreadable
    (folder / "damaged.safetensors").write_bytes(damaged)
    assert cache.get("damaged") is None and not (folder / "damaged.safetensors").exists()  # dropped


def test_sticky_shards_keep_each_rank_on_its_images() -> None:
    seen = {}
    for rank in (0, 1):
        sampler = ResumableSampler(10, rank, 2, seed=3, sticky=True)
        orders = []
        for epoch in range(3):
            sampler.epoch = epoch
            orders.append([i for _, i in sampler])
        assert len({tuple(sorted(o)) for o in orders}) == 1 and len({tuple(o) for o in orders}) > 1
        seen[rank] = set(orders[0])
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(10))
    resumed = ResumableSampler(10, 0, 2, seed=3, sticky=True)
    resumed.epoch, resumed.start = 2, 2
    assert [i for _, i in resumed] == orders_of(0, 2)[2:]


def orders_of(rank: int, epoch: int) -> list[int]:
    sampler = ResumableSampler(10, rank, 2, seed=3, sticky=True)
    sampler.epoch = epoch
    return [i for _, i in sampler]


def test_feature_cache_needs_a_frozen_encoder() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="featureCache needs a frozen image encoder"):
        ModelSpec(family="sam2", variant="sam2.1_hiera_tiny", trainable=["image_encoder"], featureCache="memory")


@pytest.mark.parametrize("family", ["sam2", "sam"])
def test_gradient_checkpointing_gives_the_same_gradients(family: str, tiny_coco: Path, tmp_path: Path) -> None:
    """Recomputing the encoder in backward changes memory, not results, nor the saved keys."""
    write_tiny_sam(tmp_path / "base")
    samples = usable("coco", tiny_coco, "train/annotations.json")
    grads = []
    for recompute in (False, True):
        if family == "sam2":
            seg, spec, weights = (
                Sam2Segmenter(),
                ModelSpec(family="sam2", variant="sam2.1_hiera_tiny", imageSize=64),
                None,
            )
        else:
            seg, spec, weights = (
                SamSegmenter(),
                ModelSpec(family="sam", variant="vit-base", imageSize=64),
                tmp_path / "base",
            )
        spec = spec.model_copy(update={"trainable": ["mask_decoder", "image_encoder"]})
        torch.manual_seed(0)
        module = seg.build(spec, weights)
        keys = list(module.state_dict())
        if recompute:
            seg.checkpoint_encoder(module)
            assert list(module.state_dict()) == keys
        dataset = PromptedMasks(samples, seg.preprocess(spec, weights), PromptSpec(), seed=0, train=True)
        batch = collate([dataset[(0, 0)], dataset[(0, 1)]])
        module.train()
        compute_loss(module(batch), batch.masks, "sam2").total.backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    encoder = [n for n in grads[0] if "image_encoder" in n or "vision_encoder" in n]
    assert encoder and grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


def test_a_skipped_image_whose_entry_is_gone_is_an_error_not_wrong_features() -> None:
    from kubetune_trainer.errors import KubetuneError
    from kubetune_trainer.promptable.feature_cache import cached_features

    cache = FeatureCache("memory", "test", torch.device("cpu"))
    cache.put("a", [torch.ones(2, 4, 4)])
    images = torch.zeros(1, 3, 8, 8)  # only row 1 was decoded
    encode = lambda x: [torch.full((len(x), 2, 4, 4), 2.0)]  # noqa: E731
    (level,) = cached_features(cache, ["a", "b"], images, encode, decoded=[False, True])
    assert level[0].eq(1).all() and level[1].eq(2).all() and cache.holds("b")
    with pytest.raises(KubetuneError, match="unreadable"):
        cached_features(cache, ["a", "c"], images, encode, decoded=[True, False])


@pytest.mark.parametrize("family", ["sam2", "sam"])
def test_targets_come_at_the_side_of_the_mask_logits(family: str, tiny_coco: Path, tmp_path: Path) -> None:
    write_tiny_sam(tmp_path / "base")  # patch size 8: SAM's logits are 32 px at 64, SAM2's 16
    module, pre = build(family, tmp_path / "base")
    samples = usable("coco", tiny_coco, "train/annotations.json")
    dataset = PromptedMasks(samples, pre, PromptSpec(), seed=0, train=True, target_size=module.mask_side(64))
    batch = collate([dataset[(0, 0)], dataset[(0, 1)]])
    with torch.no_grad():
        assert module(batch).mask_logits.shape[-2:] == batch.masks.shape[-2:] == (module.mask_side(64),) * 2
