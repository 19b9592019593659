"""Status from what is observed: the Job, its pods and rank 0's metrics. Pure functions.

Phases:
  Pending    no Job yet, Kueue has not admitted it, or pods are not scheduled
  Staging    pods run but training has not started (downloading data and weights, rendezvous)
  Running    rank 0 reports optimizer steps
  Succeeded  the Job completed
  Failed     the Job failed; `message` carries the trainer's one-line reason
  Suspended  runPolicy.suspend is set (the Job's pods are gone; training resumes from checkpoints)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubetune_trainer.errors import redact
from prometheus_client.parser import text_string_to_metric_families

from .specs import BestMetric, Condition, FineTuneJob, FineTuneJobStatus, Progress


@dataclass(frozen=True)
class Scrape:
    """Rank 0's training metrics, as read from its /metrics endpoint."""

    step: int | None = None
    total_steps: int | None = None
    epoch: int | None = None
    loss: float | None = None
    learning_rate: float | None = None
    images_per_second: float | None = None
    mean_step_seconds: float | None = None
    checkpoint_step: int | None = None
    best: tuple[str, float] | None = None
    baseline: tuple[str, float] | None = None


# The series a status is made of; a trainer exposes many more (histogram buckets, per-rank and
# process series), which the parser need not read.
STATUS_SERIES = frozenset(
    {
        "kubetune_train_step",
        "kubetune_train_total_steps",
        "kubetune_train_epoch",
        "kubetune_train_loss",
        "kubetune_train_learning_rate",
        "kubetune_train_images_per_second",
        "kubetune_train_step_seconds_sum",
        "kubetune_train_step_seconds_count",
        "kubetune_checkpoint_last_step",
        "kubetune_eval_best_metric",
        "kubetune_eval_baseline_metric",
    }
)


def _status_lines(text: str) -> str:
    """The sample lines of `text` whose metric is one of STATUS_SERIES (they parse untyped: the
    names and values are the same)."""
    kept = []
    for line in text.splitlines():
        if line and line[0] != "#" and line.partition("{")[0].partition(" ")[0] in STATUS_SERIES:
            kept.append(line)
    return "\n".join(kept) + "\n"


def parse_metrics(text: str) -> Scrape:
    """Read the rank-0 series of the trainer's exposition text (names in docs/architecture.md)."""
    values: dict[str, float] = {}
    best = baseline = None
    for family in text_string_to_metric_families(_status_lines(text)):
        for sample in family.samples:
            if sample.labels.get("rank", "0") != "0":
                continue
            if sample.name == "kubetune_eval_best_metric":
                best = (sample.labels.get("metric", "miou"), sample.value)
            elif sample.name == "kubetune_eval_baseline_metric":
                baseline = (sample.labels.get("metric", "miou"), sample.value)
            else:
                values[sample.name] = sample.value
    count = values.get("kubetune_train_step_seconds_count")
    mean = values["kubetune_train_step_seconds_sum"] / count if count else None

    def as_int(name: str) -> int | None:
        return int(values[name]) if name in values else None

    return Scrape(
        step=as_int("kubetune_train_step"),
        total_steps=as_int("kubetune_train_total_steps"),
        epoch=as_int("kubetune_train_epoch"),
        loss=values.get("kubetune_train_loss"),
        learning_rate=values.get("kubetune_train_learning_rate"),
        images_per_second=values.get("kubetune_train_images_per_second"),
        mean_step_seconds=mean,
        checkpoint_step=as_int("kubetune_checkpoint_last_step"),
        best=best,
        baseline=baseline,
    )


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_from(scrape: Scrape) -> Progress:
    percent = eta = None
    if scrape.step is not None and scrape.total_steps:
        percent = round(100.0 * scrape.step / scrape.total_steps, 1)
        if scrape.mean_step_seconds:
            eta = format_duration((scrape.total_steps - scrape.step) * scrape.mean_step_seconds)
    return Progress(
        epoch=scrape.epoch,
        step=scrape.step,
        total_steps=scrape.total_steps,
        percent=percent,
        loss=scrape.loss,
        learning_rate=scrape.learning_rate,
        images_per_second=scrape.images_per_second,
        eta=eta,
    )


def slim_job(body: dict[str, Any]) -> dict[str, Any]:
    """What the operator reads of a Job (its identity, owner, recorded spec fields, suspension and
    status): kept per job in memory, so not the pod template."""
    meta = body.get("metadata") or {}
    keep = ("name", "namespace", "uid", "labels", "annotations", "ownerReferences", "deletionTimestamp")
    return {
        "apiVersion": body.get("apiVersion", "batch/v1"),
        "kind": body.get("kind", "Job"),
        "metadata": {k: meta[k] for k in keep if k in meta},
        "spec": {"suspend": (body.get("spec") or {}).get("suspend", False)},
        "status": body.get("status") or {},
    }


