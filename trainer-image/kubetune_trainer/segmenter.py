"""The one interface a promptable model family implements for the trainer.

An adapter builds a module whose forward maps a `Batch` of prompted objects to `Predictions`,
with only `spec.trainable` parts trainable, and saves weights in the family's own format.
Devices, autocast and DDP stay in `distributed` and `engine`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from .config import ModelSpec
from .errors import ConfigError


@dataclass
class Predictions:
    mask_logits: torch.Tensor  # [N,M,h,w]; M = 3 with multimask output, else 1
    iou_pred: torch.Tensor  # [N,M] the model's own estimate of each mask's IoU
    object_logits: torch.Tensor | None  # [N,1] "an object is there" (SAM2); None if the family has none


class Segmenter(Protocol):
    family: str

    def build(self, spec: ModelSpec, weights: Path | None) -> nn.Module:
        """A module with forward(batch, multimask) -> Predictions."""

    def save_native(self, model: nn.Module, path: Path) -> None:
        """Weights in the format the family's own loader reads."""


def segmenter_for(spec: ModelSpec) -> Segmenter:
    if spec.family == "sam2":
        from .sam2_segmenter import Sam2Segmenter

        return Sam2Segmenter()
    raise ConfigError(f"model.family {spec.family!r} is not available in this trainer version (sam2 is)")
