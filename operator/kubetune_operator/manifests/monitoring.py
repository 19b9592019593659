"""The Grafana dashboard and the Prometheus alerts, as data, from one list of queries.

`kubetune monitoring` writes charts/kubetune/files/{dashboard.json,alerts.yaml}; a test fails when
the committed files drift, another runs every expression against a real Prometheus.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import yaml

SEL = 'namespace=~"$namespace", job=~"$job"'
# The trainer's threshold (kubetune_trainer.metrics.report.COLLAPSE_SHARE; a test keeps them equal):
# past this share of prompts whose mask is empty, a promptable model is collapsing.
COLLAPSE_SHARE = 0.5


def quantile(q: float, histogram: str, window: str) -> str:
    """The q-quantile of a trainer histogram per job, over all ranks."""
    return f"histogram_quantile({q}, sum by (job, le) (rate({histogram}_bucket{{{SEL}}}[{window}])))"


@dataclass(frozen=True)
class Panel:
    title: str
    exprs: list[tuple[str, str]]  # (PromQL, legend)
    unit: str = "short"
    description: str = ""
    kind: str = "timeseries"
    training: bool = True  # False: operator panels (not fed by a trainer run)


PANELS: list[Panel] = [
    Panel(
        "Training loss",
        [(f'kubetune_train_loss{{{SEL}, rank="0"}}', "{{job}}")],
        description="Loss of the last step, mean over ranks.",
    ),
    Panel("Loss components", [(f'kubetune_train_loss_component{{{SEL}, rank="0"}}', "{{job}} {{component}}")]),
    Panel("Learning rate", [(f'kubetune_train_learning_rate{{{SEL}, rank="0"}}', "{{job}}")], unit="none"),
    Panel(
        "Progress",
        [(f'100 * kubetune_train_step{{{SEL}, rank="0"}} / kubetune_train_total_steps{{{SEL}, rank="0"}}', "{{job}}")],
        unit="percent",
        kind="bargauge",
    ),
    Panel(
        "Step and epoch",
        [
            (f'kubetune_train_step{{{SEL}, rank="0"}}', "{{job}} step"),
            (f'kubetune_train_epoch{{{SEL}, rank="0"}}', "{{job}} epoch"),
        ],
    ),
    Panel("Images/s per job", [(f'kubetune_train_images_per_second{{{SEL}, rank="0"}}', "{{job}}")], unit="none"),
    Panel(
        "Images/s per rank",
        [(f"sum by (job, rank) (rate(kubetune_train_images_total{{{SEL}}}[5m]))", "{{job}} rank {{rank}}")],
        unit="none",
    ),
    Panel(
        "Data wait vs step time (is the GPU starved?)",
        [
            (
                f"sum by (job) (rate(kubetune_data_wait_seconds_sum{{{SEL}}}[5m])) / "
                f"sum by (job) (rate(kubetune_train_step_seconds_sum{{{SEL}}}[5m]))",
                "{{job}} waiting share",
            ),
        ],
        unit="percentunit",
        description="Share of step time spent waiting for data; near 1 means data-starved.",
    ),
    Panel(
        "Step time p50 / p95",
        [
            (quantile(0.5, "kubetune_train_step_seconds", "5m"), "{{job}} p50"),
            (quantile(0.95, "kubetune_train_step_seconds", "5m"), "{{job}} p95"),
        ],
        unit="s",
    ),
    Panel("AMP grad scale", [(f"kubetune_amp_grad_scale{{{SEL}}}", "{{job}} rank {{rank}}")], unit="none"),
    Panel(
        "AMP skipped steps", [(f"sum by (job) (increase(kubetune_amp_skipped_steps_total{{{SEL}}}[15m]))", "{{job}}")]
    ),
    Panel("GPU memory", [(f"kubetune_gpu_memory_bytes{{{SEL}}}", "{{job}} rank {{rank}} {{kind}}")], unit="bytes"),
    Panel(
        "Evaluation metrics",
        [(f'kubetune_eval_metric{{{SEL}, rank="0", metric!~"size/.*"}}', "{{job}} {{metric}}")],
        unit="none",
    ),
    Panel(
        "Loss vs thresholded masks: soft Dice and IoU",
        [
            (f'kubetune_train_metric{{{SEL}, rank="0", metric="soft_dice_at_logits"}}', "{{job}} train soft Dice"),
            (f'kubetune_train_metric{{{SEL}, rank="0", metric="miou_at_logits"}}', "{{job}} train IoU"),
            (f'kubetune_eval_metric{{{SEL}, rank="0", metric="soft_dice"}}', "{{job}} validation soft Dice"),
            (f'kubetune_eval_metric{{{SEL}, rank="0", metric="miou"}}', "{{job}} validation mIoU"),
        ],
        unit="none",
        description="Soft Dice (on probabilities, what the loss sees) next to IoU of the thresholded masks "
        "(what users get). Soft Dice rising while IoU falls: the masks fade below 0.5 and vanish.",
    ),
    Panel(
        "Mask collapse watch",
        [
            (f'kubetune_train_metric{{{SEL}, rank="0", metric="empty_share"}}', "{{job}} train empty masks"),
            (f'kubetune_eval_metric{{{SEL}, rank="0", metric="empty_share"}}', "{{job}} validation empty masks"),
            (f'kubetune_train_metric{{{SEL}, rank="0", metric="target_prob"}}', "{{job}} train p inside target"),
            (f'kubetune_eval_metric{{{SEL}, rank="0", metric="target_prob"}}', "{{job}} validation p inside target"),
        ],
        unit="percentunit",
        description=f"Share of prompts whose kept mask is empty (alert past {COLLAPSE_SHARE:.0%}) and the mean "
        "predicted probability inside the target: a model learning to segment nothing shows here first.",
    ),
    Panel(
        "Base model vs best fine-tuned",
        [
            (f'kubetune_eval_baseline_metric{{{SEL}, rank="0"}}', "{{job}} base {{metric}}"),
            (f'kubetune_eval_best_metric{{{SEL}, rank="0"}}', "{{job}} best {{metric}}"),
        ],
        unit="none",
    ),
    Panel(
        "Checkpoint duration p95",
        [(quantile(0.95, "kubetune_checkpoint_seconds", "1h"), "{{job}}")],
        unit="s",
    ),
    Panel("Last checkpointed step", [(f'kubetune_checkpoint_last_step{{{SEL}, rank="0"}}', "{{job}}")], kind="stat"),
    Panel(
        "S3 traffic",
        [(f"sum by (job, direction) (rate(kubetune_s3_bytes_total{{{SEL}}}[5m]))", "{{job}} {{direction}}")],
        unit="Bps",
    ),
    Panel("FineTuneJobs by phase", [("sum by (phase) (kubetune_operator_jobs)", "{{phase}}")], training=False),
    Panel(
        "Reconcile latency p99",
        [
            (
                "histogram_quantile(0.99, sum by (le, handler) (rate(kubetune_operator_reconcile_seconds_bucket[5m])))",
                "{{handler}}",
            )
        ],
        unit="s",
        training=False,
    ),
    Panel(
        "Reconcile errors",
        [("sum by (handler) (rate(kubetune_operator_reconcile_errors_total[5m]))", "{{handler}}")],
        training=False,
    ),
]


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    duration: str
    severity: str
    summary: str
    labels: dict[str, str] = field(default_factory=dict)


ALERTS: list[Alert] = [
    Alert(
        "KubetuneTrainingStalled",
        'changes(kubetune_train_step{rank="0"}[15m]) == 0'
        ' and kubetune_train_step{rank="0"} < kubetune_train_total_steps{rank="0"}',
        "5m",
        "warning",
        "FineTuneJob {{ $labels.namespace }}/{{ $labels.job }} made no step progress for 15 minutes",
    ),
    Alert(
        "KubetuneNonFiniteLoss",
        'kubetune_train_loss{rank="0"} != kubetune_train_loss{rank="0"} or abs(kubetune_train_loss{rank="0"}) == +Inf',
        "1m",
        "critical",
        "FineTuneJob {{ $labels.namespace }}/{{ $labels.job }} has a NaN or infinite loss",
    ),
    Alert(
        "KubetuneManySkippedAmpSteps",
        "sum by (namespace, job) (increase(kubetune_amp_skipped_steps_total[15m])) > 10",
        "5m",
        "warning",
        "FineTuneJob {{ $labels.namespace }}/{{ $labels.job }} skipped over 10 fp16 steps in 15 minutes",
    ),
    Alert(
        "KubetuneDataStarved",
        "sum by (namespace, job) (rate(kubetune_data_wait_seconds_sum[10m])) / "
        "sum by (namespace, job) (rate(kubetune_train_step_seconds_sum[10m])) > 0.5",
        "15m",
        "warning",
        "FineTuneJob {{ $labels.namespace }}/{{ $labels.job }} spends over half of each step waiting for data",
    ),
    Alert(
        "KubetuneMasksCollapsing",
        f'avg_over_time(kubetune_train_metric{{rank="0", metric="empty_share"}}[10m]) > {COLLAPSE_SHARE}'
        f' or kubetune_eval_metric{{rank="0", metric="empty_share"}} > {COLLAPSE_SHARE}',
        "5m",
        "warning",
        "FineTuneJob {{ $labels.namespace }}/{{ $labels.job }}: over half of its prompts get an empty mask "
        "(the model is learning to segment nothing)",
    ),
    Alert(
        "KubetuneJobFailed",
        'kubetune_operator_jobs{phase="Failed"} > 0',
        "1m",
        "warning",
        "{{ $value }} FineTuneJob(s) failed; `kubectl get ftj -A` shows which and why",
    ),
    Alert(
        "KubetuneOperatorReconcileErrors",
        "sum(rate(kubetune_operator_reconcile_errors_total[10m])) > 0",
        "10m",
        "warning",
        "The kubetune operator keeps failing to reconcile FineTuneJobs; see its log",
    ),
]


def dashboard() -> dict[str, Any]:
    panels = []
    for index, panel in enumerate(PANELS):
        panels.append(
            {
                "id": index + 1,
                "type": panel.kind,
                "title": panel.title,
                "description": panel.description,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"x": (index % 2) * 12, "y": (index // 2) * 8, "w": 12, "h": 8},
                "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
                "targets": [
                    {"refId": chr(65 + i), "expr": expr, "legendFormat": legend}
                    for i, (expr, legend) in enumerate(panel.exprs)
                ],
            }
        )

    def variable(name: str, label: str) -> dict[str, Any]:
        query = (
            f"label_values(kubetune_train_step, {name})"
            if name == "namespace"
            else 'label_values(kubetune_train_step{namespace=~"$namespace"}, job)'
        )
        return {
            "name": name,
            "label": label,
            "type": "query",
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "query": {"query": query, "refId": name},
            "definition": query,
            "includeAll": True,
            "multi": True,
            "allValue": ".*",
            "refresh": 2,
            "current": {"text": "All", "value": "$__all"},
        }

    return {
        "uid": "kubetune-training",
        "title": "kubetune: fine-tuning",
        "tags": ["kubetune"],
        "schemaVersion": 39,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "templating": {
            "list": [
                {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus"},
                variable("namespace", "Namespace"),
                variable("job", "FineTuneJob"),
            ]
        },
        "panels": panels,
    }


def alert_groups() -> dict[str, Any]:
    return {
        "groups": [
            {
                "name": "kubetune",
                "rules": [
                    {
                        "alert": a.name,
                        "expr": a.expr,
                        "for": a.duration,
                        "labels": {"severity": a.severity, **a.labels},
                        "annotations": {"summary": a.summary},
                    }
                    for a in ALERTS
                ],
            }
        ]
    }


def dashboard_json() -> str:
    return json.dumps(dashboard(), indent=1) + "\n"


def alerts_yaml() -> str:
    return "# Generated by `kubetune monitoring`; do not edit by hand.\n" + yaml.safe_dump(
        alert_groups(), sort_keys=False, width=200
    )
