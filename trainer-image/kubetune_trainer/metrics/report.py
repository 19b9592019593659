"""What a finished job reports, for every family: report.json (this model) and summary.md (its
`markdown`), with the base model and the fine-tuned model compared on the same validation split."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, computed_field

# Metrics the before → after table shows, in order, with their names for people.
COMPARED = (
    ("f1", "F1"),
    ("dice", "Dice"),
    ("miou", "mIoU"),
    ("segm_ap", "mask AP"),
    ("bbox_ap", "box AP"),
    ("segm_ap50", "mask AP50"),
    ("bbox_ap50", "box AP50"),
)
# Past this share of prompts whose kept mask is empty a promptable model is collapsing towards
# segmenting nothing: the trainer warns, the report says so, the chart's alert fires.
COLLAPSE_SHARE = 0.5
Evaluation = dict[str, Any]  # {"step": n, metric: value, ...}; a value nothing could measure is null


class Change(BaseModel):
    metric: str
    before: float
    after: float
    change: float


class BestValue(BaseModel):
    metric: str
    value: float | None


class Report(BaseModel):
    """NaN values (no detections to score) are written as null."""

    job: str
    family: str
    variant: str
    steps: int
    total_steps: int
    epochs: int
    stopped_early: bool = False
    amp_skipped_steps: int = 0
    evaluations: list[Evaluation] = []
    baseline: Evaluation | None = None
    """The base model's validation result, before the first step."""
    final: Evaluation | None = None
    """The fine-tuned model's, after the last."""
    best: BestValue | None = None
    last_checkpoint: str | None = None
    final_model: str | None = None
    feature_cache: dict[str, Any] | None = None
    classes: list[str] | None = None
    """Class names, in the order of the model's outputs (Detectron2)."""
    wall_seconds: float

    @computed_field
    @property
    def comparison(self) -> list[Change]:
        """One row per compared metric both evaluations have: before, after and the change."""
        before, after = self.baseline or {}, self.final or {}
        return [
            Change(metric=key, before=before[key], after=after[key], change=after[key] - before[key])
            for key, _ in COMPARED
            if _number(before.get(key)) and _number(after.get(key))
        ]

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)

    def markdown(self) -> str:
        """The run summary: what ran, the before → after table, the best value and where results are."""
        lines = [
            f"# {self.job}: {self.family} {self.variant}",
            "",
            f"{self.steps} of {self.total_steps} steps, {self.epochs} epochs"
            + (" (stopped early)" if self.stopped_early else "")
            + f", {self.wall_seconds:.0f} s.",
            "",
        ]
        if self.comparison:
            names = dict(COMPARED)
            lines += ["| metric | base model | fine-tuned | change |", "|---|---:|---:|---:|"]
            lines += [
                f"| {names[r.metric]} | {r.before:.4f} | {r.after:.4f} | {r.change:+.4f} |" for r in self.comparison
            ]
            lines.append("")
        else:
            lines += ["No validation split, so there is no before → after comparison.", ""]
        if self.best and self.best.value is not None:
            lines += [f"Best {self.best.metric}: {self.best.value:.4f}.", ""]
        lines += [f"Final model: {self.final_model}", ""]
        return "\n".join(lines)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and value == value  # not None, not NaN
