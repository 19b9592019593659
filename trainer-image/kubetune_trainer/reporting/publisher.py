"""Rank 0's report under output.uri, for every family: after each new evaluation the gallery's
rows (drawn by the family) and report.html; at the end the finished page. Pictures and a page
are not worth a run: a failure is logged, never raised."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from kubetune_trainer.config import TrainConfig
from kubetune_trainer.metrics.report import Report
from kubetune_trainer.reporting.files import CONFIG_KEY, GALLERY, PAGE_KEY, publish_page, read_rows
from kubetune_trainer.reporting.page import Inputs
from kubetune_trainer.storage.stores import ObjectStore

log = structlog.get_logger(__name__)

Rows = list[tuple[str, bytes]]  # gallery rows: file name, PNG


def png(image: Any) -> bytes:
    """A PIL image as PNG bytes (a gallery row)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


class ReportPublisher:
    """`draw(baseline)` gives the gallery's rows (None: no gallery); only rank 0 writes."""

    def __init__(
        self,
        output: ObjectStore,
        config: TrainConfig,
        metrics_log: Path,
        draw: Callable[[bool], Rows] | None,
        is_main: bool,
    ) -> None:
        self.output, self.config, self.metrics_log = output, config, metrics_log
        self.draw, self.is_main = draw, is_main
        self.drawn: Rows = []
        self._done: int | None = None  # the step of the evaluation last reported

    def after_evaluation(self, history: list[dict[str, Any]]) -> None:
        """Once per new evaluation in `history` (the evaluation hook's), after its row is written."""
        if not history or history[-1]["step"] == self._done:
            return
        self._done = step = history[-1]["step"]
        try:
            self._refresh(step)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not refresh the report", step=step, error=f"{type(exc).__name__}: {exc}")

    def finish(self, report: Report) -> None:
        """The finished page, with report.json's content (after publishing: the model is there)."""
        try:
            self._page(report.model_dump(mode="json"))
            if self.is_main:
                log.info("report", page=f"{self.output.uri}{PAGE_KEY}")
        except Exception as exc:  # noqa: BLE001
            log.warning("could not write report.html", error=f"{type(exc).__name__}: {exc}")

    def _refresh(self, step: int) -> None:
        if not self.is_main:
            return
        if self.draw is not None:
            self.drawn = self.draw(step == 0)
            for name, data in self.drawn:
                self.output.put_bytes(data, GALLERY + name)
        self._page(None)

    def _page(self, report: dict[str, Any] | None) -> None:
        if not self.is_main:
            return
        rows = read_rows(self.metrics_log.read_text()) if self.metrics_log.exists() else []
        config = self.config
        self.output.put_bytes(config.model_dump_json(by_alias=True, indent=1).encode(), CONFIG_KEY)
        publish_page(self.output, Inputs(rows, config.model_dump(by_alias=True, mode="json"), report, self.drawn))
