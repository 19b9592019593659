"""Evaluation bookkeeping and early stopping, driven by a scripted sequence of metric values."""

from __future__ import annotations

from types import SimpleNamespace

from kubetune_trainer.config import EarlyStoppingSpec
from kubetune_trainer.metrics.events import EventStorage
from kubetune_trainer.promptable.engine import TrainState
from kubetune_trainer.promptable.hooks import EvalHook


def drive(values: list[float], early: EarlyStoppingSpec | None, every: int = 10) -> tuple[EvalHook, SimpleNamespace]:
    results = iter(values)
    hook = EvalHook(every, lambda: {"miou": next(results), "loss": 1.0, "dice": 0.0, "f1": 0.0, "objects": 3}, early)
    trainer = SimpleNamespace(state=TrainState(), storage=EventStorage())
    hook.before_train(trainer)
    while not trainer.state.stopped_early and trainer.state.step < every * (len(values) - 1):
        trainer.state.step += 1
        hook.after_step(trainer)
    return hook, trainer


def test_best_value_and_early_stop_after_patience() -> None:
    hook, trainer = drive([0.1, 0.3, 0.5, 0.45, 0.5, 0.49, 0.9], EarlyStoppingSpec(metric="miou", patience=3))
    assert [h["step"] for h in hook.history] == [0, 10, 20, 30, 40, 50]
    assert hook.tracker.best == 0.5 and trainer.state.stopped_early
    assert trainer.storage.scalars["best/miou"] == 0.5 and trainer.storage.scalars["eval/miou"] == 0.49


def test_min_delta_and_recovery_reset_the_count() -> None:
    spec = EarlyStoppingSpec(metric="miou", patience=2, min_delta=0.05)
    hook, trainer = drive([0.1, 0.12, 0.3, 0.31, 0.5], spec)
    assert not trainer.state.stopped_early and hook.tracker.best == 0.5


def test_without_early_stopping_training_runs_on() -> None:
    hook, trainer = drive([0.5, 0.4, 0.3, 0.2], None)
    assert not trainer.state.stopped_early and len(hook.history) == 4 and hook.tracker.best == 0.5


def test_baseline_is_the_step_zero_evaluation_and_survives_a_resume() -> None:
    hook, trainer = drive([0.1, 0.3, 0.5], None)
    assert hook.baseline["miou"] == 0.1 and hook.history[0]["step"] == 0
    assert trainer.storage.scalars["baseline/miou"] == 0.1
    # A resumed run does not evaluate at its start; the baseline comes back from the checkpoint.
    resumed = SimpleNamespace(state=TrainState(step=20), storage=EventStorage())
    again = EvalHook(10, lambda: {"miou": 0.9}, None)
    again.load_state_dict(hook.state_dict())
    again.before_train(resumed)
    assert again.history == [] and resumed.storage.scalars["baseline/miou"] == 0.1
