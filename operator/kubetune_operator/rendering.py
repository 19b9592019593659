"""Desired objects for one FineTuneJob: pure functions of the spec and the operator settings.

ConfigMap (the trainer's config JSON), a headless Service (stable DNS for the rendezvous) and an
Indexed batch/v1 Job (one pod per node, each running torchrun). Nothing here talks to the API.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from kubetune_trainer.config import environment
from kubetune_trainer.errors import EXIT_BAD_INPUT, EXIT_PREEMPTED

from .settings import OperatorSettings
from .specs import GROUP, KIND, VERSION, FineTuneJob

CONFIG_DIR = "/etc/kubetune"
CACHE_DIR = "/var/cache/kubetune"
CONTAINER = "trainer"
JOB_LABEL = f"{GROUP}/finetunejob"
IMMUTABLE_ANNOTATION = f"{GROUP}/immutable-spec"
# Fields whose change would make a running job a different job (new data, model or world shape).
# Everything else (length of training, evaluation and checkpoint cadence, suspension) may change.
IMMUTABLE_FIELDS = {
    "model": None,
    "data": {"source", "format", "train", "validation"},
    "training": {"batchSize", "gradAccumulation", "precision", "optimizer", "loss", "seed"},
    "resources": {"nodes", "gpusPerNode"},
    "output": {"uri"},
    "queueName": None,
}


@dataclass(frozen=True)
class Names:
    job: str
    service: str
    config_map: str

    @classmethod
    def of(cls, ftj: FineTuneJob) -> Names:
        name = ftj.metadata.name
        return cls(job=name, service=name, config_map=f"{name}-config")


DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS_LABEL_MAX = 63


def name_problems(ftj: FineTuneJob) -> list[str]:
    """Why the FineTuneJob's name cannot name what is derived from it, before anything is created.

    The name is the headless Service's (a DNS-1035 label) and the Job's, whose pods are called
    `<name>-<index>` as hostnames (DNS labels of at most 63 characters) and carry it as a label value.
    """
    name = ftj.metadata.name
    longest = f"{name}-{ftj.spec.resources.nodes - 1}"
    problems = []
    if not DNS_LABEL.fullmatch(name):
        problems.append(
            f"metadata.name {name!r} must be a DNS label (lower-case letters, digits and '-', starting "
            "with a letter, no '.'): it names the job's Service and its pods' hostnames"
        )
    if len(longest) > DNS_LABEL_MAX:
        limit = DNS_LABEL_MAX - len(longest) + len(name)
        problems.append(
            f"metadata.name is {len(name)} characters; with resources.nodes={ftj.spec.resources.nodes} it may "
            f"have at most {limit}, since pod hostnames ({longest[:20]}...) are DNS labels of at most {DNS_LABEL_MAX}"
        )
    return problems


def labels(ftj: FineTuneJob) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kubetune-trainer",
        "app.kubernetes.io/instance": ftj.metadata.name,
        "app.kubernetes.io/component": "trainer",
        "app.kubernetes.io/part-of": "kubetune",
        "app.kubernetes.io/managed-by": "kubetune-operator",
        JOB_LABEL: ftj.metadata.name,
    }


def _meta(ftj: FineTuneJob, name: str) -> dict[str, Any]:
    extra = ftj.metadata.model_extra or {}
    meta: dict[str, Any] = {"name": name, "namespace": ftj.metadata.namespace, "labels": labels(ftj)}
    if extra.get("uid"):
        meta["ownerReferences"] = [
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "name": ftj.metadata.name,
                "uid": extra["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    return meta


def train_config_json(ftj: FineTuneJob, settings: OperatorSettings) -> str:
    config = ftj.train_config()
    defaults = {
        "endpoint": settings.trainer.s3_endpoint if config.storage.endpoint is None else None,
        "mirror": settings.trainer.weights_mirror if config.storage.mirror is None else None,
    }
    if update := {k: v for k, v in defaults.items() if v}:
        config = config.model_copy(update={"storage": config.storage.model_copy(update=update)})
    return config.model_dump_json(by_alias=True, indent=1)


def render_config_map(ftj: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(ftj, Names.of(ftj).config_map),
        "data": {"train.json": train_config_json(ftj, settings)},
    }


def render_service(ftj: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    trainer = settings.trainer
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(ftj, Names.of(ftj).service),
        "spec": {
            "clusterIP": "None",
            # Workers resolve <job>-0.<service> before pod 0 is ready (or even started).
            "publishNotReadyAddresses": True,
            "selector": {JOB_LABEL: ftj.metadata.name},
            "ports": [
                {"name": "rendezvous", "port": trainer.rendezvous_port, "targetPort": trainer.rendezvous_port},
                {"name": "metrics", "port": trainer.metrics_port, "targetPort": trainer.metrics_port},
            ],
        },
    }


def torchrun_args(ftj: FineTuneJob, settings: OperatorSettings) -> list[str]:
    names = Names.of(ftj)
    res = ftj.spec.resources
    trainer = settings.trainer
    uid = (ftj.metadata.model_extra or {}).get("uid") or ftj.metadata.name
    return [
        "--nnodes",
        str(res.nodes),
        "--nproc-per-node",
        str(max(res.gpus_per_node, 1)),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"{names.job}-0.{names.service}:{trainer.rendezvous_port}",
        "--rdzv-id",
        uid,
        "--rdzv-conf",
        f"join_timeout={trainer.rendezvous_timeout_s}",
        "--max-restarts",
        "0",  # the Job replaces failed pods; the trainer resumes from checkpoints
        "-m",
        "kubetune_trainer",
        "--config",
        f"{CONFIG_DIR}/train.json",
    ]


def _resources(ftj: FineTuneJob) -> dict[str, Any]:
    res = ftj.spec.resources
    amounts: dict[str, str] = {}
    if res.cpu:
        amounts["cpu"] = res.cpu
    if res.memory:
        amounts["memory"] = res.memory
    if res.gpus_per_node:
        amounts["nvidia.com/gpu"] = str(res.gpus_per_node)
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def _env(ftj: FineTuneJob, settings: OperatorSettings) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": environment.CACHE_DIR, "value": CACHE_DIR},
        {"name": environment.METRICS_PORT, "value": str(settings.trainer.metrics_port)},
        {"name": environment.LOG_FORMAT, "value": "json"},
        {"name": "HOME", "value": "/tmp"},  # read-only root: libraries that write to ~ use /tmp
        {"name": "TMPDIR", "value": "/tmp"},
        # torchrun's wait for the workers after SIGTERM (they checkpoint), inside the grace period.
        {"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": str(_grace(ftj) - 15)},
        # A hung collective fails the run before the operator would call it stalled.
        {"name": environment.COLLECTIVE_TIMEOUT_S, "value": str(_collective_timeout(ftj))},
    ]
    secret = ftj.spec.storage.credentials_secret or settings.trainer.credentials_secret
    if secret:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            ref = {"name": secret, "key": key}
            if key == "AWS_SESSION_TOKEN":
                ref["optional"] = True
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    if token := ftj.spec.model.hf_token_secret:  # never in the ConfigMap: huggingface_hub reads HF_TOKEN
        ref = {"name": token, "key": environment.HF_TOKEN}
        env.append({"name": environment.HF_TOKEN, "valueFrom": {"secretKeyRef": ref}})
    return env


def _collective_timeout(ftj: FineTuneJob) -> int:
    deadline = ftj.spec.run_policy.progress_deadline_seconds
    return max(deadline // 2, 120) if deadline else environment.DEFAULT_COLLECTIVE_TIMEOUT_S


def _grace(ftj: FineTuneJob) -> int:
    return ftj.spec.run_policy.termination_grace_period_seconds


def _job_cache(ftj: FineTuneJob) -> str:
    """The job's own part of the node cache, as the trainer finds it (`training.inputs`)."""
    return f"{environment.CACHE_JOBS}/{ftj.metadata.namespace}/{ftj.metadata.name}"


