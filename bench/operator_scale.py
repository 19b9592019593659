"""The operator at scale, against a real control plane on this machine: the real `kubetune operator`
process, kube-apiserver and etcd, the Job controller, the scheduler, and kwok's fake GPU nodes
(tests/controlplane, built by `make controlplane`). Everything shares this machine's cores.

For each size (FineTuneJobs created at once, from 16 client threads), with every rank 0 answering
its metrics, it prints:

  apply -> Job   p50/p99: from a FineTuneJob's create response to its Job in a watch
  -> Running     p50/p99: until its status says Running (pods scheduled by the real scheduler,
                 run by kwok, rank 0 scraped)
  RSS            of the operator process once every job runs
  requests       the operator's API requests per new job, and the API server's time on them

Then, with the first size's jobs Running, windows of `--seconds` each:

  healthy        the operator's API requests/s (watches aside) and CPU seconds per minute
  hung           the same while every metrics endpoint accepts connections and never answers;
                 jobs that left Running; apply -> Job for 20 jobs created meanwhile

The operator's requests are counted from the API server's own audit log, by user agent
(kubetune-operator/ for the control loop, kopf/ for the watches).

    uv run python bench/operator_scale.py --sizes 200 1000 --seconds 60
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kubetune.s3server import free_port  # noqa: E402
from kubetune_trainer.metrics.events import Snapshot  # noqa: E402
from kubetune_trainer.metrics.prometheus import PrometheusWriter  # noqa: E402
from prometheus_client import start_http_server  # noqa: E402

from tests.factories import credentials_secret, example_job  # noqa: E402
from tests.kube_cluster import Cluster, control_plane, start_operator, stop_operator, wait_until  # noqa: E402

FTJ = ("kubetune.dev/v1alpha1", "finetunejobs")
JOBS = ("batch/v1", "jobs")
SMALL = {"nodes": 1, "gpusPerNode": 1, "cpu": "1", "memory": "4Gi", "shmSize": "1Gi"}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


class Watcher:
    """When each Job first appeared, and when each FineTuneJob first reached each phase."""

    def __init__(self, cluster: Cluster, namespace: str) -> None:
        self.job_seen: dict[str, float] = {}
        self.phase_seen: dict[tuple[str, str], float] = {}
        self.phases: dict[str, str] = {}
        for target, plural in ((self._job, JOBS), (self._ftj, FTJ)):
            threading.Thread(target=self._follow, args=(cluster, namespace, plural, target), daemon=True).start()

    @staticmethod
    def _follow(cluster: Cluster, namespace: str, plural: tuple[str, str], target) -> None:
        """Follow the watch, opened again whenever the server ends it."""
        while True:
            try:
                for event in cluster.watch(*plural, namespace):
                    if event.get("type") in ("ADDED", "MODIFIED"):
                        target(event)
            except (OSError, ValueError) as exc:
                print(f"watch of {plural[1]} ended ({exc}); opening it again", file=sys.stderr, flush=True)
                time.sleep(1)

    def _job(self, event: dict) -> None:
        self.job_seen.setdefault(event["object"]["metadata"]["name"], time.monotonic())

    def _ftj(self, event: dict) -> None:
        name = event["object"]["metadata"]["name"]
        phase = (event["object"].get("status") or {}).get("phase")
        if phase:
            self.phases[name] = phase
            self.phase_seen.setdefault((name, phase), time.monotonic())

    def count(self, phase: str) -> int:
        return sum(1 for p in self.phases.values() if p == phase)


def create_jobs(cluster: Cluster, namespace: str, names: list[str]) -> dict[str, float]:
    """Create the FineTuneJobs at once; when each create answered."""
    applied: dict[str, float] = {}

    def create(name: str) -> None:
        cluster.create(example_job(name, namespace, resources=SMALL, runPolicy={"backoffLimit": 3}))
        applied[name] = time.monotonic()

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(create, names))
    return applied


def latencies(applied: dict[str, float], seen: dict[str, float]) -> list[float]:
    return [seen[n] - t for n, t in applied.items() if n in seen]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def control_plane_cpu(cluster: Cluster) -> dict[str, float]:
    """CPU seconds each control-plane process has used so far."""
    return {name: cpu_seconds(proc.pid) for name, proc in cluster.processes.items() if proc.poll() is None}


AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: None
  verbs: [watch]
- level: Metadata
"""
OPERATOR_AGENTS = ("kubetune-operator/", "kopf/")


