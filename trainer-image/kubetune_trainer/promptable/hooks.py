"""What runs around the loop: evaluation with early stopping, checkpoints, metric writers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from kubetune_trainer.config import EarlyStoppingSpec
from kubetune_trainer.metrics.events import EventWriter
from kubetune_trainer.metrics.report import COLLAPSE_SHARE
from kubetune_trainer.promptable.engine import Hook, Trainer
from kubetune_trainer.reporting.publisher import ReportPublisher
from kubetune_trainer.storage.checkpoints import Checkpointer
from kubetune_trainer.training.early_stopping import EarlyStopping
from kubetune_trainer.training.preemption import Preemption

log = structlog.get_logger(__name__)


class EvalHook(Hook):
    """Evaluate before training (the base model's baseline), every `every` steps and at the end;
    track the best value of the watched metric and stop early (`training.early_stopping`)."""

    def __init__(
        self, every: int | None, evaluate: Callable[[], dict[str, float]], early: EarlyStoppingSpec | None
    ) -> None:
        self.every = every
        self.evaluate = evaluate
        self.early = early
        self.metric = early.metric if early else "miou"
        self.tracker = EarlyStopping(self.metric, early.patience if early else None, early.min_delta if early else 0.0)
        self.baseline: dict[str, float] | None = None  # the base model's result, kept across resumes
        self.history: list[dict[str, float]] = []
        self._last_step = -1

    def _run(self, trainer: Trainer) -> None:
        step = trainer.state.step
        if step == self._last_step:
            return
        self._last_step = step
        result = self.evaluate()
        self.history.append({"step": step, **result})
        trainer.storage.put_prefixed("eval", {k: v for k, v in result.items() if k != "objects"})
        log.info("evaluation", step=step, **{k: round(v, 5) for k, v in result.items() if "/" not in k})
        if result.get("empty_share", 0.0) > COLLAPSE_SHARE:
            log.warning(
                "masks are collapsing: many validation prompts get an empty mask",
                step=step,
                empty_share=round(result["empty_share"], 4),
                target_prob=round(result.get("target_prob", float("nan")), 4),
                threshold=COLLAPSE_SHARE,
            )
        if step == 0 and self.baseline is None:
            self.baseline = result
            self._put_baseline(trainer)
        self.tracker.update(result[self.metric], baseline=step == 0)
        if self.tracker.best is not None:
            trainer.storage.put(**{f"best/{self.metric}": self.tracker.best})
        if self.early and self.tracker.should_stop:
            log.info("early stopping", metric=self.metric, best=self.tracker.best, patience=self.early.patience)
            trainer.state.stopped_early = True

    def _put_baseline(self, trainer: Trainer) -> None:
        trainer.storage.put(**{f"baseline/{self.metric}": self.baseline[self.metric]})

    @property
    def final(self) -> dict[str, float] | None:
        """The last evaluation's result (the fine-tuned model), without its step."""
        return {k: v for k, v in self.history[-1].items() if k != "step"} if self.history else None

    def before_train(self, trainer: Trainer) -> None:
        if trainer.state.step == 0:
            self._run(trainer)
        else:  # a resumed run already has its baseline, saved in the checkpoint
            self._last_step = trainer.state.step
            if self.baseline is not None:
                self._put_baseline(trainer)

    def after_step(self, trainer: Trainer) -> None:
        if self.every and trainer.state.step % self.every == 0:
            self._run(trainer)

    def after_train(self, trainer: Trainer) -> None:
        self._run(trainer)

    def state_dict(self) -> dict[str, Any]:
        t = self.tracker
        return {
            "early_stopping": {
                "best": t.best,
                "evals_without_improvement": t.without_improvement,
                "baseline": self.baseline,
            }
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("early_stopping") or {}
        self.tracker.best = saved.get("best")
        self.tracker.without_improvement = saved.get("evals_without_improvement", 0)
        self.baseline = saved.get("baseline")


class CheckpointHook(Hook):
    """Rank 0 writes a checkpoint every `every` steps and at the end of training.

    `extras` (the metric log) go inside the checkpoint, so a run killed at any moment resumes
    with the history that matches its state; `before_save` lets the step's own row land first."""

    def __init__(
        self,
        checkpointer: Checkpointer,
        *,
        every: int | None,
        is_writer: bool,
        extras: dict[str, Path] | None = None,
        before_save: Callable[[Trainer], None] | None = None,
        on_saved: Callable[[], None] | None = None,
    ) -> None:
        self.checkpointer = checkpointer
        self.extras = extras or {}
        self.before_save = before_save
        self.on_saved = on_saved
        self.every = every
        self.is_writer = is_writer
        self.last_saved: int | None = None
        self.last_uri: str | None = None

    def _save(self, trainer: Trainer) -> None:
        step = trainer.state.step
        if step == self.last_saved:
            return
        self.last_saved = step
        if self.before_save:
            self.before_save(trainer)
        if self.is_writer:
            saved = self.checkpointer.save(step, trainer.state_dict(), self.extras)
            self.last_uri = saved.uri
            trainer.storage.observe("checkpoint_seconds", saved.seconds)
            trainer.storage.inc("s3_bytes/upload", saved.bytes)
            if self.on_saved:
                self.on_saved()
        trainer.storage.put(**{"checkpoint/last_step": step})  # every rank reports it

    def before_train(self, trainer: Trainer) -> None:
        self.last_saved = trainer.state.step  # the checkpoint we resumed from, if any
        if trainer.state.step:
            trainer.storage.put(**{"checkpoint/last_step": trainer.state.step})

    def after_step(self, trainer: Trainer) -> None:
        if self.every and trainer.state.step % self.every == 0:
            self._save(trainer)

    def after_train(self, trainer: Trainer) -> None:
        self._save(trainer)


class PreemptionHook(Hook):
    """After each step (the writer's row in): when any rank got SIGTERM, every rank checkpoints
    this step with `checkpoint` and stops with exit 3."""

    def __init__(self, preemption: Preemption, checkpoint: CheckpointHook) -> None:
        self.preemption = preemption
        self.checkpoint = checkpoint

    def after_step(self, trainer: Trainer) -> None:
        if self.preemption.agreed():
            self.checkpoint._save(trainer)
            raise self.preemption.stop(trainer.state.step, self.checkpoint.last_uri)


class WriterHook(Hook):
    """Flush the event storage to every writer after each step (and once more at the end)."""

    def __init__(self, writers: list[EventWriter]) -> None:
        self.writers = writers

    def flush(self, trainer: Trainer) -> None:
        snap = trainer.storage.drain()
        for writer in self.writers:
            writer.write(snap)

    def before_train(self, trainer: Trainer) -> None:
        self.flush(trainer)

    def after_step(self, trainer: Trainer) -> None:
        self.flush(trainer)

    def after_train(self, trainer: Trainer) -> None:
        self.flush(trainer)
        for writer in self.writers:
            writer.close()


class CollapseWatch(Hook):
    """Warn once when the share of training prompts whose mask is empty, averaged over the last
    `window` steps, passes the threshold (and again after it has recovered and passes it anew)."""

    def __init__(self, window: int = 20, threshold: float = COLLAPSE_SHARE) -> None:
        self.window = window
        self.threshold = threshold
        self.recent: list[float] = []
        self.warned = False

    def after_step(self, trainer: Trainer) -> None:
        value = trainer.storage.scalars.get("train/empty_share")
        if value is None:
            return
        self.recent = [*self.recent[-(self.window - 1) :], value]
        mean = sum(self.recent) / len(self.recent)
        if len(self.recent) == self.window and mean > self.threshold and not self.warned:
            self.warned = True
            log.warning(
                "masks are collapsing: many training prompts get an empty mask",
                step=trainer.state.step,
                empty_share=round(mean, 4),
                target_prob=round(trainer.storage.scalars.get("train/target_prob", float("nan")), 4),
                window=self.window,
                threshold=self.threshold,
            )
        elif mean <= self.threshold:
            self.warned = False


class ReportHook(Hook):
    """After each evaluation, once the writers have its row: the publisher's gallery and
    report.html (rank 0). `state` is what the gallery keeps across resumes (the base masks)."""

    def __init__(self, evaluation: EvalHook, publisher: ReportPublisher, state: Any = None) -> None:
        self.evaluation = evaluation
        self.publisher = publisher
        self.state = state

    def before_train(self, trainer: Trainer) -> None:
        self.publisher.after_evaluation(self.evaluation.history)

    def after_step(self, trainer: Trainer) -> None:
        self.publisher.after_evaluation(self.evaluation.history)

    def after_train(self, trainer: Trainer) -> None:
        self.publisher.after_evaluation(self.evaluation.history)

    def state_dict(self) -> dict[str, Any]:
        return self.state.state_dict() if self.state is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.state is not None:
            self.state.load_state_dict(state)
