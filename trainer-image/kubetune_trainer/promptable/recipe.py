"""Build everything a run needs from a TrainConfig, resume if possible, train, publish results.

Order matters for the "bad input loses nothing" promise: every input (data, weights, output
bucket) is checked before the first byte is written to output.uri.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader

from kubetune_trainer.config import TrainConfig
from kubetune_trainer.datasets.readers import Sample, usable_samples
from kubetune_trainer.errors import DataError
from kubetune_trainer.metrics.events import METRICS_FILE, JsonlWriter, TerminalWriter
from kubetune_trainer.metrics.prometheus import PrometheusWriter
from kubetune_trainer.metrics.report import comparison, markdown
from kubetune_trainer.promptable.data import Preprocess, PromptedMasks, ResumableSampler, collate, shard
from kubetune_trainer.promptable.engine import Trainer
from kubetune_trainer.promptable.evaluation import evaluate
from kubetune_trainer.promptable.feature_cache import FeatureCache, fingerprint
from kubetune_trainer.promptable.hooks import CheckpointHook, EvalHook, WriterHook
from kubetune_trainer.promptable.losses import LOSS_HEADS
from kubetune_trainer.promptable.models.base import Segmenter
from kubetune_trainer.promptable.models.registry import segmenter_for
from kubetune_trainer.promptable.schedules import build_scheduler
from kubetune_trainer.storage.checkpoints import Checkpointer
from kubetune_trainer.storage.stores import ObjectStore, open_store
from kubetune_trainer.training import distributed
from kubetune_trainer.training.distributed import DistContext
from kubetune_trainer.training.inputs import cache_root, stage_files

log = structlog.get_logger(__name__)


@dataclass
class Inputs:
    train: list[Sample]
    validation: list[Sample]
    weights: Path | None
    downloaded_bytes: int


def stage_inputs(config: TrainConfig, ctx: DistContext, weights_are_folder: bool = False) -> Inputs:
    """Staged files, with the dataset read and checked."""
    files = stage_files(config, ctx, weights_are_folder)
    data = config.data
    train = usable_samples(data.format, files.root, data.train)
    val = usable_samples(data.format, files.root, data.validation) if data.validation else []
    return Inputs(train, val, files.weights, files.downloaded_bytes)


def held_by(cache: FeatureCache | None, dataset: PromptedMasks) -> Callable[[int, int], bool] | None:
    """(epoch, index) -> whether the cache holds that item's features, so it need not be decoded."""
    if cache is None:
        return None
    return lambda epoch, index: cache.holds(dataset.cache_key(epoch, index))


def build_loader(
    samples: list[Sample],
    config: TrainConfig,
    ctx: DistContext,
    pre: Preprocess,
    cache: FeatureCache | None = None,
    target_size: int | None = None,
) -> DataLoader:
    """The training batches, their masks at `target_size` (the model's mask logits) when given.
    With a feature cache the sampler flags the images it holds, and the workers do not decode them."""
    cached = config.model.feature_cache != "off"
    dataset = PromptedMasks(
        samples,
        pre,
        config.data.prompts,
        config.training.seed,
        train=True,
        keyed=cached,
        flip=config.data.horizontal_flip,
        target_size=target_size,
    )
    sampler = ResumableSampler(len(samples), ctx.rank, ctx.world_size, config.training.seed, sticky=cached)
    sampler.held = held_by(cache, dataset)
    batches = BatchSampler(sampler, config.training.batch_size, drop_last=True)
    steps = len(batches) // config.training.grad_accumulation
    if steps == 0:
        t = config.training
        raise DataError(
            f"the train split has {len(samples)} usable samples: too few for batchSize {t.batch_size} "
            f"× gradAccumulation {t.grad_accumulation} × {ctx.world_size} processes"
        )
    return DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate,
        num_workers=config.data.num_workers,
        pin_memory=ctx.device.type == "cuda",
        # Workers outlive each epoch's iterator (no re-fork, no cold start at epoch boundaries)
        # and keep four batches each decoded ahead of the step.
        persistent_workers=config.data.num_workers > 0,
        prefetch_factor=4 if config.data.num_workers > 0 else None,
    )