class Audit:
    """The operator's requests, from the API server's own audit log (told apart by user agent)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self.events: list[dict] = []

    def read(self) -> None:
        with self.path.open() as log:
            log.seek(self._offset)
            for line in log:
                event = json.loads(line)
                if event.get("userAgent", "").startswith(OPERATOR_AGENTS):
                    self.events.append(event)
            self._offset = log.tell()

    def between(self, start: float, end: float) -> list[dict]:
        """Requests received between two wall-clock times (time.time())."""
        self.read()
        return [e for e in self.events if start <= _stamp(e["requestReceivedTimestamp"]) < end]


def _stamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def summary(events: list[dict], seconds: float) -> dict:
    """Requests per second by "verb resource[/subresource]", and the API server's time on them."""
    counts: dict[str, int] = {}
    for e in events:
        ref = e.get("objectRef") or {}
        key = f"{e['verb']} {ref.get('resource', e.get('requestURI', ''))}" + (
            f"/{ref['subresource']}" if ref.get("subresource") else ""
        )
        counts[key] = counts.get(key, 0) + 1
    latency = [_stamp(e["stageTimestamp"]) - _stamp(e["requestReceivedTimestamp"]) for e in events]
    return {
        "requests": len(events),
        "requests_per_s": len(events) / seconds,
        "by_request": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
        "api_latency_s": {"p50": percentile(latency, 50), "p99": percentile(latency, 99)} if latency else None,
    }


@contextlib.contextmanager
def metrics_endpoint(port: int) -> Iterator[None]:
    """Rank 0's metrics for every pod: kwok's pod addresses are loopback, 0.0.0.0 answers them all."""
    writer = PrometheusWriter("bench", "bench", 0, "sam2")
    scalars = {"step": 500, "total_steps": 2000, "epoch": 1, "loss": 0.25, "lr": 1e-5, "images_per_second": 64.0}
    writer.write(Snapshot(step=500, scalars=scalars, observations={"step_seconds": [0.5]}, increments={}))
    server, _ = start_http_server(port, addr="0.0.0.0", registry=writer.registry)
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def hung_endpoint(port: int) -> Iterator[None]:
    """Accepts connections (the kernel's backlog) and never answers."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    sock.listen(4096)
    try:
        yield
    finally:
        sock.close()


def operator_env(namespace: str, trainer_port: int) -> dict[str, str]:
    return {
        "KUBETUNE_NAMESPACES": json.dumps([namespace]),
        "KUBETUNE_METRICS_PORT": str(free_port()),
        "KUBETUNE_LIVENESS_PORT": str(free_port()),
        "KUBETUNE_TRAINER__METRICS_PORT": str(trainer_port),
        "KUBETUNE_TRAINER__IMAGE": "registry.example/kubetune-trainer:bench",
    }


def healthy(env: dict[str, str]) -> bool:
    with contextlib.suppress(OSError):
        url = f"http://127.0.0.1:{env['KUBETUNE_LIVENESS_PORT']}/healthz"
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    return False


def window(audit: Audit, pid: int, seconds: float) -> dict:
    """The operator's API requests and CPU over `seconds` of steady state."""
    cpu, start = cpu_seconds(pid), time.time()
    time.sleep(seconds)
    end = time.time()
    return summary(audit.between(start, end), end - start) | {
        "cpu_s_per_min": (cpu_seconds(pid) - cpu) / (end - start) * 60
    }