def slim_pod(body: dict[str, Any]) -> dict[str, Any]:
    """What the operator reads of a pod (identity, index, phase, address, container endings)."""
    meta, status = body.get("metadata") or {}, body.get("status") or {}
    keep = ("name", "namespace", "uid", "labels", "annotations", "deletionTimestamp")
    return {
        "metadata": {k: meta[k] for k in keep if k in meta},
        "status": {k: status[k] for k in ("phase", "podIP", "reason", "message", "containerStatuses") if k in status},
    }


def _job_condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in job.get("status", {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return cond
    return None


# Scrapes in a row a running rank 0 may miss before the status says its metrics are not answering.
UNANSWERED_LIMIT = 3

# The classes the trainer's termination message starts with (kubetune_trainer.errors.failure_class).
FAILURE_CLASSES = (
    "OOM", "NCCLTimeout", "NonFiniteLoss", "DataError", "ConfigError", "StorageUnavailable", "Preempted", "Crash",
)  # fmt: skip


def failure_reason(job: dict[str, Any], pods: list[dict[str, Any]]) -> str:
    """The trainer's one-line reason from the newest failed pod, else the Job's own condition."""
    return failure(job, pods)[1]


def last_lines(pods: list[dict[str, Any]]) -> str | None:
    """The newest failed container's termination message (the trainer's last log lines, then its
    reason), redacted again here, bounded."""
    found = []
    for pod in pods:
        for cs in pod.get("status", {}).get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
            if term and term.get("exitCode", 0) != 0 and (term.get("message") or "").strip():
                found.append((_not_deleted(pod), term.get("finishedAt") or "", term["message"].strip()))
    return redact(sorted(found)[-1][2])[:4000] if found else None


def _not_deleted(pod: dict[str, Any]) -> bool:
    """A pod that ended because it was deleted (the Job controller stops the other pods once one
    fails; SIGTERM, exit 143) did not cause the failure: ranked after those that were not."""
    return not (pod.get("metadata") or {}).get("deletionTimestamp")


def failure(job: dict[str, Any], pods: list[dict[str, Any]]) -> tuple[str | None, str]:
    """(the failure class, the one-line reason) from the newest failed pod that was not deleted
    (else the newest deleted one): the class the trainer
    wrote first on its termination line, or OOM when the kernel killed the container for memory;
    else (None, the Job's own condition)."""
    messages = []
    for pod in pods:
        for cs in pod.get("status", {}).get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
            if term and term.get("exitCode", 0) != 0:
                text = (term.get("message") or "").strip().splitlines()
                reason = text[-1] if text else term.get("reason", "Error")
                kind = reason.split(":", 1)[0] if ":" in reason else None
                if term.get("reason") == "OOMKilled":
                    kind = "OOM"
                kind = kind if kind in FAILURE_CLASSES else None
                message = f"{reason} (exit code {term['exitCode']})"
                messages.append((_not_deleted(pod), term.get("finishedAt") or "", kind, message))
    if messages:
        *_, kind, message = sorted(messages, key=lambda m: m[:2])[-1]
        return kind, message
    cond = _job_condition(job, "Failed") or {}
    return None, cond.get("message") or cond.get("reason") or "the Job failed"


def derive_phase(
    ftj: FineTuneJob, job: dict[str, Any] | None, pods: list[dict[str, Any]], scrape: Scrape | None
) -> tuple[str, str, str]:
    """(phase, reason, message) for the observed state."""
    if job is None:
        return "Pending", "Creating", "creating the training Job"
    if _job_condition(job, "Complete") or _job_condition(job, "SuccessCriteriaMet"):
        return "Succeeded", "Completed", "training finished"
    if _job_condition(job, "Failed") or _job_condition(job, "FailureTarget"):
        kind, message = failure(job, pods)
        condition = _job_condition(job, "Failed") or _job_condition(job, "FailureTarget") or {}
        return "Failed", kind or condition.get("reason", "JobFailed"), message
    suspended = job.get("spec", {}).get("suspend", False)
    if ftj.spec.run_policy.suspend:
        return (
            "Suspended",
            "Suspended",
            "runPolicy.suspend is set; pods stopped, training resumes from the newest checkpoint",
        )
    if suspended:
        if ftj.spec.queue_name:
            return "Pending", "WaitingForAdmission", f"waiting for Kueue to admit the job (queue {ftj.spec.queue_name})"
        return "Suspended", "JobSuspended", "the Job is suspended"
    running = [p for p in pods if p.get("status", {}).get("phase") == "Running"]
    if scrape is not None and scrape.step is not None:
        return (
            "Running",
            "Training",
            f"step {scrape.step}" + (f" of {scrape.total_steps}" if scrape.total_steps else ""),
        )
    if running:
        return (
            "Staging",
            "Starting",
            f"{len(running)} of {ftj.spec.resources.nodes} pods running; staging data and joining the rendezvous",
        )
    return "Pending", "PodsPending", "waiting for pods to be scheduled and started"


def stall(ftj: FineTuneJob, phase: str, step: int | None, since: str | None, now: str) -> str | None:
    """Why a running job counts as stalled (its step has not moved for progressDeadlineSeconds), or None."""
    deadline = ftj.spec.run_policy.progress_deadline_seconds
    if phase != "Running" or not deadline or step is None or not since:
        return None
    idle = (_parse_time(now) - _parse_time(since)).total_seconds()
    if idle <= deadline:
        return None
    return f"step {step} has not moved for {format_duration(idle)} (runPolicy.progressDeadlineSeconds {deadline})"


def _parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def set_condition(
    conditions: list[Condition], kind: str, status: str, reason: str, message: str, now: str
) -> list[Condition]:
    """Kubernetes semantics: lastTransitionTime changes only when status changes."""
    out = [c for c in conditions if c.type != kind]
    old = next((c for c in conditions if c.type == kind), None)
    since = old.last_transition_time if old is not None and old.status == status else now
    out.append(Condition(type=kind, status=status, reason=reason, message=message, last_transition_time=since))
    return sorted(out, key=lambda c: c.type)


def derive_status(
    ftj: FineTuneJob,
    previous: FineTuneJobStatus,
    job: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    scrape: Scrape | None,
    now: str,
    unanswered: int = 0,
) -> FineTuneJobStatus:
    phase, reason, message = derive_phase(ftj, job, pods, scrape)
    if phase == "Staging" and previous.phase == "Running" and scrape is None:
        # Rank 0's metrics did not answer (a hung or firewalled endpoint, a busy trainer): its pods
        # still run, so the job still trains. Only the pods or a scrape change the phase; the
        # message says so once the endpoint has missed several scrapes in a row.
        step = previous.progress.step if previous.progress else None
        phase, reason, message = "Running", "Training", previous.message or "training"
        if unanswered >= UNANSWERED_LIMIT:
            message = (f"step {step}" if step is not None else "training") + "; rank 0's metrics are not answering"
    if previous.phase in ("Succeeded", "Failed") and phase != previous.phase and job is not None:
        phase, reason, message = previous.phase, "Finished", previous.message or ""  # terminal phases stay
    conditions = list(previous.conditions)
    conditions = set_condition(
        conditions, "Created", "True" if job else "False", "JobCreated" if job else "Creating", "", now
    )
    conditions = set_condition(conditions, "Running", "True" if phase == "Running" else "False", reason, message, now)
    conditions = set_condition(conditions, "Suspended", "True" if phase == "Suspended" else "False", reason, "", now)
    if phase in ("Succeeded", "Failed"):
        conditions = set_condition(conditions, phase, "True", reason, message, now)
    step = scrape.step if scrape is not None and scrape.step is not None else None
    old_step = previous.progress.step if previous.progress else None
    changed_at = now if step is not None and (step != old_step or not previous.step_changed_at) else None
    changed_at = changed_at or previous.step_changed_at
    stalled = stall(ftj, phase, step, changed_at, now)
    if stalled or any(c.type == "Stalled" for c in conditions):
        conditions = set_condition(
            conditions, "Stalled", "True" if stalled else "False", "NoProgress" if stalled else "Progressing",
            stalled or "", now,
        )  # fmt: skip
    job_status = (job or {}).get("status", {})
    progress = progress_from(scrape) if scrape is not None and scrape.step is not None else previous.progress
    if phase == "Succeeded" and progress is not None and progress.total_steps:
        progress = progress.model_copy(update={"step": progress.total_steps, "percent": 100.0, "eta": "0s"})
    best = BestMetric(metric=scrape.best[0], value=scrape.best[1]) if scrape and scrape.best else previous.best_metric
    baseline = previous.baseline_metric
    if scrape and scrape.baseline:
        baseline = BestMetric(metric=scrape.baseline[0], value=scrape.baseline[1])
    checkpoint = previous.last_checkpoint
    if scrape is not None and scrape.checkpoint_step:
        checkpoint = f"{ftj.spec.output.uri.rstrip('/')}/checkpoints/step-{scrape.checkpoint_step:08d}/"
    # The Job sets completionTime only when it succeeds; a failure's time is its condition's. A
    # finished status is not observed again, so the first condition that decides the outcome counts
    # (FailureTarget and SuccessCriteriaMet come before Failed and Complete, once pods terminate).
    completion = job_status.get("completionTime")
    if phase in ("Failed", "Succeeded") and not completion:
        deciding = ("Failed", "FailureTarget") if phase == "Failed" else ("Complete", "SuccessCriteriaMet")
        conditions_met = (_job_condition(job or {}, kind) for kind in deciding)
        completion = next((c.get("lastTransitionTime") for c in conditions_met if c), None)
    return FineTuneJobStatus(
        phase=phase,
        conditions=conditions,
        progress=progress,
        best_metric=best,
        baseline_metric=baseline,
        last_checkpoint=checkpoint,
        start_time=job_status.get("startTime") or previous.start_time,
        completion_time=completion or previous.completion_time,
        restarts=int(job_status.get("failed", 0) or 0),
        observed_generation=(ftj.metadata.model_extra or {}).get("generation"),
        message=message,
        last_failure=last_lines(pods) if phase == "Failed" else previous.last_failure,
        step_changed_at=changed_at,
    )
