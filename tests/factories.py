"""Trainer configs and FineTuneJob manifests for tests: the one place that knows their shape, so
each test states only what differs from a CPU-sized default."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from kubetune_trainer.config import DataSpec, TrainConfig
from kubetune_trainer.datasets.checks import check_split, require_usable
from kubetune_trainer.datasets.readers import Sample, SplitReport, read_split

ROOT = Path(__file__).resolve().parents[1]
TINY_MODELS: dict[str, dict[str, Any]] = {
    "sam2": {"family": "sam2", "variant": "sam2.1_hiera_tiny", "imageSize": 64},
    "sam": {"family": "sam", "variant": "vit-base", "imageSize": 64},
    "detectron2": {"family": "detectron2", "checkpoint": "none"},  # not the zoo's weights: tests are offline
}


def merged(base: dict[str, Any], changes: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of `base` with `changes` merged in, nested dicts key by key; a None value drops its key."""
    out = copy.deepcopy(base)
    for key, value in (changes or {}).items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def train_config(
    root: Path | None = None,
    *,
    family: str = "sam2",
    model: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    defaults: bool = True,
    **training: Any,
) -> TrainConfig:
    """What the trainer reads: the family's tiny model at 64 px, a COCO train split under `root`
    (none: a placeholder), three fp32 steps of two images; `training` keys as in the spec."""
    raw = {
        "model": TINY_MODELS[family],
        "data": {
            "source": f"file://{root}/" if root else "file:///unused/",
            "format": "coco",
            "train": "train/annotations.json",
            "numWorkers": 0,
        },
        "training": {"maxSteps": 3, "batchSize": 2, "precision": "fp32", "optimizer": {"lr": 1e-3}},
        "output": {"uri": "file:///unused-output/"},
    }
    changes = {"model": model or {}, "data": data or {}, "training": training}
    config = TrainConfig.model_validate(merged(raw, changes))
    return config.with_defaults() if defaults else config


def job_manifest(
    source: str,
    output: str,
    endpoint: str | None = None,
    *,
    name: str = "e2e",
    model: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    outputs: dict[str, Any] | None = None,
    **training: Any,
) -> dict[str, Any]:
    """A FineTuneJob for CPU runs: SAM2 tiny at 64 px on a COCO set with a validation split, six
    steps, evaluation and a checkpoint every three. `model` with another family starts from that
    family's tiny model (random weights, for detectron2)."""
    family = (model or {}).get("family", "sam2")
    spec = {
        "model": merged(TINY_MODELS.get(family, {}), model),
        "data": merged(
            {
                "source": source,
                "format": "coco",
                "train": "train/annotations.json",
                "validation": "val/annotations.json",
                "numWorkers": 0,
            },
            data,
        ),
        "training": merged(
            {"maxSteps": 6, "batchSize": 2, "precision": "fp32", "evalEvery": 3, "optimizer": {"lr": 1e-3}}, training
        ),
        "storage": {"endpoint": endpoint, "region": "us-east-1"},
        "output": merged({"uri": output, "checkpointEvery": 3, "keepLast": 2}, outputs),
    }
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "tests"},
        "spec": spec,
    }


def on_fixed_set(spec: dict[str, Any]) -> dict[str, Any]:
    """Evaluate on the training images with exact boxes and one mask per prompt, no checkpoints."""
    spec["spec"]["model"].update(multimask=False)
    spec["spec"]["data"].update(validation="train/annotations.json", prompts={"type": "box", "perturbation": 0})
    spec["spec"]["output"]["checkpointEvery"] = None
    return spec


def example_job(name: str | None = None, namespace: str | None = None, **spec: Any) -> dict[str, Any]:
    """examples/finetunejob.yaml (the canonical example), with spec sections replaced by `spec`."""
    raw = yaml.safe_load((ROOT / "examples" / "finetunejob.yaml").read_text())
    if name is not None:
        raw["metadata"]["name"] = name
    if namespace is not None:
        raw["metadata"]["namespace"] = namespace
    raw["spec"].update(spec)
    return raw


def credentials_secret(namespace: str, name: str = "s3-credentials", *, marked: bool = True) -> dict[str, Any]:
    """A Secret with S3 keys; ``marked`` adds the label a namespace admin sets to let kubetune jobs use it."""
    labels = {"kubetune.dev/credentials": "true"} if marked else {}
    meta = {"name": name, "namespace": namespace, "labels": labels}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "data": {"AWS_ACCESS_KEY_ID": "eA=="}}


def data_spec(fmt: str, train: str, validation: str | None = None, **fields: Any) -> DataSpec:
    """A `data` section for reading a dataset in place (`source` is not used by the readers)."""
    spec = {"source": "file:///dataset/", "format": fmt, "train": train, "validation": validation, **fields}
    return DataSpec.model_validate(spec)


def read(fmt: str, root: Path, split: str, scratch: Path | None = None, **fields: Any) -> SplitReport:
    """What the readers find in `split` (read as the training split) of a dataset at `root`."""
    return read_split(data_spec(fmt, split, **fields), root, "train", scratch)


def usable(fmt: str, root: Path, split: str, scratch: Path | None = None, **fields: Any) -> list[Sample]:
    """The samples the trainer would train on (decoded and checked, as `load_split` does)."""
    return require_usable(check_split(read(fmt, root, split, scratch, **fields))).samples
