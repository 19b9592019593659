"""A real Kubernetes control plane on loopback, for the operator and chart tests.

etcd, kube-apiserver, kube-controller-manager (the Job, Deployment and ReplicaSet controllers, the
garbage collector, service accounts, namespaces), kube-scheduler and kwok (fake kubelets) run as
processes, built from their Go modules by tests/controlplane/build.sh. Certificates are generated
here: a CA, the API server's serving certificate, an admin client certificate (group
system:masters) and the service-account signing key. kwok registers fake nodes with
`nvidia.com/gpu` capacity, so pods are scheduled and move to Running as on a cluster; a test ends
a pod with an exit code through kwok (`Cluster.finish_pod`, tests/controlplane/kwok-stages.yaml).

kwok gives pods addresses in 127.1.0.0/16: every one of them is a loopback address on Linux, so a
test can serve a pod's metrics on its own address.

One control plane serves the whole test session; each test gets a fresh namespace, deleted
afterwards.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from kubetune.s3server import free_port
from prometheus_client.parser import text_string_to_metric_families

from tests.factories import credentials_secret

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "tests" / "controlplane" / "build.sh"
STAGES = ROOT / "tests" / "controlplane" / "kwok-stages.yaml"
BIN = Path(os.environ.get("KUBETUNE_CONTROLPLANE_DIR", ROOT / ".controlplane")) / "bin"
NODES = 6
GPUS_PER_NODE = "8"
POD_CIDR = "127.1.0.0/16"
EXIT_CODE = "test.kubetune.dev/exit-code"
EXIT_MESSAGE = "test.kubetune.dev/message"
T = TypeVar("T")

# The plural of each kind the tests create, by (apiVersion, kind).
PLURALS = {
    ("v1", "Namespace"): "namespaces",
    ("v1", "Secret"): "secrets",
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("v1", "Pod"): "pods",
    ("v1", "Node"): "nodes",
    ("v1", "ServiceAccount"): "serviceaccounts",
    ("batch/v1", "Job"): "jobs",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
    ("kubetune.dev/v1alpha1", "FineTuneJob"): "finetunejobs",
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition"): "customresourcedefinitions",
}


def build() -> Path:
    """The control-plane binaries, built once per machine (reused while go.sum is unchanged)."""
    if shutil.which("go") is None and not (BIN / "kube-apiserver").exists():
        pytest.fail("the test control plane needs a Go toolchain to build (tests/controlplane/build.sh)")
    subprocess.run(["bash", str(BUILD)], check=True)
    return BIN


# -- certificates ----------------------------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(subject: x509.Name, key: Any, issuer: tuple[x509.Certificate, Any] | None, **ext: Any) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        builder = builder.add_extension(x509.ExtendedKeyUsage(ext["usages"]), critical=False)
        if "names" in ext:
            builder = builder.add_extension(x509.SubjectAlternativeName(ext["names"]), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def write_pki(folder: Path) -> dict[str, Path]:
    """CA, API server serving certificate, admin client certificate and service-account keys."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca = _cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubetune-test-ca")]), ca_key, None)
    server_key = _key()
    names = [x509.DNSName(n) for n in ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc")]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "10.96.0.1")]
    server = _cert(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]),
        server_key,
        (ca, ca_key),
        usages=[x509.oid.ExtendedKeyUsageOID.SERVER_AUTH],
        names=names,
    )
    admin_key = _key()
    admin = _cert(
        x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
                x509.NameAttribute(NameOID.COMMON_NAME, "kubetune-test-admin"),
            ]
        ),
        admin_key,
        (ca, ca_key),
        usages=[x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    files = {
        "ca.crt": ca.public_bytes(serialization.Encoding.PEM),
        "server.crt": server.public_bytes(serialization.Encoding.PEM),
        "server.key": _pem_key(server_key),
        "admin.crt": admin.public_bytes(serialization.Encoding.PEM),
        "admin.key": _pem_key(admin_key),
        "sa.key": _pem_key(sa_key),
        "sa.pub": sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    }
    paths = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        (folder / name).chmod(0o600)
        paths[name] = folder / name
    return paths


def kubeconfig(server: str, pki: dict[str, Path], user: dict[str, str], namespace: str = "default") -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server, "certificate-authority": str(pki["ca.crt"])}}],
        "users": [{"name": "test", "user": user}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": namespace}}],
    }


# -- the client the tests use ----------------------------------------------------------------------


class KubeAPIError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


