"""The torch side of the data: resize, normalise, pick objects, make prompts, batch.

Randomness (flips, which objects, prompt jitter) comes from a generator seeded by
(seed, epoch, index), so a resumed run sees exactly the batches it would have seen, whatever the
number of DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from .annotations import Sample, load_image
from .config import PromptSpec
from .prompts import make_prompts

PIXEL_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
PIXEL_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
EVAL_EPOCH = -1


@dataclass
class Batch:
    images: torch.Tensor  # [B,3,S,S] normalised
    masks: torch.Tensor  # [N,S,S] bool, N objects over the batch
    coords: torch.Tensor  # [N,P,2]
    labels: torch.Tensor  # [N,P]
    image_index: torch.Tensor  # [N] which image each object belongs to

    def to(self, device: torch.device) -> Batch:
        nb = device.type == "cuda"
        return Batch(
            *(
                t.to(device, non_blocking=nb)
                for t in (self.images, self.masks, self.coords, self.labels, self.image_index)
            )
        )

    @property
    def num_images(self) -> int:
        return self.images.shape[0]


class PromptedMasks(Dataset):
    """Items are (epoch, index) pairs, so the epoch reaches the workers with each index."""

    def __init__(self, samples: list[Sample], image_size: int, prompts: PromptSpec, seed: int, train: bool) -> None:
        self.samples = samples
        self.size = image_size
        self.prompts = prompts
        self.seed = seed
        self.train = train

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = key
        rng = np.random.default_rng([self.seed, epoch + 1, index])
        sample = self.samples[index]
        image = torch.from_numpy(load_image(sample.image)).permute(2, 0, 1)
        masks = torch.from_numpy(sample.masks(image.shape[1], image.shape[2]))
        image = F.interpolate(
            image[None].float(), size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False
        )[0]
        masks = resize_masks(masks, self.size)
        if self.train and rng.random() < 0.5:
            image, masks = image.flip(-1), masks.flip(-1)
        if self.train and len(masks) > self.prompts.max_objects:
            masks = masks[torch.from_numpy(rng.choice(len(masks), self.prompts.max_objects, replace=False))]
        coords, labels = make_prompts(masks, self.prompts, rng, perturb=self.train)
        image = (image / 255.0 - PIXEL_MEAN) / PIXEL_STD
        return {"image": image, "masks": masks, "coords": coords, "labels": labels}


def resize_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    """[K,H,W] bool -> [K,size,size] bool by area; an object thinner than a pixel keeps the pixels
    it touches, so no non-empty mask becomes empty (an object without pixels has no prompt)."""
    coverage = F.interpolate(masks[None].float(), size=(size, size), mode="area")[0]
    majority = coverage > 0.5
    vanished = ~majority.flatten(1).any(dim=1)
    majority[vanished] = coverage[vanished] > 0
    return majority


def collate(items: list[dict[str, torch.Tensor]]) -> Batch:
    return Batch(
        images=torch.stack([it["image"] for it in items]),
        masks=torch.cat([it["masks"] for it in items]),
        coords=torch.cat([it["coords"] for it in items]),
        labels=torch.cat([it["labels"] for it in items]),
        image_index=torch.cat([torch.full((len(it["masks"]),), i) for i, it in enumerate(items)]),
    )


class ResumableSampler(Sampler[tuple[int, int]]):
    """DistributedSampler order, per epoch, starting at any position: yields (epoch, index).

    The position (epoch, samples already consumed this epoch) is saved in checkpoints; a resumed
    run continues mid-epoch with the same order it had.
    """

    def __init__(self, size: int, rank: int, world: int, seed: int) -> None:
        self.inner = DistributedSampler(
            range(size), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.epoch = 0
        self.start = 0

    def __len__(self) -> int:
        return len(self.inner) - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        self.inner.set_epoch(self.epoch)
        order = list(self.inner)
        return iter([(self.epoch, i) for i in order[self.start :]])

    @property
    def per_epoch(self) -> int:
        return len(self.inner)


def shard(size: int, rank: int, world: int) -> list[tuple[int, int]]:
    """Evaluation keys for one rank: every sample exactly once over all ranks (no padding)."""
    return [(EVAL_EPOCH, i) for i in range(rank, size, world)]


class ResumableStream(Sampler[int]):
    """Detectron2's TrainingSampler order (one endless stream of per-epoch permutations, position
    i going to rank i mod world), able to start at any position of this rank's share.

    A run resumed after each rank took `n` images continues with image n + 1 of the same stream.
    """

    def __init__(self, size: int, rank: int, world: int, seed: int, start: int = 0) -> None:
        if size < 1:
            raise ValueError("ResumableStream needs a non-empty dataset")
        self.size, self.rank, self.world, self.seed, self.start = size, rank, world, seed, start

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start * self.world + self.rank, self.size)
        while True:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
            while offset < self.size:
                yield order[offset]
                offset += self.world
            epoch, offset = epoch + 1, offset - self.size
