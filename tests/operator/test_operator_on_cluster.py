"""A real `kubetune operator` process against an HTTP Kubernetes API emulator (kmock).

The emulator proves the wiring: watch -> handler -> API calls -> status. Kubernetes itself is
played by this test: it patches Job status and creates pods the way the Job controller would.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest
from kubetune.s3server import free_port
from kubetune_trainer.metrics.events import Snapshot
from kubetune_trainer.metrics.prometheus import PrometheusWriter
from prometheus_client.parser import text_string_to_metric_families

from tests.factories import credentials_secret, example_job
from tests.kube_emulator import start_kopf, stop_kopf, wait_for

NS = "ml"
FTJ = ("kubetune.dev/v1alpha1", "finetunejobs")
JOBS = ("batch/v1", "jobs")
T1 = "2026-11-22T10:05:00Z"


def manifest(name: str, **spec) -> dict:
    raw = example_job(**spec)
    raw["metadata"] = {"name": name, "namespace": NS}
    return raw


@pytest.fixture
def rank0_port() -> int:
    """A real trainer metrics endpoint (the trainer's own writer) posing as pod index 0."""
    writer = PrometheusWriter("labpics-sam2", NS, 0, "sam2")
    port = writer.serve(0, addr="127.0.0.1")
    writer.write(
        Snapshot(
            step=500,
            scalars={
                "step": 500,
                "total_steps": 2000,
                "epoch": 1,
                "loss": 0.25,
                "lr": 1e-5,
                "images_per_second": 64.0,
                "checkpoint/last_step": 500,
                "best/miou": 0.81,
            },
            observations={"step_seconds": [0.5] * 10},
            increments={},
        )
    )
    return port


@pytest.fixture
def operator(kube_api, rank0_port: int):
    kube_api.create_namespace(NS)
    # The example's credentials Secret, marked for kubetune by the namespace's admin.
    kube_api.create(credentials_secret(NS))
    env = {
        "KUBETUNE_NAMESPACES": json.dumps([NS]),
        "KUBETUNE_STATUS_INTERVAL_S": "0.5",
        "KUBETUNE_METRICS_PORT": str(free_port()),
        "KUBETUNE_LIVENESS_PORT": str(free_port()),
        "KUBETUNE_TRAINER__METRICS_PORT": str(rank0_port),
        "KUBETUNE_TRAINER__IMAGE": "registry.example/kubetune-trainer:test",
    }
    procs = []
    ports = {"metrics": int(env["KUBETUNE_METRICS_PORT"]), "liveness": int(env["KUBETUNE_LIVENESS_PORT"])}

    def start():
        proc = start_kopf(
            kube_api.kubeconfig,
            "",
            NS,
            env=env,
            cmd=[sys.executable, "-m", "kubetune.cli", "operator"],
            log_path=kube_api.kubeconfig.parent / f"operator-{len(procs)}.log",
        )
        procs.append(proc)
        proc.ports = ports
        return proc

    yield start
    for proc in procs:
        log = stop_kopf(proc)
        assert "Traceback" not in log, log[-4000:]


def status(api, name: str) -> dict:
    return (api.get(*FTJ, NS, name) or {}).get("status") or {}


def phase_is(api, name: str, phase: str):
    return lambda: status(api, name) if status(api, name).get("phase") == phase else None


def pod(name: str, index: int, phase: str, terminated: dict | None = None) -> dict:
    st: dict = {"phase": phase, "podIP": "127.0.0.1"}
    if terminated:
        st["containerStatuses"] = [{"name": "trainer", "state": {"terminated": terminated}}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{name}-{index}-x",
            "namespace": NS,
            "labels": {"kubetune.dev/finetunejob": name, "batch.kubernetes.io/job-completion-index": str(index)},
        },
        "spec": {"containers": [{"name": "trainer", "image": "x"}]},
        "status": st,
    }


