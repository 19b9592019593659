"""A promptable segmenter's run (SAM2, SAM), step by step: stage and check the inputs, build the
module and the loop, attach evaluation and recording, resume, train, report and publish.

Order matters for the "bad input loses nothing" promise: every input (data, weights, output
bucket) is checked before the first byte is written to output.uri.
"""

from __future__ import annotations

import atexit
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch
from torch.utils.data import BatchSampler, DataLoader

from kubetune_trainer import logs
from kubetune_trainer.config import TrainConfig
from kubetune_trainer.datasets.checks import load_split
from kubetune_trainer.datasets.files import set_pixel_limit
from kubetune_trainer.datasets.readers import Sample
from kubetune_trainer.errors import DataError
from kubetune_trainer.metrics.events import METRICS_FILE, JsonlWriter, TerminalWriter
from kubetune_trainer.metrics.prometheus import PrometheusWriter
from kubetune_trainer.metrics.report import BestValue, Report
from kubetune_trainer.promptable.data import (
    Preprocess,
    PromptedMasks,
    ResumableBatches,
    ResumableSampler,
    collate,
    shard,
)
from kubetune_trainer.promptable.engine import Trainer
from kubetune_trainer.promptable.evaluation import evaluate
from kubetune_trainer.promptable.feature_cache import FeatureCache, fingerprint
from kubetune_trainer.promptable.gallery import Gallery
from kubetune_trainer.promptable.hooks import (
    CheckpointHook,
    CollapseWatch,
    EvalHook,
    PreemptionHook,
    ReportHook,
    WriterHook,
)
from kubetune_trainer.promptable.losses import LOSS_HEADS, compute_loss
from kubetune_trainer.promptable.models.base import Segmenter
from kubetune_trainer.promptable.models.registry import segmenter_for
from kubetune_trainer.promptable.schedules import build_scheduler
from kubetune_trainer.reporting.publisher import ReportPublisher
from kubetune_trainer.storage.checkpoints import Checkpointer
from kubetune_trainer.storage.stores import ObjectStore, open_store
from kubetune_trainer.training import distributed
from kubetune_trainer.training.distributed import DistContext
from kubetune_trainer.training.inputs import job_cache, stage_files
from kubetune_trainer.training.preemption import Preemption
from kubetune_trainer.training.publishing import publish

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
    scratch = job_cache(config.job) / "extracted"
    set_pixel_limit(config.model.image_size)
    train = load_split(data, files.root, "train", scratch).samples
    val = load_split(data, files.root, "validation", scratch).samples if data.validation else []
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
        seed=config.training.seed,
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
    dataset = PromptedMasks(samples, pre, config.data.prompts, seed=config.training.seed, train=False, keyed=cached)

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


def build_module(segmenter: Segmenter, config: TrainConfig, weights: Path | None, ctx: DistContext):
    """The family's module on the device: base weights, trainable parts, the heads and prompt
    embeddings the run never reaches frozen, recomputed encoder blocks, the feature cache."""
    torch.manual_seed(config.training.seed)  # identical random init on every rank and restart
    random.seed(config.training.seed)
    module = segmenter.build(config.model, weights).to(ctx.device)
    frozen = freeze_unused(segmenter, module, config)
    if config.model.gradient_checkpointing:
        segmenter.checkpoint_encoder(module)
    if config.model.feature_cache != "off":
        encoder = getattr(module.sam, module.encoder_name)
        namespace = fingerprint(encoder, module.pre, config.training.precision)
        module.cache = FeatureCache(config.model.feature_cache, namespace, ctx.device, job_cache(config.job))
    return module, frozen


def build_trainer(module, loader: DataLoader, config: TrainConfig, ctx: DistContext, total_steps: int) -> Trainer:
    """The loop for a promptable module: DDP in a world of several, the optimizer and schedule,
    the forward with the spec's multimask output and the loss preset."""
    training, spec = config.training, config.model
    optimizer = build_optimizer([p for p in module.parameters() if p.requires_grad], config, ctx.world_size)
    return Trainer(
        model=distributed.wrap_ddp(module, ctx, static_graph=training.grad_accumulation == 1),
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, training.schedule, total_steps),
        batches=ResumableBatches(loader),
        spec=training,
        total_steps=total_steps,
        ctx=ctx,
        forward=lambda model, batch: model(batch, spec.multimask),
        loss=lambda preds, batch: compute_loss(preds, batch.masks, training.loss, spec.multimask_reduction),
    )


def add_evaluation(trainer: Trainer, module, samples: list[Sample], config: TrainConfig, ctx: DistContext):
    """Validation before, during and after training, with early stopping; None without a split."""
    training = config.training
    if not samples:
        if training.early_stopping:
            log.warning("early stopping is off: there is no validation split (data.validation)")
        return None
    loader = build_eval_loader(samples, config, ctx, module.pre, module.cache)
    # Early stopping switched on by a preset (otx) without evalEvery evaluates every epoch.
    every = training.eval_every or (
        len(trainer.batches) // training.grad_accumulation if training.early_stopping else None
    )
    model = config.model
    hook = EvalHook(
        every,
        lambda: evaluate(
            module, loader, ctx, training.precision, model.multimask, training.loss, model.multimask_reduction
        ),
        training.early_stopping,
    )
    trainer.hooks.append(hook)
    return hook


