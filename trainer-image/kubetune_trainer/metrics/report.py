"""The before → after table: the base model and the fine-tuned model on the same validation split."""

from __future__ import annotations

from typing import Any

COMPARED = (("f1", "F1"), ("dice", "Dice"), ("miou", "mIoU"))


def comparison(before: dict[str, float] | None, after: dict[str, float] | None) -> list[dict[str, Any]]:
    """One row per metric: before, after and the change; empty without both evaluations."""
    if not before or not after:
        return []
    return [
        {"metric": key, "before": before[key], "after": after[key], "change": after[key] - before[key]}
        for key, _ in COMPARED
        if key in before and key in after
    ]


def markdown(report: dict[str, Any]) -> str:
    """The run summary: what ran, the before → after table, the best value and where results are."""
    lines = [
        f"# {report['job']}: {report['family']} {report['variant']}",
        "",
        f"{report['steps']} of {report['total_steps']} steps, {report['epochs']} epochs"
        + (" (stopped early)" if report["stopped_early"] else "")
        + f", {report['wall_seconds']:.0f} s.",
        "",
    ]
    rows = report.get("comparison") or []
    if rows:
        names = dict(COMPARED)
        lines += ["| metric | base model | fine-tuned | change |", "|---|---:|---:|---:|"]
        lines += [f"| {names[r['metric']]} | {r['before']:.4f} | {r['after']:.4f} | {r['change']:+.4f} |" for r in rows]
        lines.append("")
    else:
        lines += ["No validation split, so there is no before → after comparison.", ""]
    if report.get("best"):
        best = report["best"]
        lines += [f"Best {best['metric']}: {best['value']:.4f}.", ""]
    lines += [f"Final model: {report['final_model']}", ""]
    return "\n".join(lines)
