"""kopf handlers, kept thin: parse, call `reconciling`, hand the status patch to kopf.

Create, update and resume handlers reconcile; what follows (the status) is the tracker's, woken
by the watches of the Jobs, pods and other objects the operator owns. Handlers are registered by
`register` with the settings bound in, so nothing is configured at import time. `kubetune
operator` (the chart's Deployment) calls `run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import kopf

from . import reconciling
from .kube import KubeClient
from .rendering import JOB_LABEL
from .settings import OperatorSettings
from .specs import GROUP, PLURAL, VERSION
from .telemetry import OperatorMetrics
from .tracking import Tracker

RESOURCE = (GROUP, VERSION, PLURAL)
# What else the operator creates per job, watched (by label) so a deleted one is put back.
OWNED = (("", "configmaps"), ("", "services"), ("networking.k8s.io", "networkpolicies"))
API_MAX_NESTING = 10_000  # k8s.io/apimachinery refuses deeper JSON (CVE-2019-11253)


def _apply(outcome: reconciling.Outcome, body: Any, patch: kopf.Patch, metrics: OperatorMetrics) -> None:
    patch.status.update(reconciling.status_changes(body.get("status"), outcome.status))  # nothing changed, no PATCH
    metrics.record(body["metadata"]["uid"], outcome.status)
    if outcome.event:
        kind, reason, message = outcome.event
        kopf.event(body, type=kind, reason=reason, message=message or reason)


def register(registry: kopf.OperatorRegistry, ops: OperatorSettings, metrics: OperatorMetrics) -> None:
    kube: KubeClient | None = None
    tracker: Tracker | None = None

    def client() -> KubeClient:
        nonlocal kube
        kube = kube or KubeClient()
        return kube

    def timed(handler: str, work: Callable[[], reconciling.Outcome], body: Any, patch: kopf.Patch) -> None:
        start = time.perf_counter()
        try:
            _apply(work(), body, patch, metrics)
        except reconciling.InvalidSpec as exc:  # a bad spec, one the admin's policy or the API server refuses
            _apply(reconciling.invalid_status(dict(body), str(exc), exc.reason), body, patch, metrics)
        except reconciling.Waiting as exc:  # said in the status; kopf tries again
            _apply(reconciling.waiting_status(dict(body), str(exc)), body, patch, metrics)
            raise kopf.TemporaryError(str(exc), delay=5) from exc
        except Exception:
            metrics.errors.labels(handler=handler).inc()
            raise
        finally:
            metrics.reconcile_seconds.labels(handler=handler).observe(time.perf_counter() - start)

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        """In-cluster service account or the current kubeconfig, as the kubernetes client sees them."""
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.level = logging.WARNING  # our own transition events say what matters
        # No API call may hold a handler for long: kopf's own requests (status patches, events)
        # give up after 30 s and are retried; watches reconnect when a stream goes quiet.
        settings.networking.request_timeout = 30
        settings.networking.connect_timeout = 5
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        # Jobs and pods are watched (indexed below) only where they are a FineTuneJob's: the API
        # server filters the watches, so other workloads cost nothing.
        settings.watching.label_selectors["batch", "jobs"] = JOB_LABEL
        settings.watching.label_selectors["", "pods"] = JOB_LABEL
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
        settings.execution.max_workers = ops.reconcile_workers
        for group, plural in OWNED:
            settings.watching.label_selectors[group, plural] = JOB_LABEL
        metrics.serve(ops.metrics_port)

    @kopf.on.startup(registry=registry)
    async def start_tracking(memo: kopf.Memo, ftjs: kopf.Index, jobs: kopf.Index, pods: kopf.Index, **_: Any) -> None:
        nonlocal tracker
        tracker = Tracker(ops, metrics, client, ftjs, jobs, pods)
        memo["tracking"] = asyncio.create_task(tracker.run(), name="status tracker")

    @kopf.on.cleanup(registry=registry)
    async def stop_tracking(memo: kopf.Memo, **_: Any) -> None:
        task = memo.get("tracking")
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @kopf.on.resume(*RESOURCE, registry=registry)
    @kopf.on.create(*RESOURCE, registry=registry)
    @kopf.on.update(*RESOURCE, registry=registry)
    def reconcile(body: kopf.Body, patch: kopf.Patch, namespace: str, name: str, **_: Any) -> None:
        assert tracker is not None  # started before any resource handler runs
        with tracker.reconciling((namespace, name)):
            timed("reconcile", lambda: reconciling.reconcile(dict(body), client(), ops), body, patch)

    # What the status is derived from, kept current by watches: a status pass reads no Job and
    # lists no pods from the API server.
    # Each change to a Job or pod also wakes the tracker for its job (index functions run on every
    # watch event, and unlike event handlers they log nothing per event).
    @kopf.index(*RESOURCE, id="ftjs", registry=registry)
    async def ftjs(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
        return {(namespace, name): dict(body)}

    @kopf.index("batch", "v1", "jobs", id="jobs", labels={JOB_LABEL: kopf.PRESENT}, registry=registry)
    async def jobs(
        namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any
    ) -> dict[tuple[str, str], dict[str, Any]]:
        key = (namespace, labels[JOB_LABEL])
        if tracker is not None:
            tracker.touch(key)
        return {key: dict(body)}

    @kopf.index("", "v1", "pods", id="pods", labels={JOB_LABEL: kopf.PRESENT}, registry=registry)
    async def pods(
        namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any
    ) -> dict[tuple[str, str], dict[str, Any]]:
        key = (namespace, labels[JOB_LABEL])
        if tracker is not None:
            tracker.touch(key)
        return {key: dict(body)}

    # A deleted Job or pod is a status pass for its job (a Job is created again); a deleted
    # ConfigMap, Service or NetworkPolicy of a job is put back.
    def gone(event: dict[str, Any], **_: Any) -> bool:
        return event.get("type") == "DELETED"

    @kopf.on.event("batch", "v1", "jobs", labels={JOB_LABEL: kopf.PRESENT}, when=gone, registry=registry)
    @kopf.on.event("", "v1", "pods", labels={JOB_LABEL: kopf.PRESENT}, when=gone, registry=registry)
    async def deleted(namespace: str, labels: kopf.Labels, resource: kopf.Resource, **_: Any) -> None:
        if tracker is not None:
            tracker.touch((namespace, labels[JOB_LABEL]), recreate=resource.plural not in ("jobs", "pods"))

    for group, plural in OWNED:
        kopf.on.event(group, "v1", plural, labels={JOB_LABEL: kopf.PRESENT}, when=gone, registry=registry)(deleted)

    @kopf.on.event(*RESOURCE, when=gone, registry=registry)
    async def forget(body: kopf.Body, namespace: str, name: str, **_: Any) -> None:
        metrics.set_phase(body["metadata"]["uid"], None)
        if tracker is not None:
            tracker.forget((namespace, name))


def run(settings: OperatorSettings) -> None:
    """Run the operator in this process until it is stopped (SIGTERM/SIGINT)."""
    # The API server stores objects nested up to 10,000 levels; Python's JSON decoder stops at the
    # recursion limit (1,000), and a watch that cannot decode one object ends every watch. Decode
    # what the API server can store; the spec model then refuses the nesting with the field named.
    sys.setrecursionlimit(max(sys.getrecursionlimit(), API_MAX_NESTING * 2 + 1_000))
    registry = kopf.OperatorRegistry()
    register(registry, settings, OperatorMetrics())
    kopf.configure(verbose=False)
    kopf.run(
        registry=registry,
        standalone=settings.peering is None,
        peering_name=settings.peering,
        namespaces=settings.namespaces,
        clusterwide=not settings.namespaces,
        liveness_endpoint=f"http://0.0.0.0:{settings.liveness_port}/healthz" if settings.liveness_port else None,
    )
