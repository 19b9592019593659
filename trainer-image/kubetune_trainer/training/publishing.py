"""What every job leaves at output.uri when it ends, whatever its family: the model in the family's
own format under final/, the config it was trained with, its metric logs, report.json and the
summary.md people read."""

from __future__ import annotations

from pathlib import Path

import structlog

from kubetune_trainer.config import TrainConfig
from kubetune_trainer.metrics.report import Report
from kubetune_trainer.storage.stores import ObjectStore

log = structlog.get_logger(__name__)


def publish(output: ObjectStore, final: Path, config: TrainConfig, report: Report, logs: list[Path]) -> None:
    """Upload every file under `final` to final/, then final/config.json, the metric logs that
    exist, report.json and summary.md (last: a report means the model is there)."""
    for path in sorted(p for p in final.rglob("*") if p.is_file()):
        output.upload(path, f"final/{path.relative_to(final).as_posix()}")
    output.put_bytes(config.model_dump_json(by_alias=True, indent=1).encode(), "final/config.json")
    for path in logs:
        if path.exists():
            output.upload(path, path.name)
    output.put_bytes(report.to_json().encode(), "report.json")
    summary = report.markdown()
    output.put_bytes(summary.encode(), "summary.md")
    log.info("published", model=report.final_model, report=f"{output.uri}report.json")
    print(summary, flush=True)