def _volumes(ftj: FineTuneJob, settings: OperatorSettings) -> list[dict[str, Any]]:
    """With a node cache folder, the pod gets only its own job's part of it and the shared part
    (whose files the trainer checks before use), never another job's files."""
    host = settings.trainer.cache_host_path
    if host:
        root = host.rstrip("/")
        cache = [
            {"name": "cache", "emptyDir": {}},
            {"name": "job-cache", "hostPath": {"path": f"{root}/{_job_cache(ftj)}", "type": "DirectoryOrCreate"}},
            {
                "name": "shared-cache",
                "hostPath": {"path": f"{root}/{environment.CACHE_SHARED}", "type": "DirectoryOrCreate"},
            },
        ]
    else:
        cache = [{"name": "cache", "emptyDir": {"sizeLimit": settings.trainer.cache_size_limit}}]
    return [
        {"name": "config", "configMap": {"name": Names.of(ftj).config_map}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": ftj.spec.resources.shm_size}},
        *cache,
        {"name": "tmp", "emptyDir": {}},
    ]


def _cache_mounts(ftj: FineTuneJob, settings: OperatorSettings) -> list[dict[str, Any]]:
    mounts = [{"name": "cache", "mountPath": CACHE_DIR}]
    if settings.trainer.cache_host_path:
        mounts += [
            {"name": "job-cache", "mountPath": f"{CACHE_DIR}/{_job_cache(ftj)}"},
            {"name": "shared-cache", "mountPath": f"{CACHE_DIR}/{environment.CACHE_SHARED}"},
        ]
    return mounts


def immutable_view(ftj: FineTuneJob) -> dict[str, Any]:
    """The spec fields that may not change while the Job exists, in a canonical form."""
    spec = ftj.spec.model_dump(by_alias=True, mode="json")
    view: dict[str, Any] = {}
    for section, fields in IMMUTABLE_FIELDS.items():
        value = spec.get(section)
        view[section] = (
            value if fields is None or not isinstance(value, dict) else {k: value.get(k) for k in sorted(fields)}
        )
    return view


def _digest(value: Any) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def immutable_digests(view: dict[str, Any]) -> dict[str, Any]:
    """`view` with each field's value replaced by a digest: the Job's annotation stays small (a
    spec of hundreds of KiB would not fit in the 256 KiB the API server allows all annotations),
    and a change is still named by field. Values that are digests already stay as they are (an
    annotation written by an earlier version holds the values themselves)."""

    def one(value: Any) -> str:
        return value if isinstance(value, str) and value.startswith("sha256:") else _digest(value)

    return {
        section: {k: one(v) for k, v in value.items()} if isinstance(value, dict) else one(value)
        for section, value in view.items()
    }


def render_job(ftj: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    names = Names.of(ftj)
    spec = ftj.spec
    policy = spec.run_policy
    trainer = settings.trainer
    meta = _meta(ftj, names.job)
    meta["annotations"] = {IMMUTABLE_ANNOTATION: json.dumps(immutable_digests(immutable_view(ftj)), sort_keys=True)}
    if spec.queue_name:
        meta["labels"]["kueue.x-k8s.io/queue-name"] = spec.queue_name
    pod_spec: dict[str, Any] = {
        "subdomain": names.service,
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": _grace(ftj),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "fsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": CONTAINER,
                "image": spec.image or trainer.image,
                "command": ["python", "-m", "kubetune_trainer.launch"],
                "args": torchrun_args(ftj, settings),
                "env": _env(ftj, settings),
                "ports": [
                    {"name": "metrics", "containerPort": trainer.metrics_port},
                    {"name": "rendezvous", "containerPort": trainer.rendezvous_port},
                ],
                "resources": _resources(ftj),
                "volumeMounts": [
                    {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                    {"name": "dshm", "mountPath": "/dev/shm"},
                    *_cache_mounts(ftj, settings),
                    {"name": "tmp", "mountPath": "/tmp"},
                ],
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "runAsNonRoot": True,
                    "capabilities": {"drop": ["ALL"]},
                },
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }
        ],
        "volumes": _volumes(ftj, settings),
    }
    res = spec.resources
    if res.node_selector:
        pod_spec["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod_spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in res.tolerations]
    if res.priority_class_name:
        pod_spec["priorityClassName"] = res.priority_class_name
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": res.nodes,
        "parallelism": res.nodes,
        "backoffLimit": policy.backoff_limit,
        # With a Kueue queue the Job starts suspended and Kueue admits it (all pods as one gang).
        "suspend": policy.suspend or bool(spec.queue_name),
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_BAD_INPUT]},
                },
                # Preemption, eviction, node drain: retry without spending the backoff budget.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                # SIGTERM turned into a checkpoint and exit 3 (see kubetune_trainer.training.preemption).
                {
                    "action": "Ignore",
                    "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_PREEMPTED]},
                },
            ]
        },
        "podReplacementPolicy": "Failed",  # a new pod only once the old one is gone (one rank per index)
        "template": {"metadata": {"labels": labels(ftj)}, "spec": pod_spec},
    }
    if policy.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = policy.active_deadline_seconds
    # runPolicy.ttlSecondsAfterFinished is carried out by the operator, not by the Job's own TTL: the
    # TTL controller could delete a Job before its outcome is recorded, and a Job that vanished
    # unrecorded looks like a lost one that must be created again.
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def render_network_policy(ftj: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    """The job's pods accept its own pods on any port (the c10d rendezvous and NCCL's ports,
    which NCCL picks itself), and on the metrics ports only Prometheus and the operator."""
    policy, trainer = settings.network_policy, settings.trainer
    own = {"podSelector": {"matchLabels": {JOB_LABEL: ftj.metadata.name}}}
    prometheus = {
        "namespaceSelector": {"matchLabels": dict(policy.prometheus_namespace_selector)},
        "podSelector": {"matchLabels": dict(policy.prometheus_pod_selector)},
    }
    scrapers = [prometheus]
    if policy.operator_namespace:
        scrapers.append(
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": policy.operator_namespace}},
                "podSelector": {"matchLabels": dict(policy.operator_pod_selector)},
            }
        )
    ports: dict[str, Any] = {"protocol": "TCP", "port": trainer.metrics_port}
    if ftj.spec.resources.gpus_per_node > 1:  # local rank r serves port + r
        ports["endPort"] = trainer.metrics_port + ftj.spec.resources.gpus_per_node - 1
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(ftj, Names.of(ftj).job),
        "spec": {
            "podSelector": {"matchLabels": {JOB_LABEL: ftj.metadata.name}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [own]}, {"from": scrapers, "ports": [ports]}],
        },
    }


def render_all(ftj: FineTuneJob, settings: OperatorSettings) -> list[dict[str, Any]]:
    """Everything the operator creates for one FineTuneJob, in creation order (the
    NetworkPolicy before the pods it protects)."""
    objects = [render_config_map(ftj, settings), render_service(ftj, settings)]
    if settings.network_policy.enabled:
        objects.append(render_network_policy(ftj, settings))
    return [*objects, render_job(ftj, settings)]
