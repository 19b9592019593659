"""An in-process fake Kubernetes API (kmock's KubernetesEmulator) for operator tests.

Why: the kopf operator must be tested against something that speaks the Kubernetes
API (discovery, list+watch, merge/JSON patches) without a real cluster. kmock's
emulator is an in-memory JSON store behind aiohttp; we run it in a background thread
on 127.0.0.1 and let a real ``kopf run`` subprocess talk to it via a kubeconfig.

Usage::

    from tests.kube_emulator import kube_api, start_kopf, stop_kopf, wait_for  # noqa: F401

    def test_x(kube_api):                      # function-scoped fixture (fresh, empty store)
        kube_api.create_namespace('ns1')       # kopf watches nothing in ns1 until it exists
        proc = start_kopf(kube_api.kubeconfig, 'tests._demo_operator', 'ns1')
        try:
            kube_api.create({...})
            wait_for(lambda: kube_api.get('v1', 'configmaps', 'ns1', 'x'), proc=proc)
        finally:
            log = stop_kopf(proc)              # returns the operator's log text

For a wider scope, build your own fixture around :func:`kube_emulator`.

What the emulator does NOT do: defaulting, validation, admission, owner-reference GC,
field selectors, PUT (replace_*), watch ``resourceVersion`` resumption (each
new watch re-sends all objects as ADDED). :class:`_Emulator` adds the few bits kopf
relies on: metadata.uid/resourceVersion/creationTimestamp/generateName, namespace
stamping, 422 on failed JSON-patch ``test`` ops, the status-subresource split, and
label selectors on list/watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
import jsonpatch
import jsonpointer
import kmock
import kmock._internal.parsing as kmock_parsing
import pytest

ROOT = Path(__file__).resolve().parents[1]
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}

# "group/version/plural" -> (kind, namespaced, subresources). Without verbs kopf skips a
# resource as non-watchable; without CRDs and namespaces kopf never starts its watchers.
RESOURCES: dict[str, tuple[str, bool, set[str]]] = {
    "kubetune.dev/v1alpha1/finetunejobs": ("FineTuneJob", True, {"status"}),
    "v1/configmaps": ("ConfigMap", True, set()),
    "v1/services": ("Service", True, {"status"}),
    "v1/pods": ("Pod", True, {"status"}),
    "v1/events": ("Event", True, set()),
    "v1/secrets": ("Secret", True, set()),
    "networking.k8s.io/v1/networkpolicies": ("NetworkPolicy", True, set()),
    "v1/namespaces": ("Namespace", False, {"status"}),
    "batch/v1/jobs": ("Job", True, {"status"}),
    "coordination.k8s.io/v1/leases": ("Lease", True, set()),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False, {"status"}),
}

T = TypeVar("T")


class KubeAPIError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


@attrs.define(kw_only=True)
class _Emulator(kmock.KubernetesEmulator):
    """kmock's emulator plus the server-side stamping that kopf and real clients expect."""

    _versions: Iterator[int] = attrs.field(factory=lambda: itertools.count(1), init=False)

    async def _handle(self, request: kmock.Request) -> Any:
        # Mutate the parsed body in place: the parent stores/merges exactly this object.
        if request.resource is not None and request.action in (kmock.action.CREATE, kmock.action.UPDATE):
            self._stamp(request)
        key = (request.resource, request.namespace, request.name)
        obj = self._objects[key] if request.action == kmock.action.DELETE and key in self._objects else None
        if obj is not None and not obj.deleted and obj.get("metadata", {}).get("finalizers"):
            obj.patch({"metadata": {"resourceVersion": str(next(self._versions))}})  # soft deletion is a change
        return await super()._handle(request)

    def _stamp(self, request: kmock.Request) -> None:
        data, rv = request.data, str(next(self._versions))
        # NB: ResourcesArray auto-creates entries on [] and .get(), hence the `in` check first.
        split_status = request.resource in self.resources and "status" in self.resources[request.resource].subresources
        if request.action == kmock.action.CREATE and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + secrets.token_hex(3)
            if request.namespace and not meta.get("namespace"):
                meta["namespace"] = request.namespace  # else namespaced watches never see it
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", _now())
            meta.update(resourceVersion=rv, generation=1)
        elif isinstance(data, dict):  # merge patch
            if split_status:  # like a real apiserver: /status patches status only, and vice versa
                keep = {"status"} if request.subresource == "status" else set(data) - {"status"}
                for key in set(data) - keep:
                    del data[key]
            data.setdefault("metadata", {})["resourceVersion"] = rv
        elif isinstance(data, list):  # JSON patch (kopf uses it for finalizers, with a 'test' op)
            if split_status:
                on_status = request.subresource == "status"
                data[:] = [
                    op for op in data if op.get("op") == "test" or op.get("path", "").startswith("/status") == on_status
                ]
            data.append({"op": "add", "path": "/metadata/resourceVersion", "value": rv})

    async def _serve_list(self, request: kmock.Request) -> Any:
        result = await super()._serve_list(request)
        match = _selector(request.params.get("labelSelector", ""))
        return {**result, "items": [obj for obj in result["items"] if match(obj)]}

    async def _serve_watch(self, request: kmock.Request) -> Any:
        match = _selector(request.params.get("labelSelector", ""))
        async for event in super()._serve_watch(request):
            if not isinstance(event, dict) or match(event.get("object", {})):
                yield event

    async def _render_error(self, exc: Exception) -> Any:
        # kopf treats 422 as "conflict, retry later"; a 500 would make it back off and log errors.
        if isinstance(exc, (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException)):
            exc = kmock.KubernetesError(status=422, reason="Invalid", message=str(exc))
        return await super()._render_error(exc)


