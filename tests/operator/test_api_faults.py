"""The operator under API faults, through a proxy in front of the real API server
(tests/fault_proxy.py): a held request, 5xx answers and conflicts for objects that do not exist.
Every job still gets exactly one Job, and a stuck call holds up no other job."""

from __future__ import annotations

import time

from tests.factories import example_job
from tests.fault_proxy import Fault, FaultProxy
from tests.kube_cluster import Cluster, wait_for

FTJ = ("kubetune.dev/v1alpha1", "finetunejobs")
JOBS = ("batch/v1", "jobs")


def test_a_held_request_holds_up_only_its_own_job(cluster: Cluster, namespace: str, operator, tmp_path) -> None:
    with FaultProxy(cluster, tmp_path) as proxy:
        held = proxy.add(Fault("POST", f"/namespaces/{namespace}/jobs$", hold_s=40, body='"name": "held"'))
        proc = operator(kubeconfig=proxy.kubeconfig)
        cluster.create(example_job("held", namespace))
        wait_for(lambda: held.hits, proc=proc)
        start = time.monotonic()
        cluster.create(example_job("free", namespace))
        wait_for(lambda: cluster.get(*JOBS, namespace, "free"), proc=proc)
        assert time.monotonic() - start < 15 and cluster.get(*JOBS, namespace, "held") is None  # still held
        # The client gives up after its 20 s read timeout and the job is tried again.
        wait_for(lambda: cluster.get(*JOBS, namespace, "held"), timeout=60, proc=proc)
        assert [j["metadata"]["name"] for j in cluster.list(*JOBS, namespace)] == ["free", "held"]
        assert "did not answer" in proc.log_path.read_text()


def test_errors_and_false_conflicts_still_give_each_job_one_job(
    cluster: Cluster, namespace: str, operator, tmp_path
) -> None:
    """500s on creates, 503s on status writes, and 409 Conflict for Jobs that do not exist (what a
    flaky proxy or an API server restart can answer): each job converges to exactly one Job."""
    names = [f"job-{i}" for i in range(5)]
    with FaultProxy(cluster, tmp_path) as proxy:
        faults = [
            proxy.add(Fault("POST", f"/namespaces/{namespace}/configmaps$", status=500, times=3)),
            proxy.add(Fault("POST", f"/namespaces/{namespace}/jobs$", status=409, times=3)),
            proxy.add(Fault("PATCH", "/finetunejobs/[^/]+/status$", status=503, times=3)),
        ]
        proc = operator(kubeconfig=proxy.kubeconfig)
        for name in names:
            cluster.create(example_job(name, namespace))
        for name in names:
            wait_for(lambda name=name: cluster.get(*JOBS, namespace, name), timeout=60, proc=proc)
            phase = lambda name=name: (cluster.get(*FTJ, namespace, name).get("status") or {}).get("phase")  # noqa: E731
            wait_for(lambda phase=phase: phase() in ("Pending", "Staging"), proc=proc)
        assert sorted(j["metadata"]["name"] for j in cluster.list(*JOBS, namespace)) == names
        assert [len(f.hits) for f in faults] == [3, 3, 3]
        for name in names:  # owned by their own FineTuneJob
            uid = cluster.get(*FTJ, namespace, name)["metadata"]["uid"]
            assert cluster.get(*JOBS, namespace, name)["metadata"]["ownerReferences"][0]["uid"] == uid
