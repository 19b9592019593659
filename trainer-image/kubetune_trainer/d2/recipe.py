"""A Detectron2 fine-tune under torchrun: kubetune's staging, checkpoints, metrics and report
around Detectron2's own model, data pipeline, optimizer, scheduler, trainer and COCOEvaluator.

torchrun has already created the process group (`distributed.init`); Detectron2's communication
helpers use it as is, plus the per-machine group they need. No second launcher.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import hooks as d2_hooks
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, JSONWriter
from detectron2.utils.logger import setup_logger

from kubetune_trainer import logs
from kubetune_trainer.config import TrainConfig
from kubetune_trainer.d2.bridge import RunShape, coco_results
from kubetune_trainer.d2.build import (
    TRAIN,
    VALIDATION,
    build_cfg,
    build_optimizer,
    build_trainer,
    load_base_weights,
    read_splits,
    zoo_checkpoint,
)
from kubetune_trainer.d2.datasets import Split
from kubetune_trainer.d2.hooks import (
    BridgeHook,
    CheckpointHook,
    EarlyStop,
    EvalHook,
    Gallery,
    PreemptionHook,
    Progress,
    ReportHook,
    upload_visualizations,
)
from kubetune_trainer.d2.sampler import ResumableStream
from kubetune_trainer.metrics.events import METRICS_FILE, EventStorage, JsonlWriter
from kubetune_trainer.metrics.prometheus import PrometheusWriter
from kubetune_trainer.metrics.report import BestValue, Report
from kubetune_trainer.reporting.publisher import ReportPublisher
from kubetune_trainer.storage.checkpoints import Checkpointer
from kubetune_trainer.storage.stores import open_store
from kubetune_trainer.training import distributed
from kubetune_trainer.training.distributed import DistContext
from kubetune_trainer.training.inputs import job_cache, stage_files
from kubetune_trainer.training.preemption import Preemption
from kubetune_trainer.training.publishing import publish

log = structlog.get_logger(__name__)
D2_METRICS_FILE = "metrics.json"  # Detectron2's own JSONWriter output, for users who expect it
VISUALIZED_IMAGES = 4


def run(config: TrainConfig, ctx: DistContext, metrics: PrometheusWriter) -> Report:
    started = time.time()
    setup_logger(name="detectron2", distributed_rank=ctx.rank, abbrev_name="d2")
    distributed.check_precision(config.training.precision, ctx.device)
    if ctx.world_size > 1 and comm._LOCAL_PROCESS_GROUP is None:
        comm.create_local_process_group(ctx.local_world_size)
    checkpoint = config.model.checkpoint or zoo_checkpoint(config.model.variant)
    files = stage_files(config, ctx, checkpoint=checkpoint)
    train, val = read_splits(config, files.root, job_cache(config.job) / "extracted")
    output = open_store(config.output.uri, config.storage)
    checkpointer = Checkpointer(output, job_cache(config.job), config.output.keep_last)
    latest = distributed.broadcast_object(checkpointer.newest_usable() if ctx.is_main else None) or 0
    workdir = Path(tempfile.mkdtemp(prefix="kubetune-d2-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)  # whatever way the run ends
    cfg, job_plan = build_cfg(config, train, val, files.weights, ctx, workdir)
    masks = bool(cfg.MODEL.MASK_ON)  # the merged config, overrides included, says what the model predicts
    metric = _early_metric(config, masks)

    torch.manual_seed(config.training.seed)  # identical init everywhere; DDP also broadcasts it
    module = build_model(cfg)
    if files.weights is not None:
        load_base_weights(module, files.weights)
    else:
        log.warning(f"model.checkpoint is {checkpoint}: training from random weights, expect a much slower start")
    model = distributed.wrap_ddp(module, ctx)
    optimizer = build_optimizer(cfg, module, job_plan, config)
    per_rank = job_plan.total_batch // ctx.world_size
    sampler = ResumableStream(len(train.records), ctx.rank, ctx.world_size, config.training.seed, latest * per_rank)
    loader = build_detection_train_loader(cfg, sampler=sampler)
    trainer = build_trainer(model, loader, optimizer, config.training.precision, ctx.device)

    progress = Progress()
    events = EventStorage()
    events.inc("s3_bytes/download", files.downloaded_bytes)
    metrics_log, d2_log = workdir / METRICS_FILE, workdir / D2_METRICS_FILE
    vis_records = (val or train).records[:VISUALIZED_IMAGES]
    vis_metadata = MetadataCatalog.get(VALIDATION if val else TRAIN)

    def state(step: int) -> dict[str, Any]:
        return {"model": module.state_dict(), "trainer": trainer.state_dict(), "step": step}

    def on_saved(step: int) -> None:
        upload_visualizations(output, step, cfg, module, vis_records, vis_metadata)

    # The metric logs travel inside each checkpoint, so a resumed run continues one history.
    metric_logs = {METRICS_FILE: metrics_log, D2_METRICS_FILE: d2_log}
    ckpt_hook = CheckpointHook(
        progress,
        checkpointer,
        period=cfg.SOLVER.CHECKPOINT_PERIOD,
        state=state,
        extras=metric_logs,
        is_writer=ctx.is_main,
        on_saved=on_saved,
        events=events,
    )
    shape = RunShape(job_plan.total_batch, ctx.world_size, len(train.records), job_plan.max_iter)
    writers: list = [metrics] + ([JsonlWriter(metrics_log)] if ctx.is_main else [])
    hook_list = [
        progress,
        d2_hooks.IterationTimer(),
        d2_hooks.LRScheduler(optimizer, build_lr_scheduler(cfg, optimizer)),
    ]
    eval_hook = None
    if val is not None:  # before training (the baseline), every TEST.EVAL_PERIOD and at the end
        evaluate = lambda: _evaluate(cfg, module, masks, workdir, trainer)  # noqa: E731
        eval_hook = EvalHook(
            progress,
            period=cfg.TEST.EVAL_PERIOD,
            evaluate=evaluate,
            metric=metric,
            early=config.training.early_stopping,
        )
        hook_list.append(eval_hook)
    # Metrics are written before the checkpoint, so its copy of the log includes its own step.
    bridge_hook = BridgeHook(progress, shape=shape, writers=writers, device=ctx.device, events=events)
    hook_list += [bridge_hook, ckpt_hook, PreemptionHook(Preemption().install(), ckpt_hook, eval_hook)]
    gallery = Gallery(cfg, val.records[: config.output.gallery_images], vis_metadata) if val else None
    draw = (lambda baseline: gallery.draw(module, baseline)) if gallery and gallery.records else None
    publisher = ReportPublisher(output, config, metrics_log, draw, ctx.is_main)
    if eval_hook is not None:  # after the bridge: the evaluation's row is in the metric log
        hook_list.insert(hook_list.index(bridge_hook) + 1, ReportHook(eval_hook, publisher, gallery))
    if ctx.is_main:
        printers = [CommonMetricPrinter(job_plan.max_iter), JSONWriter(str(d2_log))]
        hook_list.append(d2_hooks.PeriodicWriter(printers, period=20))
    trainer.register_hooks(hook_list)

    if latest:
        saved = distributed.leader_first(ctx, lambda: checkpointer.load(latest))
        module.load_state_dict(saved["model"])
        trainer.load_state_dict(saved["trainer"])
        log.info("resumed", step=latest, uri=f"{output.uri}checkpoints/step-{latest:08d}/")
        if ctx.is_main:
            for path in metric_logs.values():
                checkpointer.fetch_extra(latest, path.name, path)
    log.info(
        "training",
        family="detectron2",
        variant=config.model.variant,
        images=len(train.records),
        classes=train.classes,
        total_batch=job_plan.total_batch,
        max_iter=job_plan.max_iter,
        start_iter=latest,
        base_lr=cfg.SOLVER.BASE_LR,
        precision=config.training.precision,
        world_size=ctx.world_size,
        device=str(ctx.device),
    )
    logs.training_started()
    with contextlib.suppress(EarlyStop):
        trainer.train(latest, job_plan.max_iter)
    report = Report(
        job=config.job.name,
        family="detectron2",
        variant=config.model.variant,
        steps=progress.completed,
        total_steps=job_plan.max_iter,
        epochs=progress.completed * job_plan.total_batch // len(train.records),
        stopped_early=bool(eval_hook and eval_hook.stopped_early),
        amp_skipped_steps=bridge_hook.skipped_steps,
        evaluations=eval_hook.history if eval_hook else [],
        baseline=eval_hook.baseline if eval_hook else None,
        final=eval_hook.final if eval_hook else None,
        best=BestValue(metric=metric, value=eval_hook.tracker.best) if eval_hook else None,
        last_checkpoint=ckpt_hook.last_uri,
        final_model=f"{output.uri}final/model_final.pth",
        classes=train.classes,
        wall_seconds=time.time() - started,
    )
    if ctx.is_main:
        publish(output, write_final(cfg, module, train, workdir), config, report, list(metric_logs.values()))
        publisher.finish(report)
    distributed.barrier()
    return report


def _early_metric(config: TrainConfig, masks: bool) -> str:
    default = "segm_ap" if masks else "bbox_ap"
    early = config.training.early_stopping
    metric = early.metric if early and early.metric else default
    if metric == "segm_ap" and not masks:
        from kubetune_trainer.errors import ConfigError

        raise ConfigError(f"training.earlyStopping.metric segm_ap needs a mask model; {config.model.variant} has none")
    return metric


def _evaluate(cfg: Any, module: torch.nn.Module, masks: bool, workdir: Path, trainer: Any) -> dict[str, float]:
    """COCO bbox (and segm) AP on the validation split, as fractions; rank 0 holds the result."""
    tasks = ("bbox", "segm") if masks else ("bbox",)
    evaluator = COCOEvaluator(
        VALIDATION,
        tasks=tasks,
        distributed=True,
        output_dir=str(workdir / "eval"),
        max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
    )
    results = inference_on_dataset(module, build_detection_test_loader(cfg, VALIDATION), evaluator)
    module.train()
    if not comm.is_main_process():
        return {}
    flat = {f"{task}/{name}": value for task, values in results.items() for name, value in values.items()}
    trainer.storage.put_scalars(**flat, smoothing_hint=False)  # Detectron2's names, for metrics.json
    return coco_results(results, tasks)


def write_final(cfg: Any, module: torch.nn.Module, train: Split, workdir: Path) -> Path:
    """What DefaultPredictor needs (weights + config.yaml) and the class names, in one folder."""
    final = workdir / "final"
    final.mkdir()
    DetectionCheckpointer(module, save_dir=str(final)).save("model_final")
    (final / "last_checkpoint").unlink(missing_ok=True)  # Detectron2's own pointer file, not for users
    predict_cfg = cfg.clone()
    predict_cfg.defrost()
    predict_cfg.MODEL.WEIGHTS = "model_final.pth"  # next to config.yaml once downloaded
    predict_cfg.DATASETS.TRAIN, predict_cfg.DATASETS.TEST = (), ()
    (final / "config.yaml").write_text(predict_cfg.dump())
    (final / "classes.json").write_text(json.dumps(train.classes))
    return final