class Cluster:
    """The running control plane, as its admin (a client certificate over HTTPS): plain JSON
    verbs (create, get, list, patch, patch_status, delete), kubectl, and pod endings via kwok."""

    def __init__(self, server: str, workdir: Path, pki: dict[str, Path]) -> None:
        self.url = server
        self.workdir = workdir
        self.pki = pki
        self.kubeconfig = workdir / "admin.kubeconfig"
        self.kubeconfig.write_text(
            json.dumps(
                kubeconfig(
                    server, pki, {"client-certificate": str(pki["admin.crt"]), "client-key": str(pki["admin.key"])}
                )
            )
        )
        context = ssl.create_default_context(cafile=str(pki["ca.crt"]))
        context.load_cert_chain(pki["admin.crt"], pki["admin.key"])
        self._http = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        self.processes: dict[str, subprocess.Popen] = {}

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

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> Any:
        """One request; the parsed JSON, None for a 404 on GET/DELETE, KubeAPIError otherwise."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": content_type, "Accept": "application/json", **(headers or {})},
        )
        try:
            with self._http.open(req, timeout=30) as rsp:
                return json.loads(rsp.read() or b"null")
        except urllib.error.HTTPError as e:
            if e.code == 404 and method in ("GET", "DELETE"):
                return None
            raise KubeAPIError(e.code, e.read().decode(errors="replace")) from None

    def create(self, obj: dict[str, Any], as_user: str | None = None) -> dict[str, Any]:
        plural = PLURALS[(obj["apiVersion"], obj["kind"])]
        namespace = obj.get("metadata", {}).get("namespace")
        headers = {"Impersonate-User": as_user} if as_user else None
        return self.request("POST", self.path(obj["apiVersion"], plural, namespace), obj, headers=headers)

    def post_text(self, api_version: str, plural: str, namespace: str, text: str) -> int:
        """POST a body given as JSON text (one this process could not encode); the status code."""
        req = urllib.request.Request(
            self.url + self.path(api_version, plural, namespace),
            data=text.encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with self._http.open(req, timeout=30) as rsp:
            return rsp.status

    def create_namespace(self, name: str) -> dict[str, Any]:
        return self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    def get(self, api_version: str, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        return self.request("GET", self.path(api_version, plural, namespace, name))

    def list(
        self, api_version: str, plural: str, namespace: str | None = None, label_selector: str = ""
    ) -> list[dict[str, Any]]:
        query = "?" + urllib.parse.urlencode({"labelSelector": label_selector}) if label_selector else ""
        return self.request("GET", self.path(api_version, plural, namespace) + query)["items"]

    def patch(
        self, api_version: str, plural: str, namespace: str | None, name: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        return self.request(
            "PATCH", self.path(api_version, plural, namespace, name), body, "application/merge-patch+json"
        )

    def patch_status(
        self, api_version: str, plural: str, namespace: str | None, name: str, status: dict[str, Any]
    ) -> dict[str, Any]:
        return self.request(
            "PATCH",
            self.path(api_version, plural, namespace, name, "status"),
            {"status": status},
            "application/merge-patch+json",
        )

    def delete(self, api_version: str, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        return self.request("DELETE", self.path(api_version, plural, namespace, name))

    def request_counts(self) -> dict[tuple[str, str, str], float]:
        """The API server's own request counters: (verb, resource, subresource) -> requests so far."""
        counts: dict[tuple[str, str, str], float] = {}
        for family in text_string_to_metric_families(self.kubectl("get", "--raw", "/metrics").stdout):
            if family.name == "apiserver_request":
                for sample in family.samples:
                    if sample.name == "apiserver_request_total":
                        labels = sample.labels
                        key = (labels["verb"], labels["resource"], labels.get("subresource", ""))
                        counts[key] = counts.get(key, 0) + sample.value
        return counts

    def watch(self, api_version: str, plural: str, namespace: str) -> Iterator[dict[str, Any]]:
        """A watch's events (type, object) as they arrive, until the server ends the stream."""
        path = self.path(api_version, plural, namespace) + "?watch=1&allowWatchBookmarks=false&timeoutSeconds=3600"
        with self._http.open(urllib.request.Request(self.url + path), timeout=3600) as stream:
            for line in stream:
                yield json.loads(line)

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        """The real kubectl against this control plane."""
        return subprocess.run(
            [str(BIN / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            capture_output=True,
            text=True,
            input=input,
            check=check,
            timeout=60,
        )

    def delete_finetunejobs(self, namespace: str) -> None:
        """Delete a namespace's FineTuneJobs while the operator still runs, so it sees them go."""
        self.kubectl("delete", "finetunejobs", "--all", "-n", namespace, "--wait=true", "--timeout=60s", check=False)

    def finish_pod(self, namespace: str, name: str, exit_code: int, message: str = "") -> None:
        """End a running pod the way its container would: kwok terminates it with this exit code
        (and termination message), and the Job controller takes it from there."""
        annotations = {EXIT_CODE: str(exit_code)} | ({EXIT_MESSAGE: message} if message else {})
        self.patch("v1", "pods", namespace, name, {"metadata": {"annotations": annotations}})

    def apply_crd(self, path: Path) -> None:
        """Install a CRD and wait until the API server serves it."""
        self.kubectl("apply", "--server-side", "-f", str(path))
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(path))

    def namespace(self, prefix: str) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.create_namespace(name)
        # The service-account controller gives each namespace its "default" ServiceAccount; pods
        # (and so Jobs) are refused until it exists.
        wait_until(lambda: self.get("v1", "serviceaccounts", name, "default"), timeout=30)
        return name


def wait_until(fn: Callable[[], Any], timeout: float = 30, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, KubeAPIError):
            if result := fn():
                return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"not ready within {timeout} s")
        time.sleep(interval)


