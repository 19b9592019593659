"""The Helm chart, rendered by Helm's own engine (helm-python-sdk) for several value sets."""

from __future__ import annotations

import json
import re

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from kubetune_operator.manifests.monitoring import alerts_yaml, dashboard_json

from tests.helpers import ROOT

CHART = ROOT / "charts" / "kubetune"
SCENARIOS = {"default": {}} | {
    p.name.removesuffix("-values.yaml"): yaml.safe_load(p.read_text())
    for p in sorted((CHART / "ci").glob("*-values.yaml"))
}
CUSTOM_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "KopfPeering", "ClusterKopfPeering"}


def render(values: dict) -> list[dict]:
    manifests = helm.Chart.load(CHART).render(values, name="kt", namespace="kubetune", is_install=True)
    docs = []
    for path, text in manifests.items():
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_renders_valid_kubernetes_objects(scenario: str) -> None:
    docs = render(SCENARIOS[scenario])
    assert {d["kind"] for d in docs} >= {"Deployment", "ServiceAccount", "Service", "ConfigMap", "Pod"}
    for doc in docs:
        if doc["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(doc, "1.33", strict=True)
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "kubetune"


def test_lint_is_clean() -> None:
    for values in SCENARIOS.values():
        report = helm.lint(CHART, values, strict=True, kube_version="v1.33.0")
        assert report["errors"] == []
        assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rbac_is_least_privilege(scenario: str) -> None:
    rules = [r for d in render(SCENARIOS[scenario]) if d["kind"] in ("Role", "ClusterRole") for r in d["rules"]]
    assert rules
    for rule in rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        assert not {"deletecollection", "escalate", "bind", "impersonate"} & set(rule["verbs"])
        # delete only on pods (runPolicy.restartOnStall) and Jobs (runPolicy.ttlSecondsAfterFinished)
        assert "delete" not in rule["verbs"] or rule["resources"] in (["pods"], ["jobs"])
    granted = {(g, res) for r in rules for g in r["apiGroups"] for res in r["resources"]}
    assert ("batch", "jobs") in granted and ("kubetune.dev", "finetunejobs/status") in granted
    # Pods read a credentials Secret's data; the operator only gets the labels of one a job names.
    secret_rules = [r for r in rules if "secrets" in r["resources"]]
    assert secret_rules and all(r["verbs"] == ["get"] and r["resources"] == ["secrets"] for r in secret_rules)


def test_namespaced_install_uses_roles_in_each_namespace() -> None:
    docs = render(SCENARIOS["namespaced"])
    roles = [d for d in docs if d["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["ml-team-a", "ml-team-b"]
    cluster = [d for d in docs if d["kind"] == "ClusterRole"]
    # Cluster-wide only what kopf reads to find its resource and the namespaces it serves.
    rules = [r for c in cluster for r in c["rules"]]
    assert [r["resources"] for r in rules] == [["customresourcedefinitions"], ["namespaces"]]
    assert all(r["verbs"] == ["get", "list", "watch"] for r in rules)
    env = {
        e["name"]: e.get("value")
        for e in next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert json.loads(env["KUBETUNE_NAMESPACES"]) == ["ml-team-a", "ml-team-b"]
    assert env["KUBETUNE_TRAINER__S3_ENDPOINT"] == "http://minio.storage:9000"
    assert env["KUBETUNE_TRAINER__WEIGHTS_MIRROR"] == "s3://platform/weights/"


def test_operator_deployment() -> None:
    deployment = next(d for d in render({}) if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"] == ["operator"] and container["image"] == "ghcr.io/kubetune/operator:0.1.0"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_operator_memory_is_sized_from_the_jobs_it_tracks() -> None:
    """memory.baseMi + expectedJobs × memory.perJobKi, limit 1.5×; set by hand, it stays."""

    def resources(values: dict) -> dict:
        deployment = next(d for d in render(values) if d["kind"] == "Deployment")
        return deployment["spec"]["template"]["spec"]["containers"][0]["resources"]

    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["operator"]
    base, per_job = defaults["memory"]["baseMi"], defaults["memory"]["perJobKi"]
    sized = resources({"operator": {"expectedJobs": 5000}})
    assert sized["requests"] == {"cpu": "50m", "memory": f"{base + 5000 * per_job // 1024}Mi"}
    assert sized["limits"] == {"memory": f"{(base + 5000 * per_job // 1024) * 3 // 2}Mi"}
    by_hand = resources({"operator": {"resources": {"requests": {"memory": "2Gi"}, "limits": {"memory": "3Gi"}}}})
    assert by_hand == {"requests": {"cpu": "50m", "memory": "2Gi"}, "limits": {"memory": "3Gi"}}  # merged by Helm


def test_ha_needs_peering() -> None:
    docs = render(SCENARIOS["ha"])
    assert next(d for d in docs if d["kind"] == "Deployment")["spec"]["replicas"] == 2
    assert any(d["kind"] == "ClusterKopfPeering" and d["metadata"]["name"] == "kubetune" for d in docs)
    with pytest.raises(helm.HelmError, match="needs operator.peering"):
        render({"operator": {"replicas": 2}})


def test_monitoring_objects() -> None:
    docs = {d["kind"]: d for d in render(SCENARIOS["monitoring"])}
    rule = docs["PrometheusRule"]["spec"]
    assert rule == yaml.safe_load(alerts_yaml())
    assert docs["PodMonitor"]["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "kubetune-trainer"
    dashboard = docs["ConfigMap"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["kubetune.json"])["uid"] == "kubetune-training"
    assert {d["kind"] for d in render({})}.isdisjoint(CUSTOM_KINDS)  # off by default


def test_values_schema_rejects_unknown_and_bad_values() -> None:
    chart = helm.Chart.load(CHART)
    chart.validate_schema({})
    with pytest.raises(helm.HelmError):
        chart.validate_schema({"operatr": {"replicas": 1}})
    with pytest.raises(helm.HelmError):
        chart.validate_schema({"operator": {"image": {"pullPolicy": "Sometimes"}}})


def test_values_file_documents_every_key() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    assert lines[0] == "# yaml-language-server: $schema=values.schema.json"
    leaf = re.compile(r"^\s*[A-Za-z][\w.-]*:\s*\S")  # a key with its value on the line
    for index, line in enumerate(lines):
        if leaf.match(line):
            assert lines[index - 1].strip().startswith("#"), f"values.yaml line {index + 1} has no comment: {line}"


def test_generated_files_and_crd_copy_are_in_sync() -> None:
    assert (CHART / "files" / "dashboard.json").read_text() == dashboard_json()
    assert (CHART / "files" / "alerts.yaml").read_text() == alerts_yaml()
    assert (CHART / "crds" / "finetunejob.yaml").read_text() == (ROOT / "crds" / "finetunejob.yaml").read_text()


def test_admin_policy_and_network_policies_reach_the_operator_settings(monkeypatch) -> None:
    """What the chart's values become in the operator: its settings, read from the rendered env."""
    from kubetune_operator.settings import OperatorSettings

    values = {
        "trainer": {"allowedImages": ["registry.corp/ml/"], "credentialsSecretLabel": "corp.io/kubetune"},
        "networkPolicy": {"prometheus": {"namespaceSelector": {"team": "obs"}}},
    }
    docs = render(values)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    for item in deployment["spec"]["template"]["spec"]["containers"][0]["env"]:
        monkeypatch.setenv(item["name"], item["value"])
    settings = OperatorSettings()
    assert settings.trainer.allowed_images == ["registry.corp/ml/"]
    assert settings.trainer.credentials_label == "corp.io/kubetune"
    policy = settings.network_policy
    assert policy.enabled and policy.prometheus_namespace_selector == {"team": "obs"}
    assert policy.operator_namespace == "kubetune"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert policy.operator_pod_selector.items() <= pod_labels.items()  # the operator can scrape rank 0
    operator_policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
    assert operator_policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    test_pod = next(d for d in docs if d["kind"] == "Pod")  # `helm test` may still reach the metrics
    assert test_pod["metadata"]["labels"]["kubetune.dev/helm-test"] == "true"
    off = render({"networkPolicy": {"enabled": False}})
    assert not [d for d in off if d["kind"] == "NetworkPolicy"]
    env = {
        e["name"]: e["value"]
        for e in next(d for d in off if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["KUBETUNE_NETWORK_POLICY__ENABLED"] == "false"
