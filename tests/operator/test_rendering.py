"""Desired objects from specs: table-driven, and every object valid for a current Kubernetes."""

from __future__ import annotations

import copy
import json

import kubernetes_validate
import pytest
import yaml
from kubetune_operator.rendering import (
    IMMUTABLE_ANNOTATION,
    immutable_digests,
    immutable_view,
    name_problems,
    render_all,
)
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.specs import FineTuneJob
from kubetune_trainer.config import TrainConfig

from tests.helpers import ROOT

K8S_VERSION = "1.33"


def example(**changes) -> FineTuneJob:
    raw = yaml.safe_load((ROOT / "examples" / "finetunejob.yaml").read_text())
    raw["metadata"].update(namespace="ml", uid="0f6e4c1a-aaaa-bbbb-cccc-123456789012", generation=1)
    for path, value in changes.items():
        target = raw["spec"]
        keys = path.split("__")
        for key in keys[:-1]:
            target = target.setdefault(key, {})
        target[keys[-1]] = value
    return FineTuneJob.model_validate(raw)


CASES = {
    "two nodes x 8 GPUs": example(),
    "one node, one GPU": example(resources={"nodes": 1, "gpusPerNode": 1}),
    "CPU only": example(resources={"nodes": 1, "gpusPerNode": 0, "cpu": "4", "memory": "8Gi"}),
    "kueue": example(queueName="team-a"),
    "suspended": example(runPolicy={"suspend": True}),
    "scheduling": example(
        resources={
            "nodes": 3,
            "gpusPerNode": 4,
            "nodeSelector": {"gpu": "h200"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "priorityClassName": "training",
        }
    ),
    "deadline": example(runPolicy={"backoffLimit": 0, "activeDeadlineSeconds": 3600}),
}


def objects(ftj: FineTuneJob, **settings) -> dict[str, dict]:
    return {o["kind"]: o for o in render_all(ftj, OperatorSettings(**settings))}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_every_object_is_valid_kubernetes(case: str) -> None:
    for obj in render_all(CASES[case], OperatorSettings()):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize(
    ("case", "nodes", "gpus", "suspend"),
    [
        ("two nodes x 8 GPUs", 2, 8, False),
        ("one node, one GPU", 1, 1, False),
        ("CPU only", 1, 0, False),
        ("kueue", 2, 8, True),
        ("suspended", 2, 8, True),
    ],
)
def test_job_shape(case: str, nodes: int, gpus: int, suspend: bool) -> None:
    job = objects(CASES[case])["Job"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == nodes
    assert spec["suspend"] is suspend
    container = spec["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--nnodes") + 1] == str(nodes)
    assert args[args.index("--nproc-per-node") + 1] == str(max(gpus, 1))
    assert args[args.index("--rdzv-endpoint") + 1] == "labpics-sam2-0.labpics-sam2:29400"
    assert args[args.index("--rdzv-id") + 1] == "0f6e4c1a-aaaa-bbbb-cccc-123456789012"
    assert args[-4:] == ["-m", "kubetune_trainer", "--config", "/etc/kubetune/train.json"]
    limits = container["resources"].get("limits", {})
    assert limits.get("nvidia.com/gpu") == (str(gpus) if gpus else None)


def test_pod_hardening_and_volumes() -> None:
    job = objects(CASES["two nodes x 8 GPUs"])["Job"]
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["automountServiceAccountToken"] is False and pod["subdomain"] == "labpics-sam2"
    assert pod["securityContext"]["runAsNonRoot"] is True
    sc = container["securityContext"]
    assert sc == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert {m["mountPath"] for m in container["volumeMounts"]} == {
        "/etc/kubetune",
        "/dev/shm",
        "/var/cache/kubetune",
        "/tmp",
    }
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-credentials",
        "key": "AWS_ACCESS_KEY_ID",
    }
    # A node cache folder: the pod mounts its own job's part and the shared part, nothing else.
    host = objects(CASES["CPU only"], trainer={"cache_host_path": "/mnt/kubetune/"})["Job"]
    pod = host["spec"]["template"]["spec"]
    paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert paths == {"job-cache": "/mnt/kubetune/jobs/ml/labpics-sam2", "shared-cache": "/mnt/kubetune/shared"}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["job-cache"] == "/var/cache/kubetune/jobs/ml/labpics-sam2"
    assert mounts["shared-cache"] == "/var/cache/kubetune/shared" and mounts["cache"] == "/var/cache/kubetune"
    for obj in render_all(CASES["CPU only"], OperatorSettings(trainer={"cache_host_path": "/mnt/kubetune"})):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_network_policy_lets_only_the_jobs_pods_prometheus_and_the_operator_in() -> None:
    settings = {"network_policy": {"operator_namespace": "kubetune", "prometheus_namespace_selector": {"team": "obs"}}}
    policy = objects(CASES["two nodes x 8 GPUs"], **settings)["NetworkPolicy"]
    own = {"podSelector": {"matchLabels": {"kubetune.dev/finetunejob": "labpics-sam2"}}}
    assert policy["spec"]["podSelector"] == own["podSelector"] and policy["spec"]["policyTypes"] == ["Ingress"]
    peers, scrape = policy["spec"]["ingress"]
    assert peers == {"from": [own]}  # rendezvous and NCCL ports, between this job's pods only
    assert scrape["ports"] == [{"protocol": "TCP", "port": 9400, "endPort": 9407}]  # 8 local ranks
    assert scrape["from"][0] == {
        "namespaceSelector": {"matchLabels": {"team": "obs"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    }
    assert scrape["from"][1]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "kubetune"}}
    assert objects(CASES["one node, one GPU"])["NetworkPolicy"]["spec"]["ingress"][1]["ports"] == [
        {"protocol": "TCP", "port": 9400}
    ]
    assert "NetworkPolicy" not in objects(CASES["kueue"], network_policy={"enabled": False})


