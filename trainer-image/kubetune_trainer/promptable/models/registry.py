"""model.family -> its adapter. The families import heavy packages (sam2, transformers), so each
is imported only when a job asks for it."""

from __future__ import annotations

from kubetune_trainer.config import ModelSpec
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.promptable.models.base import Segmenter


def segmenter_for(spec: ModelSpec) -> Segmenter:
    if spec.family == "sam2":
        from kubetune_trainer.promptable.models.sam2 import Sam2Segmenter

        return Sam2Segmenter()
    if spec.family == "sam":
        from kubetune_trainer.promptable.models.sam import SamSegmenter

        return SamSegmenter()
    raise ConfigError(f"model.family {spec.family!r} is not a promptable segmenter (sam2 and sam are)")
