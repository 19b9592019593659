"""The edge between kubetune and an installed detectron2: the install check, dataset
registration, the merged config, the model and Detectron2's own trainer for the chosen precision."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import structlog
import torch
from torch import nn

from kubetune_trainer.config import TrainConfig
from kubetune_trainer.d2.datasets import Split, to_records
from kubetune_trainer.d2.plan import ZOO_KEYS, DatasetFacts, Detectron2Plan, plan
from kubetune_trainer.d2.weights import read_checkpoint
from kubetune_trainer.datasets.checks import load_split
from kubetune_trainer.errors import ConfigError, DataError
from kubetune_trainer.training.distributed import AUTOCAST_DTYPES, DistContext

log = structlog.get_logger(__name__)
DETECTRON2_COMMIT = "02b5c4e295e990042a714712c21dc79b731e8833"
INSTALL_HINT = (
    "model.family detectron2 needs detectron2, which is not installed here. It is not on PyPI: the "
    "kubetune trainer image includes it; elsewhere install it from its git source with torch already "
    "present and a C++ compiler, e.g. `uv sync --extra detectron2` in a kubetune checkout, or "
    "`pip install --no-build-isolation 'setuptools<81' "
    f"'git+https://github.com/facebookresearch/detectron2.git@{DETECTRON2_COMMIT}'`"
)
TRAIN, VALIDATION = "kubetune_train", "kubetune_validation"


def require_detectron2() -> None:
    try:
        import detectron2  # noqa: F401
    except ImportError as exc:
        raise ConfigError(INSTALL_HINT) from exc


def read_splits(config: TrainConfig, root: Path, scratch: Path) -> tuple[Split, Split | None]:
    """Read, check and register the train (and validation) split under Detectron2's catalogs,
    through the same readers as every family (images found by one rule, EXIF as data says)."""
    data = config.data
    train_data = load_split(data, root, "train", scratch)
    train = to_records(train_data, train_data.classes)
    val = None
    if data.validation:  # images without objects stay: evaluation counts what is found on them
        val = to_records(load_split(data, root, "validation", scratch, keep_empty=True), train.classes)
    for name, split in ((TRAIN, train), (VALIDATION, val)):
        if split is not None:
            _register(name, split)
    return train, val


def _register(name: str, split: Split) -> None:
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    with contextlib.suppress(KeyError):
        MetadataCatalog.remove(name)
    records = split.records
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(thing_classes=split.classes, evaluator_type="coco")


def build_cfg(
    config: TrainConfig, train: Split, val: Split | None, weights: Path | None, ctx: DistContext, workdir: Path
):
    """The zoo config, then the FineTuneJob's mapping, then model.overrides (`d2_plan`)."""
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(config.model.variant))
    zoo = {key: _get(cfg, key) for key in ZOO_KEYS}
    facts = DatasetFacts(len(train.records), len(train.classes), train.has_rle, val is not None)
    if facts.train_images < ctx.world_size:
        raise DataError(f"the train split has {facts.train_images} images, fewer than the {ctx.world_size} processes")
    job_plan = plan(config, zoo, facts, ctx.world_size, str(weights) if weights else "")
    try:
        cfg.merge_from_list(job_plan.merge_list())
    except (ValueError, KeyError, AssertionError) as exc:
        raise ConfigError(f"model.overrides: {exc}") from exc
    cfg.DATASETS.TRAIN = (TRAIN,)
    cfg.DATASETS.TEST = (VALIDATION,) if val is not None else ()
    cfg.MODEL.DEVICE = ctx.device.type
    cfg.OUTPUT_DIR = str(workdir)
    cfg.freeze()
    return cfg, job_plan


def _get(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def zoo_checkpoint(variant: str) -> str:
    """The model zoo's trained weights for a config, as Detectron2's tutorial starts from them
    (`model_zoo.get_checkpoint_url`), as a detectron2:// URI; "none" when the zoo has none."""
    from detectron2 import model_zoo

    try:
        url = model_zoo.get_checkpoint_url(variant)
    except RuntimeError:
        log.warning("the model zoo has no trained weights for this config", variant=variant)
        return "none"
    prefix = "https://dl.fbaipublicfiles.com/detectron2/"
    uri = "detectron2://" + url.removeprefix(prefix) if url.startswith(prefix) else url
    log.info("base weights: the model zoo's for the config", variant=variant, checkpoint=uri)
    return uri


def load_base_weights(module: nn.Module, path: Path) -> None:
    """Detectron2's checkpointer (name matching, Caffe2 conversion, shape checks) over a file
    read by `d2.weights`: no pickle in it runs code."""
    from detectron2.checkpoint import DetectionCheckpointer

    class SafeCheckpointer(DetectionCheckpointer):
        def _load_file(self, filename: str) -> dict[str, Any]:
            return read_checkpoint(Path(filename))

        def _load_model(self, checkpoint: Any) -> Any:
            """Heads that no longer fit (80 COCO classes against the job's) start fresh: say which."""
            incompatible = super()._load_model(checkpoint)
            log.info(
                "base weights loaded",
                file=path.name,
                reinitialised_for_shape=[key for key, *_ in incompatible.incorrect_shapes],
                missing=list(incompatible.missing_keys),
                unused=len(incompatible.unexpected_keys),
            )
            return incompatible

    SafeCheckpointer(module).load(str(path))


def build_optimizer(cfg: Any, model: nn.Module, job_plan: Detectron2Plan, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD exactly as Detectron2 builds it; AdamW over the same parameter groups and clipping."""
    from detectron2.solver import build_optimizer as d2_build_optimizer
    from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

    if job_plan.optimizer == "sgd":
        return d2_build_optimizer(cfg, model)
    params = get_default_optimizer_params(
        model, base_lr=cfg.SOLVER.BASE_LR, weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM
    )
    adamw = maybe_add_gradient_clipping(cfg, torch.optim.AdamW)
    return adamw(
        params, lr=cfg.SOLVER.BASE_LR, betas=config.training.optimizer.betas, weight_decay=cfg.SOLVER.WEIGHT_DECAY
    )


class Autocast(nn.Module):
    """Runs the wrapped model's forward under autocast: bf16 with Detectron2's SimpleTrainer on
    the CPU, where its AMPTrainer (CUDA only) cannot run."""

    def __init__(self, inner: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner, self.device_type, self.dtype = inner, device.type, dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.inner(*args, **kwargs)


def build_trainer(
    model: nn.Module, loader: Any, optimizer: torch.optim.Optimizer, precision: str, device: torch.device
):
    """fp16: Detectron2's AMPTrainer with a GradScaler; bf16: AMPTrainer without one on a GPU;
    fp32 (and bf16 on the CPU): its SimpleTrainer."""
    from detectron2.engine import AMPTrainer, SimpleTrainer

    if precision == "fp32":
        return SimpleTrainer(model, loader, optimizer)
    if device.type == "cuda":
        scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
        return AMPTrainer(model, loader, optimizer, grad_scaler=scaler, precision=AUTOCAST_DTYPES[precision])
    if precision == "fp16":
        raise ConfigError(
            "training.precision fp16 for detectron2 needs a GPU (Detectron2's AMPTrainer); use bf16 or fp32 on the CPU"
        )
    return SimpleTrainer(Autocast(model, device, torch.bfloat16), loader, optimizer)
