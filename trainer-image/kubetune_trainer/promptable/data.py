"""The torch side of the data: resize, pad, pick objects, make prompts, batch (and normalise, on the device).

Randomness (flips, which objects, prompt jitter) comes from a generator seeded by
(seed, epoch, index), so a resumed run sees exactly the batches it would have seen, whatever the
number of DataLoader workers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from kubetune_trainer.config import PromptSpec
from kubetune_trainer.datasets.files import image_size, load_image
from kubetune_trainer.datasets.readers import Sample
from kubetune_trainer.promptable.prompts import make_prompts

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_EPOCH = -1


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes model input (SamProcessor's steps): resize and, with longest-side
    resizing, pad bottom and right to size × size (in the loader, uint8); rescale to [0, 1],
    normalise and keep the padding zero (`model_input`, on the model's device)."""

    size: int
    resize: str = "stretch"  # stretch | longest-side
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def shape(self, height: int, width: int) -> tuple[int, int]:
        """Resized (height, width) before padding; longest-side rounds as SamImageProcessor does."""
        if self.resize == "stretch":
            return self.size, self.size
        scale = self.size / max(height, width)
        return int(height * scale + 0.5), int(width * scale + 0.5)

    def model_input(self, images: torch.Tensor, extents: torch.Tensor | None) -> torch.Tensor:
        """[M,3,S,S] uint8 zero-padded images (extents: [M,2] resized height, width; None: the
        whole square) -> rescaled and normalised, padding zero (as SamProcessor pads after
        normalising). Done on the model's device: the loader moves a quarter of the bytes."""
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        x = (images.float() / 255.0 - mean) / std
        if extents is not None and self.resize != "stretch":
            side = torch.arange(self.size, device=images.device)
            rows = side[None, :] < extents[:, :1]  # [M,S]
            cols = side[None, :] < extents[:, 1:]
            x = x * (rows[:, :, None] & cols[:, None, :])[:, None]
        return x

    def pad(self, tensor: torch.Tensor) -> torch.Tensor:
        """Zero-pad the last two dims to size × size (bottom and right)."""
        return F.pad(tensor, (0, self.size - tensor.shape[-1], 0, self.size - tensor.shape[-2]))


