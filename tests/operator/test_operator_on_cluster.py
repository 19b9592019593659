"""A real `kubetune operator` process against a real Kubernetes control plane (tests/kube_cluster.py).

The API server validates and defaults what the operator creates, the Job controller makes one pod
per index, the scheduler places them on kwok's fake GPU nodes, kwok runs them and ends them with
the exit code a test asks for, and the garbage collector removes what a deleted job owned.
"""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
from kubetune_operator.rendering import immutable_digests
from kubetune_trainer.metrics.events import Snapshot
from kubetune_trainer.metrics.prometheus import PrometheusWriter
from prometheus_client import start_http_server
from prometheus_client.parser import text_string_to_metric_families

from tests.factories import credentials_secret, example_job
from tests.helpers import ROOT
from tests.kube_cluster import Cluster, KubeAPIError, stop_operator, wait_for

FTJ = ("kubetune.dev/v1alpha1", "finetunejobs")
JOBS = ("batch/v1", "jobs")
INDEX = "batch.kubernetes.io/job-completion-index"


def manifest(namespace: str, name: str, **spec) -> dict:
    return example_job(name, namespace, **spec)


def status(cluster: Cluster, namespace: str, name: str) -> dict:
    return (cluster.get(*FTJ, namespace, name) or {}).get("status") or {}


def phase_is(cluster: Cluster, namespace: str, name: str, phase: str):
    return lambda: status(cluster, namespace, name) if status(cluster, namespace, name).get("phase") == phase else None


def pods_of(cluster: Cluster, namespace: str, name: str) -> list[dict]:
    return cluster.list("v1", "pods", namespace, label_selector=f"kubetune.dev/finetunejob={name}")


def running_pods(cluster: Cluster, namespace: str, name: str, count: int) -> list[dict]:
    """Wait until the Job controller's pods for `name` are scheduled and kwok runs them."""

    def ready():
        pods = [p for p in pods_of(cluster, namespace, name) if not p["metadata"].get("deletionTimestamp")]
        running = [p for p in pods if p.get("status", {}).get("phase") == "Running"]
        return sorted(running, key=lambda p: int(p["metadata"]["labels"][INDEX])) if len(running) == count else None

    return wait_for(ready, timeout=60)


