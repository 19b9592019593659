"""The operator converges and never gets a job wrong for good, against the real control plane
(tests/kube_cluster.py): objects lost or left behind, refusals by the API server, finished jobs."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from tests.factories import example_job
from tests.helpers import ROOT
from tests.kube_cluster import Cluster, KubeAPIError, stop_operator, wait_for

FTJ = ("kubetune.dev/v1alpha1", "finetunejobs")
JOBS = ("batch/v1", "jobs")


def status(cluster: Cluster, namespace: str, name: str) -> dict:
    return (cluster.get(*FTJ, namespace, name) or {}).get("status") or {}


def pods(cluster: Cluster, namespace: str, name: str) -> list[dict]:
    return cluster.list("v1", "pods", namespace, label_selector=f"kubetune.dev/finetunejob={name}")


def running(cluster: Cluster, namespace: str, name: str, count: int = 2) -> list[dict]:
    def ready():
        found = [p for p in pods(cluster, namespace, name) if p["status"].get("phase") == "Running"]
        return found if len(found) == count else None

    return wait_for(ready, timeout=60)


def test_a_finished_job_never_trains_again_after_its_job_is_gone(cluster: Cluster, namespace: str, operator) -> None:
    """runPolicy.ttlSecondsAfterFinished: 0 deletes the Job once the outcome is recorded (by the
    operator: a Job's own TTL could remove it unrecorded); a restart then finds a Succeeded job
    without a Job, and leaves it so."""
    proc = operator()
    cluster.create(example_job("done", namespace, runPolicy={"ttlSecondsAfterFinished": 0}))
    for pod in running(cluster, namespace, "done"):
        cluster.finish_pod(namespace, pod["metadata"]["name"], 0)
    wait_for(lambda: status(cluster, namespace, "done").get("phase") == "Succeeded", proc=proc)
    wait_for(lambda: cluster.get(*JOBS, namespace, "done") is None, timeout=60, proc=proc)
    stop_operator(proc)
    proc = operator()
    time.sleep(5)  # a restart's resume and several status passes
    assert proc.poll() is None
    assert cluster.get(*JOBS, namespace, "done") is None
    assert status(cluster, namespace, "done")["phase"] == "Succeeded"


def test_a_job_deleted_by_hand_is_created_again(cluster: Cluster, namespace: str, operator) -> None:
    proc = operator()
    cluster.create(example_job("lost", namespace))
    first = wait_for(lambda: cluster.get(*JOBS, namespace, "lost"), proc=proc)
    cluster.kubectl("delete", "job", "lost", "-n", namespace, "--wait=true", "--timeout=60s")
    again = wait_for(
        lambda: (
            (job := cluster.get(*JOBS, namespace, "lost"))
            and job["metadata"]["uid"] != first["metadata"]["uid"]
            and job
        ),
        timeout=60,
        proc=proc,
    )
    assert again["metadata"]["ownerReferences"][0]["uid"] == cluster.get(*FTJ, namespace, "lost")["metadata"]["uid"]
    running(cluster, namespace, "lost")
    wait_for(lambda: status(cluster, namespace, "lost").get("phase") == "Staging", proc=proc)


def test_a_config_map_or_service_deleted_by_hand_is_put_back(cluster: Cluster, namespace: str, operator) -> None:
    """The operator watches what it owns: a ConfigMap or Service deleted while the Job exists comes
    back, owned by the job, without a status pass's timer (they run every 10 minutes here)."""
    proc = operator(status_interval_s="600")
    created = cluster.create(example_job("kept", namespace))
    wait_for(lambda: cluster.get(*JOBS, namespace, "kept"), proc=proc)
    for plural, name in (("configmaps", "kept-config"), ("services", "kept")):
        first = cluster.get("v1", plural, namespace, name)
        cluster.kubectl("delete", plural, name, "-n", namespace, "--wait=true", "--timeout=30s")

        def replaced(plural=plural, name=name, uid=first["metadata"]["uid"]):
            found = cluster.get("v1", plural, namespace, name)
            return found if found and found["metadata"]["uid"] != uid else None

        again = wait_for(replaced, timeout=15, proc=proc)
        assert [o["uid"] for o in again["metadata"]["ownerReferences"]] == [created["metadata"]["uid"]]
    assert "train.json" in cluster.get("v1", "configmaps", namespace, "kept-config")["data"]


def test_an_object_of_another_owner_is_never_adopted(cluster: Cluster, namespace: str, operator) -> None:
    """A job deleted with its Job orphaned, then created again under the same name: the new job
    says what it waits for, and proceeds with its own Job once the old one is gone."""
    proc = operator()
    cluster.create(example_job("again", namespace))
    old = wait_for(lambda: cluster.get(*JOBS, namespace, "again"), proc=proc)
    cluster.kubectl("delete", "ftj", "again", "-n", namespace, "--cascade=orphan", "--wait=true")
    created = cluster.create(example_job("again", namespace))
    waiting = wait_for(
        lambda: (
            "already exists" in (status(cluster, namespace, "again").get("message") or "")
            and status(cluster, namespace, "again")
        ),
        proc=proc,
    )
    assert waiting["phase"] == "Pending" and "owned by nobody" in waiting["message"]
    assert f"Job {namespace}/again already exists" in waiting["message"]
    assert cluster.get(*JOBS, namespace, "again")["metadata"]["uid"] == old["metadata"]["uid"]  # not adopted
    assert any(e.get("reason") == "Waiting" for e in cluster.list("v1", "events", namespace))

    cluster.kubectl("delete", "job", "again", "-n", namespace, "--wait=true", "--timeout=60s")
    mine = wait_for(
        lambda: (
            (job := cluster.get(*JOBS, namespace, "again")) and job["metadata"]["uid"] != old["metadata"]["uid"] and job
        ),
        timeout=60,
        proc=proc,
    )
    assert mine["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
    # The ConfigMap and Service the orphaning left behind were nobody's: adopted.
    for plural, object_name in (("configmaps", "again-config"), ("services", "again")):
        owners = cluster.get("v1", plural, namespace, object_name)["metadata"]["ownerReferences"]
        assert [o["uid"] for o in owners] == [created["metadata"]["uid"]]


def test_a_refusal_by_the_api_server_reaches_the_user_and_nothing_is_left(
    cluster: Cluster, namespace: str, operator
) -> None:
    """A node selector the CRD schema cannot judge (its keys are free) but the Job's validation
    refuses: the dry run finds it before anything is stored."""
    proc = operator()
    name, field = "selector", "spec.template.spec.nodeSelector"
    resources = {"nodes": 2, "gpusPerNode": 8, "nodeSelector": {"gpu type!": "h100"}}
    cluster.create(example_job(name, namespace, resources=resources))
    failed = wait_for(
        lambda: status(cluster, namespace, name).get("phase") == "Failed" and status(cluster, namespace, name),
        proc=proc,
    )
    assert field in failed["message"] and "Invalid value" in failed["message"]
    assert {c["type"]: c["reason"] for c in failed["conditions"]}["SpecRejected"] == "RefusedByAPIServer"
    assert failed["observedGeneration"] == cluster.get(*FTJ, namespace, name)["metadata"]["generation"]
    warnings = [e for e in cluster.list("v1", "events", namespace) if e.get("type") == "Warning"]
    assert any(field in e["message"] for e in warnings)
    for plural, object_name in (("configmaps", f"{name}-config"), ("services", name)):
        assert cluster.get("v1", plural, namespace, object_name) is None
    assert cluster.get(*JOBS, namespace, name) is None


def test_a_name_too_long_for_the_pods_is_refused_up_front(cluster: Cluster, namespace: str, operator) -> None:
    proc = operator()
    name = "n" * 62  # a valid FineTuneJob name; pod hostnames "<name>-<index>" would be 64
    cluster.create(example_job(name, namespace))
    failed = wait_for(
        lambda: status(cluster, namespace, name).get("phase") == "Failed" and status(cluster, namespace, name),
        proc=proc,
    )
    assert "metadata.name is 62 characters; with resources.nodes=2 it may have at most 61" in failed["message"]
    assert cluster.get("v1", "configmaps", namespace, f"{name}-config") is None


def test_one_deeply_nested_spec_cannot_stop_the_operator(cluster: Cluster, namespace: str, operator) -> None:
    """The API server stores JSON nested 9,000 levels deep; the operator decodes it, refuses it
    naming the field, and goes on managing the other jobs."""
    proc = operator()
    model = {"family": "detectron2", "variant": "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml", "checkpoint": "none"}
    deep = example_job("deep", namespace, model={**model, "overrides": {"MODEL.RPN.IN_FEATURES": "DEEP"}})
    levels = 9000
    text = json.dumps(deep).replace('"DEEP"', "[" * levels + "1" + "]" * levels)
    assert cluster.post_text(*FTJ, namespace, text) == 201
    cluster.create(example_job("neighbour", namespace))
    wait_for(lambda: cluster.get(*JOBS, namespace, "neighbour"), proc=proc)

    def message() -> str:
        out = cluster.kubectl("get", "ftj", "deep", "-n", namespace, "-o", "jsonpath={.status.message}")
        return out.stdout

    refused = wait_for(message, proc=proc)
    assert f"model.overrides['MODEL.RPN.IN_FEATURES'] nests {levels} levels deep" in refused
    assert proc.poll() is None


def test_free_form_overrides_are_bounded_by_the_schema(cluster: Cluster, namespace: str) -> None:
    model = {"family": "detectron2", "variant": "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml", "checkpoint": "none"}
    bogus = {f"MODEL.KEY_{i}": i for i in range(3000)}
    with pytest.raises(KubeAPIError) as refused:
        cluster.create(example_job("many", namespace, model={**model, "overrides": bogus}))
    assert refused.value.status == 422 and "spec.model.overrides: Too many" in refused.value.body


def test_a_spec_of_hundreds_of_kib_gets_its_job(cluster: Cluster, namespace: str, operator) -> None:
    """No copy of the spec goes into an annotation (all of an object's annotations share 256 KiB):
    neither kopf's (it keeps none here) nor the Job's record of the fields that may not change
    (digests). A 300 KB spec the API server stores runs like any other."""
    proc = operator()
    job = yaml.safe_load((ROOT / "examples" / "finetunejob-detectron2.yaml").read_text())
    job["metadata"] |= {"name": "big", "namespace": namespace}
    job["spec"]["model"]["overrides"]["INPUT.MIN_SIZE_TRAIN"] = list(range(100_000, 150_000))
    assert len(json.dumps(job)) > 300_000
    cluster.create(job)
    created = wait_for(lambda: cluster.get(*JOBS, namespace, "big"), proc=proc)
    assert sum(len(v) for v in created["metadata"]["annotations"].values()) < 4096
    assert not cluster.get(*FTJ, namespace, "big")["metadata"].get("annotations")
    config = json.loads(cluster.get("v1", "configmaps", namespace, "big-config")["data"]["train.json"])
    assert config["model"]["overrides"]["INPUT.MIN_SIZE_TRAIN"][-1] == 149_999


def test_free_strings_and_lists_are_bounded_by_the_schema(cluster: Cluster, namespace: str) -> None:
    job = example_job("long", namespace)
    job["spec"]["data"]["train"] = "train/" + "a" * 5000 + ".json"
    job["spec"]["resources"]["tolerations"] = [{"key": f"k{i}", "operator": "Exists"} for i in range(100)]
    with pytest.raises(KubeAPIError) as refused:
        cluster.create(job)
    assert refused.value.status == 422
    assert "spec.data.train" in refused.value.body and "4096" in refused.value.body
    assert "spec.resources.tolerations" in refused.value.body and "64" in refused.value.body
