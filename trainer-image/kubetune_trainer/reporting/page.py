"""report.html: one self-contained page per job, built from what the job writes to output.uri.

Inputs are the metric log (metrics.jsonl: training rows and, at each evaluation, `eval/…` values),
the job's config, report.json once the job has finished, and the gallery's PNG rows. Everything is
inlined (SVG curves, base64 pictures, no scripts and no fetches), so the file opens anywhere,
offline, and can be attached to a ticket. Pure: data in, text out.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kubetune_trainer.metrics.report import COLLAPSE_SHARE, COMPARED

SIZES = ("small", "medium", "large")
# Extra rows of the before → after table: the collapse watch of promptable models.
WATCHED = (
    ("soft_dice", "soft Dice"),
    ("empty_share", "empty masks (share of prompts)"),
    ("target_prob", "mean probability inside targets"),
)
LOWER_IS_BETTER = {"empty_share", "loss"}
MOST_POINTS = 1500  # per curve: a 100,000-step run draws one point in 67
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf")


@dataclass
class Inputs:
    rows: list[dict[str, Any]]
    config: dict[str, Any] | None = None
    report: dict[str, Any] | None = None
    gallery: list[tuple[str, bytes]] = field(default_factory=list)


def evaluations(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per evaluation ({"step": n, metric: value}) from the metric log, whose rows hold
    only the values that changed: each evaluation carries the earlier ones' unchanged values."""
    out, current = [], {}
    for row in rows:
        values = {k[5:]: v for k, v in row.items() if k.startswith("eval/")}
        if values:
            current.update(values)
            out.append({"step": row["step"], **current})
    return out