@dataclass
class Batch:
    images: torch.Tensor  # [M,3,S,S] uint8, zero-padded: the decoded images (see `decoded`)
    masks: torch.Tensor  # [N,S,S] bool, N objects over the batch (training: at the logits' side)
    coords: torch.Tensor  # [N,P,2]
    labels: torch.Tensor  # [N,P]
    image_index: torch.Tensor  # [N] which image each object belongs to
    keys: list[str] | None = None  # per image: content hash (+ flip), for the feature cache
    # Per image: whether `images` holds it (not when its features were cached); None: all do.
    decoded: list[bool] | None = None
    extents: torch.Tensor | None = None  # [M,2] each decoded image's resized (height, width) before padding
    # Evaluation batches only: per image (decoded or not) its resized (height, width), its objects'
    # masks at the original size ([K,H,W] bool), and per object its class name.
    shapes: torch.Tensor | None = None
    originals: list[torch.Tensor] | None = None
    classes: list[str] | None = None

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        tensors = (self.images, self.masks, self.coords, self.labels, self.image_index)
        return Batch(
            *(fn(t) for t in tensors),
            keys=self.keys,
            decoded=self.decoded,
            extents=fn(self.extents) if self.extents is not None else None,
            shapes=self.shapes,
            originals=self.originals,  # stay on the CPU: scored a few objects at a time
            classes=self.classes,
        )

    def to(self, device: torch.device) -> Batch:
        nb = device.type == "cuda"
        return self._map(lambda t: t.to(device, non_blocking=nb))

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pinning thread (pin_memory=True), so the copy to the GPU
        in `to` is asynchronous."""
        return self._map(torch.Tensor.pin_memory)

    @property
    def num_images(self) -> int:
        return len(self.keys) if self.keys is not None else self.images.shape[0]


class PromptedMasks(Dataset):
    """Items are (epoch, index) pairs, so the epoch reaches the workers with each index. A third
    element, True, says the feature cache holds the item's image: it is then not decoded (its
    size comes from the file header); the masks and prompts are made as always."""

    def __init__(
        self,
        samples: list[Sample],
        pre: Preprocess,
        prompts: PromptSpec,
        *,
        seed: int,
        train: bool,
        keyed: bool = False,
        flip: bool = True,
        target_size: int | None = None,
    ) -> None:
        self.samples = samples
        self.pre = pre
        self.prompts = prompts
        self.seed = seed
        self.train = train
        self.keyed = keyed  # add each image's feature-cache key
        self.flip = flip
        # Masks go out at this side (the model's mask logits: 16× fewer bytes to move than at the
        # input size) after the prompts are drawn at full resolution; None: at the input size.
        self.target_size = target_size
        self._hashes: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def _rng(self, epoch: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch + 1, index])

    def _flipped(self, rng: np.random.Generator) -> bool:
        # Training draws the flip even when flipping is off, so the prompts that follow are the same.
        return self.train and rng.random() < 0.5 and self.flip

    def _key(self, index: int, flipped: bool) -> str:
        if index not in self._hashes:
            self._hashes[index] = content_key(self.samples[index].image)
        return self._hashes[index] + ("-flip" if flipped else "")

    def cache_key(self, epoch: int, index: int) -> str:
        """The feature-cache key item (epoch, index) will carry: image content hash and flip."""
        return self._key(index, self._flipped(self._rng(epoch, index)))

    def __getitem__(self, key: tuple[int, int] | tuple[int, int, bool]) -> dict:
        epoch, index, *flag = key
        held = bool(flag and flag[0])
        rng = self._rng(epoch, index)
        sample = self.samples[index]
        flipped = self._flipped(rng)
        item: dict = {"key": self._key(index, flipped)} if self.keyed else {}
        if held:
            image, (height, width) = None, image_size(sample.image, sample.exif)  # the header only
        else:
            image = torch.from_numpy(load_image(sample.image, sample.exif)).permute(2, 0, 1)
            height, width = image.shape[1:]
        if self.train:
            masks = torch.from_numpy(sample.masks(height, width))
        else:  # scored at the original size, per class
            decoded, classes = sample.masks.decode(height, width)
            masks = torch.from_numpy(decoded)
            item.update(original=masks, classes=classes)
        shape = self.pre.shape(height, width)
        masks = resize_masks(masks, shape)
        if flipped:
            masks = masks.flip(-1)
        if image is not None:
            if image.shape[1:] != shape:  # at the model's size already: interpolation is the identity
                image = F.interpolate(image[None].float(), shape, mode="bilinear", antialias=True, align_corners=False)
                image = image[0].round_().clamp_(0, 255).to(torch.uint8)  # as SamProcessor's PIL resize
            image = self.pre.pad(image.flip(-1) if flipped else image)  # uint8: normalised on the device
        if self.train and len(masks) > self.prompts.max_objects:
            masks = masks[torch.from_numpy(rng.choice(len(masks), self.prompts.max_objects, replace=False))]
        # Prompts come from the unpadded masks, so boxes and points stay inside the image.
        coords, labels = make_prompts(masks, self.prompts, rng, perturb=self.train)
        masks = self.pre.pad(masks)
        if self.target_size is not None:
            masks = resize_targets(masks, (self.target_size, self.target_size))
        item.update(image=image, extent=shape, side=self.pre.size, masks=masks, coords=coords, labels=labels)
        return item


def resize_masks(masks: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """[K,H,W] bool -> [K,h,w] bool by area; an object thinner than a pixel keeps the pixels
    it touches, so no non-empty mask becomes empty (an object without pixels has no prompt)."""
    shape = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(masks.shape[-2:]) == shape:
        return masks.bool()
    coverage = F.interpolate(masks[None].float(), size=shape, mode="area")[0]
    majority = coverage > 0.5
    vanished = ~majority.flatten(1).any(dim=1)
    majority[vanished] = coverage[vanished] > 0
    return majority


def resize_targets(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[N,S,S] bool masks -> [N,h,w] bool at the prediction's size: pixels more than half covered.
    When the size divides evenly (the usual 4×) the pixels of each cell are counted as integers,
    which gives what area interpolation gives without its float work."""
    (h, w), (th, tw) = masks.shape[-2:], size
    if (h, w) == (th, tw):
        return masks.bool()
    if masks.dtype == torch.bool and h % th == 0 and w % tw == 0:
        fh, fw = h // th, w // tw
        dtype = torch.uint8 if fh * fw < 256 else torch.int32
        counts = masks.view(torch.uint8).unflatten(-1, (tw, fw)).sum(-1, dtype=dtype)  # [N,h,tw]
        counts = counts.unflatten(-2, (th, fh)).sum(-2, dtype=dtype)  # [N,th,tw]
        return counts > fh * fw // 2
    return F.interpolate(masks[:, None].float(), size=size, mode="area")[:, 0] > 0.5