def add_report(
    trainer: Trainer,
    evaluation: EvalHook | None,
    module,
    samples: list[Sample],
    config: TrainConfig,
    ctx: DistContext,
    output: ObjectStore,
    metrics_log: Path,
) -> ReportPublisher:
    """The collapse watch on every rank; on rank 0, after each evaluation, the gallery (the base
    model's masks at the baseline, the model's at each later evaluation) and report.html under
    output.uri. Returns the publisher, which writes the finished page."""
    trainer.hooks.append(CollapseWatch())
    model, training = config.model, config.training
    dataset = PromptedMasks(samples, module.pre, config.data.prompts, seed=training.seed, train=False)
    gallery = (
        Gallery(samples, dataset, config.output.gallery_images) if samples and config.output.gallery_images else None
    )

    def draw(baseline: bool) -> list[tuple[str, bytes]]:
        assert gallery is not None
        return gallery.draw(
            module, model.multimask, model.multimask_reduction, training.precision, ctx.device, baseline=baseline
        )

    publisher = ReportPublisher(output, config, metrics_log, draw if gallery else None, ctx.is_main)
    if evaluation is not None:
        trainer.hooks.append(ReportHook(evaluation, publisher, gallery))
    return publisher


def add_recording(
    trainer: Trainer,
    checkpointer: Checkpointer,
    output: ObjectStore,
    config: TrainConfig,
    ctx: DistContext,
    metrics: PrometheusWriter,
    metrics_log: Path,
) -> CheckpointHook:
    """Checkpoints and metric writers. The metric log travels inside each checkpoint, so a resumed
    run continues one history; a copy at the output root is what users read while the job runs."""
    writers = [metrics]
    if ctx.is_main:
        writers += [JsonlWriter(metrics_log), TerminalWriter(trainer.total_steps)]
    writer_hook = WriterHook(writers)
    ckpt_hook = CheckpointHook(
        checkpointer,
        every=config.output.checkpoint_every,
        is_writer=ctx.is_main,
        extras={METRICS_FILE: metrics_log},
        before_save=writer_hook.flush,
        on_saved=lambda: output.upload(metrics_log, METRICS_FILE),
    )
    trainer.hooks += [ckpt_hook, writer_hook]
    return ckpt_hook


def resume(trainer: Trainer, checkpointer: Checkpointer, step: int, ctx: DistContext, metrics_log: Path) -> None:
    """Load the newest complete checkpoint (hooks included) and its metric log."""
    state = distributed.leader_first(ctx, lambda: checkpointer.load(step))
    trainer.load_state_dict(state)
    log.info("resumed", step=step, epoch=trainer.batches.epoch, uri=checkpointer.uri(step))
    if ctx.is_main:
        checkpointer.fetch_extra(step, METRICS_FILE, metrics_log)


def run(config: TrainConfig, ctx: DistContext, metrics: PrometheusWriter) -> Report:
    """Train a promptable segmenter (SAM2, SAM): every input is checked before the first write."""
    started = time.time()
    config = config.with_defaults()
    segmenter = segmenter_for(config.model)
    distributed.check_precision(config.training.precision, ctx.device)
    inputs = stage_inputs(config, ctx, segmenter.weights_are_folder)
    output = open_store(config.output.uri, config.storage)
    checkpointer = Checkpointer(output, job_cache(config.job), config.output.keep_last)
    latest = distributed.broadcast_object(checkpointer.newest_usable() if ctx.is_main else None)

    module, frozen = build_module(segmenter, config, inputs.weights, ctx)
    loader = build_loader(
        inputs.train, config, ctx, module.pre, module.cache, module.mask_side(config.model.image_size)
    )
    training = config.training
    total = training.max_steps or training.epochs * (len(loader) // training.grad_accumulation)
    trainer = build_trainer(module, loader, config, ctx, total)
    trainer.storage.inc("s3_bytes/download", inputs.downloaded_bytes)
    workdir = Path(tempfile.mkdtemp(prefix="kubetune-run-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)  # whatever way the run ends
    metrics_log = workdir / METRICS_FILE
    eval_hook = add_evaluation(trainer, module, inputs.validation, config, ctx)
    ckpt_hook = add_recording(trainer, checkpointer, output, config, ctx, metrics, metrics_log)
    publisher = add_report(trainer, eval_hook, module, inputs.validation, config, ctx, output, metrics_log)
    trainer.hooks.append(PreemptionHook(Preemption().install(), ckpt_hook))  # last: the step's row is in
    if latest is not None:
        resume(trainer, checkpointer, latest, ctx, metrics_log)
    log.info(
        "training",
        family=config.model.family,
        variant=config.model.variant,
        samples=len(inputs.train),
        steps_per_epoch=len(loader) // training.grad_accumulation,
        total_steps=total,
        start_step=trainer.state.step,
        precision=training.precision,
        loss=training.loss,
        trainable=config.model.trainable,
        frozen_unused=frozen,
        world_size=ctx.world_size,
        device=str(ctx.device),
    )
    logs.training_started()
    trainer.train()
    report = Report(
        job=config.job.name,
        family=config.model.family,
        variant=config.model.variant,
        steps=trainer.state.step,
        total_steps=total,
        epochs=trainer.batches.epoch,
        stopped_early=trainer.state.stopped_early,
        amp_skipped_steps=trainer.state.skipped_steps,
        evaluations=eval_hook.history if eval_hook else [],
        baseline=eval_hook.baseline if eval_hook else None,
        final=eval_hook.final if eval_hook else None,
        best=BestValue(metric=eval_hook.metric, value=eval_hook.tracker.best) if eval_hook else None,
        last_checkpoint=ckpt_hook.last_uri,
        final_model=f"{output.uri}final/{segmenter.native_name}",
        feature_cache={"mode": module.cache.mode, "hits": module.cache.hits, "misses": module.cache.misses}
        if module.cache
        else None,
        wall_seconds=time.time() - started,
    )
    if ctx.is_main:
        final = workdir / "final"
        final.mkdir()
        segmenter.save_native(module, final)
        publish(output, final, config, report, [metrics_log])
        publisher.finish(report)
    distributed.barrier()
    return report