def series(rows: Iterable[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    """A training value at every step the log has a row for. A row holds only what changed, so a
    value missing from a step's row is the one before it (a collapse to exactly 1.0 writes 1.0 once)."""
    out, current = [], None
    for row in rows:
        if _number(row.get(key)):
            current = row[key]
        if current is not None and ("loss" in row or key in row):
            out.append((row["step"], current))
    return out


def at_evaluations(evals: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(e["step"], e[key]) for e in evals if _number(e.get(key))]


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if _number(value) else "–"


def line_chart(
    lines: dict[str, list[tuple[float, float]]], title: str, y_range: tuple[float, float] | None = None
) -> str:
    """An inline SVG line chart; lines with one point are drawn as markers."""
    lines = {k: v for k, v in lines.items() if v}
    if not lines:
        return ""
    w, h, left, right, top, bottom = 640, 240, 52, 160, 24, 28
    xs = [x for pts in lines.values() for x, _ in pts]
    ys = [y for pts in lines.values() for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = y_range or (min(ys), max(ys))
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def px(x: float, y: float) -> str:
        sx = left + (x - x0) / (x1 - x0) * (w - left - right)
        sy = top + (1 - (y - y0) / (y1 - y0)) * (h - top - bottom)
        return f"{sx:.1f},{sy:.1f}"

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" '
        f'aria-label="{html.escape(title)}">',
        f'<text x="{left}" y="15" font-size="13" font-weight="bold">{html.escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{w - left - right}" height="{h - top - bottom}" '
        'fill="none" stroke="#999"/>',
        f'<text x="{left - 4}" y="{top + 10}" font-size="11" text-anchor="end">{y1:.3g}</text>',
        f'<text x="{left - 4}" y="{h - bottom}" font-size="11" text-anchor="end">{y0:.3g}</text>',
        f'<text x="{left}" y="{h - 10}" font-size="11">step {x0:g}</text>',
        f'<text x="{w - right}" y="{h - 10}" font-size="11" text-anchor="end">{x1:g}</text>',
    ]
    for i, (name, pts) in enumerate(lines.items()):
        color = COLORS[i % len(COLORS)]
        pts = thinned(pts)
        if len(pts) > 1:
            points = " ".join(px(x, y) for x, y in pts)
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{points}"/>')
        for x, y in pts if len(pts) <= 40 else pts[-1:]:
            cx, cy = px(x, y).split(",")
            parts.append(f'<circle cx="{cx}" cy="{cy}" r="3" fill="{color}"/>')
        ly = top + 14 + 16 * i
        parts.append(f'<rect x="{w - right + 10}" y="{ly - 9}" width="12" height="3" fill="{color}"/>')
        parts.append(f'<text x="{w - right + 26}" y="{ly - 4}" font-size="11">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def thinned(points: list[tuple[float, float]], most: int = MOST_POINTS) -> list[tuple[float, float]]:
    """At most about `most` points, evenly spaced, the last one kept: a long run's page stays small."""
    if len(points) <= most:
        return points
    stride = -(-len(points) // most)
    return points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])


def warnings(evals: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[str]:
    """Plain words on what the numbers say went wrong: collapse, and loss and IoU disagreeing."""
    out = []
    last = evals[-1] if evals else {}
    if _number(last.get("empty_share")) and last["empty_share"] > COLLAPSE_SHARE:
        out.append(
            f"The masks are collapsing: at step {last['step']}, {last['empty_share']:.0%} of the validation prompts "
            f"got an empty mask (the warning threshold is {COLLAPSE_SHARE:.0%}), and the mean predicted probability "
            f"inside the targets is {last.get('target_prob', float('nan')):.2f}. The model is learning to segment "
            "nothing: common causes are a loss that rewards empty masks on a model without a good start "
            "(focal loss from random weights), a learning rate too high for the trained parts, or targets that "
            "do not match the images."
        )
    train_empty = [v for _, v in series(rows, "train/empty_share")][-20:]
    if train_empty and sum(train_empty) / len(train_empty) > COLLAPSE_SHARE:
        out.append(
            f"In training, {sum(train_empty) / len(train_empty):.0%} of the prompts of the last "
            f"{len(train_empty)} steps got an empty mask."
        )
    if len(evals) >= 2:
        first = evals[0]
        soft, hard = "soft_dice", "miou"
        measured = all(_number(e.get(k)) for e in (first, last) for k in (soft, hard))
        if measured and last[soft] > first[soft] + 0.02 and last[hard] < first[hard] - 0.02:
            out.append(
                f"The loss and the metric disagree: soft Dice rose ({first[soft]:.3f} → {last[soft]:.3f}) while "
                f"thresholded mIoU fell ({first[hard]:.3f} → {last[hard]:.3f}). The probabilities move towards "
                "the targets but stay under 0.5, so the thresholded masks lose pixels."
            )
    return out


def _table(head: list[str], body: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def comparison(before: dict[str, Any], after: dict[str, Any]) -> str:
    body = []
    for key, name in (*COMPARED, *WATCHED, ("loss", "validation loss")):
        if not (_number(before.get(key)) or _number(after.get(key))):
            continue
        change = (
            after.get(key, math.nan) - before.get(key, math.nan)
            if _number(before.get(key)) and _number(after.get(key))
            else math.nan
        )
        better = _number(change) and (change < 0 if key in LOWER_IS_BETTER else change > 0)
        cls = "better" if better else ("worse" if _number(change) and change != 0 else "")
        body.append(
            [
                html.escape(name),
                _fmt(before.get(key)),
                _fmt(after.get(key)),
                f'<span class="{cls}">{change:+.4f}</span>' if _number(change) else "–",
            ]
        )
    return _table(["metric", "base model", "fine-tuned", "change"], body)


def breakdown(before: dict[str, Any], after: dict[str, Any], group: str, names: Iterable[str]) -> str:
    """Per size or per class: objects and each metric the evaluation gave, base → fine-tuned."""
    prefixes = [f"{group}/{name}/" for name in names]
    metrics = sorted({k.split("/")[-1] for k in (*before, *after) if k.startswith(tuple(prefixes))} - {"objects"})
    body = []
    for name, prefix in zip(names, prefixes, strict=True):
        if not any(k.startswith(prefix) for k in (*before, *after)):
            continue
        count = after.get(prefix + "objects", before.get(prefix + "objects"))
        cells = [f"{_fmt(before.get(prefix + m))} → {_fmt(after.get(prefix + m))}" for m in metrics]
        body.append([html.escape(name), f"{count:.0f}" if _number(count) else "–", *cells])
    if not body:
        return ""
    names_of = dict((*COMPARED, *WATCHED))
    return _table([group, "objects", *[f"{names_of.get(m, m)} (base → fine-tuned)" for m in metrics]], body)


def build(inputs: Inputs) -> str:
    rows, report, config = inputs.rows, inputs.report or {}, inputs.config or {}
    evals = evaluations(rows)
    before, after = (evals[0], evals[-1]) if evals else ({}, {})
    job = report.get("job") or (config.get("job") or {}).get("name", "job")
    model = config.get("model") or {}
    family = report.get("family") or model.get("family", "")
    variant = report.get("variant") or model.get("variant", "")
    steps = [r["step"] for r in rows if "loss" in r]
    total = report.get("total_steps") or next((r["total_steps"] for r in reversed(rows) if "total_steps" in r), None)
    state = "finished" if inputs.report else "running (refreshed at each evaluation)"
    sections = [
        f"<h1>{html.escape(str(job))}: {html.escape(f'{family} {variant}')}</h1>",
        f"<p>{html.escape(state)}; step {steps[-1] if steps else 0} of {total or '?'}"
        + (f", {report['wall_seconds']:.0f} s" if _number(report.get("wall_seconds")) else "")
        + (", stopped early" if report.get("stopped_early") else "")
        + ".</p>",
    ]
    for text in warnings(evals, rows):
        sections.append(f'<p class="warning">{html.escape(text)}</p>')
    sections.append("<h2>Did fine-tuning help?</h2>")
    if len(evals) >= 2:
        sections.append(
            f"<p>The base model (step {before['step']}) against the model at step {after['step']}, "
            "on the same validation split.</p>"
        )
        sections.append(comparison(before, after))
    elif evals:
        sections.append("<p>Only the base model has been evaluated so far.</p>" + comparison(before, {}))
    else:
        sections.append("<p>No evaluation yet (or no validation split: data.validation).</p>")
    sizes = breakdown(before, after, "size", SIZES)
    if sizes:
        sections.append(
            "<h2>By object size</h2><p>COCO sizes of the ground truth at the image's original size: "
            "small &lt; 32², medium &lt; 96², large.</p>" + sizes
        )
    classes = sorted({k.split("/")[1] for k in (*before, *after) if k.startswith("class/")})
    if classes:
        sections.append("<h2>By class</h2>" + breakdown(before, after, "class", classes))
    sections.append("<h2>Curves</h2>")
    sections.append(
        line_chart({"training loss": series(rows, "loss"), "validation loss": at_evaluations(evals, "loss")}, "loss")
    )
    quality = {name: at_evaluations(evals, key) for key, name in (*COMPARED, ("soft_dice", "soft Dice"))}
    quality["train soft Dice (logits)"] = series(rows, "train/soft_dice_at_logits")
    quality["train mIoU (logits)"] = series(rows, "train/miou_at_logits")
    sections.append(line_chart(quality, "validation metrics; training soft Dice and IoU", (0.0, 1.0)))
    watch = {
        "train empty masks": series(rows, "train/empty_share"),
        "train p inside target": series(rows, "train/target_prob"),
        "val empty masks": at_evaluations(evals, "empty_share"),
        "val p inside target": at_evaluations(evals, "target_prob"),
    }
    sections.append(line_chart(watch, "collapse watch: share of empty masks, probability inside targets", (0.0, 1.0)))
    if inputs.gallery:
        sections.append(
            "<h2>Before and after</h2><p>Fixed validation images at their original size: the base model "
            "before training and the model after it (each object's IoU on its mask, for SAM and SAM2).</p>"
        )
        for name, data in inputs.gallery:
            src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
            caption = f"validation image {name.split('.')[0].lstrip('0') or '0'}"
            sections.append(
                f'<figure><img src="{src}" alt="{html.escape(caption)}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    if config:
        sections.append("<h2>Config</h2><pre>" + html.escape(json.dumps(config, indent=1, sort_keys=True)) + "</pre>")
    return PAGE.format(title=html.escape(f"{job} — kubetune report"), body="\n".join(sections))


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1700px; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
.better {{ color: #1a7f37; font-weight: bold; }} .worse {{ color: #cf222e; font-weight: bold; }}
.warning {{ background: #fff4e5; border-left: 5px solid #e36209; padding: 0.6em 1em; }}
figure {{ margin: 0 0 1em; }} img {{ max-width: 100%; }} svg {{ display: block; margin: 0.5em 0; }}
pre {{ background: #f6f8fa; padding: 1em; overflow: auto; }}
</style></head>
<body>
{body}
</body></html>
"""
