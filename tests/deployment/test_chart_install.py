"""`helm install` of the chart into a real control plane (tests/kube_cluster.py), and the operator
doing its whole job with exactly the chart's RBAC: it runs with a token of the chart's
ServiceAccount and the environment the chart's Deployment sets."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from kubetune.s3server import free_port

from tests.factories import credentials_secret, example_job
from tests.helpers import ROOT
from tests.kube_cluster import BIN, Cluster, kubeconfig, start_operator, stop_operator, wait_for

CHART = ROOT / "charts" / "kubetune"
FTJ = ("kubetune.dev/v1alpha1", "finetunejobs")


def helm(cluster: Cluster, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(tmp_path / "helm-cache"),
        "HELM_CONFIG_HOME": str(tmp_path / "helm-config"),
        "HELM_DATA_HOME": str(tmp_path / "helm-data"),
    }
    out = subprocess.run(
        [str(BIN / "helm"), "--kubeconfig", str(cluster.kubeconfig), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def service_account_kubeconfig(cluster: Cluster, namespace: str, account: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the ServiceAccount, with a token from the TokenRequest API."""
    token = cluster.kubectl("create", "token", account, "-n", namespace, "--duration=1h").stdout.strip()
    path.write_text(json.dumps(kubeconfig(cluster.url, cluster.pki, {"token": token}, namespace)))
    return path


@pytest.mark.parametrize("scope", ["cluster", "namespaced"])
def test_helm_install_then_the_operator_runs_a_job_with_the_charts_rbac(
    cluster: Cluster, namespace: str, tmp_path: Path, scope: str
) -> None:
    release_ns = cluster.namespace("kubetune")
    values = ["--set", "trainer.image=registry.example/kubetune-trainer:test"]
    if scope == "namespaced":
        values += ["--set-json", f"watchNamespaces={json.dumps([namespace])}"]
    # --wait: the operator's pod is scheduled on a kwok node and becomes Ready there.
    helm(cluster, tmp_path, "install", "kt", str(CHART), "-n", release_ns, "--wait", "--timeout", "120s", *values)

    deployment = cluster.get("apps/v1", "deployments", release_ns, "kt-kubetune")
    assert deployment["status"].get("readyReplicas") == 1
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    assert cluster.get("v1", "serviceaccounts", release_ns, account)
    assert cluster.list("v1", "services", release_ns)
    assert cluster.list("networking.k8s.io/v1", "networkpolicies", release_ns)
    dashboards = cluster.list("v1", "configmaps", release_ns, label_selector="grafana_dashboard=1")
    assert dashboards and any(k.endswith(".json") for k in dashboards[0]["data"])
    if scope == "namespaced":
        assert cluster.get("rbac.authorization.k8s.io/v1", "roles", namespace, "kt-kubetune")
    else:
        assert cluster.get("rbac.authorization.k8s.io/v1", "clusterroles", None, "kt-kubetune")

    # What the ServiceAccount may not do, as the API server's authorizer answers.
    subject = f"system:serviceaccount:{release_ns}:{account}"
    for verb, resource in (("delete", "configmaps"), ("list", "secrets"), ("create", "pods"), ("update", "jobs")):
        denied = cluster.kubectl("auth", "can-i", verb, resource, "-n", namespace, "--as", subject, check=False)
        assert denied.stdout.strip() == "no", (verb, resource)

    # The operator as the chart deploys it: its ServiceAccount's token and its Deployment's env.
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    env |= {
        "KUBETUNE_METRICS_PORT": str(free_port()),
        "KUBETUNE_LIVENESS_PORT": str(free_port()),
        "KUBETUNE_STATUS_INTERVAL_S": "0.5",
    }
    config = service_account_kubeconfig(cluster, release_ns, account, tmp_path / "operator.kubeconfig")
    proc = start_operator(config, env, tmp_path / "operator.log")
    try:
        cluster.create(credentials_secret(namespace))
        cluster.create(example_job("labpics-sam2", namespace))
        wait_for(lambda: cluster.get("batch/v1", "jobs", namespace, "labpics-sam2"), timeout=60, proc=proc)
        for kind in (("v1", "configmaps", "labpics-sam2-config"), ("v1", "services", "labpics-sam2")):
            assert cluster.get(kind[0], kind[1], namespace, kind[2])

        def running_pods():
            pods = cluster.list("v1", "pods", namespace, label_selector="kubetune.dev/finetunejob=labpics-sam2")
            return [p for p in pods if p["status"].get("phase") == "Running"] if len(pods) == 2 else None

        pods = wait_for(lambda: (p := running_pods()) and len(p) == 2 and p, timeout=60, proc=proc)
        wait_for(
            lambda: (
                (cluster.get(*FTJ, namespace, "labpics-sam2").get("status") or {}).get("phase")
                in ("Staging", "Running")
            ),
            proc=proc,
        )
        for pod in pods:
            cluster.finish_pod(namespace, pod["metadata"]["name"], 0)
        done = wait_for(
            lambda: (
                (s := cluster.get(*FTJ, namespace, "labpics-sam2").get("status") or {}).get("phase") == "Succeeded"
                and s
            ),
            timeout=60,
            proc=proc,
        )
        assert {c["type"]: c["status"] for c in done["conditions"]}["Succeeded"] == "True"
        reasons = {e.get("reason") for e in cluster.list("v1", "events", namespace)}
        assert "Succeeded" in reasons  # the operator may write Events
    finally:
        cluster.delete_finetunejobs(namespace)
        log = stop_operator(proc)
    # Never refused by the authorizer. (A cluster-wide operator also sees other tests' namespaces
    # being deleted, where the API server refuses new Events for another reason.)
    assert f'User "{subject}" cannot' not in log, log[-4000:]

    helm(cluster, tmp_path, "uninstall", "kt", "-n", release_ns, "--wait", "--timeout", "120s")
    assert cluster.get("apps/v1", "deployments", release_ns, "kt-kubetune") is None
    cluster.delete("v1", "namespaces", None, release_ns)
