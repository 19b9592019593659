"""kopf wiring, kept thin: the watches (as indexes) wake the control loop (`loop.ControlLoop`),
which does all the work on a job.

No handler of kopf's writes to a FineTuneJob: kopf keeps no annotations (its diff-base and
progress storage) and no finalizer on it. Handlers are registered by `register` with the settings
bound in, so nothing is configured at import time. `kubetune operator` (the chart's Deployment)
calls `run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from typing import Any

import kopf

from .kube import KubeClient
from .loop import ControlLoop, Key
from .observing import slim_job, slim_pod
from .rendering import JOB_LABEL
from .settings import OperatorSettings
from .specs import GROUP, PLURAL, VERSION
from .telemetry import OperatorMetrics

RESOURCE = (GROUP, VERSION, PLURAL)
# What else the operator creates per job, watched (by label) so a deleted one is put back.
OWNED = (("", "configmaps"), ("", "services"), ("networking.k8s.io", "networkpolicies"))
API_MAX_NESTING = 10_000  # k8s.io/apimachinery refuses deeper JSON (CVE-2019-11253)


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf computes, for every watch event of a resource with event handlers, a deep copy of the
    object to diff against the last handled one; only create/update handlers use that diff, and
    the operator has none. An empty essence makes each event cost what its handlers cost."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        return {}

    def fetch(self, *, body: kopf.Body) -> Any:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: Any) -> None:
        pass


def register(registry: kopf.OperatorRegistry, ops: OperatorSettings, metrics: OperatorMetrics) -> None:
    kube: KubeClient | None = None
    control: ControlLoop | None = None

    def client() -> KubeClient:
        nonlocal kube
        kube = kube or KubeClient()
        return kube

    def touch(key: Key, reconcile: bool = False) -> None:
        if control is not None:
            control.touch(key, reconcile)

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        """In-cluster service account or the current kubeconfig, as the kubernetes client sees them."""
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.level = logging.WARNING  # the control loop posts the Events that matter
        settings.persistence.diffbase_storage = NoDiffBase()
        # No API call may hold the watches for long: kopf's requests give up after 30 s and are
        # retried; watches reconnect when a stream goes quiet.
        settings.networking.request_timeout = 30
        settings.networking.connect_timeout = 5
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        # What a FineTuneJob owns is watched only where it carries the job label: the API server
        # filters the watches, so other workloads cost nothing.
        for group, plural in (("batch", "jobs"), ("", "pods"), *OWNED):
            settings.watching.label_selectors[group, plural] = JOB_LABEL
        metrics.serve(ops.metrics_port)

    @kopf.on.startup(registry=registry)
    async def start_loop(memo: kopf.Memo, ftjs: kopf.Index, jobs: kopf.Index, pods: kopf.Index, **_: Any) -> None:
        nonlocal control
        control = ControlLoop(ops, metrics, client, ftjs, jobs, pods)
        memo["control_loop"] = asyncio.create_task(control.run(), name="control loop")

    @kopf.on.cleanup(registry=registry)
    async def stop_loop(memo: kopf.Memo, **_: Any) -> None:
        task = memo.get("control_loop")
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # What the loop works from, kept current by the watches (it reads no FineTuneJob, Job or pod
    # from the API server). Each change also wakes it for that job: index functions run on every
    # watch event and, unlike event handlers, log nothing per event.
    @kopf.index(*RESOURCE, id="ftjs", registry=registry)
    async def ftjs(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
        if body.status.get("observedGeneration") != body.metadata.get("generation"):
            touch((namespace, name))  # a new or changed spec (a status the loop wrote needs no pass)
        return {(namespace, name): dict(body)}

    @kopf.index("batch", "v1", "jobs", id="jobs", labels={JOB_LABEL: kopf.PRESENT}, registry=registry)
    async def jobs(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
        touch((namespace, labels[JOB_LABEL]))
        return {(namespace, labels[JOB_LABEL]): slim_job(body)}

    @kopf.index("", "v1", "pods", id="pods", labels={JOB_LABEL: kopf.PRESENT}, registry=registry)
    async def pods(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
        touch((namespace, labels[JOB_LABEL]))
        return {(namespace, labels[JOB_LABEL]): slim_pod(body)}

    # Deletions: a Job or pod gone is an observation (a Job is then created again); a ConfigMap,
    # Service or NetworkPolicy gone is put back; a FineTuneJob gone is forgotten.
    def gone(event: dict[str, Any], **_: Any) -> bool:
        return event.get("type") == "DELETED"

    @kopf.on.event("batch", "v1", "jobs", labels={JOB_LABEL: kopf.PRESENT}, when=gone, registry=registry)
    @kopf.on.event("", "v1", "pods", labels={JOB_LABEL: kopf.PRESENT}, when=gone, registry=registry)
    async def deleted(namespace: str, labels: kopf.Labels, resource: kopf.Resource, **_: Any) -> None:
        touch((namespace, labels[JOB_LABEL]), reconcile=resource.plural not in ("jobs", "pods"))

    for group, plural in OWNED:
        kopf.on.event(group, "v1", plural, labels={JOB_LABEL: kopf.PRESENT}, when=gone, registry=registry)(deleted)

    @kopf.on.event(*RESOURCE, when=gone, registry=registry)
    async def forget(body: kopf.Body, namespace: str, name: str, **_: Any) -> None:
        metrics.set_phase(body["metadata"]["uid"], None)
        if control is not None:
            control.forget((namespace, name))


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