def run_size(
    cluster: Cluster, audit: Audit, workdir: Path, size: int, trainer_port: int, steady: bool, seconds: float
) -> dict:
    namespace = cluster.namespace(f"scale-{size}")
    cluster.create(credentials_secret(namespace))
    env = operator_env(namespace, trainer_port)
    proc = start_operator(cluster.kubeconfig, env, workdir / f"operator-{size}.log")
    result: dict = {"jobs": size}
    try:
        wait_until(lambda: healthy(env), timeout=60)
        watcher = Watcher(cluster, namespace)
        time.sleep(1)  # the watches are open
        names = [f"job-{i:04d}" for i in range(size)]
        with metrics_endpoint(trainer_port):
            started, cpu, plane = time.time(), cpu_seconds(proc.pid), control_plane_cpu(cluster)
            applied = create_jobs(cluster, namespace, names)
            wait_until(lambda: all(n in watcher.job_seen for n in names), timeout=max(300, size))
            creating = audit.between(started, time.time())
            creating_cpu, creating_s = cpu_seconds(proc.pid) - cpu, time.time() - started
            plane = {k: round(v - plane[k], 1) for k, v in control_plane_cpu(cluster).items()}
            wait_until(lambda: watcher.count("Running") >= size, timeout=max(300, size))
            to_job = latencies(applied, watcher.job_seen)
            running = latencies(applied, {n: watcher.phase_seen[(n, "Running")] for n in names})
            result |= {
                "apply_to_job_s": {"p50": percentile(to_job, 50), "p99": percentile(to_job, 99), "max": max(to_job)},
                "apply_to_running_s": {"p50": percentile(running, 50), "p99": percentile(running, 99)},
                "operator_rss_mib": rss_mib(proc.pid),
                "creating": summary(creating, creating_s)
                | {
                    "requests_per_job": len(creating) / size,
                    "seconds": creating_s,
                    "operator_cpu_s": creating_cpu,
                    "control_plane_cpu_s": plane,
                },
            }
            print(json.dumps(result), flush=True)
            if steady:
                time.sleep(5)
                result["healthy"] = window(audit, proc.pid, seconds)
                print(json.dumps({"healthy": result["healthy"]}), flush=True)
        if steady:
            with hung_endpoint(trainer_port):
                hung = window(audit, proc.pid, seconds)
                hung["left_running"] = sum(1 for n in names if watcher.phases.get(n) != "Running")
                extra = [f"late-{i:02d}" for i in range(20)]
                late = create_jobs(cluster, namespace, extra)
                wait_until(lambda: all(n in watcher.job_seen for n in extra), timeout=120)
                late_to_job = latencies(late, watcher.job_seen)
                hung["new_jobs_apply_to_job_s"] = {"p50": percentile(late_to_job, 50), "max": max(late_to_job)}
                hung["not_answering"] = sum(
                    1
                    for n in names[:50]
                    if "not answering"
                    in ((cluster.get(*FTJ, namespace, n) or {}).get("status") or {}).get("message", "")
                )
                result["hung"] = hung
                print(json.dumps({"hung": hung}), flush=True)
    finally:
        stop_operator(proc, timeout=30)
    cluster.delete("v1", "namespaces", None, namespace)
    wait_until(lambda: cluster.get("v1", "namespaces", None, namespace) is None, timeout=900)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--seconds", type=float, default=60, help="length of each steady-state window")
    parser.add_argument("--nodes", type=int, default=20, help="kwok nodes of 64 GPUs each")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--workdir", type=Path, help="keep the control plane's and operator's logs here")
    args = parser.parse_args()
    results = {"machine": {"cpus": os.cpu_count()}, "sizes": []}
    with tempfile.TemporaryDirectory(prefix="kubetune-scale-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        policy, log = workdir / "audit-policy.yaml", workdir / "audit.log"
        policy.write_text(AUDIT_POLICY)
        auditing = (f"--audit-policy-file={policy}", f"--audit-log-path={log}", "--audit-log-mode=batch")
        with control_plane(
            workdir / "controlplane", nodes=args.nodes, gpus_per_node="64", client_qps=500, apiserver_args=auditing
        ) as cluster:
            cluster.apply_crd(ROOT / "crds" / "finetunejob.yaml")
            trainer_port, audit = free_port(), Audit(log)
            for i, size in enumerate(args.sizes):
                results["sizes"].append(run_size(cluster, audit, workdir, size, trainer_port, i == 0, args.seconds))
    first = results["sizes"][0]
    print("\n== kubetune operator at scale (real kube-apiserver, Job controller, scheduler, kwok) ==")
    for r in results["sizes"]:
        print(
            f"{r['jobs']:5d} jobs: apply -> Job p50 {r['apply_to_job_s']['p50']:.2f} s, "
            f"p99 {r['apply_to_job_s']['p99']:.2f} s; -> Running p50 {r['apply_to_running_s']['p50']:.2f} s, "
            f"p99 {r['apply_to_running_s']['p99']:.2f} s; operator RSS {r['operator_rss_mib']:.0f} MiB; "
            f"{r['creating']['requests_per_job']:.1f} operator requests per new job "
            f"(operator CPU {r['creating']['operator_cpu_s'] / r['creating']['seconds'] * 100:.0f} % of a core), "
            f"control plane CPU {sum(r['creating']['control_plane_cpu_s'].values()) / r['creating']['seconds']:.0%}, "
            "API server p50/p99 "
            f"{r['creating']['api_latency_s']['p50'] * 1000:.0f}/{r['creating']['api_latency_s']['p99'] * 1000:.0f} ms"
        )
    if "healthy" in first:
        n = first["jobs"]
        for key in ("healthy", "hung"):
            w = first[key]
            print(
                f"{n} Running, {key:7s}: operator {w['requests_per_s']:.2f} requests/s "
                f"({w['requests_per_s'] / n * 100:.2f} per 100 jobs), {w['cpu_s_per_min']:.1f} CPU s/min"
            )
        hung = first["hung"]
        print(
            f"hung endpoints: {hung['left_running']} of {n} left Running, {hung['not_answering']} of 50 sampled say "
            f"'not answering'; 20 new jobs apply -> Job p50 {hung['new_jobs_apply_to_job_s']['p50']:.2f} s, "
            f"max {hung['new_jobs_apply_to_job_s']['max']:.2f} s"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