def serve_rank0(pod: dict, port: int, writers: list, step: int = 500) -> PrometheusWriter:
    """The trainer's own metrics on rank 0's pod address (a loopback address under kwok), served
    until the test ends or it calls `writer.stop()`."""
    meta = pod["metadata"]
    writer = PrometheusWriter(meta["labels"]["kubetune.dev/finetunejob"], meta["namespace"], 0, "sam2")
    server, _ = start_http_server(port, addr=pod["status"]["podIP"], registry=writer.registry)
    writer.stop = lambda: (server.shutdown(), server.server_close())  # type: ignore[attr-defined]
    writers.append(writer)
    writer.write(
        Snapshot(
            step=step,
            scalars={
                "step": step,
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
    return writer


def operator_samples(proc) -> dict[tuple[str, tuple], float]:
    """The operator's own metrics: (name, sorted labels) -> value ({} while it is not serving yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{proc.ports['metrics']}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def job_conditions(cluster: Cluster, namespace: str, name: str) -> list[dict]:
    return (cluster.get(*JOBS, namespace, name) or {}).get("status", {}).get("conditions") or []


def event_reasons(cluster: Cluster, namespace: str) -> set[str]:
    return {e.get("reason") for e in cluster.list("v1", "events", namespace)}


def test_apply_run_restart_and_succeed(cluster: Cluster, namespace: str, operator, writers) -> None:
    proc = operator()
    # As a user does it: the example, applied with kubectl.
    cluster.kubectl("apply", "-n", namespace, "-f", str(ROOT / "examples" / "finetunejob.yaml"))
    ftj = cluster.get(*FTJ, namespace, "labpics-sam2")
    job = wait_for(lambda: cluster.get(*JOBS, namespace, "labpics-sam2"), proc=proc)
    config_map = cluster.get("v1", "configmaps", namespace, "labpics-sam2-config")
    service = cluster.get("v1", "services", namespace, "labpics-sam2")
    assert json.loads(config_map["data"]["train.json"])["job"] == {"name": "labpics-sam2", "namespace": namespace}
    assert service["spec"]["clusterIP"] == "None"
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    owner = job["metadata"]["ownerReferences"][0]
    assert owner["uid"] == ftj["metadata"]["uid"] and owner["controller"] is True
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example/kubetune-trainer:test"
    policy = cluster.get("networking.k8s.io/v1", "networkpolicies", namespace, "labpics-sam2")
    assert policy["spec"]["podSelector"] == {"matchLabels": {"kubetune.dev/finetunejob": "labpics-sam2"}}

    # The Job controller makes one pod per index, with the hostnames the rendezvous uses
    # (<job>-<index>.<service>), scheduled on GPU nodes; kwok runs them.
    pods = running_pods(cluster, namespace, "labpics-sam2", 2)
    assert [(p["spec"]["hostname"], p["spec"]["subdomain"]) for p in pods] == [
        ("labpics-sam2-0", "labpics-sam2"),
        ("labpics-sam2-1", "labpics-sam2"),
    ]
    assert all(p["spec"]["nodeName"].startswith("kwok-gpu-") for p in pods)
    assert len({p["spec"]["nodeName"] for p in pods}) == 2  # 8 GPUs each: one pod per node
    limits = pods[0]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "8"
    torchrun = " ".join(
        pods[0]["spec"]["containers"][0].get("command", []) + pods[0]["spec"]["containers"][0].get("args", [])
    )
    assert "labpics-sam2-0.labpics-sam2" in torchrun

    # Rank 0 serves metrics: the status fills with progress.
    serve_rank0(pods[0], proc.trainer_port, writers)
    running = wait_for(
        lambda: (s := status(cluster, namespace, "labpics-sam2")).get("progress", {}).get("step") == 500 and s,
        proc=proc,
    )
    assert running["phase"] == "Running"
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

    # What a user sees: kubectl's printer columns from the CRD.
    table = cluster.kubectl("get", "ftj", "-n", namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "PHASE", "MODEL", "PROGRESS", "LOSS", "AGE"]
    assert table[1].split()[:5] == ["labpics-sam2", "Running", "sam2.1_hiera_small", "25", "0.25"]
    wide = cluster.kubectl("get", "finetunejobs.kubetune.dev", "-n", namespace, "-o", "wide").stdout.splitlines()
    assert wide[0].split()[5:7] == ["BASE", "BEST"] and "0.81" in wide[1].split()

    # An operator restart changes nothing: still one Job, same uid.
    stop_operator(proc)
    proc = operator()
    reconciled = ("kubetune_operator_reconcile_seconds_count", (("handler", "reconcile"),))
    wait_for(lambda: operator_samples(proc).get(reconciled, 0) >= 1, proc=proc)  # each job, once per start
    assert [j["metadata"]["uid"] for j in cluster.list(*JOBS, namespace)] == [job["metadata"]["uid"]]

    # Both trainers exit 0: the Job controller completes the Job, the status follows.
    for pod in pods:
        cluster.finish_pod(namespace, pod["metadata"]["name"], 0)
    done = wait_for(phase_is(cluster, namespace, "labpics-sam2", "Succeeded"), proc=proc)
    job = cluster.get(*JOBS, namespace, "labpics-sam2")
    assert done["completionTime"] == job["status"]["completionTime"]
    assert done["progress"]["percent"] == 100.0
    assert {c["type"]: c["status"] for c in done["conditions"]}["Succeeded"] == "True"
    wait_for(lambda: event_reasons(cluster, namespace) >= {"Pending", "Running", "Succeeded"}, proc=proc)

    # The operator's own endpoints: Prometheus metrics and kopf's liveness probe.
    samples = operator_samples(proc)
    assert samples[("kubetune_operator_jobs", (("phase", "Succeeded"),))] == 1.0
    assert samples[("kubetune_operator_jobs", (("phase", "Running"),))] == 0.0
    assert samples[("kubetune_operator_reconcile_seconds_count", (("handler", "observe"),))] > 0
    assert samples[("kubetune_operator_reconcile_errors_total", (("handler", "observe"),))] == 0.0
    with urllib.request.urlopen(f"http://127.0.0.1:{proc.ports['liveness']}/healthz", timeout=5) as resp:
        assert resp.status == 200


def test_a_trainer_that_exits_2_fails_the_job_with_its_reason(cluster: Cluster, namespace: str, operator) -> None:
    """Exit code 2 (bad input) matches the Job's podFailurePolicy FailJob rule: the real Job
    controller fails the Job at once, without retries, and the status carries the trainer's
    termination message."""
    proc = operator()
    cluster.create(manifest(namespace, "bad-data"))
    pods = running_pods(cluster, namespace, "bad-data", 2)
    reason = "no usable sample in coco split 'train/annotations.json' under /var/cache/kubetune/stage/abc"
    cluster.finish_pod(namespace, pods[0]["metadata"]["name"], 2, reason + "\n")
    failed = wait_for(phase_is(cluster, namespace, "bad-data", "Failed"), proc=proc)
    assert failed["message"] == reason + " (exit code 2)"
    # The Job controller marks the Job FailureTarget at once, terminates the other pod, then Failed.
    failed_condition = wait_for(
        lambda: next((c for c in job_conditions(cluster, namespace, "bad-data") if c["type"] == "Failed"), None),
        proc=proc,
    )
    assert failed_condition["reason"] == "PodFailurePolicy"
    wait_for(lambda: status(cluster, namespace, "bad-data").get("completionTime"), proc=proc)
    warnings = wait_for(
        lambda: [
            e
            for e in cluster.list("v1", "events", namespace)
            if e.get("type") == "Warning" and e.get("reason") in ("Failed", "PodFailurePolicy", "InvalidInput")
        ],
        proc=proc,
    )
    assert any(reason in w["message"] for w in warnings)


def test_suspend_resume_and_refused_changes(cluster: Cluster, namespace: str, operator) -> None:
    proc = operator()
    cluster.create(manifest(namespace, "tune"))
    running_pods(cluster, namespace, "tune", 2)
    cluster.patch(*FTJ, namespace, "tune", {"spec": {"runPolicy": {"suspend": True}, "training": {"maxSteps": 4000}}})
    wait_for(lambda: cluster.get(*JOBS, namespace, "tune")["spec"].get("suspend") is True, proc=proc)
    # The Job controller removes the pods of a suspended Job.
    wait_for(lambda: not pods_of(cluster, namespace, "tune"), timeout=60, proc=proc)
    wait_for(phase_is(cluster, namespace, "tune", "Suspended"), proc=proc)
    config = json.loads(cluster.get("v1", "configmaps", namespace, "tune-config")["data"]["train.json"])
    assert config["training"]["maxSteps"] == 4000  # mutable: reaches the trainer at its next start

    cluster.patch(*FTJ, namespace, "tune", {"spec": {"runPolicy": {"suspend": False}}})
    wait_for(lambda: cluster.get(*JOBS, namespace, "tune")["spec"].get("suspend") is False, proc=proc)
    running_pods(cluster, namespace, "tune", 2)  # resumed: the Job controller starts them again

    cluster.patch(*FTJ, namespace, "tune", {"spec": {"model": {"variant": "sam2.1_hiera_large"}}})
    rejected = wait_for(
        lambda: (
            "cannot change" in (status(cluster, namespace, "tune").get("message") or "")
            and status(cluster, namespace, "tune")
        ),
        proc=proc,
    )
    assert rejected["message"].startswith("spec.model.variant cannot change while the job exists")
    job = cluster.get(*JOBS, namespace, "tune")
    accepted = json.loads(job["metadata"]["annotations"]["kubetune.dev/immutable-spec"])
    assert (
        accepted["model"]["variant"]
        == immutable_digests({"model": {"variant": "sam2.1_hiera_small"}})["model"]["variant"]
    )


def test_the_crd_is_structural_and_served(cluster: Cluster) -> None:
    versions = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert versions["serverVersion"]["gitVersion"] == versions["clientVersion"]["gitVersion"] == "v1.36.3"
    crd = cluster.get("apiextensions.k8s.io/v1", "customresourcedefinitions", None, "finetunejobs.kubetune.dev")
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions["Established"] == "True" and conditions["NamesAccepted"] == "True"
    assert "NonStructuralSchema" not in conditions
    resources = json.loads(cluster.kubectl("get", "--raw", "/apis/kubetune.dev/v1alpha1").stdout)["resources"]
    ftj = next(r for r in resources if r["name"] == "finetunejobs")
    assert ftj["shortNames"] == ["ftj"] and ftj["categories"] == ["kubetune"]
    assert any(r["name"] == "finetunejobs/status" for r in resources)


def test_the_api_server_refuses_what_the_schema_forbids(cluster: Cluster, namespace: str) -> None:
    """The CRD's schema is the first check: kubectl (strict field validation by default) gets the
    API server's refusal, naming the field, and nothing is stored."""
    bad = manifest(namespace, "typo")
    bad["spec"]["training"]["batchsize"] = 8
    out = cluster.kubectl("apply", "-f", "-", input=json.dumps(bad), check=False)
    assert out.returncode != 0 and 'unknown field "spec.training.batchsize"' in out.stderr

    wrong = manifest(namespace, "wrong")
    wrong["spec"]["training"]["precision"] = "fp8"
    wrong["spec"]["resources"] |= {"nodes": 0, "cpu": "lots"}
    wrong["spec"]["queueName"] = "my queue!"
    with pytest.raises(KubeAPIError) as refused:
        cluster.create(wrong)
    assert refused.value.status == 422
    for field in ("spec.training.precision", "spec.resources.nodes", "spec.resources.cpu", "spec.queueName"):
        assert field in refused.value.body, field
    assert cluster.get(*FTJ, namespace, "typo") is None and cluster.get(*FTJ, namespace, "wrong") is None


def test_an_invalid_spec_that_passes_the_schema_fails_with_the_field_named(
    cluster: Cluster, namespace: str, operator
) -> None:
    """What only the operator can judge (here a Detectron2 override key that does not exist) is
    refused in the status, and nothing is created."""
    proc = operator()
    bad = manifest(namespace, "overrides")
    bad["spec"]["model"] = {"family": "detectron2", "variant": "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"}
    bad["spec"]["model"]["overrides"] = {"MODEL.NO_SUCH_KEY": 1}
    cluster.create(bad)
    failed = wait_for(phase_is(cluster, namespace, "overrides", "Failed"), proc=proc)
    assert "MODEL.NO_SUCH_KEY" in failed["message"]
    assert cluster.get(*JOBS, namespace, "overrides") is None


def test_a_foreign_image_or_an_unmarked_secret_is_refused_and_nothing_is_created(
    cluster: Cluster, namespace: str, operator
) -> None:
    proc = operator()
    cluster.create(credentials_secret(namespace, "team-keys", marked=False))  # exists, unmarked by the admin
    cluster.create(
        manifest(namespace, "borrowed", image="docker.io/attacker/miner:1", storage={"credentialsSecret": "team-keys"})
    )
    refused = wait_for(phase_is(cluster, namespace, "borrowed", "Failed"), proc=proc)
    assert "spec.image 'docker.io/attacker/miner:1' is not an allowed trainer image" in refused["message"]
    assert "spec.storage.credentialsSecret 'team-keys' is not marked for kubetune" in refused["message"]
    assert {c["type"]: c["reason"] for c in refused["conditions"]}["SpecRejected"] == "PolicyRefused"
    wait_for(lambda: "PolicyRefused" in event_reasons(cluster, namespace), proc=proc)
    for api_version, plural, name in (
        ("batch/v1", "jobs", "borrowed"),
        ("v1", "configmaps", "borrowed-config"),
        ("v1", "services", "borrowed"),
        ("networking.k8s.io/v1", "networkpolicies", "borrowed"),
    ):
        assert cluster.get(api_version, plural, namespace, name) is None

    # The admin marks the Secret and the author drops the image: the job is created.
    cluster.patch(
        "v1", "secrets", namespace, "team-keys", {"metadata": {"labels": {"kubetune.dev/credentials": "true"}}}
    )
    cluster.patch(*FTJ, namespace, "borrowed", {"spec": {"image": None}})
    job = wait_for(lambda: cluster.get(*JOBS, namespace, "borrowed"), proc=proc)
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "team-keys"


def test_a_stalled_job_is_marked_and_its_pods_restarted(cluster: Cluster, namespace: str, operator, writers) -> None:
    """Rank 0's step counter stays at 500: past runPolicy.progressDeadlineSeconds the job is
    Stalled (a condition and an Event) and, with restartOnStall, its pods are deleted; the Job
    controller starts new ones (they resume from the newest checkpoint)."""
    proc = operator()
    cluster.create(manifest(namespace, "stuck", runPolicy={"progressDeadlineSeconds": 2, "restartOnStall": True}))
    pods = running_pods(cluster, namespace, "stuck", 2)
    serve_rank0(pods[0], proc.trainer_port, writers)
    wait_for(phase_is(cluster, namespace, "stuck", "Running"), proc=proc)

    # The pods are deleted as the job is marked, so the next pass (woken by their deletion) may
    # already say Progressing: the Events keep what happened.
    def restarted():
        return next((e for e in cluster.list("v1", "events", namespace) if e["reason"] == "RestartedOnStall"), None)

    event = wait_for(restarted, timeout=60, proc=proc)
    assert event["type"] == "Warning"
    assert "step 500 has not moved for" in event["message"] and "deleted 2 pod(s) to restart" in event["message"]
    stalled = next(c for c in status(cluster, namespace, "stuck")["conditions"] if c["type"] == "Stalled")
    assert stalled["reason"] in ("NoProgress", "Progressing")
    first = {p["metadata"]["uid"] for p in pods}
    replaced = wait_for(
        lambda: (
            (now := {p["metadata"]["uid"] for p in pods_of(cluster, namespace, "stuck")})
            and not now & first
            and len(now) == 2
            and now
        ),
        timeout=60,
        proc=proc,
    )
    assert len(replaced) == 2


def test_deleting_a_job_collects_everything_it_owned(cluster: Cluster, namespace: str, operator) -> None:
    proc = operator()
    cluster.create(manifest(namespace, "gone"))
    running_pods(cluster, namespace, "gone", 2)
    owned = [
        ("batch/v1", "jobs", "gone"),
        ("v1", "configmaps", "gone-config"),
        ("v1", "services", "gone"),
        ("networking.k8s.io/v1", "networkpolicies", "gone"),
    ]
    assert all(cluster.get(*o[:2], namespace, o[2]) for o in owned)
    cluster.kubectl("delete", "ftj", "gone", "-n", namespace, "--wait=true", "--timeout=60s")
    wait_for(
        lambda: (
            all(cluster.get(*o[:2], namespace, o[2]) is None for o in owned) and not pods_of(cluster, namespace, "gone")
        ),
        timeout=60,
        proc=proc,
    )


def test_a_steady_job_costs_no_api_reads_and_no_status_writes(cluster: Cluster, namespace: str, operator) -> None:
    """Status passes run every 0.5 s here; the Job and pods come from the operator's watches, and a
    status that did not change is not written."""
    proc = operator()
    for name in ("steady-a", "steady-b"):
        cluster.create(manifest(namespace, name))
    for name in ("steady-a", "steady-b"):
        running_pods(cluster, namespace, name, 2)
        wait_for(phase_is(cluster, namespace, name, "Staging"), proc=proc)
    # The counters are the whole API server's: earlier tests' namespaces must be gone (the namespace
    # controller lists their pods until they are empty).
    terminating = lambda: [n for n in cluster.list("v1", "namespaces") if n["status"].get("phase") == "Terminating"]  # noqa: E731
    wait_for(lambda: not terminating(), timeout=120, proc=proc)
    time.sleep(2)  # let the last transitions be written
    before = cluster.request_counts()
    time.sleep(6)  # 12 status passes per job
    after = cluster.request_counts()
    spent = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert spent.get(("GET", "jobs", ""), 0) <= 1, spent
    assert spent.get(("LIST", "pods", ""), 0) <= 1, spent
    assert spent.get(("PATCH", "finetunejobs", "status"), 0) + spent.get(("PATCH", "finetunejobs", ""), 0) <= 2, spent