def test_failure_policy_retries_infrastructure_and_fails_bad_input() -> None:
    spec = objects(CASES["deadline"])["Job"]["spec"]
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2]},
    }
    assert rules[1]["action"] == "Ignore" and rules[1]["onPodConditions"][0]["type"] == "DisruptionTarget"
    assert spec["backoffLimit"] == 0 and spec["activeDeadlineSeconds"] == 3600
    # runPolicy.ttlSecondsAfterFinished (86400 here) is the operator's to carry out, not the Job's.
    assert "ttlSecondsAfterFinished" not in objects(CASES["two nodes x 8 GPUs"])["Job"]["spec"]


def test_owner_labels_and_kueue() -> None:
    objs = objects(CASES["kueue"])
    for obj in objs.values():
        owner = obj["metadata"]["ownerReferences"][0]
        assert owner["kind"] == "FineTuneJob" and owner["controller"] is True
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == "labpics-sam2"
    assert objs["Job"]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    service = objs["Service"]["spec"]
    assert service["clusterIP"] == "None" and service["publishNotReadyAddresses"] is True


def test_config_map_holds_the_trainer_config_and_default_endpoint() -> None:
    ftj = example(storage={"region": "eu-west-1"})
    cm = objects(ftj, trainer={"s3_endpoint": "http://minio.kubetune:9000"})["ConfigMap"]
    config = TrainConfig.model_validate_json(cm["data"]["train.json"])
    assert config.storage.endpoint == "http://minio.kubetune:9000" and config.job.namespace == "ml"
    assert config.training.max_steps == 2000


