"""The FineTuneJob resource as pydantic models (kubetune.dev/v1alpha1).

The spec composes the trainer's `TrainParameters` (model, data, training, storage, output) and
adds what only the cluster side needs (resources, runPolicy, queueName, image). Torch-free.
"""

from __future__ import annotations

from typing import Any, Literal

from kubetune_trainer.config import JobIdentity, Section, TrainConfig, TrainParameters
from pydantic import Field

GROUP = "kubetune.dev"
VERSION = "v1alpha1"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
# Kubernetes' own rules, in the CRD schema so the API server refuses a bad value naming the field
# (a quantity it cannot parse fails the Job's decoding without naming any): resource.Quantity's
# regular expression, and a label value (the queue name becomes Kueue's queue-name label).
QUANTITY = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"


class Toleration(Section):
    key: str | None = None
    """Taint key the toleration matches (empty with operator Exists: every taint)."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """Exists or Equal."""
    value: str | None = None
    """Taint value for operator Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect matched; empty: all effects."""
    toleration_seconds: int | None = None
    """How long a NoExecute taint is tolerated."""


class ResourcesSpec(Section):
    nodes: int = Field(1, ge=1)
    """Pods (one per node), each running torchrun."""
    gpus_per_node: int = Field(1, ge=0)
    """GPUs per pod and torchrun processes per pod; 0 runs one CPU process per pod."""
    cpu: str | None = Field(None, pattern=QUANTITY)
    """CPU request and limit per pod, e.g. "16"."""
    memory: str | None = Field(None, pattern=QUANTITY)
    """Memory request and limit per pod, e.g. 128Gi."""
    shm_size: str = Field("8Gi", pattern=QUANTITY)
    """Size of the memory-backed /dev/shm (DataLoader workers share batches through it)."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels the pods must match."""
    tolerations: list[Toleration] = Field(default_factory=list)
    """Taints the pods tolerate."""
    priority_class_name: str | None = None
    """PriorityClass of the pods."""


class RunPolicySpec(Section):
    backoff_limit: int = Field(3, ge=0)
    """Retries of failed pods (infrastructure failures; bad config fails at once)."""
    active_deadline_seconds: int | None = Field(None, ge=1)
    """Wall-clock limit of the whole job."""
    ttl_seconds_after_finished: int | None = Field(None, ge=0)
    """Delete the Job's pods this long after it finishes."""
    suspend: bool = False
    """Suspend the job (pods stop; training resumes from the newest checkpoint when unset)."""
    progress_deadline_seconds: int | None = Field(1800, ge=1)
    """A running job whose step counter has not moved for this long is marked Stalled (a
    condition, an Event); null: never."""
    restart_on_stall: bool = False
    """When Stalled, delete the job's pods so the Job starts them again from the newest checkpoint."""
    termination_grace_period_seconds: int = Field(120, ge=30)
    """How long a preempted pod has to finish its step and write a checkpoint before it is
    killed (SIGTERM, then SIGKILL after this long)."""


class FineTuneJobSpec(TrainParameters):
    resources: ResourcesSpec = ResourcesSpec()
    """Nodes, GPUs and pod resources."""
    run_policy: RunPolicySpec = RunPolicySpec()
    """Retries, deadlines, suspension."""
    queue_name: str | None = Field(None, max_length=63, pattern=LABEL_VALUE)
    """Kueue LocalQueue; the Job is created suspended and admitted by Kueue as one gang."""
    image: str | None = None
    """Trainer image; default: the operator's configured trainer image."""


class ObjectMeta(Section):
    model_config = Section.model_config | {"extra": "allow"}
    name: str
    namespace: str | None = None


class FineTuneJob(Section):
    """A whole FineTuneJob manifest, as `kubectl apply` receives it."""

    api_version: Literal["kubetune.dev/v1alpha1"]
    kind: Literal["FineTuneJob"]
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: dict[str, Any] | None = None  # read with FineTuneJobStatus where needed; never validated on input

    def train_config(self, default_namespace: str = "default") -> TrainConfig:
        """The trainer's config: the spec's trainer sections plus the job's identity."""
        params = self.spec.model_dump(by_alias=True, include=set(TrainParameters.model_fields))
        identity = JobIdentity(name=self.metadata.name, namespace=self.metadata.namespace or default_namespace)
        return TrainConfig.model_validate({**params, "job": identity.model_dump(by_alias=True)})


Phase = Literal["Pending", "Staging", "Running", "Succeeded", "Failed", "Suspended"]


class Condition(Section):
    type: str
    """Created, Running, Suspended, Succeeded, Failed or SpecRejected."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: str
    """CamelCase reason code."""
    message: str = ""
    """Person-readable detail."""
    last_transition_time: str
    """When status last changed (RFC 3339)."""


class Progress(Section):
    epoch: int | None = None
    """Current epoch (0-based)."""
    step: int | None = None
    """Optimizer steps done."""
    total_steps: int | None = None
    """Optimizer steps the run will take."""
    percent: float | None = None
    """step / totalSteps, in percent."""
    loss: float | None = None
    """Training loss of the last step."""
    learning_rate: float | None = None
    """Learning rate of the last step."""
    images_per_second: float | None = None
    """Training throughput over all ranks."""
    eta: str | None = None
    """Estimated time left, e.g. 1h02m."""


class BestMetric(Section):
    """A value of the validation metric that early stopping watches."""

    metric: str
    """Validation metric tracked (miou, dice, f1 or loss)."""
    value: float
    """Its value."""


class FineTuneJobStatus(Section):
    phase: Phase | None = None
    """Pending, Staging, Running, Succeeded, Failed or Suspended."""
    conditions: list[Condition] = Field(default_factory=list)
    """Conditions with reasons (Kubernetes conventions)."""
    progress: Progress | None = None
    """Live training progress scraped from rank 0."""
    best_metric: BestMetric | None = None
    """Best validation value so far."""
    baseline_metric: BestMetric | None = None
    """The same metric for the base model, evaluated before training (compare with bestMetric)."""
    last_checkpoint: str | None = None
    """URI of the newest complete checkpoint."""
    start_time: str | None = None
    """When the Job started."""
    completion_time: str | None = None
    """When the Job finished."""
    restarts: int = 0
    """Pods that failed and were replaced."""
    observed_generation: int | None = None
    """metadata.generation this status describes."""
    message: str | None = None
    """Person-readable reason; on failure the trainer's one-line reason."""
    last_failure: str | None = None
    """The failing rank's last log lines (credentials redacted), from its termination message."""
    step_changed_at: str | None = None
    """When progress.step last moved (what runPolicy.progressDeadlineSeconds is measured from)."""