def test_lifecycle_apply_to_succeeded(kube_api, operator) -> None:
    proc = operator()
    ftj = kube_api.create(manifest("labpics-sam2"))
    job = wait_for(lambda: kube_api.get(*JOBS, NS, "labpics-sam2"), proc=proc)
    config_map = kube_api.get("v1", "configmaps", NS, "labpics-sam2-config")
    service = kube_api.get("v1", "services", NS, "labpics-sam2")
    assert json.loads(config_map["data"]["train.json"])["job"] == {"name": "labpics-sam2", "namespace": NS}
    assert service["spec"]["clusterIP"] == "None"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert job["metadata"]["ownerReferences"][0]["uid"] == ftj["metadata"]["uid"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example/kubetune-trainer:test"
    policy = kube_api.get("networking.k8s.io/v1", "networkpolicies", NS, "labpics-sam2")
    assert policy["spec"]["podSelector"] == {"matchLabels": {"kubetune.dev/finetunejob": "labpics-sam2"}}
    wait_for(phase_is(kube_api, "labpics-sam2", "Pending"), proc=proc)

    # Kubernetes starts the pods; rank 0 serves metrics: the status timer fills progress.
    kube_api.patch_status(*JOBS, NS, "labpics-sam2", {"active": 2, "startTime": "2026-11-22T10:00:00Z"})
    for index in (0, 1):
        kube_api.create(pod("labpics-sam2", index, "Running"))
    running = wait_for(phase_is(kube_api, "labpics-sam2", "Running"), proc=proc)
    assert running["progress"] == {
        "epoch": 1,
        "step": 500,
        "totalSteps": 2000,
        "percent": 25.0,
        "loss": 0.25,
        "learningRate": 1e-5,
        "imagesPerSecond": 64.0,
        "eta": "12m30s",
    }
    assert running["bestMetric"] == {"metric": "miou", "value": 0.81}
    assert running["lastCheckpoint"] == "s3://runs/labpics-sam2/checkpoints/step-00000500/"

    # An operator restart changes nothing: still one Job, same uid.
    stop_kopf(proc)
    proc = operator()
    wait_for(lambda: "reconcile" in Path(proc.log_path).read_text() or status(kube_api, "labpics-sam2"), proc=proc)
    jobs = kube_api.list(*JOBS, NS)
    assert [j["metadata"]["uid"] for j in jobs] == [job["metadata"]["uid"]]

    kube_api.patch_status(
        *JOBS,
        NS,
        "labpics-sam2",
        {
            "active": 0,
            "succeeded": 2,
            "completionTime": T1,
            "conditions": [
                {"type": "Complete", "status": "True", "reason": "", "message": "", "lastTransitionTime": T1}
            ],
        },
    )
    done = wait_for(phase_is(kube_api, "labpics-sam2", "Succeeded"), proc=proc)
    assert done["completionTime"] == T1 and done["progress"]["percent"] == 100.0
    assert {c["type"]: c["status"] for c in done["conditions"]}["Succeeded"] == "True"
    reasons = wait_for(
        lambda: (
            {e.get("reason") for e in kube_api.list("v1", "events", NS)} >= {"Pending", "Running", "Succeeded"}
            and {e.get("reason") for e in kube_api.list("v1", "events", NS)}
        ),
        proc=proc,
    )
    assert "Succeeded" in reasons

    # The operator's own endpoints: Prometheus metrics and kopf's liveness probe.
    with urllib.request.urlopen(f"http://127.0.0.1:{proc.ports['metrics']}/metrics", timeout=5) as resp:
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(resp.read().decode())
            for s in fam.samples
        }
    assert samples[("kubetune_operator_jobs", (("phase", "Succeeded"),))] == 1.0
    assert samples[("kubetune_operator_jobs", (("phase", "Running"),))] == 0.0
    assert samples[("kubetune_operator_reconcile_seconds_count", (("handler", "observe"),))] > 0
    assert samples[("kubetune_operator_reconcile_errors_total", (("handler", "observe"),))] == 0.0  # none happened
    with urllib.request.urlopen(f"http://127.0.0.1:{proc.ports['liveness']}/healthz", timeout=5) as resp:
        assert resp.status == 200


def test_failure_carries_the_trainers_reason(kube_api, operator) -> None:
    proc = operator()
    kube_api.create(manifest("bad-data"))
    wait_for(lambda: kube_api.get(*JOBS, NS, "bad-data"), proc=proc)
    reason = "no usable sample in coco split 'train/annotations.json' under /var/cache/kubetune/stage/abc"
    kube_api.create(
        pod("bad-data", 0, "Failed", {"exitCode": 2, "reason": "Error", "message": reason + "\n", "finishedAt": T1})
    )
    kube_api.patch_status(
        *JOBS,
        NS,
        "bad-data",
        {
            "failed": 1,
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "PodFailurePolicy",
                    "lastTransitionTime": T1,
                    "message": "Container trainer for pod ml/bad-data-0-x failed with exit code 2 "
                    "matching FailJob rule at index 0",
                }
            ],
        },
    )
    failed = wait_for(phase_is(kube_api, "bad-data", "Failed"), proc=proc)
    assert failed["message"] == reason + " (exit code 2)"
    assert failed["restarts"] == 1 and failed["completionTime"] == T1
    warnings = wait_for(
        lambda: [
            e
            for e in kube_api.list("v1", "events", NS)
            if e.get("reason") == "PodFailurePolicy" or (e.get("type") == "Warning" and e.get("reason") == "Failed")
        ],
        proc=proc,
    )
    assert reason in warnings[0]["message"]


