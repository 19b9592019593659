"""Detectron2 hooks that give a Detectron2 job kubetune's behaviour: atomic S3 checkpoints with
resume, COCO evaluation with best tracking and early stopping, Visualizer images, and the
Prometheus/metrics.jsonl names every job exports (through `bridge`)."""

from __future__ import annotations

import math
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import torch
from detectron2.engine import HookBase

from kubetune_trainer.config import EarlyStoppingSpec
from kubetune_trainer.d2.bridge import RunShape, bridge
from kubetune_trainer.metrics.events import EventStorage, EventWriter
from kubetune_trainer.reporting.publisher import ReportPublisher, png
from kubetune_trainer.storage.checkpoints import Checkpointer
from kubetune_trainer.storage.stores import ObjectStore
from kubetune_trainer.training import distributed
from kubetune_trainer.training.early_stopping import EarlyStopping
from kubetune_trainer.training.preemption import Preemption

log = structlog.get_logger(__name__)


def unwinding() -> bool:
    """Whether Detectron2 runs its after_train hooks because training raised. Then no hook may
    enter a collective (a checkpoint barrier, the final evaluation): the other ranks are in a
    different one, or gone, and the job would hang instead of ending. An early stop (a
    BaseException every rank raises together) is not a failure."""
    return isinstance(sys.exc_info()[1], Exception)


class EarlyStop(BaseException):  # noqa: N818 — not an error: Detectron2's loop must not log it as one
    """Raised from after_step to end Detectron2's loop (which has no stop flag); its after_train
    hooks still run."""


class Progress(HookBase):
    """Completed iterations, known to every later hook (Detectron2's `iter` is 0-based and is
    only advanced past the last iteration when the loop ends normally)."""

    def __init__(self) -> None:
        self.completed = 0

    def before_train(self) -> None:
        self.completed = self.trainer.start_iter

    def after_step(self) -> None:
        self.completed = self.trainer.iter + 1


class CheckpointHook(HookBase):
    """Rank 0 writes model + trainer state (iteration, optimizer, scheduler, scaler, data position)
    every `period` iterations and at the end, with the same manifest scheme as SAM2 jobs."""

    def __init__(
        self,
        progress: Progress,
        checkpointer: Checkpointer,
        *,
        period: int,
        state: Callable[[int], dict[str, Any]],
        extras: dict[str, Path],
        is_writer: bool,
        on_saved: Callable[[int], None],
        events: EventStorage,
    ) -> None:
        self.progress, self.checkpointer, self.period = progress, checkpointer, period
        self.state, self.extras, self.is_writer = state, extras, is_writer
        self.on_saved, self.events = on_saved, events
        self.last_saved = -1
        self.last_uri: str | None = None

    def before_train(self) -> None:
        self.last_saved = self.trainer.start_iter
        if self.last_saved:
            self.trainer.storage.put_scalar("checkpoint/last_step", self.last_saved, smoothing_hint=False)

    def _save(self) -> None:
        step = self.progress.completed
        if step == self.last_saved or step == 0:
            return
        self.last_saved = step
        if self.is_writer:
            saved = self.checkpointer.save(step, self.state(step), self.extras)
            self.last_uri = saved.uri
            self.events.observe("checkpoint_seconds", saved.seconds)
            self.events.inc("s3_bytes/upload", saved.bytes)
            self.on_saved(step)
        self.trainer.storage.put_scalar("checkpoint/last_step", step, smoothing_hint=False)
        distributed.barrier()

    def after_step(self) -> None:
        if self.progress.completed % self.period == 0:
            self._save()

    def after_train(self) -> None:
        if not unwinding():
            self._save()


