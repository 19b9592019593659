"""What the handlers do, between the pure core (rendering, observing) and the API (kube).

`reconcile` makes the cluster hold the desired objects; `observe` turns what is there into the
FineTuneJob's status. Both return the status patch; the handlers hand it to kopf.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kopf
from kubetune_trainer.config import describe_validation_error
from pydantic import ValidationError

from . import policy
from .kube import KubeClient, Refused, scrape_metrics
from .observing import Scrape, derive_status, parse_metrics, set_condition
from .rendering import (
    IMMUTABLE_ANNOTATION,
    JOB_LABEL,
    Names,
    immutable_digests,
    immutable_view,
    name_problems,
    render_all,
)
from .settings import OperatorSettings
from .specs import FineTuneJob, FineTuneJobStatus


class InvalidSpec(Exception):
    """The resource does not validate; the message names the fields."""

    reason = "InvalidSpec"


class PolicyRefused(InvalidSpec):
    """The spec asks for what the platform admin does not allow (an image, a Secret)."""

    reason = "PolicyRefused"


class RefusedByAPIServer(InvalidSpec):
    """The API server refused an object derived from the spec (a quantity, a label, a limit)."""

    reason = "RefusedByAPIServer"


class Waiting(Exception):
    """Something outside the job must change first (an object of the same name owned by another)."""

    reason = "Waiting"


CONTROLLER_UID = "batch.kubernetes.io/controller-uid"
# A status message is read in `kubectl describe` and stored in etcd with the resource: bounded.
MESSAGE_LIMIT = 2048
# A finished job is observed for this long after it ended: the Job's watch event can come before
# the pods' (whose termination message says why it failed).
SETTLE_S = 10


@dataclass
class Seen:
    """The job's Job and pods as the operator's watches last saw them (no API read needed)."""

    job: dict[str, Any] | None
    pods: list[dict[str, Any]]
    metrics: Scrape | None = None  # rank 0's, scraped by the caller (None: not serving or not asked)
    unanswered: int = 0  # consecutive scrapes of a running rank 0 that got no answer


@dataclass
class Outcome:
    status: dict[str, Any]
    event: tuple[str, str, str] | None  # (type, reason, message) when the phase changed


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse(body: dict[str, Any]) -> FineTuneJob:
    """Parse once at the edge; handlers work with the model from here on."""
    raw = {k: body.get(k) for k in ("apiVersion", "kind", "metadata", "spec")}
    raw["metadata"] = {k: v for k, v in dict(body.get("metadata") or {}).items()}
    try:
        return FineTuneJob.model_validate(raw)
    except ValidationError as exc:
        raise InvalidSpec(f"invalid FineTuneJob: {describe_validation_error(exc)}") from exc


def bounded(message: str, limit: int = MESSAGE_LIMIT) -> str:
    """`message`, cut to `limit` characters with a count of what was cut."""
    if len(message) <= limit:
        return message
    cut = len(message) - limit
    return f"{message[:limit]}... ({cut} more characters cut)"


def waiting_status(body: dict[str, Any], message: str) -> Outcome:
    """Pending, saying what the job waits for (a Warning Event the first time it says so)."""
    previous = _previous(body)
    status = previous.model_copy(update={"phase": "Pending", "message": bounded(message)})
    outcome = _outcome(previous, status, "Warning", Waiting.reason)
    if previous.message != status.message:
        outcome.event = ("Warning", Waiting.reason, status.message or "")
    return outcome


def finished(status: FineTuneJobStatus) -> bool:
    """Training ended and its outcome is recorded (a refused spec is not an ending)."""
    return any(c.type in ("Succeeded", "Failed") and c.status == "True" for c in status.conditions)


def invalid_status(body: dict[str, Any], message: str, reason: str = InvalidSpec.reason) -> Outcome:
    """Failed with the reason; settled at this generation, so it is judged again only when the
    spec changes."""
    previous = _previous(body)
    message = bounded(message)
    conditions = set_condition(previous.conditions, "SpecRejected", "True", reason, message, now())
    generation = (body.get("metadata") or {}).get("generation")
    update = {"phase": "Failed", "message": message, "conditions": conditions, "observed_generation": generation}
    status = previous.model_copy(update=update)
    outcome = _outcome(previous, status, "Warning", reason)
    if previous.message != message:  # a new refusal is an Event even when the phase stays Failed
        outcome.event = ("Warning", reason, message)
    return outcome


def check_policy(ftj: FineTuneJob, kube: KubeClient, settings: OperatorSettings) -> None:
    """Refuse, before anything is created, what the admin does not allow."""
    secret, token = ftj.spec.storage.credentials_secret, ftj.spec.model.hf_token_secret
    labels = kube.secret_labels(ftj.metadata.namespace, secret) if secret else None
    token_labels = kube.secret_labels(ftj.metadata.namespace, token) if token else None
    problems = policy.refusals(ftj, settings, labels, token_labels)
    if problems:
        raise PolicyRefused("; ".join(problems))


def _previous(body: dict[str, Any]) -> FineTuneJobStatus:
    """The status as last written, or an empty one when it does not parse (hand-edited, older)."""
    try:
        return FineTuneJobStatus.model_validate(body.get("status") or {})
    except ValidationError:
        return FineTuneJobStatus()


def reconcile(body: dict[str, Any], kube: KubeClient, settings: OperatorSettings, seen: Seen | None = None) -> Outcome:
    """Make the cluster hold the job's objects, then observe. `seen`: the Job and pods as the
    watches have them (a Job they do not show yet is read from the API server)."""
    ftj = parse(body)
    previous = _previous(body)
    if finished(previous):  # whatever was garbage-collected since, a finished job never trains again
        return Outcome(previous.model_dump(by_alias=True, mode="json"), None)
    if problems := name_problems(ftj):
        raise InvalidSpec("; ".join(problems))
    check_policy(ftj, kube, settings)
    names = Names.of(ftj)
    namespace = ftj.metadata.namespace
    desired = render_all(ftj, settings)
    # The watches' view, when given. A job that never had a Job needs no read (a Job of another
    # owner is found by create's 409); one that had is read when the watches do not show it.
    created_before = any(c.type == "Created" and c.status == "True" for c in previous.conditions)
    job = seen.job if seen is not None else None
    if job is None and (seen is None or created_before):
        job = kube.get("Job", namespace, names.job)
    if job is not None and not owned_by(job, ftj):
        raise Waiting(_foreign(job))
    if job is not None and refused_fields(job, ftj):
        return observe(body, kube, settings, ftj, seen=seen)  # the status says what was refused; nothing is applied
    created_job: dict[str, Any] | None = None
    try:
        if job is None:  # the API server judges every object before any is stored
            for obj in desired:
                kube.create(obj, dry_run=True)
        for obj in desired:
            kind, name = obj["kind"], obj["metadata"]["name"]
            # A job whose Job exists most likely has its other objects too: read them, not create.
            current = job if kind == "Job" else (kube.get(kind, namespace, name) if job is not None else None)
            if current is None:
                if stored := kube.create(obj):
                    created_job = stored if kind == "Job" else created_job
                    continue
                current = kube.get(kind, namespace, name)  # created meanwhile
                if current is None:  # a conflict for an object that is not there: ask again later
                    raise kopf.TemporaryError(
                        f"creating {kind} {namespace}/{name}: 409, yet it does not exist", delay=2
                    )
            if current is not None and not owned_by(current, ftj):
                # A Job is a training run: never taken over. A ConfigMap, Service or NetworkPolicy
                # orphaned by `kubectl delete --cascade=orphan` is rewritten and adopted.
                if obj["kind"] == "Job" or (current.get("metadata") or {}).get("ownerReferences"):
                    raise Waiting(_foreign(current))
                kube.patch(obj["kind"], namespace, obj["metadata"]["name"], _adoption(obj))
            if obj["kind"] == "ConfigMap":  # mutable settings reach the trainer on its next pod start
                if (current or {}).get("data") != obj["data"]:
                    kube.patch("ConfigMap", namespace, names.config_map, {"data": obj["data"]})
            elif obj["kind"] == "Job":
                _sync_suspend(kube, ftj, current or {})
    except Refused as exc:
        raise RefusedByAPIServer(str(exc)) from exc
    # A Job created just now has no pods yet: nothing to read back.
    seen = Seen(job=created_job, pods=[]) if created_job is not None else seen
    return observe(body, kube, settings, ftj, recreate=False, seen=seen)


def _adoption(obj: dict[str, Any]) -> dict[str, Any]:
    """A merge patch that makes an orphan the desired object: owner, labels and content."""
    meta = obj["metadata"]
    body = {k: v for k, v in obj.items() if k in ("data", "spec")}
    if obj["kind"] == "Service":  # clusterIP and its families are immutable and already right
        body = {}
    return {"metadata": {"ownerReferences": meta.get("ownerReferences"), "labels": meta.get("labels")}, **body}


def _seconds_between(start: str, end: str) -> float:
    return (_parse_time(end) - _parse_time(start)).total_seconds()


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def ttl_expired(ftj: FineTuneJob, status: FineTuneJobStatus, at: str) -> bool:
    """Whether a finished job's Job is due for deletion (runPolicy.ttlSecondsAfterFinished)."""
    ttl = ftj.spec.run_policy.ttl_seconds_after_finished
    if ttl is None or not finished(status) or not status.completion_time:
        return False
    return _seconds_between(status.completion_time, at) >= ttl