def test_immutable_view_ignores_mutable_fields() -> None:
    base = immutable_view(example())
    assert immutable_view(example(training={"maxSteps": 2000, "batchSize": 8})) != base
    same = copy.deepcopy(yaml.safe_load((ROOT / "examples" / "finetunejob.yaml").read_text()))
    same["spec"]["training"]["maxSteps"] = 9000
    same["spec"]["output"]["checkpointEvery"] = 100
    same["spec"]["runPolicy"]["suspend"] = True
    same["metadata"]["namespace"] = "ml"
    assert immutable_view(FineTuneJob.model_validate(same)) == base
    changed = copy.deepcopy(same)
    changed["spec"]["model"]["variant"] = "sam2.1_hiera_large"
    assert immutable_view(FineTuneJob.model_validate(changed)) != base
    # The Job keeps digests, field by field (a spec of any size fits in its annotation); one
    # written by an earlier version, with the values themselves, compares equal.
    stored = json.loads(objects(example())["Job"]["metadata"]["annotations"][IMMUTABLE_ANNOTATION])
    assert stored == immutable_digests(base) == immutable_digests(immutable_digests(base))
    assert stored["model"]["variant"].startswith("sha256:") and len(json.dumps(stored)) < 2048
    assert immutable_digests(immutable_view(FineTuneJob.model_validate(changed)))["model"] != stored["model"]


def test_a_hub_token_reaches_the_pods_as_hf_token_and_nowhere_else() -> None:
    ftj = example(model__checkpoint="hf://facebook/sam2.1-hiera-tiny", model__hfTokenSecret="hub-token")
    objs = objects(ftj)
    env = {e["name"]: e for e in objs["Job"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["HF_TOKEN"] == {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hub-token", "key": "HF_TOKEN"}},
    }
    config = TrainConfig.model_validate_json(objs["ConfigMap"]["data"]["train.json"])
    assert config.model.hf_token_secret == "hub-token"  # the Secret's name; its value is never read
    kubernetes_validate.validate(objs["Job"], K8S_VERSION, strict=True)
    assert "HF_TOKEN" not in {
        e["name"] for e in objects(example())["Job"]["spec"]["template"]["spec"]["containers"][0]["env"]
    }


def test_the_operators_weights_mirror_is_the_default_storage_mirror() -> None:
    mirror = "s3://platform/weights/"
    config = TrainConfig.model_validate_json(
        objects(example(), trainer={"weights_mirror": mirror})["ConfigMap"]["data"]["train.json"]
    )
    assert config.storage.mirror == mirror
    own = example(storage__mirror="s3://team/weights/")
    kept = TrainConfig.model_validate_json(
        objects(own, trainer={"weights_mirror": mirror})["ConfigMap"]["data"]["train.json"]
    )
    assert kept.storage.mirror == "s3://team/weights/"
    assert TrainConfig.model_validate_json(objects(example())["ConfigMap"]["data"]["train.json"]).storage.mirror is None


def test_preemption_gets_a_grace_period_and_a_free_retry() -> None:
    job = objects(example(runPolicy={"terminationGracePeriodSeconds": 300}))["Job"]
    pod = job["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 300
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "285"  # torchrun waits for the checkpoint, inside the grace
    assert env["KUBETUNE_COLLECTIVE_TIMEOUT_S"] == "900"  # half the default progress deadline: a hang ends first
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [3]}} in rules
    assert objects(example())["Job"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 120


@pytest.mark.parametrize(
    ("name", "nodes", "problem"),
    [
        ("labpics-sam2", 2, None),
        ("n" * 61, 2, None),  # "<61 n>-1" is 63
        ("n" * 62, 2, "at most 61"),
        ("n" * 61, 100, "at most 60"),  # "-99"
        ("2-sam", 1, "must be a DNS label"),  # a Service name starts with a letter
        ("team.sam", 1, "must be a DNS label"),  # valid for a FineTuneJob, not for a hostname
    ],
)
def test_names_too_long_or_not_dns_labels_are_refused_up_front(name: str, nodes: int, problem: str | None) -> None:
    ftj = example(resources__nodes=nodes)
    ftj = ftj.model_copy(update={"metadata": ftj.metadata.model_copy(update={"name": name})})
    problems = name_problems(ftj)
    assert (problems == []) if problem is None else any(problem in p for p in problems), problems