class EvalHook(HookBase):
    """COCO AP on the validation split before training (the base model's baseline), every
    `period` iterations and at the end, on every rank (inference is sharded, the result
    broadcast); tracks the best value and stops early, as `training.early_stopping` says."""

    def __init__(
        self,
        progress: Progress,
        *,
        period: int,
        evaluate: Callable[[], dict[str, float]],
        metric: str,
        early: EarlyStoppingSpec | None,
    ) -> None:
        self.progress, self.period, self.evaluate = progress, period, evaluate
        self.metric, self.early = metric, early
        self.tracker = EarlyStopping(metric, early.patience if early else None, early.min_delta if early else 0.0)
        self.baseline: dict[str, float] | None = None
        self.history: list[dict[str, float]] = []
        self.stopped_early = False
        self._last = -1

    def state_dict(self) -> dict[str, Any]:
        t = self.tracker
        return {"best": t.best, "bad_evals": t.without_improvement, "history": self.history, "baseline": self.baseline}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracker.best, self.tracker.without_improvement = state["best"], state["bad_evals"]
        self.history, self.baseline = list(state["history"]), state.get("baseline")

    @property
    def final(self) -> dict[str, float] | None:
        return {k: v for k, v in self.history[-1].items() if k != "step"} if self.history else None

    def _run(self) -> None:
        step = self.progress.completed
        if step == self._last:
            return
        self._last = step
        result = distributed.broadcast_object(self.evaluate())
        self.history.append({"step": step, **result})
        storage = self.trainer.storage
        storage.put_scalars(**{f"eval/{k}": v for k, v in result.items()}, smoothing_hint=False)
        log.info("evaluation", step=step, **{k: round(v, 5) for k, v in result.items()})
        if step == 0 and self.baseline is None:
            self.baseline = result
        self._put_baseline()
        self.tracker.update(result.get(self.metric, math.nan), baseline=step == 0)
        if self.tracker.best is not None:
            storage.put_scalar(f"best/{self.metric}", self.tracker.best, smoothing_hint=False)
        if self.early and self.tracker.should_stop and not self.stopped_early:
            log.info("early stopping", metric=self.metric, best=self.tracker.best, patience=self.early.patience)
            self.stopped_early = True
            raise EarlyStop

    def _put_baseline(self) -> None:
        value = (self.baseline or {}).get(self.metric)
        if value is not None and not math.isnan(value):
            self.trainer.storage.put_scalar(f"baseline/{self.metric}", value, smoothing_hint=False)

    def before_train(self) -> None:
        if self.trainer.start_iter == 0:
            self._run()
        else:  # a resumed run has its baseline from the checkpoint
            self._last = self.trainer.start_iter
            self._put_baseline()

    def after_step(self) -> None:
        if (
            self.period
            and self.progress.completed % self.period == 0
            and self.progress.completed < self.trainer.max_iter
        ):
            self._run()

    def after_train(self) -> None:
        if not self.stopped_early and not unwinding():
            self._run()


class PreemptionHook(HookBase):
    """After each iteration (metrics and checkpoint hooks done): when any rank got SIGTERM, every
    rank checkpoints this iteration and stops with exit 3, skipping the final evaluation."""

    def __init__(self, preemption: Preemption, checkpoint: CheckpointHook, evaluation: EvalHook | None) -> None:
        self.preemption, self.checkpoint, self.evaluation = preemption, checkpoint, evaluation

    def after_step(self) -> None:
        if self.preemption.agreed():
            self.checkpoint._save()
            if self.evaluation is not None:
                self.evaluation.stopped_early = True  # Detectron2 runs after_train hooks on the way out
            raise self.preemption.stop(self.checkpoint.progress.completed, self.checkpoint.last_uri)


class BridgeHook(HookBase):
    """After every iteration: Detectron2's latest scalars, plus what kubetune's hooks recorded in
    `events` (checkpoint times, S3 bytes, skipped fp16 steps), → kubetune's writers."""

    def __init__(
        self,
        progress: Progress,
        *,
        shape: RunShape,
        writers: list[EventWriter],
        device: torch.device,
        events: EventStorage,
    ) -> None:
        self.progress, self.shape, self.writers, self.device, self.events = progress, shape, writers, device, events
        self.scale: float | None = None
        self.skipped_steps = 0  # fp16 steps the GradScaler skipped, whole run (kept in checkpoints)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = state["skipped_steps"]

    def _flush(self, iteration: int, final: bool = False) -> None:
        storage = self.trainer.storage
        scaler = getattr(self.trainer, "grad_scaler", None)
        if scaler is not None and scaler.is_enabled():
            scale = scaler.get_scale()
            if self.scale is not None and scale < self.scale:
                self.skipped_steps += 1
                self.events.inc("amp/skipped_steps")
            self.scale = scale
            storage.put_scalar("amp/grad_scale", scale, smoothing_hint=False)
        for kind, value in distributed.gpu_memory(self.device).items():
            storage.put_scalar(f"gpu_memory/{kind}", value, smoothing_hint=False)
        snap = bridge(storage.latest(), iteration, self.shape)
        if final:  # the last iteration was already counted; only what came after it is new
            snap.observations, snap.increments = {}, {}
        extra = self.events.drain()
        for key, values in extra.observations.items():
            snap.observations.setdefault(key, []).extend(values)
        for key, amount in extra.increments.items():
            snap.increments[key] = snap.increments.get(key, 0.0) + amount
        for writer in self.writers:
            writer.write(snap)

    def after_step(self) -> None:
        self._flush(self.trainer.iter)

    def after_train(self) -> None:
        if not unwinding():
            self._flush(self.progress.completed - 1, final=True)
        for writer in self.writers:
            writer.close()


