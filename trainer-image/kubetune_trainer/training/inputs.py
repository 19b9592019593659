"""The inputs every recipe stages on each node before training: the dataset and the base weights,
downloaded by each node's local rank 0 while the other ranks wait.

The node cache (KUBETUNE_CACHE_DIR) holds one private folder per job, `jobs/<namespace>/<name>`,
and a folder of files shared between the node's jobs, `shared` (see `storage.shared`). In a
cluster each pod mounts only its own job's folder and the shared one, so no job reaches another
job's files, and what it takes from the shared folder is checked first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kubetune_trainer.config import JobIdentity, TrainConfig, environment
from kubetune_trainer.storage.shared import SharedFiles
from kubetune_trainer.storage.staging import stage
from kubetune_trainer.storage.stores import open_store
from kubetune_trainer.storage.weights import Weights, fetch_weights
from kubetune_trainer.training import distributed
from kubetune_trainer.training.distributed import DistContext


def cache_root() -> Path:
    return Path(os.environ.get(environment.CACHE_DIR, environment.DEFAULT_CACHE_DIR)).expanduser()


def job_cache(job: JobIdentity) -> Path:
    """This job's private part of the node cache: staged data, weights, checkpoints, features."""
    return cache_root() / environment.CACHE_JOBS / job.namespace / job.name


def shared_files() -> SharedFiles:
    return SharedFiles(cache_root() / environment.CACHE_SHARED)


@dataclass
class StagedFiles:
    root: Path
    weights: Path | None
    downloaded_bytes: int


def stage_files(
    config: TrainConfig, ctx: DistContext, weights_are_folder: bool = False, checkpoint: str | None = None
) -> StagedFiles:
    """Dataset and base weights on local disk; node leaders download, the others wait.
    `checkpoint` stands for model.checkpoint when the recipe chose the weights (Detectron2's zoo)."""
    cache, shared = job_cache(config.job), shared_files()
    data_store = open_store(config.data.source, config.storage)
    report = distributed.leader_first(ctx, lambda: stage(data_store, cache, shared))
    downloaded = report.bytes_downloaded
    uri = checkpoint or config.model.checkpoint
    weights = None
    if uri and uri != "none":
        model = config.model
        wanted = Weights(uri, model.family, model.variant, model.checkpoint_sha256, weights_are_folder)
        weights, got = distributed.leader_first(
            ctx, lambda: fetch_weights(wanted, config.storage, cache / "weights", shared)
        )
        downloaded += got
    return StagedFiles(report.root, weights, downloaded if ctx.is_local_leader else 0)
