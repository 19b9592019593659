"""Early stopping with one meaning for every family: the best value of one validation metric, and
how many evaluations in a row have not improved on it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

LOWER_IS_BETTER = frozenset({"loss"})


@dataclass
class EarlyStopping:
    """Fed every evaluation's value of `metric`. Higher is better, except for loss. An
    improvement must beat the best by more than `min_delta`. A NaN (nothing measurable, e.g. AP
    with no detections) never improves and counts against patience like any other evaluation.
    The base model's evaluation before training sets the first best and is never counted.
    With `patience` None it only tracks the best."""

    metric: str
    patience: int | None = None
    min_delta: float = 0.0
    best: float | None = None
    without_improvement: int = 0

    def improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.metric in LOWER_IS_BETTER:
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, value: float, baseline: bool = False) -> bool:
        """Record one evaluation; True when it is the new best."""
        improved = self.improves(value)
        if improved:
            self.best, self.without_improvement = value, 0
        elif not baseline:
            self.without_improvement += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.without_improvement >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "without_improvement": self.without_improvement}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.without_improvement = state["best"], state["without_improvement"]
