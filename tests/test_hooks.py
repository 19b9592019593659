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
    assert trainer.state.best == 0.5 and trainer.state.stopped_early
    assert trainer.storage.scalars["best/miou"] == 0.5 and trainer.storage.scalars["eval/miou"] == 0.49


def test_min_delta_and_recovery_reset_the_count() -> None:
    spec = EarlyStoppingSpec(metric="miou", patience=2, min_delta=0.05)
    _, trainer = drive([0.1, 0.12, 0.3, 0.31, 0.5], spec)
    assert not trainer.state.stopped_early and trainer.state.best == 0.5


def test_without_early_stopping_training_runs_on() -> None:
    hook, trainer = drive([0.5, 0.4, 0.3, 0.2], None)
    assert not trainer.state.stopped_early and len(hook.history) == 4 and trainer.state.best == 0.5


def test_baseline_is_the_step_zero_evaluation_and_survives_a_resume() -> None:
    hook, trainer = drive([0.1, 0.3, 0.5], None)
    assert trainer.state.baseline["miou"] == 0.1 and hook.history[0]["step"] == 0
    assert trainer.storage.scalars["baseline/miou"] == 0.1
    # A resumed run does not evaluate at its start; the baseline comes back from the checkpoint.
    resumed = SimpleNamespace(state=TrainState(step=20, baseline=trainer.state.baseline), storage=EventStorage())
    again = EvalHook(10, lambda: {"miou": 0.9}, None)
    again.before_train(resumed)
    assert again.history == [] and resumed.storage.scalars["baseline/miou"] == 0.1


def test_summary_table_compares_base_and_fine_tuned() -> None:
    from kubetune_trainer.metrics.report import comparison, markdown

    before = {"f1": 0.2, "dice": 0.25, "miou": 0.15, "loss": 2.0}
    after = {"f1": 0.6, "dice": 0.55, "miou": 0.4, "loss": 0.5}
    rows = comparison(before, after)
    assert [(r["metric"], round(r["change"], 4)) for r in rows] == [("f1", 0.4), ("dice", 0.3), ("miou", 0.25)]
    report = {
        "job": "j",
        "family": "sam",
        "variant": "vit-base",
        "steps": 10,
        "total_steps": 10,
        "epochs": 2,
        "stopped_early": False,
        "wall_seconds": 3.0,
        "comparison": rows,
        "best": {"metric": "f1", "value": 0.6},
        "final_model": "s3://b/final/model/",
    }
    text = markdown(report)
    assert "| F1 | 0.2000 | 0.6000 | +0.4000 |" in text and "| mIoU | 0.1500 | 0.4000 | +0.2500 |" in text
    assert comparison(None, after) == [] and "no before → after comparison" in markdown({**report, "comparison": []})
