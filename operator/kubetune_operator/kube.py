"""The one module that talks to the Kubernetes API (and to trainer pods' metrics endpoints).

Errors are classified once: 404/409/429/5xx are temporary (kopf retries after a delay), other
4xx are permanent (recorded in the FineTuneJob's status). The library's exception is the cause.
"""

from __future__ import annotations

import contextlib
import json
import socket
import urllib.request
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import kopf
import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from .specs import GROUP, PLURAL, VERSION

TEMPORARY = {404, 409, 429}
# (connect, read) seconds for every call: a held request fails and the control loop tries the
# job again later, instead of stalling.
REQUEST_TIMEOUT = (5.0, 20.0)
SNAKE_KINDS = {"Job": "job", "ConfigMap": "config_map", "Service": "service", "NetworkPolicy": "network_policy"}
COMPONENT = "kubetune-operator"
# Only the metadata of a Secret is ever read (its labels), never its data.
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"


def _version() -> str:
    try:
        return version("kubetune")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "dev"


USER_AGENT = f"{COMPONENT}/{_version()}"


class Refused(kopf.PermanentError):
    """The API server refused an object (400, 403 or 422): its message names the field."""


def _raise(exc: ApiException, what: str) -> None:
    reason = exc.reason or ""
    with contextlib.suppress(ValueError, AttributeError):  # the body is not always Status JSON
        reason = json.loads(exc.body or "{}").get("message", reason)
    message = f"{what}: {exc.status} {reason}".strip()
    if exc.status in TEMPORARY or (exc.status or 0) >= 500:
        raise kopf.TemporaryError(message, delay=10) from exc
    raise Refused(message) from exc


def _timed(method: Any) -> Any:
    """`method` with REQUEST_TIMEOUT, and a timeout or dropped connection as a temporary error."""

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, _request_timeout=REQUEST_TIMEOUT, **kwargs)
        except urllib3.exceptions.HTTPError as exc:  # timeouts, refused or reset connections
            raise kopf.TemporaryError(f"the API server did not answer: {exc}", delay=5) from exc

    return call


class KubeClient:
    """Namespaced reads and writes of the objects a FineTuneJob owns, as plain dicts."""

    def __init__(self) -> None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        self.api = client.ApiClient()
        self.api.user_agent = USER_AGENT  # the API server's audit log tells the operator's requests apart
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.networking = client.NetworkingV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    @staticmethod
    def _json(response: Any) -> dict[str, Any]:
        return json.loads(response.data)

    def _call(self, verb: str, kind: str) -> Any:
        """The client method for `verb` on `kind`, e.g. read_namespaced_config_map, with the timeout."""
        api = {"Job": self.batch, "NetworkPolicy": self.networking}.get(kind, self.core)
        return _timed(getattr(api, f"{verb}_namespaced_{SNAKE_KINDS[kind]}"))

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._json(self._call("read", kind)(name, namespace, _preload_content=False))
        except ApiException as exc:
            if exc.status == 404:
                return None
            _raise(exc, f"reading {kind} {namespace}/{name}")
        return None

    def create(self, obj: dict[str, Any], dry_run: bool = False) -> dict[str, Any] | None:
        """Create `obj` and return it as stored; None when it already exists (never a second
        copy). With `dry_run` the API server validates and admits it without storing anything."""
        kind, meta = obj["kind"], obj["metadata"]
        extra = {"dry_run": "All"} if dry_run else {}
        try:
            return self._json(self._call("create", kind)(meta["namespace"], obj, _preload_content=False, **extra))
        except ApiException as exc:
            if exc.status == 409:
                return None
            _raise(exc, f"creating {kind} {meta['namespace']}/{meta['name']}")
        return None

    def patch(self, kind: str, namespace: str, name: str, body: dict[str, Any]) -> None:
        try:
            self._call("patch", kind)(name, namespace, body, _preload_content=False)
        except ApiException as exc:
            _raise(exc, f"patching {kind} {namespace}/{name}")

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Merge `status` into a FineTuneJob's status subresource."""
        try:
            _timed(self.custom.patch_namespaced_custom_object_status)(
                GROUP, VERSION, namespace, PLURAL, name, {"status": status}, _preload_content=False
            )
        except ApiException as exc:
            if exc.status != 404:  # deleted meanwhile: nothing to say
                _raise(exc, f"patching the status of FineTuneJob {namespace}/{name}")

    def post_event(self, body: dict[str, Any], kind: str, reason: str, message: str) -> None:
        """A core/v1 Event about a FineTuneJob (what `kubectl describe ftj` shows)."""
        meta = body.get("metadata") or {}
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name')}.", "namespace": meta.get("namespace")},
            "involvedObject": {
                "apiVersion": body.get("apiVersion"),
                "kind": body.get("kind"),
                "name": meta.get("name"),
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
            },
            "type": kind,
            "reason": reason,
            "message": message[:1024],  # the API server refuses longer Event messages
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": socket.gethostname()[:128],
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            _timed(self.core.create_namespaced_event)(meta.get("namespace"), event, _preload_content=False)
        except ApiException as exc:
            if exc.status != 404:  # the namespace is going away
                _raise(exc, f"posting an Event about FineTuneJob {meta.get('namespace')}/{meta.get('name')}")

    def secret_labels(self, namespace: str, name: str) -> dict[str, str] | None:
        """The labels of a Secret (None when it does not exist); its data is not requested."""
        try:
            response = _timed(self.core.read_namespaced_secret)(
                name, namespace, _preload_content=False, _headers={"Accept": METADATA_ONLY}
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            _raise(exc, f"reading the labels of Secret {namespace}/{name}")
            return None
        return dict((self._json(response).get("metadata") or {}).get("labels") or {})

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        try:
            return self._json(
                _timed(self.core.list_namespaced_pod)(namespace, label_selector=selector, _preload_content=False)
            )["items"]
        except ApiException as exc:
            _raise(exc, f"listing pods {selector} in {namespace}")
        return []

    def delete_pod(self, namespace: str, name: str) -> None:
        """Delete a pod (gone already is fine)."""
        try:
            _timed(self.core.delete_namespaced_pod)(name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                _raise(exc, f"deleting pod {namespace}/{name}")

    def delete_job(self, namespace: str, name: str, uid: str) -> None:
        """Delete a Job and, in the background, its pods; only the one with `uid` (a precondition)."""
        body = client.V1DeleteOptions(propagation_policy="Background", preconditions=client.V1Preconditions(uid=uid))
        try:
            _timed(self.batch.delete_namespaced_job)(name, namespace, body=body)
        except ApiException as exc:
            if exc.status not in (404, 409):  # gone already, or another Job of that name now
                _raise(exc, f"deleting Job {namespace}/{name}")


def scrape_metrics(host: str, port: int, timeout: float = 1.0) -> str | None:
    """The exposition text of a trainer rank, or None while it is not serving yet."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as resp:
            return resp.read().decode()
    except OSError:
        return None