def collate(items: list[dict]) -> Batch:
    images = [it["image"] for it in items if it["image"] is not None]
    decoded = [it["image"] is not None for it in items]
    extents = [it["extent"] for it in items if it["image"] is not None]
    scored = "original" in items[0]
    return Batch(
        images=torch.stack(images)
        if images
        else torch.empty(0, 3, items[0]["side"], items[0]["side"], dtype=torch.uint8),
        extents=torch.tensor(extents, dtype=torch.long).view(-1, 2),
        masks=torch.cat([it["masks"] for it in items]),
        coords=torch.cat([it["coords"] for it in items]),
        labels=torch.cat([it["labels"] for it in items]),
        image_index=torch.cat([torch.full((len(it["masks"]),), i) for i, it in enumerate(items)]),
        keys=[it["key"] for it in items] if "key" in items[0] else None,
        decoded=None if all(decoded) else decoded,
        shapes=torch.tensor([it["extent"] for it in items], dtype=torch.long).view(-1, 2) if scored else None,
        originals=[it["original"] for it in items] if scored else None,
        classes=[c for it in items for c in it["classes"]] if scored else None,
    )


def content_key(path) -> str:
    """An image file's content hash: the feature cache's key (with the flip)."""
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


class ResumableSampler(Sampler[tuple]):
    """DistributedSampler order, per epoch, starting at any position: yields (epoch, index), or
    (epoch, index, held) when `held` is set.

    The position (epoch, samples already consumed this epoch) is saved in checkpoints; a resumed
    run continues mid-epoch with the same order it had. `sticky` keeps each rank on the same
    images every epoch (shuffled within), so a per-rank feature cache is warm after one epoch.
    """

    def __init__(self, size: int, rank: int, world: int, seed: int, sticky: bool = False) -> None:
        self.inner = DistributedSampler(
            range(size), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.sticky = sticky and world > 1  # one rank already sees every image each epoch
        self.seed = seed
        self.epoch = 0
        self.start = 0
        # (epoch, index) -> whether the feature cache holds that item's features; the item then
        # skips decoding its image. Asked as indices are drawn, ahead of the step.
        self.held: Callable[[int, int], bool] | None = None

    def __len__(self) -> int:
        return len(self.inner) - self.start

    def _order(self) -> list[int]:
        if not self.sticky:
            self.inner.set_epoch(self.epoch)
            return list(self.inner)
        self.inner.set_epoch(0)
        shard = list(self.inner)  # epoch 0's share, kept for good
        generator = torch.Generator().manual_seed(self.seed + 1 + self.epoch)
        return [shard[i] for i in torch.randperm(len(shard), generator=generator).tolist()]

    def __iter__(self) -> Iterator[tuple[int, int] | tuple[int, int, bool]]:
        order = self._order()[self.start :]
        if self.held is None:
            return iter([(self.epoch, i) for i in order])
        return ((self.epoch, i, self.held(self.epoch, i)) for i in order)


class ResumableBatches:
    """A training DataLoader (over a ResumableSampler) as batches without end: epochs roll over,
    and the position (epoch, batches taken in it) is what checkpoints save and a resume seeks to,
    so a resumed run sees the batches the killed one would have seen next."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.sampler: ResumableSampler = loader.batch_sampler.sampler  # type: ignore[union-attr]
        self.epoch = 0
        self.taken = 0  # batches of this epoch already handed out
        self._batches: Iterator[Batch] | None = None

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.loader.batch_sampler)

    def next(self) -> Batch:
        while True:
            if self._batches is None:
                self.sampler.epoch = self.epoch
                self.sampler.start = self.taken * self.loader.batch_sampler.batch_size
                self._batches = iter(self.loader)
            try:
                batch = next(self._batches)
            except StopIteration:
                self._batches = None
                self.epoch, self.taken = self.epoch + 1, 0
                continue
            self.taken += 1
            return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_in_epoch": self.taken}

    def load_state_dict(self, position: dict[str, int], same_world: bool = True) -> None:
        """Seek to a checkpoint's position; a different world shards the data differently, so
        then the epoch starts over rather than skip the wrong images."""
        self.epoch = position["epoch"]
        self.taken = position["batches_in_epoch"] if same_world else 0
        self._batches = None


def shard(size: int, rank: int, world: int) -> list[tuple[int, int]]:
    """Evaluation keys for one rank: every sample exactly once over all ranks (no padding)."""
    return [(EVAL_EPOCH, i) for i in range(rank, size, world)]
