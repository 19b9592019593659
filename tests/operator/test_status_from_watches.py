"""The control loop against the real control plane: a job's status follows the watches of its Job
and pods (no timer per job, so no finalizer), and rank 0's metrics endpoint can hang without
changing the phase or holding up other jobs."""

from __future__ import annotations

import contextlib
import socket
import time

from tests.factories import example_job
from tests.kube_cluster import Cluster, stop_operator, wait_for
from tests.operator.test_operator_on_cluster import FTJ, JOBS, phase_is, running_pods, serve_rank0, status


def test_status_follows_the_job_and_its_pods_not_a_timer(cluster: Cluster, namespace: str, operator) -> None:
    """With status passes every 10 minutes, each change of the Job or its pods still reaches the
    status at once; the FineTuneJob carries no finalizer, so it deletes without the operator."""
    proc = operator(status_interval_s="600")
    cluster.create(example_job("watched", namespace))
    pods = running_pods(cluster, namespace, "watched", 2)
    wait_for(phase_is(cluster, namespace, "watched", "Staging"), timeout=15, proc=proc)
    for pod in pods:
        cluster.finish_pod(namespace, pod["metadata"]["name"], 0)
    wait_for(phase_is(cluster, namespace, "watched", "Succeeded"), timeout=15, proc=proc)
    assert not cluster.get(*FTJ, namespace, "watched")["metadata"].get("finalizers")
    stop_operator(proc)
    cluster.kubectl("delete", "ftj", "watched", "-n", namespace, "--wait=true", "--timeout=20s")
    assert cluster.get(*FTJ, namespace, "watched") is None


@contextlib.contextmanager
def hung_endpoint(host: str, port: int):
    """A metrics endpoint that accepts connections (the kernel's backlog) and never answers."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(64)
    try:
        yield
    finally:
        sock.close()


def test_a_hung_metrics_endpoint_keeps_the_phase_and_holds_up_no_other_job(
    cluster: Cluster, namespace: str, operator, writers
) -> None:
    proc = operator()
    cluster.create(example_job("hangs", namespace))
    rank0 = running_pods(cluster, namespace, "hangs", 2)[0]
    writer = serve_rank0(rank0, proc.trainer_port, writers)
    wait_for(phase_is(cluster, namespace, "hangs", "Running"), proc=proc)
    writer.stop()
    with hung_endpoint(rank0["status"]["podIP"], proc.trainer_port):
        wait_for(lambda: "not answering" in status(cluster, namespace, "hangs").get("message", ""), proc=proc)
        cluster.create(example_job("next", namespace))
        wait_for(lambda: cluster.get(*JOBS, namespace, "next"), proc=proc)
        time.sleep(3)  # six status passes with a scrape that times out
        current = status(cluster, namespace, "hangs")
        assert current["phase"] == "Running", current
        assert current["progress"]["step"] == 500  # the last progress stays
        assert current["message"] == "step 500; rank 0's metrics are not answering"
    writer = serve_rank0(rank0, proc.trainer_port, writers, step=600)
    wait_for(lambda: status(cluster, namespace, "hangs").get("progress", {}).get("step") == 600, proc=proc)
    assert status(cluster, namespace, "hangs")["message"] == "step 600 of 2000"