def _parse_path(path: str, _orig: Callable[[str], Any] = kmock_parsing.parse_path) -> Any:
    """kmock 0.8 reads /api/v1/namespaces[/NAME[/status]] as a namespace prefix (500 or no
    resource); real Kubernetes routes them to the cluster-scoped ``namespaces`` resource."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and (len(parts) <= 4 or parts[4] in ("status", "finalize")):
        return kmock_parsing.ParsedPath("", "v1", "namespaces", None, *(parts[3:5] + [None, None])[:2])
    return _orig(path)


kmock_parsing.parse_path = _parse_path  # process-wide, but it is only a bug fix


def _selector(text: str) -> Callable[[dict[str, Any]], bool]:
    """A label-selector predicate (kmock ignores ?labelSelector=): =, ==, !=, in, notin, [!]key."""
    terms = [t.strip() for t in re.split(r",(?![^(]*\))", text) if t.strip()]

    def check(term: str, labels: dict[str, str]) -> bool:
        if m := re.fullmatch(r"(\S+)\s+(in|notin)\s*\((.*)\)", term):
            values = {v.strip() for v in m[3].split(",")}
            return (labels.get(m[1]) in values) == (m[2] == "in")
        if m := re.fullmatch(r"([^=!\s]+)\s*(==|=|!=)\s*(\S*)", term):
            return (labels.get(m[1]) == m[3]) == (m[2] != "!=")
        return term[1:].strip() not in labels if term.startswith("!") else term in labels

    return lambda obj: all(check(t, obj.get("metadata", {}).get("labels") or {}) for t in terms)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class KubeAPI:
    """A synchronous plain-HTTP client for the emulator (no kubernetes-client quirks)."""

    def __init__(
        self, url: str, kubeconfig: Path, emulator: _Emulator, resources: dict[str, tuple[str, bool, set[str]]]
    ) -> None:
        self.url = url
        self.kubeconfig = kubeconfig
        self.emulator = emulator  # for request assertions only; it lives in another thread
        self._kinds = {(k.rsplit("/", 1)[0], kind): k.rsplit("/", 1)[1] for k, (kind, _, _) in resources.items()}
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore $HTTP_PROXY

    @staticmethod
    def path(
        api_version: str,
        plural: str,
        namespace: str | None = None,
        name: str | None = None,
        subresource: str | None = None,
    ) -> str:
        parts = ["api" if "/" not in api_version else "apis", api_version]
        parts += ["namespaces", namespace] if namespace else []
        parts += [plural] + ([name] if name else []) + ([subresource] if subresource else [])
        return "/" + "/".join(parts)

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        """Send one request; return the parsed JSON, or None for a 404 on GET/DELETE."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": content_type, "Accept": "application/json"},
        )
        try:
            with self._http.open(req, timeout=10) as rsp:
                return json.loads(rsp.read() or b"null")
        except urllib.error.HTTPError as e:
            if e.code == 404 and method in ("GET", "DELETE"):
                return None
            raise KubeAPIError(e.code, e.read().decode(errors="replace")) from None

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """POST an object; the plural comes from RESOURCES by (apiVersion, kind)."""
        plural = self._kinds[(obj["apiVersion"], obj["kind"])]
        namespace = obj.get("metadata", {}).get("namespace")
        return self.request("POST", self.path(obj["apiVersion"], plural, namespace), obj)

    def create_namespace(self, name: str) -> dict[str, Any]:
        """Needed for kopf: it watches a --namespace only once that Namespace object exists.

        (The emulator itself stores namespaced objects whether their namespace exists or not.)
        """
        return self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    def get(self, api_version: str, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        return self.request("GET", self.path(api_version, plural, namespace, name))

    def list(
        self, api_version: str, plural: str, namespace: str | None = None, label_selector: str = ""
    ) -> list[dict[str, Any]]:
        """Objects of one namespace, or of all namespaces when namespace is None."""
        query = "?" + urllib.parse.urlencode({"labelSelector": label_selector}) if label_selector else ""
        return self.request("GET", self.path(api_version, plural, namespace) + query)["items"]

    def patch(
        self, api_version: str, plural: str, namespace: str | None, name: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        """Merge-patch the main resource (a 'status' key is dropped if status is a subresource)."""
        return self.request(
            "PATCH", self.path(api_version, plural, namespace, name), body, "application/merge-patch+json"
        )

    def patch_status(
        self, api_version: str, plural: str, namespace: str | None, name: str, status: dict[str, Any]
    ) -> dict[str, Any]:
        """Merge-patch the status subresource, as a controller (e.g. the Job controller) would."""
        return self.request(
            "PATCH",
            self.path(api_version, plural, namespace, name, "status"),
            {"status": status},
            "application/merge-patch+json",
        )

    def delete(self, api_version: str, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """Delete (or only mark with deletionTimestamp while finalizers remain); None if absent."""
        return self.request("DELETE", self.path(api_version, plural, namespace, name))

    def watched(self, api_version: str, plural: str) -> bool:
        """Whether anyone (i.e. kopf) has opened a watch-stream on this resource yet."""
        res = kmock.resource(f"{api_version}/{plural}")
        return any(r.action == kmock.action.WATCH and r.resource == res for r in self.emulator._requests[:])


@contextlib.contextmanager
def kube_emulator(workdir: Path, resources: dict[str, tuple[str, bool, set[str]]] | None = None) -> Iterator[KubeAPI]:
    """Serve the emulator on 127.0.0.1:<random> in a daemon thread; write <workdir>/kubeconfig.

    One at a time per process: kmock's Server hooks aiohttp's resolver and must unhook LIFO.
    """
    resources = resources or RESOURCES
    ready, box = threading.Event(), {}

    async def serve() -> None:
        async with _Emulator() as emu, kmock.Server(emu, host="127.0.0.1") as server:
            for key, (kind, namespaced, subresources) in resources.items():
                emu.resources[key] = kmock.ResourceInfo(
                    kind=kind, namespaced=namespaced, verbs=VERBS, subresources=subresources
                )
            box.update(emu=emu, url=str(server.url).rstrip("/"), stop=asyncio.Event(), loop=asyncio.get_running_loop())
            ready.set()
            await box["stop"].wait()
            # Open watch-streams never end on their own; aiohttp would wait 60 s for them.
            others = asyncio.all_tasks() - {asyncio.current_task()}
            for task in others:
                task.cancel()
            await asyncio.wait(others, timeout=2)

    def run() -> None:
        try:
            asyncio.run(serve())
        except BaseException as e:  # surface startup failures to the waiting test
            box["error"] = e
            ready.set()

    thread = threading.Thread(target=run, name="kube-emulator", daemon=True)
    thread.start()
    if not ready.wait(10) or "error" in box:
        raise RuntimeError(f"kube emulator did not start: {box.get('error')!r}")
    kubeconfig = Path(workdir) / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {  # JSON is valid YAML: no yaml dependency needed
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "emulator",
                "clusters": [{"name": "emulator", "cluster": {"server": box["url"]}}],
                "users": [{"name": "emulator", "user": {"token": "emulator"}}],
                "contexts": [
                    {"name": "emulator", "context": {"cluster": "emulator", "user": "emulator", "namespace": "default"}}
                ],
            }
        )
    )
    try:
        yield KubeAPI(box["url"], kubeconfig, box["emu"], resources)
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(10)


@pytest.fixture
def kube_api(tmp_path: Path) -> Iterator[KubeAPI]:
    """Function-scoped: a fresh empty emulator per test (starting one takes milliseconds)."""
    with kube_emulator(tmp_path) as api:
        yield api


def start_kopf(
    kubeconfig: Path,
    module: str,
    namespace: str,
    env: dict[str, str] | None = None,
    extra_args: Sequence[str] = (),
    log_path: Path | None = None,
    cmd: Sequence[str] | None = None,
) -> subprocess.Popen[bytes]:
    """Run ``kopf run --standalone -m <module> --namespace <ns> --verbose`` against the emulator.

    KUBECONFIG goes via the environment because the kubernetes package reads it at import.
    kopf watches nothing in ``namespace`` until a Namespace object of that name exists
    (see :meth:`KubeAPI.create_namespace`; before or after the start both work).
    Output goes to ``log_path`` (default: next to the kubeconfig), exposed as ``proc.log_path``.
    """
    log_path = log_path or kubeconfig.parent / f"kopf-{module.rsplit('.', 1)[-1]}.log"
    full_env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        **(env or {}),
    }
    if cmd is None:  # `cmd` runs a whole operator command (e.g. `kubetune operator`) instead
        cmd = [sys.executable, "-m", "kopf", "run", "--standalone", "--verbose", "-m", module, "--namespace", namespace]
        cmd += list(extra_args)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = log_path  # type: ignore[attr-defined]
    return proc


def stop_kopf(proc: subprocess.Popen[bytes], timeout: float = 10) -> str:
    """SIGINT (kopf's graceful stop), then SIGKILL after ``timeout``; return the log text."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]


def wait_for(
    fn: Callable[[], T], timeout: float = 30, interval: float = 0.1, proc: subprocess.Popen[bytes] | None = None
) -> T:
    """Poll until fn() is truthy; fail early (with the log) if the kopf ``proc`` has died."""
    deadline = time.monotonic() + timeout
    while True:
        result = fn()
        if result:
            return result
        if proc is not None and proc.poll() is not None:
            log = Path(getattr(proc, "log_path", "/dev/null")).read_text(errors="replace")
            raise AssertionError(f"kopf exited with {proc.returncode}:\n{log[-5000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        time.sleep(interval)
