"""A real Prometheus (Debian's package) scrapes a real trainer run and a real operator process;
every dashboard and alert expression is evaluated against what it collected."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from kubetune.s3server import free_port
from kubetune_operator.manifests.monitoring import ALERTS, PANELS
from kubetune_operator.telemetry import OperatorMetrics
from kubetune_trainer.metrics.prometheus import PrometheusWriter

from tests.factories import credentials_secret, job_manifest
from tests.helpers import ROOT
from tests.kube_cluster import start_operator, stop_operator, wait_for

ALERTS_FILE = ROOT / "charts" / "kubetune" / "files" / "alerts.yaml"
GPU_ONLY = {"GPU memory"}  # kubetune_gpu_memory_bytes has no series on a CPU run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("prometheus") is None, reason="Debian's prometheus is not installed (make test installs it)"
    ),
]


def query(base: str, expr: str, at: float) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr, "time": f"{at:.3f}"})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def concrete(expr: str) -> str:
    return expr.replace("$namespace", ".*").replace("$job", ".*")


def metric_names(expr: str) -> set[str]:
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in re.findall(r"\bkubetune_[a-z0-9_]+", expr)}


def exported_families() -> set[str]:
    names = set()
    for registry in (PrometheusWriter("x", "y", 0, "sam2").registry, OperatorMetrics().registry):
        for family in registry.collect():  # counters are exposed with a _total suffix
            names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def test_no_query_names_a_metric_the_code_does_not_export() -> None:
    exported = exported_families()
    used = set().union(*(metric_names(e) for p in PANELS for e, _ in p.exprs), *(metric_names(a.expr) for a in ALERTS))
    assert used and used <= exported, used - exported


def test_alert_rules_pass_promtool() -> None:
    out = subprocess.run(["promtool", "check", "rules", str(ALERTS_FILE)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in out.stdout


def test_dashboard_queries_return_series_for_a_real_run(
    start_run,
    cluster,
    namespace: str,
    s3_endpoint: str,
    tiny_coco_s3: str,
    bucket: str,
    tmp_path: Path,
) -> None:
    trainer_port, operator_port, prom_port = free_port(), free_port(), free_port()
    cluster.create(credentials_secret(namespace))  # the example names it; the operator refuses unmarked ones
    operator = start_operator(
        cluster.kubeconfig,
        log_path=tmp_path / "operator.log",
        env={
            "KUBETUNE_NAMESPACES": json.dumps([namespace]),
            "KUBETUNE_METRICS_PORT": str(operator_port),
            "KUBETUNE_LIVENESS_PORT": str(free_port()),
            "KUBETUNE_STATUS_INTERVAL_S": "0.5",
        },
    )
    manifest = yaml.safe_load((ROOT / "examples" / "finetunejob.yaml").read_text())
    manifest["metadata"] = {"name": "watched", "namespace": namespace}
    cluster.create(manifest)

    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS_FILE)],
        "scrape_configs": [
            {
                "job_name": "trainer",
                "honor_labels": True,
                "static_configs": [{"targets": [f"127.0.0.1:{trainer_port}", f"127.0.0.1:{trainer_port + 1}"]}],
            },
            {"job_name": "kubetune-operator", "static_configs": [{"targets": [f"127.0.0.1:{operator_port}"]}]},
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom_log = (tmp_path / "prometheus.log").open("w")
    prometheus = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=prom_log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{prom_port}"
    try:
        wait_for(lambda: _ready(base), timeout=60, proc=None)
        spec = job_manifest(
            tiny_coco_s3, f"s3://{bucket}/out/", s3_endpoint, maxSteps=30, evalEvery=5, precision="fp16"
        )
        spec["spec"]["output"]["checkpointEvery"] = 5
        run, log = start_run(spec, nproc=2, env={"KUBETUNE_METRICS_PORT": str(trainer_port)})
        mid = None
        while run.poll() is None:  # note a moment when training has clearly progressed
            result = query(base, 'kubetune_train_step{rank="0"}', time.time())
            if result and float(result[0]["value"][1]) >= 20 and mid is None:
                mid = time.time()
            time.sleep(0.5)
        assert run.returncode == 0, log.read_text()[-3000:]
        assert mid is not None, "Prometheus never saw step 20"
        wait_for(lambda: query(base, "sum(kubetune_operator_jobs) == 1", time.time()), timeout=30)
        now = time.time()

        empty = []
        for panel in PANELS:
            at = mid if panel.training else now
            for expr, _ in panel.exprs:
                if not query(base, concrete(expr), at) and panel.title not in GPU_ONLY:
                    empty.append(f"{panel.title}: {expr}")
        assert empty == [], "dashboard queries without data:\n" + "\n".join(empty)
        per_rank = query(base, concrete(PANELS[6].exprs[0][0]), mid)
        assert sorted(r["metric"]["rank"] for r in per_rank) == ["0", "1"]

        with urllib.request.urlopen(f"{base}/api/v1/rules", timeout=10) as resp:
            rules = [r for g in json.loads(resp.read())["data"]["groups"] for r in g["rules"]]
        assert sorted(r["name"] for r in rules) == sorted(a.name for a in ALERTS)
        assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
        for alert in ALERTS:  # every alert expression evaluates against the collected data
            query(base, alert.expr, mid)
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
        cluster.delete_finetunejobs(namespace)
        stop_operator(operator)


def _ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False
