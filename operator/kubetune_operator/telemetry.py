"""The operator's own Prometheus metrics (names in docs/architecture.md)."""

from __future__ import annotations

import collections
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .specs import Phase

PHASES: tuple[str, ...] = Phase.__args__  # type: ignore[attr-defined]


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconcile_seconds = Histogram(
            "kubetune_operator_reconcile_seconds",
            "Time to reconcile or observe one FineTuneJob",
            ["handler"],
            registry=self.registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.jobs = Gauge("kubetune_operator_jobs", "FineTuneJobs by phase", ["phase"], registry=self.registry)
        self.errors = Counter(
            "kubetune_operator_reconcile_errors_total",
            "Failed reconciles and observations",
            ["handler"],
            registry=self.registry,
        )
        for handler in ("reconcile", "observe"):  # zero-valued series: dashboards show 0, not "no data"
            self.errors.labels(handler=handler)
            self.reconcile_seconds.labels(handler=handler)
        self.failures = Counter(
            "kubetune_operator_failures_total",
            "FineTuneJobs that failed, by failure class (OOM, NCCLTimeout, NonFiniteLoss, DataError...)",
            ["class"],
            registry=self.registry,
        )
        self._failed: set[str] = set()
        self._phases: dict[str, str] = {}
        self._counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        for phase in PHASES:
            self.jobs.labels(phase=phase).set(0)

    def set_phase(self, uid: str, phase: str | None) -> None:
        """Track one FineTuneJob's phase (None: it is gone). Handlers call this from several
        threads; the counts change by one, not by a recount of every job."""
        with self._lock:
            old = self._phases.pop(uid, None) if phase is None else self._phases.get(uid)
            if phase is not None:
                self._phases[uid] = phase
            if old == phase:
                return
            for name, step in ((old, -1), (phase, 1)):
                if name is not None:
                    self._counts[name] += step
                    self.jobs.labels(phase=name).set(self._counts[name])

    def record(self, uid: str, status: dict[str, Any]) -> None:
        """Count a FineTuneJob's status as written: its phase, and its failure class once."""
        self.set_phase(uid, status.get("phase"))
        if status.get("phase") == "Failed":
            failed = [c for c in status.get("conditions") or [] if c.get("type") in ("Failed", "SpecRejected")]
            self.count_failure(uid, failed[0].get("reason", "Unknown") if failed else "Unknown")

    def count_failure(self, uid: str, kind: str) -> None:
        """Count a FineTuneJob's failure once, by its class (the Failed condition's reason)."""
        if uid not in self._failed:
            self._failed.add(uid)
            self.failures.labels(**{"class": kind}).inc()

    def serve(self, port: int) -> None:
        if port:
            start_http_server(port, registry=self.registry)