class ReportHook(HookBase):
    """After each evaluation, once the bridge has written its row: the publisher's gallery and
    report.html (rank 0). `state` is what the gallery keeps across resumes (the base panels)."""

    def __init__(self, evaluation: EvalHook, publisher: ReportPublisher, state: Any = None) -> None:
        self.evaluation = evaluation
        self.publisher = publisher
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state.state_dict() if self.state is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.state is not None:
            self.state.load_state_dict(state)

    def _after_evaluation(self) -> None:
        if not unwinding():
            self.publisher.after_evaluation(self.evaluation.history)

    def before_train(self) -> None:
        self._after_evaluation()

    def after_step(self) -> None:
        self._after_evaluation()

    def after_train(self) -> None:
        self._after_evaluation()


class Gallery:
    """Detectron2's Visualizer on fixed validation images: the ground truth, the base model's
    predictions (drawn at the baseline evaluation and kept, in checkpoints too) and the model's
    at each later evaluation, side by side, one PNG row per image."""

    def __init__(self, cfg: Any, records: list[dict], metadata: Any) -> None:
        self.cfg, self.records, self.metadata = cfg, records, metadata
        self.base: dict[int, bytes] = {}  # record index -> the base model's panel (PNG)

    def draw(self, model: torch.nn.Module, baseline: bool) -> list[tuple[str, bytes]]:
        import io

        import numpy as np
        from detectron2.utils.visualizer import Visualizer
        from PIL import Image, ImageDraw, ImageFont

        font = ImageFont.load_default(size=15)
        rows = []
        for index, (record, predicted) in enumerate(
            zip(self.records, predict(self.cfg, model, self.records), strict=True)
        ):
            rgb = np.asarray(Image.open(record["file_name"]).convert("RGB"))
            truth = Visualizer(rgb, self.metadata).draw_dataset_dict(record).get_image()
            drawn = Visualizer(rgb, self.metadata).draw_instance_predictions(predicted).get_image()
            if baseline:
                self.base[index] = png(Image.fromarray(drawn))
            # A run resumed from a checkpoint without the base model's panels has none to show.
            dimmed = Image.fromarray(rgb // 3)
            base = Image.open(io.BytesIO(self.base[index])).convert("RGB") if index in self.base else dimmed
            after = Image.fromarray(drawn) if not baseline else dimmed
            panels = [Image.fromarray(truth), base, after]
            scale = 360 / max(rgb.shape[:2])
            panels = [p.resize((max(1, round(p.width * scale)), max(1, round(p.height * scale)))) for p in panels]
            row = Image.new("RGB", (sum(p.width for p in panels) + 12, panels[0].height + 22), (255, 255, 255))
            draw, x = ImageDraw.Draw(row), 0
            titles = (
                "ground truth",
                "base model",
                "fine-tuned" if not baseline else "fine-tuned (drawn after training)",
            )
            for panel, title in zip(panels, titles, strict=True):
                draw.text((x + 2, 2), title, fill=(0, 0, 0), font=font)
                row.paste(panel, (x, 22))
                x += panel.width + 6
            rows.append((f"{index:05d}.png", png(row)))
        return rows

    def state_dict(self) -> dict[str, Any]:
        return {"gallery_base": {str(k): v for k, v in self.base.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base = {int(k): v for k, v in (state.get("gallery_base") or {}).items()}


def predict(cfg: Any, model: torch.nn.Module, records: list[dict]) -> list[Any]:
    """The model's Instances (on the CPU) for each record, in inference mode."""
    from detectron2.data import DatasetMapper

    mapper = DatasetMapper(cfg, is_train=False)
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for record in records:
            out.append(model([mapper(dict(record))])[0]["instances"].to("cpu"))
    model.train(was_training)
    return out


def draw_predictions(cfg: Any, model: torch.nn.Module, records: list[dict], metadata: Any, out: Path) -> list[Path]:
    """Detectron2's Visualizer over the model's predictions for a few images."""
    import numpy as np
    from detectron2.utils.visualizer import Visualizer
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for record, instances in zip(records, predict(cfg, model, records), strict=True):
        rgb = np.asarray(Image.open(record["file_name"]).convert("RGB"))
        drawn = Visualizer(rgb, metadata).draw_instance_predictions(instances).get_image()
        path = out / f"{Path(record['file_name']).stem}.png"
        Image.fromarray(drawn).save(path)
        paths.append(path)
    return paths


def upload_visualizations(
    output: ObjectStore, step: int, cfg: Any, model: torch.nn.Module, records: list[dict], metadata: Any
) -> None:
    with tempfile.TemporaryDirectory(prefix="kubetune-vis-") as tmp:
        for path in draw_predictions(cfg, model, records, metadata, Path(tmp)):
            output.upload(path, f"checkpoints/step-{step:08d}/visualizations/{path.name}")