def test_suspend_and_refused_changes(kube_api, operator) -> None:
    proc = operator()
    kube_api.create(manifest("tune"))
    wait_for(lambda: kube_api.get(*JOBS, NS, "tune"), proc=proc)
    kube_api.patch(*FTJ, NS, "tune", {"spec": {"runPolicy": {"suspend": True}, "training": {"maxSteps": 4000}}})
    wait_for(lambda: kube_api.get(*JOBS, NS, "tune")["spec"].get("suspend") is True, proc=proc)
    wait_for(phase_is(kube_api, "tune", "Suspended"), proc=proc)
    config = json.loads(kube_api.get("v1", "configmaps", NS, "tune-config")["data"]["train.json"])
    assert config["training"]["maxSteps"] == 4000  # mutable: reaches the trainer at its next start

    kube_api.patch(*FTJ, NS, "tune", {"spec": {"runPolicy": {"suspend": False}}})
    wait_for(lambda: kube_api.get(*JOBS, NS, "tune")["spec"].get("suspend") is False, proc=proc)

    kube_api.patch(*FTJ, NS, "tune", {"spec": {"model": {"variant": "sam2.1_hiera_large"}}})
    rejected = wait_for(
        lambda: "cannot change" in (status(kube_api, "tune").get("message") or "") and status(kube_api, "tune"),
        proc=proc,
    )
    assert rejected["message"].startswith("spec.model.variant cannot change while the job exists")
    job = kube_api.get(*JOBS, NS, "tune")
    assert '"variant": "sam2.1_hiera_small"' in job["metadata"]["annotations"]["kubetune.dev/immutable-spec"]


def test_invalid_resource_fails_with_the_field_named(kube_api, operator) -> None:
    proc = operator()
    bad = manifest("typo")
    bad["spec"]["training"]["batchsize"] = 8
    kube_api.create(bad)
    failed = wait_for(phase_is(kube_api, "typo", "Failed"), proc=proc)
    assert "spec.training.batchsize: Extra inputs are not permitted" in failed["message"]
    assert kube_api.get(*JOBS, NS, "typo") is None


def test_a_foreign_image_or_an_unmarked_secret_is_refused_and_nothing_is_created(kube_api, operator) -> None:
    proc = operator()
    kube_api.create(credentials_secret(NS, "team-keys", marked=False))  # exists, unmarked by the admin
    kube_api.create(
        manifest("borrowed", image="docker.io/attacker/miner:1", storage={"credentialsSecret": "team-keys"})
    )
    refused = wait_for(phase_is(kube_api, "borrowed", "Failed"), proc=proc)
    assert "spec.image 'docker.io/attacker/miner:1' is not an allowed trainer image" in refused["message"]
    assert "spec.storage.credentialsSecret 'team-keys' is not marked for kubetune" in refused["message"]
    assert {c["type"]: c["reason"] for c in refused["conditions"]}["SpecRejected"] == "PolicyRefused"
    wait_for(lambda: any(e.get("reason") == "PolicyRefused" for e in kube_api.list("v1", "events", NS)), proc=proc)
    for api_version, plural, name in (
        ("batch/v1", "jobs", "borrowed"),
        ("v1", "configmaps", "borrowed-config"),
        ("v1", "services", "borrowed"),
        ("networking.k8s.io/v1", "networkpolicies", "borrowed"),
    ):
        assert kube_api.get(api_version, plural, NS, name) is None

    # The admin marks the Secret and the author drops the image: the job is created.
    kube_api.patch("v1", "secrets", NS, "team-keys", {"metadata": {"labels": {"kubetune.dev/credentials": "true"}}})
    kube_api.patch(*FTJ, NS, "borrowed", {"spec": {"image": None}})
    job = wait_for(lambda: kube_api.get(*JOBS, NS, "borrowed"), proc=proc)
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "team-keys"


def test_a_stalled_job_is_marked_and_its_pods_restarted(kube_api, operator) -> None:
    """Rank 0's step counter stays at 500: past runPolicy.progressDeadlineSeconds the job is
    Stalled (a condition and an Event) and, with restartOnStall, its pods are deleted so the Job
    starts them again from the newest checkpoint."""
    proc = operator()
    kube_api.create(manifest("stuck", runPolicy={"progressDeadlineSeconds": 2, "restartOnStall": True}))
    wait_for(lambda: kube_api.get(*JOBS, NS, "stuck"), proc=proc)
    kube_api.patch_status(*JOBS, NS, "stuck", {"active": 2, "startTime": "2026-11-22T10:00:00Z"})
    for index in (0, 1):
        kube_api.create(pod("stuck", index, "Running"))
    wait_for(phase_is(kube_api, "stuck", "Running"), proc=proc)
    stalled = wait_for(
        lambda: next((c for c in status(kube_api, "stuck").get("conditions", []) if c["type"] == "Stalled"), None),
        timeout=60,
        proc=proc,
    )
    assert stalled["status"] == "True" and stalled["reason"] == "NoProgress"
    assert "step 500 has not moved for" in stalled["message"]
    wait_for(lambda: not kube_api.list("v1", "pods", NS), timeout=30, proc=proc)  # deleted: the Job restarts them
    reasons = {e.get("reason") for e in kube_api.list("v1", "events", NS)}
    assert "RestartedOnStall" in reasons or "Stalled" in reasons
