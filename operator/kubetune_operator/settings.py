"""Operator settings from the environment (the chart sets them from its values): one object,
built in `main` and passed down, never read at import time."""

from __future__ import annotations

from kubetune_trainer.config import environment
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class TrainerDefaults(BaseModel):
    image: str = "ghcr.io/kubetune/trainer:0.1.0"
    """Trainer image for FineTuneJobs that do not set spec.image."""
    s3_endpoint: str | None = None
    """S3 endpoint for FineTuneJobs that do not set spec.storage.endpoint."""
    credentials_secret: str | None = None
    """Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY when spec.storage.credentialsSecret is unset."""
    weights_mirror: str | None = None
    """storage.mirror for FineTuneJobs that set none: an s3:// prefix holding the published
    weights (hf://, https://, detectron2://) for a cluster without internet access."""
    metrics_port: int = environment.DEFAULT_METRICS_PORT
    """Port of the trainer's Prometheus endpoint (local rank 0; rank r serves port + r)."""
    rendezvous_port: int = 29400
    """torchrun c10d rendezvous port on pod index 0."""
    rendezvous_timeout_s: int = 900
    """How long workers wait for the others (and for index 0's DNS name) before failing."""
    cache_host_path: str | None = None
    """Node folder for the dataset cache (kept across pod restarts); unset: an emptyDir per pod.
    Each pod mounts only its own job's part (jobs/<namespace>/<name>) and the shared part."""
    allowed_images: list[str] = Field(default_factory=list)
    """Images a FineTuneJob may name in spec.image, besides `image`: exact references, prefixes
    (ending in / or :) or digests (sha256:...). Empty: only `image`."""
    credentials_label: str = "kubetune.dev/credentials"
    """A Secret named in spec.storage.credentialsSecret must carry this label with value "true"
    (set by whoever administers the namespace), or the job is refused."""
    cache_size_limit: str = "200Gi"
    """Size limit of the emptyDir cache."""


class NetworkPolicySettings(BaseModel):
    enabled: bool = True
    """Render a NetworkPolicy with each job: its pods reach each other (rendezvous, NCCL), and
    only Prometheus and the operator reach the metrics ports."""
    prometheus_namespace_selector: dict[str, str] = Field(default_factory=dict)
    """Labels of the namespaces Prometheus runs in; empty: any namespace."""
    prometheus_pod_selector: dict[str, str] = Field(default_factory=lambda: {"app.kubernetes.io/name": "prometheus"})
    """Labels of the Prometheus pods."""
    operator_namespace: str | None = None
    """The operator's namespace (the chart sets it): the operator scrapes rank 0's metrics."""
    operator_pod_selector: dict[str, str] = Field(default_factory=lambda: {"app.kubernetes.io/name": "kubetune"})
    """Labels of the operator's pods."""


class OperatorSettings(BaseSettings):
    """KUBETUNE_* variables, nested with `__`, e.g. KUBETUNE_TRAINER__IMAGE."""

    model_config = SettingsConfigDict(env_prefix="KUBETUNE_", env_nested_delimiter="__", extra="ignore")

    namespaces: list[str] = Field(default_factory=list)
    """Namespaces watched; empty: the whole cluster."""
    trainer: TrainerDefaults = TrainerDefaults()
    """Defaults applied to every FineTuneJob."""
    network_policy: NetworkPolicySettings = NetworkPolicySettings()
    """Who may reach trainer pods."""
    metrics_port: int = 8080
    """Port of the operator's own Prometheus endpoint (0 disables it)."""
    liveness_port: int = 8081
    """Port of kopf's liveness endpoint (/healthz)."""
    peering: str | None = None
    """kopf peering object name for several replicas (one active); unset: standalone."""
    status_interval_s: float = 15.0
    """How often Staging and Running jobs are observed and rank 0's metrics scraped (other jobs
    are observed when their Job or pods change)."""
    scrape_concurrency: int = Field(64, ge=1)
    """Rank-0 metrics scrapes in flight at once (async: a hung endpoint holds no thread)."""
    scrape_timeout_s: float = Field(2.0, gt=0)
    """A scrape that takes longer is dropped; the job keeps its phase and last progress (a
    pass per job runs on its own, so a slow endpoint delays only its own job)."""
    workers: int = Field(8, ge=1)
    """Jobs reconciled or written at once (threads that talk to the API server); scrapes and
    the watches need none."""
