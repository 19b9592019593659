"""One early-stopping rule for every family."""

from __future__ import annotations

from kubetune_trainer.training.early_stopping import EarlyStopping


def test_early_stopping_has_one_meaning_for_every_metric() -> None:
    ap = EarlyStopping("segm_ap", patience=2)
    assert not ap.update(float("nan"), baseline=True) and ap.best is None and ap.without_improvement == 0
    assert ap.update(0.1) and ap.best == 0.1
    assert not ap.update(float("nan")) and ap.without_improvement == 1  # NaN never improves, and counts
    assert not ap.update(0.1) and ap.should_stop  # an equal value is no improvement
    loss = EarlyStopping("loss", patience=1, min_delta=0.1)
    assert loss.update(2.0, baseline=True) and not loss.should_stop  # the baseline never counts
    assert loss.update(1.8) and not loss.update(1.75) and loss.should_stop  # lower is better, by min_delta
    tracking = EarlyStopping("miou")
    for value in (0.5, 0.4, 0.3, 0.2):
        tracking.update(value)
    assert tracking.best == 0.5 and not tracking.should_stop  # no patience: it only tracks