def build_eval_loader(
    samples: list[Sample], config: TrainConfig, ctx: DistContext, pre: Preprocess, cache: FeatureCache | None = None
) -> DataLoader:
    """This rank's share of the validation split, in order; images the cache holds are not decoded."""
    cached = config.model.feature_cache != "off"
    dataset = PromptedMasks(samples, pre, config.data.prompts, config.training.seed, train=False, keyed=cached)

    held = held_by(cache, dataset)

    def item(epoch: int, index: int) -> dict:
        return dataset[(epoch, index, held is not None and held(epoch, index))]

    keys = shard(len(samples), ctx.rank, ctx.world_size)
    return DataLoader(
        keys, batch_size=config.training.batch_size, collate_fn=lambda ks: collate([item(*k) for k in ks])
    )


def build_optimizer(params: list[torch.nn.Parameter], config: TrainConfig, world_size: int) -> torch.optim.Optimizer:
    training = config.training
    opt = training.optimizer
    lr = opt.scaled_lr(opt.lr, training.batch_size * training.grad_accumulation * world_size)
    if opt.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=opt.betas, weight_decay=opt.weight_decay)
    if opt.name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=opt.betas, weight_decay=opt.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=opt.momentum, weight_decay=opt.weight_decay)


def freeze_unused(segmenter: Segmenter, module: torch.nn.Module, config: TrainConfig) -> list[str]:
    """Freeze the heads the loss preset ignores and the prompt embeddings the prompt type never
    feeds: they would get no gradient, and DDP would wait for one forever."""
    kinds = {"box": {"box"}, "points": {"points"}, "box+points": {"box", "points"}}[config.data.prompts.type]
    used = LOSS_HEADS[config.training.loss] | kinds
    frozen = []
    for name, params in segmenter.optional_parts(module).items():
        if name not in used and any(p.requires_grad for p in params):
            for p in params:
                p.requires_grad_(False)
            frozen.append(name)
    return frozen