# -- starting and stopping ------------------------------------------------------------------------


def _start(cluster: Cluster, name: str, argv: list[str]) -> subprocess.Popen:
    log = (cluster.workdir / f"{name}.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    cluster.processes[name] = proc
    return proc


def _alive(cluster: Cluster) -> None:
    for name, proc in cluster.processes.items():
        if proc.poll() is not None:
            tail = (cluster.workdir / f"{name}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")


def _healthy(cluster: Cluster) -> bool:
    _alive(cluster)
    try:
        with cluster._http.open(cluster.url + "/readyz", timeout=5) as rsp:
            return rsp.status == 200
    except (OSError, urllib.error.HTTPError):
        return False


def _ready(obj: dict[str, Any]) -> bool:
    conditions = (obj.get("status") or {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def node(name: str, gpus: str = GPUS_PER_NODE) -> dict[str, Any]:
    capacity = {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": gpus}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "type": "kwok"},
        },
        "status": {"capacity": capacity, "allocatable": capacity},
    }


@contextlib.contextmanager
def control_plane(
    workdir: Path,
    nodes: int = NODES,
    gpus_per_node: str = GPUS_PER_NODE,
    client_qps: int | None = None,
    apiserver_args: tuple[str, ...] = (),
) -> Iterator[Cluster]:
    """Start etcd, the API server, controller-manager, scheduler and kwok; stop them all after.

    `client_qps` raises the controller-manager's and scheduler's client rate limits (20 and 50
    requests/s by default), as a cluster that runs a thousand jobs at once would (kwok's own are
    high already)."""
    qps = [f"--kube-api-qps={client_qps}", f"--kube-api-burst={client_qps * 2}"] if client_qps else []
    bin_ = build()
    workdir.mkdir(parents=True, exist_ok=True)
    pki = write_pki(workdir / "pki")
    api_port, etcd_port, peer_port = free_port(), free_port(), free_port()
    cluster = Cluster(f"https://127.0.0.1:{api_port}", workdir, pki)
    try:
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        _start(
            cluster,
            "etcd",
            [
                str(bin_ / "etcd"),
                "--data-dir",
                str(workdir / "etcd"),
                "--listen-client-urls",
                etcd_url,
                "--advertise-client-urls",
                etcd_url,
                "--listen-peer-urls",
                peer_url,
                "--initial-advertise-peer-urls",
                peer_url,
                "--initial-cluster",
                f"default={peer_url}",
                "--unsafe-no-fsync",  # test data: durability is not the point, speed is
                "--log-level",
                "warn",
            ],
        )
        _start(
            cluster,
            "kube-apiserver",
            [
                str(bin_ / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                f"--cert-dir={workdir / 'apiserver'}",
                f"--tls-cert-file={pki['server.crt']}",
                f"--tls-private-key-file={pki['server.key']}",
                f"--client-ca-file={pki['ca.crt']}",
                "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={pki['sa.pub']}",
                f"--service-account-signing-key-file={pki['sa.key']}",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--enable-priority-and-fairness=false",
                "--profiling=false",
                "--v=1",
                *apiserver_args,
            ],
        )
        wait_until(lambda: _healthy(cluster), timeout=90)
        admin = workdir / "admin.kubeconfig"
        _start(
            cluster,
            "kube-controller-manager",
            [
                str(bin_ / "kube-controller-manager"),
                f"--kubeconfig={admin}",
                "--controllers=job-controller,garbage-collector-controller,serviceaccount-controller,"
                "serviceaccount-token-controller,namespace-controller,ttl-after-finished-controller,"
                "deployment-controller,replicaset-controller",
                "--leader-elect=false",
                f"--service-account-private-key-file={pki['sa.key']}",
                f"--root-ca-file={pki['ca.crt']}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--v=1",
                *qps,
            ],
        )
        _start(
            cluster,
            "kube-scheduler",
            [
                str(bin_ / "kube-scheduler"),
                f"--kubeconfig={admin}",
                f"--authentication-kubeconfig={admin}",
                f"--authorization-kubeconfig={admin}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--v=1",
                *qps,
            ],
        )
        _start(
            cluster,
            "kwok",
            [
                str(bin_ / "kwok"),
                f"--kubeconfig={admin}",
                f"--config={STAGES}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                f"--cidr={POD_CIDR}",
                "--node-ip=127.0.0.1",
                f"--server-address=127.0.0.1:{free_port()}",
            ],
        )
        for index in range(nodes):
            cluster.create(node(f"kwok-gpu-{index}", gpus_per_node))
        wait_until(lambda: all(_ready(n) for n in cluster.list("v1", "nodes")), timeout=60)
        # The API server taints a new node not-ready; on a cluster the node-lifecycle controller lifts
        # the taint once the kubelet reports Ready. That controller would also evict pods from nodes
        # whose kubelet stops renewing its lease, which kwok's fake kubelets do not: lift it here.
        for index in range(nodes):
            cluster.patch("v1", "nodes", None, f"kwok-gpu-{index}", {"spec": {"taints": None}})
        wait_until(lambda: cluster.get("v1", "serviceaccounts", "default", "default"), timeout=60)
        yield cluster
    finally:
        _alive_or_log = [name for name, p in cluster.processes.items() if p.poll() is not None]
        for name in reversed(list(cluster.processes)):
            proc = cluster.processes[name]
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if _alive_or_log:
            print(f"control-plane processes that had exited early: {_alive_or_log}")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    with control_plane(tmp_path_factory.mktemp("controlplane")) as running:
        running.apply_crd(ROOT / "crds" / "finetunejob.yaml")
        yield running


@pytest.fixture
def namespace(cluster: Cluster, request) -> Iterator[str]:
    """A fresh namespace per test, deleted (with everything in it) afterwards."""
    prefix = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    name = cluster.namespace(prefix)
    yield name
    with contextlib.suppress(KubeAPIError):
        cluster.delete("v1", "namespaces", None, name)


# -- the operator as a process --------------------------------------------------------------------


@pytest.fixture
def operator(cluster: Cluster, namespace: str, tmp_path: Path):
    """Start `kubetune operator` for the test's namespace (call again to restart it): the
    example's credentials Secret is there, marked by the namespace's admin. Its FineTuneJobs are
    deleted while it still runs, and a test fails if its log holds a traceback."""
    cluster.create(credentials_secret(namespace))
    env = {
        "KUBETUNE_NAMESPACES": json.dumps([namespace]),
        "KUBETUNE_STATUS_INTERVAL_S": "0.5",
        "KUBETUNE_METRICS_PORT": str(free_port()),
        "KUBETUNE_LIVENESS_PORT": str(free_port()),
        "KUBETUNE_TRAINER__METRICS_PORT": str(free_port()),
        "KUBETUNE_TRAINER__IMAGE": "registry.example/kubetune-trainer:test",
    }
    procs = []

    def start(kubeconfig: Path | None = None, **settings: str):
        """`settings`: more KUBETUNE_* variables, e.g. status_interval_s="600"; `kubeconfig`: another
        way to the API server (tests/fault_proxy.py)."""
        env.update({f"KUBETUNE_{k.upper()}": v for k, v in settings.items()})
        proc = start_operator(kubeconfig or cluster.kubeconfig, env, tmp_path / f"operator-{len(procs)}.log")
        procs.append(proc)
        proc.ports = {k: int(env[f"KUBETUNE_{k.upper()}_PORT"]) for k in ("metrics", "liveness")}
        proc.trainer_port = int(env["KUBETUNE_TRAINER__METRICS_PORT"])
        return proc

    yield start
    if procs and procs[-1].poll() is None:
        cluster.delete_finetunejobs(namespace)
    for proc in procs:
        log = stop_operator(proc)
        assert "Traceback" not in log, log[-4000:]


def start_operator(kubeconfig: Path, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Run `kubetune operator` as a process against the cluster that `kubeconfig` names.

    KUBECONFIG goes through the environment: the kubernetes package reads it at import. Output
    goes to `log_path`, exposed as `proc.log_path`.
    """
    full_env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        **env,
    }
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kubetune.cli", "operator"],
            cwd=ROOT,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    proc.log_path = log_path  # type: ignore[attr-defined]
    return proc


def stop_operator(proc: subprocess.Popen[bytes], timeout: float = 10) -> str:
    """SIGINT (kopf's graceful stop), then SIGKILL after `timeout`; return the log text."""
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
    """Poll until fn() is truthy; fail early (with its log) if the operator `proc` has died."""
    deadline = time.monotonic() + timeout
    while True:
        result = fn()
        if result:
            return result
        if proc is not None and proc.poll() is not None:
            log = Path(getattr(proc, "log_path", "/dev/null")).read_text(errors="replace")
            raise AssertionError(f"the operator exited with {proc.returncode}:\n{log[-5000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        time.sleep(interval)
