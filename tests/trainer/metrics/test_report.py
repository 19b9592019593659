"""report.json and summary.md: what every family reports when a job ends."""

from __future__ import annotations

import json

from kubetune_trainer.metrics.report import BestValue, Report


def test_summary_table_compares_base_and_fine_tuned() -> None:
    before = {"f1": 0.2, "dice": 0.25, "miou": 0.15, "loss": 2.0}
    after = {"f1": 0.6, "dice": 0.55, "miou": 0.4, "loss": 0.5}
    report = Report(
        job="j",
        family="sam",
        variant="vit-base",
        steps=10,
        total_steps=10,
        epochs=2,
        stopped_early=False,
        wall_seconds=3.0,
        baseline=before,
        final=after,
        best=BestValue(metric="f1", value=0.6),
        final_model="s3://b/final/model/",
    )
    rows = report.comparison
    assert [(r.metric, round(r.change, 4)) for r in rows] == [("f1", 0.4), ("dice", 0.3), ("miou", 0.25)]
    text = report.markdown()
    assert "| F1 | 0.2000 | 0.6000 | +0.4000 |" in text and "| mIoU | 0.1500 | 0.4000 | +0.2500 |" in text
    without = report.model_copy(update={"baseline": None})
    assert without.comparison == [] and "no before → after comparison" in without.markdown()


def test_values_nothing_could_measure_are_null_and_left_out_of_the_table() -> None:
    """Detectron2's AP is NaN when a model detects nothing: report.json stays valid JSON."""
    report = Report(
        job="j",
        family="detectron2",
        variant="COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml",
        steps=8,
        total_steps=8,
        epochs=1,
        evaluations=[{"step": 0, "segm_ap": float("nan"), "bbox_ap": 0.0}],
        baseline={"segm_ap": float("nan"), "bbox_ap": 0.0},
        final={"segm_ap": 0.2, "bbox_ap": 0.3},
        best=BestValue(metric="segm_ap", value=0.2),
        classes=["shape"],
        wall_seconds=9.0,
    )
    written = json.loads(report.to_json())
    assert written["baseline"]["segm_ap"] is None and written["evaluations"][0]["segm_ap"] is None
    assert [(r["metric"], r["change"]) for r in written["comparison"]] == [("bbox_ap", 0.3)]
    assert "| box AP | 0.0000 | 0.3000 | +0.3000 |" in report.markdown()