def run(config: TrainConfig, ctx: DistContext, metrics: PrometheusWriter) -> dict[str, Any]:
    """Train a promptable segmenter (SAM2, SAM)."""
    started = time.time()
    config = config.with_defaults()
    segmenter = segmenter_for(config.model)
    distributed.check_precision(config.training.precision, ctx.device)
    inputs = stage_inputs(config, ctx, segmenter.weights_are_folder)
    output = open_store(config.output.uri, config.storage)
    checkpointer = Checkpointer(output, cache_root(), config.output.keep_last)
    latest = distributed.broadcast_object(checkpointer.latest() if ctx.is_main else None)

    torch.manual_seed(config.training.seed)  # identical random init on every rank and restart
    random.seed(config.training.seed)
    module = segmenter.build(config.model, inputs.weights).to(ctx.device)
    pre = module.pre  # how this model's images are prepared (read from the weights by build)
    frozen = freeze_unused(segmenter, module, config)
    if config.model.gradient_checkpointing:
        segmenter.checkpoint_encoder(module)
    if config.model.feature_cache != "off":
        encoder = getattr(module.sam, module.encoder_name)
        namespace = fingerprint(encoder, pre, config.training.precision)
        module.cache = FeatureCache(config.model.feature_cache, namespace, ctx.device, cache_root())
    model = module
    if ctx.world_size > 1:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # Gradients live in the all-reduce buckets (no copy); with one micro-batch per step the
        # graph is static, which lets DDP skip its search for unused parameters.
        model = DistributedDataParallel(
            module,
            device_ids=ids,
            broadcast_buffers=False,
            gradient_as_bucket_view=True,
            static_graph=config.training.grad_accumulation == 1,
        )
    loader = build_loader(inputs.train, config, ctx, pre, module.cache, module.mask_side(config.model.image_size))
    training = config.training
    per_epoch = len(loader) // training.grad_accumulation
    total = training.max_steps or training.epochs * per_epoch
    optimizer = build_optimizer([p for p in module.parameters() if p.requires_grad], config, ctx.world_size)
    trainer = Trainer(
        model,
        optimizer,
        build_scheduler(optimizer, training.schedule, total),
        loader,
        training,
        total,
        ctx,
        config.model.multimask,
        config.model.multimask_reduction,
    )
    trainer.storage.inc("s3_bytes/download", inputs.downloaded_bytes)
    workdir = Path(tempfile.mkdtemp(prefix="kubetune-run-"))
    metrics_log = workdir / METRICS_FILE
    if latest is not None:
        state = distributed.leader_first(ctx, lambda: checkpointer.load(latest))
        trainer.load_state_dict(state)
        log.info("resumed", step=latest, epoch=trainer.state.epoch, uri=f"{output.uri}checkpoints/step-{latest:08d}/")
        if ctx.is_main:
            checkpointer.fetch_extra(latest, METRICS_FILE, metrics_log)

    eval_hook = None
    if inputs.validation:
        eval_loader = build_eval_loader(inputs.validation, config, ctx, pre, module.cache)
        # Early stopping switched on by a preset (otx) without evalEvery evaluates every epoch.
        every = training.eval_every or (per_epoch if training.early_stopping else None)
        eval_hook = EvalHook(
            every,
            lambda: evaluate(
                module,
                eval_loader,
                ctx,
                training.precision,
                config.model.multimask,
                training.loss,
                config.model.multimask_reduction,
            ),
            training.early_stopping,
        )
        trainer.hooks.append(eval_hook)
    elif training.early_stopping:
        log.warning("early stopping is off: there is no validation split (data.validation)")
    writers = [metrics]
    if ctx.is_main:
        writers += [JsonlWriter(metrics_log), TerminalWriter(total, trainer.state.step)]
    writer_hook = WriterHook(writers)
    # The metric log travels inside each checkpoint, so a resumed run continues one history; a
    # copy at the output root is what users read while the job runs.
    ckpt_hook = CheckpointHook(
        checkpointer,
        config.output.checkpoint_every,
        ctx.is_main,
        extras={METRICS_FILE: metrics_log},
        before_save=writer_hook.flush,
        on_saved=lambda: output.upload(metrics_log, METRICS_FILE),
    )
    trainer.hooks += [ckpt_hook, writer_hook]
    log.info(
        "training",
        family=config.model.family,
        variant=config.model.variant,
        samples=len(inputs.train),
        steps_per_epoch=per_epoch,
        total_steps=total,
        start_step=trainer.state.step,
        precision=training.precision,
        loss=training.loss,
        trainable=config.model.trainable,
        frozen_unused=frozen,
        world_size=ctx.world_size,
        device=str(ctx.device),
    )
    trainer.train()
    final = eval_hook.history[-1] if eval_hook and eval_hook.history else None
    report = {
        "job": config.job.name,
        "family": config.model.family,
        "variant": config.model.variant,
        "steps": trainer.state.step,
        "total_steps": total,
        "epochs": trainer.state.epoch,
        "stopped_early": trainer.state.stopped_early,
        "amp_skipped_steps": trainer.state.skipped_steps,
        "evaluations": eval_hook.history if eval_hook else [],
        "baseline": trainer.state.baseline,
        "final": {k: v for k, v in final.items() if k != "step"} if final else None,
        "comparison": comparison(trainer.state.baseline, final),
        "best": {"metric": eval_hook.metric, "value": trainer.state.best} if eval_hook else None,
        "last_checkpoint": ckpt_hook.last_uri,
        "final_model": None,
        "feature_cache": {"mode": module.cache.mode, "hits": module.cache.hits, "misses": module.cache.misses}
        if module.cache
        else None,
        "wall_seconds": time.time() - started,
    }
    if ctx.is_main:
        _publish(output, segmenter, module, config, report, workdir)
    distributed.barrier()
    return report


def _publish(
    output: ObjectStore, segmenter: Segmenter, module, config: TrainConfig, report: dict, workdir: Path
) -> None:
    """Final weights in the family's native format, the config, the metric log, the report and
    its human-readable summary (the before → after table)."""
    final = workdir / "final"
    final.mkdir()
    name = segmenter.save_native(module, final)
    for path in sorted(p for p in final.rglob("*") if p.is_file()):
        output.upload(path, f"final/{path.relative_to(final).as_posix()}")
    report["final_model"] = f"{output.uri}final/{name}"
    output.put_bytes(config.model_dump_json(by_alias=True, indent=1).encode(), "final/config.json")
    output.upload(workdir / METRICS_FILE, METRICS_FILE)
    output.put_bytes(json.dumps(report, indent=1).encode(), "report.json")
    summary = markdown(report)
    output.put_bytes(summary.encode(), "summary.md")
    log.info("published", model=report["final_model"], report=f"{output.uri}report.json")
    print(summary, flush=True)
