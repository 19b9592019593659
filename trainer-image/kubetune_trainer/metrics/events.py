"""One place where the loop's measurements go, and writers that flush them (detectron2's
EventStorage/EventWriter split): the loop never calls Prometheus, JSON or the terminal itself."""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import structlog

log = structlog.get_logger(__name__)
METRICS_FILE = "metrics.jsonl"  # the metric log in each checkpoint and at the output root


@dataclass
class Snapshot:
    step: int
    scalars: dict[str, float]
    observations: dict[str, list[float]]
    increments: dict[str, float]


@dataclass
class EventStorage:
    """Latest scalars (kept), observations and counter increments (handed out once)."""

    step: int = 0
    scalars: dict[str, float] = field(default_factory=dict)
    _observations: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    _increments: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def put(self, **values: float) -> None:
        self.scalars.update({k: float(v) for k, v in values.items()})

    def put_prefixed(self, prefix: str, values: dict[str, float]) -> None:
        self.scalars.update({f"{prefix}/{k}": float(v) for k, v in values.items()})

    def observe(self, name: str, value: float) -> None:
        self._observations[name].append(float(value))

    def inc(self, name: str, amount: float = 1.0) -> None:
        self._increments[name] += amount

    def drain(self) -> Snapshot:
        snap = Snapshot(self.step, dict(self.scalars), dict(self._observations), dict(self._increments))
        self._observations.clear()
        self._increments.clear()
        return snap


class EventWriter(Protocol):
    def write(self, snap: Snapshot) -> None: ...
    def close(self) -> None: ...


class JsonlWriter:
    """metrics.jsonl: one object per written step, what users plot and the final report reads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = path.open("a")
        self._written: dict[str, float] = {}

    def write(self, snap: Snapshot) -> None:
        """A row with the values that changed since the last row (an evaluation appears once)."""
        changed = {k: v for k, v in snap.scalars.items() if self._written.get(k) != v}
        if not changed:
            return
        self._written.update(changed)
        changed.pop("step", None)  # the step scalar is a float; the row's own step stays an int
        self._fh.write(json.dumps({"step": snap.step, "time": time.time(), **changed}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class TerminalWriter:
    """A tqdm bar on a terminal; a structured log line for the first step a process trains and
    every `period` steps after it otherwise (pods). The first step may be a resumed one."""

    def __init__(self, total: int, period: int = 20) -> None:
        self.total = total
        self.period = period
        self.bar = None
        self._last: int | None = None  # the step of the previous write

    def write(self, snap: Snapshot) -> None:
        s = snap.scalars
        if "loss" not in s:  # nothing trained yet
            return
        first = self._last is None
        previous = snap.step - 1 if self._last is None else self._last
        if sys.stderr.isatty():
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=self.total, initial=previous, unit="step", dynamic_ncols=True)
            self.bar.update(snap.step - previous)
            self.bar.set_postfix(
                loss=f"{s.get('loss', float('nan')):.4f}",
                lr=f"{s.get('lr', 0):.2e}",
                img_s=f"{s.get('images_per_second', 0):.1f}",
            )
        elif first or snap.step % self.period == 0:
            log.info(
                "train",
                step=snap.step,
                epoch=int(s.get("epoch", 0)),
                loss=round(s.get("loss", float("nan")), 5),
                lr=s.get("lr"),
                images_per_second=round(s.get("images_per_second", 0), 2),
            )
        self._last = snap.step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
