"""What runs around the loop: evaluation with early stopping, checkpoints, metric writers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import structlog

from kubetune_trainer.config import EarlyStoppingSpec
from kubetune_trainer.metrics.events import EventWriter
from kubetune_trainer.promptable.engine import Hook, Trainer
from kubetune_trainer.storage.checkpoints import Checkpointer

log = structlog.get_logger(__name__)


class EvalHook(Hook):
    """Evaluate before training (the base model's baseline), every `every` steps and at the end;
    track the best value."""

    def __init__(
        self, every: int | None, evaluate: Callable[[], dict[str, float]], early: EarlyStoppingSpec | None
    ) -> None:
        self.every = every
        self.evaluate = evaluate
        self.early = early
        self.metric = early.metric if early else "miou"
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
        log.info("evaluation", step=step, **{k: round(v, 5) for k, v in result.items()})
        if step == 0 and trainer.state.baseline is None:
            trainer.state.baseline = result
            self._put_baseline(trainer)
        self._track(trainer, result[self.metric])

    def _track(self, trainer: Trainer, value: float) -> None:
        state = trainer.state
        lower_is_better = self.metric == "loss"
        margin = self.early.min_delta if self.early else 0.0
        improved = state.best is None or (
            value < state.best - margin if lower_is_better else value > state.best + margin
        )
        if improved:
            state.best = value
            state.evals_without_improvement = 0
        elif trainer.state.step > 0:
            state.evals_without_improvement += 1
        trainer.storage.put(**{f"best/{self.metric}": state.best})
        if self.early and state.evals_without_improvement >= self.early.patience:
            log.info("early stopping", metric=self.metric, best=state.best, patience=self.early.patience)
            state.stopped_early = True

    def _put_baseline(self, trainer: Trainer) -> None:
        trainer.storage.put(**{f"baseline/{self.metric}": trainer.state.baseline[self.metric]})

    def before_train(self, trainer: Trainer) -> None:
        if trainer.state.step == 0:
            self._run(trainer)
        else:  # a resumed run already has its baseline, saved in the checkpoint
            self._last_step = trainer.state.step
            if trainer.state.baseline is not None:
                self._put_baseline(trainer)

    def after_step(self, trainer: Trainer) -> None:
        if self.every and trainer.state.step % self.every == 0:
            self._run(trainer)

    def after_train(self, trainer: Trainer) -> None:
        self._run(trainer)


class CheckpointHook(Hook):
    """Rank 0 writes a checkpoint every `every` steps and at the end of training.

    `extras` (the metric log) go inside the checkpoint, so a run killed at any moment resumes
    with the history that matches its state; `before_save` lets the step's own row land first."""

    def __init__(
        self,
        checkpointer: Checkpointer,
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
