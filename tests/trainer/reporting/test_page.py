"""report.html from a job's files: evaluations rebuilt from the metric log, collapse put in words,
a self-contained page that a real headless browser draws."""

from __future__ import annotations

import re
from pathlib import Path

from kubetune_trainer.reporting.files import read_rows
from kubetune_trainer.reporting.page import Inputs, build, evaluations, thinned, warnings
from PIL import Image

from tests.helpers import drawn_share, screenshot


def _rows(collapse: bool = False) -> list[dict]:
    """A metric log as JsonlWriter writes it: each row holds only the values that changed."""
    rows = [{"step": 0, "eval/miou": 0.10, "eval/soft_dice": 0.20, "eval/empty_share": 0.0, "eval/objects": 24.0}]
    for step in range(1, 41):
        rows.append({"step": step, "loss": 2.0 / step, "train/empty_share": 0.9 if collapse else 0.05})
    rows.append({"step": 20, "eval/miou": 0.30, "eval/soft_dice": 0.40})
    last = {"eval/miou": 0.02, "eval/soft_dice": 0.45, "eval/empty_share": 0.8} if collapse else {"eval/miou": 0.5}
    rows.append({"step": 40, **last, "eval/size/small/miou": 0.4, "eval/size/small/objects": 10.0})
    return rows


def test_evaluations_carry_unchanged_values_forward() -> None:
    evals = evaluations(_rows())
    assert [e["step"] for e in evals] == [0, 20, 40]
    assert evals[1]["empty_share"] == 0.0 and evals[1]["objects"] == 24.0  # unchanged, so not in its row
    assert evals[2]["miou"] == 0.5 and evals[2]["size/small/miou"] == 0.4


def test_collapse_and_disagreement_are_said_in_words() -> None:
    rows = _rows(collapse=True)
    said = " ".join(warnings(evaluations(rows), rows))
    assert "collapsing" in said and "80%" in said  # the validation share, named
    assert "90% of the prompts of the last 20 steps" in said
    assert "soft Dice rose (0.200 → 0.450) while thresholded mIoU fell (0.100 → 0.020)" in said
    assert warnings(evaluations(_rows()), _rows()) == []


def test_a_total_collapse_written_once_still_counts_for_every_step() -> None:
    """JsonlWriter writes a value only when it changes: 1.0 at step 5 stands for steps 5 to 40."""
    rows = [{"step": s, "loss": 1.0 / s, **({"train/empty_share": 0.1} if s < 5 else {})} for s in range(1, 41)]
    rows[4]["train/empty_share"] = 1.0
    said = " ".join(warnings([], rows))
    assert "100% of the prompts of the last 20 steps" in said


def test_a_long_run_draws_a_bounded_number_of_points_and_keeps_the_last() -> None:
    points = [(float(s), 1.0 / s) for s in range(1, 100_001)]
    kept = thinned(points)
    assert len(kept) <= 1501 and kept[0] == points[0] and kept[-1] == points[-1]
    assert thinned(points[:10]) == points[:10]


def test_metric_log_with_a_torn_last_line_still_reads() -> None:
    text = '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo'
    assert [r["step"] for r in read_rows(text)] == [1, 2]


def test_page_is_self_contained_and_a_browser_draws_it(tmp_path: Path) -> None:
    picture = tmp_path / "row.png"
    Image.new("RGB", (600, 120), (200, 40, 40)).save(picture)
    config = {"job": {"name": "shapes"}, "model": {"family": "sam2", "variant": "sam2.1_hiera_tiny"}}
    page = build(Inputs(_rows(), config, None, [("00003.png", picture.read_bytes())]))
    assert "<script" not in page and not re.search(r'(src|href)="(?!data:)', page)  # nothing fetched
    assert "Did fine-tuning help?" in page and "running" in page and "validation image 3" in page
    assert "0.1000" in page and "0.5000" in page and "+0.4000" in page  # mIoU before, after, change
    path = tmp_path / "report.html"
    path.write_text(page)
    shown, colours = drawn_share(screenshot(path, tmp_path / "shot.png", height=1600))
    assert shown > 0.05 and colours > 20, (shown, colours)


def test_kubetune_report_builds_the_page_of_a_running_job_and_says_where(tmp_path: Path, capsys) -> None:
    """While a job runs its output has a metric log and report/config.json, no report.json yet."""
    import json

    from kubetune.cli import main

    out = tmp_path / "out"
    (out / "report").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    (out / "report" / "config.json").write_text(json.dumps({"job": {"name": "shapes"}, "model": {"family": "sam"}}))
    page = tmp_path / "page.html"
    assert main(["report", out.as_uri() + "/", "--out", str(page)]) == 0
    said = capsys.readouterr().out
    assert f"(running or stopped, 0 gallery images): {page}" in said
    assert "running (refreshed at each evaluation); step 40 of ?" in page.read_text()

    assert main(["report", tmp_path.as_uri() + "/nothing/"]) == 2  # no metric log: said, not a traceback
    assert "no metrics.jsonl under" in capsys.readouterr().err
