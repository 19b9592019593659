"""The one interface a promptable model family implements for the trainer.

An adapter builds a module whose forward maps a `Batch` of prompted objects to `Predictions`,
with only `spec.trainable` parts trainable, says how images are preprocessed for it, and saves
weights in the family's own format. Devices, autocast and DDP stay in `distributed` and `engine`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from kubetune_trainer.config import ModelSpec
from kubetune_trainer.promptable.data import Batch, Preprocess
from kubetune_trainer.promptable.feature_cache import FeatureCache, cached_features


@dataclass
class Predictions:
    mask_logits: torch.Tensor  # [N,M,h,w]; M = 3 with multimask output, else 1
    iou_pred: torch.Tensor  # [N,M] the model's own estimate of each mask's IoU
    object_logits: torch.Tensor | None  # [N,1] "an object is there" (SAM2); None if the family has none


class PromptableModule(nn.Module):
    """Wraps a family's model as `self.sam`; keeps a frozen image encoder in eval mode (no
    dropout or drop-path noise in features nobody trains). Subclasses run it out of autograd."""

    encoder_name: str  # the image encoder's attribute on the wrapped model

    def __init__(self, sam: nn.Module, train_encoder: bool, pre: Preprocess) -> None:
        super().__init__()
        self.sam = sam
        self.train_encoder = train_encoder
        self.pre = pre  # the loader's uint8 images become model input here, on the device
        self.cache: FeatureCache | None = None  # set by the recipe for model.featureCache

    def image_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen (or trained) image encoder's output levels, [B,...] each."""
        raise NotImplementedError

    def mask_side(self, image_size: int) -> int:
        """The side of the mask logits (training targets are delivered at it): the decoders of
        SAM and SAM2 upscale a stride-16 image embedding four times."""
        return image_size // 4

    def encode(self, batch: Batch) -> list[torch.Tensor]:
        """image_features, from the feature cache where it has them."""
        pixels = self.pre.model_input(batch.images, batch.extents)
        if self.cache is None or batch.keys is None or self.train_encoder:
            return self.image_features(pixels)
        return cached_features(self.cache, batch.keys, pixels, self.image_features, batch.decoded)

    def train(self, mode: bool = True) -> PromptableModule:
        super().train(mode)
        if not self.train_encoder:
            getattr(self.sam, self.encoder_name).eval()
        return self


class Segmenter(Protocol):
    family: str
    weights_are_folder: bool  # model.checkpoint names a folder (True) or one file
    native_name: str  # what save_native writes: a file, or a folder ending in /

    def build(self, spec: ModelSpec, weights: Path | None) -> nn.Module:
        """A module with forward(batch, multimask) -> Predictions."""

    def preprocess(self, spec: ModelSpec, weights: Path | None) -> Preprocess:
        """How images become this model's input."""

    def optional_parts(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """Parameters reached only by some losses ("iou", "object") or prompt kinds ("points",
        "box"); the recipe freezes those a run does not use, so DDP never waits for them."""

    def checkpoint_encoder(self, model: nn.Module) -> None:
        """Recompute the image encoder's blocks in backward (model.gradientCheckpointing)."""

    def save_native(self, model: nn.Module, folder: Path) -> None:
        """Write the weights (and the model's preprocessing, where the format has a place for it)
        into `folder` as `native_name`, in the format the family's own loader reads."""


def set_trainable(model: nn.Module, parts: dict[str, list[nn.Module]], spec: ModelSpec) -> bool:
    """Freeze everything, then unfreeze the modules of each part in spec.trainable; True when
    the image encoder trains."""
    for p in model.parameters():
        p.requires_grad_(False)
    for part in spec.trainable_parts():
        for module in parts[part]:
            for p in module.parameters():
                p.requires_grad_(True)
    return "image_encoder" in spec.trainable_parts()
