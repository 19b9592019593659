"""The inputs every recipe stages on each node before training: the dataset and the base weights,
downloaded by each node's local rank 0 into the node-local cache while the other ranks wait."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kubetune_trainer.config import TrainConfig, environment
from kubetune_trainer.storage.staging import fetch_object, stage
from kubetune_trainer.storage.stores import open_store, split_object_uri
from kubetune_trainer.training import distributed
from kubetune_trainer.training.distributed import DistContext


def cache_root() -> Path:
    return Path(os.environ.get(environment.CACHE_DIR, environment.DEFAULT_CACHE_DIR)).expanduser()


@dataclass
class StagedFiles:
    root: Path
    weights: Path | None
    downloaded_bytes: int


def stage_files(config: TrainConfig, ctx: DistContext, weights_are_folder: bool = False) -> StagedFiles:
    """Dataset and base weights on local disk; node leaders download, the others wait."""
    root = cache_root()
    data_store = open_store(config.data.source, config.storage)
    report = distributed.leader_first(ctx, lambda: stage(data_store, root))
    downloaded = report.bytes_downloaded
    weights = None
    if config.model.checkpoint and weights_are_folder:  # a transformers model folder
        store = open_store(config.model.checkpoint, config.storage)  # a folder URI, "/" or not
        folder = distributed.leader_first(ctx, lambda: stage(store, root))
        weights, downloaded = folder.root, downloaded + folder.bytes_downloaded
    elif config.model.checkpoint:
        folder, key = split_object_uri(config.model.checkpoint)
        weights_store = open_store(folder, config.storage)
        weights = distributed.leader_first(ctx, lambda: fetch_object(weights_store, key, root / "weights"))
    return StagedFiles(report.root, weights, downloaded if ctx.is_local_leader else 0)