def cleaned(status: FineTuneJobStatus) -> bool:
    return any(c.type == "Cleaned" and c.status == "True" for c in status.conditions)


def settled(body: dict[str, Any]) -> bool:
    """A finished job whose status describes its current generation needs no more status passes,
    once nothing is left to clean up (runPolicy.ttlSecondsAfterFinished). A refused spec has no
    Job to clean up."""
    status = _previous(body)
    if status.phase not in ("Succeeded", "Failed"):
        return False
    if status.observed_generation != (body.get("metadata") or {}).get("generation"):
        return False
    if status.completion_time and _seconds_between(status.completion_time, now()) < SETTLE_S:
        return False  # the pods' watch may still bring the trainer's termination message
    ttl = ((body.get("spec") or {}).get("runPolicy") or {}).get("ttlSecondsAfterFinished")
    return not finished(status) or ttl is None or cleaned(status)


def owned_by(obj: dict[str, Any], ftj: FineTuneJob) -> bool:
    """Whether `obj` is this FineTuneJob's (by uid: a job deleted and re-created under the same
    name is another owner)."""
    uid = (ftj.metadata.model_extra or {}).get("uid")
    owners = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(o.get("uid") == uid and o.get("controller") for o in owners)


def _foreign(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    owners = [f"{o.get('kind')} uid {o.get('uid')}" for o in meta.get("ownerReferences") or []] or ["nobody"]
    state = "being deleted" if meta.get("deletionTimestamp") else "still there"
    return (
        f"waiting: {obj.get('kind')} {meta.get('namespace')}/{meta.get('name')} already exists, owned by "
        f"{', '.join(owners)} ({state}); this job proceeds once it is gone"
    )


def _changed_fields(accepted: dict[str, Any], current: dict[str, Any]) -> list[str]:
    changed = []
    for section in sorted(set(accepted) | set(current)):
        old, new = accepted.get(section), current.get(section)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += [f"spec.{section}.{k}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        elif old != new:
            changed.append(f"spec.{section}")
    return changed


def refused_fields(job: dict[str, Any], ftj: FineTuneJob) -> list[str]:
    """Fields changed since the Job was created that may not change while it exists."""
    accepted = json.loads(((job.get("metadata") or {}).get("annotations") or {}).get(IMMUTABLE_ANNOTATION, "{}"))
    current = immutable_digests(immutable_view(ftj))
    return _changed_fields(immutable_digests(accepted), current) if accepted else []


def refusal_message(fields: list[str]) -> str:
    return (
        f"{', '.join(fields)} cannot change while the job exists; revert the change, or delete and "
        "re-create the FineTuneJob (training resumes from output.uri's checkpoints)"
    )


def _sync_suspend(kube: KubeClient, ftj: FineTuneJob, job: dict[str, Any]) -> None:
    """runPolicy.suspend drives Job.spec.suspend; with a Kueue queue, unsuspending is Kueue's call."""
    want = ftj.spec.run_policy.suspend
    have = bool(job.get("spec", {}).get("suspend", False))
    if want and not have:
        kube.patch("Job", ftj.metadata.namespace, Names.of(ftj).job, {"spec": {"suspend": True}})
    elif not want and have and not ftj.spec.queue_name:
        kube.patch("Job", ftj.metadata.namespace, Names.of(ftj).job, {"spec": {"suspend": False}})


def own_pods(job: dict[str, Any] | None, pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pods of `job` itself: a Job of an earlier FineTuneJob of that name may have left pods."""
    if job is None:
        return pods
    uid = job["metadata"].get("uid")
    return [p for p in pods if (p["metadata"].get("labels") or {}).get(CONTROLLER_UID, uid) == uid]


def rank0_address(pods: list[dict[str, Any]]) -> str | None:
    """The pod IP of index 0 while it runs: where rank 0 serves its metrics."""
    for pod in pods:
        annotations = pod.get("metadata", {}).get("annotations", {}) or {}
        labels = pod.get("metadata", {}).get("labels", {}) or {}
        index = labels.get(
            "batch.kubernetes.io/job-completion-index", annotations.get("batch.kubernetes.io/job-completion-index")
        )
        ip = pod.get("status", {}).get("podIP")
        if index == "0" and ip and pod.get("status", {}).get("phase") == "Running":
            return ip
    return None


def rank0_scrape(pods: list[dict[str, Any]], port: int) -> Scrape | None:
    ip = rank0_address(pods)
    text = scrape_metrics(ip, port) if ip else None
    return parse_metrics(text) if text is not None else None


def status_changes(current: dict[str, Any] | None, status: dict[str, Any]) -> dict[str, Any]:
    """The top-level status fields that differ from what is stored: the merge patch to send (an
    empty one is not sent)."""
    current = current or {}
    return {k: v for k, v in status.items() if current.get(k) != v}


def moves_with_time(body: dict[str, Any]) -> bool:
    """Whether the job's status can change with no change to its Job or pods: rank 0's metrics
    (Staging, Running), a stall deadline, a TTL to carry out, or a status not written yet. Other
    jobs are observed when their Job or pods change."""
    if settled(body):
        return False
    status = _previous(body)
    return status.phase in (None, "Staging", "Running") or finished(status)


def observe(
    body: dict[str, Any],
    kube: KubeClient,
    settings: OperatorSettings,
    ftj: FineTuneJob | None = None,
    recreate: bool = True,
    seen: Seen | None = None,
) -> Outcome:
    ftj = ftj or parse(body)
    previous = _previous(body)
    names = Names.of(ftj)
    if seen is not None and seen.job is None:  # the watch may lag a Job just created: ask once
        seen = None
    job = seen.job if seen is not None else kube.get("Job", ftj.metadata.namespace, names.job)
    if job is None and finished(previous):  # removed after the outcome was recorded: nothing changes
        if not cleaned(previous):
            message = "the Job and its pods are gone; the outcome above stays"
            conditions = set_condition(previous.conditions, "Cleaned", "True", "JobGone", message, now())
            previous = previous.model_copy(update={"conditions": conditions})
        return Outcome(previous.model_dump(by_alias=True, mode="json"), None)
    if job is None and recreate and any(c.type == "Created" and c.status == "True" for c in previous.conditions):
        return reconcile(body, kube, settings)  # deleted by hand or lost: the job is not finished
    if job is not None and not owned_by(job, ftj):
        raise Waiting(_foreign(job))
    if seen is not None:  # the control loop scrapes from async code
        pods, scrape, unanswered = own_pods(job, seen.pods), seen.metrics, seen.unanswered
    else:
        pods = kube.list_pods(ftj.metadata.namespace, f"{JOB_LABEL}={ftj.metadata.name}") if job else []
        pods = own_pods(job, pods)
        scrape, unanswered = rank0_scrape(pods, settings.trainer.metrics_port) if job else None, 0
    status = derive_status(ftj, previous, job, pods, scrape, now(), unanswered=unanswered)
    # Derived from the Job and the spec every time, so no concurrent status write can lose it.
    refused = refused_fields(job, ftj) if job is not None else []
    if refused:
        message = refusal_message(refused)
        conditions = set_condition(status.conditions, "SpecRejected", "True", "ImmutableFieldChanged", message, now())
        status = status.model_copy(update={"message": message, "conditions": conditions})
    elif any(c.type == "SpecRejected" for c in status.conditions):
        conditions = set_condition(status.conditions, "SpecRejected", "False", "SpecAccepted", "", now())
        status = status.model_copy(update={"conditions": conditions})
    if status.message:
        status = status.model_copy(update={"message": bounded(status.message)})
    if job is not None and ttl_expired(ftj, status, now()):
        kube.delete_job(ftj.metadata.namespace, names.job, job["metadata"]["uid"])
        seconds = ftj.spec.run_policy.ttl_seconds_after_finished
        message = f"deleted the Job and its pods {seconds} s after the job finished (runPolicy.ttlSecondsAfterFinished)"
        conditions = set_condition(status.conditions, "Cleaned", "True", "TTLExpired", message, now())
        status = status.model_copy(update={"conditions": conditions})
    kind = "Warning" if status.phase == "Failed" else "Normal"
    outcome = _outcome(previous, status, kind, status.phase or "")
    if refused and previous.message != status.message:
        outcome.event = ("Warning", "SpecRejected", status.message or "")
    stalled = next((c for c in status.conditions if c.type == "Stalled" and c.status == "True"), None)
    was_stalled = any(c.type == "Stalled" and c.status == "True" for c in previous.conditions)
    if stalled is not None and not was_stalled:
        outcome.event = ("Warning", "Stalled", stalled.message)
    if stalled is not None and ftj.spec.run_policy.restart_on_stall and pods:
        for pod in pods:  # the Job starts them again; they resume from the newest checkpoint
            kube.delete_pod(ftj.metadata.namespace, pod["metadata"]["name"])
        outcome.status["stepChangedAt"] = now()  # a fresh deadline for the restarted pods
        outcome.event = ("Warning", "RestartedOnStall", f"{stalled.message}; deleted {len(pods)} pod(s) to restart")
    return outcome


def _outcome(previous: FineTuneJobStatus, status: FineTuneJobStatus, kind: str, reason: str) -> Outcome:
    event = (kind, reason, status.message or "") if status.phase != previous.phase else None
    return Outcome(status.model_dump(by_alias=True, mode="json"), event)
